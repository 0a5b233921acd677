"""Thin kopf wiring for TrainingJobs: one reconcile loop (a kopf daemon) per job, woken by its pods'
and by nodes' events, resyncing every few seconds. Each pass reads the world, asks lifecycle.plan()
what to do, applies it and writes status — level-based, so a restarted operator simply converges."""

from __future__ import annotations

import base64
import datetime as dt
import logging
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from .. import keys, kubeio, lifecycle, metrics
from ..api import GROUP, VERSION
from ..api.trainingjob import TrainingJobSpec, TrainingJobStatus
from ..builders import trainingjob as build
from ..builders.common import LABEL_JOB, Owner
from ..conditions import set_condition
from ..keys import check_kek_secret, check_key_secret, key_secret
from .loop import Outcome, ReconcileLoops
from .validation import describe_validation_error

PLURAL = "trainingjobs"
NODE_LEASE_NAMESPACE = "kube-node-lease"  # kubelets renew one Lease per node here
log = logging.getLogger("aidc.trainingjob")
LOOPS = ReconcileLoops("TrainingJob")
wake = LOOPS.wake


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
        return Outcome(300)
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
    kubeio.patch_status(PLURAL, meta["namespace"], meta["name"], st.model_dump(by_alias=True, mode="json"))
    return Outcome(300, [lifecycle.Event("Warning", "InvalidSpec", message)])


def _ensure_key(owner: Owner, spec: TrainingJobSpec, body: dict[str, Any]) -> lifecycle.Prerequisites:
    """The key Secret exists (made once by us, or the user's is valid), the KEK (if any) unwraps it, and
    an operator-managed key is rotated when due. Every decision is an Event; no key byte is ever in one."""
    enc = spec.checkpoint.encryption
    name = build.key_secret_name(owner, spec)
    if name is None:
        return lifecycle.Prerequisites()
    events: list[lifecycle.Event] = []

    def waiting(reason: str, message: str) -> lifecycle.Prerequisites:
        return lifecycle.Prerequisites(False, "CheckpointKeyReady", reason, message)

    kek = None
    if enc.kek_secret_ref:
        kek_secret = kubeio.read_secret(owner.namespace, enc.kek_secret_ref.name)
        check = check_kek_secret(kek_secret, enc.kek_secret_ref.name)
        if not check.ok:
            return waiting(check.reason, check.message)
        kek = base64.b64decode(kek_secret["data"]["kek"])  # type: ignore[index]
    secret = kubeio.read_secret(owner.namespace, name)
    if secret is None and enc.key_secret_ref is None:
        retain = enc.key_retention == "Retain"
        kubeio.create(key_secret(owner, name, retain=retain, now=_now(), kek=kek))
        secret = kubeio.read_secret(owner.namespace, name)
        events.append(
            lifecycle.Event(
                "Normal",
                "KeyCreated",
                f"created checkpoint key Secret {name!r}"
                + (f" wrapped with the KEK in {enc.kek_secret_ref.name!r}" if enc.kek_secret_ref else "")
                + (
                    "; retained after the job is deleted (keyRetention: Retain)"
                    if retain
                    else "; deleted with the job (keyRetention: Delete)"
                ),
            )
        )
    check = check_key_secret(secret, name, wrapped=kek is not None)
    if not check.ok:
        return waiting(check.reason, check.message)
    assert secret is not None
    if kek is not None and not keys.unwraps(secret, kek):
        kek_name = enc.kek_secret_ref.name if enc.kek_secret_ref else ""
        return lifecycle.Prerequisites(
            False,
            "CheckpointKeyReady",
            "KEKMismatch",
            f"the KEK in Secret {kek_name!r} does not unwrap key {check.key_id} in {name!r}",
            events=(
                lifecycle.Event(
                    "Warning",
                    "KeyUnwrapFailed",
                    f"KEK {kek_name!r} does not unwrap the key in {name!r}",
                ),
            ),
        )
    key_id = check.key_id
    if enc.key_secret_ref is None:  # only keys we own are rotated
        request = (body["metadata"].get("annotations") or {}).get(keys.ANNOTATION_ROTATE)
        why = keys.rotation_due(secret, enc.rotate_after, request, _now())
        stale = keys.prunable_key_ids(secret, (body.get("status") or {}).get("lastCheckpoint"))
        if stale and not why:
            kubeio.core().patch_namespaced_secret(
                name, owner.namespace, {"data": {f"key-{k}": None for k in stale}}
            )
            events.append(
                lifecycle.Event(
                    "Normal",
                    "KeysPruned",
                    f"removed key id(s) {', '.join(stale)} from {name!r}: no retained checkpoint uses them",
                )
            )
        if why:
            key_id, patch = keys.rotation_patch(secret, _now(), request, kek)
            kubeio.core().patch_namespaced_secret(name, owner.namespace, patch)
            events.append(
                lifecycle.Event(
                    "Normal",
                    "KeyRotated",
                    f"rotated the checkpoint key in {name!r} to {key_id} ({why}); older ids stay readable",
                )
            )
    return lifecycle.Prerequisites(
        True,
        "CheckpointKeyReady",
        "KeyReady",
        f"checkpoint key {key_id} in Secret {name!r}",
        key_id,
        tuple(events),
    )


