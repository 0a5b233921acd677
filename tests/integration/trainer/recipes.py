"""User recipes that stand in for what the example MLP cannot show: the MLP plus one twist.

--recipe tests.integration.trainer.recipes:slow       # 0.1 s per training step (a big model)
--recipe tests.integration.trainer.recipes:capped     # a forward pass over 16 rows runs out of memory
"""

from __future__ import annotations

import time

import torch
from torch import nn

from aidc_trainer.config import TrainConfig
from aidc_trainer.examples import mlp
from aidc_trainer.recipe import Recipe


class SlowMLP(nn.Module):
    def __init__(self, delay: float, **mlp_config: int) -> None:
        super().__init__()
        self.delay, self.net = delay, mlp.build_model(**mlp_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay)
        return self.net(x)


class CappedMLP(nn.Module):
    """Fails like an exhausted device when one forward pass sees more than ``max_rows`` rows."""

    def __init__(self, max_rows: int, **mlp_config: int) -> None:
        super().__init__()
        self.max_rows, self.net = max_rows, mlp.build_model(**mlp_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            raise torch.OutOfMemoryError(f"a forward pass over {x.shape[0]} rows does not fit")
        return self.net(x)


def build_slow(delay: float = 0.1, **mlp_config: int) -> nn.Module:
    return SlowMLP(delay, **mlp_config)


def build_capped(max_rows: int = 16, **mlp_config: int) -> nn.Module:
    return CappedMLP(max_rows, **mlp_config)


def _twist(cfg: TrainConfig, factory: str, extra: dict[str, float]) -> Recipe:
    r = mlp.recipe(cfg)
    r.model_factory, r.model_config = f"{__name__}:{factory}", {**extra, **r.model_config}
    return r


def slow(cfg: TrainConfig) -> Recipe:
    return _twist(cfg, "build_slow", {"delay": 0.1})


def capped(cfg: TrainConfig) -> Recipe:
    return _twist(cfg, "build_capped", {"max_rows": 16})
