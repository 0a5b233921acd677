"""ReplaceNode recovery without a cluster: a lost node costs one pod, survivors keep running, spares
stand by, rank 0's loss restarts the gang, and status.recoveries tells how long it took."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from aidc_operator import admission
from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from tests.unit.operator.test_lifecycle import NODES, NOW, OWNER, body, exited, node, plan, running

REPLACE = {"nodeFailure": "ReplaceNode", "maxNodeFailures": 3}


def spec(**failure: object) -> TrainingJobSpec:
    return TrainingJobSpec(nodes=3, failurePolicy={**REPLACE, **failure})


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}


def names(pods: list[dict]) -> list[str]:
    return [p["metadata"]["name"] for p in pods]


def test_replace_node_pods_meet_in_a_c10d_rendezvous_hosted_by_rank_0() -> None:
    pods = build.gang(OWNER, spec(), 2)
    env = [env_of(p) for p in pods]
    assert {e["PET_NNODES"] for e in env} == {"3:3"}  # fixed size: a spare waits as standby
    assert {e["PET_RDZV_BACKEND"] for e in env} == {"c10d"}
    assert {e["PET_RDZV_ID"] for e in env} == {"uid-1-2"}  # the attempt's: replacements join it
    assert {e["PET_MAX_RESTARTS"] for e in env} == {"3"}  # one in-place restart per node failure
    assert [e["PET_RDZV_CONF"].split(",")[0] for e in env] == ["is_host=1", "is_host=0", "is_host=0"]
    assert env[1]["PET_LOCAL_ADDR"] == "job-1.job-ranks.ns.svc"
    assert env[0]["PET_RDZV_ENDPOINT"] == "job-0.job-ranks.ns.svc:29500"
    assert all("PET_NODE_RANK" not in e for e in env)
    # RestartGang keeps Kubeflow's static wiring.
    static = env_of(build.gang(OWNER, TrainingJobSpec(nodes=3), 0)[1])
    assert static["PET_NODE_RANK"] == "1" and "PET_RDZV_BACKEND" not in static


def test_a_lost_node_replaces_one_pod_and_leaves_the_others_alone() -> None:
    s = spec()
    pods = running(s, 0, ["n0", "n1", "n2"])
    nodes = {**NODES, "n1": node("n1", "Unknown")}
    p = plan(body({"phase": "Running", "attempt": 0}), s, pods, nodes, NOW)
    assert [(d.name, d.force) for d in p.delete] == [("job-a0-1", True)]  # only the lost pod
    assert names(p.create) == ["job-a0-1-r1"]
    new = p.create[0]
    assert new["metadata"]["labels"]["aidc.dev/node-rank"] == "1" and new["spec"]["hostname"] == "job-1"
    avoid = new["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert avoid["nodeSelectorTerms"][0]["matchExpressions"][-1]["values"] == ["n1"]
    st = p.status
    assert st.attempt == 0 and st.node_failures == 1 and st.phase == "Restarting"
    (rec,) = st.recoveries
    assert (rec.mode, rec.node, rec.lost_pod, rec.replacement) == (
        "ReplaceNode",
        "n1",
        "job-a0-1",
        "job-a0-1-r1",
    )
    assert rec.detected_at == "2026-11-26T12:00:00Z" and rec.resumed_at is None
    assert [e.reason for e in p.events] == ["NodeFailure"] and "job-a0-1 with job-a0-1-r1" in p.events[
        0
    ].message

    # Next pass, as the cache holds it: the old pod terminating, the replacement created. Nothing more
    # is deleted or created and no second failure is counted.
    pods[1]["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:00Z"
    later = NOW + dt.timedelta(seconds=1)
    p2 = plan(body(p.status.wire()), s, [*pods, new], nodes, later)
    assert p2.create == [] and p2.status.node_failures == 1
    assert [d.name for d in p2.delete] == ["job-a0-1"]  # force again until it is gone: no kubelet
    # The replacement runs: the job is Running again, with the same survivors.
    new["spec"]["nodeName"] = "n3"
    new["status"] = pods[0]["status"]
    p3 = plan(body(p2.status.wire()), s, [pods[0], pods[2], new], nodes, later)
    assert p3.delete == [] and p3.create == [] and p3.status.phase == "Running" and p3.status.nodes == "3/3"


def test_the_recovery_closes_with_the_first_run_after_the_loss() -> None:
    s = spec()
    pods = running(s, 0, ["n0", "n1", "n2"])
    nodes = {**NODES, "n1": node("n1", "Unknown")}
    p = plan(body({"phase": "Running", "attempt": 0}), s, pods, nodes, NOW)
    new = p.create[0]
    new["spec"]["nodeName"], new["status"] = "n3", pods[0]["status"]
    gang = [pods[0], pods[2], new]

    def reported(first_step_at: str, from_step: int) -> None:
        # the trainer's global rank 0 may live in any pod: here the replacement's
        new["metadata"]["annotations"] = {
            "aidc.dev/progress": json.dumps(
                {
                    "step": from_step + 5,
                    "time": first_step_at,
                    "run": {"fromStep": from_step, "firstStepAt": first_step_at},
                }
            )
        }

    reported("2026-11-26T11:59:00.000Z", 0)  # the run from before the loss: not a resume
    p2 = plan(body(p.status.wire()), s, gang, nodes, NOW + dt.timedelta(seconds=2))
    assert p2.status.recoveries[0].resumed_at is None
    reported("2026-11-26T12:00:07.250Z", 300)
    p3 = plan(body(p2.status.wire()), s, gang, nodes, NOW + dt.timedelta(seconds=9))
    rec = p3.status.recoveries[0]
    assert (rec.resumed_at, rec.resumed_from_step, rec.seconds) == ("2026-11-26T12:00:07.250Z", 300, 7.2)
    assert [e.reason for e in p3.events] == ["Recovered"]
    assert "step 300" in p3.events[0].message and "7.2s" in p3.events[0].message
    p4 = plan(body(p3.status.wire()), s, gang, nodes, NOW + dt.timedelta(seconds=10))
    assert p4.events == [] and p4.status.recoveries == p3.status.recoveries  # closed once


def test_losing_rank_0_the_rendezvous_host_restarts_the_gang() -> None:
    s = spec()
    pods = running(s, 0, ["n0", "n1", "n2"])
    nodes = {**NODES, "n0": node("n0", "Unknown")}
    p = plan(body({"phase": "Running", "attempt": 0}), s, pods, nodes, NOW)
    assert p.create == [] and p.status.attempt == 1 and {d.name for d in p.delete} == set(names(pods))
    assert "rank 0, whose agent hosts the rendezvous" in p.events[0].message
    assert p.status.recoveries[0].mode == "RestartGang" and p.status.recoveries[0].replacement is None


def test_survivors_that_already_gave_up_mean_a_gang_restart() -> None:
    s = spec()
    pods = running(s, 0, ["n0", "n1", "n2"])
    exited(pods[2], 1, "torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: x")
    nodes = {**NODES, "n1": node("n1", "Unknown")}
    p = plan(body({"phase": "Running", "attempt": 0}), s, pods, nodes, NOW)
    assert p.create == [] and p.status.attempt == 1


def test_spares_are_extra_ranks_shown_apart_and_a_lost_one_is_replaced() -> None:
    s = spec(spareNodes=1)
    p = plan(body(), s, [], NODES, NOW)
    # the gang first; the spare once every rank is placed, so it never takes a rank's node
    assert names(p.create) == ["job-a0-0", "job-a0-1", "job-a0-2"] and p.status.nodes == "0/3"
    placed = running(TrainingJobSpec(nodes=3, failurePolicy=REPLACE), 0, ["n0", "n1", "n2"])
    placed[2]["spec"].pop("nodeName")
    assert plan(body(p.status.wire()), s, placed, NODES, NOW).create == []
    placed[2]["spec"]["nodeName"] = "n2"
    assert names(plan(body(p.status.wire()), s, placed, NODES, NOW).create) == ["job-a0-3"]
    pods = running(TrainingJobSpec(nodes=4, failurePolicy=REPLACE), 0, ["n0", "n1", "n2", "n3"])
    for pod in pods:  # the pods as built for the 3-node job with a spare
        pod["spec"]["containers"][0]["env"] = build.pod(OWNER, s, 0, 0)["spec"]["containers"][0]["env"]
    p2 = plan(body(p.status.wire()), s, pods, NODES, NOW)
    assert p2.create == [] and p2.status.nodes == "3/3" and p2.status.spares == 1
    assert p2.status.phase == "Running" and not any(c.type == "ResizePending" for c in p2.status.conditions)
    nodes = {**NODES, "n2": node("n2", "Unknown"), "n4": node("n4")}
    p3 = plan(body(p2.status.wire()), s, pods, nodes, NOW)
    assert names(p3.create) == ["job-a0-2-r1"] and [d.name for d in p3.delete] == ["job-a0-2"]


def test_a_job_that_finished_while_a_spare_stood_by_succeeds() -> None:
    s = spec(spareNodes=1)
    pods = running(TrainingJobSpec(nodes=4, failurePolicy=REPLACE), 0, ["n0", "n1", "n2", "n3"])
    for pod in pods:
        pod["spec"]["containers"][0]["env"] = build.pod(OWNER, s, 0, 0)["spec"]["containers"][0]["env"]
    for pod in pods[:3]:
        exited(pod, 0)
    st = {"phase": "Running", "attempt": 0}
    # the standby still waits: not finished yet, and no failure either
    p = plan(body(st), s, pods, NODES, NOW)
    assert p.status.phase == "Running" and p.delete == []
    # the standby's agent lost the store as rank 0's agent left: the job still succeeded
    lost_store = "RendezvousConnectionError: The connection to the C10d store has failed."
    exited(pods[3], 1, lost_store)
    p2 = plan(body(st), s, pods, NODES, NOW)
    assert p2.status.phase == "Succeeded" and p2.status.nodes == "3/3"
    # a real failure of a rank is never mistaken for it
    exited(pods[3], 3, '{"event": "exit", "exit_code": 3, "cause": "CheckpointKeyError"}')
    assert plan(body(st), s, pods, NODES, NOW).status.phase == "Failed"


@pytest.mark.parametrize(
    ("failure", "elastic", "field"),
    [
        ({"spareNodes": 1}, None, "spec.failurePolicy.spareNodes: 1 needs spec.failurePolicy.nodeFailure"),
        ({**REPLACE, "spareNodes": 1}, {"minNodes": 2, "maxNodes": 3}, "needs a fixed-size gang"),
    ],
)
def test_spares_need_replace_node_and_a_fixed_size(failure: dict, elastic: dict | None, field: str) -> None:
    raw = {"nodes": 3, "failurePolicy": failure, **({"elastic": elastic} if elastic else {})}
    problems = admission.validate_trainingjob("job", raw)
    assert any(field in p for p in problems), problems


def unschedulable(pod: dict, created: str) -> dict:
    pod["metadata"]["creationTimestamp"] = created
    pod["status"] = {
        "phase": "Pending",
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes"}
        ],
    }
    return pod


def test_a_replacement_gets_its_own_scheduling_time_not_the_gangs() -> None:
    s = spec()
    pods = running(s, 0, ["n0", "n1", "n2"])
    for pod in pods:
        pod["metadata"]["creationTimestamp"] = "2026-11-26T09:00:00Z"  # the gang is hours old
    nodes = {**NODES, "n1": node("n1", "Unknown")}
    p = plan(body({"phase": "Running", "attempt": 0}), s, pods, nodes, NOW)
    new = unschedulable(p.create[0], "2026-11-26T12:00:00Z")
    gang = [pods[0], pods[2], new]
    p2 = plan(body(p.status.wire()), s, gang, nodes, NOW + dt.timedelta(seconds=30))
    assert p2.delete == [] and p2.status.attempt == 0  # waiting 30 s of its 300: no timeout
    # a fixed-size gang cannot train without it: after timeoutSeconds the gang is given up and retried
    p3 = plan(body(p2.status.wire()), s, gang, nodes, NOW + dt.timedelta(seconds=301))
    assert p3.status.attempt == 1 and p3.status.scheduling_retries == 1


def test_an_elastic_gang_with_no_node_left_trains_on_with_fewer_in_place() -> None:
    s = TrainingJobSpec(nodes=3, elastic={"minNodes": 2, "maxNodes": 3}, failurePolicy=REPLACE)
    pods = running(s, 0, ["n0", "n1", "n2"])
    nodes = {"n0": node("n0"), "n1": node("n1", "Unknown"), "n2": node("n2")}  # no node to spare
    p = plan(body({"phase": "Running", "attempt": 0}), s, pods, nodes, NOW)
    assert names(p.create) == ["job-a0-1-r1"] and p.status.attempt == 0
    new = unschedulable(p.create[0], "2026-11-26T12:00:00Z")
    gang = [pods[0], pods[2], new]
    for later in (30, 3600):  # long past timeoutSeconds: the waiting pod never stops the gang
        p2 = plan(body(p.status.wire()), s, gang, nodes, NOW + dt.timedelta(seconds=later))
        assert p2.delete == [] and p2.create == [] and p2.status.attempt == 0
        assert p2.status.phase == "Running" and p2.status.nodes == "2/3"
        unsched = next(c for c in p2.status.conditions if c.type == "Unschedulable")
        assert unsched.status == "True" and "0/4 nodes" in unsched.message
    # a node comes back: the pod is placed and runs; the gang is whole again
    new["spec"]["nodeName"], new["status"] = "n3", pods[0]["status"]
    p3 = plan(body(p2.status.wire()), s, gang, {**nodes, "n3": node("n3")}, NOW + dt.timedelta(seconds=3601))
    assert p3.status.nodes == "3/3" and p3.status.phase == "Running"


def test_spares_the_cluster_cannot_place_are_a_condition_never_a_block() -> None:
    s = spec(spareNodes=2)  # 3 + 2 pods on 4 nodes
    gang = running(TrainingJobSpec(nodes=4, failurePolicy=REPLACE), 0, ["n0", "n1", "n2", "n3"])
    built = build.pod(OWNER, s, 4, 0)
    gang.append(unschedulable(built, "2026-11-26T12:00:00Z"))
    for pod in gang:
        pod["spec"]["containers"][0]["env"] = built["spec"]["containers"][0]["env"]
    for later in (10, 3600):  # long past timeoutSeconds
        p = plan(body({"phase": "Running", "attempt": 0}), s, gang, NODES, NOW + dt.timedelta(seconds=later))
        assert p.delete == [] and p.create == [] and p.status.attempt == 0
        assert (p.status.phase, p.status.nodes, p.status.spares) == ("Running", "3/3", 1)
        cond = next(c for c in p.status.conditions if c.type == "Unschedulable")
        assert cond.reason == "SparesUnschedulable" and "the gang runs without them" in cond.message


def test_a_run_that_began_just_before_the_node_died_is_not_the_resumed_one() -> None:
    from aidc_operator import recoveries
    from aidc_operator.api.trainingjob import TrainingJobStatus
    from aidc_operator.recovery import LostPod, NodeHealth

    st = TrainingJobStatus()
    health = {"n1": NodeHealth("n1", False, "NodeLeaseExpired", renewed_ago=10.0, lease_seconds=10.0)}
    recoveries.record(
        st, LostPod("job-a0-1", "n1", "NodeLeaseExpired", "lost"), "ReplaceNode", "x", NOW, health
    )
    assert st.recoveries[0].lost_at == "2026-11-26T11:59:50Z"  # its last renewal, 10 s before the verdict
    pod = running(spec(), 0, ["n0", "n2", "n3"])[0]

    def run(first_step_at: str, from_step: int) -> list[dict]:
        report = {
            "step": 1,
            "time": first_step_at,
            "run": {"fromStep": from_step, "firstStepAt": first_step_at},
        }
        pod["metadata"]["annotations"] = {"aidc.dev/progress": json.dumps(report)}
        return [pod]

    # the gang's first run began 3 s after the node's last renewal and died with it
    assert recoveries.resolve(st, run("2026-11-26T11:59:53.000Z", 0)) == []
    assert st.recoveries[0].resumed_at is None
    # the run that resumed without the dead peer closes it
    assert len(recoveries.resolve(st, run("2026-11-26T12:00:04.000Z", 300))) == 1
    assert (st.recoveries[0].resumed_from_step, st.recoveries[0].seconds) == (300, 4.0)
