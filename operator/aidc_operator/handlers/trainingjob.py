"""TrainingJob passes: read the job, its pods, its children and its nodes' health from the watch-fed
store, ask lifecycle.plan() what to do, write only what differs — level-based, so a restarted operator
simply converges. A steady Running job costs no API request: nothing here lists, children are created
only when the store lacks them, and ticking status figures are written at a coarse cadence."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from .. import admission, kubeio, lifecycle, metrics, stale_pods, volumes
from ..api import GROUP, VERSION
from ..api.trainingjob import TrainingJobSpec, TrainingJobStatus
from ..builders import trainingjob as build
from ..builders.common import LABEL_ATTEMPT, LABEL_JOB, Owner
from ..cache import TRAININGJOB
from ..conditions import set_condition
from ..runtime import CONFIG, STORE
from . import kueue
from .loop import Controller, Outcome
from .trainingjob_keys import ensure_key
from .validation import describe_validation_error

PLURAL = "trainingjobs"
# Figures that move on their own, and how stale each may get before it alone is worth a write: the
# trainer's reports (progress with its ETA, evaluation, energy) every 30 s; GPU time (it changes every
# second a GPU job runs) with the safety resync. Any other change writes at once and carries them along.
TICKING = {
    "progress": 30.0,
    "evaluation": 30.0,
    "energyJoules": 30.0,
    "gpuSeconds": lifecycle.RESYNC_SECONDS,
}
log = logging.getLogger("aidc.trainingjob")
_status_written: dict[tuple[str, str], float] = {}  # job → monotonic time of our last status write
_stale = stale_pods.StalePods(STORE, kubeio.read_pod, time.monotonic)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _invalid(body: dict[str, Any], message: str) -> Outcome:
    """Record an invalid spec once per generation: condition Invalid + Event, then wait for an edit."""
    status = body.get("status") or {}
    generation = body["metadata"].get("generation")
    already = any(
        c.get("type") == "Invalid" and c.get("status") == "True" and c.get("observedGeneration") == generation
        for c in status.get("conditions") or []
    )
    if already:
        return Outcome(lifecycle.RESYNC_SECONDS)
    st = TrainingJobStatus.model_validate(status) if status else TrainingJobStatus()
    set_condition(
        st.conditions,
        "Invalid",
        "True",
        "InvalidSpec",
        message,
        _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        generation,
    )
    st.phase = st.phase or "Pending"
    st.observed_generation = generation
    meta = body["metadata"]
    stored = kubeio.patch_status(
        PLURAL, meta["namespace"], meta["name"], st.model_dump(by_alias=True, mode="json")
    )
    STORE.upsert(TRAININGJOB, stored)
    return Outcome(lifecycle.RESYNC_SECONDS, [lifecycle.Event("Warning", "InvalidSpec", message)], body)


def _ensure_volume(owner: Owner, spec: TrainingJobSpec) -> lifecycle.Prerequisites | None:
    # The checkpoint volume's claim, then the backup's (spec.checkpoint.backup): a gang that cannot
    # mount either would only sit Pending.
    for where, claim in volumes.checkpoint_claims(spec.checkpoint):
        try:
            kubeio.core().read_namespaced_persistent_volume_claim(claim, owner.namespace)
        except ApiException as e:
            if e.status == 404:
                of = "" if where == "spec.checkpoint.volume" else f" ({where})"
                return lifecycle.Prerequisites(
                    False,
                    "CheckpointVolumeReady",
                    "PersistentVolumeClaimMissing",
                    f"PersistentVolumeClaim {claim!r} not found{of}",
                )
            raise
    return None


def _ensure_children(owner: Owner, spec: TrainingJobSpec, attempt: int, pods: list[dict[str, Any]]) -> None:
    """Service, NetworkPolicy and the trainer's ServiceAccount/Role: created when the store lacks them
    (adopted when they exist), the Role patched only when its rules differ from what it should say."""
    spares = spec.failure_policy.spare_nodes  # standbys may become the rank that reports
    pod_names = [build.pod_name(owner.name, attempt, r) for r in range(spec.nodes + spares)]
    # A gang resized down keeps running at its old size until its next start: its pods keep access.
    pod_names += [
        p["metadata"]["name"]
        for p in pods
        if (p["metadata"].get("labels") or {}).get(LABEL_ATTEMPT) == str(attempt)
    ]
    pod_names = sorted(set(pod_names))
    wanted = [build.headless_service(owner, spec), build.network_policy(owner, spec)]
    for obj in wanted + build.trainer_rbac(owner, pod_names):
        have = STORE.get(obj["kind"], owner.namespace, obj["metadata"]["name"])
        if have is None:
            if created := kubeio.create(obj):
                STORE.upsert(obj["kind"], created)
        elif obj["kind"] == "Role" and have.get("rules") != obj["rules"]:
            # The Role names the current attempt's pods; keep it pointing at them.
            patched = client.RbacAuthorizationV1Api(kubeio.api()).patch_namespaced_role(
                obj["metadata"]["name"], owner.namespace, {"rules": obj["rules"]}, _preload_content=False
            )
            STORE.upsert("Role", kubeio.raw(patched))


def reconcile_once(namespace: str, name: str) -> Outcome | None:
    """One level-based pass. None: the job is gone (stop)."""
    body = STORE.get(TRAININGJOB, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    try:
        spec = TrainingJobSpec.model_validate(body.get("spec") or {})
    except ValidationError as e:
        return _invalid(body, describe_validation_error(e))
    # The webhook's rules, enforced here too: a cluster without the webhook gets the same answer.
    raw = admission.default_trainingjob(body.get("spec") or {})
    if problems := admission.validate_trainingjob(name, raw):
        return _invalid(body, "; ".join(problems))
    owner = Owner.of(body)
    status = body.get("status") or {}
    attempt = status.get("attempt", 0)
    prereq = lifecycle.Prerequisites()
    finished = status.get("phase") in lifecycle.FINISHED
    pods = _stale.confirm(STORE.pods_with(LABEL_JOB, namespace, name), _now())
    if not finished and not spec.suspend:
        _ensure_children(owner, spec, attempt, pods)
        # What pods need (volume, key) is checked when a gang is about to start: not again for every pod
        # event while its pods start, nor while it runs (a missing pod then restarts the gang).
        started = status.get("phase") == "Running" or any(
            (p["metadata"].get("labels") or {}).get(LABEL_ATTEMPT) == str(attempt)
            and not p["metadata"].get("deletionTimestamp")
            for p in pods
        )
        prereq = (None if started else _ensure_volume(owner, spec)) or ensure_key(owner, spec, body, started)
    queue = kueue.gate(owner, body)
    plan = lifecycle.plan(body, spec, pods, STORE.health(), _now(), prereq, queue)
    if not finished and not spec.suspend:
        # A pod waiting for a missing or unbound claim: which claim and why (from the cache).
        pvcs = {c: STORE.get(volumes.PVC, namespace, c) for p in pods for c in volumes.claims(p)}
        volumes.report_on_job(plan, pods, pvcs, _now())

    for deletion in plan.delete:
        if terminating := kubeio.delete_pod(namespace, deletion.name, deletion.force):
            STORE.upsert("Pod", terminating)
    for pod in plan.create:
        if created := kubeio.create(pod):
            STORE.upsert("Pod", created)
    events = plan.events + (kueue.write(owner, spec, body, plan) if queue is not None else [])
    requeue = plan.requeue_after
    new_status = plan.status.model_dump(by_alias=True, mode="json")
    last_write = _status_written.setdefault((namespace, name), time.monotonic())
    write, wait = status_write_due(status, new_status, last_write, time.monotonic())
    if write:
        STORE.upsert(TRAININGJOB, kubeio.patch_status(PLURAL, namespace, name, new_status))
        _status_written[(namespace, name)] = time.monotonic()
    elif wait is not None:
        requeue = min(requeue, wait)
    metrics.observe_trainingjob(body, plan)
    if plan.delete_job:
        kubeio.custom().delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
        )
    return Outcome(requeue, events, body)


def status_write_due(
    old: dict[str, Any], new: dict[str, Any], last_write: float, now: float
) -> tuple[bool, float | None]:
    """(write now?, else seconds until a ticking figure is due for a write). last_write: our last status
    write, or when we first saw the job (a restarted operator does not rewrite every job's figures)."""
    changed = {k for k in new if new[k] != old.get(k)}
    if not changed:
        return False, None
    if changed - TICKING.keys():
        return True, None
    left = min(TICKING[k] for k in changed) - (now - last_write)
    return (True, None) if left <= 0 else (False, left)


def forget(namespace: str, name: str) -> None:
    _status_written.pop((namespace, name), None)
    metrics.forget_trainingjob(namespace, name)


JOBS = Controller("TrainingJob", reconcile_once, CONFIG.job_workers, forget)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def trainingjob_served(name: str, namespace: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """Passes run for this job while kopf keeps this daemon: not while a peer is active, not after
    deletion began."""
    await JOBS.serve((namespace, name), stopped)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def trainingjob_event(event: kopf.RawEvent, **_: Any) -> None:
    """kopf's watch of TrainingJobs feeds the store (the router wakes the job and its servers)."""
    STORE.take(TRAININGJOB, event["type"], event["object"])
