"""All-or-nothing placement without a queueing system, preemption, and the deadline of a Pending job."""

from __future__ import annotations

import datetime as dt

from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import Owner
from aidc_operator.lifecycle import plan
from aidc_operator.recovery import NodeHealth

NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
OWNER = Owner("TrainingJob", "job", "ns", "uid-1")
HEALTH = {n: NodeHealth(n, True) for n in ("n0", "n1", "n2")}
WORDS = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def body(status: dict) -> dict:
    meta = {"name": "job", "namespace": "ns", "uid": "uid-1", "generation": 1}
    return {"kind": "TrainingJob", "metadata": meta, "status": status}


def partial_gang(spec: TrainingJobSpec, created_ago: float, placed: int, attempt: int = 0) -> list[dict]:
    """A gang created `created_ago` seconds ago; the first `placed` pods run, the rest are Pending."""
    created = (NOW - dt.timedelta(seconds=created_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    pods = build.gang(OWNER, spec, attempt)
    for rank, pod in enumerate(pods):
        pod["metadata"]["creationTimestamp"] = created
        if rank < placed:
            pod["spec"]["nodeName"] = f"n{rank}"
            pod["status"] = {"phase": "Running"}
        else:
            cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": WORDS}
            pod["status"] = {"phase": "Pending", "conditions": [cond]}
    return pods


SPEC = TrainingJobSpec(nodes=3, scheduling={"timeoutSeconds": 300, "backoffSeconds": 30, "maxRetries": 1})


def test_a_partial_gang_waits_for_the_timeout_with_the_schedulers_words() -> None:
    p = plan(body({"phase": "Pending", "attempt": 0}), SPEC, partial_gang(SPEC, 100, placed=2), HEALTH, NOW)
    assert p.delete == [] and p.status.attempt == 0
    cond = next(c for c in p.status.conditions if c.type == "Unschedulable")
    assert cond.status == "True" and WORDS in cond.message
    assert p.requeue_after <= 200, "woken when the timeout is due, not at the next resync"


def test_a_partial_gang_past_the_timeout_releases_its_gpus_and_backs_off() -> None:
    pods = partial_gang(SPEC, 301, placed=2)
    p = plan(body({"phase": "Pending", "attempt": 0}), SPEC, pods, HEALTH, NOW)
    assert {d.name for d in p.delete} == {pod["metadata"]["name"] for pod in pods}, "placed pods go too"
    assert p.status.attempt == 1 and p.status.scheduling_retries == 1
    assert p.status.restarts == 0 and p.status.node_failures == 0, "its own budget"
    assert p.status.phase == "Pending" and p.status.restart_after >= "2026-11-26T12:00:30Z"
    cond = next(c for c in p.status.conditions if c.type == "Unschedulable")
    assert cond.reason == "SchedulingTimeout" and WORDS in cond.message
    assert [e.reason for e in p.events] == ["SchedulingTimeout"]
    # While backing off, the old pods go and nothing new is created.
    backing_off = plan(body(p.status.wire()), SPEC, [], HEALTH, NOW + dt.timedelta(seconds=5))
    assert backing_off.create == []
    later = plan(body(p.status.wire()), SPEC, [], HEALTH, NOW + dt.timedelta(seconds=32))
    assert len(later.create) == 3 and all("-a1-" in c["metadata"]["name"] for c in later.create)

    # The budget spent: the next timeout fails the job, in the scheduler's words.
    again = plan(body(later.status.wire()), SPEC, partial_gang(SPEC, 301, placed=1, attempt=1), HEALTH, NOW)
    assert again.status.phase == "Failed"
    failed = next(c for c in again.status.conditions if c.type == "Failed")
    assert failed.reason == "Unschedulable" and "maxRetries=1" in failed.message


def test_a_whole_gang_is_never_timed_out() -> None:
    pods = partial_gang(SPEC, 1000, placed=3)
    p = plan(body({"phase": "Pending", "attempt": 0}), SPEC, pods, HEALTH, NOW)
    assert p.delete == [] and p.status.phase == "Running" and p.status.scheduling_retries == 0


def test_timeout_zero_waits_forever() -> None:
    spec = TrainingJobSpec(nodes=3, scheduling={"timeoutSeconds": 0})
    p = plan(
        body({"phase": "Pending", "attempt": 0}), spec, partial_gang(spec, 10_000, placed=1), HEALTH, NOW
    )
    assert p.delete == [] and p.status.attempt == 0


def test_preemption_by_the_scheduler_is_neither_a_node_failure_nor_a_restart() -> None:
    spec = TrainingJobSpec(nodes=3, failurePolicy={"maxRestarts": 0, "maxNodeFailures": 0})
    pods = partial_gang(spec, 10, placed=3)
    pods[1]["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": "by p"}
    ]
    p = plan(body({"phase": "Running", "attempt": 0}), spec, pods, HEALTH, NOW)
    assert p.status.phase == "Restarting" and p.status.attempt == 1, "restarts though both budgets are 0"
    assert p.status.preemptions == 1 and p.status.node_failures == 0 and p.status.restarts == 0
    assert p.status.excluded_nodes == [] and p.status.last_failure.reason == "Preempted"
    assert p.events[0].reason == "Preempted"


def test_the_deadline_counts_from_the_first_gang_pending_included() -> None:
    spec = TrainingJobSpec(nodes=3, activeDeadlineSeconds=600, scheduling={"timeoutSeconds": 0})
    first = plan(body({}), spec, [], HEALTH, NOW)
    assert first.status.start_time == "2026-11-26T12:00:00Z" and len(first.create) == 3
    stuck = partial_gang(spec, 601, placed=0)
    p = plan(body(first.status.wire()), spec, stuck, HEALTH, NOW + dt.timedelta(seconds=601))
    assert p.status.phase == "Failed"
    assert next(c for c in p.status.conditions if c.type == "Failed").reason == "DeadlineExceeded"
