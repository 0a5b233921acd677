"""Weighted canaries: an InferenceService whose canary names a Gateway (spec.canary.gateway) → a Gateway
API HTTPRoute splitting REST requests by weight, a GRPCRoute splitting the Open Inference Protocol's
gRPC calls by the same weights (where the cluster serves GRPCRoute), and a `<name>-canary` Service for
the canary's pods.

Pure functions, like builders/inferenceservice.py. Routed, the `<name>` Service selects the primary's
pods only (the Gateway does the split, so the Service must not split again by replica ratio), and the
routes send 100-p % of requests to it and p % to `<name>-canary`. Without a gateway, or on a cluster
that does not serve the Gateway API, nothing here is rendered and the split stays the replica ratio.

A gRPC call names its model inside the message, which a Gateway cannot read: the GRPCRoute matches the
whole inference.GRPCInferenceService, so InferenceServices that share a Gateway listener for gRPC must
each have a listener of their own (spec.canary.gateway.sectionName) or the Gateway keeps the oldest route.
"""

from __future__ import annotations

from typing import Any

from ..api.inferenceservice import InferenceServiceSpec
from . import inferenceservice as isvc
from .common import LABEL_ISVC, Owner, metadata

GATEWAY_GROUP = "gateway.networking.k8s.io"
API_VERSION = f"{GATEWAY_GROUP}/v1"
KIND = "HTTPRoute"
PLURAL = "httproutes"
GRPC_KIND = "GRPCRoute"
GRPC_PLURAL = "grpcroutes"
OIP_GRPC_SERVICE = "inference.GRPCInferenceService"
CONDITION = "Routed"  # the InferenceService's condition about its routes


def routed(spec: InferenceServiceSpec, gateway_api_served: bool) -> bool:
    """Is the canary split done by an HTTPRoute?"""
    return spec.canary is not None and spec.canary.gateway is not None and gateway_api_served


def weights(traffic_percent: int) -> tuple[int, int]:
    """(primary, canary) backendRef weights: relative, so percentages summing to 100 say it directly."""
    p = min(max(traffic_percent, 0), 100)
    return 100 - p, p


def canary_service_name(name: str) -> str:
    return isvc.deployment_name(name, isvc.CANARY)


def canary_service(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The canary's own Service: the primary's ports (http, and whatever else it exposes), only the
    canary's pods."""
    primary = isvc.service(owner, spec, routed=True)
    return {
        **primary,
        "metadata": metadata(owner, canary_service_name(owner.name), {LABEL_ISVC: owner.name}),
        "spec": {**primary["spec"], "selector": isvc.selector(owner, isvc.CANARY)},
    }


def _port(service: dict[str, Any], name: str) -> int:
    return next(p["port"] for p in service["spec"]["ports"] if p["name"] == name)


def _parent(spec: InferenceServiceSpec) -> dict[str, Any]:
    assert spec.canary is not None and spec.canary.gateway is not None
    gw = spec.canary.gateway
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": gw.name}
    if gw.namespace:
        parent["namespace"] = gw.namespace
    if gw.section_name:
        parent["sectionName"] = gw.section_name
    return parent


def _backends(owner: Owner, spec: InferenceServiceSpec, port_name: str) -> list[dict[str, Any]]:
    """The primary's and the canary's Services at their PORT_NAME port, weighted by trafficPercent."""
    assert spec.canary is not None
    port = _port(isvc.service(owner, spec, routed=True), port_name)
    primary_weight, canary_weight = weights(spec.canary.traffic_percent)
    backends = [
        (isvc.deployment_name(owner.name, isvc.PRIMARY), primary_weight),
        (canary_service_name(owner.name), canary_weight),
    ]
    return [{"group": "", "kind": "Service", "name": n, "port": port, "weight": w} for n, w in backends]


def http_route(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The HTTPRoute, named after the InferenceService and owned by it (deleted with it). It matches the
    model's v2 URLs only (/v2/models/<model>…, matched by path element), so several InferenceServices
    can share one Gateway and hostname."""
    model = isvc.model_name_of(spec, owner.name)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata(owner, owner.name, {LABEL_ISVC: owner.name}),
        "spec": {
            "parentRefs": [_parent(spec)],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": f"/v2/models/{model}"}}],
                    "backendRefs": _backends(owner, spec, "http"),
                }
            ],
        },
    }


def grpc_route(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The GRPCRoute, named and owned like the HTTPRoute: every method of the OIP's gRPC service, to
    the Services' grpc ports with the same weights."""
    match = {"method": {"type": "Exact", "service": OIP_GRPC_SERVICE}}
    return {
        "apiVersion": API_VERSION,
        "kind": GRPC_KIND,
        "metadata": metadata(owner, owner.name, {LABEL_ISVC: owner.name}),
        "spec": {
            "parentRefs": [_parent(spec)],
            "rules": [{"matches": [match], "backendRefs": _backends(owner, spec, "grpc")}],
        },
    }


def route_condition(
    name: str,
    spec: InferenceServiceSpec,
    gateway_api_served: bool,
    routes: list[dict[str, Any] | None],
    grpc_served: bool = True,
) -> tuple[str, str, str] | None:
    """(status, reason, message) of the Routed condition; None when no gateway is named (no condition).
    ROUTES: the HTTPRoute and GRPCRoute as stored (None: not there yet). Accepted is the Gateway
    controller's word (each route's status.parents): True once it accepted every route, False as soon
    as it refuses one; before any controller answers, the routes exist but whether traffic flows
    through them is Unknown."""
    if spec.canary is None or spec.canary.gateway is None:
        return None
    if not gateway_api_served:
        return (
            "False",
            "GatewayAPINotServed",
            f"spec.canary.gateway: the cluster does not serve {API_VERSION} (install the Gateway API "
            "CRDs: the operator checks again every minute); the split follows the ready-replica ratio "
            "meanwhile",
        )
    gw = spec.canary.gateway
    primary_weight, canary_weight = weights(spec.canary.traffic_percent)
    where = f"{gw.namespace}/{gw.name}" if gw.namespace else gw.name
    kinds = f"HTTPRoute and GRPCRoute {name}" if grpc_served else f"HTTPRoute {name}"
    split = f"{kinds}: {primary_weight}% to the primary, {canary_weight}% to the canary, via {where}"
    if not grpc_served:
        split += f" (the cluster serves no {GRPC_KIND}: gRPC calls are not split)"
    answers = []
    for route in routes:
        parents = ((route or {}).get("status") or {}).get("parents") or []
        accepted = [c for p in parents for c in p.get("conditions") or [] if c.get("type") == "Accepted"]
        answers.append(accepted)
        if refused := [c for c in accepted if c.get("status") == "False"]:
            kind = (route or {}).get("kind", KIND)
            message = refused[0].get("message", "")
            return "False", refused[0].get("reason") or "NotAccepted", f"{split}: {kind} refused: {message}"
    if routes and all(answers):
        return "True", "Accepted", f"{split}; accepted by the Gateway"
    return "Unknown", "RouteApplied", f"{split}; no Gateway controller has accepted it yet"
