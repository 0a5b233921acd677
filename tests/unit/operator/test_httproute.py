"""Weighted canaries: the HTTPRoute and canary Service an InferenceService with spec.canary.gateway
renders, the Routed condition, and the one rule for the canary's model name that defaulting and
validation share."""

from __future__ import annotations

import pytest

from aidc_operator import admission
from aidc_operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from aidc_operator.builders import httproute as routing
from aidc_operator.builders import inferenceservice as build
from aidc_operator.builders.common import LABEL_ISVC, LABEL_ROLE, MANAGED_BY, Owner
from aidc_operator.serving_status import Resolution, plan_status

OWNER = Owner("InferenceService", "mnist", "team-a", "uid-9")
STORAGE = {"volume": {"persistentVolumeClaim": {"claimName": "ckpt"}}}


def spec(percent: int = 20, gateway: dict | None = None, **kw) -> InferenceServiceSpec:
    canary: dict = {"trafficPercent": percent, "model": {"storage": {**STORAGE, "path": "v2"}}}
    if gateway is not None:
        canary["gateway"] = gateway
    return InferenceServiceSpec.model_validate(
        {"model": {"storage": {**STORAGE, "path": "v1"}}, "canary": canary, **kw}
    )


def backends(route: dict) -> dict[str, tuple[int, int]]:
    (rule,) = route["spec"]["rules"]
    return {b["name"]: (b["weight"], b["port"]) for b in rule["backendRefs"]}


@pytest.mark.parametrize("percent", [0, 1, 20, 50, 99, 100])
def test_weights_split_100_between_primary_and_canary(percent: int) -> None:
    route = routing.http_route(OWNER, spec(percent, {"name": "web"}))
    assert backends(route) == {"mnist": (100 - percent, 80), "mnist-canary": (percent, 80)}


def test_route_is_owned_named_and_attached_to_the_named_gateway_listener() -> None:
    route = routing.http_route(OWNER, spec(20, {"name": "web", "namespace": "infra", "sectionName": "https"}))
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["kind"] == "HTTPRoute"
    meta = route["metadata"]
    assert (meta["name"], meta["namespace"]) == ("mnist", "team-a")
    assert meta["labels"] == {**MANAGED_BY, LABEL_ISVC: "mnist"}  # the operator's watch selects on these
    (ref,) = meta["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
        "InferenceService",
        "mnist",
        "uid-9",
        True,
    )
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "web",
            "namespace": "infra",
            "sectionName": "https",
        }
    ]
    # Only this model's v2 URLs: several services can share a Gateway.
    assert route["spec"]["rules"][0]["matches"] == [
        {"path": {"type": "PathPrefix", "value": "/v2/models/mnist"}}
    ]
    # Unset namespace and listener: the InferenceService's namespace, every listener.
    bare = routing.http_route(OWNER, spec(20, {"name": "web"}))
    assert bare["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "web"}
    ]


def test_route_follows_the_model_name_and_tls_port() -> None:
    s = spec(30, {"name": "web"}, tlsSecretRef={"name": "tls"})
    s.model.name = "digits"
    route = routing.http_route(OWNER, s)
    assert route["spec"]["rules"][0]["matches"][0]["path"]["value"] == "/v2/models/digits"
    assert backends(route) == {"mnist": (70, 443), "mnist-canary": (30, 443)}


def test_routed_services_split_no_more_by_replica_ratio() -> None:
    s = spec(20, {"name": "web"})
    assert routing.routed(s, gateway_api_served=True)
    primary = build.service(OWNER, s, routed=True)
    assert primary["spec"]["selector"] == {LABEL_ISVC: "mnist", LABEL_ROLE: "primary"}
    canary = routing.canary_service(OWNER, s)
    assert canary["metadata"]["name"] == "mnist-canary"
    assert canary["spec"]["selector"] == {LABEL_ISVC: "mnist", LABEL_ROLE: "canary"}
    assert canary["spec"]["ports"] == primary["spec"]["ports"]
    assert canary["metadata"]["ownerReferences"][0]["uid"] == "uid-9"
    # Not routed: the one Service selects both roles (the replica ratio), as without a gateway.
    assert not routing.routed(s, gateway_api_served=False)
    assert not routing.routed(spec(20), gateway_api_served=True)
    assert build.service(OWNER, s)["spec"]["selector"] == {LABEL_ISVC: "mnist"}


def test_routed_condition_says_what_the_cluster_and_gateway_allow() -> None:
    s = spec(20, {"name": "web"})
    assert routing.route_condition("mnist", spec(20), True, None) is None  # no gateway, no condition
    status, reason, message = routing.route_condition("mnist", s, False, None)
    assert (status, reason) == ("False", "GatewayAPINotServed")
    assert message.startswith("spec.canary.gateway:") and "replica ratio" in message
    status, reason, message = routing.route_condition("mnist", s, True, {"metadata": {"name": "mnist"}})
    assert (status, reason) == (
        "Unknown",
        "RouteApplied",
    ) and "80% to the primary, 20% to the canary" in message

    def with_parent(accepted: str, why: str) -> dict:
        cond = {"type": "Accepted", "status": accepted, "reason": why, "message": "listener says so"}
        return {"status": {"parents": [{"parentRef": {"name": "web"}, "conditions": [cond]}]}}

    assert routing.route_condition("mnist", s, True, with_parent("True", "Accepted"))[:2] == (
        "True",
        "Accepted",
    )
    refused = routing.route_condition("mnist", s, True, with_parent("False", "NotAllowedByListeners"))
    assert refused[:2] == ("False", "NotAllowedByListeners") and "listener says so" in refused[2]


@pytest.mark.parametrize("primary_name", [None, "digits"])
def test_a_canary_without_a_model_name_is_defaulted_to_what_validation_accepts(
    primary_name: str | None,
) -> None:
    """The one rule: the canary serves under the primary's model name (one URL behind one Service or
    route). The webhook defaults with it, the webhook and the reconciler validate with it."""
    raw: dict = {
        "model": {"storage": {**STORAGE, "path": "v1"}},
        "canary": {
            "trafficPercent": 20,
            "model": {"storage": {**STORAGE, "path": "v2"}},
            "gateway": {"name": "web"},
        },
    }
    if primary_name:
        raw["model"]["name"] = primary_name
    defaulted = admission.default_inferenceservice("mnist", raw)
    assert defaulted["canary"]["model"]["name"] == (primary_name or "mnist")
    assert admission.validate_inferenceservice("mnist", defaulted) == []
    assert admission.default_inferenceservice("mnist", defaulted) == defaulted  # idempotent
    defaulted["canary"]["model"]["name"] = "mnist-canary"  # what the webhook once wrote
    (problem,) = admission.validate_inferenceservice("mnist", defaulted)
    assert problem.startswith("spec.canary.model.name:")


def test_canary_ready_says_the_route_splits_not_the_replica_ratio() -> None:
    s = spec(10, {"name": "web"})
    resolved = Resolution(build.resolve_storage(s.model), "StorageConfigured", "ok")
    ready = {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}}

    def canary_message(routed: bool) -> str:
        st = plan_status(
            InferenceServiceStatus(),
            OWNER,
            s,
            1,
            resolved,
            resolved,
            ready,
            ready,
            1,
            None,
            "now",
            routed=routed,
        )
        return next(c for c in st.conditions if c.type == "CanaryReady").message

    assert canary_message(True) == "1/1 canary replicas ready; the HTTPRoute sends it 10%"
    assert "~50% of connections" in canary_message(False)  # one and one: the ratio, whatever was asked
