"""Deterministic, stateless data sharding.

The batch for (step, micro-batch, rank) is a pure function of the seed, so resuming at step s needs
no saved iterator state and reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class Split:
    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class Dataset:
    train: Split
    eval: Split


@functools.lru_cache(maxsize=4)  # a step touches at most two epochs; never regenerate per batch
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def stream_indices(start: int, count: int, n: int, seed: int) -> torch.Tensor:
    """Items [start, start+count) of the infinite stream: a fresh permutation of 0..n-1 per epoch."""
    epoch, off = divmod(start, n)
    if off + count <= n:  # common case: inside one epoch, a view of the cached permutation
        return _epoch_perm(n, seed, epoch)[off : off + count]
    out, pos = [], start
    while count > 0:
        epoch, off = divmod(pos, n)
        take = min(count, n - off)
        out.append(_epoch_perm(n, seed, epoch)[off : off + take])
        pos, count = pos + take, count - take
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class ShardedBatches:
    """Rank ``rank`` of ``world`` gets its slice of each global micro-batch."""

    def __init__(self, split: Split, batch_size: int, grad_accum: int, rank: int, world: int, seed: int):
        self.split, self.b, self.accum, self.rank, self.world, self.seed = (
            split,
            batch_size,
            grad_accum,
            rank,
            world,
            seed,
        )

    def batch(self, step: int, micro: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        global_micro = step * self.accum + micro
        start = global_micro * self.world * self.b + self.rank * self.b
        idx = stream_indices(start, self.b, len(self.split), self.seed)
        x, y = self.split.inputs[idx], self.split.targets[idx]
        if device.type == "cpu":
            return x, y
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def eval_shard(split: Split, rank: int, world: int) -> Split:
    return Split(split.inputs[rank::world], split.targets[rank::world])
