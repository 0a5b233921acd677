"""Node-failure detection: which nodes are lost and which of a gang's pods went with them.

Pure functions over Node, Lease and Pod dicts (as the API returns them): the policy is unit-tested
and the reconciler only gathers objects and applies the verdict. A node is lost when
- it is gone or being deleted,
- its Ready condition is False or Unknown, or it carries the node.kubernetes.io/unreachable or
  not-ready taint (the node lifecycle controller's verdict, after --node-monitor-grace-period), or
- its kubelet's Lease has lapsed: its renewTime has not changed for longer than its own
  leaseDurationSeconds, timed on the operator's own monotonic clock from when it last *saw* the renewal
  (LeaseClock), so clock skew between the operator and the kubelets cannot fake or hide a loss. This is
  the kubelet's liveness contract itself, and it is noticed before the controller's grace period
  (default 50 s) runs out, which is what makes recovery fast.
A pod is lost when its node is lost or it has a DisruptionTarget condition (preemption, eviction,
taint manager, graceful node shutdown).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

UNHEALTHY_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


@dataclass(frozen=True)
class NodeHealth:
    name: str
    healthy: bool
    reason: str = ""
    renewed_ago: float | None = None  # seconds since the operator saw the node's Lease renew
    lease_seconds: float | None = None  # the Lease's leaseDurationSeconds; None without a Lease


class LeaseClock:
    """When each node's Lease was last seen renewed, on the observer's monotonic clock. A Lease whose
    renewTime stops changing lapses leaseDurationSeconds after the last change was *observed*; the
    wall-clock renewTime is compared only with itself, never with the operator's clock. A Lease first
    seen (operator start) counts as renewed then, so a restart delays, never invents, a verdict."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str | None, float, float]] = {}  # name → (renewTime, duration, at)

    def observe(self, name: str, lease: dict[str, Any] | None, now: float) -> None:
        if lease is None:
            self._seen.pop(name, None)
            return
        spec = lease.get("spec") or {}
        renewed, duration = spec.get("renewTime"), float(spec.get("leaseDurationSeconds") or 0)
        last = self._seen.get(name)
        if last is None or last[0] != renewed:
            self._seen[name] = (renewed, duration, now)
        elif last[1] != duration:
            self._seen[name] = (renewed, duration, last[2])

    def lapsed(self, name: str, now: float) -> bool:
        seen = self._seen.get(name)
        if seen is None or not seen[1] or seen[0] is None:
            return False  # no lease (an old kubelet, or not created yet): rely on the node's conditions
        return now - seen[2] > seen[1]

    def renewal(self, name: str, now: float) -> tuple[float, float] | None:
        """(seconds since the last renewal was observed, leaseDurationSeconds), None without a Lease."""
        seen = self._seen.get(name)
        if seen is None or not seen[1] or seen[0] is None:
            return None
        return now - seen[2], seen[1]

    def __len__(self) -> int:
        return len(self._seen)


def node_health(
    node: dict[str, Any] | None,
    name: str,
    lease_lapsed: bool = False,
    renewal: tuple[float, float] | None = None,
) -> NodeHealth:
    h = _verdict(node, name, lease_lapsed)
    if renewal is None:
        return h
    return NodeHealth(h.name, h.healthy, h.reason, renewal[0], renewal[1])


def _verdict(node: dict[str, Any] | None, name: str, lease_lapsed: bool) -> NodeHealth:
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
    if lease_lapsed:
        return NodeHealth(name, False, "NodeLeaseExpired")
    return NodeHealth(name, True)


def assess(nodes: Mapping[str, dict[str, Any]], lapsed: Collection[str] = ()) -> dict[str, NodeHealth]:
    """Health of every node that exists (a name missing from the result is a deleted node); lapsed: the
    nodes whose Lease a LeaseClock finds lapsed."""
    return {name: node_health(node, name, name in lapsed) for name, node in nodes.items()}


def health_of(health: Mapping[str, NodeHealth], name: str) -> NodeHealth:
    return health.get(name) or NodeHealth(name, False, "NodeDeleted")


@dataclass(frozen=True)
class LostPod:
    pod: str
    node: str | None
    reason: str
    message: str
    rank: int | None = None  # set where the pod is gone and only its rank is known


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
            # The scheduler made room for a higher-priority pod: nothing is wrong with the node.
            reason = "Preempted" if why.startswith("PreemptionByScheduler") else "PodDisrupted"
            lost.append(LostPod(name, node, reason, why))
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
