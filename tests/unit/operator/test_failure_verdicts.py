"""What a failing attempt costs: every exit classified, the most severe class wins, and a "lost a peer"
exit waits for the verdict on the gang's nodes so a power cut is a node failure, not a pod failure."""

from __future__ import annotations

import datetime as dt
import itertools
import json

import pytest

from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import Owner
from aidc_operator.lifecycle import plan
from aidc_operator.recovery import LostPod, NodeHealth
from aidc_operator.restart_policy import PodExit, terminated
from aidc_operator.verdict import judge

NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
OWNER = Owner("TrainingJob", "job", "ns", "uid-1")
NODES = ["n0", "n1", "n2"]


def alive(renewed_ago: float = 1.0, lease: float = 10.0) -> dict[str, NodeHealth]:
    return {n: NodeHealth(n, True, "", renewed_ago, lease) for n in NODES}


def report(cause: str, code: int, rank: int, **extra: object) -> str:
    return json.dumps(
        {"cause": cause, "exitCode": code, "rank": rank, "message": f"{cause} on rank {rank}", **extra}
    )


def gang(spec: TrainingJobSpec, exits: dict[int, tuple[int, str]]) -> list[dict]:
    """The attempt-0 gang on n0..n2, Running except the ranks in exits (rank → (container code, message))."""
    pods = build.gang(OWNER, spec, 0)
    for rank, pod in enumerate(pods):
        pod["spec"]["nodeName"] = NODES[rank]
        pod["status"] = {"phase": "Running", "startTime": "2026-11-26T11:00:00Z"}
        if rank in exits:
            code, message = exits[rank]
            pod["status"] = {
                "phase": "Failed",
                "startTime": "2026-11-26T11:00:00Z",
                "containerStatuses": [
                    {"name": "trainer", "state": {"terminated": {"exitCode": code, "message": message}}}
                ],
            }
    return pods


def body(status: dict) -> dict:
    meta = {"name": "job", "namespace": "ns", "uid": "uid-1", "generation": 1}
    return {"kind": "TrainingJob", "metadata": meta, "status": {"phase": "Running", **status}}


STRICT = TrainingJobSpec(nodes=3, failurePolicy={"maxRestarts": 0, "backoffSeconds": 10})


# ------------------------------------------------------------------------------ the classification table

EXITS = {
    "peer-lost": PodExit("p", "n0", 5, "Error", "", "PeerLost", 0, True),
    "signal": PodExit("p", "n0", 137, "Error", ""),
    "save-failed": PodExit("p", "n0", 6, "Error", "", "CheckpointSaveFailed", 0),
    "bug": PodExit("p", "n0", 1, "Error", ""),
    "no-valid-checkpoint": PodExit("p", "n0", 7, "Error", "", "NoValidCheckpoint", 0),
}
CLASS = {"peer-lost": 0, "signal": 1, "save-failed": 1, "bug": 3, "no-valid-checkpoint": 3}
LOST = [LostPod("job-a0-2", "n2", "NodeLeaseExpired", "pod job-a0-2 was on node n2 (NodeLeaseExpired)")]


@pytest.mark.parametrize("a,b", list(itertools.product(EXITS, repeat=2)))
@pytest.mark.parametrize("node_lost", [False, True])
def test_every_pair_of_exits_with_and_without_a_lost_node(a: str, b: str, node_lost: bool) -> None:
    pods = gang(STRICT, {})
    v = judge(pods, [EXITS[a], EXITS[b]], LOST if node_lost else [], alive(), [], held_for=None)
    worst = max(CLASS[a], CLASS[b])
    if worst == 3:
        assert v.kind == "fail", "a non-retryable exit wins over everything, a lost node included"
        assert v.exit is not None and CLASS[next(k for k, e in EXITS.items() if e == v.exit)] == 3
    elif node_lost:
        assert v.kind == "node" and v.lost == LOST
    elif worst == 1:
        assert v.kind == "retry"
    else:
        assert v.kind == "hold", "only 'lost a peer': wait for the nodes' verdict"


def test_a_held_exit_is_decided_once_every_node_renewed_or_the_window_passed() -> None:
    pods, exits = gang(STRICT, {}), [EXITS["peer-lost"]]
    # Held for 3 s; one node last renewed 5 s ago (before the hold): not judged yet.
    health = {**alive(renewed_ago=1.0), "n2": NodeHealth("n2", True, "", 5.0, 10.0)}
    assert judge(pods, exits, [], health, [], held_for=3.0).kind == "hold"
    # Every node seen renewed after the hold began: nobody died, the exit's own code decides (5: retry).
    assert judge(pods, exits, [], alive(renewed_ago=1.0), [], held_for=3.0).kind == "retry"
    # No Lease to judge by: the verdict waits out the window (default Lease duration + margin), no more.
    no_leases = {n: NodeHealth(n, True) for n in NODES}
    assert judge(pods, exits, [], no_leases, [], held_for=44.0).kind == "hold"
    assert judge(pods, exits, [], no_leases, [], held_for=46.0).kind == "retry"


# ------------------------------------------------------------------------------ the planner applies it


