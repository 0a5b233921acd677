"""All-or-nothing gangs without a queueing system, on the real scheduler and kwok GPU nodes: a gang that
only partly fits gives its GPUs back after spec.scheduling.timeoutSeconds instead of holding them."""

from __future__ import annotations

import pytest

from tests.integration.operator.test_trainingjob import create_job, events, status, wait_running
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster


def test_a_gang_that_only_partly_fits_releases_its_gpus(kube: Kube, operator, namespace: str) -> None:
    nodes = len(kube.gpu_nodes())
    gpus = int(kube.node(kube.gpu_nodes()[0]).status.allocatable["nvidia.com/gpu"])
    # Every node but two is full.
    create_job(kube, namespace, "hog", nodes=nodes - 2, gpusPerNode=gpus, procPerNode=1)
    wait_running(kube, namespace, "hog", attempt=0, nodes=nodes - 2)

    # Three whole nodes wanted, two free: two pods would hold 2 x gpus GPUs forever.
    scheduling = {"timeoutSeconds": 5, "backoffSeconds": 3600}
    create_job(kube, namespace, "big", nodes=3, gpusPerNode=gpus, procPerNode=1, scheduling=scheduling)
    wait_for(
        "big's partial gang placed",
        lambda: sum(1 for p in kube.pods(namespace, "aidc.dev/job-name=big") if p.spec.node_name) == 2,
        timeout=60,
    )

    def timed_out() -> dict | None:
        st = status(kube, namespace, "big")
        cond = next((c for c in st.get("conditions") or [] if c["type"] == "Unschedulable"), {})
        return st if cond.get("reason") == "SchedulingTimeout" else None

    st = wait_for("the scheduling timeout", timed_out, timeout=120)
    cond = next(c for c in st["conditions"] if c["type"] == "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in cond["message"] or "anti-affinity" in cond["message"], cond
    assert st["schedulingRetries"] == 1 and st["restarts"] == 0 and st["nodeFailures"] == 0
    assert any(e.startswith("SchedulingTimeout") for e in events(kube, namespace, "big"))
    wait_for("big's pods gone", lambda: not kube.pods(namespace, "aidc.dev/job-name=big"), timeout=120)

    # The GPUs it held are free: a two-node job submitted meanwhile runs.
    create_job(kube, namespace, "small", nodes=2, gpusPerNode=gpus, procPerNode=1)
    wait_running(kube, namespace, "small", attempt=0, nodes=2, timeout=120)
    assert status(kube, namespace, "big")["phase"] == "Pending"
