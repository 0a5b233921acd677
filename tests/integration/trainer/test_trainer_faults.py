"""Faults a user meets: kill -9 during checkpoint saves, SIGTERM, bad keys and bad config."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from aidc_trainer import checkpoint as C
from aidc_trainer.keyring import KeyRing
from tests.integration.trainer.trainer_harness import (
    ROOT,
    Node,
    events,
    free_port,
    make_keys,
    trainer_env,
    wait_for,
)

pytestmark = pytest.mark.slow


def _tmp_dirs(ck: Path) -> set[str]:
    return {p.name for p in ck.iterdir() if p.name.startswith(".tmp-")} if ck.is_dir() else set()


def _kill_during_a_save(node: Node, ck: Path, stale: set[str], attempts: int = 1000) -> bool:
    """SIGKILL the node while a save of this run is half written; True once one was caught.

    Seeing the temp directory and killing are two steps, so a fast save can publish in between.
    Freezing the workers closes that race: a temp directory still there while they are stopped is
    a save the kill interrupts. Counted attempts, not a clock, so a slow or fast machine both pass.
    """
    try:
        for _ in range(attempts):
            wait_for(lambda: _tmp_dirs(ck) - stale, timeout=60, interval=0.001)
            node.signal_workers(signal.SIGSTOP)
            if _tmp_dirs(ck) - stale:
                return True
            node.signal_workers(signal.SIGCONT)
        return False
    finally:
        node.kill()


def test_repeated_kill_9_during_save_always_resumes_from_a_valid_checkpoint(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    ring = KeyRing.from_dir(keys)
    ck = tmp_path / "ck"
    steps = 400
    # a wider MLP (~1 MB of state with Adam) saved every step: a save is nearly always in flight
    args = [
        "--steps", str(steps), "--batch-size", "16", "--model-config", '{"hidden": 4096}',
        "--eval-every", "0",
        "--checkpoint-dir", str(ck), "--checkpoint-every-steps", "1", "--checkpoint-keep", "3",
        "--key-dir", str(keys),
    ]  # fmt: skip
    rnd = random.Random(4)
    resumed: list[int] = []
    interrupted_saves = 0
    resumed_expect = 0
    for round_ in range(3):
        log = tmp_path / f"round{round_}.log"
        stale = _tmp_dirs(ck)  # the last kill's half-written save: this run removes it
        node = Node(log, args, nproc=2)
        if round_ == 2:  # last round: let it finish
            assert node.wait(timeout=180) == 0, log.read_text()[-3000:]
        else:
            try:
                before = max((C._step_of(p) for p in C.list_checkpoints(ck)), default=0)
                wait_for(lambda b=before: any(C._step_of(p) > b for p in C.list_checkpoints(ck)), timeout=120)
                time.sleep(rnd.uniform(0.05, 0.5))
            except BaseException:
                node.kill()
                raise
            interrupted_saves += _kill_during_a_save(node, ck, stale)
            assert not events(log, "done"), "run finished before the kill"
            # whatever the kill interrupted, every published checkpoint is complete and verifies
            for p in C.list_checkpoints(ck):
                C.verify(p, ring)
        newest = max(C._step_of(p) for p in C.list_checkpoints(ck)) if C.list_checkpoints(ck) else 0
        if round_:
            r = events(log, "resume")
            assert r and r[0]["step"] == resumed_expect, f"round {round_}: resumed from {r and r[0]['step']}"
            resumed.append(r[0]["step"])
        resumed_expect = newest
    assert interrupted_saves == 2, "a kill missed every save it tried to interrupt"
    assert resumed == sorted(resumed) and resumed[0] > 0  # always moved forward, never restarted at 0
    final = C.load_latest(ck, ring)
    assert final is not None and final.step == steps
    assert not _tmp_dirs(ck)  # stale temp dirs of killed runs were cleaned up


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_sigterm_saves_a_final_checkpoint_and_exits_143_with_metrics_served(tmp_path: Path) -> None:
    ck, mport = tmp_path / "ck", free_port()
    args = [
        "--steps", "1000000", "--batch-size", "16", "--eval-every", "20", "--log-every", "10",
        "--checkpoint-dir", str(ck), "--checkpoint-every-steps", "100000",
    ]  # fmt: skip
    log = tmp_path / "run.log"
    node = Node(log, args, nproc=2, env=trainer_env(AIDC_METRICS_PORT=str(mport)))
    try:

        def scraped() -> dict[str, float] | None:
            try:
                m = _scrape(mport)
            except OSError:
                return None
            return m if m.get("aidc_trainer_step", 0) >= 40 and "aidc_trainer_eval_accuracy" in m else None

        metrics = wait_for(scraped, timeout=400, interval=0.2)
        assert metrics["aidc_trainer_total_steps"] == 1000000
        assert (
            0 < metrics["aidc_trainer_eval_accuracy"] <= 1 and 0 < metrics["aidc_trainer_eval_macro_f1"] <= 1
        )
        assert metrics["aidc_trainer_samples_per_second"] > 0 and metrics["aidc_trainer_loss"] > 0
        node.proc.send_signal(signal.SIGTERM)  # as the kubelet does; torchrun forwards it to the workers
        node.wait(timeout=150)
    finally:
        if node.proc.poll() is None:
            node.kill()
    stops = events(log, "stop")
    assert len(stops) == 2 and stops[0]["step"] == stops[1]["step"]  # both ranks stopped together
    exits = events(log, "exit")
    assert [e["exit_code"] for e in exits] == [143, 143]
    loaded = C.load_latest(ck, None)
    assert loaded is not None and loaded.manifest["extra"] == {"stopped": True}
    assert loaded.step == stops[0]["step"] and loaded.step >= 40  # nothing lost beyond the current step
    progress = json.loads((ck / "progress.json").read_text())
    assert progress["aidc.dev/last-checkpoint"]["step"] == loaded.step
    assert progress["aidc.dev/progress"]["totalSteps"] == 1000000


def _python_trainer(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aidc_trainer", *args],
        env=trainer_env(**env),
        capture_output=True,
        text=True,
        timeout=300,  # a generous budget: a loaded machine must not turn this red
    )


def test_invalid_config_exits_4() -> None:
    out = _python_trainer(["--steps", "0"])
    assert out.returncode == 4, out.stderr
    assert "steps must be >= 1" in out.stderr


def test_train_log_lines_are_rate_limited_but_the_last_step_always_logs() -> None:
    args = ["--steps", "400", "--parallel", "none", "--device", "cpu", "--eval-every", "0"]
    args += ["--metrics-port", "-1"]

    def train_steps(extra: list[str]) -> list[int]:
        out = _python_trainer([*args, *extra])
        assert out.returncode == 0, out.stderr[-3000:]
        lines = [json.loads(x) for x in out.stderr.splitlines() if x.startswith("{")]
        return [x["step"] for x in lines if x.get("event") == "train"]

    # a sync after step 1 (and 2, once step 1's result is read) so an early stop lands, then every 10
    assert train_steps(["--log-every-seconds", "0"]) == [1, 2, *range(10, 401, 10)]
    # at most one line an hour: the first and the last, however slow the machine (the limit on a
    # clock that counts steps: tests/unit/trainer/test_trainer_cadence.py)
    assert train_steps(["--log-every-seconds", "3600"]) == [1, 400]
    out = _python_trainer([*args, "--log-every-seconds", "-1"])
    assert out.returncode == 4 and "log_every_seconds must be >= 0" in out.stderr


def test_slow_steps_sync_more_often_than_log_every_so_a_stop_lands_within_a_few_steps(
    tmp_path: Path,
) -> None:
    # 0.1 s steps with a 0.25 s sync target: every 2 steps instead of every 10. Two ranks whose
    # own votes may differ must still agree on every sync, or the run would hang. Speed-proof: a step
    # never takes less than its 0.1 s sleep, so no vote exceeds 2; a loaded machine only lowers them.
    # (Exact cadence and stop latency on an injected clock: tests/unit/trainer/test_trainer_cadence.py.)
    args = ["--recipe", "tests.integration.trainer.recipes:slow", "--steps", "1000000"]
    args += ["--log-every", "10", "--sync-every-seconds", "0.25", "--log-every-seconds", "0"]
    args += ["--eval-every", "0", "--checkpoint-dir", str(tmp_path / "ck")]
    env = trainer_env(PYTHONPATH=os.pathsep.join([str(ROOT / "trainer"), str(ROOT)]))
    log = tmp_path / "run.log"
    node = Node(log, args, nproc=2, env=env)
    try:
        wait_for(lambda: any(e["step"] >= 20 for e in events(log, "train")), timeout=400, interval=0.1)
        node.proc.send_signal(signal.SIGTERM)
        assert node.wait(timeout=150) != 0
    finally:
        if node.proc.poll() is None:
            node.kill()
    syncs = [e["step"] for e in events(log, "train")]
    gaps = {b - a for a, b in itertools.pairwise(syncs[2:])}  # after the two start-up syncs
    assert gaps and max(gaps) <= 2, syncs  # never the 10 steps --log-every allows
    stops = events(log, "stop")
    assert len(stops) == 2 and stops[0]["step"] == stops[1]["step"]
    assert stops[0]["step"] - syncs[-1] == 1, (stops, syncs)  # it rode the last sync, read a step later
    loaded = C.load_latest(tmp_path / "ck", None)
    assert loaded is not None and loaded.step == stops[0]["step"]


def test_evaluation_runs_in_training_sized_batches_so_a_model_that_trains_also_evaluates(
    tmp_path: Path,
) -> None:
    # The model's "device" holds 16 rows per forward pass: training at --batch-size 16 fits, and
    # so must evaluation (it once used 512-row batches whatever the training batch).
    args = ["--recipe", "tests.integration.trainer.recipes:capped", "--steps", "20", "--batch-size", "16"]
    args += ["--eval-every", "10", "--parallel", "none", "--device", "cpu", "--metrics-port", "-1"]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "trainer"), str(ROOT)])}
    ok = _python_trainer(args, **env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    evals = [json.loads(x) for x in ok.stderr.splitlines() if '"event": "eval"' in x]
    assert [e["step"] for e in evals] == [10, 20] and evals[-1]["samples"] == 2048
    too_big = _python_trainer([*args, "--eval-batch-size", "64"], **env)  # the user asked for it
    assert too_big.returncode == 1 and "a forward pass over 64 rows does not fit" in too_big.stderr


def test_missing_and_wrong_keys_exit_3_naming_the_key_id(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, "v7")
    (keys / "current-key-id").write_text("v8")  # names a key the Secret does not hold
    out = _python_trainer(["--steps", "5"], AIDC_KEY_DIR=str(keys))
    assert out.returncode == 3, out.stderr
    assert "'v8'" in out.stderr and (keys / "key-v7").read_bytes().hex() not in out.stderr

    # checkpoints written with key v7, then the Secret's v7 is replaced by a different key
    (keys / "current-key-id").write_text("v7")
    ck = tmp_path / "ck"
    ok = _python_trainer(
        ["--steps", "5", "--eval-every", "0"], AIDC_KEY_DIR=str(keys), AIDC_CHECKPOINT_DIR=str(ck)
    )
    assert ok.returncode == 0, ok.stderr
    (keys / "key-v7").write_bytes(os.urandom(32))
    out = _python_trainer(["--steps", "10"], AIDC_KEY_DIR=str(keys), AIDC_CHECKPOINT_DIR=str(ck))
    assert out.returncode == 3, out.stderr
    assert "key 'v7' is not the key this file was encrypted with" in out.stderr
    assert [p.name for p in C.list_checkpoints(ck)] == ["step-000000005"]  # nothing overwritten


def test_transformer_example_learns_the_generated_text_under_bf16(tmp_path: Path) -> None:
    out = _python_trainer(
        [
            "--example",
            "transformer",
            "--steps",
            "60",
            "--batch-size",
            "16",
            "--lr",
            "0.003",
            "--eval-every",
            "0",
            "--precision",
            "bf16",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in out.stderr.splitlines() if x.startswith("{")]
    train = [x for x in lines if x.get("event") == "train"]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    ev = [x for x in lines if x.get("event") == "eval"][-1]
    assert ev["accuracy"] > 0.3  # far above chance (1/30) for next-character prediction
    loaded = C.load_latest(tmp_path / "ck", None)
    assert loaded is not None
    model = C.build_model_from_manifest(loaded.manifest)
    model.load_state_dict(loaded.state["model"])


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    common = ["--steps", "30", "--eval-every", "0", "--log-every", "10"]
    runs = {"big": ["--batch-size", "32"], "accum": ["--batch-size", "16", "--grad-accum", "2"]}
    for name, extra in runs.items():
        out = _python_trainer([*common, *extra, "--checkpoint-dir", str(tmp_path / name)])
        assert out.returncode == 0, out.stderr[-3000:]
    big, accum = (C.load_latest(tmp_path / n, None) for n in runs)
    assert big is not None and accum is not None
    for k, v in big.state["model"].items():  # same 32 samples per step, summed in two halves
        torch.testing.assert_close(accum.state["model"][k], v, rtol=1e-4, atol=1e-5)
    assert not torch.equal(big.state["model"]["0.weight"], mlp_init()["0.weight"])  # it trained


def mlp_init() -> dict[str, torch.Tensor]:
    from aidc_trainer.examples import mlp

    torch.manual_seed(0)
    return mlp.build_model().state_dict()


def test_time_triggered_checkpoints_and_resume_on_a_smaller_world(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    # 10 ms steps at the least: 300 steps span 3 s whatever the machine, so a 0.2 s timer fires many
    # times (plain MLP steps could all fit in one timer period on a fast machine)
    args = ["--recipe", "tests.integration.trainer.recipes:slow", "--model-config", '{"delay": 0.01}']
    args += ["--eval-every", "0", "--checkpoint-dir", str(ck)]
    args += ["--checkpoint-every-seconds", "0.2", "--checkpoint-keep", "100"]
    env = trainer_env(PYTHONPATH=os.pathsep.join([str(ROOT / "trainer"), str(ROOT)]))
    node = Node(tmp_path / "two.log", [*args, "--steps", "300", "--log-every-seconds", "0"], nproc=2, env=env)
    assert node.wait(timeout=400) == 0, (tmp_path / "two.log").read_text()[-3000:]
    steps = [C._step_of(p) for p in C.list_checkpoints(ck)]
    assert len(steps) >= 3 and steps[-1] == 300  # saved on the clock, not only at the end
    # both ranks agreed: the trigger rides a control sync (one train line each) and lands a step later
    syncs = {e["step"] for e in events(tmp_path / "two.log", "train")}
    assert all(s - 1 in syncs for s in steps[:-1]), (steps, sorted(syncs))
    assert C.load_latest(ck, None).manifest["world_size"] == 2  # type: ignore[union-attr]

    # the job comes back with one process (elastic shrink): model and optimiser carry over
    out = _python_trainer([*args, "--steps", "350"], PYTHONPATH=env["PYTHONPATH"])
    assert out.returncode == 0, out.stderr[-3000:]
    resume = [json.loads(x) for x in out.stderr.splitlines() if '"event": "resume"' in x]
    assert resume[0]["step"] == 300
    final = C.load_latest(ck, None)
    assert final is not None and final.step == 350 and final.manifest["world_size"] == 1


def test_fsdp_saves_shards_and_resumes(tmp_path: Path) -> None:
    common = ["--parallel", "fsdp", "--eval-every", "0", "--checkpoint-every-steps", "20"]
    common += ["--checkpoint-dir", str(tmp_path / "ck")]
    for steps, log in (("20", "part1.log"), ("40", "part2.log")):
        part = Node(tmp_path / log, [*common, "--steps", steps], nproc=2)
        assert part.wait(timeout=180) == 0, (tmp_path / log).read_text()[-3000:]
    assert events(tmp_path / "part2.log", "resume")[0]["step"] == 20
    train = events(tmp_path / "part2.log", "train")
    assert train[0]["step"] == 21 and train[-1]["loss"] < events(tmp_path / "part1.log", "train")[0]["loss"]
    # each rank wrote its own shards (tests/integration/trainer/test_fsdp_sharded.py goes further);
    # load_latest reads them back as the full state dict the model server loads
    ck = C.load_latest(tmp_path / "ck", None)
    assert ck is not None and ck.step == 40 and ck.manifest["world_size"] == 2
    assert ck.manifest["layout"] == "dcp" and {"__0_0.distcp", "__1_0.distcp"} <= set(ck.manifest["files"])
    model = C.build_model_from_manifest(ck.manifest)
    model.load_state_dict(ck.state["model"])
