"""The control sync: one tiny all-reduce every few steps that keeps the ranks in step.

It carries the loss, stop requests (a signalled rank's stop vote), the time-based checkpoint trigger,
each rank's vote on the sync cadence and its GPU energy. It runs in the background while the next
step computes and is read after it, so no step waits for it, and every rank acts on its result at
the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from aidc_trainer import distributed as D
from aidc_trainer.cadence import Clock, Every, sync_interval_vote
from aidc_trainer.energy import EnergyMeter

__all__ = ["ENERGY_EVERY_SECONDS", "Control", "ControlSync"]

# NVML is read at most this often (at a control sync): a query can take milliseconds.
ENERGY_EVERY_SECONDS = 5.0


@dataclass
class Control:
    """What all ranks agreed at one control sync: the same values on every rank."""

    step: int  # the step the sync was launched after
    loss: float  # mean over ranks
    stop: bool  # some rank was signalled: every rank stops
    checkpoint_due: bool  # some rank's time-based checkpoint is due
    energy: list[float]  # [joules, GPUs measured, GPUs], summed over ranks


@dataclass
class _PendingSync:
    """A control sync launched at ``step`` and not read yet."""

    step: int
    # [loss sum, stop signal, checkpoint due, cadence vote, joules, GPUs measured, GPUs], summed over
    # ranks (float64: joules stay exact to well below 1 J for years of GPU time)
    ctl: torch.Tensor
    work: Any  # the async all-reduce; None with one rank (``ctl`` then holds the loss only)
    local: list[float]  # this rank's flags and vote
    host: torch.Tensor | None = None  # CUDA: pinned copy of ``ctl``, valid once ``ready`` fired
    ready: Any = None


class ControlSync:
    """Launches and reads control syncs and keeps the cadence all ranks agreed on.

    ``next_sync`` is the step after which the next sync launches; ``pending`` is the one in flight.
    """

    def __init__(
        self,
        env: D.DistEnv,
        target_seconds: float,
        max_interval: int,
        start_step: int,
        energy_meter: EnergyMeter,
        clock: Clock,
    ) -> None:
        self.env, self.clock, self.energy_meter = env, clock, energy_meter
        self.target_seconds, self.max_interval = target_seconds, max_interval
        self.pending: _PendingSync | None = None
        # The first sync follows step 1, so a stop request lands quickly before step times are known.
        self.interval, self.next_sync = 1, start_step + 1
        self._vote_from = (clock(), start_step)
        self._energy_every = Every(ENERGY_EVERY_SECONDS, clock)
        self._energy_local = [0.0, 0.0, float(energy_meter.gpu)]

    def launch(self, step: int, loss_sum: torch.Tensor, stop_signal: int, checkpoint_due: bool) -> None:
        """Start the sync after ``step``; read it with :meth:`read` at a later step."""
        env = self.env
        now, (t0, s0) = self.clock(), self._vote_from
        self._vote_from = (now, step)
        vote = sync_interval_vote((now - t0) / max(step - s0, 1), self.target_seconds, self.max_interval)
        if self._energy_every.due():  # else the last reading rides again
            self._energy_local = self.energy_meter.sample()
        local = [float(stop_signal), float(checkpoint_due), float(vote), *self._energy_local]
        work = None
        if env.world_size > 1:
            cuda = env.device.type == "cuda"
            flags = torch.tensor(local, dtype=torch.float64, pin_memory=cuda)
            flags = flags.to(env.device, non_blocking=True)
            ctl = torch.cat([loss_sum.double().reshape(1), flags])
            # A blocking all-reduce cost ~75 us even with gloo and one rank, ~2 % of a small model's step.
            work = dist.all_reduce(ctl, async_op=True)
        else:  # one rank: nothing to agree on, the flags never leave the host
            ctl = loss_sum.double().reshape(1)
        pending = _PendingSync(step, ctl, work, local)
        if env.device.type == "cuda":
            # Read the result without draining the stream: an async copy into pinned memory and an
            # event, so reading it later waits for this step's work only, never the queued next step.
            if work is not None:
                work.wait()  # NCCL: the current stream waits for the all-reduce; the host does not
            pending.host, pending.ready = ctl.to("cpu", non_blocking=True), torch.cuda.Event()
            pending.ready.record()
        self.pending = pending
        self._schedule(step)

    def read(self, step: int) -> Control | None:
        """The pending sync's result, read at ``step`` (None when none is pending); adopts the
        agreed cadence from ``step`` on."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        ws = self.env.world_size
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
        self.interval = max(1, int(vals[3]) // ws)
        self._schedule(step)
        # The reduced stop flag, never the local one: all ranks must decide alike.
        return Control(p.step, vals[0] / ws, bool(vals[1]), bool(vals[2]), vals[4:7])

    def _schedule(self, step: int) -> None:
        """The next multiple of the agreed interval after ``step`` (the same on every rank)."""
        self.next_sync = (step // self.interval + 1) * self.interval
