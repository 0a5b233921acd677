"""Is the gang placed? Pure reading of the current attempt's pods for all-or-nothing scheduling.

Without a queueing system the scheduler places a gang pod by pod: the placed pods hold their GPUs while
the rest stay Pending, and two such partial gangs can deadlock a cluster. The planner gives a gang
spec.scheduling.timeoutSeconds, counted from the creation of its oldest pod still waiting, to be placed
whole (for a new gang: its first pod's; for a pod that replaced a lost one: its own, not the gang's).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from . import gang_pods as gp


@dataclass(frozen=True)
class Placement:
    unplaced: list[str] = field(default_factory=list)  # pods not bound to a node
    stuck: list[tuple[str, str]] = field(default_factory=list)  # (pod, the scheduler's message)
    timed_out: bool = False
    deadline_in: float | None = None  # seconds until the timeout, while pods wait to be placed


def placement(current: list[dict[str, Any]], timeout_seconds: int, now: dt.datetime) -> Placement:
    live = [p for p in current if not p["metadata"].get("deletionTimestamp") and gp.phase(p) == "Pending"]
    unplaced = [p for p in live if not (p.get("spec") or {}).get("nodeName")]
    stuck = [(p["metadata"]["name"], c.get("message", "")) for p in unplaced if (c := gp.unschedulable(p))]
    if not unplaced or not timeout_seconds:
        return Placement([p["metadata"]["name"] for p in unplaced], stuck)
    created = [t for p in unplaced if (t := gp.parse_ts(p["metadata"].get("creationTimestamp")))]
    if not created:
        return Placement([p["metadata"]["name"] for p in unplaced], stuck)
    left = timeout_seconds - (now - min(created)).total_seconds()
    return Placement([p["metadata"]["name"] for p in unplaced], stuck, left <= 0, max(0.0, left))
