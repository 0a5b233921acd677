"""TrainingJob reconciliation on the real local control plane (kube-apiserver + etcd + scheduler +
controller-manager + kwok GPU nodes) with the operator running as a real process.

How failures are simulated on kwok pods: kwok only plays the kubelet, so no container really runs.
- A container exit is the kubelet's report: the test patches the pod's *status* subresource to
  phase Failed with a terminated containerStatus (exitCode, reason, message), exactly the object a
  kubelet would write. kwok's stages leave Failed pods alone.
- A node failure is the node's kwok agent SIGKILLed (its Lease lapses; the node lifecycle controller
  marks the node Unknown and taints it unreachable), or the Node object deleted.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from kubernetes import client

from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "aidc.dev", "v1alpha1", "trainingjobs"


def create_job(kube: Kube, ns: str, name: str, **spec: Any) -> dict:
    spec.setdefault("command", ["python", "-m", "aidc_trainer", "--example", "mlp"])
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": spec,
    }
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def job(kube: Kube, ns: str, name: str) -> dict:
    return kube.get_cr(PLURAL, ns, name)


def status(kube: Kube, ns: str, name: str) -> dict:
    return job(kube, ns, name).get("status") or {}


def gang(kube: Kube, ns: str, name: str, attempt: int | None = None) -> list[client.V1Pod]:
    selector = f"aidc.dev/job-name={name}"
    if attempt is not None:
        selector += f",aidc.dev/attempt={attempt}"
    return sorted(kube.pods(ns, selector), key=lambda p: p.metadata.name)


def wait_running(kube: Kube, ns: str, name: str, attempt: int, nodes: int, timeout: float = 60) -> list:
    wait_for(
        f"{name} Running attempt {attempt}",
        lambda: (
            (s := status(kube, ns, name)).get("phase") == "Running"
            and s.get("attempt") == attempt
            and s.get("readyNodes") == nodes
        ),
        timeout=timeout,
    )
    pods = gang(kube, ns, name)
    assert len(pods) == nodes and all(p.metadata.labels["aidc.dev/attempt"] == str(attempt) for p in pods)
    return pods


def report_exit(kube: Kube, ns: str, pod: str, exit_code: int, reason: str, message: str = "") -> None:
    """What a kubelet writes when the container exits: phase, not Ready, the terminated state."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    terminated = {
        "exitCode": exit_code,
        "reason": reason,
        "message": message,
        "startedAt": now,
        "finishedAt": now,
    }
    kube.core.patch_namespaced_pod_status(
        pod,
        ns,
        {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "x",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            }
        },
    )


def fail_pod(kube: Kube, ns: str, pod: str, exit_code: int, reason: str = "Error", message: str = "") -> None:
    report_exit(kube, ns, pod, exit_code, reason, message)


def succeed_pod(kube: Kube, ns: str, pod: str) -> None:
    report_exit(kube, ns, pod, 0, "Completed")


def events(kube: Kube, ns: str, name: str) -> list[str]:
    items = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [f"{e.reason}: {e.message}" for e in items]


def test_job_runs_as_a_wired_gang_on_distinct_gpu_nodes(kube: Kube, operator, namespace: str) -> None:
    create_job(
        kube,
        namespace,
        "wired",
        nodes=3,
        procPerNode=4,
        masterPort=29511,
        resources={"requests": {"cpu": "2", "memory": "4Gi"}},
    )
    pods = wait_running(kube, namespace, "wired", attempt=0, nodes=3)
    assert len({p.spec.node_name for p in pods}) == 3, "one pod per node"
    for rank, pod in enumerate(pods):
        c = pod.spec.containers[0]
        env = {e.name: e.value for e in c.env}
        assert env["MASTER_ADDR"] == f"wired-0.wired-ranks.{namespace}.svc"
        assert (env["MASTER_PORT"], env["WORLD_SIZE"], env["RANK"]) == ("29511", "3", str(rank))
        assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("3", "4", str(rank))
        assert c.command[:3] == ["torchrun", "-m", "aidc_trainer"]
        assert c.resources.limits["nvidia.com/gpu"] == "4"
        assert c.resources.requests["cpu"] == "2"
        assert pod.spec.hostname == f"wired-{rank}" and pod.spec.subdomain == "wired-ranks"
        mounts = {m.mount_path: m for m in c.volume_mounts}
        assert mounts["/var/run/aidc/keys"].read_only and "/dev/shm" in mounts
    svc = kube.core.read_namespaced_service("wired-ranks", namespace)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
    secret = kube.core.read_namespaced_secret("wired-ckpt-key", namespace)
    assert "current-key-id" in secret.data
    st = status(kube, namespace, "wired")
    assert st["nodes"] == "3/3" and st["observedGeneration"] == 1 and st["startTime"]
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds["Running"] == "True" and conds["CheckpointKeyReady"] == "True"
    assert any(e.startswith("CreatingGang") for e in events(kube, namespace, "wired"))
    table = kube.kubectl("get", "tj", "wired", "-n", namespace).stdout.splitlines()[1].split()
    assert table[1:4] == ["Running", "3/3", "0"]


