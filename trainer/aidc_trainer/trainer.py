"""The training loop, assembled from swappable parts (recipe, data, optimiser, checkpointer, metrics).

The control sync that keeps the ranks in step lives in ``control_sync``; what the run reports
(metrics, log lines, the progress report) in ``run_report``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from aidc_trainer import checkpoint_sharded as sharded
from aidc_trainer import distributed as D
from aidc_trainer.cadence import DEFAULT_CLOCK, Clock
from aidc_trainer.checkpoint import Checkpointer, SaveResult
from aidc_trainer.checkpoint_backup import writer_for
from aidc_trainer.config import TrainConfig
from aidc_trainer.control_sync import ControlSync
from aidc_trainer.data import ShardedBatches, eval_shard
from aidc_trainer.energy import EnergyMeter
from aidc_trainer.errors import CheckpointSaveError, Stopped
from aidc_trainer.evaluation import evaluate
from aidc_trainer.keyring import KeyRing
from aidc_trainer.metrics import Accounting, TrainMetrics
from aidc_trainer.progress import ProgressReporter
from aidc_trainer.recipe import Recipe
from aidc_trainer.run_report import RunReport

BACKUP_CLOSE_SECONDS = 600.0
log = logging.getLogger("aidc_trainer")

__all__ = ["Result", "Trainer", "run"]


@dataclass
class Result:
    step: int
    loss: float | None
    eval: dict[str, float] | None


class Precision:
    """bf16/fp16 autocast; fp16 adds a GradScaler (bf16 has fp32's range and needs none)."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode, self.device_type = mode, device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        recipe: Recipe,
        env: D.DistEnv,
        clock: Clock = DEFAULT_CLOCK,
        energy_meter: EnergyMeter | None = None,
    ) -> None:
        self.cfg, self.recipe, self.env = cfg, recipe, env
        self.clock = clock  # every cadence (sync votes, log, progress, timed saves) runs on it
        self.metrics = TrainMetrics()
        self._stop_signal = 0
        self.keyring = KeyRing.from_dir(cfg.key_dir, cfg.kek_file) if cfg.key_dir else None
        self.precision = Precision(cfg.precision, env.device)

        D.seed_everything(cfg.seed, cfg.deterministic)  # same init on every rank
        self.model = recipe.build_model().to(env.device)
        self.data = recipe.build_data(cfg)
        self.batches = ShardedBatches(
            self.data.train, cfg.batch_size, cfg.grad_accum, env.rank, env.world_size, cfg.seed
        )
        self.eval_split = eval_shard(self.data.eval, env.rank, env.world_size)

        self.ckpt: Checkpointer | None = None
        if cfg.checkpoint_dir:
            # FSDP: every rank writes its own shards (DCP); otherwise rank 0 writes the replica.
            kind = sharded.ShardedCheckpointer if self.fsdp else Checkpointer
            self.ckpt = kind(
                root=cfg.checkpoint_dir,  # type: ignore[arg-type]
                rank=env.rank,
                world_size=env.world_size,
                keyring=self.keyring,
                keep=cfg.checkpoint_keep,
                model_spec=recipe.model_spec,
                group=env.ckpt_group,
                run_id=env.run_id,
                on_saved=self._on_saved,
                backup_root=Path(cfg.checkpoint_backup_dir) if cfg.checkpoint_backup_dir else None,
            )
        self.progress = ProgressReporter(cfg.checkpoint_dir) if env.is_main else None
        # rank 0's background copier to spec.checkpoint.backup (None without one)
        self.backup = writer_for(cfg, env.run_id, self.progress)
        gpus = env.world_size if env.device.type == "cuda" else 0
        self.accounting = Accounting(gpus, clock)
        self.metrics.gpu_seconds.set_function(self.accounting.gpu_seconds)
        self.energy_meter = energy_meter or EnergyMeter(env.device)
        self.report = RunReport(
            cfg, env, self.metrics, self.progress, self.accounting, self.energy_meter, clock
        )
        self.start_step = 0
        self._save_requested: int | None = None  # step of the last save asked for

    # ---------------------------------------------------------------------------------- parts
    @property
    def fsdp(self) -> bool:
        return self.env.distributed and self.cfg.parallel == "fsdp"

    def _shared_state(self) -> dict[str, Any]:
        return sharded.training_state(self.model, self.optimizer, self.precision.scaler, self.fsdp)

    def _restore(self) -> None:
        if self.ckpt is None or not self.cfg.resume:
            return
        # Decide first, clean up after: a refusal (no valid checkpoint) leaves the directory as found.
        loaded = self.ckpt.resume(self.cfg.on_no_valid_checkpoint)
        if self.env.is_main:
            self.ckpt.cleanup_stale()
        if loaded is None:
            log.info("no valid checkpoint: starting from step 0", extra={"event": "resume", "step": 0})
            return
        rng = sharded.restore_training_state(  # collective when the checkpoint is sharded
            loaded,
            self.model,
            self.optimizer,
            self.precision.scaler,
            self.keyring,
            self.env.ckpt_group,
            self.env.rank,
            self.env.world_size,
            self.fsdp,
        )
        if rng is not None:
            D.set_rng_state(rng)
        else:  # world size changed: data order is still exact, rank-local RNG is re-derived
            torch.manual_seed(D.rank_seed(self.cfg.seed, self.env.rank, loaded.step))
        self.start_step = loaded.step
        log.info(
            "resumed from checkpoint step %d",
            loaded.step,
            extra={"event": "resume", "step": loaded.step, "path": str(loaded.path)},
        )
        if self.progress is not None:
            # It may be newer than the last one reported (a save that landed as the old gang died).
            self.progress.checkpoint(loaded.step, str(loaded.path), self.ckpt.retained_key_ids())

    def _on_saved(self, res: SaveResult) -> None:  # runs on the checkpoint thread
        assert self.ckpt is not None
        self.report.saved(res, self.ckpt.retained_key_ids)
        if self.backup is not None and res.ok and res.path is not None:
            self.backup.submit(res.path)

    def _save(self, step: int, block: bool, extra: dict[str, Any]) -> None:
        assert self.ckpt is not None
        stall = self.ckpt.save(step, self._shared_state(), D.rng_state(), extra, block=block)
        self.metrics.ckpt_stall_seconds.observe(stall)
        self._last_save_time, self._last_save_step = self.clock(), step
        self._save_requested = step

    def _last_checkpoint(self, step: int, extra: dict[str, Any], what: str) -> None:
        """Save ``step`` unless just saved, and make sure it landed: a run whose final (or stop)
        checkpoint is missing has lost work, so it must not look finished (exit 6, retryable)."""
        assert self.ckpt is not None
        if self._last_save_step != step:
            self._save(step, block=True, extra=extra)
        self.ckpt.close()  # waits for an asynchronous save of this step still in flight
        res = self.ckpt.last
        if self._save_requested != step:  # resumed at this step: that checkpoint is on disk
            return
        if res is None or res.step != step or not res.ok:
            reason = res.error if res is not None and res.step == step else "the save never completed"
            err = CheckpointSaveError(step, reason or "unknown error", what)
            log.error("%s", err, extra={"event": "checkpoint_failed", "step": step, "what": what})
            self._finish(step, done=False)
            raise err

    def _evaluate(self, step: int) -> dict[str, float]:
        module = self.model.module if isinstance(self.model, DDP) else self.model
        res = evaluate(
            module,
            self.eval_split,
            self.recipe.num_classes,
            self.env.device,
            # A fixed large eval batch once ran out of memory where training at --batch-size fit.
            batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
            predict=self.recipe.predict,
            autocast=self.precision.autocast if self.precision.dtype is not None else None,
            distributed=self.env.distributed,
            loss_fn=self.recipe.loss_fn,
        )
        self.report.evaluated(step, res)
        return res

    def _ddp_warmup(self, model: DDP) -> None:
        """One throw-away backward so DDP rebuilds its gradient buckets before the first real step.

        DDP reorders buckets after its first iteration, and with more than two ranks the new layout
        changes the order in which the all-reduce sums each element. Without this, a resumed run's
        first step would round differently from the uninterrupted run's step at the same point.
        The pass changes nothing: no optimiser step, gradients dropped, RNG and BatchNorm untouched.
        """
        x, y = self.batches.batch(self.start_step, 0, self.env.device)
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model.eval()
            with self.precision.autocast():
                loss = self.recipe.loss_fn(model(x), y) * 0.0
            loss.backward()
            model.train()
        self.optimizer.zero_grad(set_to_none=True)

    def _handle_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum  # sent with the next control sync; all ranks act on it together

    # ---------------------------------------------------------------------------------- loop
    def fit(self) -> Result:
        cfg, env = self.cfg, self.env
        model = self.model
        if self.fsdp:  # shard first: the optimiser must see the sharded (DTensor) parameters
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
        self.optimizer = self.recipe.build_optimizer(model.parameters(), cfg)
        self._restore()
        if env.distributed and cfg.parallel == "ddp":
            model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
            self._ddp_warmup(model)
        self.train_model = model
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle_signal)

        if env.is_main:
            self.metrics.total_steps.set(cfg.steps)
            port = self.metrics.serve(cfg.metrics_port)
            log.info(
                "training",
                extra={
                    "event": "start",
                    "world_size": env.world_size,
                    "backend": env.backend,
                    "device": str(env.device),
                    "start_step": self.start_step,
                    "steps": cfg.steps,
                    "metrics_port": port,
                    "encrypted": self.keyring is not None,
                },
            )
        self._last_save_time, self._last_save_step = self.clock(), self.start_step
        self.report.start(self.start_step)
        self.sync = sync = ControlSync(
            env, cfg.sync_every_seconds, cfg.log_every, self.start_step, self.energy_meter, self.clock
        )
        self.last_loss: float | None = None
        eval_res: dict[str, float] | None = None
        loss_fn, accum, opt = self.recipe.loss_fn, cfg.grad_accum, self.optimizer
        scaler = self.precision.scaler if self.precision.scaler.is_enabled() else None
        autocast = self.precision.autocast if self.precision.dtype is not None else contextlib.nullcontext
        ddp = isinstance(model, DDP)
        batch, device, steps = self.batches.batch, env.device, cfg.steps

        step = self.start_step
        self._loop_t0 = self.clock()
        try:
            while step < steps:
                # hot path: keep it as lean as a hand-written DDP loop (bench/trainer_overhead.py)
                log_now = step + 1 == sync.next_sync or step + 1 == steps
                loss_sum = None
                for micro in range(accum):
                    x, y = batch(step, micro, device)
                    with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext():
                        with autocast():
                            loss = loss_fn(model(x), y)
                        if accum > 1:
                            loss = loss / accum
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    if log_now:
                        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1

                time_due = False
                if log_now:
                    assert loss_sum is not None
                    time_due = self._control_sync(step, loss_sum)
                elif sync.pending is not None:  # the sync launched a step ago: done by now
                    time_due = self._apply_control(step)
                if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                    eval_res = self._evaluate(step)
                if (
                    self.ckpt is not None
                    and step != steps
                    and ((cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0) or time_due)
                ):
                    self._save(step, block=False, extra={"loss": self.last_loss})
            self._apply_control(step)  # the last step's sync: final loss, a late stop request
        except (Stopped, CheckpointSaveError):
            raise
        except Exception:
            if self._stop_signal:  # a peer left because it was signalled: not a script error
                raise Stopped(self._stop_signal) from None
            raise

        if env.device.type == "cuda":
            torch.cuda.synchronize()  # loop time must include queued GPU work
        self._loop_seconds = self.clock() - self._loop_t0
        eval_res = self._evaluate(step)
        if self.ckpt is not None:
            self._last_checkpoint(step, {"loss": self.last_loss, "eval": eval_res}, "final")
        self._finish(step)
        return Result(step, self.last_loss, eval_res)

    def _control_sync(self, step: int, loss_sum: torch.Tensor) -> bool:
        """Launch the control sync after ``step`` (see ``control_sync``); every rank acts on its
        result at the same later step. Returns whether a time-triggered checkpoint is due now."""
        cfg = self.cfg
        # Still pending only when the previous step synced too (interval 1, or the last step).
        due_now = self._apply_control(step)
        due = not due_now and bool(  # a save is about to happen: don't ask for another
            self.ckpt
            and cfg.checkpoint_every_seconds > 0
            and self.clock() - self._last_save_time >= cfg.checkpoint_every_seconds
        )
        self.sync.launch(step, loss_sum, self._stop_signal, due)
        return due_now

    def _apply_control(self, step: int) -> bool:
        """Act on the pending control sync (launched at an earlier step) at ``step``."""
        ctl = self.sync.read(step)
        if ctl is None:
            return False
        self.last_loss = ctl.loss
        self.report.synced(step, ctl)
        if ctl.stop:
            self._stop_signal = self._stop_signal or signal.SIGTERM  # else a peer was signalled
            self._stop(step)
        return ctl.checkpoint_due

    def _stop(self, step: int) -> None:
        """Every rank saw the stop at the same control sync: checkpoint (unless just saved), then stop."""
        log.warning(
            "stop requested by signal %d at step %d",
            self._stop_signal,
            step,
            extra={"event": "stop", "step": step},
        )
        if self.ckpt is not None:
            self._last_checkpoint(step, {"stopped": True}, "stop")
        self._finish(step)
        raise Stopped(self._stop_signal)

    def _finish(self, step: int, done: bool = True) -> None:
        failed = self.ckpt.failures if self.ckpt is not None else 0
        if self.backup is not None:  # the last checkpoint's copy, reported before the reporter closes
            # Bounded: a hung backup volume must not keep a finished job's pod running for good.
            self.backup.close(timeout=BACKUP_CLOSE_SECONDS)
        loop_seconds = getattr(self, "_loop_seconds", None)
        self.report.finish(step, done, self.start_step, failed, loop_seconds)


def run(cfg: TrainConfig, recipe_fn: Callable[[TrainConfig], Recipe] | None = None) -> Result:
    """Programmatic entry for user scripts: ``run(TrainConfig(...), my_recipe)`` under torchrun."""
    from aidc_trainer import recipe as R

    env = D.init(cfg)
    try:
        rec = recipe_fn(cfg) if recipe_fn is not None else R.resolve(cfg)
        return Trainer(cfg, rec, env).fit()
    finally:
        D.shutdown(env)
