"""What a training run tells the outside: Prometheus metrics (every rank), and rank 0's JSON log
lines and progress report (docs/contracts.md, `aidc.dev/progress`), fed by the control syncs,
evaluations and checkpoint saves of the training loop.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Callable
from typing import Any

from aidc_trainer import distributed as D
from aidc_trainer.cadence import Clock, Every, Rate
from aidc_trainer.checkpoint import SaveResult, utc_now
from aidc_trainer.config import TrainConfig
from aidc_trainer.control_sync import Control
from aidc_trainer.energy import EnergyMeter, job_energy
from aidc_trainer.metrics import Accounting, TrainMetrics
from aidc_trainer.progress import ProgressReporter, evaluation_report

# The trainer's logger: log pipelines and tests select the train/eval/done lines by it.
log = logging.getLogger("aidc_trainer")

__all__ = ["RunReport"]


class RunReport:
    """One per rank; the log lines and the progress report come from rank 0 only."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: D.DistEnv,
        metrics: TrainMetrics,
        progress: ProgressReporter | None,
        accounting: Accounting,
        energy_meter: EnergyMeter,
        clock: Clock,
    ) -> None:
        self.cfg, self.env, self.metrics, self.progress = cfg, env, metrics, progress
        self.accounting, self.energy_meter, self.clock = accounting, energy_meter, clock
        # Each rank measures its own GPU; the control sync sums them (job_energy: rank 0's view).
        self.energy: dict[str, Any] = job_energy(0.0, 0, 0, None) | {
            "energySource": "unavailable: not measured yet"
        }
        metrics.energy_joules.set(math.nan)  # not measured is no sample, never 0
        self.evaluation: dict[str, Any] | None = None  # the latest, for the progress report
        self._steps_per_second: float | None = None
        # This run (a process start, or torchrun's in-place restart): its first step's time and the step
        # it resumed from. The operator times a recovery with it (status.recoveries).
        self.run: dict[str, Any] | None = None
        self._from_step = 0

    def start(self, start_step: int) -> None:
        """The training loop starts at ``start_step``: rates and rate limits count from now."""
        clock = self.clock
        self._from_step = start_step
        self._window = (clock(), start_step)
        self._progress_every = Every(self.cfg.progress_every_seconds, clock)
        self._progress_rate = Rate(start_step, clock)
        self._log_every = Every(self.cfg.log_every_seconds, clock)

    def synced(self, step: int, ctl: Control) -> None:
        """A control sync launched after ``ctl.step`` was read at ``step``."""
        cfg, env, loss = self.cfg, self.env, ctl.loss
        now_t = self.clock()
        t_prev, step_prev = self._window
        self._window = (now_t, ctl.step)
        n_steps = ctl.step - step_prev
        sps = n_steps * cfg.batch_size * cfg.grad_accum * env.world_size / max(now_t - t_prev, 1e-9)
        if n_steps:
            self.metrics.step_seconds.observe((now_t - t_prev) / n_steps)  # mean over the window
        self.metrics.step.set(step)
        self.metrics.loss.set(loss)
        self.metrics.samples_per_second.set(sps)
        if not env.is_main:
            return
        self._job_energy(ctl.energy)
        # A log line costs ~0.1 ms (cold caches between steps): every 10 steps of a small model
        # that was 2 % of training time, and hundreds of lines a second for a log pipeline.
        if self._log_every.due(force=ctl.step == cfg.steps):
            log.info(
                "train",
                extra={
                    "event": "train",
                    "step": ctl.step,
                    "loss": round(loss, 6),
                    "samples_per_second": round(sps, 1),
                },
            )
        if not math.isfinite(loss):
            log.warning("loss is not finite", extra={"event": "nonfinite", "step": ctl.step})
        first = self.run is None
        if first:
            self.run = {"fromStep": self._from_step, "firstStepAt": utc_now()}
        if self.progress is not None and self._progress_every.due(force=first):
            self.report_progress(step)

    def _job_energy(self, sums: list[float]) -> None:
        joules, measured, gpus = sums
        self.energy = job_energy(joules, measured, gpus, self.energy_meter.reason)
        ej = self.energy["energyJoules"]
        self.metrics.energy_joules.set(math.nan if ej is None else ej)

    def evaluated(self, step: int, res: dict[str, float]) -> None:
        self.metrics.eval_accuracy.set(res["accuracy"])
        self.metrics.eval_macro_f1.set(res["macro_f1"])
        self.evaluation = evaluation_report(step, res)
        if self.env.is_main:
            log.info("eval", extra={"event": "eval", "step": step, **res})

    def saved(self, res: SaveResult, retained_key_ids: Callable[[], list[str]]) -> None:
        """A checkpoint save finished (runs on the checkpoint thread)."""
        if not res.ok:
            self.metrics.ckpt_failures.inc()
            return
        self.metrics.ckpt_save_seconds.observe(res.seconds)
        if self.env.is_main:
            self.metrics.ckpt_bytes.set(res.bytes)
            self.metrics.last_ckpt_step.set(res.step)
            log.info(
                "checkpoint saved",
                extra={
                    "event": "checkpoint",
                    "step": res.step,
                    "path": str(res.path),
                    "bytes": res.bytes,
                    "seconds": round(res.seconds, 4),
                },
            )
            if self.progress is not None:
                self.progress.checkpoint(res.step, str(res.path), retained_key_ids())

    def report_progress(self, step: int) -> None:
        """rank 0's progress report (docs/contracts.md, `aidc.dev/progress`)."""
        assert self.progress is not None
        extra: dict[str, Any] = {"gpuSeconds": round(self.accounting.gpu_seconds(), 1)}
        if (rate := self._progress_rate.update(step)) is not None:
            self._steps_per_second = round(rate, 4)
        if self._steps_per_second is not None:
            extra["stepsPerSecond"] = self._steps_per_second
        if self.evaluation is not None:
            extra["evaluation"] = self.evaluation
        if self.run is not None:
            extra["run"] = self.run
        self.progress.progress(step, self.cfg.steps, **extra, **self.energy)

    def finish(
        self, step: int, done: bool, start_step: int, failed_saves: int, loop_seconds: float | None
    ) -> None:
        """The last progress report, and rank 0's "finished" line when the run completed its work."""
        if self.progress is not None:
            self.report_progress(step)
            self.progress.close()
        if self.env.is_main and done:
            extra: dict[str, Any] = {
                "event": "done",
                "step": step,
                "failed_saves": failed_saves,
                "gpu_seconds": self.accounting.gpu_seconds(),
                "steps_run": step - start_step,
                "loop_seconds": loop_seconds,
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            extra["energy_joules"] = self.energy["energyJoules"]
            extra["energy_source"] = self.energy["energySource"]
            log.info("finished", extra=extra)