def test_retryable_exit_restarts_the_whole_gang_after_backoff(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "oom", nodes=2, failurePolicy={"backoffSeconds": 2, "maxRestarts": 3})
    first = wait_running(kube, namespace, "oom", attempt=0, nodes=2)
    t0 = time.monotonic()
    fail_pod(kube, namespace, first[1].metadata.name, 137, "OOMKilled")
    wait_for("restarting", lambda: status(kube, namespace, "oom").get("phase") == "Restarting")
    # The whole old gang goes before any new pod appears; never two attempts alive at once.
    seen_attempts: set[frozenset[str]] = set()

    def new_gang_running() -> bool:
        pods = gang(kube, namespace, "oom")
        seen_attempts.add(frozenset(p.metadata.labels["aidc.dev/attempt"] for p in pods))
        return (
            status(kube, namespace, "oom").get("phase") == "Running"
            and len(pods) == 2
            and all(p.metadata.labels["aidc.dev/attempt"] == "1" for p in pods)
        )

    wait_for("attempt 1 running", new_gang_running, interval=0.1)
    assert time.monotonic() - t0 >= 2, "backoff was not honoured"
    assert frozenset({"0", "1"}) not in seen_attempts
    st = status(kube, namespace, "oom")
    assert st["restarts"] == 1 and st["attempt"] == 1
    assert st["lastFailure"]["reason"] == "OOMKilled" and "137" in st["lastFailure"]["message"]
    assert any(e.startswith("PodFailed") for e in events(kube, namespace, "oom"))


def test_non_retryable_exit_fails_at_once_with_the_reason(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "bug", nodes=2)
    pods = wait_running(kube, namespace, "bug", attempt=0, nodes=2)
    fail_pod(kube, namespace, pods[0].metadata.name, 1, "Error", "ValueError: bad learning rate")
    wait_for("failed", lambda: status(kube, namespace, "bug").get("phase") == "Failed")
    st = status(kube, namespace, "bug")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NonRetryableExit"
    assert "code 1" in failed["message"] and "bad learning rate" in failed["message"]
    assert st["restarts"] == 0 and st["completionTime"]
    # cleanPodPolicy Running (default): the still-running peer is deleted, the failed pod kept for logs.
    wait_for(
        "running peer deleted",
        lambda: [p.metadata.name for p in gang(kube, namespace, "bug")] == [pods[0].metadata.name],
    )


