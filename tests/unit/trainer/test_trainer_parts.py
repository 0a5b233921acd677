"""Small trainer parts: config precedence, data sharding, evaluation metrics, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aidc_trainer.cadence import sync_interval_vote
from aidc_trainer.config import load_config
from aidc_trainer.data import ShardedBatches, Split, stream_indices
from aidc_trainer.errors import ConfigError
from aidc_trainer.evaluation import confusion, scores
from aidc_trainer.log import JsonFormatter


def test_cli_overrides_env_which_overrides_defaults() -> None:
    env = {"AIDC_CHECKPOINT_DIR": "/ck", "AIDC_CHECKPOINT_EVERY_STEPS": "50", "AIDC_CHECKPOINT_KEEP": "2"}
    cfg = load_config(["--checkpoint-every-steps", "7", "--model-config", '{"hidden": 8}'], env)
    assert cfg.checkpoint_dir == "/ck" and cfg.checkpoint_every_steps == 7 and cfg.checkpoint_keep == 2
    assert cfg.model_config == {"hidden": 8} and cfg.steps == 200


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "0"],
        ["--precision", "fp8"],
        ["--batch-size", "many"],
        ["--no-such-flag"],
        ["--model-config", "[1]"],
        ["--sync-every-seconds", "0"],
    ],
)
def test_invalid_config_is_a_config_error(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_config(argv, {})


def test_sync_cadence_is_log_every_for_fast_steps_and_about_the_target_time_for_slow_ones() -> None:
    assert sync_interval_vote(0.001, 1.0, 10) == 10  # 1 ms steps: the cap, the sync stays cheap
    assert sync_interval_vote(0.3, 1.0, 10) == 3  # a sync about once a second
    assert sync_interval_vote(20.0, 1.0, 10) == 1  # 20 s steps: every step, or a stop takes minutes
    assert sync_interval_vote(0.0, 1.0, 10) == 10  # no measurement yet


def test_stream_is_a_fresh_permutation_per_epoch_and_reproducible() -> None:
    a = stream_indices(0, 20, 10, seed=3)
    assert sorted(a[:10].tolist()) == list(range(10)) and sorted(a[10:].tolist()) == list(range(10))
    assert not torch.equal(a[:10], a[10:])
    assert torch.equal(stream_indices(7, 9, 10, seed=3), a[7:16])  # any window, no iterator state


def test_ranks_get_disjoint_slices_of_each_global_batch() -> None:
    split = Split(torch.arange(64).float().unsqueeze(1), torch.arange(64))
    per_rank = [ShardedBatches(split, 4, 2, r, 4, seed=0) for r in range(4)]
    seen = [b.batch(0, micro, torch.device("cpu"))[1] for b in per_rank for micro in range(2)]
    flat = torch.cat(seen)
    assert len(set(flat.tolist())) == 32  # 4 ranks x 2 micro-batches x 4, no overlap within a step


def test_accuracy_and_macro_f1_match_hand_computation() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 2, 0])
    s = scores(confusion(p, y, 4))  # class 3 is absent from both: excluded like sklearn
    # F1: class0 = 2*1/(2+2)=0.5, class1 = 2*2/(2+3)=0.8, class2 = 2*1/(2+1)=2/3
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_json_log_lines_carry_rank_and_fields() -> None:
    rec = logging.LogRecord("aidc_trainer", logging.INFO, "f", 1, "eval", None, None)
    rec.step, rec.accuracy = 10, 0.9
    out = json.loads(JsonFormatter(rank=3).format(rec))
    assert out["rank"] == 3 and out["msg"] == "eval" and out["step"] == 10 and out["accuracy"] == 0.9


def test_trainer_process_exit_keeps_its_code_and_buffered_output() -> None:
    # exit_process skips interpreter finalization (gloo threads can abort it); what a pod's log
    # and the operator's exit-code classification rely on must still come out.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "trainer")}
    script = (
        "import sys; from aidc_trainer import log; from aidc_trainer.launch import exit_process;"
        "log.setup(0); import logging; logging.getLogger('aidc_trainer').info('last words');"
        "sys.stdout.write('buffered'); exit_process(5)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 5
    assert out.stdout == "buffered"
    assert json.loads(out.stderr.strip())["msg"] == "last words"
