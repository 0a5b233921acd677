"""The local cluster's fake GPU nodes, which kwok keeps Ready: their Node objects (GPU pools, zones,
capacity) and the API calls that create and count them.

Two kinds: gpu-node-i, each with a kwok agent of its own (killing one is a node losing power), and
fleet-node-i, all managed by ONE kwok process (component kwok-fleet) for datacenter-scale benchmarks.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from typing import TYPE_CHECKING

from cluster_processes import ClusterError

if TYPE_CHECKING:
    from localcluster import LocalCluster

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
FLEET = "kwok-fleet"  # the component (pid file, log) of the one kwok process managing every fleet node
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_POOL_LABEL = "aidc.dev/gpu-pool"  # Kueue ResourceFlavors (examples/kueue/) select nodes by it
GPU_POOLS = {"h100": GPU_PRODUCT, "a100": "NVIDIA-A100-SXM4-80GB"}


def node_manifest(i: int, gpus_per_node: int) -> dict:
    """gpu-node-i, annotated for its own kwok agent (kwok-gpu-node-i)."""
    return gpu_node(f"gpu-node-{i}", i, "fake", f"10.240.{i // 250}.{i % 250 + 1}", gpus_per_node)


def fleet_node_manifest(i: int, gpus_per_node: int) -> dict:
    """fleet-node-i: the same shape as node_manifest, annotated for kwok-fleet."""
    return gpu_node(f"fleet-node-{i}", i, "fleet", f"10.241.{i // 250}.{i % 250 + 1}", gpus_per_node)


def gpu_node(name: str, i: int, kwok: str, address: str, gpus_per_node: int) -> dict:
    gpus = str(gpus_per_node)
    # Pairs of nodes alternate h100, a100 (0,1 h100; 2,3 a100; ...): half of each pool in each zone.
    pool = ("h100", "a100")[i // 2 % 2]
    resources = {
        "cpu": "96",
        "memory": "1024Gi",
        "pods": "110",
        "nvidia.com/gpu": gpus,
        "ephemeral-storage": "2Ti",
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: kwok},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                GPU_POOL_LABEL: pool,
                "nvidia.com/gpu.product": GPU_POOLS[pool],
                "nvidia.com/gpu.count": gpus,
                "topology.kubernetes.io/zone": f"zone-{'ab'[i % 2]}",
            },
        },
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
        },
    }


def create_fleet_nodes(c: LocalCluster, chunk: int = 100, parallel: int = 4) -> None:
    """Creates the fleet nodes that do not exist yet: a few `kubectl create` of a List at a time (no
    last-applied annotation: every watcher of Nodes gets these objects with each heartbeat)."""
    out = c.kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.name}")
    present = set(out.split())
    todo = [
        fleet_node_manifest(i, c.gpus_per_node)
        for i in range(c.fleet_nodes)
        if f"fleet-node-{i}" not in present
    ]
    running: list[subprocess.Popen[str]] = []
    argv = [
        c.binary("kubectl"),
        f"--kubeconfig={c.kubeconfig}",
        "--request-timeout=60s",
        "create",
        "-f",
        "-",
        "-o",
        "name",
    ]

    def reap(p: subprocess.Popen[str]) -> None:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0 and "AlreadyExists" not in err:
            raise ClusterError(f"creating fleet nodes failed: {err.strip()[-2000:]}")

    for start in range(0, len(todo), chunk):
        if len(running) >= parallel:
            reap(running.pop(0))
        with tempfile.TemporaryFile("w+") as items:  # the child keeps its own descriptor of it
            json.dump({"apiVersion": "v1", "kind": "List", "items": todo[start : start + chunk]}, items)
            items.seek(0)
            running.append(
                subprocess.Popen(
                    argv, stdin=items, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                )
            )
    for p in running:
        reap(p)


def ready_nodes(c: LocalCluster) -> int:
    """How many nodes report Ready=True."""
    if c.fleet_nodes:  # thousands of nodes: let kubectl pick out the one field instead of all JSON
        ready = '{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}'
        out = c.kubectl("get", "nodes", "--chunk-size=500", "-o", f"jsonpath={ready}")
        return out.split().count("True")
    nodes = json.loads(c.kubectl("get", "nodes", "-o", "json"))["items"]
    return sum(
        1
        for n in nodes
        for cond in n.get("status", {}).get("conditions", [])
        if cond["type"] == "Ready" and cond["status"] == "True"
    )