def test_max_restarts_exceeded_fails_the_job(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "flaky", nodes=1, failurePolicy={"backoffSeconds": 0, "maxRestarts": 1})
    pods = wait_running(kube, namespace, "flaky", attempt=0, nodes=1)
    fail_pod(kube, namespace, pods[0].metadata.name, 143, "Error")
    pods = wait_running(kube, namespace, "flaky", attempt=1, nodes=1)
    fail_pod(kube, namespace, pods[0].metadata.name, 143, "Error")
    wait_for("failed", lambda: status(kube, namespace, "flaky").get("phase") == "Failed")
    failed = next(c for c in status(kube, namespace, "flaky")["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "maxRestarts=1" in failed["message"]


def test_lost_node_recreates_the_gang_on_healthy_nodes(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "survivor", nodes=3)
    pods = wait_running(kube, namespace, "survivor", attempt=0, nodes=3)
    victim = pods[1].spec.node_name
    kube.fail_node(victim)
    t0 = time.monotonic()
    new = wait_running(kube, namespace, "survivor", attempt=1, nodes=3, timeout=120)
    elapsed = time.monotonic() - t0
    assert victim not in {p.spec.node_name for p in new}
    st = status(kube, namespace, "survivor")
    assert st["nodeFailures"] == 1 and st["restarts"] == 0
    # The kubelet's Lease expiring is usually noticed before the controller marks the node Unknown.
    assert st["lastFailure"]["node"] == victim
    assert st["lastFailure"]["reason"] in ("NodeLeaseExpired", "NodeUnreachable")
    assert victim in st["excludedNodes"]
    assert any(e.startswith("NodeFailure") for e in events(kube, namespace, "survivor"))
    # Not the default path, which waits out the 300 s toleration before evicting: a behaviour bound, not a
    # speed goal (bench/node_failure.py times it), so a loaded machine stays green.
    assert elapsed < 240, f"recovery took {elapsed:.0f}s"
    # Once the node is Ready again it is no longer avoided.
    kube.restore_node(victim)
    wait_for(
        "node no longer excluded",
        lambda: victim not in status(kube, namespace, "survivor").get("excludedNodes", []),
        timeout=60,
    )


def test_deleted_node_recreates_the_gang(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "nodegone", nodes=2)
    pods = wait_running(kube, namespace, "nodegone", attempt=0, nodes=2)
    victim = pods[0].spec.node_name
    kube.fail_node(victim)  # the machine is gone: its agent and then its Node object
    kube.delete_node(victim)
    new = wait_running(kube, namespace, "nodegone", attempt=1, nodes=2, timeout=90)
    assert victim not in {p.spec.node_name for p in new}
    assert status(kube, namespace, "nodegone")["lastFailure"]["reason"] in ("NodeDeleted", "NodeLeaseExpired")


def test_operator_restart_adopts_without_duplicates(kube: Kube, crds, namespace: str, tmp_path) -> None:
    from tests.conftest import OperatorProcess

    ns = kube.create_namespace("adopt", prefix="o")
    try:
        op = OperatorProcess(kube, tmp_path / "op.log", [ns]).start()
        create_job(kube, ns, "adopted", nodes=2)
        wait_running(kube, ns, "adopted", attempt=0, nodes=2)
        before = {p.metadata.uid for p in gang(kube, ns, "adopted")}
        st_before = status(kube, ns, "adopted")

        def key_secrets() -> list[tuple[str, str]]:
            items = kube.core.list_namespaced_secret(
                ns, label_selector="aidc.dev/checkpoint-key-for=adopted"
            ).items
            return [(s.metadata.uid, s.metadata.resource_version) for s in items]

        keys_before = key_secrets()
        assert len(keys_before) == 1
        op.kill()
        op2 = OperatorProcess(kube, tmp_path / "op2.log", [ns]).start()
        time.sleep(8)  # several reconcile passes of the new operator
        after = {p.metadata.uid for p in gang(kube, ns, "adopted")}
        assert after == before, "the restarted operator replaced or duplicated pods"
        st_after = status(kube, ns, "adopted")
        for key in ("phase", "attempt", "restarts", "startTime", "nodes", "currentKeyId"):
            assert st_after[key] == st_before[key], key
        assert key_secrets() == keys_before, "the key Secret was recreated or rewritten after the restart"
        op2.stop()
    finally:
        kube.delete_namespace(ns)


def test_suspend_deletes_pods_and_resume_recreates(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "pausable", nodes=2)
    wait_running(kube, namespace, "pausable", attempt=0, nodes=2)
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "pausable", {"spec": {"suspend": True}}
    )
    wait_for(
        "suspended without pods",
        lambda: (
            status(kube, namespace, "pausable").get("phase") == "Suspended"
            and not gang(kube, namespace, "pausable")
        ),
    )
    assert status(kube, namespace, "pausable")["startTime"], "status is kept while suspended"
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "pausable", {"spec": {"suspend": False}}
    )
    wait_running(kube, namespace, "pausable", attempt=1, nodes=2)


