"""Node-failure detection: which of a gang's pods are on lost nodes or were disrupted.

Pure functions over pod and node dicts (as the API returns them), so the policy is unit-tested and the
reconciler only gathers objects and applies the verdict. A pod counts as lost when
- its node is gone, NotReady or Unknown (the node lifecycle controller's verdict after the grace period),
- its node carries the node.kubernetes.io/unreachable or not-ready taint, or
- it has a DisruptionTarget condition (preemption, eviction, taint manager, node shutdown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNHEALTHY_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


@dataclass(frozen=True)
class NodeHealth:
    name: str
    healthy: bool
    reason: str = ""


def node_health(node: dict[str, Any] | None, name: str) -> NodeHealth:
    if node is None:
        return NodeHealth(name, False, "NodeDeleted")
    if node.get("metadata", {}).get("deletionTimestamp"):
        return NodeHealth(name, False, "NodeDeleting")
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") != "True":
            return NodeHealth(
                name, False, "NodeNotReady" if cond.get("status") == "False" else "NodeUnreachable"
            )
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("key") in UNHEALTHY_TAINTS:
            return NodeHealth(
                name, False, "NodeUnreachable" if "unreachable" in taint["key"] else "NodeNotReady"
            )
    return NodeHealth(name, True)


@dataclass(frozen=True)
class LostPod:
    pod: str
    node: str | None
    reason: str
    message: str


def disruption(pod: dict[str, Any]) -> str | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return f"{cond.get('reason', 'Disrupted')}: {cond.get('message', '')}".strip(": ")
    return None


def lost_pods(pods: list[dict[str, Any]], nodes: dict[str, dict[str, Any]]) -> list[LostPod]:
    """Pods of the gang that a node failure took (finished pods are not lost: they already exited)."""
    lost = []
    for pod in pods:
        name = pod["metadata"]["name"]
        if pod.get("status", {}).get("phase") in ("Succeeded",):
            continue
        node = pod.get("spec", {}).get("nodeName")
        if why := disruption(pod):
            lost.append(LostPod(name, node, "PodDisrupted", why))
            continue
        if not node:
            continue
        health = node_health(nodes.get(node), node)
        if not health.healthy:
            lost.append(
                LostPod(name, node, health.reason, f"pod {name} was on node {node} ({health.reason})")
            )
    return lost


def must_force_delete(pod: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> bool:
    """A pod on a dead node never confirms its own deletion (no kubelet): delete it with grace 0."""
    node = pod.get("spec", {}).get("nodeName")
    return bool(node) and not node_health(nodes.get(node), node).healthy


def healthy_nodes(nodes: dict[str, dict[str, Any]]) -> set[str]:
    return {name for name, n in nodes.items() if node_health(n, name).healthy}
