"""Node-failure detection: which nodes are lost and which of a gang's pods went with them.

Pure functions over Node, Lease and Pod dicts (as the API returns them): the policy is unit-tested
and the reconciler only gathers objects and applies the verdict. A node is lost when
- it is gone or being deleted,
- its Ready condition is False or Unknown, or it carries the node.kubernetes.io/unreachable or
  not-ready taint (the node lifecycle controller's verdict, after --node-monitor-grace-period), or
- its kubelet's Lease has expired: not renewed within its own leaseDurationSeconds. This is the
  kubelet's liveness contract itself, and it is noticed before the controller's grace period
  (default 50 s) runs out, which is what makes recovery fast.
A pod is lost when its node is lost or it has a DisruptionTarget condition (preemption, eviction,
taint manager, graceful node shutdown).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UNHEALTHY_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


@dataclass(frozen=True)
class NodeHealth:
    name: str
    healthy: bool
    reason: str = ""


def _parse(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


def lease_expired(lease: dict[str, Any] | None, now: dt.datetime) -> bool:
    if not lease:
        return False  # no lease (an old kubelet, or not created yet): rely on the node's conditions
    spec = lease.get("spec") or {}
    renewed = _parse(spec.get("renewTime"))
    duration = spec.get("leaseDurationSeconds")
    if renewed is None or not duration:
        return False
    return (now - renewed).total_seconds() > duration


def node_health(
    node: dict[str, Any] | None,
    name: str,
    lease: dict[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> NodeHealth:
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
    if now is not None and lease_expired(lease, now):
        return NodeHealth(name, False, "NodeLeaseExpired")
    return NodeHealth(name, True)


def assess(
    nodes: Mapping[str, dict[str, Any]], leases: Mapping[str, dict[str, Any]], now: dt.datetime
) -> dict[str, NodeHealth]:
    """Health of every node that exists (a name missing from the result is a deleted node)."""
    return {name: node_health(node, name, leases.get(name), now) for name, node in nodes.items()}


def health_of(health: Mapping[str, NodeHealth], name: str) -> NodeHealth:
    return health.get(name) or NodeHealth(name, False, "NodeDeleted")


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


def lost_pods(pods: list[dict[str, Any]], health: Mapping[str, NodeHealth]) -> list[LostPod]:
    """Pods of the gang that a node failure took (finished pods are not lost: they already exited)."""
    lost = []
    for pod in pods:
        name = pod["metadata"]["name"]
        if pod.get("status", {}).get("phase") == "Succeeded":
            continue
        node = pod.get("spec", {}).get("nodeName")
        if why := disruption(pod):
            lost.append(LostPod(name, node, "PodDisrupted", why))
            continue
        if not node:
            continue
        h = health_of(health, node)
        if not h.healthy:
            lost.append(LostPod(name, node, h.reason, f"pod {name} was on node {node} ({h.reason})"))
    return lost


def must_force_delete(pod: dict[str, Any], health: Mapping[str, NodeHealth]) -> bool:
    """A pod on a dead node never confirms its own deletion (no kubelet): delete it with grace 0."""
    node = pod.get("spec", {}).get("nodeName")
    return bool(node) and not health_of(health, node).healthy


def healthy_nodes(health: Mapping[str, NodeHealth]) -> set[str]:
    return {name for name, h in health.items() if h.healthy}
