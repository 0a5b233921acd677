"""Checkpoint format, asynchronous atomic save, verification and resume (docs/contracts.md, DESIGN §6).

Layout under the checkpoint root::

    step-000000100/
        rank-0.bin        model + optimiser + rank-0 RNG state (replicated state is written once)
        rank-<r>.bin      rank r's own state (RNG) for r > 0
        manifest.json     written last: step, world_size, key_id, files{size, sha256}, model, time, mac
    .tmp-step-000000100-<run>/   a save in progress; renamed to step-… only when complete

Each ``.bin`` is ``torch.save`` output, AES-256-GCM encrypted in chunks (aidc_trainer.crypto) when a
key ring is given. The manifest's ``mac`` (HMAC-SHA256 under a key derived from the data key) makes
the manifest itself tamper-evident, so a rewritten sha256 or model factory is caught.

Public API used by the model server: :func:`load_latest`, :func:`list_checkpoints`, :func:`verify`,
:func:`build_model_from_manifest`, :class:`LoadedCheckpoint`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import hmac
import importlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aidc_trainer.crypto import DecryptingReader, EncryptingWriter, KeyRing, read_header
from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError, WrongKeyError

__all__ = [
    "CheckpointCorruptError",
    "Checkpointer",
    "LoadedCheckpoint",
    "MissingKeyError",
    "SaveResult",
    "WrongKeyError",
    "build_model_from_manifest",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "save_checkpoint",
    "verify",
]

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
    (the world grew).
    """
    path = Path(path)
    manifest = read_manifest(path, keyring)
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


