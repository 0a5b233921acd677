"""The I/O half of the Kueue integration (queueing.py is the pure half): read a job's gate from the cache,
make its Workload, write the Workload status the planner asked for. Every read is the watch-fed store's;
the only other request is the priority class lookup, once, when the Workload is made."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from .. import kubeio, lifecycle, queueing
from ..api.trainingjob import TrainingJobSpec
from ..builders.common import Owner
from ..runtime import CONFIG, STORE

log = logging.getLogger("aidc.trainingjob")
NOT_SERVED = (
    "the job names a Kueue queue (label kueue.x-k8s.io/queue-name) but this cluster does not serve Kueue's "
    f"{queueing.API_VERSION} API (or the operator runs with --kueue off): install Kueue, or remove the label"
)


def gate(owner: Owner, body: dict[str, Any]) -> queueing.Gate | None:
    """What Kueue allows this job; None for a job in no queue (it runs as if Kueue did not exist)."""
    if queueing.queue_name(body) is None:
        return None
    if not CONFIG.kueue_served:
        return queueing.Gate("queued", "KueueNotServed", NOT_SERVED)
    wl = STORE.get(queueing.WORKLOAD, owner.namespace, queueing.workload_name(owner))
    flavors = {f["metadata"]["name"]: f for f in STORE.list(queueing.FLAVOR)}
    return queueing.gate(wl, flavors)


def _priority(
    body: dict[str, Any], spec: TrainingJobSpec
) -> tuple[queueing.Priority | None, list[lifecycle.Event]]:
    wanted = queueing.priority_class_of(body, spec)
    if wanted is None:
        return None, []
    kind, name = wanted
    value = kubeio.priority_value(kind, name)
    if value is None:
        return None, [lifecycle.Event("Warning", "PriorityClassNotFound", f"{kind} {name!r} not found")]
    return queueing.Priority(kind, name, value), []  # type: ignore[arg-type]


def write(
    owner: Owner, spec: TrainingJobSpec, body: dict[str, Any], plan: lifecycle.Plan
) -> list[lifecycle.Event]:
    """Carry out the planner's Workload decisions; returns Events to post."""
    events: list[lifecycle.Event] = []
    ns, name = owner.namespace, queueing.workload_name(owner)
    if plan.create_workload and STORE.get(queueing.WORKLOAD, ns, name) is None:
        priority, events = _priority(body, spec)
        queue = queueing.queue_name(body) or ""
        if created := kubeio.create(queueing.workload(owner, spec, queue, priority)):
            STORE.upsert(queueing.WORKLOAD, created)
            events.append(
                lifecycle.Event("Normal", "WorkloadCreated", f"Workload {name} queued in {queue!r}")
            )
    wl = STORE.get(queueing.WORKLOAD, ns, name)
    active = plan.workload_active
    if (
        active is not None
        and wl is not None
        and (stored := kubeio.patch_workload(ns, name, {"spec": {"active": active}}))
    ):
        STORE.upsert(queueing.WORKLOAD, stored)
        wl = stored
    if plan.workload_write is None or wl is None:
        return events
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if plan.workload_write == "requeue":
        patch = queueing.requeue_status(wl, now)
    else:
        st = plan.status
        failed = st.last_failure.message if st.last_failure else "failed"
        patch = queueing.finished_status(
            wl, st.phase == "Succeeded", "succeeded" if st.phase == "Succeeded" else failed, now
        )
    # The conditions list is replaced whole from the cached Workload: only if Kueue has not written it
    # since (a conflict fails the pass, which is retried with the newer object).
    patch["metadata"] = {"resourceVersion": wl["metadata"]["resourceVersion"]}
    if stored := kubeio.patch_workload_status(ns, name, patch):
        STORE.upsert(queueing.WORKLOAD, stored)
    return events
