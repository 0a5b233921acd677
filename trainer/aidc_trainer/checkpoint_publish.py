"""Rank 0's side of a save: publish the manifest and rename the checkpoint into place, then keep the
newest N (docs/contracts.md, DESIGN §6). The background writer in ``checkpoint`` calls these once
every rank's file is written and fsynced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from aidc_trainer.checkpoint_format import (
    FORMAT,
    MANIFEST,
    _manifest_mac,
    fsync_dir,
    list_checkpoints,
    step_dir_name,
    utc_now,
)
from aidc_trainer.keyring import KeyRing

__all__ = [
    "cleanup_stale",
    "discard",
    "prune",
    "publish",
    "retained_key_ids",
    "summarise",
    "write_manifest",
]


def write_manifest(
    directory: Path,
    step: int,
    world_size: int,
    files: dict[str, dict[str, Any]],
    key_id: str | None,
    keyring: KeyRing | None,
    model_spec: dict[str, Any],
    extra: dict[str, Any],
    header: dict[str, Any] | None = None,
) -> None:
    """Write ``directory``'s manifest (with its MAC when encrypted), durably.

    ``files``: every file of the checkpoint, ``{name: {"size", "sha256"}}`` as stored; ``header``:
    fields a layout adds or overrides (a sharded checkpoint's format, parallelism, layout…).
    """
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "world_size": world_size,
        "key_id": key_id,
        "files": {n: {"size": m["size"], "sha256": m["sha256"]} for n, m in sorted(files.items())},
        "model": model_spec,
        "time": utc_now(),
        "job": os.environ.get("AIDC_JOB_NAME"),
        "extra": extra,
        **(header or {}),
    }
    if key_id is not None:
        assert keyring is not None
        manifest["mac"] = _manifest_mac(keyring.key(key_id), manifest)
    part = directory / (MANIFEST + ".part")
    with open(part, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, directory / MANIFEST)
    fsync_dir(directory)


def publish(
    root: Path,
    tmp: Path,
    step: int,
    world_size: int,
    files: dict[str, dict[str, Any]],
    key_id: str | None,
    keyring: KeyRing | None,
    model_spec: dict[str, Any],
    extra: dict[str, Any],
    header: dict[str, Any] | None = None,
) -> Path:
    """Write the manifest last (:func:`write_manifest`) into ``tmp`` and rename it to the step's
    directory."""
    write_manifest(tmp, step, world_size, files, key_id, keyring, model_spec, extra, header)
    final = root / step_dir_name(step)
    if final.exists():  # a stale or corrupt copy of this step from an earlier attempt
        discard(final)
    os.rename(tmp, final)  # atomic: readers see all of the checkpoint or none of it
    fsync_dir(root)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (at least one)."""
    ckpts = list_checkpoints(root)
    for old in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        discard(old)


def retained_key_ids(root: Path) -> list[str]:
    """Key ids the checkpoints still on disk were written with (reported to the operator, which
    removes the other ids from the key Secret once no checkpoint needs them)."""
    ids = set()
    for path in list_checkpoints(root):
        with contextlib.suppress(OSError, ValueError):
            key_id = json.loads((path / "manifest.json").read_text()).get("key_id")
            if key_id:
                ids.add(key_id)
    return sorted(ids)


def cleanup_stale(root: Path, run_id: str) -> None:
    """Remove temp/trash dirs left by killed runs (not this run's own)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith((".tmp-", ".trash-")) and not entry.name.endswith(f"-{run_id}"):
            shutil.rmtree(entry, ignore_errors=True)


def summarise(failed: list[dict[str, Any]]) -> str:
    """One entry per distinct error (every rank hits the same full or read-only volume)."""
    by_error: dict[str, list[str]] = {}
    for r in failed:
        by_error.setdefault(r["error"], []).append(r["name"])
    parts = []
    for error, names in by_error.items():
        who = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
        parts.append(f"{who}: {error}")
    return "; ".join(parts)


def discard(path: Path) -> None:
    # Rename first so a half-deleted directory never looks like a checkpoint.
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)
