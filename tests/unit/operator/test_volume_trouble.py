"""Why a pod that is not placed waits (volumes.py), from the scheduler's verdict and the cached claims,
and the TrainingJob condition and Event built on it: pure, with the clock passed in."""

from __future__ import annotations

import datetime as dt

from aidc_operator import volumes
from aidc_operator.api.trainingjob import TrainingJobStatus
from aidc_operator.conditions import get_condition
from aidc_operator.lifecycle import Plan

T0 = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC)
NOT_FOUND = '0/4 nodes are available: persistentvolumeclaim "nope" not found. not found'
UNBOUND = "0/4 nodes are available: pod has unbound immediate PersistentVolumeClaims. not found"
NO_GPU = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."


def pod(claim: str, verdict: tuple[str, str] | None = None, node: str | None = None, name: str = "j-a0-0"):
    conditions = []
    if verdict:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": verdict[0], "message": verdict[1]}
        )
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-11-30T12:00:00Z"},
        "spec": {
            "nodeName": node,
            "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": claim}}],
        },
        "status": {"phase": "Pending", "conditions": conditions},
    }


def pvc(name: str, phase: str, klass: str | None = None, provisioner: str | None = None) -> dict:
    annotations = {volumes.PROVISIONER: provisioner} if provisioner else {}
    spec = {"storageClassName": klass} if klass else {}
    return {"metadata": {"name": name, "annotations": annotations}, "spec": spec, "status": {"phase": phase}}


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_a_missing_claim_is_named_as_soon_as_the_scheduler_says_so() -> None:
    trouble, recheck = volumes.first_trouble(
        [pod("nope", ("Unschedulable", NOT_FOUND))], {"nope": None}, at(1)
    )
    assert trouble is not None and recheck is None
    assert trouble.reason == "VolumeNotFound"
    assert trouble.message.startswith("PersistentVolumeClaim 'nope' not found")


def test_an_unbound_claim_is_named_with_why_it_is_not_bound() -> None:
    claims = {"ckpt": pvc("ckpt", "Pending", klass="nothing")}
    trouble, _ = volumes.first_trouble([pod("ckpt", ("Unschedulable", UNBOUND))], claims, at(1))
    assert trouble is not None and trouble.reason == "VolumeNotBound"
    assert "PersistentVolumeClaim 'ckpt' is Pending" in trouble.message
    assert "nothing provisions StorageClass 'nothing'" in trouble.message
    assert UNBOUND in trouble.message  # the scheduler's own words ride along


def test_a_provisioner_that_never_answers_is_reported_after_the_grace() -> None:
    """WaitForFirstConsumer: the scheduler holds the pod, with no condition, while it waits for the
    provisioner; a few seconds of that is normal, half a minute is not."""
    claims = {"ckpt": pvc("ckpt", "Pending", klass="fast", provisioner="example.com/nobody")}
    trouble, recheck = volumes.first_trouble([pod("ckpt")], claims, at(5))
    assert trouble is None and recheck == volumes.GRACE_SECONDS - 5
    trouble, recheck = volumes.first_trouble([pod("ckpt")], claims, at(volumes.GRACE_SECONDS + 1))
    assert trouble is not None and recheck is None
    assert trouble.reason == "VolumeNotBound" and "provisioner 'example.com/nobody'" in trouble.message


def test_the_schedulers_other_words_win_over_a_claim_still_waiting_for_its_pod() -> None:
    """A WaitForFirstConsumer claim stays Pending until its pod has a node: no GPU fits is the cause."""
    claims = {"ckpt": pvc("ckpt", "Pending", klass="fast")}
    trouble, _ = volumes.first_trouble([pod("ckpt", ("Unschedulable", NO_GPU))], claims, at(60))
    assert trouble is not None and trouble.reason == "Unschedulable" and NO_GPU in trouble.message


def test_placed_pods_and_bound_claims_are_no_trouble() -> None:
    bound = {"ckpt": pvc("ckpt", "Bound")}
    assert volumes.first_trouble([pod("ckpt")], bound, at(600)) == (None, None)
    placed = pod("ckpt", node="gpu-node-0")
    assert volumes.first_trouble([placed], {"ckpt": None}, at(600)) == (None, None)


def job_plan(status: TrainingJobStatus | None = None) -> Plan:
    return Plan((status or TrainingJobStatus()).model_copy(deep=True), requeue_after=300)


def test_a_job_says_which_claim_keeps_its_pods_pending_once_with_an_event() -> None:
    claims = {"ckpt": pvc("ckpt", "Pending", klass="nothing")}
    waiting = [pod("ckpt", ("Unschedulable", UNBOUND))]
    first = job_plan()
    volumes.report_on_job(first, waiting, claims, at(2))
    cond = get_condition(first.status.conditions, volumes.CONDITION)
    assert cond is not None and (cond.status, cond.reason) == ("False", "VolumeNotBound")
    assert "'ckpt'" in cond.message
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "VolumeNotBound")]

    again = job_plan(first.status)  # the next pass, nothing changed: no second Event
    volumes.report_on_job(again, waiting, claims, at(3))
    assert again.events == []

    bound = job_plan(first.status)  # the claim bound, the pod placed
    volumes.report_on_job(bound, [pod("ckpt", node="gpu-node-0")], {"ckpt": pvc("ckpt", "Bound")}, at(9))
    cond = get_condition(bound.status.conditions, volumes.CONDITION)
    assert cond is not None and (cond.status, cond.reason) == ("True", "VolumeReady")


def test_a_job_looks_again_when_the_grace_for_a_pending_claim_ends() -> None:
    plan = job_plan()
    claims = {"ckpt": pvc("ckpt", "Pending", provisioner="example.com/nobody")}
    volumes.report_on_job(plan, [pod("ckpt")], claims, at(10))
    assert get_condition(plan.status.conditions, volumes.CONDITION) is None and plan.events == []
    assert plan.requeue_after == volumes.GRACE_SECONDS - 10 + 1
