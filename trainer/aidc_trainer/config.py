"""Training configuration: one dataclass, filled from defaults < AIDC_* environment < command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from aidc_trainer.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp", "none")
ON_NO_VALID_CHECKPOINT = ("Fail", "StartFresh")  # spelled as spec.checkpoint.onNoValidCheckpoint

# field name -> environment variable the operator renders (docs/contracts.md)
ENV = {
    "checkpoint_dir": "AIDC_CHECKPOINT_DIR",
    "checkpoint_every_steps": "AIDC_CHECKPOINT_EVERY_STEPS",
    "checkpoint_every_seconds": "AIDC_CHECKPOINT_EVERY_SECONDS",
    "checkpoint_keep": "AIDC_CHECKPOINT_KEEP",
    "checkpoint_backup_dir": "AIDC_CHECKPOINT_BACKUP_DIR",
    "checkpoint_backup_keep": "AIDC_CHECKPOINT_BACKUP_KEEP",
    "on_no_valid_checkpoint": "AIDC_ON_NO_VALID_CHECKPOINT",
    "key_dir": "AIDC_KEY_DIR",
    "kek_file": "AIDC_KEK_FILE",
    "metrics_port": "AIDC_METRICS_PORT",
}


@dataclass
class TrainConfig:
    example: str = field(default="mlp", metadata={"help": "built-in example: mlp | transformer"})
    recipe: str | None = field(default=None, metadata={"help": "module:function returning a Recipe"})
    model_config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "JSON merged into the model factory's config"}
    )
    steps: int = field(default=200, metadata={"help": "total optimiser steps"})
    batch_size: int = field(default=64, metadata={"help": "per-rank micro-batch size"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    lr: float = 1e-3
    seed: int = 0
    precision: str = field(
        default="fp32", metadata={"help": "fp32 | bf16 | fp16 (autocast; fp16 adds GradScaler)"}
    )
    parallel: str = field(
        default="ddp", metadata={"help": "ddp | fsdp (FSDP2, sharded DCP checkpoints) | none"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    deterministic: bool = field(default=True, metadata={"help": "deterministic kernels (bitwise resume)"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_batch_size: int = field(
        default=0, metadata={"help": "rows per evaluation forward pass (0: --batch-size, which fits)"}
    )
    log_every: int = field(
        default=10, metadata={"help": "cross-rank control sync (loss, stop, timer) at most N steps apart"}
    )
    sync_every_seconds: float = field(
        default=1.0,
        metadata={"help": "slow steps: sync more often than --log-every, about once per N seconds"},
    )
    log_every_seconds: float = field(
        default=1.0, metadata={"help": "at most one train log line per N seconds (the last step always logs)"}
    )
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int = 0
    checkpoint_every_seconds: float = 0.0
    checkpoint_keep: int = 3
    checkpoint_backup_dir: str | None = field(
        default=None,
        metadata={
            "help": "second root: rank 0 copies each checkpoint there (verified, keep-N); resume falls "
            "back to it when the checkpoint dir has none that verifies"
        },
    )
    checkpoint_backup_keep: int = field(
        default=0, metadata={"help": "copies kept in the backup dir (0: --checkpoint-keep)"}
    )
    key_dir: str | None = None
    kek_file: str | None = None
    resume: bool = field(default=True, metadata={"help": "resume from the newest valid checkpoint"})
    on_no_valid_checkpoint: str = field(
        default="Fail",
        metadata={
            "help": "checkpoints exist but none verifies: Fail (exit 7, touch nothing) | "
            "StartFresh (move them to damaged-<time>/, start at step 0)"
        },
    )
    metrics_port: int = field(default=9400, metadata={"help": "Prometheus port on rank 0 (-1: off)"})
    progress_every_seconds: float = 10.0
    pg_timeout_seconds: float = 600.0

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.parallel in PARALLEL, f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}")
        need(self.log_every >= 1, "log_every must be >= 1")
        need(self.sync_every_seconds > 0, f"sync_every_seconds must be > 0, got {self.sync_every_seconds}")
        need(self.log_every_seconds >= 0, f"log_every_seconds must be >= 0, got {self.log_every_seconds}")
        need(self.eval_every >= 0, "eval_every must be >= 0")
        need(self.eval_batch_size >= 0, f"eval_batch_size must be >= 0, got {self.eval_batch_size}")
        need(self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0")
        need(self.checkpoint_every_seconds >= 0, "checkpoint_every_seconds must be >= 0")
        need(self.checkpoint_keep >= 1, "checkpoint_keep must be >= 1")
        need(self.checkpoint_backup_keep >= 0, "checkpoint_backup_keep must be >= 0")
        if self.checkpoint_backup_dir:
            need(bool(self.checkpoint_dir), "checkpoint_backup_dir needs checkpoint_dir")
            same = os.path.realpath(self.checkpoint_backup_dir) == os.path.realpath(self.checkpoint_dir or "")
            need(not same, "checkpoint_backup_dir must differ from checkpoint_dir")
        onv = self.on_no_valid_checkpoint
        need(onv in ON_NO_VALID_CHECKPOINT, f"on_no_valid_checkpoint must be Fail|StartFresh, got {onv!r}")
        need(self.kek_file is None or self.key_dir is not None, "kek_file needs key_dir")

    @property
    def checkpointing(self) -> bool:
        return bool(self.checkpoint_dir)


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {s!r}")


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type)
    try:
        if kind.startswith("dict"):
            val = json.loads(raw)
            if not isinstance(val, dict):
                raise ValueError("expected a JSON object")
            return val
        if kind == "bool":
            return _parse_bool(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as e:
        raise ConfigError(f"{f.name}: cannot parse {raw!r}: {e}") from None
    return raw or None if "None" in kind else raw


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aidc_trainer", description="aidc trainer (run under torchrun)"
    )
    for f in dataclasses.fields(TrainConfig):
        env = ENV.get(f.name)
        help_ = f.metadata.get("help", "") + (f" [env {env}]" if env else "")
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=help_ or None)
    return p


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> TrainConfig:
    """Build and validate the config; raises ConfigError (exit code 4) on bad input."""
    environ = dict(os.environ if environ is None else environ)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad flags; the contract says 4
        if e.code in (0, None):
            raise
        raise ConfigError("invalid command line") from None
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        raw = getattr(args, f.name)
        if raw is None and f.name in ENV and environ.get(ENV[f.name], "") != "":
            raw = environ[ENV[f.name]]
        if raw is not None:
            values[f.name] = _convert(f, raw)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
