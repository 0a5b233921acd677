"""TrainingJob as a Kueue external framework (pure): the Workload that asks Kueue for the gang's quota, and
what the Workload's status allows the gang to do.

The pattern is Kueue's job framework, done by aidc for its own kind: a job labelled
`kueue.x-k8s.io/queue-name` gets one Workload (owned by the job, so deleting the job deletes it) whose
single podSet is the gang: `nodes` pods, each with the pod's own requests. No pod exists until Kueue
admits the Workload; the gang then starts with the admitted flavor's node labels and tolerations. When
Kueue evicts it (preemption, quota reclaimed) the gang is stopped gracefully — the trainer writes its
stop checkpoint — and only once its pods are gone does the operator hand the quota back (admission
cleared, QuotaReserved False), as Kueue's own integrations do; re-admitted, it resumes from that
checkpoint. A finished job marks its Workload Finished.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .api.trainingjob import TrainingJobSpec
from .builders import trainingjob as build
from .builders.common import LABEL_JOB, Owner, metadata

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
WORKLOAD, FLAVOR = "Workload", "ResourceFlavor"
QUEUE_LABEL = f"{GROUP}/queue-name"
PRIORITY_LABEL = f"{GROUP}/priority-class"
JOB_UID_LABEL = f"{GROUP}/job-uid"
PODSET = "workers"


def queue_name(body: Mapping[str, Any]) -> str | None:
    return (body["metadata"].get("labels") or {}).get(QUEUE_LABEL) or None


def workload_name(owner: Owner) -> str:
    """trainingjob-<name>-<5 hex of the uid>: unique per job incarnation, within a DNS subdomain."""
    digest = hashlib.sha256(owner.uid.encode()).hexdigest()[:5]
    return f"trainingjob-{owner.name}-{digest}"


@dataclass(frozen=True)
class Priority:
    """What the job's priority class resolves to (looked up once, when the Workload is made)."""

    kind: Literal["WorkloadPriorityClass", "PriorityClass"]
    name: str
    value: int


def workload(owner: Owner, spec: TrainingJobSpec, queue: str, priority: Priority | None) -> dict[str, Any]:
    """The Workload for the job's gang. The pod template is the gang's own (rank 0's), so Kueue counts
    exactly the requests, node selectors and tolerations the pods will carry."""
    pod = build.pod(owner, spec, 0, 0)
    template = {
        "spec": {
            k: v
            for k, v in pod["spec"].items()
            if k in ("containers", "nodeSelector", "tolerations", "affinity", "priorityClassName")
        }
    }
    wl_spec: dict[str, Any] = {
        "queueName": queue,
        # standby spares hold GPUs like ranks do: the quota counts them
        "podSets": [
            {"name": PODSET, "count": spec.nodes + spec.failure_policy.spare_nodes, "template": template}
        ],
    }
    if priority is not None:
        group = GROUP if priority.kind == "WorkloadPriorityClass" else "scheduling.k8s.io"
        wl_spec["priorityClassRef"] = {"group": group, "kind": priority.kind, "name": priority.name}
        wl_spec["priority"] = priority.value
    meta = metadata(owner, workload_name(owner), {LABEL_JOB: owner.name, JOB_UID_LABEL: owner.uid})
    return {"apiVersion": API_VERSION, "kind": WORKLOAD, "metadata": meta, "spec": wl_spec}


def priority_class_of(body: Mapping[str, Any], spec: TrainingJobSpec) -> tuple[str, str] | None:
    """(kind, name) of the class to resolve: the Kueue label wins over the pods' PriorityClass."""
    if name := (body["metadata"].get("labels") or {}).get(PRIORITY_LABEL):
        return "WorkloadPriorityClass", name
    if spec.pod_template.priority_class_name:
        return "PriorityClass", spec.pod_template.priority_class_name
    return None


# ------------------------------------------------------------------------------------------ the gate


