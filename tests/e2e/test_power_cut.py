"""A node loses power mid-run, ten-odd steps after a checkpoint: every process on it dies at that instant
(the development kubelet's power cut), the surviving ranks report a lost peer, and the operator must count
one node failure — not a pod failure: with maxRestarts 0 the job still recovers — and the trainer resumes
from that checkpoint, losing less than one checkpoint interval. Once for the node under rank 2, once for
rank 0's (which also hosts the rendezvous store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import events_of, hostpath_claim, status
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
# A wide interval: the test polls the log every 50 ms and must cut between two checkpoints even when a
# loaded machine keeps it from running for a second or more (a few ms a step on a quiet one).
INTERVAL, STEPS = 500, 2000


def pod_of(kube: Kube, ns: str, attempt: int, rank: int):
    pods = kube.pods(ns, f"aidc.dev/job-name=cut,aidc.dev/attempt={attempt},aidc.dev/node-rank={rank}")
    return pods[0] if pods else None


@pytest.mark.parametrize("rank", [2, 0])
def test_power_cut_after_a_checkpoint_loses_at_most_one_interval(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path, rank: int
) -> None:
    hostpath_claim(kube, namespace, "ckpt", tmp_path / "pv")
    command = ["python", "-m", "aidc_trainer", "--example", "mlp", "--steps", str(STEPS), "--eval-every", "0"]
    # A train line every 10 steps, so the test sees the step it cuts at.
    command += ["--log-every", "10", "--log-every-seconds", "0", "--progress-every-seconds", "1"]
    kube.create_cr(
        "TrainingJob",
        namespace,
        "cut",
        {
            "command": command,
            "nodes": 3,
            "procPerNode": 1,
            "gpusPerNode": 1,
            "checkpoint": {
                "volume": {"persistentVolumeClaim": {"claimName": "ckpt"}},
                "everySteps": INTERVAL,
            },
            "failurePolicy": {"backoffSeconds": 1, "maxRestarts": 0},
        },
    )
    rank0 = wait_for("rank 0 running", lambda: pod_of(kube, namespace, 0, 0), timeout=120)
    log0 = kubelet / rank0.metadata.name / "log"

    def ten_steps_after_a_checkpoint() -> int | None:
        if not log0.exists():
            return None
        saved = step = None
        for e in events_of(log0):
            if e.get("event") == "checkpoint" and saved is None:
                saved = e["step"]
            elif e.get("event") == "train" and saved is not None:
                step = e["step"]
        return saved if saved is not None and step is not None and step >= saved + 10 else None

    # torch start-up and the first checkpoint on a loaded 2-core machine: a budget, not a goal.
    wait_for("ten steps past the first checkpoint", ten_steps_after_a_checkpoint, timeout=480, interval=0.05)
    victim_pod = pod_of(kube, namespace, 0, rank)
    victim = victim_pod.spec.node_name
    victim_log = kubelet / victim_pod.metadata.name / "log"
    kube.fail_node(victim)  # the power cut: every process of every pod on it dies now
    written_at_cut = victim_log.stat().st_size
    # No rank takes a step past the cut (every step all-reduces with the dead rank): what rank 0 logged
    # is where training stopped, and its newest checkpoint is the one to resume from.
    before_cut = events_of(log0)
    cut_step = max(e["step"] for e in before_cut if e.get("event") == "train")
    saved = max(e["step"] for e in before_cut if e.get("event") == "checkpoint")

    wait_for(
        "the job to finish",
        lambda: status(kube, namespace, "cut").get("phase") in ("Succeeded", "Failed"),
        timeout=600,
        interval=1,
    )
    st = status(kube, namespace, "cut")
    assert st["phase"] == "Succeeded", st
    assert st["nodeFailures"] == 1 and st["restarts"] == 0, "one node failure, no pod failure"
    assert victim in (st.get("excludedNodes") or []) + [st["lastFailure"]["node"]]
    assert st["lastCheckpoint"]["step"] == STEPS

    final = pod_of(kube, namespace, st["attempt"], 0)
    assert final is not None and final.spec.node_name != victim
    resumed = [e for e in events_of(kubelet / final.metadata.name / "log") if e.get("event") == "resume"]
    assert resumed and resumed[0]["step"] == saved, (resumed, saved)
    assert cut_step - resumed[0]["step"] < INTERVAL, "at most one checkpoint interval of work lost"
    # Nothing ran on the dead node after the cut: not a step, not a log line, not a stop checkpoint.
    assert victim_log.stat().st_size == written_at_cut
