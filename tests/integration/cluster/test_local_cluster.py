"""The local control plane is a real cluster: scheduler, node lifecycle controller, RBAC, admission."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest
from kubernetes import client

from localcluster import LocalCluster
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster


def test_gpu_pod_is_scheduled_and_reported_running(kube: Kube, namespace: str) -> None:
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="gpu-probe"),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="main",
                    image="registry.invalid/probe:1",
                    resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "8"}),
                )
            ]
        ),
    )
    kube.core.create_namespaced_pod(namespace, pod)
    got = wait_for(
        "pod Running",
        lambda: (p := kube.core.read_namespaced_pod("gpu-probe", namespace)).status.phase == "Running" and p,
    )
    node = kube.node(got.spec.node_name)
    # Nodes come in two pools (aidc.dev/gpu-pool h100 / a100) with the matching product label.
    products = ("NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB")
    assert node.metadata.labels["nvidia.com/gpu.product"] in products
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    # kube-scheduler honours GPU capacity: a second 8-GPU pod cannot share that node.
    pod.metadata.name = "gpu-probe-2"
    kube.core.create_namespaced_pod(namespace, pod)
    second = wait_for(
        "second pod bound",
        lambda: (p := kube.core.read_namespaced_pod("gpu-probe-2", namespace)).spec.node_name and p,
    )
    assert second.spec.node_name != got.spec.node_name


def test_lost_node_is_tainted_unreachable_by_node_lifecycle_controller(kube: Kube, namespace: str) -> None:
    victim = kube.gpu_nodes()[-1]
    kube.fail_node(victim)
    try:
        wait_for(
            f"{victim} tainted unreachable",
            lambda: any(
                t.key == "node.kubernetes.io/unreachable" for t in kube.node(victim).spec.taints or []
            ),
            timeout=90,
        )
        assert kube.node_ready(victim) == "Unknown"
    finally:
        kube.restore_node(victim)
    wait_for(f"{victim} Ready again", lambda: kube.node_ready(victim) == "True", timeout=60)


def test_rbac_denies_an_unprivileged_service_account(kube: Kube, namespace: str) -> None:
    who = f"system:serviceaccount:{namespace}:default"
    denied = kube.kubectl("auth", "can-i", "create", "pods", "-n", namespace, f"--as={who}", check=False)
    assert denied.stdout.strip() == "no"
    secrets = kube.kubectl("auth", "can-i", "list", "secrets", "-A", f"--as={who}", check=False)
    assert secrets.stdout.strip() == "no"
    admin = kube.kubectl("auth", "can-i", "create", "pods", "-n", namespace)
    assert admin.stdout.strip() == "yes"


def test_admission_chain_is_on(kube: Kube, namespace: str) -> None:
    """DefaultTolerationSeconds (the default 300 s eviction path we beat) and ServiceAccount admission
    run as in a real cluster."""
    kube.core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="plain"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")]),
        ),
    )
    pod = kube.core.read_namespaced_pod("plain", namespace)
    tolerations = {(t.key, t.toleration_seconds) for t in pod.spec.tolerations}
    assert ("node.kubernetes.io/unreachable", 300) in tolerations
    assert pod.spec.service_account_name == "default"


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_fleet_nodes_share_one_kwok_with_node_leases(tmp_path: Path) -> None:
    """The scale benchmarks' fleet: many GPU nodes, one kwok process, Leases renewed, pods addressed from
    a range of their own; the per-node agents stay as they are."""
    if os.environ.get("KUBECONFIG"):
        pytest.skip("starts a local cluster of its own; KUBECONFIG names an external one")
    c = LocalCluster(tmp_path / "fleet", nodes=1, fleet_nodes=20, fleet_lease_seconds=8)
    try:
        c.up()
        agents = [name for name in c.running() if name.startswith("kwok-")]
        assert agents == ["kwok-gpu-node-0", "kwok-fleet"]
        fleet_pid = c.running()["kwok-fleet"]
        assert fleet_pid

        nodes = json.loads(c.kubectl("get", "nodes", "-o", "json"))["items"]
        fleet = {n["metadata"]["name"]: n for n in nodes if n["metadata"]["name"].startswith("fleet-node-")}
        assert sorted(fleet) == sorted(c.fleet_node_names())
        for n in fleet.values():
            assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
            assert {x["type"]: x["status"] for x in n["status"]["conditions"]}["Ready"] == "True"

        def leases() -> dict[str, dict]:
            items = json.loads(c.kubectl("get", "leases", "-n", "kube-node-lease", "-o", "json"))["items"]
            return {x["metadata"]["name"]: x["spec"] for x in items}

        first = wait_for("node Leases", lambda: (got := leases()).keys() >= {*fleet, "gpu-node-0"} and got)
        # kwok holds the Leases it renews under its own identity: one for the fleet, another per node.
        assert len({first[name]["holderIdentity"] for name in fleet}) == 1
        assert first["gpu-node-0"]["holderIdentity"] != first["fleet-node-0"]["holderIdentity"]
        assert all(first[name]["leaseDurationSeconds"] == 8 for name in fleet)
        wait_for(
            "every fleet Lease renewed",
            lambda: all(s["renewTime"] != first[n]["renewTime"] for n, s in leases().items() if n in fleet),
            timeout=30,
        )

        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "on-fleet", "namespace": "default"},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": "fleet-node-7"},
                "containers": [{"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
            },
        }
        c.kubectl("apply", "-f", "-", input=json.dumps(pod))
        ip = wait_for(
            "pod Running on the fleet node",
            lambda: (
                (p := json.loads(c.kubectl("get", "pod", "on-fleet", "-o", "json")))["status"].get("phase")
                == "Running"
                and p["status"]["podIP"]
            ),
        )
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(c.fleet_pod_cidr, strict=False)
        assert not ipaddress.ip_address(ip).is_loopback and not ip.startswith(f"{c.pod_net}.")
    finally:
        c.down()
    assert _gone(fleet_pid), "down() left kwok-fleet running"
