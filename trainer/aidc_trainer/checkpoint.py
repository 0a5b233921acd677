"""Checkpoint format, asynchronous atomic save, verification and resume (docs/contracts.md, DESIGN §6).

Layout under the checkpoint root (format 1, written by rank 0 for DDP and single-process runs:
replicated state, so one writer is the least I/O; FSDP writes DCP shards, ``checkpoint_sharded``)::

    step-000000100/
        rank-0.bin        model + optimiser + rank-0 RNG state (replicated state is written once)
        rank-<r>.bin      rank r's own state (RNG) for r > 0
        manifest.json     written last: step, world_size, key_id, files{size, sha256}, model, time, mac
    .tmp-step-000000100-<run>/   a save in progress; renamed to step-… only when complete
    damaged-<UTC time>/          checkpoints that failed verification, moved aside (StartFresh)

Each ``.bin`` is ``torch.save`` output, AES-256-GCM encrypted in chunks (aidc_trainer.crypto) when a
key ring is given. The manifest's ``mac`` (HMAC-SHA256 under a key derived from the data key) makes
the manifest itself tamper-evident, so a rewritten sha256 or model factory is caught.

This module saves: the training thread's snapshot and the background writer thread. Rank 0's
manifest publish and keep-N pruning live in ``checkpoint_publish``, reading and verifying in
``checkpoint_format``, the collective resume decision in ``checkpoint_resume``. The reading API is
re-exported here, the stable import path.

Public API used by the model server: :func:`load_latest`, :func:`list_checkpoints`, :func:`verify`,
:func:`build_model_from_manifest`, :class:`LoadedCheckpoint`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aidc_trainer import checkpoint_publish as publish
from aidc_trainer import checkpoint_resume
from aidc_trainer.checkpoint_format import (
    FORMAT,
    MANIFEST,
    LoadedCheckpoint,
    _step_of,
    build_model_from_manifest,
    file_identity,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    peek_key_id,
    rank_file,
    read_manifest,
    step_dir_name,
    utc_now,
    verify,
)
from aidc_trainer.crypto import EncryptingWriter
from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError, WrongKeyError
from aidc_trainer.keyring import KeyRing

__all__ = [
    "FORMAT",
    "MANIFEST",
    "CheckpointCorruptError",
    "Checkpointer",
    "LoadedCheckpoint",
    "MissingKeyError",
    "SaveResult",
    "WrongKeyError",
    "_step_of",
    "build_model_from_manifest",
    "file_identity",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "peek_key_id",
    "rank_file",
    "read_manifest",
    "save_checkpoint",
    "step_dir_name",
    "utc_now",
    "verify",
]

log = logging.getLogger("aidc_trainer.checkpoint")

# ----------------------------------------------------------------------------------------- saving


class _HashingFile:
    """Counts and hashes what is written (the sha256 of the file as stored)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, b: Any) -> int:
        self.sha.update(b)
        try:
            n = self.f.write(b)
        except OSError as e:  # torch.save's C++ writer hides this behind a position mismatch
            self.error = e
            raise
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()


