"""The training loop on an injected clock: log rate limit, sync cadence, stop latency and the progress
report, asserted in steps, so a loaded machine cannot turn them red. One process, CPU, no torchrun."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from aidc_trainer import distributed as D
from aidc_trainer.cadence import Every, Rate
from aidc_trainer.config import TrainConfig
from aidc_trainer.energy import EnergyMeter
from aidc_trainer.errors import Stopped
from aidc_trainer.examples import mlp
from aidc_trainer.progress import PROGRESS
from aidc_trainer.trainer import Trainer
from tests.unit.trainer.test_trainer_energy import FakeNvml


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Ticking(nn.Module):
    """The example MLP whose every training forward pass takes ``step_seconds`` of the fake clock;
    ``at_step`` runs a callback when that training step starts (1-based)."""

    def __init__(self, clock: FakeClock, step_seconds: float) -> None:
        super().__init__()
        self.clock, self.step_seconds, self.net = clock, step_seconds, mlp.build_model()
        self.steps = 0
        self.at_step: dict[int, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            self.clock.t += self.step_seconds
            if hook := self.at_step.get(self.steps):
                hook()
        return self.net(x)


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def trainer(step_seconds: float, energy: EnergyMeter | None = None, **cfg: Any) -> tuple[Trainer, Ticking]:
    clock = FakeClock()
    defaults = {"metrics_port": -1, "eval_every": 0, "batch_size": 16, "parallel": "none", "device": "cpu"}
    config = TrainConfig(**(defaults | cfg))
    recipe = mlp.recipe(config)
    model = Ticking(clock, step_seconds)
    recipe.build_model = lambda: model  # type: ignore[method-assign]
    env = D.DistEnv(0, 0, 1, torch.device("cpu"), None)
    return Trainer(config, recipe, env, clock=clock, energy_meter=energy), model


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [vars(r) for r in caplog.records if getattr(r, "event", None) == event]


def test_every_and_rate_follow_the_clock_they_are_given() -> None:
    clock = FakeClock()
    every, rate = Every(1.0, clock), Rate(0, clock)
    assert every.due() and not every.due()  # the first time is due, then once a second
    clock.t = 0.5
    assert not every.due() and every.due(force=True)
    clock.t = 1.5
    assert every.due()
    assert rate.update(30) == 20.0 and rate.update(30) is None  # 30 steps in 1.5 s; then nothing new


def test_train_lines_are_at_most_one_per_log_every_seconds_and_the_last_step_always_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aidc_trainer")
    # 64 steps a second (exact in binary), a sync every 10 steps: a line once a second of the clock
    t, _ = trainer(1 / 64, steps=400, log_every_seconds=1.0)
    t.fit()
    assert [e["step"] for e in events(caplog, "train")] == [1, 70, 140, 210, 280, 350, 400]


def test_slow_steps_sync_every_few_steps_and_a_stop_lands_within_two_steps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aidc_trainer")
    # 0.1 s steps with a 0.25 s sync target: a sync every 2 steps, not the 10 --log-every allows
    t, model = trainer(0.1, steps=1000, log_every=10, sync_every_seconds=0.25, log_every_seconds=0)
    model.at_step[25] = lambda: t._handle_signal(signal.SIGTERM, None)  # SIGTERM during step 25
    with pytest.raises(Stopped):
        t.fit()
    syncs = [e["step"] for e in events(caplog, "train")]
    assert syncs == [1, 2, *range(4, 27, 2)], syncs
    assert [e["step"] for e in events(caplog, "stop")] == [27]  # the sync after step 26 carried it


def test_progress_report_carries_rate_evaluation_and_energy(tmp_path: Path) -> None:
    # a GPU meter fed by a fake NVML (the model itself runs on the CPU)
    nvml = FakeNvml()
    gpu = EnergyMeter(torch.device("cuda", 0), nvml=nvml, environ={}, uuid=lambda _d: None)
    t, _ = trainer(
        1 / 64, gpu, steps=200, eval_every=50, checkpoint_dir=str(tmp_path), progress_every_seconds=1.0
    )
    t.fit()
    report = json.loads((tmp_path / "progress.json").read_text())[PROGRESS]
    assert report["step"] == report["totalSteps"] == 200
    assert report["stepsPerSecond"] == 64.0  # steps over the clock's seconds, whatever the machine
    ev = report["evaluation"]
    assert ev["step"] == 200 and 0 < ev["accuracy"] <= 1 and 0 < ev["f1"] <= 1 and ev["loss"] > 0
    # NVML read at most every 5 s of the clock: 200 steps are ~3 s, so the first sync's reading
    assert report["energySource"] == "nvml" and report["energyGpus"] == 1
    assert report["energyJoules"] == 100.0 and nvml.reads == [0, 0]
    assert report["gpuSeconds"] == 0  # a CPU trainer: no GPU in the job


def test_a_cpu_job_reports_energy_unavailable_not_zero(tmp_path: Path) -> None:
    t, _ = trainer(1 / 64, steps=20, checkpoint_dir=str(tmp_path))
    t.fit()
    report = json.loads((tmp_path / "progress.json").read_text())[PROGRESS]
    assert report["energyJoules"] is None and report["energySource"] == "unavailable: no GPU"
    assert report["energyGpus"] == 0 and report["evaluation"]["step"] == 20
