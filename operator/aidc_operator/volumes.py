"""Why a pod that is not placed waits: pure reading of the scheduler's verdict on the pod and of the
PersistentVolumeClaims it mounts (both from the watch-fed cache). The TrainingJob and InferenceService
statuses use it so that a pod that cannot start says why, naming the claim, instead of staying silently
Pending (or blaming the checkpoint for a server that never ran)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .api.trainingjob import CheckpointSpec
from .conditions import get_condition, set_condition
from .lifecycle import Event, Plan

PVC = "PersistentVolumeClaim"
CONDITION = "CheckpointVolumeReady"  # on a TrainingJob
# A claim bound on first use (WaitForFirstConsumer) is Pending for the seconds its provisioner takes: that
# is normal. Only a pod waiting this long on a Pending claim is reported without the scheduler saying so
# (while a provisioner waits, the scheduler holds the pod with no condition for up to 10 minutes).
GRACE_SECONDS = 30.0
PROVISIONER = "volume.kubernetes.io/storage-provisioner"
_NOT_FOUND = re.compile(r'persistentvolumeclaim "([^"]+)" not found', re.IGNORECASE)
_VOLUMES = re.compile(r"volume|persistentvolumeclaim", re.IGNORECASE)


@dataclass(frozen=True)
class Trouble:
    reason: str  # VolumeNotFound | VolumeNotBound | Unschedulable
    message: str


def _claim_name(volume: dict[str, Any] | None) -> str | None:
    claim = (volume or {}).get("persistentVolumeClaim")
    name = claim.get("claimName") if isinstance(claim, dict) else None
    return name if isinstance(name, str) and name else None


def checkpoint_claims(ckpt: CheckpointSpec) -> list[tuple[str, str]]:
    """(field, claim name) of each PersistentVolumeClaim the checkpoint settings name: the checkpoint
    volume's, then the backup volume's. The check before a gang starts looks each one up."""
    named = [("spec.checkpoint.volume", _claim_name(ckpt.volume))]
    if ckpt.backup is not None:
        named.append(("spec.checkpoint.backup.volume", _claim_name(ckpt.backup.volume)))
    return [(where, name) for where, name in named if name]


def backup_problems(ckpt: CheckpointSpec) -> list[str]:
    """What is wrong with spec.checkpoint.backup (the webhook and the reconciler both ask)."""
    backup, path = ckpt.backup, "spec.checkpoint.backup"
    if backup is None:
        return []
    if ckpt.volume is None:
        return [
            f"{path}: needs spec.checkpoint.volume (without one the checkpoints live in the pod's emptyDir, "
            "and a backup of those is not what it looks like); set spec.checkpoint.volume too"
        ]
    sources = sorted(k for k in backup.volume if k != "name")
    if len(sources) != 1:
        return [f"{path}.volume: needs exactly one volume source, got {sources or 'none'}"]
    if sources == ["emptyDir"]:
        return [f"{path}.volume: an emptyDir does not outlive the pod; use a persistentVolumeClaim"]
    claim = _claim_name(backup.volume)
    if sources == ["persistentVolumeClaim"] and claim is None:
        return [f"{path}.volume.persistentVolumeClaim.claimName: required"]
    if claim is not None and claim == _claim_name(ckpt.volume):
        return [
            f"{path}.volume.persistentVolumeClaim.claimName: {claim!r} is spec.checkpoint.volume's claim "
            "too; a backup needs a volume of its own"
        ]
    return []


def claims(pod: dict[str, Any]) -> list[str]:
    """The PersistentVolumeClaims a pod mounts, in the order of its volumes."""
    vols = (pod.get("spec") or {}).get("volumes") or []
    return [n for v in vols if (n := (v.get("persistentVolumeClaim") or {}).get("claimName"))]


def claim_problem(name: str, pvc: dict[str, Any] | None) -> Trouble | None:
    """What is wrong with a claim (None: it is bound)."""
    if pvc is None:
        return Trouble("VolumeNotFound", f"{PVC} {name!r} not found")
    phase = (pvc.get("status") or {}).get("phase") or "Pending"
    if phase == "Bound":
        return None
    if phase == "Lost":
        return Trouble("VolumeNotBound", f"{PVC} {name!r} is Lost: its PersistentVolume is gone")
    klass = (pvc.get("spec") or {}).get("storageClassName")
    provisioner = (pvc["metadata"].get("annotations") or {}).get(PROVISIONER)
    if provisioner:
        why = f"waiting for provisioner {provisioner!r} (StorageClass {klass!r}) to create its volume"
    elif klass:
        why = f"no PersistentVolume matches it and nothing provisions StorageClass {klass!r}"
    else:
        why = "no PersistentVolume matches it and it names no StorageClass"
    return Trouble("VolumeNotBound", f"{PVC} {name!r} is {phase}, not bound: {why}")


def _scheduler_verdict(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a PodScheduled=False condition: Unschedulable, or SchedulerError (a volume
    bind that timed out lands there)."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return c.get("reason") or "", c.get("message") or ""
    return None


def _waited(pod: dict[str, Any], now: dt.datetime) -> float:
    created = pod["metadata"].get("creationTimestamp")
    if not created:
        return 0.0
    return (now - dt.datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()


def unplaced(pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods not yet bound to a node (and not on their way out)."""
    return [
        p
        for p in pods
        if not (p.get("spec") or {}).get("nodeName")
        and not p["metadata"].get("deletionTimestamp")
        and ((p.get("status") or {}).get("phase") or "Pending") == "Pending"
    ]


