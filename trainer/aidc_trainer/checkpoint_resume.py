"""Collective resume: every rank loads the same checkpoint, or all refuse together.

Policy when checkpoints exist but none verifies (``AIDC_ON_NO_VALID_CHECKPOINT``):

- ``Fail`` (default): raise :class:`NoValidCheckpointError` (exit code 7) on every rank and leave
  the directory exactly as found, so a person can inspect (or repair) what is there.
- ``StartFresh``: rank 0 moves the damaged ``step-*`` directories into ``damaged-<UTC time>/``
  (renames on the same volume, never deletes) and every rank starts at step 0.

A missing or wrong key is never "no valid checkpoint": it raises :class:`MissingKeyError` (exit 3),
because falling back or starting over would silently lose progress that a fixed key recovers.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import torch

from aidc_trainer.checkpoint_format import (
    LoadedCheckpoint,
    _step_of,
    fsync_dir,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    step_dir_name,
)
from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError, NoValidCheckpointError
from aidc_trainer.keyring import KeyRing

log = logging.getLogger("aidc_trainer.checkpoint")

ON_NO_VALID = ("Fail", "StartFresh")
_OK, _CORRUPT, _KEY = 2, 1, 0  # per-rank load status; the all-reduced MIN is what every rank acts on


def _short_reason(e: BaseException, path: Path) -> str:
    """``<tag>: <message>`` with the checkpoint's own path dropped (the entry names it already)."""
    tag = e.reason if isinstance(e, CheckpointCorruptError) else type(e).__name__
    msg = str(e).replace(str(path) + os.sep, "").replace(str(path), "").lstrip(": ")
    return f"{tag}: {msg}" if msg else tag