@dataclass(frozen=True)
class Gate:
    """What Kueue allows: 'create' the Workload; wait 'queued'; run 'admitted'; stop 'evicted'."""

    state: Literal["create", "queued", "admitted", "evicted"]
    reason: str = ""
    message: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False  # the Workload already carries Finished
    active: bool = True  # the Workload's spec.active (False while the job is suspended)


def _condition(wl: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (wl.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _true(wl: Mapping[str, Any], type_: str) -> bool:
    return (_condition(wl, type_) or {}).get("status") == "True"


def gate(wl: Mapping[str, Any] | None, flavors: Mapping[str, Mapping[str, Any]]) -> Gate:
    """The job's gate from its Workload as Kueue left it; flavors: ResourceFlavors by name."""
    if wl is None:
        return Gate("create", "WorkloadPending", "creating the Workload for Kueue")
    finished = _true(wl, "Finished")
    active = (wl.get("spec") or {}).get("active", True) is not False
    if _true(wl, "Evicted"):
        c = _condition(wl, "Evicted") or {}
        reason, message = c.get("reason", "Evicted"), c.get("message", "")
        return Gate("evicted", reason, message, finished=finished, active=active)
    if _true(wl, "Admitted") and (admission := (wl.get("status") or {}).get("admission")):
        selector: dict[str, str] = {}
        tolerations: list[dict[str, Any]] = []
        for assignment in admission.get("podSetAssignments") or []:
            for name in sorted(set((assignment.get("flavors") or {}).values())):
                fl = (flavors.get(name) or {}).get("spec") or {}
                selector.update(fl.get("nodeLabels") or {})
                tolerations += [t for t in fl.get("tolerations") or [] if t not in tolerations]
        message = f"admitted by ClusterQueue {admission.get('clusterQueue', '')}"
        return Gate("admitted", "Admitted", message, selector, tolerations, finished, active)
    c = _condition(wl, "QuotaReserved") or {}
    # Kueue's own words: "couldn't assign flavors …", "LocalQueue x doesn't exist" …
    reason = c.get("reason") or "Pending"
    message = c.get("message") or "waiting for Kueue to admit the Workload"
    return Gate("queued", reason, message, finished=finished, active=active)


def requeue_status(wl: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The Workload status that hands an evicted gang's quota back once its pods are gone: admission
    cleared, QuotaReserved False, Requeued (Kueue then queues it again)."""
    evicted = _condition(wl, "Evicted") or {}
    message = evicted.get("message") or "evicted"
    again = evicted.get("reason") in ("Preempted", "NodeFailures")
    conditions = _replace(
        (wl.get("status") or {}).get("conditions") or [],
        [
            {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": message},
            {"type": "Admitted", "status": "False", "reason": "NoReservation", "message": "the gang stopped"},
            {
                "type": "Requeued",
                "status": "True" if again else "False",
                "reason": evicted.get("reason", "Evicted"),
                "message": message,
            },
        ],
        now,
        wl["metadata"].get("generation"),
    )
    return {"status": {"admission": None, "conditions": conditions}}


def finished_status(wl: Mapping[str, Any], succeeded: bool, message: str, now: str) -> dict[str, Any]:
    reason = "Succeeded" if succeeded else "Failed"
    conditions = _replace(
        (wl.get("status") or {}).get("conditions") or [],
        [{"type": "Finished", "status": "True", "reason": reason, "message": message[:1024]}],
        now,
        wl["metadata"].get("generation"),
    )
    return {"status": {"conditions": conditions}}


def _replace(
    conditions: list[dict[str, Any]], new: list[dict[str, Any]], now: str, generation: int | None
) -> list[dict[str, Any]]:
    """Conditions with `new` set (lastTransitionTime moves only when the status changes)."""
    out = [dict(c) for c in conditions]
    for cond in new:
        old = next((c for c in out if c.get("type") == cond["type"]), None)
        moved = old is None or old.get("status") != cond["status"]
        merged = {**cond, "observedGeneration": generation or 0}
        merged["lastTransitionTime"] = now if moved else old.get("lastTransitionTime", now)  # type: ignore[union-attr]
        if old is None:
            out.append(merged)
        else:
            out[out.index(old)] = merged
    return out
