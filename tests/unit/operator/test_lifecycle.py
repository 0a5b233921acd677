"""The TrainingJob state machine without a cluster: given the world, what does the operator do next?"""

from __future__ import annotations

import datetime as dt

from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import Owner
from aidc_operator.lifecycle import Prerequisites
from aidc_operator.lifecycle import plan as plan_with_health
from aidc_operator.recovery import assess

NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
OWNER = Owner("TrainingJob", "job", "ns", "uid-1")


def body(status: dict | None = None, generation: int = 1) -> dict:
    return {
        "kind": "TrainingJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "uid-1", "generation": generation},
        "status": status or {},
    }


def node(name: str, ready: str = "True") -> dict:
    return {
        "metadata": {"name": name},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": ready}]},
    }


NODES = {f"n{i}": node(f"n{i}") for i in range(4)}


def plan(
    body: dict, spec: TrainingJobSpec, pods: list[dict], nodes: dict, now: dt.datetime, *args: Prerequisites
):
    """The planner as the cache feeds it: node health assessed from the nodes shown."""
    return plan_with_health(body, spec, pods, assess(nodes), now, *args)


def running(spec: TrainingJobSpec, attempt: int, nodes: list[str]) -> list[dict]:
    pods = build.gang(OWNER, spec, attempt)
    for p, n in zip(pods, nodes, strict=True):
        p["spec"]["nodeName"] = n
        p["status"] = {
            "phase": "Running",
            "startTime": "2026-11-26T11:00:00Z",
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    return pods


def test_first_pass_creates_the_whole_gang_and_is_idempotent() -> None:
    spec = TrainingJobSpec(nodes=3)
    p = plan(body(), spec, [], NODES, NOW)
    assert [x["metadata"]["name"] for x in p.create] == ["job-a0-0", "job-a0-1", "job-a0-2"]
    assert p.status.phase == "Pending" and p.status.nodes == "0/3"
    # Same world, same answer: the pods exist now, nothing more is created.
    p2 = plan(body(p.status.wire()), spec, running(spec, 0, ["n0", "n1", "n2"]), NODES, NOW)
    assert p2.create == [] and p2.delete == []
    assert p2.status.phase == "Running" and p2.status.nodes == "3/3"


def test_lost_node_bumps_attempt_deletes_gang_and_avoids_the_node() -> None:
    spec = TrainingJobSpec(nodes=2)
    pods = running(spec, 0, ["n0", "n1"])
    nodes = {**NODES, "n1": node("n1", "Unknown")}
    p = plan(body({"phase": "Running", "attempt": 0}), spec, pods, nodes, NOW)
    assert p.status.attempt == 1 and p.status.node_failures == 1 and p.status.restarts == 0
    assert {(d.name, d.force) for d in p.delete} == {("job-a0-0", False), ("job-a0-1", True)}
    assert p.create == [], "no new pod while the old attempt still exists"
    assert p.status.excluded_nodes == ["n1"] and p.status.last_failure.node == "n1"
    # Next pass: old pods still terminating → still nothing created.
    p2 = plan(body(p.status.wire()), spec, pods, nodes, NOW)
    assert p2.create == []
    # Old pods gone → the new gang, kept off n1.
    p3 = plan(body(p.status.wire()), spec, [], nodes, NOW)
    assert [x["metadata"]["name"] for x in p3.create] == ["job-a1-0", "job-a1-1"]
    term = p3.create[0]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]} in (
        term["nodeSelectorTerms"][0]["matchExpressions"]
    )


def test_node_failure_budget_and_fail_policy() -> None:
    spec = TrainingJobSpec(nodes=1, failurePolicy={"maxNodeFailures": 1})
    pods = running(spec, 0, ["n0"])
    nodes = {**NODES, "n0": node("n0", "Unknown")}
    p = plan(body({"phase": "Running", "nodeFailures": 1}), spec, pods, nodes, NOW)
    assert p.status.phase == "Failed"
    assert p.status.conditions[-1].reason == "NodeFailureBudgetExceeded"
    spec = TrainingJobSpec(nodes=1, failurePolicy={"nodeFailure": "Fail"})
    assert plan(body({"phase": "Running"}), spec, pods, nodes, NOW).status.phase == "Failed"


