"""Key material stays in its Secret, end to end: one encrypted TrainingJob writing to a checkpoint
volume and one InferenceService serving it, both really run by the development kubelet. Then the
trainer's and server's logs, every pod spec and every file on the volume are searched for the data key
(raw, base64, hex), and the volume for a known piece of the trained weights in plaintext.

(tests/e2e/test_helm_install.py covers what the operator writes: its log, Events, the custom resource.)
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from pathlib import Path

import pytest
import torch

from aidc_trainer.checkpoint_format import list_checkpoints, load_checkpoint
from aidc_trainer.crypto import KeyRing
from tests.e2e.helpers import hostpath_claim, status
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def key_forms(key: bytes) -> set[bytes]:
    """Every way a 32-byte key could be written down by mistake."""
    b64 = base64.b64encode(key)
    return {
        key,
        b64,
        b64.rstrip(b"="),
        base64.urlsafe_b64encode(key),
        key.hex().encode(),
        key.hex().upper().encode(),
    }


def weight_pattern(checkpoint: Path, keyring: KeyRing) -> bytes:
    """64 bytes of a trained weight matrix as torch stores it (little-endian float32): what an
    unencrypted checkpoint would hold verbatim."""
    state = load_checkpoint(checkpoint, keyring).state["model"]
    weight = next(
        t
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= 16
    )
    pattern = weight.detach().contiguous().flatten()[:16].numpy().tobytes()
    plain = io.BytesIO()
    torch.save(state, plain)
    assert pattern in plain.getvalue(), "the pattern is what a plaintext checkpoint would contain"
    return pattern


def test_key_never_in_logs_pod_specs_or_plaintext_on_the_volume(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    volume = tmp_path / "pv"
    hostpath_claim(kube, namespace, "ckpt", volume)
    command = ["python", "-m", "aidc_trainer", "--example", "mlp", "--steps", "200", "--eval-every", "0"]
    command += ["--log-every", "20", "--progress-every-seconds", "1"]
    kube.create_cr(
        "TrainingJob",
        namespace,
        "hush",
        {
            "command": command,
            "nodes": 1,
            "procPerNode": 1,
            "gpusPerNode": 1,
            "checkpoint": {"volume": {"persistentVolumeClaim": {"claimName": "ckpt"}}, "everySteps": 50},
        },
    )
    wait_for(
        "the job to finish",
        lambda: status(kube, namespace, "hush").get("phase") in ("Succeeded", "Failed"),
        timeout=480,  # torch start-up on a loaded machine: a budget, not a goal
        interval=1,
    )
    assert status(kube, namespace, "hush")["phase"] == "Succeeded", status(kube, namespace, "hush")

    kube.create_cr(
        "InferenceService", namespace, "hush", {"model": {"fromTrainingJob": "hush", "name": "mlp"}}
    )

    def ready_server() -> str | None:
        for pod in kube.pods(namespace, "aidc.dev/inferenceservice=hush"):
            addr = kubelet / pod.metadata.name / "address"
            if addr.exists():
                with urllib.request.urlopen(
                    f"http://{addr.read_text()}:8080/v2/health/ready", timeout=2
                ) as r:
                    if r.status == 200:
                        return addr.read_text()
        return None

    host = wait_for("a ready model server", ready_server, timeout=180, interval=1)
    meta = json.load(urllib.request.urlopen(f"http://{host}:8080/v2/models/mlp", timeout=5))
    infer = {
        "inputs": [
            {"name": meta["inputs"][0]["name"], "shape": [1, 10], "datatype": "FP32", "data": [0.1] * 10}
        ]
    }
    req = urllib.request.Request(
        f"http://{host}:8080/v2/models/mlp/infer",
        json.dumps(infer).encode(),
        {"Content-Type": "application/json"},
    )
    assert json.load(urllib.request.urlopen(req, timeout=10))["outputs"]

    secret = kube.core.read_namespaced_secret("hush-ckpt-key", namespace).data
    keys = {name[4:]: base64.b64decode(v) for name, v in secret.items() if name.startswith("key-")}
    current = base64.b64decode(secret["current-key-id"]).decode()
    assert keys and all(len(k) == 32 for k in keys.values())
    forms = set().union(*(key_forms(k) for k in keys.values()))

    def assert_clean(what: str, data: bytes) -> None:
        for form in forms:
            assert form not in data, f"key material in {what}"

    # 1. The trainer's and the server's logs (stdout/stderr and termination messages), as the
    #    development kubelet keeps them per pod. Their Secret volumes live beside them: not scanned.
    pods = kube.pods(namespace)
    trainers = {p.metadata.name for p in kube.pods(namespace, "aidc.dev/job-name=hush")}
    servers = {p.metadata.name for p in kube.pods(namespace, "aidc.dev/inferenceservice=hush")}
    logs = [f for d in kubelet.iterdir() for f in (d / "log", d / "termination-log") if f.is_file()]
    have = {f.parent.name for f in logs if f.name == "log" and f.stat().st_size > 0}
    assert trainers & have and servers & have, (trainers, servers, have)
    for f in logs:
        assert_clean(f"{f.parent.name}/{f.name}", f.read_bytes())

    # 2. Every pod spec (env, args, annotations) and the server's Deployment template.
    for pod in pods:
        assert_clean(
            f"pod {pod.metadata.name}", json.dumps(kube.api.sanitize_for_serialization(pod)).encode()
        )
    for deploy in kube.apps.list_namespaced_deployment(namespace).items:
        assert_clean(
            f"deployment {deploy.metadata.name}",
            json.dumps(kube.api.sanitize_for_serialization(deploy)).encode(),
        )

    # 3. Every file on the checkpoint volume: manifests, progress.json, and the encrypted blobs too
    #    (no key inside them either); and no trained weight in plaintext anywhere on it.
    checkpoints = list_checkpoints(volume / "hush")
    assert checkpoints, "the job wrote checkpoints"
    pattern = weight_pattern(checkpoints[-1], KeyRing(keys, current))
    files = [f for f in volume.rglob("*") if f.is_file()]
    assert any(f.name == "manifest.json" for f in files)
    for f in files:
        data = f.read_bytes()
        where = str(f.relative_to(volume))
        assert_clean(where, data)
        assert pattern not in data, f"trained weights in plaintext in {where}"
