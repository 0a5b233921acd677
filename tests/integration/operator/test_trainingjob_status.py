"""What `kubectl get tj` and the TrainingJob status tell a user, on the real local control plane with the
operator as a real process. kwok plays the kubelet, so the test plays the trainer and the kubelet: it
patches rank 0's `aidc.dev/progress` annotation as the trainer does (docs/contracts.md) and reports
container exits through the pods' status subresource as a kubelet does."""

from __future__ import annotations

import json
import threading
import time

import pytest
from kubernetes import watch

from tests.integration.operator.test_trainingjob import (
    GROUP,
    PLURAL,
    VERSION,
    create_job,
    status,
    succeed_pod,
    wait_running,
)
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster


def report_progress(kube: Kube, ns: str, pod: str, **fields: object) -> None:
    """What rank 0 patches onto its own pod."""
    fields.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    body = {"metadata": {"annotations": {"aidc.dev/progress": json.dumps(fields)}}}
    kube.core.patch_namespaced_pod(pod, ns, body)


def columns(kube: Kube, ns: str, name: str) -> dict[str, str]:
    """`kubectl get tj -o wide`, the printer columns the apiserver renders, by header."""
    lines = kube.kubectl("get", "tj", name, "-n", ns, "-o", "wide").stdout.splitlines()
    header, row = lines[0], lines[1]
    # Columns are left-aligned under their headers; cut the row where each header starts.
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(header.split(), cells, strict=True))


class PhaseRecorder(threading.Thread):
    """Every phase the job's stored status passes through, from a watch (a poll could miss one)."""

    def __init__(self, kube: Kube, ns: str, name: str) -> None:
        super().__init__(daemon=True)
        self.kube, self.ns, self.name = kube, ns, name
        self.phases: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            w = watch.Watch()
            for event in w.stream(
                self.kube.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.ns,
                PLURAL,
                field_selector=f"metadata.name={self.name}",
                timeout_seconds=5,
            ):
                phase = (event["object"].get("status") or {}).get("phase")
                if phase and (not self.phases or self.phases[-1] != phase):
                    self.phases.append(phase)
                if self.stop.is_set():
                    w.stop()


def test_status_shows_evaluation_eta_and_a_clean_finish(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "truth", nodes=2, masterPort=29512)
    pods = wait_running(kube, namespace, "truth", attempt=0, nodes=2, timeout=240)
    rank0, rank1 = (p.metadata.name for p in pods)
    recorder = PhaseRecorder(kube, namespace, "truth")
    recorder.start()
    report_progress(
        kube,
        namespace,
        rank0,
        step=500,
        totalSteps=1000,
        stepsPerSecond=2.0,
        evaluation={"step": 400, "loss": 0.31, "accuracy": 0.91, "f1": 0.88},
        energyJoules=None,
        energySource="unavailable: no GPU",
        energyGpus=0,
    )
    # Figures that tick are written at most every 30 s: a generous budget.
    wait_for("evaluation in status", lambda: status(kube, namespace, "truth").get("evaluation"), timeout=180)
    st = status(kube, namespace, "truth")
    assert st["evaluation"] == {"step": 400, "loss": 0.31, "accuracy": 0.91, "f1": 0.88}
    assert st["progress"]["step"] == 500 and st["progress"]["eta"] == "4m10s"
    assert st["progress"]["estimatedCompletionTime"]
    assert st.get("energyJoules") is None and st["energy"] == "not measured: no GPU"
    table = columns(kube, namespace, "truth")
    assert (table["PHASE"], table["NODES"], table["STEP"]) == ("Running", "2/2", "500")
    assert (table["ETA"], table["ACCURACY"]) == ("4m10s", "0.91")

    # Ranks exit 0 one by one: the job stays Running until the last, then Succeeded with NODES 2/2.
    succeed_pod(kube, namespace, rank1)
    wait_for(
        "rank 1 seen finished",
        lambda: any(
            c["type"] == "Running" and "1 finished" in c.get("message", "")
            for c in status(kube, namespace, "truth").get("conditions", [])
        ),
        timeout=120,
    )
    assert status(kube, namespace, "truth")["phase"] == "Running"
    report_progress(kube, namespace, rank0, step=1000, totalSteps=1000, stepsPerSecond=2.0)
    succeed_pod(kube, namespace, rank0)
    wait_for("succeeded", lambda: status(kube, namespace, "truth").get("phase") == "Succeeded", timeout=120)
    recorder.stop.set()
    recorder.join(timeout=30)
    assert "Pending" not in recorder.phases[recorder.phases.index("Running") :], recorder.phases
    table = columns(kube, namespace, "truth")
    assert (table["PHASE"], table["NODES"], table["ETA"]) == ("Succeeded", "2/2", ""), "no time left"
    assert table["ACCURACY"] == "0.91"
