"""TrainingJobs queued by the real Kueue v0.17.0 of the local cluster (quota, flavors, priority preemption,
a queue that does not exist) with the operator as a real process. kwok plays the kubelet: a finished pod
is the kubelet's report (see test_trainingjob.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests import kueue_objects as ko
from tests.integration.operator.test_trainingjob import events, status, succeed_pod, wait_running
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
POOL = "aidc.dev/gpu-pool"


@pytest.fixture
def kueue(kube: Kube, operator) -> Iterator[dict[str, str]]:
    """A flavor per pool, a 16-GPU ClusterQueue on each, and two priority classes, for this test alone:
    a queue shared across tests would still count an earlier test's Workloads while its namespace is
    being deleted."""
    ko.need_kueue(kube)
    tag = ko.run_tag()
    names = {"low": f"low-{tag}", "high": f"high-{tag}"}
    objects: list[ko.Obj] = []
    for pool in ("h100", "a100"):
        names[pool], names[f"cq-{pool}"] = f"{pool}-{tag}", f"{pool}-{tag}"
        objects += [
            ko.flavor(names[pool], {POOL: pool}),
            ko.gpu_cluster_queue(names[f"cq-{pool}"], names[pool], 16),
        ]
    objects += [ko.priority_class(names["low"], 100), ko.priority_class(names["high"], 1000)]
    with ko.created(kube, objects):
        yield names


def queued_job(kube: Kube, ns: str, name: str, queue: str, priority: str | None = None, **spec: Any) -> None:
    labels = {f"{GROUP}/queue-name": queue} | ({f"{GROUP}/priority-class": priority} if priority else {})
    spec.setdefault("command", ["python", "-m", "aidc_trainer", "--example", "mlp"])
    body = {
        "apiVersion": "aidc.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }
    kube.custom.create_namespaced_custom_object("aidc.dev", "v1alpha1", ns, "trainingjobs", body)


def queued(kube: Kube, ns: str, name: str) -> dict | None:
    st = status(kube, ns, name)
    cond = next((c for c in st.get("conditions") or [] if c["type"] == "Queued"), {})
    return cond if st.get("phase") == "Queued" and cond.get("status") == "True" else None


def pods_of(kube: Kube, ns: str, name: str) -> list:
    return kube.pods(ns, f"aidc.dev/job-name={name}")


def finish(kube: Kube, ns: str, name: str) -> None:
    for pod in pods_of(kube, ns, name):
        succeed_pod(kube, ns, pod.metadata.name)
    wait_for(f"{name} Succeeded", lambda: status(kube, ns, name).get("phase") == "Succeeded", timeout=60)


def test_quota_admits_two_gangs_and_queues_the_third_until_one_finishes(
    kube: Kube, kueue: dict[str, str], namespace: str
) -> None:
    ko.local_queue(kube, namespace, "gpu", kueue["cq-h100"])
    for name in ("one", "two", "three"):
        queued_job(kube, namespace, name, "gpu", nodes=2, gpusPerNode=4, procPerNode=4)
        if name != "three":
            wait_running(kube, namespace, name, attempt=0, nodes=2, timeout=120)
    cond = wait_for("three Queued", lambda: queued(kube, namespace, "three"), timeout=120)
    assert cond["reason"] and cond["message"], cond
    assert not pods_of(kube, namespace, "three"), "no pod before admission: no GPU held while queued"
    assert any(e.startswith("WorkloadCreated") for e in events(kube, namespace, "three"))
    for pod in pods_of(kube, namespace, "one") + pods_of(kube, namespace, "two"):
        assert kube.node(pod.spec.node_name).metadata.labels[POOL] == "h100", "the flavor's node labels"

    finish(kube, namespace, "one")
    wait_running(kube, namespace, "three", attempt=0, nodes=2, timeout=180)
    wl = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]
    one = next(w for w in wl if w["metadata"]["labels"]["aidc.dev/job-name"] == "one")
    assert any(c["type"] == "Finished" and c["status"] == "True" for c in one["status"]["conditions"])


def test_a_job_admitted_to_the_a100_flavor_runs_on_a100_nodes(
    kube: Kube, kueue: dict[str, str], namespace: str
) -> None:
    ko.local_queue(kube, namespace, "a100", kueue["cq-a100"])
    queued_job(kube, namespace, "pool", "a100", nodes=2, gpusPerNode=8, procPerNode=1)
    pods = wait_running(kube, namespace, "pool", attempt=0, nodes=2, timeout=120)
    assert {kube.node(p.spec.node_name).metadata.labels[POOL] for p in pods} == {"a100"}


def test_priority_preempts_without_counting_a_failure_and_the_preempted_job_resumes(
    kube: Kube, kueue: dict[str, str], namespace: str
) -> None:
    ko.local_queue(kube, namespace, "gpu", kueue["cq-h100"])
    queued_job(kube, namespace, "batch", "gpu", kueue["low"], nodes=2, gpusPerNode=8, procPerNode=1)
    wait_running(kube, namespace, "batch", attempt=0, nodes=2, timeout=120)
    queued_job(kube, namespace, "urgent", "gpu", kueue["high"], nodes=2, gpusPerNode=8, procPerNode=1)

    cond = wait_for("batch evicted and queued again", lambda: queued(kube, namespace, "batch"), timeout=180)
    wait_running(kube, namespace, "urgent", attempt=0, nodes=2, timeout=180)
    st = status(kube, namespace, "batch")
    assert st["restarts"] == 0 and st["nodeFailures"] == 0, "an eviction is not a failure"
    assert any(e.startswith("Evicted") for e in events(kube, namespace, "batch")), cond

    finish(kube, namespace, "urgent")
    wait_running(kube, namespace, "batch", attempt=1, nodes=2, timeout=180)
    assert status(kube, namespace, "batch")["restarts"] == 0


def test_a_queue_that_does_not_exist_is_a_clear_condition(
    kube: Kube, kueue: dict[str, str], namespace: str
) -> None:
    queued_job(kube, namespace, "lost", "no-such-queue", nodes=1, gpusPerNode=1, procPerNode=1)
    cond = wait_for(
        "Kueue's verdict on the job",
        lambda: (c := queued(kube, namespace, "lost")) and "no-such-queue" in c["message"] and c,
        timeout=120,
    )
    assert "doesn't exist" in cond["message"] or "not exist" in cond["message"], cond
    assert not pods_of(kube, namespace, "lost")


def test_a_suspended_job_gives_its_quota_back_and_runs_again_when_resumed(
    kube: Kube, kueue: dict[str, str], namespace: str
) -> None:
    ko.local_queue(kube, namespace, "gpu", kueue["cq-h100"])
    queued_job(kube, namespace, "paused", "gpu", nodes=2, gpusPerNode=8, procPerNode=1)
    wait_running(kube, namespace, "paused", attempt=0, nodes=2, timeout=120)
    queued_job(kube, namespace, "waiting", "gpu", nodes=2, gpusPerNode=8, procPerNode=1)
    wait_for("waiting Queued", lambda: queued(kube, namespace, "waiting"), timeout=120)

    patch = {"spec": {"suspend": True}}
    kube.custom.patch_namespaced_custom_object(
        "aidc.dev", "v1alpha1", namespace, "trainingjobs", "paused", patch
    )
    wait_running(kube, namespace, "waiting", attempt=0, nodes=2, timeout=180)  # the quota it held
    assert status(kube, namespace, "paused")["phase"] == "Suspended" and not pods_of(
        kube, namespace, "paused"
    )

    patch = {"spec": {"suspend": False}}
    kube.custom.patch_namespaced_custom_object(
        "aidc.dev", "v1alpha1", namespace, "trainingjobs", "paused", patch
    )
    wait_for("paused back in the queue", lambda: queued(kube, namespace, "paused"), timeout=120)
    finish(kube, namespace, "waiting")
    wait_running(kube, namespace, "paused", attempt=1, nodes=2, timeout=180)
