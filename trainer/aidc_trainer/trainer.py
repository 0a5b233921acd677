"""The training loop, assembled from swappable parts (recipe, data, optimiser, checkpointer, metrics)."""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from aidc_trainer import distributed as D
from aidc_trainer.checkpoint import Checkpointer, SaveResult
from aidc_trainer.config import TrainConfig
from aidc_trainer.crypto import KeyRing
from aidc_trainer.data import ShardedBatches, eval_shard
from aidc_trainer.errors import CheckpointSaveError, Stopped
from aidc_trainer.evaluation import evaluate
from aidc_trainer.metrics import Accounting, TrainMetrics
from aidc_trainer.progress import ProgressReporter
from aidc_trainer.recipe import Recipe

log = logging.getLogger("aidc_trainer")


@dataclass
class Result:
    step: int
    loss: float | None
    eval: dict[str, float] | None


@dataclass
class _PendingSync:
    """A control sync launched at ``step`` and not read yet."""

    step: int
    ctl: torch.Tensor  # [loss sum, stop signal, checkpoint due, cadence vote], summed over ranks
    work: Any  # the async all-reduce; None with one rank (``ctl`` then holds the loss only)
    local: list[float]  # this rank's flags and vote
    host: torch.Tensor | None = None  # CUDA: pinned copy of ``ctl``, valid once ``ready`` fired
    ready: Any = None


