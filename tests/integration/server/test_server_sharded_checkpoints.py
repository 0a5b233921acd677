"""The real server process: sharded (DCP, encrypted) checkpoints serve; unregistered models do not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from server_testkit import MLP_SPEC, ROOT, free_port, make_keys, wait_for

from aidc_trainer.checkpoint import save_checkpoint
from aidc_trainer.model_registry import default_registry

HERE = Path(__file__).resolve().parent
X = np.random.default_rng(5).standard_normal((3, 10)).astype(np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 10], "data": X.ravel().tolist()}]}


def ready_reason(base: str) -> str:
    r = httpx.get(f"{base}/v2/health/ready", timeout=5)
    return "" if r.status_code == 200 else r.json().get("reason", "")


def write_sharded(root: Path, step: int, seed: int, keys: Path, world: int = 2) -> None:
    """A checkpoint written by `world` gloo ranks, each saving only its shard of every parameter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("trainer", "server"))}
    port = free_port()
    args = [str(port), str(root), str(step), str(seed), str(keys), json.dumps(MLP_SPEC)]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(HERE / "dcp_sharded_writer.py"), str(r), str(world), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    for proc in ranks:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]


def test_sharded_encrypted_checkpoint_serves_the_model_it_was_saved_from(tmp_path, server_process):
    keys = make_keys(tmp_path / "keys")
    write_sharded(tmp_path / "ck", 30, seed=4, keys=keys)
    step_dir = tmp_path / "ck" / "step-000000030"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    shards = sorted(n for n in manifest["files"] if n.endswith(".distcp"))
    assert len(shards) == 2 and manifest["layout"] == "dcp" and manifest["key_id"] == "k1"
    sizes = [manifest["files"][n]["size"] for n in shards]
    assert max(sizes) < 0.75 * sum(sizes)  # each rank wrote about half, not the full model
    for name in manifest["files"]:
        assert (step_dir / name).read_bytes().startswith(b"AIDCGCM1"), name  # encrypted at rest

    torch.manual_seed(4)
    reference = default_registry().build(MLP_SPEC).eval()
    with torch.inference_mode():
        expected = reference(torch.from_numpy(X)).numpy()

    server = server_process(
        "--checkpoint-dir", str(tmp_path / "ck"), "--model-name", "mlp", "--key-dir", str(keys)
    )
    wait_for(lambda: ready_reason(server.base) == "", timeout=180)
    r = httpx.post(f"{server.base}/v2/models/mlp/infer", json=BODY, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "30"
    served = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # a torchrun job of the real trainer
def test_checkpoint_of_the_fsdp_trainer_serves(tmp_path, server_process):
    """What the trainer writes (2 FSDP ranks, encrypted) is what the server serves, resharded to one."""
    from aidc_trainer.checkpoint_sharded import load_full
    from aidc_trainer.keyring import KeyRing
    from tests.integration.trainer.trainer_harness import Node, trainer_env

    keys = make_keys(tmp_path / "keys")
    config = {"hidden": 64, "num_classes": 10}
    args = ["--parallel", "fsdp", "--eval-every", "0", "--steps", "10", "--model-config", json.dumps(config)]
    args += [
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--checkpoint-every-steps",
        "10",
        "--key-dir",
        str(keys),
    ]
    env = trainer_env(PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("trainer", "")))
    node = Node(tmp_path / "train.log", args, nproc=2, env=env)
    assert node.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    step_dir = tmp_path / "ck" / "step-000000010"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["layout"] == "dcp" and manifest["world_size"] == 2

    # Reference: the trainer's own full-tensor reader, into a model built from the manifest.
    full = load_full(step_dir, KeyRing.from_dir(keys))
    reference = default_registry().build(manifest["model"]).eval()
    reference.load_state_dict(full.state["model"])
    with torch.inference_mode():
        expected = reference(torch.from_numpy(X)).numpy()

    server = server_process(
        "--checkpoint-dir", str(tmp_path / "ck"), "--model-name", "mlp", "--key-dir", str(keys)
    )
    wait_for(lambda: ready_reason(server.base) == "", timeout=180)
    r = httpx.post(f"{server.base}/v2/models/mlp/infer", json=BODY, timeout=30)
    assert r.status_code == 200 and r.json()["model_version"] == "10", r.text
    served = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)


def test_unregistered_factory_keeps_the_server_not_ready_with_the_reason(tmp_path, server_process):
    site = tmp_path / "site"
    site.mkdir()
    module = f"aidc_test_recorder_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (site / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from aidc_trainer.examples.mlp import build_model as build\n"
    )
    spec = {"factory": f"{module}:build", "config": MLP_SPEC["config"]}
    state = {"model": default_registry().build(MLP_SPEC).state_dict()}
    assert save_checkpoint(tmp_path / "ck", 10, state, model_spec=spec).ok  # unencrypted: no MAC
    pythonpath = os.pathsep.join([*(str(ROOT / p) for p in ("server", "trainer")), str(site)])
    args = ("--checkpoint-dir", str(tmp_path / "ck"), "--model-name", "mlp", "--retry-seconds", "0.2")

    server = server_process(*args, env={"PYTHONPATH": pythonpath})
    wait_for(lambda: "not registered" in ready_reason(server.base), timeout=180)
    reason = ready_reason(server.base)
    assert f"model factory '{module}:build' is not registered" in reason, reason
    assert "aidc.models" in reason and "AIDC_MODEL_FACTORIES" in reason
    r = httpx.post(f"{server.base}/v2/models/mlp/infer", json=BODY, timeout=10)
    assert r.status_code == 503 and "not registered" in r.json()["error"]
    assert not marker.exists()  # the module the volume names was never imported
    server.stop()

    # The server's operator trusts the factory: the same checkpoint serves.
    env = {"PYTHONPATH": pythonpath, "AIDC_MODEL_FACTORIES": f"{module}:build"}
    trusted = server_process(*args, env=env)
    wait_for(lambda: ready_reason(trusted.base) == "", timeout=180)
    assert marker.exists()
