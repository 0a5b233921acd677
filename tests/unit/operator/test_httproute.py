"""Weighted canaries: the HTTPRoute, GRPCRoute and canary Service an InferenceService with
spec.canary.gateway renders, the Routed condition, and the one rule for the canary's model name that
defaulting and validation share."""

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
    grpc = routing.grpc_route(OWNER, spec(percent, {"name": "web"}))
    assert backends(grpc) == {"mnist": (100 - percent, 8081), "mnist-canary": (percent, 8081)}


def test_grpc_calls_are_split_by_a_grpcroute_beside_the_httproute() -> None:
    """The same parent and weights, every method of the OIP's gRPC service (the model is named inside
    the message, where no Gateway looks), to the Services' grpc ports."""
    s = spec(25, {"name": "web", "sectionName": "grpc"}, port=8081)  # the pod's gRPC port moves to 8082
    route, grpc = routing.http_route(OWNER, s), routing.grpc_route(OWNER, s)
    assert (grpc["apiVersion"], grpc["kind"]) == ("gateway.networking.k8s.io/v1", "GRPCRoute")
    assert grpc["metadata"] == route["metadata"]  # same name, labels and owner: deleted with it
    assert grpc["spec"]["parentRefs"] == route["spec"]["parentRefs"]
    (rule,) = grpc["spec"]["rules"]
    assert rule["matches"] == [{"method": {"type": "Exact", "service": "inference.GRPCInferenceService"}}]
    assert backends(grpc) == {"mnist": (75, 8081), "mnist-canary": (25, 8081)}  # the Service's grpc port


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
    assert routing.route_condition("mnist", spec(20), True, [None, None]) is None  # no gateway, no condition
    status, reason, message = routing.route_condition("mnist", s, False, [])
    assert (status, reason) == ("False", "GatewayAPINotServed")
    assert message.startswith("spec.canary.gateway:") and "replica ratio" in message
    applied = {"metadata": {"name": "mnist"}}
    status, reason, message = routing.route_condition("mnist", s, True, [applied, applied])
    assert (status, reason) == ("Unknown", "RouteApplied")
    assert message.startswith("HTTPRoute and GRPCRoute mnist: 80% to the primary, 20% to the canary")

    def with_parent(accepted: str, why: str, kind: str = "HTTPRoute") -> dict:
        cond = {"type": "Accepted", "status": accepted, "reason": why, "message": "listener says so"}
        return {"kind": kind, "status": {"parents": [{"parentRef": {"name": "web"}, "conditions": [cond]}]}}

    http_ok, grpc_ok = with_parent("True", "Accepted"), with_parent("True", "Accepted", "GRPCRoute")
    assert routing.route_condition("mnist", s, True, [http_ok, grpc_ok])[:2] == ("True", "Accepted")
    # One route accepted is not the split: the other may not have been answered yet.
    assert routing.route_condition("mnist", s, True, [http_ok, applied])[0] == "Unknown"
    refused = with_parent("False", "NotAllowedByListeners", "GRPCRoute")
    status, reason, message = routing.route_condition("mnist", s, True, [http_ok, refused])
    assert (status, reason) == ("False", "NotAllowedByListeners")
    assert "GRPCRoute refused: listener says so" in message
    # A Gateway API without GRPCRoute (before v1.1): REST is split, and the condition says gRPC is not.
    status, _, message = routing.route_condition("mnist", s, True, [http_ok], grpc_served=False)
    assert status == "True" and "serves no GRPCRoute: gRPC calls are not split" in message


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
