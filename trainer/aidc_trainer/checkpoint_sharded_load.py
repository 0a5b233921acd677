"""One process builds a servable model from a checkpoint of either layout (the model server's loader).

- ``aidc-checkpoint/1`` (one ``rank-<r>.bin`` per rank): verified and decrypted in memory by
  :func:`checkpoint_format.load_checkpoint`.
- ``"layout": "dcp"`` (the DCP shards of every rank plus ``.metadata``): the manifest is
  authenticated (MAC when encrypted), every listed file's size and sha256 is checked, then
  ``dcp.load`` fills the model's state_dict single-process (no process group), resharding whatever
  world size wrote it, decrypting chunk by chunk in memory.

Either way the model comes from a *registered* factory (:mod:`aidc_trainer.model_registry`), and
nothing read off the volume can run code: DCP's ``.metadata`` is a pickle, so it is unpickled with
an allowlist of DCP's own metadata classes (an unencrypted checkpoint's files carry no MAC), and
byte items load with ``weights_only``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.checkpoint import CheckpointException

from aidc_trainer import dcp_storage
from aidc_trainer.checkpoint_format import build_model_from_manifest, load_checkpoint, read_manifest
from aidc_trainer.dcp_integrity import read_dcp_metadata
from aidc_trainer.errors import CheckpointCorruptError
from aidc_trainer.keyring import KeyRing
from aidc_trainer.model_registry import ModelRegistry, default_registry

__all__ = ["ServableModel", "is_dcp", "load_servable", "read_dcp_metadata"]

METADATA = ".metadata"


@dataclass
class ServableModel:
    """A verified checkpoint's network with its weights loaded (CPU, train mode as built)."""

    step: int
    path: Path
    manifest: dict[str, Any]
    module: nn.Module


def is_dcp(manifest: dict[str, Any]) -> bool:
    return manifest.get("layout") == "dcp"


def _load_dcp(path: Path, manifest: dict[str, Any], keyring: KeyRing | None, module: nn.Module) -> None:
    step = int(manifest["step"])
    files = manifest.get("files")
    if not isinstance(files, dict) or METADATA not in files:
        raise CheckpointCorruptError(f"{path}: manifest lists no {METADATA}", "manifest", str(path))
    dcp_storage.verify_files(path, files, sorted(files))
    state = {"model": module.state_dict()}
    # Only the model's entries are requested: the optimizer's shards in the checkpoint are not read.
    with warnings.catch_warnings():  # "torch.distributed is disabled…": single process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        reader = dcp_storage.EncryptedReader(path, keyring, step)  # metadata and byte items: no code runs
        try:
            dcp_storage.load(state, reader, no_dist=True)
        except CheckpointException as e:  # a BaseException: callers' `except Exception` would miss it
            raise RuntimeError(f"{path}: DCP load failed: {e}") from None
    module.load_state_dict(state["model"], strict=True)


def load_servable(
    path: str | Path, keyring: KeyRing | None, registry: ModelRegistry | None = None
) -> ServableModel:
    """Verify the checkpoint at ``path`` and build its model with the saved weights.

    Raises :class:`CheckpointCorruptError` (skip it, try an older one), ``MissingKeyError`` /
    ``WrongKeyError`` (configuration), or ``UnregisteredModelError`` (configuration; raised before
    any data file is read).
    """
    path = Path(path)
    registry = registry or default_registry()
    manifest = read_manifest(path, keyring)
    registry.check(manifest.get("model") or {})
    if is_dcp(manifest):
        module = build_model_from_manifest(manifest, registry)
        _load_dcp(path, manifest, keyring, module)
    else:
        loaded = load_checkpoint(path, keyring, rank=0)
        manifest = loaded.manifest
        module = build_model_from_manifest(manifest, registry)
        module.load_state_dict(loaded.state["model"], strict=True)
    return ServableModel(step=int(manifest["step"]), path=path, manifest=manifest, module=module)
