"""The local control plane is a real cluster: scheduler, node lifecycle controller, RBAC, admission."""

from __future__ import annotations

import pytest
from kubernetes import client

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
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
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
