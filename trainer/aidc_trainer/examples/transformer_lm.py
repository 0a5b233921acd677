"""A small causal transformer language model on generated text (character level, no download).

The text is produced by a seeded template grammar, so it has real structure to learn (word
spelling, agreement between slots) while being identical on every rank and run.

    torchrun --nproc-per-node=2 -m aidc_trainer --example transformer --steps 300 --batch-size 16
"""

from __future__ import annotations

import random
import string
import sys

import torch
from torch import nn

from aidc_trainer.config import TrainConfig
from aidc_trainer.data import Dataset, Split
from aidc_trainer.recipe import Recipe

FACTORY = "aidc_trainer.examples.transformer_lm:build_model"
VOCAB = string.ascii_lowercase + " .,\n"

_SUBJECTS = ["the cat", "a dog", "the model", "every node", "the trainer", "a gpu", "the operator"]
_VERBS = ["saves", "loads", "trains", "checks", "sees", "restarts", "serves"]
_OBJECTS = ["a checkpoint", "the key", "many steps", "the batch", "a manifest", "the loss", "its peers"]
_ENDS = [".", " quickly.", " again.", " at night.", " without fear."]


def generate_text(n_sentences: int = 4000, seed: int = 7) -> str:
    rnd = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        s = f"{rnd.choice(_SUBJECTS)} {rnd.choice(_VERBS)} {rnd.choice(_OBJECTS)}{rnd.choice(_ENDS)}"
        lines.append(s)
    return "\n".join(lines) + "\n"


def encode(text: str) -> torch.Tensor:
    table = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([table[c] for c in text], dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    return "".join(VOCAB[int(t)] for t in tokens)


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def build_model(
    vocab_size: int = len(VOCAB), d_model: int = 64, n_heads: int = 4, n_layers: int = 2, seq_len: int = 32
) -> nn.Module:
    return TinyLM(vocab_size, d_model, n_heads, n_layers, seq_len)


def make_data(seq_len: int = 32, eval_fraction: float = 0.1) -> Dataset:
    tokens = encode(generate_text())
    n = (len(tokens) - 1) // seq_len
    x = tokens[: n * seq_len].reshape(n, seq_len)
    y = tokens[1 : n * seq_len + 1].reshape(n, seq_len)
    cut = int(n * (1 - eval_fraction))
    return Dataset(Split(x[:cut], y[:cut]), Split(x[cut:], y[cut:]))


def recipe(cfg: TrainConfig) -> Recipe:
    mc = {
        "vocab_size": len(VOCAB),
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "seq_len": 32,
        **cfg.model_config,
    }
    return Recipe(
        name="transformer",
        model_factory=FACTORY,
        model_config=mc,
        build_data=lambda _cfg: make_data(mc["seq_len"]),
        num_classes=mc["vocab_size"],
    )


if __name__ == "__main__":
    from aidc_trainer.launch import main

    sys.exit(main(["--example", "transformer", *sys.argv[1:]]))
