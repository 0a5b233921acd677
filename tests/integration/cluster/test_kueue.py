"""Kueue v0.17.0 in the local cluster (hack/cluster/kueue.py): the process, its CRDs and webhooks, the
queues of examples/kueue/, and a queued batch/v1 Job that Kueue admits and unsuspends."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "kueue"
QUEUE_FILES = [
    EXAMPLES / f
    for f in (
        "00-namespaces.yaml",
        "10-resource-flavors.yaml",
        "20-cluster-queues.yaml",
        "30-local-queues.yaml",
        "40-priority-classes.yaml",
    )
]
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
POOL = "aidc.dev/gpu-pool"


@pytest.fixture(scope="module")
def kueue(kube: Kube) -> Kube:
    if kube.local is None:
        pytest.skip("checks the local cluster's Kueue process (KUBECONFIG names another cluster)")
    if not kube.local.kueue:
        pytest.skip("the local cluster was started without Kueue (AIDC_KUEUE=0)")
    return kube


@pytest.fixture(scope="module")
def queues(kueue: Kube) -> Iterator[Kube]:
    """examples/kueue/ applied (all but the TrainingJob); removed again afterwards."""
    files = [a for f in QUEUE_FILES for a in ("-f", str(f))]
    kueue.kubectl("apply", *files)
    yield kueue
    kueue.kubectl("delete", "--ignore-not-found", "--wait=false", *files, check=False)


def condition(obj: dict[str, Any], kind: str) -> str | None:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return c["status"]
    return None


def cluster_object(kube: Kube, plural: str, name: str) -> dict[str, Any]:
    return kube.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)


def local_queue(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", name)


def gpu_job(name: str, *, gpus: int, pods: int = 1, hold: bool = False) -> client.V1Job:
    """A suspended Job asking team-a's queue for `pods` x `gpus` GPUs. hold=True adds a node selector no
    node matches: its pods stay Pending and its quota stays in use (kwok would complete them at once)."""
    resources = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)}
    return client.V1Job(
        metadata=client.V1ObjectMeta(
            name=name,
            labels={"kueue.x-k8s.io/queue-name": "gpu-queue", "kueue.x-k8s.io/priority-class": "high"},
        ),
        spec=client.V1JobSpec(
            suspend=True,
            parallelism=pods,
            completions=pods,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    node_selector={"aidc.dev/test-hold": "never"} if hold else None,
                    containers=[
                        client.V1Container(
                            name="main",
                            image="registry.invalid/probe:1",
                            resources=client.V1ResourceRequirements(requests=resources, limits=resources),
                        )
                    ],
                )
            ),
        ),
    )


def workload_of(kube: Kube, namespace: str, job: str) -> dict[str, Any] | None:
    items = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]
    for w in items:
        if any(o["kind"] == "Job" and o["name"] == job for o in w["metadata"].get("ownerReferences", [])):
            return w
    return None


def admitted_flavor(kube: Kube, namespace: str, job: str) -> str | None:
    """The GPU flavor Kueue admitted the job's Workload with, once it is Admitted."""
    w = workload_of(kube, namespace, job)
    if not w or condition(w, "Admitted") != "True":
        return None
    return w["status"]["admission"]["podSetAssignments"][0]["flavors"]["nvidia.com/gpu"]


def delete_jobs(kube: Kube, namespace: str, names: list[str]) -> None:
    batch = client.BatchV1Api(kube.api)
    for name in names:
        try:
            batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except client.ApiException as e:
            if e.status != 404:
                raise
    wait_for(
        "the jobs' Workloads to be gone",
        lambda: all(workload_of(kube, namespace, n) is None for n in names),
        timeout=120,
    )


def test_kueue_runs_with_crds_established_and_webhooks_on_loopback(kueue: Kube) -> None:
    local = kueue.local
    assert local is not None
    pid = local.running_extra("kueue")
    assert pid, f"kueue is not running (log: {local.logfile('kueue')})"
    assert os.readlink(f"/proc/{pid}/exe").endswith("/kueue")
    with urllib.request.urlopen(f"http://127.0.0.1:{local.ports['kueue_health']}/readyz", timeout=5) as r:
        assert r.status == 200
    for plural in ("workloads", "clusterqueues", "localqueues", "resourceflavors", "workloadpriorityclasses"):
        crd = json.loads(kueue.kubectl("get", f"crd/{plural}.{GROUP}", "-o", "json").stdout)
        assert condition(crd, "Established") == "True", plural
    # Conversion and admission both go to the process on loopback, verified with the cluster's CA.
    crd = json.loads(kueue.kubectl("get", f"crd/workloads.{GROUP}", "-o", "json").stdout)
    url = f"https://127.0.0.1:{local.ports['kueue_webhook']}"
    assert crd["spec"]["conversion"]["webhook"]["clientConfig"]["url"] == f"{url}/convert"
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        name = f"kueue-{kind.removesuffix('webhookconfiguration')}-webhook-configuration"
        conf = json.loads(kueue.kubectl("get", kind, name, "-o", "json").stdout)
        assert conf["webhooks"], name
        for w in conf["webhooks"]:
            assert w["clientConfig"]["url"].startswith(f"{url}/"), w["name"]
            assert w["clientConfig"]["caBundle"]
            # Only Kueue's own types and batch Jobs: pods are never held up by Kueue's webhooks here.
            groups = {g for rule in w["rules"] for g in rule["apiGroups"]}
            assert groups <= {GROUP, "batch"}, w["name"]


