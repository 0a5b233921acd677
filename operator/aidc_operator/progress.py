"""What rank 0's progress report (the `aidc.dev/progress` annotation, docs/contracts.md) says beyond the
step: time left, the latest evaluation and the attempt's GPU energy. Pure helpers of the TrainingJob
planner (lifecycle); a garbled field is ignored, never fatal."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from . import gang_pods as gp
from .api.trainingjob import BackupRef, CheckpointRef, Evaluation, Progress, TrainingJobStatus

ANNOTATION_PROGRESS = "aidc.dev/progress"
ANNOTATION_CHECKPOINT = "aidc.dev/last-checkpoint"
ANNOTATION_BACKUP = "aidc.dev/last-backup"

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def short_duration(seconds: float) -> str:
    """4m10s, 2h5m, 3d4h, 45s: the two largest units, as kubectl prints ages."""
    left = max(0, math.ceil(seconds))
    parts = []
    for unit, size in _UNITS:
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        if len(parts) == 2 or (parts and not left):
            break
    return "".join(parts)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def with_eta(progress: Progress) -> Progress:
    """The progress with eta (time left as of the report) and estimatedCompletionTime filled in from
    stepsPerSecond and the steps left; both absent when the rate or the total is unknown. Derived from
    the report alone, so a pass that sees no new report computes no new figure (and writes nothing)."""
    rate = _finite(progress.steps_per_second)
    eta, done_at = None, None
    if progress.total_steps is not None and rate and rate > 0:
        left = max(0, progress.total_steps - progress.step) / rate
        eta = short_duration(left)
        if (reported := gp.parse_ts(progress.time)) is not None:
            done_at = gp.ts(reported + dt.timedelta(seconds=math.ceil(left)))
    return progress.model_copy(
        update={"steps_per_second": rate, "eta": eta, "estimated_completion_time": done_at}
    )


def evaluation(report: dict[str, Any]) -> Evaluation | None:
    """The report's latest evaluation; None before the first one (or when garbled)."""
    raw = report.get("evaluation")
    if not isinstance(raw, dict):
        return None
    step = raw.get("step")
    return Evaluation(
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        loss=_finite(raw.get("loss")),
        accuracy=_finite(raw.get("accuracy")),
        f1=_finite(raw.get("f1")),
    )


@dataclass(frozen=True)
class Energy:
    """The running attempt's energy as its rank 0 reported it."""

    joules: float | None  # None: not measured
    text: str | None  # for status.energy; None: the trainer says nothing about energy


def energy(report: dict[str, Any]) -> Energy:
    source = report.get("energySource")
    if not isinstance(source, str) or not source:
        return Energy(None, None)  # a trainer that does not measure energy claims nothing
    joules = _finite(report.get("energyJoules"))
    gpus = report.get("energyGpus")
    if source == "nvml" and joules is not None:
        counted = f" on {gpus} GPU(s)" if isinstance(gpus, int) and not isinstance(gpus, bool) else ""
        return Energy(max(0.0, joules), f"NVML{counted}")
    reason = source.removeprefix("unavailable").lstrip(": ").strip() or "unavailable"
    return Energy(None, f"not measured: {reason}"[:200])


def energy_total(previous: float | None, current: float | None) -> float | None:
    """Finished attempts' energy + the running one's; None only when no attempt measured any."""
    if previous is None and current is None:
        return None
    return round((previous or 0.0) + (current or 0.0), 1)


def clear_eta(status: TrainingJobStatus) -> None:
    """A finished job has no time left."""
    if status.progress is not None:
        status.progress.eta = status.progress.estimated_completion_time = None


def reports(pods: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(attempt, report) of every pod carrying a progress report, oldest first: with a c10d rendezvous
    the reporting rank 0 may move between the pods of an attempt, so the newest report wins, never a
    fixed pod's."""
    found = [
        (gp.attempt(p), r) for p in pods if (r := gp.annotation_json(p, ANNOTATION_PROGRESS)) is not None
    ]
    return sorted(found, key=lambda ar: (ar[0], str(ar[1].get("time") or "")))


def lift(status: TrainingJobStatus, pods: list[dict[str, Any]], finished: bool) -> float | None:
    """Lift rank 0's reports (annotations on its own pod) into the status: progress with its ETA, the
    latest evaluation, the newest checkpoint and backup copy, how energy is measured. Returns the
    running attempt's energy: its rank 0's report, else what the status last said (its pod may be
    gone); an older attempt's energy was closed into energyJoulesPrevious and is not counted again."""
    st = status
    joules = None
    if st.energy_joules is not None:
        joules = st.energy_joules - (st.energy_joules_previous or 0.0)
    for attempt, report in reports(pods):
        with contextlib.suppress(ValueError):
            st.progress = with_eta(Progress.model_validate(report))
        st.evaluation = evaluation(report) or st.evaluation
        if attempt == st.attempt:
            measured = energy(report)
            joules, st.energy = measured.joules, measured.text or st.energy
    for pod in pods:
        if (copy := gp.annotation_json(pod, ANNOTATION_BACKUP)) is not None:
            with contextlib.suppress(ValueError):
                backup = BackupRef.model_validate(copy)
                if st.last_backup is None or backup.step >= st.last_backup.step:
                    st.last_backup = backup
        if (ckpt := gp.annotation_json(pod, ANNOTATION_CHECKPOINT)) is not None:
            try:
                ref = CheckpointRef.model_validate(ckpt)
            except ValueError:
                continue
            if st.last_checkpoint is None or ref.step >= st.last_checkpoint.step:
                st.last_checkpoint = ref
    if finished:
        clear_eta(st)
    return joules
