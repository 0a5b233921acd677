"""The progress report rank 0 hands the operator (docs/contracts.md, `aidc.dev/progress`), from a real
torchrun with two gloo ranks on CPU: outside a cluster it lands in <checkpoint dir>/progress.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.trainer.trainer_harness import Node, events

pytestmark = pytest.mark.slow


def test_two_cpu_ranks_report_rate_and_evaluation_and_say_energy_is_unavailable(tmp_path: Path) -> None:
    ck, log = tmp_path / "ck", tmp_path / "run.log"
    args = ["--steps", "60", "--batch-size", "16", "--eval-every", "20", "--checkpoint-dir", str(ck)]
    node = Node(log, [*args, "--progress-every-seconds", "0"], nproc=2)
    assert node.wait(timeout=400) == 0, log.read_text()[-3000:]
    report = json.loads((ck / "progress.json").read_text())["aidc.dev/progress"]
    assert report["step"] == report["totalSteps"] == 60
    assert report["stepsPerSecond"] > 0
    ev = report["evaluation"]  # the final evaluation, over both ranks' shards
    assert ev["step"] == 60 and 0 < ev["accuracy"] <= 1 and 0 < ev["f1"] <= 1 and ev["loss"] > 0
    final_eval = [e for e in events(log, "eval") if e["step"] == 60]
    assert final_eval and final_eval[0]["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-6)
    # CPU ranks: energy is not measured, and says so (never 0)
    assert report["energySource"] == "unavailable: no GPU"
    assert report["energyJoules"] is None and report["energyGpus"] == 0
    done = events(log, "done")
    assert done and done[0]["energy_source"] == "unavailable: no GPU" and done[0]["energy_joules"] is None