def test_a_power_cut_is_a_node_failure_even_when_survivors_exit_first() -> None:
    """The scenario that failed jobs: maxRestarts 0, the node under rank 2 loses power, ranks 0 and 1
    exit 'lost a peer' seconds before its Lease lapses."""
    pods = gang(STRICT, {0: (1, report("PeerLost", 5, 0)), 1: (1, report("PeerLost", 5, 1))})
    p1 = plan(body({"attempt": 0}), STRICT, pods, alive(renewed_ago=4.0), NOW)
    assert p1.status.phase == "Running" and p1.status.attempt == 0, "held, not counted"
    assert p1.status.restarts == 0 and p1.delete == [] and p1.status.peer_lost_since
    assert [e.reason for e in p1.events] == ["PeerLost"] and "rank 0" in p1.events[0].message
    assert p1.requeue_after <= 1.0

    # 2 s later n0, n1 renewed; n2 did not. Still waiting (n2 is not judged), and no second Event.
    later = NOW + dt.timedelta(seconds=2)
    health = {**alive(renewed_ago=0.5), "n2": NodeHealth("n2", True, "", 6.0, 10.0)}
    p2 = plan(body(p1.status.wire()), STRICT, pods, health, later)
    assert p2.status.attempt == 0 and p2.events == []

    # n2's Lease lapses: a node failure — its budget, no backoff, the node excluded, restarts untouched.
    lapsed = {**health, "n2": NodeHealth("n2", False, "NodeLeaseExpired", 11.0, 10.0)}
    p3 = plan(body(p2.status.wire()), STRICT, pods, lapsed, later + dt.timedelta(seconds=5))
    assert p3.status.phase == "Restarting" and p3.status.attempt == 1
    assert p3.status.node_failures == 1 and p3.status.restarts == 0 and p3.status.restart_after is None
    assert p3.status.excluded_nodes == ["n2"] and p3.status.last_failure.node == "n2"
    assert p3.status.peer_lost_since is None
    assert "exited after it" in p3.status.last_failure.message


def test_a_peer_lost_exit_with_every_node_alive_spends_a_restart() -> None:
    spec = TrainingJobSpec(nodes=3, failurePolicy={"maxRestarts": 2, "backoffSeconds": 10})
    pods = gang(spec, {1: (1, report("PeerLost", 5, 1))})
    held = plan(body({"attempt": 0}), spec, pods, alive(renewed_ago=4.0), NOW).status
    p = plan(body(held.wire()), spec, pods, alive(renewed_ago=0.5), NOW + dt.timedelta(seconds=3))
    assert p.status.restarts == 1 and p.status.node_failures == 0 and p.status.restart_after
    assert p.status.last_failure.reason == "PeerLost"


def test_a_real_bug_is_not_retried_even_when_another_rank_lost_its_peer() -> None:
    spec = TrainingJobSpec(nodes=3, failurePolicy={"maxRestarts": 5})
    pods = gang(spec, {0: (1, report("PeerLost", 5, 0)), 1: (1, report("Error", 1, 1))})
    p = plan(body({"attempt": 0}), spec, pods, alive(), NOW)
    assert p.status.phase == "Failed" and p.status.restarts == 0
    failed = next(c for c in p.status.conditions if c.type == "Failed")
    assert failed.reason == "NonRetryableExit"
    assert "job-a0-1" in failed.message and "rank 1" in failed.message and "node n1" in failed.message


def test_no_valid_checkpoint_fails_with_a_condition_naming_the_files() -> None:
    files = [
        {"path": "step-000000100", "reason": "manifest missing"},
        {"path": "step-000000200", "reason": "tag mismatch"},
    ]
    pods = gang(STRICT, {0: (1, report("NoValidCheckpoint", 7, 0, checkpoints=files))})
    p = plan(body({"attempt": 0}), STRICT, pods, alive(), NOW)
    assert p.status.phase == "Failed"
    cond = next(c for c in p.status.conditions if c.type == "NoValidCheckpoint")
    assert cond.status == "True" and "step-000000100: manifest missing" in cond.message
    assert "step-000000200: tag mismatch" in cond.message


def test_a_failed_final_save_restarts_and_says_which_checkpoint_is_newest() -> None:
    spec = TrainingJobSpec(nodes=3, failurePolicy={"maxRestarts": 1})
    pods = gang(spec, {0: (1, report("CheckpointSaveFailed", 6, 0))})
    status = {"attempt": 0, "lastCheckpoint": {"step": 300, "path": "/checkpoints/job/step-000000300"}}
    p = plan(body(status), spec, pods, alive(), NOW)
    assert p.status.phase == "Restarting" and p.status.restarts == 1
    assert "newest checkpoint: step 300" in p.status.last_failure.message


def test_several_reports_in_one_pod_the_most_severe_decides() -> None:
    message = "\n".join([report("PeerLost", 5, 0), report("InvalidConfig", 4, 1)])
    pods = gang(STRICT, {0: (1, message)})
    exit_ = terminated(pods[0])
    assert exit_ is not None and exit_.exit_code == 4 and exit_.rank == 1 and not exit_.peer_lost


def test_unschedulable_gang_gets_the_schedulers_words_and_clears_when_placed() -> None:
    spec = TrainingJobSpec(nodes=2, gpusPerNode=16)
    pods = build.gang(OWNER, spec, 0)
    words = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    for pod in pods:
        pod["status"] = {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": words}
            ],
        }
    p = plan(body({"attempt": 0, "phase": "Pending"}), spec, pods, alive(), NOW)
    cond = next(c for c in p.status.conditions if c.type == "Unschedulable")
    assert cond.status == "True" and words in cond.message and "2 of 2" in cond.message
    assert [e.reason for e in p.events] == ["Unschedulable"]
    again = plan(body(p.status.wire()), spec, pods, alive(), NOW)
    assert again.events == [], "one Event per episode, not per pass"
    for pod, node in zip(pods, NODES, strict=False):
        pod["spec"]["nodeName"] = node
        pod["status"] = {"phase": "Running"}
    placed = plan(body(again.status.wire()), spec, pods, alive(), NOW)
    assert next(c for c in placed.status.conditions if c.type == "Unschedulable").status == "False"
