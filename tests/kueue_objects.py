"""Kueue objects for tests on the local cluster's Kueue: flavors, GPU ClusterQueues, priority classes
(cluster-scoped, so named per run and removed afterwards) and LocalQueues."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.kube import Kube

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
Obj = tuple[str, dict[str, Any]]  # (plural, body)


def need_kueue(kube: Kube) -> None:
    if kube.local is None or not kube.local.kueue:
        pytest.skip("needs the local cluster's Kueue (started unless AIDC_KUEUE=0)")


def run_tag() -> str:
    return uuid.uuid4().hex[:5]


def flavor(name: str, node_labels: dict[str, str] | None = None) -> Obj:
    spec = {"nodeLabels": node_labels} if node_labels else {}
    return "resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": name}, "spec": spec}


def gpu_cluster_queue(name: str, flavor_name: str, gpus: int) -> Obj:
    """Any namespace, GPUs only, lower priorities preempted within the queue."""
    quota = {"name": flavor_name, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": gpus}]}
    spec = {
        "namespaceSelector": {},
        "preemption": {"withinClusterQueue": "LowerPriority"},
        "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [quota]}],
    }
    return "clusterqueues", {"kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec}


def priority_class(name: str, value: int) -> Obj:
    return "workloadpriorityclasses", {
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": name},
        "value": value,
    }


@contextmanager
def created(kube: Kube, objects: list[Obj]) -> Iterator[None]:
    """Creates the cluster-scoped objects in order, deletes them in reverse afterwards."""
    for plural, body in objects:
        kube.custom.create_cluster_custom_object(
            GROUP, VERSION, plural, {"apiVersion": f"{GROUP}/{VERSION}", **body}
        )
    try:
        yield
    finally:
        for plural, body in reversed(objects):
            kube.custom.delete_cluster_custom_object(GROUP, VERSION, plural, body["metadata"]["name"])


def local_queue(kube: Kube, ns: str, name: str, cluster_queue: str) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LocalQueue",
        "metadata": {"name": name},
        "spec": {"clusterQueue": cluster_queue},
    }
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "localqueues", body)