class _Snapshotter:
    """Copies a state tree's tensors to CPU, reusing the previous save's buffers.

    Reuse avoids fresh allocations (page faults) on every save, and on CUDA the buffers are pinned
    so device-to-host copies are asynchronous and fast. Safe because at most one save is in flight
    and the next snapshot starts only after it finished.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._seen: set[tuple[Any, ...]] = set()

    def copy(self, obj: Any) -> Any:
        self._seen = set()
        out = self._copy(obj, ())
        for key in set(self._buffers) - self._seen:  # tensors that disappeared from the state
            del self._buffers[key]
        return out

    def _copy(self, obj: Any, key: tuple[Any, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            buf = self._buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or t.layout != torch.strided:
                pin = t.device.type == "cuda"
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                self._buffers[key] = buf
            self._seen.add(key)
            buf.copy_(t, non_blocking=t.device.type != "cpu")  # caller synchronises once for all
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v, (*key, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, (*key, i)) for i, v in enumerate(obj))
        return obj


@dataclass
class SaveResult:
    step: int
    ok: bool
    path: Path | None = None
    seconds: float = 0.0
    bytes: int = 0
    error: str | None = None


@dataclass
class Checkpointer:
    """Saves checkpoints asynchronously (at most one in flight) and resumes from the newest valid one.

    Every rank calls :meth:`save` at the same step. The training thread only copies state to CPU;
    a background thread serialises, encrypts, writes and fsyncs this rank's file, then the ranks
    exchange sizes/hashes over ``group`` (a dedicated gloo group, so the background thread never
    shares a communicator with training) and rank 0 writes the manifest, renames the directory
    into place and prunes to ``keep``.
    """

    root: Path
    rank: int = 0
    world_size: int = 1
    keyring: KeyRing | None = None
    keep: int = 3
    model_spec: dict[str, Any] = field(default_factory=dict)
    group: Any = None
    run_id: str = "0"
    on_saved: Callable[[SaveResult], None] | None = None
    backup_root: Path | None = None  # spec.checkpoint.backup: resume falls back to it (checkpoint_backup)
    _inflight: concurrent.futures.Future[SaveResult] | None = field(default=None, init=False, repr=False)
    last: SaveResult | None = field(default=None, init=False)
    # Saves that did not land (training carries on after a periodic one; the trainer decides).
    failures: int = field(default=0, init=False)
    last_failure: SaveResult | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._snap = _Snapshotter()

    # ---- save
    def save(
        self,
        step: int,
        shared_state: dict[str, Any] | None,
        rank_state: dict[str, Any],
        extra: dict[str, Any] | None = None,
        block: bool = False,
    ) -> float:
        """Start saving ``step``; returns the seconds the caller was stalled (waiting + copying).

        ``shared_state`` (model, optimiser, …) is written by rank 0 only; ``rank_state`` by every rank.
        """
        t0 = time.perf_counter()
        self.wait()
        tree: dict[str, Any] = {"rank": rank_state, "step": step}
        if self.rank == 0:
            tree.update(shared_state or {})
        payload = self._snap.copy(tree)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # non_blocking device→host copies must land before the thread reads
        extra = dict(extra or {})
        self._inflight = self._start(step, lambda: self._write(step, payload, extra))
        if block:
            self.wait()
        return time.perf_counter() - t0

    def wait(self) -> SaveResult | None:
        """Block until the in-flight save (if any) is finished; returns its result."""
        fut, self._inflight = self._inflight, None
        if fut is None:
            return None
        self.last = fut.result()
        return self.last

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def close(self) -> None:
        self.wait()

    def _start(self, step: int, work: Callable[[], SaveResult]) -> concurrent.futures.Future[SaveResult]:
        # A daemon thread, not an executor: if training dies while a save waits on a dead peer,
        # the process must still exit (the half-written temp directory is never published).
        fut: concurrent.futures.Future[SaveResult] = concurrent.futures.Future()

        def body() -> None:
            try:
                fut.set_result(work())
            except BaseException as e:
                fut.set_exception(e)

        threading.Thread(target=body, name=f"aidc-ckpt-{step}", daemon=True).start()
        return fut

    def _write(self, step: int, payload: dict[str, Any], extra: dict[str, Any]) -> SaveResult:
        t0 = time.perf_counter()
        tmp = self.root / f".tmp-{step_dir_name(step)}-{self.run_id}"
        name = rank_file(self.rank)
        key_id = self.keyring.current_id if self.keyring is not None else None
        mine: dict[str, Any]
        hf: _HashingFile | None = None
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            with open(tmp / name, "wb") as f:
                hf = _HashingFile(f)
                if self.keyring is not None and key_id is not None:
                    writer = EncryptingWriter(hf, self.keyring.key(key_id), key_id, file_identity(step, name))  # type: ignore[arg-type]
                    torch.save(payload, writer)
                    writer.close()
                else:
                    torch.save(payload, hf)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
            mine = {
                "ok": True,
                "name": name,
                "files": {name: {"size": hf.size, "sha256": hf.sha.hexdigest()}},
            }
        except Exception as e:  # e.g. ENOSPC: report to rank 0 so nobody publishes a partial checkpoint
            cause = hf.error if hf is not None and hf.error is not None else e
            mine = {"ok": False, "name": name, "error": f"{type(cause).__name__}: {cause}"}
        del payload
        return self._conclude(step, tmp, mine, extra, t0, key_id)

    def _conclude(
        self,
        step: int,
        tmp: Path,
        mine: dict[str, Any],
        extra: dict[str, Any],
        t0: float,
        key_id: str | None,
        header: dict[str, Any] | None = None,
    ) -> SaveResult:
        """Every rank's files are written (or failed): rank 0 publishes, all ranks agree on the outcome.

        ``mine`` is ``{"ok": True, "name": who, "files": {name: {size, sha256}}}`` or
        ``{"ok": False, "name": who, "error": text}``; ``header`` overrides manifest fields (format…).
        """
        results = self._gather(mine)
        failed = [r for r in results if not r["ok"]]
        err: str | None = None
        if failed:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            err = publish.summarise(failed)
        else:
            files = {n: meta for r in results for n, meta in r["files"].items()}
            if self.rank == 0:
                try:
                    publish.publish(
                        self.root,
                        tmp,
                        step,
                        self.world_size,
                        files,
                        key_id,
                        self.keyring,
                        self.model_spec,
                        extra,
                        header,
                    )
                except Exception as e:  # EROFS, ENOSPC on the manifest, a failed rename or fsync…
                    shutil.rmtree(tmp, ignore_errors=True)
                    err = f"publishing {step_dir_name(step)}: {type(e).__name__}: {e}"
                else:
                    try:
                        publish.prune(self.root, self.keep)
                    except OSError as e:  # the new checkpoint is in place; old ones stay a while
                        log.warning("pruning old checkpoints failed: %s", e)
            # Only rank 0 knows whether it published: tell the others, so every rank's result (and
            # a final save's exit code) says the same.
            err = self._agree(err)
        if err is not None:
            log.error(
                "checkpoint step %d not saved (previous checkpoints kept): %s",
                step,
                err,
                extra={"event": "checkpoint_failed", "step": step, "error": err},
            )
            res = SaveResult(step, False, error=err, seconds=time.perf_counter() - t0)
            self.failures, self.last_failure = self.failures + 1, res
        else:
            own = results if self.rank == 0 else [mine]
            size = sum(m["size"] for r in own for m in r["files"].values())
            res = SaveResult(step, True, self.root / step_dir_name(step), time.perf_counter() - t0, size)
        if self.on_saved is not None:
            try:
                self.on_saved(res)
            except Exception:
                log.exception("on_saved callback failed")
        return res

    def _agree(self, err: str | None) -> str | None:
        if self.world_size <= 1:
            return err
        import torch.distributed as dist

        box = [err]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _gather(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        if self.world_size <= 1:
            return [mine]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, mine, group=self.group)
        return out

    def retained_key_ids(self) -> list[str]:
        """Key ids the checkpoints still on disk were written with (see ``checkpoint_publish``), backup
        copies included: the operator must not prune a key that only a backup copy still needs."""
        if self.backup_root is None:
            return publish.retained_key_ids(self.root)
        return sorted({*publish.retained_key_ids(self.root), *publish.retained_key_ids(self.backup_root)})

    def cleanup_stale(self) -> None:
        """Remove temp/trash dirs left by killed runs (rank 0, before training starts)."""
        if self.rank == 0:
            publish.cleanup_stale(self.root, self.run_id)

    # ---- resume
    def resume(self, on_no_valid: str = "Fail") -> LoadedCheckpoint | None:
        """Collective: see :func:`aidc_trainer.checkpoint_resume.resume`."""
        return checkpoint_resume.resume(
            self.root, self.keyring, self.rank, self.world_size, self.group, on_no_valid, self.backup_root
        )


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    state: dict[str, Any],
    keyring: KeyRing | None = None,
    model_spec: dict[str, Any] | None = None,
    keep: int = 3,
) -> SaveResult:
    """Synchronous single-process save (tools, tests, simple scripts). ``state`` should hold "model"."""
    ck = Checkpointer(Path(root), keyring=keyring, keep=keep, model_spec=model_spec or {})
    try:
        ck.save(step, state, {}, block=True)
        assert ck.last is not None
        return ck.last
    finally:
        ck.close()
