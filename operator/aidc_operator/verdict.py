"""What a failing attempt means: one verdict from every exit and every lost node of the gang. Pure.

Severity decides (restart_policy.Severity): a non-retryable exit fails the job even when a node was lost
too (the bug would follow the gang anywhere); a lost node is a node failure, whatever its survivors
reported; a retryable exit restarts the gang with backoff.

A power cut makes the surviving ranks exit "lost a peer" within seconds, long before the dead node's
Lease lapses. Read alone, that exit looks like a retryable failure of a healthy rank and would spend
maxRestarts. So a peer-lost exit is *held*: the verdict waits until every node under the gang has been
judged — its Lease seen renewed since the hold began (alive), or lapsed (lost: then it is a node failure)
— and at most one Lease duration plus a margin. Only then does the exit's own code decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .recovery import LostPod, NodeHealth, health_of
from .restart_policy import PodExit, Severity, severity, worst

DEFAULT_LEASE_SECONDS = 40.0  # a kubelet's default leaseDurationSeconds, for nodes without a Lease
VERDICT_MARGIN_SECONDS = 5.0  # watch latency and the status clock's 1 s resolution
CLOCK_RESOLUTION = 1.0  # status times are whole seconds: a hold may have begun up to 1 s later


@dataclass(frozen=True)
class Verdict:
    kind: Literal["none", "hold", "node", "retry", "fail"]
    exit: PodExit | None = None  # the exit that decides (retry, fail; hold: the first peer-lost one)
    lost: list[LostPod] = field(default_factory=list)  # node: the pods the lost nodes took
    wait: float = 0.0  # hold: seconds until the verdict is due at the latest


def verdict_window(nodes: set[str], health: Mapping[str, NodeHealth]) -> float:
    """How long a peer-lost exit may wait for the gang's nodes: the longest Lease among them + margin."""
    leases = [health_of(health, n).lease_seconds or DEFAULT_LEASE_SECONDS for n in nodes]
    return max(leases, default=DEFAULT_LEASE_SECONDS) + VERDICT_MARGIN_SECONDS


def nodes_judged(nodes: set[str], health: Mapping[str, NodeHealth], held_for: float) -> bool:
    """Has every node been seen alive (its Lease renewed) since the hold began? A lapsed or deleted node
    is not 'judged alive': the planner sees it as lost before it asks this."""
    for name in nodes:
        h = health_of(health, name)
        if h.renewed_ago is None or h.renewed_ago >= held_for - CLOCK_RESOLUTION:
            return False
    return True


def judge(
    pods: list[dict[str, Any]],
    exits: list[PodExit],
    lost: list[LostPod],
    health: Mapping[str, NodeHealth],
    extra_codes: list[int],
    held_for: float | None,
) -> Verdict:
    """The verdict for the current attempt, most severe class first. held_for: seconds since a
    peer-lost hold began (None: no hold yet)."""
    classes = [(severity(e, extra_codes), e) for e in exits]
    if hard := [e for c, e in classes if c == Severity.NON_RETRYABLE]:
        return Verdict("fail", hard[0])
    if lost:
        return Verdict("node", lost=lost)
    if soft := [e for c, e in classes if c == Severity.RETRYABLE]:
        return Verdict("retry", soft[0])
    if not exits:
        return Verdict("none")
    # Only "lost a peer": wait for the verdict on the gang's nodes.
    nodes = {p["spec"]["nodeName"] for p in pods if p.get("spec", {}).get("nodeName")}
    window = verdict_window(nodes, health)
    if held_for is None or (held_for < window and not nodes_judged(nodes, health, held_for)):
        return Verdict("hold", exits[0], wait=max(0.0, window - (held_for or 0.0)))
    # Every node answered alive (or the window passed): no node died, so the exits' own codes decide.
    decisive = worst(exits, extra_codes, verdict_due=True)
    due = severity(decisive, extra_codes, verdict_due=True)
    return Verdict("retry" if due == Severity.RETRYABLE else "fail", decisive)
