"""A user recipe whose training step takes ``delay`` seconds: the example MLP plus a sleep.

Stands in for a large model (seconds per step) in tests of behaviour that depends on step time.
Used as ``--recipe tests.integration.trainer.slow_recipe:recipe``.
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


def build_model(delay: float = 0.1, **mlp_config: int) -> nn.Module:
    return SlowMLP(delay, **mlp_config)


def recipe(cfg: TrainConfig) -> Recipe:
    r = mlp.recipe(cfg)
    r.model_factory, r.model_config = f"{__name__}:build_model", {"delay": 0.1, **r.model_config}
    return r
