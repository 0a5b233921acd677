"""Weighted canaries on the real local control plane with the Gateway API CRDs (sigs.k8s.io/gateway-api,
standard channel, pinned in hack/gateway-api/go.mod) installed: the operator keeps an HTTPRoute and a
GRPCRoute whose weights follow spec.canary.trafficPercent, and removes them with the gateway. No Gateway
controller runs here, so what is checked is the routes the apiserver stores (and validates against the
Gateway API's schema), not packets. The first test starts an operator before the CRDs are installed
(it picks them up later); the others share one started after them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiException

import gateway_api
from tests.conftest import OperatorProcess
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

NFS = {"nfs": {"server": "nfs.example", "path": "/ckpt"}}  # kwok's nodes accept it without a provisioner
GW = ("gateway.networking.k8s.io", "v1")


class Routed:
    def __init__(self, kube: Kube, ns: str, op: OperatorProcess) -> None:
        self.kube, self.ns, self.op = kube, ns, op

    def route(self, name: str, plural: str = "httproutes") -> dict[str, Any] | None:
        try:
            return self.kube.custom.get_namespaced_custom_object(*GW, self.ns, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def weights(self, name: str, plural: str = "httproutes") -> dict[str, int]:
        route = self.route(name, plural) or {"spec": {"rules": [{}]}}
        return {b["name"]: b["weight"] for b in route["spec"]["rules"][0].get("backendRefs") or []}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        st = self.kube.get_cr("inferenceservices", self.ns, name).get("status") or {}
        return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


@pytest.fixture(scope="module")
def routed(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    kube = crds
    gateway_api.install([kube.kubectl_bin, f"--kubeconfig={kube.kubeconfig}"])
    ns = kube.create_namespace("weighted-canary", prefix="g")  # not t-*: the session operator's
    tmp: Path = tmp_path_factory.mktemp("routes")
    op = OperatorProcess(kube, tmp / "operator.log", [ns]).start()
    try:
        yield Routed(kube, ns, op)
    finally:
        op.stop()
        kube.delete_namespace(ns)


def _gateway_api_served(kube: Kube) -> bool:
    try:
        kube.custom.get_api_resources(*GW)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def test_gateway_api_installed_after_the_operator_started_is_picked_up(crds: Kube, tmp_path: Path) -> None:
    # First in this module, before `routed` installs the CRDs: a platform team's chart or a GitOps sync
    # often installs the Gateway API after the operator. (Removed first in case something else did.)
    kube = crds
    kubectl = [kube.kubectl_bin, f"--kubeconfig={kube.kubeconfig}"]
    if _gateway_api_served(kube):
        crd_files = str(gateway_api.crd_dir())
        subprocess.run([*kubectl, "delete", "--ignore-not-found", "-f", crd_files], check=True)
        wait_for("the Gateway API gone", lambda: not _gateway_api_served(kube), timeout=120)
    ns = kube.create_namespace("gateway-late", prefix="g")
    op = OperatorProcess(kube, tmp_path / "operator.log", [ns]).start()
    late = Routed(kube, ns, op)
    try:
        spec = {
            "model": {"storage": {"volume": NFS, "path": "v1"}},
            "canary": {
                "trafficPercent": 30,
                "model": {"storage": {"volume": NFS, "path": "v2"}},
                "gateway": {"name": "public"},
            },
        }
        kube.create_cr("InferenceService", ns, "late", spec)
        cond = wait_for("Routed False", lambda: late.condition("late", "Routed"), timeout=60)
        assert (cond["status"], cond["reason"]) == ("False", "GatewayAPINotServed")
        assert "install the Gateway API CRDs" in cond["message"]
        assert "restart" not in cond["message"]

        gateway_api.install(kubectl)  # no operator restart: it checks discovery until the API is there
        weights = wait_for("the HTTPRoute", lambda: late.weights("late"), timeout=180)
        assert weights == {"late": 70, "late-canary": 30}
        assert wait_for("the GRPCRoute", lambda: late.weights("late", "grpcroutes"), timeout=60) == weights
        cond = wait_for(
            "Routed by both routes",
            lambda: (c := late.condition("late", "Routed")).get("reason") == "RouteApplied" and c,
            timeout=60,
        )
        assert cond["message"].startswith("HTTPRoute and GRPCRoute late:")
        # one discovery check may find one kind's CRD Established before the other's
        found = " ".join(line for line in op.log().splitlines() if "the cluster serves" in line)
        assert "HTTPRoute" in found and "GRPCRoute" in found, found
    finally:
        op.stop()
        kube.delete_namespace(ns)


def test_route_weights_follow_traffic_percent_and_go_with_the_gateway(routed: Routed) -> None:
    kube, ns = routed.kube, routed.ns
    assert "Gateway API served" in routed.op.log()
    spec = {
        "model": {"storage": {"volume": NFS, "path": "v1"}},
        "canary": {
            "trafficPercent": 20,
            "model": {"storage": {"volume": NFS, "path": "v2"}},
            "gateway": {"name": "public", "sectionName": "http"},
        },
    }
    kube.create_cr("InferenceService", ns, "split", spec)
    weights = wait_for("the HTTPRoute", lambda: routed.weights("split"), timeout=60)
    assert weights == {"split": 80, "split-canary": 20}
    route = routed.route("split")
    assert route is not None
    assert route["spec"]["parentRefs"][0]["name"] == "public"
    assert route["spec"]["parentRefs"][0]["sectionName"] == "http"
    owner = route["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("InferenceService", "split")
    # The two Services the route points at: the primary's and the canary's pods, one role each.
    primary = kube.core.read_namespaced_service("split", ns)
    canary = kube.core.read_namespaced_service("split-canary", ns)
    assert primary.spec.selector["aidc.dev/role"] == "primary"
    assert canary.spec.selector["aidc.dev/role"] == "canary"
    ports = {b["name"]: b["port"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert ports == {"split": primary.spec.ports[0].port, "split-canary": canary.spec.ports[0].port}
    # gRPC calls split the same way: a GRPCRoute on the same listener, to the Services' grpc ports.
    grpc = wait_for("the GRPCRoute", lambda: routed.route("split", "grpcroutes"), timeout=60)
    assert routed.weights("split", "grpcroutes") == {"split": 80, "split-canary": 20}
    assert grpc["spec"]["parentRefs"] == route["spec"]["parentRefs"]
    assert grpc["spec"]["rules"][0]["matches"][0]["method"]["service"] == "inference.GRPCInferenceService"
    grpc_ports = {b["name"]: b["port"] for b in grpc["spec"]["rules"][0]["backendRefs"]}
    named = {p.name: p.port for p in primary.spec.ports}
    assert grpc_ports == {"split": named["grpc"], "split-canary": named["grpc"]}
    cond = wait_for("the Routed condition", lambda: routed.condition("split", "Routed"), timeout=60)
    assert cond["reason"] == "RouteApplied" and "80% to the primary, 20% to the canary" in cond["message"]
    assert cond["message"].startswith("HTTPRoute and GRPCRoute split:")

    # A new percentage: the same route, new weights.
    kube.custom.patch_namespaced_custom_object(
        "aidc.dev", "v1alpha1", ns, "inferenceservices", "split", {"spec": {"canary": {"trafficPercent": 50}}}
    )
    for plural in ("httproutes", "grpcroutes"):
        wait_for(
            f"{plural} weights 50/50",
            lambda: routed.weights("split", plural) == {"split": 50, "split-canary": 50},  # noqa: B023
            timeout=60,
        )

    # Without the gateway: no route, no canary Service, and the one Service splits by replica ratio again.
    kube.custom.patch_namespaced_custom_object(
        "aidc.dev", "v1alpha1", ns, "inferenceservices", "split", {"spec": {"canary": {"gateway": None}}}
    )
    wait_for("the HTTPRoute deleted", lambda: routed.route("split") is None, timeout=60)
    wait_for("the GRPCRoute deleted", lambda: routed.route("split", "grpcroutes") is None, timeout=60)

    def canary_service_gone() -> bool:
        try:
            kube.core.read_namespaced_service("split-canary", ns)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for("the canary Service deleted", canary_service_gone, timeout=60)
    wait_for(
        "the Service selecting both roles",
        lambda: "aidc.dev/role" not in kube.core.read_namespaced_service("split", ns).spec.selector,
        timeout=60,
    )
    wait_for("no Routed condition", lambda: not routed.condition("split", "Routed"), timeout=60)