def _ensure_volume(owner: Owner, spec: TrainingJobSpec) -> lifecycle.Prerequisites | None:
    claim = ((spec.checkpoint.volume or {}).get("persistentVolumeClaim") or {}).get("claimName")
    if not claim:
        return None
    try:
        kubeio.core().read_namespaced_persistent_volume_claim(claim, owner.namespace)
    except ApiException as e:
        if e.status == 404:
            return lifecycle.Prerequisites(
                False,
                "CheckpointVolumeReady",
                "PersistentVolumeClaimMissing",
                f"PersistentVolumeClaim {claim!r} not found",
            )
        raise
    return None


def _ensure_children(owner: Owner, spec: TrainingJobSpec, attempt: int) -> None:
    """Service, NetworkPolicy and the trainer's ServiceAccount/Role, created once and adopted after."""
    kubeio.create(build.headless_service(owner, spec))
    kubeio.create(build.network_policy(owner, spec))
    pod_names = [build.pod_name(owner.name, attempt, r) for r in range(spec.nodes)]
    for obj in build.trainer_rbac(owner, pod_names):
        if not kubeio.create(obj) and obj["kind"] == "Role":
            # The Role names the current attempt's pods; keep it pointing at them.
            client.RbacAuthorizationV1Api(kubeio.api()).patch_namespaced_role(
                obj["metadata"]["name"], owner.namespace, {"rules": obj["rules"]}
            )


def reconcile_once(namespace: str, name: str) -> Outcome | None:
    """One level-based pass. None: the job is gone (stop looping)."""
    body = kubeio.get_cr(PLURAL, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    try:
        spec = TrainingJobSpec.model_validate(body.get("spec") or {})
    except ValidationError as e:
        return _invalid(body, describe_validation_error(e))
    owner = Owner.of(body)
    attempt = (body.get("status") or {}).get("attempt", 0)
    prereq = lifecycle.Prerequisites()
    finished = (body.get("status") or {}).get("phase") in lifecycle.FINISHED
    if not finished and not spec.suspend:
        _ensure_children(owner, spec, attempt)
        prereq = _ensure_volume(owner, spec) or _ensure_key(owner, spec, body)
    pods = [
        kubeio.sanitize(p)
        for p in kubeio.core().list_namespaced_pod(namespace, label_selector=f"{LABEL_JOB}={name}").items
    ]
    nodes = {n["metadata"]["name"]: n for n in (kubeio.sanitize(x) for x in kubeio.core().list_node().items)}
    leases = {
        lease["metadata"]["name"]: lease
        for lease in (
            kubeio.sanitize(x)
            for x in client.CoordinationV1Api(kubeio.api()).list_namespaced_lease(NODE_LEASE_NAMESPACE).items
        )
    }
    plan = lifecycle.plan(body, spec, pods, nodes, _now(), prereq, leases)

    for deletion in plan.delete:
        kubeio.delete_pod(namespace, deletion.name, deletion.force)
    for pod in plan.create:
        kubeio.create(pod)
    new_status = plan.status.model_dump(by_alias=True, mode="json")
    if new_status != _comparable(body.get("status") or {}, new_status):
        kubeio.patch_status(PLURAL, namespace, name, new_status)
    metrics.observe_trainingjob(body, plan)
    if plan.delete_job:
        kubeio.custom().delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
        )
    return Outcome(plan.requeue_after, plan.events)


def _comparable(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The old status restricted to the keys we write, so fields we never set don't force a patch."""
    return {k: old.get(k) for k in new}


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def trainingjob_loop(
    name: str, namespace: str, body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    await LOOPS.run(namespace, name, body, stopped, reconcile_once, metrics.forget_trainingjob)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
def pod_changed(namespace: str, labels: kopf.Labels, **_: Any) -> None:
    wake(namespace, labels[LABEL_JOB])


@kopf.on.event("", "v1", "nodes")
def node_changed(**_: Any) -> None:
    # Any node change may matter to any job (a lost node, or a failed one Ready again): wake them all.
    wake()


@kopf.on.event(GROUP, VERSION, PLURAL)
def trainingjob_changed(name: str, namespace: str, **_: Any) -> None:
    # Spec edits (suspend, resume, nodes …) take effect now, not at the next resync.
    wake(namespace, name)
