"""Kueue preempts a running low-priority TrainingJob for a high-priority one, with real trainers run by the
development kubelet: the preempted trainer writes its stop checkpoint, the job goes back to Queued without
counting a restart, and when it is admitted again it resumes from exactly that checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import kueue_objects as ko
from tests.e2e.helpers import events_of, hostpath_claim, status
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"


@pytest.fixture
def one_gpu_queue(kube: Kube, namespace: str) -> Iterator[dict[str, str]]:
    """A ClusterQueue with room for one 1-GPU job, its LocalQueue, and two priority classes."""
    ko.need_kueue(kube)
    tag = ko.run_tag()
    names = {"flavor": f"any-{tag}", "cq": f"one-gpu-{tag}", "low": f"low-{tag}", "high": f"high-{tag}"}
    objects = [
        ko.flavor(names["flavor"]),
        ko.gpu_cluster_queue(names["cq"], names["flavor"], 1),
        ko.priority_class(names["low"], 10),
        ko.priority_class(names["high"], 99),
    ]
    with ko.created(kube, objects):
        ko.local_queue(kube, namespace, "gpu", names["cq"])
        yield names


def job(kube: Kube, ns: str, name: str, priority: str, steps: int, claim: str) -> None:
    command = ["python", "-m", "aidc_trainer", "--example", "mlp", "--steps", str(steps), "--eval-every", "0"]
    body = {
        "apiVersion": "aidc.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {
            "name": name,
            "labels": {f"{GROUP}/queue-name": "gpu", f"{GROUP}/priority-class": priority},
        },
        "spec": {
            "command": [*command, "--progress-every-seconds", "1"],
            "nodes": 1,
            "procPerNode": 1,
            "gpusPerNode": 1,
            "checkpoint": {"volume": {"persistentVolumeClaim": {"claimName": claim}}, "everySteps": 100000},
        },
    }
    kube.custom.create_namespaced_custom_object("aidc.dev", "v1alpha1", ns, "trainingjobs", body)


def rank0(kube: Kube, ns: str, name: str, attempt: int):
    pods = kube.pods(ns, f"aidc.dev/job-name={name},aidc.dev/attempt={attempt}")
    return pods[0] if pods else None


def test_preempted_trainer_checkpoints_waits_queued_and_resumes_from_that_checkpoint(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path, one_gpu_queue: dict[str, str]
) -> None:
    hostpath_claim(kube, namespace, "ckpt", tmp_path / "pv")
    # everySteps far beyond the run: the only checkpoint the batch job can have is its stop checkpoint.
    job(kube, namespace, "batch", one_gpu_queue["low"], steps=1_000_000, claim="ckpt")
    first = wait_for("batch's trainer running", lambda: rank0(kube, namespace, "batch", 0), timeout=120)
    log0 = kubelet / first.metadata.name / "log"
    wait_for(
        "batch training",
        lambda: log0.exists() and any(e.get("event") == "train" for e in events_of(log0)),
        timeout=480,  # torch start-up on a loaded 2-core machine: a budget, not a goal
        interval=0.5,
    )

    job(kube, namespace, "urgent", one_gpu_queue["high"], steps=50, claim="ckpt")
    wait_for(
        "batch back in the queue",
        lambda: status(kube, namespace, "batch").get("phase") == "Queued",
        timeout=180,
    )
    saved = wait_for(
        "batch's stop checkpoint",
        lambda: next((e["step"] for e in events_of(log0) if e.get("event") == "checkpoint"), None),
        timeout=180,
    )
    wait_for(
        "urgent done", lambda: status(kube, namespace, "urgent").get("phase") == "Succeeded", timeout=480
    )

    again = wait_for("batch admitted again", lambda: rank0(kube, namespace, "batch", 1), timeout=180)
    log1 = kubelet / again.metadata.name / "log"
    resumed = wait_for(
        "batch resumed",
        lambda: log1.exists() and next((e for e in events_of(log1) if e.get("event") == "resume"), None),
        timeout=480,
        interval=0.5,
    )
    assert resumed["step"] == saved and saved > 0, (resumed, saved)
    st = status(kube, namespace, "batch")
    assert st["restarts"] == 0 and st["nodeFailures"] == 0, "an eviction is not a failure"
