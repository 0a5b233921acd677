"""Reading a gang's pods as the API returns them (dicts): attempt, rank, phase, readiness, the scheduler's
verdict, the trainer's reports, GPU time. Pure helpers of the TrainingJob planner (lifecycle)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from .builders.common import LABEL_ATTEMPT, LABEL_RANK, LABEL_REPLACEMENT


def ts(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def attempt(pod: dict[str, Any]) -> int:
    try:
        return int(pod["metadata"]["labels"][LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return -1


def rank(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["labels"].get(LABEL_RANK, "-1"))


def replacement(pod: dict[str, Any]) -> int:
    """0 for a rank's first pod; k for the pod that took the rank over at the k-th node failure."""
    value = (pod["metadata"].get("labels") or {}).get(LABEL_REPLACEMENT, "0")
    return int(value) if value.isdigit() else 0


def superseded(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods whose rank a newer pod of the same attempt took over (ReplaceNode): no longer the gang's."""
    newest: dict[tuple[int, int], int] = {}
    for p in pods:
        key = (attempt(p), rank(p))
        newest[key] = max(newest.get(key, 0), replacement(p))
    return [p for p in pods if replacement(p) < newest[(attempt(p), rank(p))]]


def phase(pod: dict[str, Any]) -> str:
    return pod.get("status", {}).get("phase") or "Pending"


def ready(pod: dict[str, Any]) -> bool:
    return phase(pod) == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions") or []
    )


def unschedulable(pod: dict[str, Any]) -> dict[str, Any] | None:
    if phase(pod) != "Pending" or pod["metadata"].get("deletionTimestamp"):
        return None
    for c in pod.get("status", {}).get("conditions") or []:
        if (
            c.get("type") == "PodScheduled"
            and c.get("status") == "False"
            and c.get("reason") == "Unschedulable"
        ):
            return c
    return None


def annotation_json(pod: dict[str, Any], key: str) -> dict[str, Any] | None:
    raw = (pod["metadata"].get("annotations") or {}).get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None  # a garbled report is ignored, never fatal
    return value if isinstance(value, dict) else None


def gpu_seconds(pods: list[dict[str, Any]], gpus: int, now: dt.datetime) -> float:
    total = 0.0
    for pod in pods:
        start = parse_ts(pod.get("status", {}).get("startTime"))
        if not start or not gpus:
            continue
        end = now
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            finished = parse_ts(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt"))
            if finished:
                end = finished
        total += max(0.0, (end - start).total_seconds()) * gpus
    return total