def sync_interval_vote(step_seconds: float, target_seconds: float, max_steps: int) -> int:
    """Steps between control syncs this rank asks for: about ``target_seconds`` apart, at most
    ``max_steps`` (fast steps: the sync's cost stays negligible), at least 1 (slow steps: a stop
    request must land well inside the pod's termination grace period)."""
    if step_seconds <= 0:
        return max_steps
    return max(1, min(max_steps, int(target_seconds / step_seconds)))


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
    def __init__(self, cfg: TrainConfig, recipe: Recipe, env: D.DistEnv) -> None:
        self.cfg, self.recipe, self.env = cfg, recipe, env
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
            self.ckpt = Checkpointer(
                root=cfg.checkpoint_dir,  # type: ignore[arg-type]
                rank=env.rank,
                world_size=env.world_size,
                keyring=self.keyring,
                keep=cfg.checkpoint_keep,
                model_spec=recipe.model_spec,
                group=env.ckpt_group,
                run_id=env.run_id,
                on_saved=self._on_saved,
            )
        self.progress = ProgressReporter(cfg.checkpoint_dir) if env.is_main else None
        gpus = env.world_size if env.device.type == "cuda" else 0
        self.accounting = Accounting(gpus, env.device.index if env.device.type == "cuda" else None)
        # evaluated when Prometheus scrapes, never in the training loop: an NVML query can take
        # milliseconds, which per log step was a measurable slowdown of small-model training
        self.metrics.gpu_seconds.set_function(self.accounting.gpu_seconds)
        self.metrics.energy_joules.set_function(lambda: self.accounting.energy_joules() or 0.0)
        self.start_step = 0
        self._save_requested: int | None = None  # step of the last save asked for

    # ---------------------------------------------------------------------------------- parts
    @property
    def fsdp(self) -> bool:
        return self.env.distributed and self.cfg.parallel == "fsdp"

    def _shared_state(self) -> dict[str, Any]:
        if self.fsdp:  # collective: gathers full (unsharded) tensors to rank 0's CPU
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
            s = {"model": model_sd, "optimizer": optim_sd}
        else:
            s = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.precision.scaler.is_enabled():
            s["scaler"] = self.precision.scaler.state_dict()
        return s

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
        st = loaded.state
        if self.fsdp:  # every rank holds the full state (read from rank-0's file) and keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            opts = StateDictOptions(full_state_dict=True)
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=st["model"],
                optim_state_dict=st["optimizer"],
                options=opts,
            )
        else:
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
        if "scaler" in st and self.precision.scaler.is_enabled():
            self.precision.scaler.load_state_dict(st["scaler"])
        if st.get("rank") and loaded.manifest.get("world_size") == self.env.world_size:
            D.set_rng_state(st["rank"])
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
                self.progress.checkpoint(res.step, str(res.path), self.ckpt.retained_key_ids())

    def _save(self, step: int, block: bool, extra: dict[str, Any]) -> None:
        assert self.ckpt is not None
        stall = self.ckpt.save(step, self._shared_state(), D.rng_state(), extra, block=block)
        self.metrics.ckpt_stall_seconds.observe(stall)
        self._last_save_time, self._last_save_step = time.monotonic(), step
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
        )
        self.metrics.eval_accuracy.set(res["accuracy"])
        self.metrics.eval_macro_f1.set(res["macro_f1"])
        if self.env.is_main:
            log.info("eval", extra={"event": "eval", "step": step, **res})
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
        self._last_save_time, self._last_save_step = time.monotonic(), self.start_step
        self._window = (time.perf_counter(), self.start_step)
        self._last_progress = 0.0
        self._pending_ctl: _PendingSync | None = None
        # The first sync follows step 1, so a stop request lands quickly before step times are known.
        self._interval, self._next_sync = 1, self.start_step + 1
        self._vote_from = (time.perf_counter(), self.start_step)
        self._last_log = -math.inf
        self.last_loss: float | None = None
        eval_res: dict[str, float] | None = None
        loss_fn, accum, opt = self.recipe.loss_fn, cfg.grad_accum, self.optimizer
        scaler = self.precision.scaler if self.precision.scaler.is_enabled() else None
        autocast = self.precision.autocast if self.precision.dtype is not None else contextlib.nullcontext
        ddp = isinstance(model, DDP)
        batch, device, steps = self.batches.batch, env.device, cfg.steps

        step = self.start_step
        self._loop_t0 = time.perf_counter()
        try:
            while step < steps:
                # hot path: keep it as lean as a hand-written DDP loop (bench/trainer_overhead.py)
                log_now = step + 1 == self._next_sync or step + 1 == steps
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
                elif self._pending_ctl is not None:  # the sync launched a step ago: done by now
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
        self._loop_seconds = time.perf_counter() - self._loop_t0
        eval_res = self._evaluate(step)
        if self.ckpt is not None:
            self._last_checkpoint(step, {"loss": self.last_loss, "eval": eval_res}, "final")
        self._finish(step)
        return Result(step, self.last_loss, eval_res)

    def _control_sync(self, step: int, loss_sum: torch.Tensor) -> bool:
        """One tiny all-reduce carries the loss, stop requests, the time-based checkpoint trigger and
        each rank's vote on the sync cadence. It runs in the background while the next step computes
        and is read after it, so no step waits for it, and every rank acts on its result at the same
        step. Returns whether a time-triggered checkpoint is due now."""
        cfg, env = self.cfg, self.env
        # Still pending only when the previous step synced too (interval 1, or the last step).
        due_now = self._apply_control(step)
        due = not due_now and bool(  # a save is about to happen: don't ask for another
            self.ckpt
            and cfg.checkpoint_every_seconds > 0
            and time.monotonic() - self._last_save_time >= cfg.checkpoint_every_seconds
        )
        now, (t0, s0) = time.perf_counter(), self._vote_from
        self._vote_from = (now, step)
        vote = sync_interval_vote((now - t0) / max(step - s0, 1), cfg.sync_every_seconds, cfg.log_every)
        local = [float(self._stop_signal), float(due), float(vote)]
        work = None
        if env.world_size > 1:
            cuda = env.device.type == "cuda"
            flags = torch.tensor(local, pin_memory=cuda).to(env.device, non_blocking=True)
            ctl = torch.cat([loss_sum.float().reshape(1), flags])
            # A blocking all-reduce cost ~75 us even with gloo and one rank, ~2 % of a small model's step.
            work = dist.all_reduce(ctl, async_op=True)
        else:  # one rank: nothing to agree on, the flags never leave the host
            ctl = loss_sum.float().reshape(1)
        pending = _PendingSync(step, ctl, work, local)
        if env.device.type == "cuda":
            # Read the result without draining the stream: an async copy into pinned memory and an
            # event, so reading it later waits for this step's work only, never the queued next step.
            if work is not None:
                work.wait()  # NCCL: the current stream waits for the all-reduce; the host does not
            pending.host, pending.ready = ctl.to("cpu", non_blocking=True), torch.cuda.Event()
            pending.ready.record()
        self._pending_ctl = pending
        self._schedule_next_sync(step)
        return due_now

    def _schedule_next_sync(self, step: int) -> None:
        """The next multiple of the agreed interval after ``step`` (the same on every rank)."""
        self._next_sync = (step // self._interval + 1) * self._interval

    def _apply_control(self, step: int) -> bool:
        """Act on the pending control sync (launched at an earlier step) at ``step``."""
        p, self._pending_ctl = self._pending_ctl, None
        if p is None:
            return False
        cfg, env = self.cfg, self.env
        synced_step = p.step
        if p.ready is not None:
            p.ready.synchronize()
            vals = p.host.tolist()  # type: ignore[union-attr]
        else:
            if p.work is not None:
                p.work.wait()
            vals = p.ctl.tolist()
        if p.work is None:
            vals = [vals[0], *p.local]
        # Votes are small integers, summed exactly in float32: every rank derives the same cadence.
        self._interval = max(1, int(vals[3]) // env.world_size)
        self._schedule_next_sync(step)
        self.last_loss = loss = vals[0] / env.world_size
        now_t = time.perf_counter()
        t_prev, step_prev = self._window
        self._window = (now_t, synced_step)
        n_steps = synced_step - step_prev
        sps = n_steps * cfg.batch_size * cfg.grad_accum * env.world_size / max(now_t - t_prev, 1e-9)
        if n_steps:
            self.metrics.step_seconds.observe((now_t - t_prev) / n_steps)  # mean over the window
        self.metrics.step.set(step)
        self.metrics.loss.set(loss)
        self.metrics.samples_per_second.set(sps)
        if env.is_main:
            now = time.monotonic()
            # A log line costs ~0.1 ms (cold caches between steps): every 10 steps of a small model
            # that was 2 % of training time, and hundreds of lines a second for a log pipeline.
            if now - self._last_log >= cfg.log_every_seconds or synced_step == cfg.steps:
                self._last_log = now
                log.info(
                    "train",
                    extra={
                        "event": "train",
                        "step": synced_step,
                        "loss": round(loss, 6),
                        "samples_per_second": round(sps, 1),
                    },
                )
            if not math.isfinite(loss):
                log.warning("loss is not finite", extra={"event": "nonfinite", "step": synced_step})
            if self.progress is not None and now - self._last_progress >= cfg.progress_every_seconds:
                self.progress.progress(step, cfg.steps, gpuSeconds=round(self.accounting.gpu_seconds(), 1))
                self._last_progress = now
        if vals[1]:  # the reduced flag, never the local one: all ranks must decide alike
            self._stop_signal = self._stop_signal or signal.SIGTERM  # else a peer was signalled
            self._stop(step)
        return bool(vals[2])

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
        if self.progress is not None:
            self.progress.progress(step, self.cfg.steps, gpuSeconds=round(self.accounting.gpu_seconds(), 1))
            self.progress.close()
        if self.env.is_main and done:
            extra: dict[str, Any] = {
                "event": "done",
                "step": step,
                "failed_saves": self.ckpt.failures if self.ckpt is not None else 0,
                "gpu_seconds": self.accounting.gpu_seconds(),
                "steps_run": step - self.start_step,
                "loop_seconds": getattr(self, "_loop_seconds", None),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            if (ej := self.accounting.energy_joules()) is not None:
                extra["energy_joules_node0"] = ej
            log.info("finished", extra=extra)


def run(cfg: TrainConfig, recipe_fn: Callable[[TrainConfig], Recipe] | None = None) -> Result:
    """Programmatic entry for user scripts: ``run(TrainConfig(...), my_recipe)`` under torchrun."""
    from aidc_trainer import recipe as R

    env = D.init(cfg)
    try:
        rec = recipe_fn(cfg) if recipe_fn is not None else R.resolve(cfg)
        return Trainer(cfg, rec, env).fit()
    finally:
        D.shutdown(env)