def test_success_then_ttl_deletes_and_children_cascade(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "short", nodes=2, ttlSecondsAfterFinished=3)
    pods = wait_running(kube, namespace, "short", attempt=0, nodes=2)
    for p in pods:
        succeed_pod(kube, namespace, p.metadata.name)
    wait_for("succeeded", lambda: status(kube, namespace, "short").get("phase") == "Succeeded")
    assert status(kube, namespace, "short")["completionTime"]

    def gone() -> bool:
        try:
            job(kube, namespace, "short")
        except client.ApiException as e:
            return e.status == 404
        return False

    wait_for("job deleted by TTL", gone, timeout=30)
    # The garbage collector removes what the job owned (Service, pods); the retained key Secret stays.
    wait_for(
        "owned objects collected",
        lambda: (
            not gang(kube, namespace, "short")
            and not any(
                s.metadata.name == "short-ranks" for s in kube.core.list_namespaced_service(namespace).items
            )
        ),
        timeout=60,
    )
    assert (
        kube.core.read_namespaced_secret("short-ckpt-key", namespace).metadata.labels[
            "aidc.dev/checkpoint-key-for"
        ]
        == "short"
    )


def test_progress_reported_by_rank0_lands_in_status(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "reporting", nodes=2)
    pods = wait_running(kube, namespace, "reporting", attempt=0, nodes=2)
    rank0 = next(p for p in pods if p.metadata.labels["aidc.dev/node-rank"] == "0")
    kube.core.patch_namespaced_pod(
        rank0.metadata.name,
        namespace,
        {
            "metadata": {
                "annotations": {
                    "aidc.dev/progress": json.dumps({"step": 120, "totalSteps": 1000}),
                    "aidc.dev/last-checkpoint": json.dumps(
                        {"step": 100, "path": "/checkpoints/reporting/step-000000100"}
                    ),
                }
            }
        },
    )
    wait_for(
        "progress in status",
        lambda: (status(kube, namespace, "reporting").get("progress") or {}).get("step") == 120,
    )
    st = status(kube, namespace, "reporting")
    assert st["progress"]["totalSteps"] == 1000
    assert st["lastCheckpoint"] == {"step": 100, "path": "/checkpoints/reporting/step-000000100"}
    header, row = kube.kubectl("get", "tj", "reporting", "-n", namespace).stdout.splitlines()[:2]
    # kubectl aligns columns and leaves empty cells blank: read each cell below its header
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    cells = {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)}
    assert (cells["STEP"], cells["CHECKPOINT"]) == ("120", "100")


def test_missing_pvc_is_a_waiting_condition_not_a_failure(kube: Kube, operator, namespace: str) -> None:
    create_job(
        kube, namespace, "nopvc", checkpoint={"volume": {"persistentVolumeClaim": {"claimName": "nope"}}}
    )
    wait_for(
        "waiting condition",
        lambda: any(
            c["type"] == "CheckpointVolumeReady" and c["status"] == "False" and "'nope'" in c["message"]
            for c in status(kube, namespace, "nopvc").get("conditions", [])
        ),
    )
    assert status(kube, namespace, "nopvc")["phase"] == "Pending"
    assert not gang(kube, namespace, "nopvc")
    kube.core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "nope"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    wait_for("pods once the PVC exists", lambda: len(gang(kube, namespace, "nopvc")) == 1)


def test_wrong_size_user_key_is_a_clear_condition_and_starts_nothing(
    kube: Kube, operator, namespace: str
) -> None:
    import base64

    kube.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "mykey"},
            "data": {
                "current-key-id": base64.b64encode(b"k1").decode(),
                "key-k1": base64.b64encode(b"too-short").decode(),
            },
        },
    )
    create_job(kube, namespace, "badkey", checkpoint={"encryption": {"keySecretRef": {"name": "mykey"}}})
    wait_for(
        "key condition",
        lambda: any(
            c["type"] == "CheckpointKeyReady" and c["status"] == "False" and c["reason"] == "KeySecretInvalid"
            for c in status(kube, namespace, "badkey").get("conditions", [])
        ),
    )
    cond = next(
        c for c in status(kube, namespace, "badkey")["conditions"] if c["type"] == "CheckpointKeyReady"
    )
    assert "'mykey'" in cond["message"] and "too-short" not in cond["message"]
    assert not gang(kube, namespace, "badkey")
    # The user's Secret is untouched.
    assert (
        kube.core.read_namespaced_secret("mykey", namespace).data["key-k1"]
        == base64.b64encode(b"too-short").decode()
    )
