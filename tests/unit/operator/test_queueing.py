"""TrainingJob as a Kueue external framework, without a cluster: the Workload it asks with, the gate the
Workload's status sets, and what the planner does at each gate."""

from __future__ import annotations

import datetime as dt

from aidc_operator import queueing
from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import Owner
from aidc_operator.lifecycle import plan
from aidc_operator.recovery import NodeHealth

NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
OWNER = Owner("TrainingJob", "job", "ns", "uid-1", {queueing.QUEUE_LABEL: "gpu-queue"})
SPEC = TrainingJobSpec(nodes=2, gpusPerNode=4, procPerNode=4)
HEALTH = {n: NodeHealth(n, True) for n in ("n0", "n1")}
FLAVORS = {
    "a100": {
        "metadata": {"name": "a100"},
        "spec": {
            "nodeLabels": {"aidc.dev/gpu-pool": "a100"},
            "tolerations": [{"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}],
        },
    }
}


def body(status: dict | None = None) -> dict:
    meta = {
        "name": "job",
        "namespace": "ns",
        "uid": "uid-1",
        "generation": 1,
        "labels": dict(OWNER.labels or {}),
    }
    return {"kind": "TrainingJob", "metadata": meta, "status": status or {}}


def wl(*conditions: tuple[str, str, str], admitted_to: str | None = None) -> dict:
    status: dict = {
        "conditions": [{"type": t, "status": s, "reason": r, "message": f"{r}!"} for t, s, r in conditions]
    }
    if admitted_to:
        status["admission"] = {
            "clusterQueue": "team-a",
            "podSetAssignments": [
                {"name": "workers", "flavors": {"nvidia.com/gpu": admitted_to}, "count": 2}
            ],
        }
    return {"metadata": {"name": queueing.workload_name(OWNER), "generation": 1}, "status": status}


def test_the_workload_asks_for_the_whole_gang_as_one_podset() -> None:
    w = queueing.workload(OWNER, SPEC, "gpu-queue", queueing.Priority("WorkloadPriorityClass", "high", 1000))
    assert w["apiVersion"] == "kueue.x-k8s.io/v1beta2" and w["spec"]["queueName"] == "gpu-queue"
    (podset,) = w["spec"]["podSets"]
    assert podset["count"] == 2
    (container,) = podset["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4", "per pod; Kueue multiplies by count"
    assert w["spec"]["priority"] == 1000
    assert w["spec"]["priorityClassRef"] == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "high",
    }
    ref = w["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("TrainingJob", "uid-1", True), (
        "deleted with its job"
    )
    assert w["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "aidc-operator", (
        "in the operator's watch"
    )


def test_gates_from_the_workload_status() -> None:
    assert queueing.gate(None, FLAVORS).state == "create"
    pending = queueing.gate(wl(("QuotaReserved", "False", "Inadmissible")), FLAVORS)
    assert (pending.state, pending.reason, pending.message) == ("queued", "Inadmissible", "Inadmissible!")
    admitted = queueing.gate(
        wl(("QuotaReserved", "True", "x"), ("Admitted", "True", "x"), admitted_to="a100"), FLAVORS
    )
    assert admitted.state == "admitted" and admitted.node_selector == {"aidc.dev/gpu-pool": "a100"}
    assert admitted.tolerations == FLAVORS["a100"]["spec"]["tolerations"]
    evicted = queueing.gate(
        wl(("Admitted", "True", "x"), ("Evicted", "True", "Preempted"), admitted_to="a100"), FLAVORS
    )
    assert (evicted.state, evicted.reason) == ("evicted", "Preempted")


def test_no_pod_before_admission_and_kueues_words_on_the_job() -> None:
    p = plan(body(), SPEC, [], HEALTH, NOW, queue=queueing.gate(None, FLAVORS))
    assert p.create == [] and p.create_workload and p.status.phase == "Queued"
    gate = queueing.gate(wl(("QuotaReserved", "False", "Inadmissible")), FLAVORS)
    p = plan(body(p.status.wire()), SPEC, [], HEALTH, NOW, queue=gate)
    assert p.create == [] and not p.create_workload and p.status.phase == "Queued"
    queued = next(c for c in p.status.conditions if c.type == "Queued")
    assert (queued.status, queued.reason, queued.message) == ("True", "Inadmissible", "Inadmissible!")


def test_admission_starts_the_gang_on_the_admitted_flavor() -> None:
    gate = queueing.gate(
        wl(("QuotaReserved", "True", "x"), ("Admitted", "True", "x"), admitted_to="a100"), FLAVORS
    )
    p = plan(body({"phase": "Queued"}), SPEC, [], HEALTH, NOW, queue=gate)
    assert len(p.create) == 2 and p.status.phase == "Pending"
    for pod in p.create:
        assert pod["spec"]["nodeSelector"]["aidc.dev/gpu-pool"] == "a100"
        assert FLAVORS["a100"]["spec"]["tolerations"][0] in pod["spec"]["tolerations"]
        assert queueing.QUEUE_LABEL not in pod["metadata"]["labels"]


def running(attempt: int) -> list[dict]:
    pods = build.gang(OWNER, SPEC, attempt)
    for pod, node in zip(pods, HEALTH, strict=True):
        pod["spec"]["nodeName"] = node
        pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    return pods


def test_eviction_stops_gracefully_costs_nothing_and_hands_the_quota_back() -> None:
    evicted = queueing.gate(
        wl(("Admitted", "True", "x"), ("Evicted", "True", "Preempted"), admitted_to="a100"), FLAVORS
    )
    status = {"phase": "Running", "attempt": 0, "restarts": 1}
    p = plan(body(status), SPEC, running(0), HEALTH, NOW, queue=evicted)
    assert {d.name for d in p.delete} == {"job-a0-0", "job-a0-1"} and not any(d.force for d in p.delete)
    assert p.status.phase == "Queued" and p.status.attempt == 1
    assert p.status.restarts == 1 and p.status.node_failures == 0, "not a failure, not a restart"
    assert p.workload_write is None, "the quota is held until the pods are gone"
    gone = plan(body(p.status.wire()), SPEC, [], HEALTH, NOW, queue=evicted)
    assert gone.workload_write == "requeue" and gone.create == []
    patch = queueing.requeue_status(wl(("Admitted", "True", "x"), ("Evicted", "True", "Preempted")), "t")
    assert patch["status"]["admission"] is None
    conds = {c["type"]: c for c in patch["status"]["conditions"]}
    assert conds["QuotaReserved"]["status"] == "False" and conds["Requeued"]["status"] == "True"
    assert conds["Evicted"]["status"] == "True", "Kueue's own condition is left for Kueue"


def test_a_finished_job_marks_its_workload_finished_once() -> None:
    gate = queueing.gate(
        wl(("QuotaReserved", "True", "x"), ("Admitted", "True", "x"), admitted_to="a100"), FLAVORS
    )
    pods = running(0)
    for pod in pods:
        pod["status"] = {"phase": "Succeeded"}
    p = plan(body({"phase": "Running"}), SPEC, pods, HEALTH, NOW, queue=gate)
    assert p.status.phase == "Succeeded" and p.workload_write == "finished"
    done = queueing.gate(
        wl(("Admitted", "True", "x"), ("Finished", "True", "Succeeded"), admitted_to="a100"), FLAVORS
    )
    assert plan(body(p.status.wire()), SPEC, pods, HEALTH, NOW, queue=done).workload_write is None


def test_a_job_in_no_queue_behaves_as_before() -> None:
    p = plan(body(), SPEC, [], HEALTH, NOW, queue=None)
    assert len(p.create) == 2 and not p.create_workload and p.status.phase == "Pending"


def test_a_suspended_job_gives_its_quota_back_and_queues_again_when_resumed() -> None:
    spec = TrainingJobSpec(nodes=2, gpusPerNode=4, procPerNode=4, suspend=True)
    admitted = queueing.gate(
        wl(("QuotaReserved", "True", "x"), ("Admitted", "True", "x"), admitted_to="a100"), FLAVORS
    )
    p = plan(body({"phase": "Running"}), spec, running(0), HEALTH, NOW, queue=admitted)
    assert p.status.phase == "Suspended" and len(p.delete) == 2
    assert p.workload_active is False, "deactivated: Kueue evicts it and frees the quota"
    inactive = {**wl(("Admitted", "True", "x"), ("Evicted", "True", "InactiveWorkload"), admitted_to="a100")}
    inactive["spec"] = {"active": False}
    gone = plan(body(p.status.wire()), spec, [], HEALTH, NOW, queue=queueing.gate(inactive, FLAVORS))
    assert gone.workload_write == "requeue" and gone.workload_active is None
    resumed = TrainingJobSpec(nodes=2, gpusPerNode=4, procPerNode=4)
    queued = {**wl(("QuotaReserved", "False", "Pending")), "spec": {"active": False}}
    back = plan(body(gone.status.wire()), resumed, [], HEALTH, NOW, queue=queueing.gate(queued, FLAVORS))
    back = plan(body(back.status.wire()), resumed, [], HEALTH, NOW, queue=queueing.gate(queued, FLAVORS))
    assert back.workload_active is True and back.create == [] and back.status.phase == "Queued"


def test_the_workload_counts_standby_spares_they_hold_gpus_too() -> None:
    spared = SPEC.model_copy(
        update={
            "failure_policy": SPEC.failure_policy.model_copy(
                update={"node_failure": "ReplaceNode", "spare_nodes": 1}
            )
        }
    )
    (podset,) = queueing.workload(OWNER, spared, "gpu-queue", None)["spec"]["podSets"]
    assert podset["count"] == SPEC.nodes + 1
