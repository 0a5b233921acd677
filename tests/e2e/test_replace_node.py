"""ReplaceNode end to end, with real processes: a node under a 3-pod gang dies mid-training, the
operator replaces only that node's pod, the surviving pods' torchrun agents restart their workers in
place (c10d rendezvous), all ranks resume from the newest checkpoint and the job succeeds. The rank-0
case (its agent hosts the rendezvous) restarts the gang; with a standby spare, the spare takes the lost
rank over and the pod created behind it becomes the new standby.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import events_of, hostpath_claim, status
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _start(kube: Kube, ns: str, name: str, pv: Path, nodes: int, **failure: object) -> None:
    hostpath_claim(kube, ns, "ckpt", pv)
    # Long enough that the node dies mid-run on a quiet machine; the kill comes after checkpoint 300.
    command = ["python", "-m", "aidc_trainer", "--example", "mlp", "--steps", "4000", "--eval-every", "0"]
    command += ["--log-every", "100", "--progress-every-seconds", "1"]
    kube.create_cr(
        "TrainingJob",
        ns,
        name,
        {
            "command": command,
            "nodes": nodes,
            "procPerNode": 1,
            "gpusPerNode": 1,
            "checkpoint": {"volume": {"persistentVolumeClaim": {"claimName": "ckpt"}}, "everySteps": 100},
            "failurePolicy": {"nodeFailure": "ReplaceNode", "backoffSeconds": 1, "maxRestarts": 3, **failure},
        },
    )
    wait_for(
        "a few checkpoints",
        lambda: (status(kube, ns, name).get("lastCheckpoint") or {}).get("step", 0) >= 300,
        timeout=600,  # torch start-up and 300 steps of 3 ranks on a loaded 2-core machine: a budget
        interval=0.5,
    )


def _pods(kube: Kube, ns: str, name: str) -> dict[str, tuple[str, str, str]]:
    """name → (uid, rank, node) of the job's pods."""
    return {
        p.metadata.name: (p.metadata.uid, p.metadata.labels["aidc.dev/node-rank"], p.spec.node_name)
        for p in kube.pods(ns, f"aidc.dev/job-name={name}")
    }


def _resumes(kubelet: Path, pod: str) -> list[int]:
    log = kubelet / pod / "log"
    return [e["step"] for e in events_of(log) if e.get("event") == "resume"] if log.exists() else []


def _finished(kube: Kube, ns: str, name: str) -> dict:
    wait_for(
        "the job to finish",
        lambda: status(kube, ns, name).get("phase") in ("Succeeded", "Failed"),
        timeout=600,
        interval=1,
    )
    return status(kube, ns, name)


