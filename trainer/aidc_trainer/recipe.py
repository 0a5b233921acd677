"""A Recipe bundles the swappable parts of a training job (the torchtitan "train spec" idea).

A user script provides ``module:function`` returning a Recipe; built-in examples live in
``aidc_trainer.examples``. The model factory is recorded in every checkpoint manifest so the model
server can rebuild the network without the training script.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from aidc_trainer.config import TrainConfig
from aidc_trainer.data import Dataset
from aidc_trainer.errors import ConfigError

EXAMPLES = {
    "mlp": "aidc_trainer.examples.mlp:recipe",
    "transformer": "aidc_trainer.examples.transformer_lm:recipe",
}


def cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Classification and next-token loss alike: flatten to (N, C) vs (N,), in fp32."""
    if out.dim() != 2:
        out, target = out.reshape(-1, out.shape[-1]), target.reshape(-1)
    return F.cross_entropy(out if out.dtype == torch.float32 else out.float(), target)


def adam(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr)


@dataclass
class Recipe:
    name: str
    model_factory: str  # "module:function", called as fn(**model_config)
    model_config: dict[str, Any]
    build_data: Callable[[TrainConfig], Dataset]
    num_classes: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    build_optimizer: Callable[[Iterable[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer] = adam
    predict: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda out: out.argmax(-1))

    def build_model(self) -> torch.nn.Module:
        return import_ref(self.model_factory)(**self.model_config)

    @property
    def model_spec(self) -> dict[str, Any]:
        return {"factory": self.model_factory, "config": dict(self.model_config)}


def import_ref(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ConfigError(f"expected 'module:function', got {ref!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {ref!r}: {e}") from None


def resolve(cfg: TrainConfig) -> Recipe:
    ref = cfg.recipe or EXAMPLES.get(cfg.example)
    if ref is None:
        raise ConfigError(f"unknown example {cfg.example!r}; built-in: {sorted(EXAMPLES)}")
    r = import_ref(ref)(cfg)
    if not isinstance(r, Recipe):
        raise ConfigError(f"{ref} did not return a Recipe")
    r.model_config = {**r.model_config, **cfg.model_config}
    return r
