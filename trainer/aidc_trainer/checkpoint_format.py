"""Checkpoint format: names, manifest, verification and loading (layout: aidc_trainer.checkpoint).

Everything here only reads a checkpoint directory; saving lives in ``checkpoint``, the collective
resume decision in ``checkpoint_resume``.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import hmac
import io
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aidc_trainer.crypto import DecryptingReader, read_header
from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError, WrongKeyError
from aidc_trainer.keyring import KeyRing
from aidc_trainer.model_registry import ModelRegistry, default_registry

# Same logger name as before the split: operators' log filters and tests select on it.
log = logging.getLogger("aidc_trainer.checkpoint")

FORMAT = "aidc-checkpoint/1"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d{9,})$")
_REQUIRED = ("step", "world_size", "key_id", "files", "model", "time")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.bin"


def file_identity(step: int, name: str) -> str:
    """Bound into every encrypted chunk: a file cannot be swapped with another rank's or step's."""
    return f"{step_dir_name(step)}/{name}"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LoadedCheckpoint:
    """A verified, decrypted checkpoint held in memory. ``state["model"]`` is the model state_dict."""

    step: int
    path: Path
    manifest: dict[str, Any]
    state: dict[str, Any]


# --------------------------------------------------------------------------------------- listing


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete-looking checkpoint directories (``step-*``), oldest first. Not verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return [p for _, p in sorted(found)]


def _step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    if not m:
        raise CheckpointCorruptError(f"{path}: not a checkpoint directory name", "format", str(path))
    return int(m.group(1))


# ---------------------------------------------------------------------------------- verification


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _manifest_mac(key: bytes, manifest: dict[str, Any]) -> str:
    mac_key = hmac.new(key, b"aidc manifest mac v1", hashlib.sha256).digest()
    return hmac.new(mac_key, _canonical(manifest), hashlib.sha256).hexdigest()


def read_manifest(path: str | os.PathLike[str], keyring: KeyRing | None) -> dict[str, Any]:
    """Parse and authenticate ``manifest.json`` of the checkpoint at ``path``."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path}: incomplete checkpoint: no {MANIFEST}", "manifest", str(path)
        ) from None
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise CheckpointCorruptError(f"{mpath}: unreadable manifest ({e})", "manifest", str(path)) from None
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise CheckpointCorruptError(f"{mpath}: manifest lacks {missing}", "manifest", str(path))
    if manifest["step"] != _step_of(path):
        raise CheckpointCorruptError(
            f"{mpath}: manifest step {manifest['step']} does not match directory {path.name}",
            "manifest",
            str(path),
        )
    key_id = manifest["key_id"]
    if key_id is not None:
        if keyring is None:
            raise MissingKeyError(
                f"{path}: checkpoint is encrypted with key id {key_id!r} but no key is configured", key_id
            )
        key = keyring.key(key_id)
        if not hmac.compare_digest(str(manifest.get("mac", "")), _manifest_mac(key, manifest)):
            _raise_wrong_key_or_tampered(path, manifest, key_id, keyring)
    return manifest


def _raise_wrong_key_or_tampered(path: Path, manifest: dict[str, Any], key_id: str, keyring: KeyRing) -> None:
    # A MAC failure is either a wrong key or an edited manifest; a data file's key check tells which.
    for name in manifest.get("files", {}):
        try:
            with open(path / name, "rb") as f:
                DecryptingReader(f, keyring, None, str(path / name))
        except WrongKeyError:
            raise
        except (OSError, CheckpointCorruptError, MissingKeyError):
            continue
        break
    raise CheckpointCorruptError(
        f"{path / MANIFEST}: manifest authentication failed (manifest modified after save)",
        "manifest",
        str(path),
    )


def _check_file_bytes(path: Path, name: str, data: bytes, meta: dict[str, Any]) -> None:
    size = int(meta.get("size", -1))
    if len(data) < size:
        raise CheckpointCorruptError(
            f"{path / name}: truncated: {len(data)} bytes, manifest says {size}",
            "truncated",
            str(path / name),
        )
    if len(data) != size:
        raise CheckpointCorruptError(
            f"{path / name}: size {len(data)} bytes, manifest says {size} (modified after save)",
            "size",
            str(path / name),
        )
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointCorruptError(
            f"{path / name}: sha256 does not match the manifest (content modified after save)",
            "sha256",
            str(path / name),
        )


def _read_checked(path: Path, manifest: dict[str, Any], name: str) -> bytes:
    meta = manifest["files"].get(name)
    if meta is None:
        raise CheckpointCorruptError(f"{path}: manifest does not list {name}", "missing-file", str(path))
    try:
        data = (path / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path / name}: file missing", "missing-file", str(path / name)
        ) from None
    _check_file_bytes(path, name, data, meta)
    return data