def build_model_from_manifest(manifest: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the network described by ``manifest["model"]`` ({"factory": "mod:fn", "config": {...}}).

    Imports the factory module: only use manifests you trust (an encrypted checkpoint's manifest is
    authenticated by its MAC).
    """
    spec = manifest.get("model") or {}
    factory = spec.get("factory")
    if not isinstance(factory, str) or ":" not in factory:
        raise CheckpointCorruptError(
            f"manifest model factory {factory!r} is not 'module:function'", "manifest"
        )
    module_name, _, attr = factory.partition(":")
    fn: Callable[..., torch.nn.Module] = getattr(importlib.import_module(module_name), attr)
    return fn(**(spec.get("config") or {}))


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


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    _inflight: concurrent.futures.Future[SaveResult] | None = field(default=None, init=False, repr=False)
    last: SaveResult | None = field(default=None, init=False)

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
        self._inflight = self._start(step, payload, dict(extra or {}))
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

    def _start(
        self, step: int, payload: dict[str, Any], extra: dict[str, Any]
    ) -> concurrent.futures.Future[SaveResult]:
        # A daemon thread, not an executor: if training dies while a save waits on a dead peer,
        # the process must still exit (the half-written temp directory is never published).
        fut: concurrent.futures.Future[SaveResult] = concurrent.futures.Future()

        def body() -> None:
            try:
                fut.set_result(self._write(step, payload, extra))
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
            mine = {"ok": True, "name": name, "size": hf.size, "sha256": hf.sha.hexdigest()}
        except Exception as e:  # e.g. ENOSPC: report to rank 0 so nobody publishes a partial checkpoint
            cause = hf.error if hf is not None and hf.error is not None else e
            mine = {"ok": False, "name": name, "error": f"{type(cause).__name__}: {cause}"}
        del payload
        results = self._gather(mine)
        failed = [r for r in results if not r["ok"]]
        if failed:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            err = "; ".join(f"{r['name']}: {r['error']}" for r in failed)
            log.error("checkpoint step %d not saved (previous checkpoints kept): %s", step, err)
            res = SaveResult(step, False, error=err, seconds=time.perf_counter() - t0)
        elif self.rank == 0:
            try:
                final = self._publish(tmp, step, results, key_id, extra)
                self._prune()
                res = SaveResult(step, True, final, time.perf_counter() - t0, sum(r["size"] for r in results))
            except Exception as e:
                shutil.rmtree(tmp, ignore_errors=True)
                log.error("checkpoint step %d not published (previous checkpoints kept): %s", step, e)
                res = SaveResult(step, False, error=str(e), seconds=time.perf_counter() - t0)
        else:
            res = SaveResult(
                step, True, self.root / step_dir_name(step), time.perf_counter() - t0, mine["size"]
            )
        if self.on_saved is not None:
            try:
                self.on_saved(res)
            except Exception:
                log.exception("on_saved callback failed")
        return res

    def _gather(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        if self.world_size <= 1:
            return [mine]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, mine, group=self.group)
        return out

    def _publish(
        self, tmp: Path, step: int, results: list[dict[str, Any]], key_id: str | None, extra: dict[str, Any]
    ) -> Path:
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "step": step,
            "world_size": self.world_size,
            "key_id": key_id,
            "files": {r["name"]: {"size": r["size"], "sha256": r["sha256"]} for r in results},
            "model": self.model_spec,
            "time": utc_now(),
            "job": os.environ.get("AIDC_JOB_NAME"),
            "extra": extra,
        }
        if key_id is not None:
            assert self.keyring is not None
            manifest["mac"] = _manifest_mac(self.keyring.key(key_id), manifest)
        part = tmp / (MANIFEST + ".part")
        with open(part, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, tmp / MANIFEST)
        _fsync_dir(tmp)
        final = self.root / step_dir_name(step)
        if final.exists():  # a stale or corrupt copy of this step from an earlier attempt
            _discard(final)
        os.rename(tmp, final)  # atomic: readers see all of the checkpoint or none of it
        _fsync_dir(self.root)
        return final

    def retained_key_ids(self) -> list[str]:
        """Key ids the checkpoints still on disk were written with (reported to the operator, which
        removes the other ids from the key Secret once no checkpoint needs them)."""
        ids = set()
        for path in list_checkpoints(self.root):
            with contextlib.suppress(OSError, ValueError):
                key_id = json.loads((path / "manifest.json").read_text()).get("key_id")
                if key_id:
                    ids.add(key_id)
        return sorted(ids)

    def _prune(self) -> None:
        ckpts = list_checkpoints(self.root)
        for old in ckpts[: max(0, len(ckpts) - max(1, self.keep))]:
            _discard(old)

    def cleanup_stale(self) -> None:
        """Remove temp/trash dirs left by killed runs (rank 0, before training starts)."""
        if self.rank != 0 or not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith((".tmp-", ".trash-")) and not entry.name.endswith(f"-{self.run_id}"):
                shutil.rmtree(entry, ignore_errors=True)

    # ---- resume
    def resume(self) -> LoadedCheckpoint | None:
        """Collective: load the newest checkpoint every rank can verify and decrypt.

        Raises :class:`MissingKeyError` on every rank if any rank hits a key problem.
        """
        import torch.distributed as dist

        distributed = self.world_size > 1 and dist.is_available() and dist.is_initialized()
        steps = [_step_of(p) for p in list_checkpoints(self.root)]
        if distributed:
            box = [steps]
            dist.broadcast_object_list(box, src=0, group=self.group)
            steps = box[0]
        for step in reversed(steps):
            path = self.root / step_dir_name(step)
            loaded, status, why = None, 2, ""
            try:
                loaded = load_checkpoint(path, self.keyring, self.rank)
            except MissingKeyError as e:  # includes WrongKeyError
                status, why = 0, str(e)
            except (CheckpointCorruptError, OSError) as e:
                status, why = 1, str(e)
            except Exception as e:  # unpicklable / incompatible payload: treat as corrupt
                status, why = 1, f"{type(e).__name__}: {e}"
            agreed = status
            if distributed:
                t = torch.tensor([status], dtype=torch.int64)
                dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
                agreed = int(t.item())
            if agreed == 2:
                return loaded
            if agreed == 0:
                raise MissingKeyError(why or f"{path.name}: another rank could not obtain the checkpoint key")
            if status != 2:
                log.warning("skipping checkpoint %s: %s", path.name, why)
            else:
                log.warning("skipping checkpoint %s: another rank could not verify it", path.name)
        return None


def _discard(path: Path) -> None:
    # Rename first so a half-deleted directory never looks like a checkpoint.
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


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


def peek_key_id(path: str | os.PathLike[str]) -> str | None:
    """Key id an encrypted checkpoint file names in its header (no key needed)."""
    with open(path, "rb") as f:
        return read_header(f, str(path)).key_id
