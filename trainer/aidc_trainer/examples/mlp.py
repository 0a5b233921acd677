"""MLP classifier 10→100→10 (Adam, cross-entropy) on synthetic data made on the fly.

Labels come from a fixed random "teacher" network, so the task is learnable and the data is the
same on every rank and every run (``data_seed``), with no download.

    torchrun --nproc-per-node=2 -m aidc_trainer --example mlp --steps 200
    python -m aidc_trainer.examples.mlp --steps 200
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from aidc_trainer.config import TrainConfig
from aidc_trainer.data import Dataset, Split
from aidc_trainer.recipe import Recipe

FACTORY = "aidc_trainer.examples.mlp:build_model"


def build_model(in_features: int = 10, hidden: int = 100, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def make_data(
    in_features: int = 10,
    num_classes: int = 10,
    n_train: int = 8192,
    n_eval: int = 2048,
    data_seed: int = 1234,
) -> Dataset:
    g = torch.Generator().manual_seed(data_seed)
    teacher = torch.randn(in_features, num_classes, generator=g)
    x = torch.randn(n_train + n_eval, in_features, generator=g)
    y = (x @ teacher + 0.1 * torch.randn(n_train + n_eval, num_classes, generator=g)).argmax(-1)
    return Dataset(Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]))


def recipe(cfg: TrainConfig) -> Recipe:
    mc = {"in_features": 10, "hidden": 100, "num_classes": 10, **cfg.model_config}
    return Recipe(
        name="mlp",
        model_factory=FACTORY,
        model_config=mc,
        build_data=lambda _cfg: make_data(mc["in_features"], mc["num_classes"]),
        num_classes=mc["num_classes"],
    )


if __name__ == "__main__":
    from aidc_trainer.launch import main

    sys.exit(main(["--example", "mlp", *sys.argv[1:]]))