def resume(
    root: Path,
    keyring: KeyRing | None,
    rank: int,
    world_size: int,
    group: Any = None,
    on_no_valid: str = "Fail",
    backup: Path | None = None,
) -> LoadedCheckpoint | None:
    """Collective: load the newest checkpoint every rank can verify and decrypt.

    ``backup``: a second root (spec.checkpoint.backup) tried only when ``root`` has no checkpoint that
    verifies; the policy applies when neither has one (``checkpoint_backup.resume_with_backup``).

    Returns None when there is no checkpoint, or when none verifies and the policy is StartFresh
    (after the damaged ones were moved aside). Raises :class:`MissingKeyError` on every rank if any
    rank hits a key problem, :class:`NoValidCheckpointError` on every rank when none verifies and the
    policy is Fail (or moving them aside failed).
    """
    import torch.distributed as dist

    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    if backup is not None:
        from aidc_trainer.checkpoint_backup import resume_with_backup

        return resume_with_backup(
            lambda r, policy: resume(r, keyring, rank, world_size, group, policy),
            lambda r, bad, policy: _no_valid_checkpoint(r, bad, rank, distributed, group, policy),
            root,
            backup,
            on_no_valid,
            rank,
        )
    steps = [_step_of(p) for p in list_checkpoints(root)]
    if distributed:  # rank 0's view of the volume and its policy: every rank decides alike
        box: list[Any] = [(steps, on_no_valid)]
        dist.broadcast_object_list(box, src=0, group=group)
        steps, on_no_valid = box[0]
    bad: list[tuple[str, str]] = []
    for step in reversed(steps):
        path = root / step_dir_name(step)
        loaded, status, why = None, _OK, ""
        try:
            loaded = _open(path, keyring, rank, world_size)
        except MissingKeyError as e:  # includes WrongKeyError
            status, why = _KEY, str(e)
        except (CheckpointCorruptError, OSError) as e:
            status, why = _CORRUPT, _short_reason(e, path)
        except Exception as e:  # unpicklable / incompatible payload: treat as corrupt
            status, why = _CORRUPT, _short_reason(e, path)
        agreed = status
        if distributed:
            t = torch.tensor([status], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
            agreed = int(t.item())
        if agreed == _OK:
            return loaded
        if agreed == _KEY:
            raise MissingKeyError(why or f"{path.name}: another rank could not obtain the checkpoint key")
        if distributed:  # rank 0 may have read only its own file fine: learn what the others saw
            whys: list[Any] = [None] * world_size
            dist.all_gather_object(whys, why, group=group)
            why = why or next((f"rank {r}: {w}" for r, w in enumerate(whys) if w), "")
        log.warning("skipping checkpoint %s: %s", path.name, why)
        bad.append((path.name, why))
    if not steps:
        return None
    _no_valid_checkpoint(root, bad, rank, distributed, group, on_no_valid)
    return None


def _open(path: Path, keyring: KeyRing | None, rank: int, world_size: int) -> LoadedCheckpoint:
    """Verify (and, for the single-writer layout, load) what this rank needs of one checkpoint.

    A sharded (DCP) checkpoint is only verified here, this rank's share of its files, and comes
    back with an empty ``state``: once every rank agreed on it, the caller loads it collectively
    (``checkpoint_sharded.restore_training_state``).
    """
    manifest = read_manifest(path, keyring)
    if manifest.get("layout") == "dcp":
        from aidc_trainer.checkpoint_sharded import verify_share  # imports DCP: only when needed

        verify_share(path, manifest, rank, world_size)
        return LoadedCheckpoint(step=int(manifest["step"]), path=path, manifest=manifest, state={})
    return load_checkpoint(path, keyring, rank)


def _no_valid_checkpoint(
    root: Path, bad: list[tuple[str, str]], rank: int, distributed: bool, group: Any, policy: str
) -> None:
    names = [n for n, _ in bad]
    summary = f"{len(bad)} checkpoint(s) in {root}, none verifies"
    if policy == "Fallback":  # the caller tries the backup root next (checkpoint_backup.FALLBACK)
        raise NoValidCheckpointError(summary, bad)
    if policy != "StartFresh":
        log.error(
            "%s: refusing to start (nothing in the directory was changed; "
            "onNoValidCheckpoint: StartFresh moves them aside and starts at step 0)",
            summary,
            extra={"event": "no_valid_checkpoint", "checkpoints": [{"path": n, "reason": r} for n, r in bad]},
        )
        raise NoValidCheckpointError(summary, bad)
    outcome: list[Any] = [None, None]  # [moved-to name, error]
    if rank == 0:
        try:
            outcome[0] = move_aside(root, names).name
        except OSError as e:
            outcome[1] = f"{type(e).__name__}: {e}"
    if distributed:  # nobody starts at step 0 unless rank 0 really moved them
        import torch.distributed as dist

        box = [outcome]
        dist.broadcast_object_list(box, src=0, group=group)
        outcome = box[0]
    moved_to, error = outcome
    if error is not None:
        msg = f"{summary}; moving them aside failed: {error}"
        log.error(msg, extra={"event": "no_valid_checkpoint"})
        raise NoValidCheckpointError(msg, bad)
    if rank == 0:
        log.warning(
            "%s: moved them aside to %s and starting at step 0 (onNoValidCheckpoint: StartFresh)",
            summary,
            moved_to,
            extra={
                "event": "checkpoints_moved_aside",
                "names": names,
                "to": moved_to,
                "checkpoints": [{"path": n, "reason": r} for n, r in bad],
            },
        )


def move_aside(root: Path, names: list[str]) -> Path:
    """Rename ``names`` (entries of ``root``) into a new ``root/damaged-<UTC time>/``; never deletes.

    The destination is not a ``step-*`` name, so neither resume, pruning nor the model server
    sees what was moved; a person can inspect or restore it.
    """
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    dest, n = root / f"damaged-{stamp}", 0
    while True:
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
            dest = root / f"damaged-{stamp}-{n}"
    for name in names:
        os.rename(root / name, dest / name)
    fsync_dir(dest)
    fsync_dir(root)
    return dest
