"""The TrainingJob state machine without a cluster: given the world, what does the operator do next?"""

from __future__ import annotations

import datetime as dt
import json

from aidc_operator import gang_pods as gp
from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import Owner
from aidc_operator.handlers.trainingjob import status_write_due
from aidc_operator.lifecycle import Prerequisites
from aidc_operator.lifecycle import plan as plan_with_health
from aidc_operator.progress import short_duration
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


# --- status that tells the truth: GPU time, energy, evaluation, ETA, finished jobs -----------------

TRACEBACK = "\n".join(
    ["Traceback (most recent call last):"]
    + [f'  File "/app/train.py", line {n}, in step_{n}\n    loss = model(batch).sum()' for n in range(20)]
    + [
        "ValueError: mat1 and mat2 shapes cannot be multiplied (64x10 and 12x64)",
        "[2026-11-26 11:59:58,000] torch.distributed.elastic.multiprocessing.api: [ERROR] failed",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        "=" * 60,
    ]
)


def report(pod: dict, **fields: object) -> dict:
    """rank 0's progress annotation, as the trainer patches it (docs/contracts.md)."""
    pod["metadata"].setdefault("annotations", {})["aidc.dev/progress"] = json.dumps(fields)
    return pod


def exited(pod: dict, code: int, message: str = "", finished: str = "2026-11-26T11:59:59Z") -> dict:
    phase = "Succeeded" if code == 0 else "Failed"
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": finished}
    pod["status"] = {
        **pod["status"],
        "phase": phase,
        "conditions": [],
        "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {**terminated, "message": message}}}
        ],
    }
    return pod


def test_gpu_seconds_count_each_pod_from_its_start_to_its_end_or_now() -> None:
    pods = running(TrainingJobSpec(nodes=3), 0, ["n0", "n1", "n2"])  # all started 11:00
    exited(pods[1], 0, finished="2026-11-26T11:30:00Z")
    pods[2]["status"].pop("startTime")  # never started: no GPU time
    assert gp.gpu_seconds(pods, 2, NOW) == 2 * 3600 + 2 * 1800
    assert gp.gpu_seconds(pods, 0, NOW) == 0, "a CPU job uses no GPU time"


def test_gpu_seconds_add_finished_attempts_to_the_running_one_across_a_restart() -> None:
    spec = TrainingJobSpec(nodes=2, failurePolicy={"backoffSeconds": 0})
    pods = running(spec, 0, ["n0", "n1"])
    exited(pods[0], 137, finished="2026-11-26T11:30:00Z")  # OOM at 11:30; rank 1 ran until now (12:00)
    p = plan(body({"phase": "Running"}), spec, pods, NODES, NOW)
    assert p.status.phase == "Restarting"
    assert p.status.gpu_seconds == p.status.gpu_seconds_previous == 1800 + 3600
    later = NOW + dt.timedelta(minutes=10)
    new = running(spec, 1, ["n2", "n3"])
    for pod in new:
        pod["status"]["startTime"] = "2026-11-26T12:00:00Z"
    p2 = plan(body(p.status.wire()), spec, new, NODES, later)
    assert p2.status.phase == "Running"
    assert p2.status.gpu_seconds == 5400 + 2 * 600 and p2.status.gpu_seconds_previous == 5400


def test_progress_report_gives_evaluation_eta_and_energy() -> None:
    spec = TrainingJobSpec(nodes=2)
    pods = running(spec, 0, ["n0", "n1"])
    report(
        pods[0],
        step=500,
        totalSteps=1000,
        time="2026-11-26T11:59:50Z",
        stepsPerSecond=2.0,
        gpuSeconds=7200.0,
        evaluation={"step": 400, "loss": 0.31, "accuracy": 0.91, "f1": 0.88},
        energyJoules=123456.7,
        energySource="nvml",
        energyGpus=2,
    )
    st = plan(body({"phase": "Running"}), spec, pods, NODES, NOW).status
    assert st.progress.step == 500 and st.progress.eta == "4m10s"
    assert st.progress.estimated_completion_time == "2026-11-26T12:04:00Z"
    assert (st.evaluation.step, st.evaluation.accuracy, st.evaluation.f1) == (400, 0.91, 0.88)
    assert st.energy_joules == 123456.7 and st.energy == "NVML on 2 GPU(s)"
    # A report without rate or total says nothing about time left; no evaluation yet keeps none.
    report(pods[0], step=10, time="2026-11-26T11:59:50Z")
    st = plan(body({"phase": "Running"}), spec, pods, NODES, NOW).status
    assert st.progress.eta is None and st.evaluation is None


def test_energy_on_cpu_only_nodes_is_not_measured_never_zero() -> None:
    spec = TrainingJobSpec(nodes=1, gpusPerNode=0)
    pods = report(
        running(spec, 0, ["n0"])[0],
        step=5,
        totalSteps=10,
        energyJoules=None,
        energySource="unavailable: no GPU",
        energyGpus=0,
    )
    st = plan(body({"phase": "Running"}), spec, [pods], NODES, NOW).status
    assert st.energy_joules is None and st.energy == "not measured: no GPU"
    assert "energyJoules" not in st.wire()


