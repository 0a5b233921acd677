"""Backup copies of published checkpoints on a second volume (``spec.checkpoint.backup``, docs/trainer.md).

Rank 0 copies every newly published checkpoint directory to the backup root, bytes as stored (already
encrypted; no key is needed to copy): into a temp directory, fsync, then read every file back and check its
size and sha256 against the manifest, and only then rename it into place and prune to keep-N there too. The
copy is format-agnostic: whatever files the manifest lists (single-file or sharded) plus the manifest.

Copies run on one background thread and never block training: at most one copy is in flight, and a
checkpoint that lands while one runs replaces any older one still waiting (only the newest is copied next).
A failed copy is logged and training carries on; its checkpoint is still on the primary volume.

On resume (:func:`resume_with_backup`), the backup root is tried only when the primary root has no
checkpoint that verifies (none at all, or all damaged).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from aidc_trainer import checkpoint_publish as publish
from aidc_trainer.checkpoint_format import MANIFEST, LoadedCheckpoint, _step_of, fsync_dir
from aidc_trainer.config import TrainConfig
from aidc_trainer.errors import CheckpointCorruptError, NoValidCheckpointError
from aidc_trainer.progress import ProgressReporter

log = logging.getLogger("aidc_trainer.checkpoint")

__all__ = ["BackupResult", "BackupWriter", "copy_checkpoint", "resume_with_backup", "writer_for"]

_BUF = 8 << 20
# checkpoint_resume's policy that hands "none verifies" back to the caller instead of acting on it.
FALLBACK = "Fallback"


@dataclass
class BackupResult:
    step: int
    ok: bool
    path: Path | None = None
    seconds: float = 0.0
    bytes: int = 0
    error: str | None = None


# ---------------------------------------------------------------------------------------- copying


def _listed_names(source: Path, manifest: Any) -> list[str]:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointCorruptError(f"{source / MANIFEST}: lists no files", "manifest", str(source))
    for name in files:
        p = PurePosixPath(name)
        # A name comes off the volume: it must stay inside the checkpoint directory.
        if p.is_absolute() or ".." in p.parts or name in ("", MANIFEST):
            raise CheckpointCorruptError(
                f"{source / MANIFEST}: bad file name {name!r}", "manifest", str(source)
            )
    return sorted(files)


def _copy_file(src: Path, dst: Path) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # sendfile on Linux: no trip through Python buffers
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
        # Drop the cached pages so the read-back below comes from the volume, not from memory.
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return os.fstat(f.fileno()).st_size


def _check_copy(path: Path, meta: dict[str, Any]) -> None:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_BUF):
            sha.update(chunk)
            size += len(chunk)
    if size != meta.get("size") or sha.hexdigest() != meta.get("sha256"):
        raise CheckpointCorruptError(
            f"{path}: the copy does not match the manifest ({size} bytes, manifest says {meta.get('size')}; "
            f"sha256 {'differs' if sha.hexdigest() != meta.get('sha256') else 'matches'})",
            "sha256",
            str(path),
        )


def copy_checkpoint(source: Path, backup_root: Path, run_id: str = "0") -> tuple[Path, int]:
    """Copy the checkpoint directory ``source`` into ``backup_root`` and verify it; (its path, bytes).

    The copy is published (renamed to its ``step-…`` name) only after every file listed in the
    manifest was read back with the manifest's size and sha256: a source damaged on the primary volume,
    or a copy damaged on the way, raises :class:`CheckpointCorruptError` and leaves nothing behind.
    """
    source, backup_root = Path(source), Path(backup_root)
    _step_of(source)  # a step-… directory, or CheckpointCorruptError
    raw = (source / MANIFEST).read_bytes()  # read once: the bytes checked are the bytes copied
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CheckpointCorruptError(
            f"{source / MANIFEST}: unreadable ({e})", "manifest", str(source)
        ) from None
    names = _listed_names(source, manifest)
    backup_root.mkdir(parents=True, exist_ok=True)
    tmp = backup_root / f".tmp-{source.name}-{run_id}"
    shutil.rmtree(tmp, ignore_errors=True)  # a copy of this step that an earlier failure left
    tmp.mkdir()
    try:
        total = sum(_copy_file(source / name, tmp / name) for name in names)
        part = tmp / (MANIFEST + ".part")
        with open(part, "wb") as f:  # last, as on the primary: a directory with a manifest is complete
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, tmp / MANIFEST)
        for d in {(tmp / n).parent for n in names} | {tmp}:
            fsync_dir(d)
        for name in names:
            _check_copy(tmp / name, manifest["files"][name])
        if (tmp / MANIFEST).read_bytes() != raw:
            raise CheckpointCorruptError(f"{tmp / MANIFEST}: the copy differs", "manifest", str(tmp))
        final = backup_root / source.name
        if final.exists():  # an older or damaged copy of the same step
            publish.discard(final)
        os.rename(tmp, final)
        fsync_dir(backup_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, total + len(raw)


# --------------------------------------------------------------------------------- background writer


class BackupWriter:
    """Rank 0's background copier (see the module docstring). ``on_copied`` runs on its thread."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep: int,
        run_id: str = "0",
        on_copied: Callable[[BackupResult], None] | None = None,
    ) -> None:
        self.root, self.keep, self.run_id, self.on_copied = Path(root), max(1, keep), run_id, on_copied
        self.last: BackupResult | None = None
        self.failures = 0
        self.skipped = 0  # checkpoints replaced by a newer one before their copy started
        self._cv = threading.Condition()
        self._pending: Path | None = None
        self._busy = self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, source: str | os.PathLike[str]) -> None:
        """A checkpoint was published at ``source``: copy it (or a newer one) soon. Never blocks."""
        with self._cv:
            if self._closed:
                return
            if self._pending is not None:
                self.skipped += 1
            self._pending = Path(source)
            if self._thread is None:
                # A daemon thread: a copy stuck on a dead volume must not keep the process alive.
                self._thread = threading.Thread(target=self._run, name="aidc-ckpt-backup", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Until nothing is waiting or being copied; False if ``timeout`` ran out first."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish the copy in flight and the one waiting (the final checkpoint's), then stop."""
        if not self.wait(timeout):
            log.error(
                "checkpoint backup: the last copy did not finish within %.0fs; exiting without it",
                timeout,
                extra={"event": "checkpoint_backup_failed"},
            )
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _run(self) -> None:
        first = True
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                source, self._pending, self._busy = self._pending, None, True
            # Nothing may end this thread while copies are owed: close() waits for them.
            try:
                if first:  # temp/trash directories a killed run left on the backup volume
                    first = False
                    with contextlib.suppress(OSError):
                        publish.cleanup_stale(self.root, self.run_id)
                res = self._copy(source)
                self.last = res
                if self.on_copied is not None:
                    self.on_copied(res)
            except Exception:
                log.exception("backup writer: unexpected error (training carries on)")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _copy(self, source: Path) -> BackupResult:
        t0 = time.perf_counter()
        step, err = -1, None
        try:
            step = _step_of(source)
            path, size = copy_checkpoint(source, self.root, self.run_id)
            publish.prune(self.root, self.keep)
        except Exception as e:  # ENOSPC, a lost volume, a source pruned meanwhile, a bad copy …
            err = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        if err is not None:
            self.failures += 1
            log.error(
                "backup copy of checkpoint %s to %s failed (training carries on; the checkpoints on the "
                "primary volume are untouched): %s",
                source.name,
                self.root,
                err,
                extra={"event": "checkpoint_backup_failed", "step": step, "error": err},
            )
            return BackupResult(step, False, seconds=seconds, error=err)
        log.info(
            "checkpoint backed up",
            extra={
                "event": "checkpoint_backup",
                "step": step,
                "path": str(path),
                "bytes": size,
                "seconds": round(seconds, 4),
                "skipped": self.skipped,
            },
        )
        return BackupResult(step, True, path, seconds, size)


def writer_for(cfg: TrainConfig, run_id: str, progress: ProgressReporter | None) -> BackupWriter | None:
    """Rank 0's writer when a backup root is configured (``progress``: rank 0's reporter, which
    reports each copy as ``aidc.dev/last-backup``); None otherwise (and on every other rank)."""
    if not cfg.checkpoint_backup_dir or not cfg.checkpoint_dir or progress is None:
        return None

    def report(res: BackupResult) -> None:
        if res.ok:
            progress.backup(res.step, str(res.path))

    keep = cfg.checkpoint_backup_keep or cfg.checkpoint_keep
    return BackupWriter(cfg.checkpoint_backup_dir, keep, run_id, report)


# ------------------------------------------------------------------------------------------ resuming


def resume_with_backup(
    resume_one: Callable[[Path, str], LoadedCheckpoint | None],
    refuse: Callable[[Path, list[tuple[str, str]], str], None],
    primary: Path,
    backup: Path,
    on_no_valid: str,
    rank: int,
) -> LoadedCheckpoint | None:
    """Collective: the newest checkpoint that verifies in ``primary``, else in ``backup``.

    ``resume_one(root, policy)`` is checkpoint_resume's single-root resume; with :data:`FALLBACK` it
    raises NoValidCheckpointError (on every rank) instead of applying a policy. When neither root has
    one that verifies, ``refuse(root, bad, on_no_valid)`` applies the job's policy to each root that
    holds damaged ones, the primary first (Fail raises there; StartFresh moves both aside, so stale
    high-numbered copies cannot outrank the new ones in keep-N).
    """
    bad: dict[Path, list[tuple[str, str]]] = {}
    for root in (primary, backup):
        try:
            loaded = resume_one(root, FALLBACK)
        except NoValidCheckpointError as e:
            bad[root] = e.checkpoints
            continue
        if loaded is None:
            continue
        if root == backup and rank == 0:
            log.warning(
                "resuming from the backup copy %s in %s: the primary %s has %s",
                loaded.path.name,
                backup,
                primary,
                "no checkpoint that verifies" if primary in bad else "no checkpoint",
                extra={
                    "event": "resume_from_backup",
                    "step": loaded.step,
                    "path": str(loaded.path),
                    "primary_damaged": [n for n, _ in bad.get(primary, [])],
                },
            )
        return loaded
    for root, found in bad.items():
        refuse(root, found, on_no_valid)
    return None
