"""Process-group setup under torchrun (NCCL on CUDA, gloo on CPU), device choice and seeding."""

from __future__ import annotations

import datetime as dt
import os
import random
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from aidc_trainer.config import TrainConfig


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    ckpt_group: Any = None  # gloo group used only by the checkpoint thread
    run_id: str = "0"

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun(environ: dict[str, str] | None = None) -> bool:
    # The operator also sets WORLD_SIZE/RANK (= pods, node rank) for plain `python` commands;
    # only torchrun's per-process LOCAL_RANK means the global values are per process.
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env and "RANK" in env


def init(cfg: TrainConfig) -> DistEnv:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        from aidc_trainer.errors import ConfigError

        raise ConfigError("device=cuda but CUDA is not available")
    if not under_torchrun():
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        return DistEnv(0, 0, 1, device, None, None, uuid.uuid4().hex[:8])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = dt.timedelta(seconds=cfg.pg_timeout_seconds)
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
    # one id per run, agreed by all ranks: names this run's temp checkpoint directories
    box = [uuid.uuid4().hex[:8] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=ckpt_group)
    return DistEnv(rank, local_rank, world, device, backend, ckpt_group, str(box[0]))


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Filling every torch.empty with NaN is a debugging aid that cost ~30% per step on a small
        # model (bench/trainer_overhead.py); deterministic kernel choice is what resume needs.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed for rank-local randomness (dropout) when no saved RNG state exists for this rank."""
    return (seed * 1_000_003 + rank * 7919 + step) % 2**63


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