def pod_trouble(
    pod: dict[str, Any], pvcs: Mapping[str, dict[str, Any] | None], now: dt.datetime
) -> tuple[Trouble | None, float | None]:
    """(why this unplaced pod waits, or None; seconds until a Pending claim is worth reporting, when that
    is all that keeps it from being reported). pvcs: claim name → the claim as cached (None: none)."""
    name = pod["metadata"]["name"]
    verdict = _scheduler_verdict(pod)
    reason, words = verdict or ("", "")
    if m := _NOT_FOUND.search(words):
        return Trouble(
            "VolumeNotFound", f"{PVC} {m.group(1)!r} not found: pod {name} cannot be scheduled"
        ), None
    # A claim explains the wait when the scheduler says it is about volumes, or when it has said nothing
    # conclusive for long (a provisioner that never answers; a retried SchedulerError). Its words about
    # anything else (no node has the GPUs) win: a WaitForFirstConsumer claim stays Pending until its pod
    # has a node, and is not the cause then.
    about_volumes = reason == "Unschedulable" and _VOLUMES.search(words) is not None
    waited = _waited(pod, now)
    for claim in claims(pod) if about_volumes or reason != "Unschedulable" else ():
        problem = claim_problem(claim, pvcs.get(claim))
        if problem is None:
            continue
        if not about_volumes and waited < GRACE_SECONDS:
            return None, GRACE_SECONDS - waited
        said = f" (scheduler: {words})" if words else ""
        return Trouble(problem.reason, f"{problem.message}; pod {name} waits for it{said}"), None
    if reason == "Unschedulable":
        return Trouble("Unschedulable", f"pod {name} cannot be scheduled: {words}"), None
    return None, None


def first_trouble(
    pods: Iterable[dict[str, Any]], pvcs: Mapping[str, dict[str, Any] | None], now: dt.datetime
) -> tuple[Trouble | None, float | None]:
    """The first unplaced pod's trouble (by name, so it is stable from pass to pass), volumes first: a
    missing or unbound claim explains an Unschedulable pod better than the scheduler's summary."""
    recheck: float | None = None
    found: Trouble | None = None
    for pod in sorted(unplaced(pods), key=lambda p: p["metadata"]["name"]):
        trouble, left = pod_trouble(pod, pvcs, now)
        if left is not None:
            recheck = left if recheck is None else min(recheck, left)
        if trouble and (
            found is None or (found.reason == "Unschedulable" and trouble.reason != found.reason)
        ):
            found = trouble
    return found, recheck


def report_on_job(
    plan: Plan, pods: list[dict[str, Any]], pvcs: Mapping[str, dict[str, Any] | None], now: dt.datetime
) -> None:
    """The TrainingJob's CheckpointVolumeReady condition from its pods (the check before a gang starts
    sets it too, for a missing claim): False, with an Event, while a pod waits for a claim that is
    missing or unbound; True again once nothing does. The scheduler's other words are the planner's
    Unschedulable condition."""
    trouble, recheck = first_trouble(pods, pvcs, now)
    st, generation = plan.status, plan.status.observed_generation
    have = get_condition(st.conditions, CONDITION)
    stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if trouble is not None and trouble.reason != "Unschedulable":
        if have is None or (have.status, have.reason) != ("False", trouble.reason):
            plan.events.append(Event("Warning", trouble.reason, trouble.message))
        set_condition(st.conditions, CONDITION, "False", trouble.reason, trouble.message, stamp, generation)
    elif have is not None and have.status == "False" and pods and recheck is None:
        message = "every PersistentVolumeClaim the pods mount exists and is bound"
        set_condition(st.conditions, CONDITION, "True", "VolumeReady", message, stamp, generation)
    if recheck is not None:
        plan.requeue_after = min(plan.requeue_after, recheck + 1)