def test_backoff_waits_before_the_next_attempt() -> None:
    spec = TrainingJobSpec(nodes=1, failurePolicy={"backoffSeconds": 30})
    pods = running(spec, 0, ["n0"])
    pods[0]["status"] = {
        "phase": "Failed",
        "containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}],
    }
    p = plan(body({"phase": "Running"}), spec, pods, NODES, NOW)
    assert p.status.restarts == 1 and p.status.phase == "Restarting"
    assert p.status.restart_after == "2026-11-26T12:00:30Z"
    early = plan(body(p.status.wire()), spec, [], NODES, NOW + dt.timedelta(seconds=10))
    assert early.create == [] and 19 <= early.requeue_after <= 20
    later = plan(body(p.status.wire()), spec, [], NODES, NOW + dt.timedelta(seconds=31))
    assert [x["metadata"]["name"] for x in later.create] == ["job-a1-0"]


def test_waiting_prerequisite_creates_nothing() -> None:
    p = plan(
        body(),
        TrainingJobSpec(),
        [],
        NODES,
        NOW,
        Prerequisites(False, "CheckpointKeyReady", "KeySecretMissing", "Secret 'k' not found"),
    )
    assert p.create == [] and p.status.phase == "Pending"
    cond = p.status.conditions[0]
    assert (cond.type, cond.status, cond.reason) == ("CheckpointKeyReady", "False", "KeySecretMissing")


def test_elastic_job_runs_smaller_when_nodes_are_missing() -> None:
    spec = TrainingJobSpec(nodes=4, elastic={"minNodes": 2, "maxNodes": 4})
    nodes = {"n0": NODES["n0"], "n1": NODES["n1"], "n2": node("n2", "Unknown")}
    p = plan(body(), spec, [], nodes, NOW)
    assert len(p.create) == 2
    assert p.status.nodes == "0/2"


def test_ttl_deletes_the_finished_job() -> None:
    spec = TrainingJobSpec(ttlSecondsAfterFinished=60)
    done = body({"phase": "Succeeded", "completionTime": "2026-11-26T11:58:00Z"})
    assert plan(done, spec, [], NODES, NOW).delete_job
    done = body({"phase": "Succeeded", "completionTime": "2026-11-26T11:59:30Z"})
    p = plan(done, spec, [], NODES, NOW)
    assert not p.delete_job and p.requeue_after == 30


def test_active_deadline_fails_the_job_and_cleans_up() -> None:
    spec = TrainingJobSpec(nodes=2, activeDeadlineSeconds=600)
    pods = running(spec, 0, ["n0", "n1"])
    within = body({"phase": "Running", "startTime": "2026-11-26T11:55:00Z"})
    assert plan(within, spec, pods, NODES, NOW).status.phase == "Running"
    over = body({"phase": "Running", "startTime": "2026-11-26T11:40:00Z"})
    p = plan(over, spec, pods, NODES, NOW)
    assert p.status.phase == "Failed"
    failed = next(c for c in p.status.conditions if c.type == "Failed")
    assert failed.reason == "DeadlineExceeded" and "600" in failed.message
    assert {d.name for d in p.delete} == {"job-a0-0", "job-a0-1"}


def test_clean_pod_policy_decides_what_a_finished_job_keeps() -> None:
    def finish(policy: str) -> set[str]:
        spec = TrainingJobSpec(nodes=2, cleanPodPolicy=policy)
        pods = running(spec, 0, ["n0", "n1"])
        pods[0]["status"] = {
            "phase": "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "boom"}}}
            ],
        }
        return {d.name for d in plan(body({"phase": "Running"}), spec, pods, NODES, NOW).delete}

    assert finish("None") == set()
    assert finish("Running") == {"job-a0-1"}  # the failed pod stays for its logs
    assert finish("All") == {"job-a0-0", "job-a0-1"}


def test_suspend_deletes_the_gang_and_keeps_counters() -> None:
    spec = TrainingJobSpec(nodes=2, suspend=True)
    p = plan(
        body({"phase": "Running", "restarts": 2, "startTime": "2026-11-26T11:00:00Z"}),
        spec,
        running(spec, 0, ["n0", "n1"]),
        NODES,
        NOW,
    )
    assert p.status.phase == "Suspended" and p.status.restarts == 2 and p.status.start_time
    assert len(p.delete) == 2 and p.create == []
