"""End to end on the local cluster, with real processes: the operator renders the gang, the development
kubelet (hack/cluster/local_kubelet.py) runs each pod's container exactly as rendered — torchrun, the
aidc trainer, gloo, encrypted checkpoints on a hostPath PersistentVolume, progress reported through
the pod's own ServiceAccount token — a node dies mid-run, the operator recreates the gang on healthy
nodes, and the trainer resumes from the last checkpoint. Then an InferenceService serves it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.helpers import events_of, hostpath_claim, status
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_node_dies_mid_training_gang_moves_and_resumes_then_serves(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    hostpath_claim(kube, namespace, "ckpt", tmp_path / "pv")
    # Long enough that the node dies mid-run even on a quiet machine (~3 ms a step there); the kill
    # comes within seconds of checkpoint 300.
    steps = 6000
    command = ["python", "-m", "aidc_trainer", "--example", "mlp", "--steps", str(steps), "--eval-every", "0"]
    command += ["--log-every", "50", "--progress-every-seconds", "1"]
    kube.create_cr(
        "TrainingJob",
        namespace,
        "e2e",
        {
            "command": command,
            "nodes": 2,
            "procPerNode": 1,
            "gpusPerNode": 1,
            "checkpoint": {"volume": {"persistentVolumeClaim": {"claimName": "ckpt"}}, "everySteps": 100},
            "failurePolicy": {"backoffSeconds": 1, "maxRestarts": 5},
        },
    )
    # Training really runs: rank 0 reports checkpoints through its pod's annotations.
    wait_for(
        "a few checkpoints",
        lambda: (status(kube, namespace, "e2e").get("lastCheckpoint") or {}).get("step", 0) >= 300,
        timeout=480,  # torch start-up and 300 steps on a loaded 2-core machine: a budget, not a goal
        interval=0.5,
    )
    st = status(kube, namespace, "e2e")
    assert st["attempt"] == 0 and st["phase"] == "Running"
    pods = kube.pods(namespace, "aidc.dev/job-name=e2e,aidc.dev/attempt=0")
    victim = next(p for p in pods if p.metadata.labels["aidc.dev/node-rank"] == "1").spec.node_name
    saved_before = status(kube, namespace, "e2e")["lastCheckpoint"]["step"]
    kube.fail_node(victim)  # the machine loses power: its processes die with it

    wait_for(
        "the job to finish",
        lambda: status(kube, namespace, "e2e").get("phase") in ("Succeeded", "Failed"),
        timeout=300,
        interval=1,
    )
    st = status(kube, namespace, "e2e")
    assert st["phase"] == "Succeeded", st
    assert st["attempt"] >= 1 and victim in (st.get("excludedNodes") or []) + [st["lastFailure"]["node"]]
    assert st["lastCheckpoint"]["step"] == steps
    final = kube.pods(namespace, f"aidc.dev/job-name=e2e,aidc.dev/attempt={st['attempt']}")
    assert final and victim not in {p.spec.node_name for p in final}

    # The trainer of the final attempt resumed from a checkpoint at least as new as the one reported
    # before the node died: at most one checkpoint interval of work was lost.
    rank0 = next(p for p in final if p.metadata.labels["aidc.dev/node-rank"] == "0")
    resumed = [e for e in events_of(kubelet / rank0.metadata.name / "log") if e.get("event") == "resume"]
    assert resumed and saved_before <= resumed[0]["step"] < steps, resumed

    # Checkpoints on the volume are encrypted: the manifest names the operator-made key id.
    manifests = sorted((tmp_path / "pv" / "e2e").glob("step-*/manifest.json"))
    assert manifests
    manifest = json.loads(manifests[-1].read_text())
    secret = kube.core.read_namespaced_secret("e2e-ckpt-key", namespace)
    assert manifest["key_id"] == base64.b64decode(secret.data["current-key-id"]).decode()

    # Serve it: an InferenceService from the job, its pod run for real by the development kubelet.
    # The job may finish before the node lifecycle controller has tainted the dead node (the operator
    # judges it by its Lease, in seconds; the scheduler only by the taint): until then the scheduler may
    # bind the model server to that node, where it would never run. Wait for the taint, as the scheduler does.
    wait_for(
        "the dead node tainted unreachable",
        lambda: any(t.key == "node.kubernetes.io/unreachable" for t in kube.node(victim).spec.taints or []),
        timeout=180,
        interval=1,
    )
    # Same name as the job, as users do: the job's Services must leave the name to this one.
    kube.create_cr("InferenceService", namespace, "e2e", {"model": {"fromTrainingJob": "e2e", "name": "mlp"}})

    def ready_server() -> str | None:
        for pod in kube.pods(namespace, "aidc.dev/inferenceservice=e2e"):
            addr = kubelet / pod.metadata.name / "address"
            if not addr.exists():
                continue
            host = addr.read_text()
            with urllib.request.urlopen(f"http://{host}:8080/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return host
        return None

    try:
        host = wait_for("a ready model server", ready_server, timeout=180, interval=1)
    except AssertionError:
        where = {
            p.metadata.name: (p.spec.node_name, p.status.phase)
            for p in kube.pods(namespace, "aidc.dev/inferenceservice=e2e")
        }
        raise AssertionError(f"no ready model server; its pods (node, phase): {where}") from None
    meta = json.load(urllib.request.urlopen(f"http://{host}:8080/v2/models/mlp", timeout=5))
    assert str(steps) in meta["versions"]
    req = urllib.request.Request(
        f"http://{host}:8080/v2/models/mlp/infer",
        data=json.dumps(
            {
                "inputs": [
                    {
                        "name": meta["inputs"][0]["name"],
                        "shape": [3, 10],
                        "datatype": "FP32",
                        "data": [0.05 * i for i in range(30)],
                    }
                ]
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    out = json.load(urllib.request.urlopen(req, timeout=10))
    assert out["model_version"] == str(steps)
    assert out["outputs"][0]["shape"][0] == 3
    wait_for(
        "InferenceService Ready",
        lambda: (
            (kube.get_cr("inferenceservices", namespace, "e2e").get("status") or {}).get("phase") == "Ready"
        ),
        timeout=60,
    )


def train_into(directory: Path, steps: int, *extra: str) -> None:
    """The real trainer CLI, one local process: unencrypted checkpoints for a storage model."""
    args = ["--steps", str(steps), "--eval-every", "0", "--parallel", "none", "--device", "cpu", *extra]
    args += ["--metrics-port", "-1", "--checkpoint-dir", str(directory)]
    out = subprocess.run(
        [sys.executable, "-m", "aidc_trainer", *args],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "trainer"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_unready_server_tells_the_inferenceservice_why_then_serves_the_fixed_model(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    """The server's own reason reaches the InferenceService through the apiserver's pod proxy, the
    kubelet's readiness probe keeps the broken replica out of the Service, and a good checkpoint that
    appears later is hot-loaded and reported as the served version."""
    models = tmp_path / "pv"
    train_into(models, 5)
    (blob,) = [p for p in (models / "step-000000005").iterdir() if p.name != "manifest.json"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte on the volume
    blob.write_bytes(bytes(data))
    hostpath_claim(kube, namespace, "models", models)
    storage = {"volume": {"persistentVolumeClaim": {"claimName": "models"}}}
    kube.create_cr(
        "InferenceService",
        namespace,
        "fixme",
        {"model": {"name": "mlp", "watchSeconds": 1, "storage": storage}},
    )

    def server_pod():
        pods = kube.pods(namespace, "aidc.dev/inferenceservice=fixme")
        return pods[0] if pods and (kubelet / pods[0].metadata.name / "address").exists() else None

    pod = wait_for("the model server running", server_pod, timeout=120, interval=0.5)
    if (kubelet / pod.metadata.name / "address").read_text() != pod.status.pod_ip:
        pytest.skip("the development kubelet cannot add pod addresses to lo (needs CAP_NET_ADMIN)")

    def ready_condition() -> dict:
        st = kube.get_cr("inferenceservices", namespace, "fixme").get("status") or {}
        return next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})

    cond = wait_for(
        "the server's reason on the InferenceService",
        lambda: (c := ready_condition()).get("reason") == "ModelNotLoaded" and "step-" in c["message"] and c,
        timeout=120,
        interval=1,
    )
    assert cond["status"] == "False" and cond["message"].startswith(f"pod {pod.metadata.name}: ")
    assert "step-000000005" in cond["message"] and "no checkpoint passed verification" in cond["message"]
    live = kube.core.read_namespaced_pod(pod.metadata.name, namespace)
    ready = next(c for c in live.status.conditions if c.type == "Ready")
    assert ready.status == "False"  # the probe's verdict, not kwok's

    # Every checkpoint there is damaged: the trainer refuses to overwrite them unless told to start
    # fresh, which moves step 5 aside (never deletes it); step 12 verifies.
    train_into(models, 12, "--on-no-valid-checkpoint", "StartFresh")
    assert list(models.glob("damaged-*/step-000000005"))
    st = wait_for(
        "Ready on the fixed model",
        lambda: (
            (s := kube.get_cr("inferenceservices", namespace, "fixme")["status"]).get("phase") == "Ready"
            and s
        ),
        timeout=120,
        interval=1,
    )
    assert ready_condition()["status"] == "True" and st["readyReplicas"] == 1
    # What the server itself says it serves, asked through the pod proxy (storage carries no version).
    wait_for(
        "the served version",
        lambda: kube.get_cr("inferenceservices", namespace, "fixme")["status"].get("modelVersion") == "12",
        timeout=60,
        interval=1,
    )
