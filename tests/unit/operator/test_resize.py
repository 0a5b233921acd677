"""A declared resize (spec.nodes or an elastic range edited while the gang runs), planned without a
cluster: a static gang keeps its size until its next start and says so; an elastic gang grows or shrinks
in place; neither is ever a node failure or a restart."""

from __future__ import annotations

import datetime as dt

from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import Owner
from aidc_operator.lifecycle import Plan
from aidc_operator.lifecycle import plan as plan_with_health
from aidc_operator.recovery import assess

NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
OWNER = Owner("TrainingJob", "job", "ns", "uid-1")
NODES = {
    f"n{i}": {
        "metadata": {"name": f"n{i}"},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    for i in range(4)
}
RUNNING = {"phase": "Running", "attempt": 0, "startTime": "2026-11-26T11:00:00Z", "nodes": "2/2"}


def body(status: dict) -> dict:
    return {
        "kind": "TrainingJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "uid-1", "generation": 2},
        "status": status,
    }


def gang(spec: TrainingJobSpec, attempt: int, size: int) -> list[dict]:
    """The pods of an attempt started from `spec` with `size` nodes, all Running and Ready."""
    pods = build.gang(OWNER, spec, attempt, nodes=size)
    for rank, p in enumerate(pods):
        p["metadata"]["creationTimestamp"] = "2026-11-26T11:00:00Z"
        p["spec"]["nodeName"] = f"n{rank}"
        p["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    return pods


def plan(status: dict, spec: TrainingJobSpec, pods: list[dict]) -> Plan:
    return plan_with_health(body(status), spec, pods, assess(NODES), NOW)


def condition(p: Plan, type_: str):
    return next((c for c in p.status.conditions if c.type == type_), None)


def reasons(p: Plan) -> list[str]:
    return [e.reason for e in p.events]


def no_failure(p: Plan) -> None:
    assert p.status.node_failures == 0 and p.status.restarts == 0 and p.status.attempt == 0
    assert p.status.last_failure is None
    assert not {"NodeFailure", "PodFailed", "Restarting"} & set(reasons(p))


def test_static_grow_is_pending_not_a_node_failure() -> None:
    pods = gang(TrainingJobSpec(nodes=2), 0, 2)
    p = plan(RUNNING, TrainingJobSpec(nodes=3), pods)
    no_failure(p)
    assert p.create == [] and p.delete == []
    assert p.status.phase == "Running" and p.status.nodes == "2/2"
    pending = condition(p, "ResizePending")
    assert (
        pending.status == "True"
        and "spec.nodes is 3" in pending.message
        and "has 2 node(s)" in pending.message
    )
    assert reasons(p).count("ResizePending") == 1
    # The next pass, same world: no second Event, still nothing done.
    p2 = plan(p.status.wire(), TrainingJobSpec(nodes=3), pods)
    assert "ResizePending" not in reasons(p2) and p2.create == [] and p2.delete == []


def test_static_shrink_is_pending_and_nodes_never_reads_2_of_1() -> None:
    pods = gang(TrainingJobSpec(nodes=2), 0, 2)
    p = plan(RUNNING, TrainingJobSpec(nodes=1), pods)
    no_failure(p)
    assert p.delete == [] and p.create == []
    assert p.status.nodes == "2/2" and p.status.phase == "Running"
    assert condition(p, "ResizePending").status == "True"


def test_static_resize_applies_at_the_next_gang_start() -> None:
    pods = gang(TrainingJobSpec(nodes=2), 0, 2)
    pending = plan(RUNNING, TrainingJobSpec(nodes=3), pods).status.wire()
    # The gang restarts (suspend/resume, a failure …): attempt 1 has no pods yet.
    p = plan({**pending, "attempt": 1, "phase": "Restarting"}, TrainingJobSpec(nodes=3), [])
    assert [x["metadata"]["name"] for x in p.create] == ["job-a1-0", "job-a1-1", "job-a1-2"]
    done = condition(p, "ResizePending")
    assert (done.status, done.reason) == ("False", "Resized") and "Resized" in reasons(p)
    assert p.status.nodes == "0/3"


def test_static_resize_reverted_clears_the_condition() -> None:
    pods = gang(TrainingJobSpec(nodes=2), 0, 2)
    pending = plan(RUNNING, TrainingJobSpec(nodes=3), pods).status.wire()
    p = plan(pending, TrainingJobSpec(nodes=2), pods)
    assert condition(p, "ResizePending").status == "False" and p.create == [] and p.delete == []


def elastic(nodes: int, low: int = 1, high: int = 4) -> TrainingJobSpec:
    return TrainingJobSpec(nodes=nodes, elastic={"minNodes": low, "maxNodes": high})


def test_elastic_grow_adds_ranks_in_place_and_stays_running() -> None:
    pods = gang(elastic(2), 0, 2)
    p = plan(RUNNING, elastic(3), pods)
    no_failure(p)
    assert [x["metadata"]["name"] for x in p.create] == ["job-a0-2"], "same attempt, one more rank"
    assert p.delete == []
    assert p.status.phase == "Running" and p.status.nodes == "2/3"
    assert "Resizing" in reasons(p) and condition(p, "ResizePending") is None


def test_elastic_grow_is_bounded_by_healthy_nodes() -> None:
    pods = gang(elastic(2, high=8), 0, 2)
    p = plan(RUNNING, elastic(6, high=8), pods)  # the cluster has 4 nodes
    assert [x["metadata"]["name"] for x in p.create] == ["job-a0-2", "job-a0-3"]
    assert p.status.nodes == "2/4"


def test_elastic_shrink_removes_top_ranks_without_a_failure() -> None:
    pods = gang(elastic(3), 0, 3)
    p = plan({**RUNNING, "nodes": "3/3"}, elastic(2), pods)
    no_failure(p)
    assert [(d.name, d.force) for d in p.delete] == [("job-a0-2", False)]
    assert p.create == [] and p.status.nodes == "2/2" and p.status.phase == "Running"
    # Next pass: rank 2 is terminating: it is being resized away, not lost.
    pods[2]["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:01Z"
    p2 = plan(p.status.wire(), elastic(2), pods)
    no_failure(p2)
    assert p2.delete == [] and p2.create == [] and p2.status.phase == "Running"


def test_elastic_range_change_waits_for_the_next_gang() -> None:
    pods = gang(elastic(2), 0, 2)
    p = plan(RUNNING, elastic(2, low=2, high=6), pods)
    no_failure(p)
    assert p.create == [] and p.delete == []
    pending = condition(p, "ResizePending")
    assert pending.status == "True" and "[2, 6]" in pending.message and "[1, 4]" in pending.message
    # Even where spec.nodes fits the running range: new pods must rendezvous like the running ones.
    p = plan(RUNNING, elastic(3, low=1, high=6), pods)
    assert p.create == [] and condition(p, "ResizePending").status == "True"
