"""status.recoveries: one entry per recovery from a lost node — which node, which pod took its place,
when the operator judged it lost and when training resumed, from which checkpoint step. Pure helpers of
the TrainingJob planner.

A recovery is closed by the trainer's own word: the first run of the workers (docs/contracts.md,
progress report `run`) that began after the loss. The node died after its last Lease renewal the
operator saw, and no run without it can begin until torch's rendezvous has dropped the dead peer
(DEAD_PEER_SECONDS of missed heartbeats) or the operator has created its replacement: so the first run
after that renewal + DEAD_PEER_SECONDS, or after the verdict where no renewal was seen. (A run that
began only moments before the node died — less than that after its last renewal — is never taken for
the resumed one.) With a standby spare the resumed run may begin before the operator judges the node
lost; the recovery then took 0 s of the operator's time, and says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import gang_pods as gp
from . import progress as pr
from .api.trainingjob import RecoveryRecord, TrainingJobStatus
from .builders.torchrun import DEAD_PEER_SECONDS
from .recovery import LostPod, NodeHealth

KEPT = 10  # entries in status.recoveries: a bounded status, the Events and audit log keep the rest


@dataclass(frozen=True, order=True)
class Run:
    first_step_at: dt.datetime
    from_step: int


def record(
    status: TrainingJobStatus,
    lost: LostPod,
    mode: Literal["ReplaceNode", "RestartGang"],
    replacement: str | None,
    now: dt.datetime,
    health: Mapping[str, NodeHealth],
) -> None:
    h = health.get(lost.node) if lost.node else None
    lost_at = now - dt.timedelta(seconds=h.renewed_ago) if h and h.renewed_ago is not None else None
    status.recoveries.append(
        RecoveryRecord(
            node=lost.node,
            lost_pod=lost.pod,
            replacement=replacement,
            mode=mode,
            lost_at=gp.ts(lost_at) if lost_at else None,
            detected_at=gp.ts(now),
        )
    )
    del status.recoveries[:-KEPT]


def runs(pods: list[dict[str, Any]]) -> list[Run]:
    """The worker runs the pods' progress reports describe (a garbled one is skipped)."""
    found = []
    for _, report in pr.reports(pods):
        run = report.get("run")
        if not isinstance(run, dict):
            continue
        step = run.get("fromStep")
        try:
            at = gp.parse_ts(run.get("firstStepAt"))
        except (TypeError, ValueError):
            continue
        if at is not None and isinstance(step, int) and not isinstance(step, bool):
            found.append(Run(at if at.tzinfo else at.replace(tzinfo=dt.UTC), step))
    return sorted(found)


def resolve(status: TrainingJobStatus, pods: list[dict[str, Any]]) -> list[str]:
    """Close the open recoveries that a run began after; returns one message per closed recovery."""
    open_ = [r for r in status.recoveries if r.resumed_at is None]
    if not open_:
        return []
    seen = runs(pods)
    messages = []
    for rec in open_:
        detected, lost = gp.parse_ts(rec.detected_at), gp.parse_ts(rec.lost_at)
        since = lost + dt.timedelta(seconds=DEAD_PEER_SECONDS) if lost else detected
        after = [r for r in seen if since is not None and r.first_step_at >= since]
        if not after or detected is None:
            continue
        run = after[0]
        rec.resumed_at = run.first_step_at.astimezone(dt.UTC).isoformat(timespec="milliseconds")
        rec.resumed_at = rec.resumed_at.replace("+00:00", "Z")
        rec.resumed_from_step = run.from_step
        rec.seconds = round(max(0.0, (run.first_step_at - detected).total_seconds()), 1)
        how = f"pod {rec.replacement} replaced {rec.lost_pod}" if rec.replacement else "the gang restarted"
        messages.append(
            f"training resumed from checkpoint step {run.from_step} {rec.seconds:g}s after node "
            f"{rec.node or '(unknown)'} was judged lost ({how})"
        )
    return messages