def test_gpu_nodes_are_split_into_pools(kueue: Kube) -> None:
    local = kueue.local
    assert local is not None
    pools = {n: kueue.node(n).metadata.labels[POOL] for n in local.node_names()}
    expected = ["a100", "h100"] if len(pools) > 2 else ["h100"]  # pairs: 0,1 h100; 2,3 a100; ...
    assert sorted(set(pools.values())) == expected
    for name, pool in pools.items():
        assert pool.upper() in kueue.node(name).metadata.labels["nvidia.com/gpu.product"]


def test_example_queues_become_active(queues: Kube) -> None:
    for flavor in ("h100", "a100"):
        rf = cluster_object(queues, "resourceflavors", flavor)
        assert rf["spec"]["nodeLabels"] == {POOL: flavor}
    for cq in ("team-a", "team-b"):
        wait_for(
            f"ClusterQueue {cq} Active",
            lambda cq=cq: condition(cluster_object(queues, "clusterqueues", cq), "Active") == "True",
            timeout=120,
        )
    for ns in ("team-a", "team-b"):
        wait_for(
            f"LocalQueue {ns}/gpu-queue Active",
            lambda ns=ns: condition(local_queue(queues, ns, "gpu-queue"), "Active") == "True",
            timeout=120,
        )
    assert cluster_object(queues, "workloadpriorityclasses", "high")["value"] == 1000


def test_sample_trainingjob_is_valid(crds: Kube, queues: Kube) -> None:
    """The sample TrainingJob passes the aidc CRD's schema (server-side dry run; nothing is created)."""
    out = crds.kubectl("apply", "--dry-run=server", "-f", str(EXAMPLES / "trainingjob.yaml")).stdout
    assert "llm-finetune" in out


def test_queued_job_is_admitted_and_unsuspended(queues: Kube) -> None:
    ns, name = "team-a", f"queued-{uuid.uuid4().hex[:6]}"
    batch = client.BatchV1Api(queues.api)
    batch.create_namespaced_job(ns, gpu_job(name, gpus=1))
    try:
        flavor = wait_for(
            "the Job's Workload Admitted", lambda: admitted_flavor(queues, ns, name), timeout=120
        )
        assert flavor == "h100"  # team-a's own pool comes first in its ClusterQueue
        job = wait_for(
            "Kueue to unsuspend the Job",
            lambda: (j := batch.read_namespaced_job(name, ns)).spec.suspend is False and j,
            timeout=120,
        )
        # Admission put the flavor's node labels on the pods: they run on the pool that was charged.
        assert job.spec.template.spec.node_selector == {POOL: "h100"}
        pod = wait_for(
            "the Job's pod bound to a node",
            lambda: next((p for p in queues.pods(ns, f"job-name={name}") if p.spec.node_name), None),
            timeout=120,
        )
        assert queues.node(pod.spec.node_name).metadata.labels[POOL] == "h100"
    finally:
        delete_jobs(queues, ns, [name])


def test_full_pool_borrows_from_the_cohort(queues: Kube) -> None:
    """team-a's 16 H100 GPUs are taken; its next job is admitted on A100 quota lent by team-b."""
    ns, tag = "team-a", uuid.uuid4().hex[:6]
    batch = client.BatchV1Api(queues.api)
    names = [f"hold-{tag}", f"borrow-{tag}"]
    wait_for(
        "team-a's earlier workloads to be gone",
        lambda: cluster_object(queues, "clusterqueues", "team-a")["status"].get("reservingWorkloads") == 0,
        timeout=120,
    )
    try:
        batch.create_namespaced_job(ns, gpu_job(names[0], gpus=8, pods=2, hold=True))
        assert (
            wait_for("the holding job admitted", lambda: admitted_flavor(queues, ns, names[0]), 120) == "h100"
        )
        batch.create_namespaced_job(ns, gpu_job(names[1], gpus=8))
        assert wait_for("the next job admitted", lambda: admitted_flavor(queues, ns, names[1]), 120) == "a100"
    finally:
        delete_jobs(queues, ns, names)