def test_a_lost_node_costs_one_pod_and_the_survivors_resume_in_place(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    _start(kube, namespace, "rn", tmp_path / "pv", nodes=3)
    before = _pods(kube, namespace, "rn")
    victim_pod, (_, _, victim) = next((n, v) for n, v in before.items() if v[1] == "1")
    saved = status(kube, namespace, "rn")["lastCheckpoint"]["step"]
    kube.fail_node(victim)

    st = _finished(kube, namespace, "rn")
    assert st["phase"] == "Succeeded", st
    assert st["attempt"] == 0 and st["nodeFailures"] == 1  # no gang restart
    after = _pods(kube, namespace, "rn")
    kept = {n: v for n, v in before.items() if n != victim_pod}
    assert {n: after[n][0] for n in kept} == {n: v[0] for n, v in kept.items()}  # same pods, same UIDs
    created = set(after) - set(before)
    assert created == {"rn-a0-1-r1"}, after  # exactly one new pod, for rank 1, off the dead node
    assert victim_pod not in after and after["rn-a0-1-r1"][1:] != ("1", victim)
    (rec,) = st["recoveries"]
    assert (rec["mode"], rec["node"], rec["lostPod"], rec["replacement"]) == (
        "ReplaceNode",
        victim,
        victim_pod,
        "rn-a0-1-r1",
    )
    assert rec["resumedFromStep"] >= saved and rec["resumedAt"] and rec["seconds"] >= 0
    # every rank of the gang resumed from that checkpoint: the survivors in place, the new pod fresh
    for pod in [*kept, "rn-a0-1-r1"]:
        assert rec["resumedFromStep"] in _resumes(kubelet, pod), pod
    assert st["lastCheckpoint"]["step"] == 4000


def test_losing_the_rendezvous_host_restarts_the_gang(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    _start(kube, namespace, "rh", tmp_path / "pv", nodes=3)
    victim = next(v[2] for v in _pods(kube, namespace, "rh").values() if v[1] == "0")
    saved = status(kube, namespace, "rh")["lastCheckpoint"]["step"]
    kube.fail_node(victim)

    st = _finished(kube, namespace, "rh")
    assert st["phase"] == "Succeeded", st
    assert st["attempt"] == 1 and st["nodeFailures"] == 1
    (rec,) = st["recoveries"]
    assert rec["mode"] == "RestartGang" and rec["node"] == victim and rec.get("replacement") is None
    assert rec["resumedFromStep"] >= saved
    final = _pods(kube, namespace, "rh")
    assert all(n.startswith("rh-a1-") for n in final) and victim not in {v[2] for v in final.values()}


def test_a_standby_spare_takes_the_lost_rank_over(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    _start(kube, namespace, "sp", tmp_path / "pv", nodes=2, spareNodes=1)
    wait_for("the spare counted", lambda: status(kube, namespace, "sp").get("spares") == 1, timeout=60)
    before = _pods(kube, namespace, "sp")
    # Which pod stands by is the rendezvous' choice: the one whose trainer never started.
    standby = [n for n in before if not _resumes(kubelet, n)]
    assert len(standby) == 1, {n: _resumes(kubelet, n) for n in before}
    victim_pod = next(n for n, v in before.items() if v[1] != "0" and n not in standby)
    victim = before[victim_pod][2]
    saved = status(kube, namespace, "sp")["lastCheckpoint"]["step"]
    kube.fail_node(victim)

    st = _finished(kube, namespace, "sp")
    assert st["phase"] == "Succeeded", st
    assert st["attempt"] == 0
    (rec,) = st["recoveries"]
    assert rec["mode"] == "ReplaceNode" and rec["resumedFromStep"] >= saved
    # the spare ran the lost rank's share from the checkpoint on
    assert rec["resumedFromStep"] in _resumes(kubelet, standby[0])
    after = _pods(kube, namespace, "sp")
    assert set(after) - set(before) == {rec["replacement"]}  # one pod created: the new standby
    kept = [n for n in before if n != victim_pod]
    assert all(after[n][0] == before[n][0] for n in kept)


def _starts(kubelet: Path, pods: list[str]) -> list[tuple[str, int]]:
    """(time, world size) of every run of the workers the pods' logs recorded, oldest first."""
    found = []
    for pod in pods:
        log = kubelet / pod / "log"
        if log.exists():
            found += [(e["time"], e["world_size"]) for e in events_of(log) if e.get("event") == "start"]
    return sorted(found)


def test_an_elastic_gang_with_no_node_left_trains_on_smaller_and_grows_back(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    hostpath_claim(kube, namespace, "ckpt", tmp_path / "pv")
    command = ["python", "-m", "aidc_trainer", "--example", "mlp", "--steps", "1000000", "--eval-every", "0"]
    command += ["--log-every", "500", "--progress-every-seconds", "1"]
    kube.create_cr(
        "TrainingJob",
        namespace,
        "el",
        {
            "command": command,
            "nodes": 3,
            "elastic": {"minNodes": 2, "maxNodes": 3},
            "procPerNode": 1,
            "gpusPerNode": 1,
            "checkpoint": {"volume": {"persistentVolumeClaim": {"claimName": "ckpt"}}, "everySteps": 200},
            "failurePolicy": {"nodeFailure": "ReplaceNode"},
        },
    )
    wait_for(
        "a checkpoint",
        lambda: (status(kube, namespace, "el").get("lastCheckpoint") or {}).get("step", 0) >= 200,
        timeout=600,
        interval=0.5,
    )
    before = _pods(kube, namespace, "el")
    spare_node = next(n for n in kube.gpu_nodes() if n not in {v[2] for v in before.values()})
    victim_pod = next(n for n, v in before.items() if v[1] == "1")
    kube.kubectl("cordon", spare_node)  # no capacity left once a node dies
    try:
        kube.fail_node(before[victim_pod][2])
        # the two survivors re-form in place and train on: a run of world size 2, steps moving
        wait_for(
            "training on with 2 nodes",
            lambda: any(w == 2 for _, w in _starts(kubelet, list(before))),
            timeout=300,
            interval=1,
        )
        st = status(kube, namespace, "el")
        assert st["phase"] == "Running" and st["nodes"] == "2/3" and st["attempt"] == 0, st
        step = st["progress"]["step"]
        wait_for(
            "steps moving", lambda: status(kube, namespace, "el")["progress"]["step"] > step, timeout=120
        )
        assert "el-a0-1-r1" in _pods(kube, namespace, "el")  # waiting for a node, not given up
    finally:
        kube.kubectl("uncordon", spare_node)
    # a node is back: the waiting pod starts and the gang grows back to 3 in place
    wait_for("3/3 again", lambda: status(kube, namespace, "el").get("nodes") == "3/3", timeout=300)
    wait_for(
        "a run of world size 3 after the 2",
        lambda: [w for _, w in _starts(kubelet, [*before, "el-a0-1-r1"])][-1:] == [3],
        timeout=300,
        interval=1,
    )
    after = _pods(kube, namespace, "el")
    assert all(after[n][0] == before[n][0] for n in before if n != victim_pod)  # never restarted whole
    assert status(kube, namespace, "el")["attempt"] == 0
