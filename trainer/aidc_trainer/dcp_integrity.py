"""What makes reading a DCP checkpoint off a volume safe: its files are the ones the manifest lists,
and nothing in them can run code.

- :func:`verify_files`: size and sha256 (as stored) of each file against the manifest.
- DCP's ``.metadata`` is a pickle and DCP's reader calls ``pickle.load`` on it; its load planner
  unpickles byte items with ``weights_only=False``. An encrypted checkpoint is authenticated chunk by
  chunk, but an unencrypted one carries no MAC, so anyone who can write the volume could hand every
  reader (trainer, model server, tools) code to run. :func:`read_dcp_metadata` unpickles only DCP's
  own metadata classes, torch dtypes, ``Size`` and paths; :class:`SafeLoadPlanner` accepts byte items
  only when ``torch.load(weights_only=True)`` does.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from aidc_trainer.errors import CheckpointCorruptError

__all__ = ["MetadataUnpickler", "SafeLoadPlanner", "read_dcp_metadata", "verify_files"]

METADATA = ".metadata"
_HASH_BLOCK = 1 << 20
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch's layout object
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


def verify_files(directory: Path, files: dict[str, dict[str, Any]], names: Iterable[str]) -> None:
    """Check size and sha256 (as stored) of each named file against the manifest's ``files``.

    Raises :class:`CheckpointCorruptError` naming the first file that is missing or differs.
    """
    directory = Path(directory)
    for name in names:
        entry = files.get(name)
        if not isinstance(entry, dict) or "size" not in entry or "sha256" not in entry:
            raise CheckpointCorruptError(f"{name}: not listed in the manifest", "manifest", name)
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{name}: missing", "missing-file", name) from None
        if size != entry["size"]:
            raise CheckpointCorruptError(
                f"{name}: size {size} does not match the manifest's {entry['size']} (truncated or modified)",
                "size",
                name,
            )
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                sha.update(block)
        if sha.hexdigest() != entry["sha256"]:
            raise CheckpointCorruptError(
                f"{name}: sha256 does not match the manifest (content modified after save)", "sha256", name
            )


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata classes and torch dtypes; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        # No dotted names: protocol 4 resolves "a.b.c" attribute by attribute, which would reach
        # anything the allowed modules import (torch.serialization.os.system…).
        if "." not in name:
            if module in _DCP_METADATA_MODULES:
                found = super().find_class(module, name)
                if isinstance(found, type) and found.__module__ == module:  # its own dataclasses, enums
                    return found
            elif (module, name) in _SAFE_GLOBALS:
                return super().find_class(module, name)
            elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_dcp_metadata(stream: io.IOBase | Any, name: str = METADATA) -> Metadata:
    """DCP's ``.metadata`` from a (decrypted) stream, without executing arbitrary pickled code."""
    try:
        metadata = MetadataUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise CheckpointCorruptError(f"{name}: not DCP metadata ({e})", "format", name) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointCorruptError(f"{name}: not DCP metadata", "format", name)
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that refuses byte items which are more than plain data."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        # DefaultLoadPlanner unpickles byte items with weights_only=False; parse them as data first,
        # so anything but plain data fails here.
        try:
            torch.load(value, weights_only=True)
        except Exception as e:
            fqn = read_item.dest_index.fqn
            raise CheckpointCorruptError(f"item {fqn}: not plain data ({e})", "format", fqn) from None
        value.seek(0)
        super().load_bytes(read_item, value)