def test_energy_adds_up_across_attempts_without_counting_the_old_gang_twice() -> None:
    spec = TrainingJobSpec(nodes=2, failurePolicy={"backoffSeconds": 0})
    pods = running(spec, 0, ["n0", "n1"])
    report(pods[0], step=50, totalSteps=100, energyJoules=1000.0, energySource="nvml", energyGpus=2)
    exited(pods[1], 137)
    p = plan(body({"phase": "Running"}), spec, pods, NODES, NOW)
    assert p.status.attempt == 1 and p.status.energy_joules == p.status.energy_joules_previous == 1000.0
    # The old gang is still terminating (its report still on rank 0) while the new one reports.
    new = running(spec, 1, ["n2", "n3"])
    report(new[0], step=60, totalSteps=100, energyJoules=250.0, energySource="nvml", energyGpus=2)
    p2 = plan(body(p.status.wire()), spec, new, NODES, NOW + dt.timedelta(minutes=1))
    assert p2.status.energy_joules == 1250.0
    # The new rank 0's pod vanishes: what it reported stays counted.
    p3 = plan(body(p2.status.wire()), spec, new[1:], NODES, NOW + dt.timedelta(minutes=2))
    assert p3.status.energy_joules == 1250.0


def test_phase_stays_running_while_ranks_finish_one_by_one() -> None:
    spec = TrainingJobSpec(nodes=3)
    pods = running(spec, 0, ["n0", "n1", "n2"])
    report(pods[0], step=99, totalSteps=100, stepsPerSecond=1.0)
    exited(pods[2], 0)
    st = body({"phase": "Running", "attempt": 0, "nodes": "3/3"})
    p = plan(st, spec, pods, NODES, NOW)
    assert p.status.phase == "Running", "a rank that exited 0 is not a gang going back to Pending"
    assert not [e for e in p.events if e.reason != "Running"]
    exited(pods[1], 0)
    p = plan(body(p.status.wire()), spec, pods, NODES, NOW)
    assert p.status.phase == "Running"
    exited(pods[0], 0)
    report(pods[0], step=100, totalSteps=100, stepsPerSecond=1.0)
    p = plan(body(p.status.wire()), spec, pods, NODES, NOW)
    assert p.status.phase == "Succeeded"
    assert p.status.nodes == "3/3", "NODES of a finished job: pods that exited 0 / gang size"
    assert p.status.progress.step == 100 and p.status.progress.eta is None
    # Later passes over the finished job keep it so.
    again = plan(body(p.status.wire()), spec, pods, NODES, NOW + dt.timedelta(minutes=1)).status
    assert again.nodes == "3/3" and again.progress.eta is None


def test_failed_job_nodes_column_is_not_a_stale_ready_count() -> None:
    spec = TrainingJobSpec(nodes=2)
    pods = running(spec, 0, ["n0", "n1"])
    exited(pods[0], 1, message="boom")
    p = plan(body({"phase": "Running", "nodes": "2/2", "readyNodes": 2}), spec, pods, NODES, NOW)
    assert p.status.phase == "Failed"
    assert p.status.nodes == "0/2" and p.status.ready_nodes == 0


def test_a_traceback_never_lands_in_a_condition_or_event() -> None:
    assert len(TRACEBACK) > 1500
    spec = TrainingJobSpec(nodes=2)
    pods = running(spec, 0, ["n0", "n1"])
    exited(pods[1], 1, message=TRACEBACK)
    p = plan(body({"phase": "Running"}), spec, pods, NODES, NOW)
    failed = next(c for c in p.status.conditions if c.type == "Failed")
    assert failed.reason == "NonRetryableExit"
    for text in [failed.message, p.status.last_failure.message] + [e.message for e in p.events]:
        assert "\n" not in text and "Traceback" not in text and len(text) <= 400, text
    assert "ValueError: mat1 and mat2 shapes cannot be multiplied" in failed.message
    assert "job-a0-1" in failed.message and "code 1" in failed.message


def test_address_in_use_is_a_retryable_port_clash() -> None:
    clash = (
        "torch.distributed.DistNetworkError: The server socket has failed to listen on any local network "
        "address. port: 29500, useIPv6: False, code: -98, name: EADDRINUSE, message: address already in use"
    )
    spec = TrainingJobSpec(nodes=1)
    pods = running(spec, 0, ["n0"])
    exited(pods[0], 1, message=f"{TRACEBACK}\n{clash}")
    p = plan(body({"phase": "Running"}), spec, pods, NODES, NOW)
    assert p.status.phase == "Restarting" and p.status.restarts == 1
    assert p.status.last_failure.reason == "AddressInUse" and "EADDRINUSE" in p.status.last_failure.message


def test_ticking_report_figures_do_not_write_status_per_report() -> None:
    old = {"phase": "Running", "progress": {"step": 1}, "evaluation": None, "energyJoules": 10.0}
    new = {**old, "progress": {"step": 2, "eta": "1m"}, "evaluation": {"accuracy": 0.5}, "energyJoules": 20.0}
    assert status_write_due(old, new, 100.0, 110.0) == (False, 20.0)
    assert status_write_due(old, new, 100.0, 131.0) == (True, None)
    assert status_write_due(old, {**new, "energy": "NVML on 1 GPU(s)"}, 100.0, 101.0) == (True, None)


def test_eta_reads_like_kubectl_ages() -> None:
    assert [short_duration(s) for s in (0, 0.2, 45, 250, 3600, 7500, 90061)] == [
        "0s",
        "1s",
        "45s",
        "4m10s",
        "1h",
        "2h5m",
        "1d1h",
    ]
