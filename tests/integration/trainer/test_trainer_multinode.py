"""Two torchrun "nodes" x 2 processes (gloo, localhost): training, eval, kill -9 and exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aidc_trainer import checkpoint as C
from aidc_trainer.keyring import KeyRing
from tests.integration.trainer.trainer_harness import Node, events, free_port, make_keys, run_nodes, wait_for

pytestmark = pytest.mark.slow

STEPS = 600


def _args(ck: Path, keys: Path) -> list[str]:
    return [
        "--example", "mlp", "--steps", str(STEPS), "--batch-size", "32", "--lr", "0.003",
        "--log-every", "10", "--eval-every", "200",
        "--checkpoint-dir", str(ck), "--checkpoint-every-steps", "50", "--checkpoint-keep", "3",
        "--key-dir", str(keys),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("uninterrupted")
    keys = make_keys(d)
    rcs = run_nodes(d, _args(d / "ck", keys), nnodes=2, nproc=2, timeout=180)
    return {"dir": d, "keys": keys, "rcs": rcs}


def test_two_nodes_train_the_mlp_and_report_eval(uninterrupted: dict[str, Any]) -> None:
    d = uninterrupted["dir"]
    assert uninterrupted["rcs"] == [0, 0], (d / "node0.log").read_text()[-3000:]
    train = events(d / "node0.log", "train")
    assert train[0]["step"] == 1 and train[-1]["step"] == STEPS
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]  # loss went down
    start = events(d / "node0.log", "start")[0]
    assert start["world_size"] == 4 and start["backend"] == "gloo" and start["encrypted"] is True
    evals = events(d / "node0.log", "eval")
    assert [e["step"] for e in evals] == [200, 400, 600]
    assert evals[-1]["samples"] == 2048  # the whole held-out split, summed over the 4 ranks
    assert evals[-1]["accuracy"] > 0.75 and 0 < evals[-1]["macro_f1"] <= 1
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] - 0.02
    # the final checkpoint has a file per rank and the server-facing API loads it
    ring = KeyRing.from_dir(uninterrupted["keys"])
    loaded = C.load_latest(d / "ck", ring)
    assert loaded is not None and loaded.step == STEPS and loaded.manifest["world_size"] == 4
    assert sorted(loaded.manifest["files"]) == [f"rank-{r}.bin" for r in range(4)]
    assert loaded.manifest["extra"]["eval"]["accuracy"] == evals[-1]["accuracy"]
    assert [p.name for p in C.list_checkpoints(d / "ck")] == [
        "step-000000500",
        "step-000000550",
        "step-000000600",
    ]


def test_kill_9_one_worker_then_restart_resumes_bitwise_exact(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    assert uninterrupted["rcs"] == [0, 0]
    keys = make_keys(tmp_path)
    (keys / "key-k1").write_bytes((uninterrupted["keys"] / "key-k1").read_bytes())
    ring = KeyRing.from_dir(keys)
    ck = tmp_path / "ck"
    port = free_port()
    nodes = [Node(tmp_path / f"first{i}.log", _args(ck, keys), 2, 2, i, port) for i in range(2)]
    try:
        wait_for(lambda: any(C._step_of(p) >= 150 for p in C.list_checkpoints(ck)), timeout=120)
        victim = nodes[1].workers()[0]
        import os
        import signal

        os.kill(victim, signal.SIGKILL)
        for n in nodes:  # the survivors fail on their own; clean up whatever hangs
            try:
                n.wait(timeout=20)
            except Exception:
                n.kill()
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()
    assert not events(tmp_path / "first0.log", "done"), "run finished before the kill: test proves nothing"
    newest_valid = max(C._step_of(p) for p in C.list_checkpoints(ck) if _verifies(p, ring))
    assert 150 <= newest_valid < STEPS

    rcs = run_nodes(tmp_path, _args(ck, keys), nnodes=2, nproc=2, timeout=180)
    assert rcs == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    resume = events(tmp_path / "node0.log", "resume")
    assert resume and resume[0]["step"] == newest_valid  # lost at most one checkpoint interval

    a = C.load_checkpoint(
        uninterrupted["dir"] / "ck" / f"step-{STEPS:09d}", KeyRing.from_dir(uninterrupted["keys"])
    )
    b = C.load_checkpoint(ck / f"step-{STEPS:09d}", ring)
    for name, t in a.state["model"].items():
        assert torch.equal(t, b.state["model"][name]), f"{name} differs after resume"
    for pid, st in a.state["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b.state["optimizer"]["state"][pid][k]), f"optimizer {pid}.{k} differs"


def _verifies(path: Path, ring: KeyRing) -> bool:
    try:
        C.verify(path, ring)
        return True
    except C.CheckpointCorruptError:
        return False