def _plaintext(
    path: Path, manifest: dict[str, Any], name: str, data: bytes, keyring: KeyRing | None
) -> bytes:
    if manifest["key_id"] is None:
        return data
    assert keyring is not None  # read_manifest raised otherwise
    reader = DecryptingReader(
        io.BytesIO(data), keyring, file_identity(manifest["step"], name), str(path / name)
    )
    if reader.header.key_id != manifest["key_id"]:
        raise CheckpointCorruptError(
            f"{path / name}: encrypted with key id {reader.header.key_id!r}, "
            f"manifest says {manifest['key_id']!r}",
            "manifest",
            str(path / name),
        )
    return reader.read_all()


def verify(
    path: str | os.PathLike[str], keyring: KeyRing | None = None, files: Iterable[str] | None = None
) -> dict[str, Any]:
    """Fully verify a checkpoint directory and return its manifest.

    Checks the manifest (and its MAC when encrypted), every listed file's size and sha256, and,
    when encrypted, authenticates every chunk (plaintext is discarded). Raises
    :class:`CheckpointCorruptError` with a reason, or :class:`MissingKeyError`/:class:`WrongKeyError`.
    """
    path = Path(path)
    manifest = read_manifest(path, keyring)
    for name in files if files is not None else manifest["files"]:
        data = _read_checked(path, manifest, name)
        if manifest["key_id"] is not None:
            assert keyring is not None
            reader = DecryptingReader(
                io.BytesIO(data), keyring, file_identity(manifest["step"], name), str(path / name)
            )
            for _ in reader.chunks():
                pass
    return manifest


def _torch_load(plain: bytes) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code (safe even for unencrypted checkpoints)
    return torch.load(io.BytesIO(plain), map_location="cpu", weights_only=True)


def load_checkpoint(path: str | os.PathLike[str], keyring: KeyRing | None, rank: int = 0) -> LoadedCheckpoint:
    """Verify and load one checkpoint for ``rank``: rank-0's shared state plus the rank's own state.

    Decrypts in memory only. ``state["rank"]`` is None when the checkpoint has no file for ``rank``
    (the world grew). A sharded (DCP) checkpoint gives ``state["model"]`` only, as full tensors.
    """
    path = Path(path)
    manifest = read_manifest(path, keyring)
    if manifest.get("layout") == "dcp":  # sharded (format 2): full tensors of the model, in memory
        from aidc_trainer.checkpoint_sharded import load_full

        return load_full(path, keyring)
    shared = _plaintext(path, manifest, rank_file(0), _read_checked(path, manifest, rank_file(0)), keyring)
    state = _torch_load(shared)
    if rank != 0:
        name = rank_file(rank)
        if name in manifest["files"]:
            own = _torch_load(_plaintext(path, manifest, name, _read_checked(path, manifest, name), keyring))
            state["rank"] = own.get("rank")
        else:
            state["rank"] = None
    return LoadedCheckpoint(step=int(manifest["step"]), path=path, manifest=manifest, state=state)


def load_latest(
    root: str | os.PathLike[str], keyring: KeyRing | None, rank: int = 0
) -> LoadedCheckpoint | None:
    """Newest checkpoint under ``root`` that verifies, or None if there is none.

    Corrupt, truncated or tampered checkpoints are logged with the reason and skipped. A missing or
    wrong key raises :class:`MissingKeyError` (a configuration error: falling back to older
    checkpoints would silently lose progress).
    """
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path, keyring, rank)
        except CheckpointCorruptError as e:
            log.warning("skipping checkpoint %s: %s", path.name, e, extra={"reason": e.reason})
    return None


def build_model_from_manifest(
    manifest: dict[str, Any], registry: ModelRegistry | None = None
) -> torch.nn.Module:
    """Rebuild the network described by ``manifest["model"]`` ({"factory": "mod:fn", "config": {...}}).

    The factory is looked up in ``registry`` (default: built-ins, ``aidc.models`` entry points and the
    ``AIDC_MODEL_FACTORIES`` allowlist), never imported off the manifest: an unencrypted manifest has
    no MAC. Raises :class:`~aidc_trainer.model_registry.UnregisteredModelError` for any other name.
    """
    return (registry or default_registry()).build(manifest.get("model") or {})


# Filesystems that cannot fsync a directory say so with these; anything else (EIO…) is a real failure.
_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; raises OSError unless the filesystem cannot do it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in (*_FSYNC_UNSUPPORTED, errno.EACCES):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def peek_key_id(path: str | os.PathLike[str]) -> str | None:
    """Key id an encrypted checkpoint file names in its header (no key needed)."""
    with open(path, "rb") as f:
        return read_header(f, str(path)).key_id
