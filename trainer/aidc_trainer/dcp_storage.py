"""Encrypted storage for torch.distributed.checkpoint (DCP): every file DCP writes is AES-256-GCM.

Route: a ``FileSystem`` subclass whose ``create_stream`` wraps the real file. DCP's own writer and
reader stay in charge of planning, file naming, offsets, the ``.metadata`` tmp-then-rename and
fsync; we only change the bytes between DCP and the disk. That is the smallest surface that
covers *every* file DCP creates, including ``.metadata.tmp`` (no plaintext byte at rest), and keeps
working when DCP adds items or threads. DCP's stream-transform extensions were the alternative, but
they wrap each item separately (not the metadata) and are marked experimental.

Files use the chunk format of :mod:`aidc_trainer.crypto` unchanged, so ``decrypt_file`` reads any
of them whole. Each file's GCM identity is ``file_identity(step, <final name>)`` (``.metadata.tmp``
is bound as ``.metadata``): a file cannot be swapped across steps or names.

* Writing: :class:`crypto.EncryptingWriter` over a sink that hashes the ciphertext as stored;
  ``tell()`` reports plaintext offsets (DCP records item offsets with it). Only ``close()`` knows
  the final chunk, so close also fsyncs (DCP's own fsync runs before close).
* Reading: random access. The writer emits full chunks except the last, so record ``i`` starts at
  ``len(header) + i * (chunk + RECORD_OVERHEAD)``; a read decrypts only the chunks it touches
  (the last two are cached: a torch.load reads the zip directory at an item's end, then its data).
  Opening a file verifies its header, key and final chunk, so a truncated file fails at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from aidc_trainer.checkpoint_format import file_identity
from aidc_trainer.crypto import DEFAULT_CHUNK_SIZE, RECORD_OVERHEAD, DecryptingReader, EncryptingWriter
from aidc_trainer.dcp_integrity import SafeLoadPlanner, read_dcp_metadata, verify_files
from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError
from aidc_trainer.keyring import KeyRing

# verify_files lives in dcp_integrity; re-exported here, where the sharded checkpoint code imports it.
__all__ = ["EncryptedReader", "EncryptedWriter", "load", "storage_error", "verify_files"]

_HASH_BLOCK = 1 << 20
_CACHED_CHUNKS = 2
_PREFIX = 4 + 12  # a record's length field and nonce
_TAG = 16


def _final_name(path: str | os.PathLike[str]) -> str:
    name = Path(path).name
    return name[: -len(".tmp")] if name.endswith(".tmp") else name  # DCP renames .metadata.tmp


# ------------------------------------------------------------------------------------------ write


class _HashingSink:
    """The real file, counting and hashing the bytes exactly as they are stored.

    sha256 runs on a helper thread (hashlib releases the GIL), overlapping encryption and the
    disk write: hashing in line made an encrypted save ~1.7x a plain one. Bytes are copied to it
    in blocks of ``_HASH_BLOCK`` through a short queue, so at most a few MiB are held extra.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.size = f, 0
        self._sha = hashlib.sha256()
        self._pending = bytearray()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._hash, name="aidc-dcp-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (block := self._q.get()) is not None:
            self._sha.update(block)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data).cast("B")
        n = self.f.write(mv)
        pos = 0
        while pos < len(mv):  # the caller may reuse its buffer: hand the thread a copy
            take = min(len(mv) - pos, _HASH_BLOCK - len(self._pending))
            self._pending += mv[pos : pos + take]
            pos += take
            if len(self._pending) >= _HASH_BLOCK:
                self._q.put(bytes(self._pending))
                self._pending.clear()
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()

    def hexdigest(self) -> str:
        """Stop the helper and return the digest of everything written."""
        if self._thread.is_alive():
            self._q.put(bytes(self._pending))
            self._pending.clear()
            self._q.put(None)
            self._thread.join()
        return self._sha.hexdigest()


class _WriteStream(io.RawIOBase):
    """What DCP writes to: plaintext in; ciphertext (or, without a key, the same bytes) out."""

    def __init__(self, f: BinaryIO, sink: _HashingSink, enc: EncryptingWriter | None, sync: bool) -> None:
        super().__init__()
        self._f, self._sink, self._enc, self._sync = f, sink, enc, sync
        self._pos = 0
        self.os_error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        try:
            n = self._enc.write(mv) if self._enc is not None else self._sink.write(mv)
        except OSError as e:  # torch.save's writer hides ENOSPC/EFBIG behind "unexpected pos"
            self.os_error = e
            raise
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos  # plaintext offset: DCP stores item offsets with it

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        if not self.closed:
            self._sink.flush()

    def close(self) -> None:
        """Finish the file: final chunk, flush, fsync. Called by DCP (and again on exit: no-op)."""
        if self.closed:
            return
        if self._enc is not None:
            self._enc.close()
        self._sink.flush()
        if self._sync:
            os.fsync(self._f.fileno())
        super().close()

    def abandon(self) -> None:
        """A failed write: no final chunk, so the torn file can never verify."""
        super().close()


class _EncryptingFileSystem(FileSystem):
    def __init__(self, keyring: KeyRing | None, step: int, chunk_size: int) -> None:
        super().__init__()
        self.keyring, self.step, self.chunk_size = keyring, step, chunk_size
        self.sync_files = True
        self.written: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # DCP may write files from several threads

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = _final_name(path)
        with open(path, "wb") as f:
            sink = _HashingSink(f)
            try:
                enc = None
                if self.keyring is not None:
                    kid = self.keyring.current_id
                    ident = file_identity(self.step, name)
                    enc = EncryptingWriter(sink, self.keyring.key(kid), kid, ident, self.chunk_size)
                stream = _WriteStream(f, sink, enc, self.sync_files)
                try:
                    yield stream
                except BaseException as e:
                    stream.abandon()
                    if stream.os_error is not None and stream.os_error is not e:
                        raise stream.os_error from e  # the disk's own reason (ENOSPC…), not torch's
                    raise
                stream.close()
            finally:
                digest = sink.hexdigest()  # also stops the helper thread when the write failed
        with self._lock:
            self.written[name] = {"size": sink.size, "sha256": digest}


class EncryptedWriter(FileSystemWriter):
    """DCP StorageWriter writing each file encrypted with ``keyring.current_id`` (plain if no keyring).

    After the save, :meth:`files` gives size and sha256 (as stored) of the files this process wrote.
    ``dcp.async_save`` works with DCP's default thread executor; its process executor would pickle
    the writer into a subprocess (``files()`` stays empty there), so it is not supported.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        keyring: KeyRing | None,
        step: int,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **fs_writer_kwargs: Any,
    ) -> None:
        super().__init__(path, **fs_writer_kwargs)
        self.fs = _EncryptingFileSystem(keyring, step, chunk_size)
        self.fs.sync_files = self.sync_files

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        self.fs.written = {}  # a new save: forget the files of the previous one

    def files(self) -> dict[str, dict[str, Any]]:
        with self.fs._lock:
            return {name: dict(entry) for name, entry in self.fs.written.items()}


# ------------------------------------------------------------------------------------------- read


class _DecryptingFile(io.RawIOBase):
    """Seekable plaintext view of one encrypted file; only the chunks a read touches are decrypted."""

    def __init__(self, f: BinaryIO, keyring: KeyRing, identity: str, name: str) -> None:
        super().__init__()
        self._f, self._name = f, name
        self._reader = DecryptingReader(f, keyring, identity, name)  # header, identity, key check
        self._chunk = self._reader.header.chunk_size
        self._base = len(self._reader.header.raw)
        self._rec = self._chunk + RECORD_OVERHEAD
        body = os.fstat(f.fileno()).st_size - self._base
        self._count = max(1, -(-body // self._rec))
        last = body - (self._count - 1) * self._rec
        if last < RECORD_OVERHEAD:
            raise CheckpointCorruptError(
                f"{name}: truncated: file ends inside chunk {self._count - 1}", "truncated", name
            )
        self._size = (self._count - 1) * self._chunk + last - RECORD_OVERHEAD
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        self._load(self._count - 1)  # authenticates the final chunk: a cut-off file fails here

    def _load(self, idx: int) -> bytes:
        hit = self._cache.get(idx)
        if hit is not None:
            self._cache.move_to_end(idx)
            return hit
        final = idx == self._count - 1
        rec_len = (self._size - idx * self._chunk if final else self._chunk) + RECORD_OVERHEAD
        self._f.seek(self._base + idx * self._rec)
        raw = self._f.read(rec_len)  # u32 length | 12B nonce | ciphertext + tag
        stored_len = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
        if final and rec_len - _PREFIX < stored_len <= self._chunk + _TAG:
            raise CheckpointCorruptError(  # the last record claims more bytes than the file has left
                f"{self._name}: truncated: file ends inside chunk {idx}", "truncated", self._name
            )
        if len(raw) != rec_len or stored_len != rec_len - _PREFIX:
            raise CheckpointCorruptError(
                f"{self._name}: chunk {idx} has an unexpected length (tampered or not a DCP file)",
                "tampered",
                self._name,
            )
        plain = self._reader.open_chunk(idx, raw[4:_PREFIX], raw[_PREFIX:], final)
        self._cache[idx] = plain
        if len(self._cache) > _CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return plain

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self._name}: negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        want = min(len(out), max(0, self._size - self._pos))
        done = 0
        while done < want:  # fill completely: torch.load's reader does not retry short reads
            idx, off = divmod(self._pos, self._chunk)
            chunk = self._load(idx)
            n = min(want - done, len(chunk) - off)
            out[done : done + n] = memoryview(chunk)[off : off + n]  # no intermediate copy
            done += n
            self._pos += n
        return done

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._size - self._pos)
        buf = bytearray(min(size, max(0, self._size - self._pos)))
        del buf[self.readinto(buf) :]
        return bytes(buf)

    def readall(self) -> bytes:
        return self.read(-1)


class _DecryptingFileSystem(FileSystem):
    def __init__(self, keyring: KeyRing, step: int) -> None:
        super().__init__()
        self.keyring, self.step = keyring, step
        self.error: Exception | None = None  # first aidc error: DCP turns a metadata error into a string

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        if "r" not in mode:
            raise ValueError(f"EncryptedReader opens files for reading only, not {mode!r}")
        with open(path, "rb") as f:
            try:
                identity = file_identity(self.step, _final_name(path))
                stream = _DecryptingFile(f, self.keyring, identity, str(path))
            except (CheckpointCorruptError, MissingKeyError) as e:
                self.error = self.error or e
                raise
            try:
                yield stream
            except (CheckpointCorruptError, MissingKeyError) as e:
                self.error = self.error or e
                raise


class EncryptedReader(FileSystemReader):
    """DCP StorageReader decrypting on the fly (plain DCP files when ``keyring`` is None).

    A failed tag raises :class:`CheckpointCorruptError` naming the file; a wrong or missing key
    :class:`WrongKeyError` / :class:`MissingKeyError`. DCP wraps errors (see :func:`load`).
    """

    def __init__(self, path: str | os.PathLike[str], keyring: KeyRing | None, step: int) -> None:
        super().__init__(path)
        self._metadata_error: CheckpointCorruptError | None = None
        if keyring is not None:
            self.fs = _DecryptingFileSystem(keyring, step)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's own reader, minus its ``pickle.load``: an unencrypted ``.metadata`` is not trusted."""
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:  # decrypting when encrypted
            try:
                metadata = read_dcp_metadata(stream, str(path))
            except CheckpointCorruptError as e:
                self._metadata_error = self._metadata_error or e
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    @property
    def error(self) -> Exception | None:
        """The first integrity or key error any stream of this reader raised, if any."""
        return getattr(self.fs, "error", None) or self._metadata_error


def storage_error(exc: BaseException, reader: EncryptedReader | None = None) -> Exception | None:
    """The aidc error (corrupt file, wrong or missing key) behind an exception ``dcp.load`` raised.

    DCP wraps per-rank failures in ``CheckpointException`` and turns a ``.metadata`` read error
    into an ``AssertionError`` string; this digs the original out (or takes it from ``reader``).
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointCorruptError | MissingKeyError):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] for _, f in sorted(failures.items()) if isinstance(f, tuple) and f]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return reader.error if reader is not None else None


def load(state_dict: dict[str, Any], reader: EncryptedReader, **load_kwargs: Any) -> None:
    """``dcp.load`` in place that raises the aidc error itself when a file is corrupt or a key wrong.
    Byte items must be plain data (:class:`SafeLoadPlanner`) unless the caller names a planner."""
    load_kwargs.setdefault("planner", SafeLoadPlanner())
    try:
        dcp.load(state_dict, storage_reader=reader, **load_kwargs)
    except BaseException as e:
        found = storage_error(e, reader)
        if found is not None and found is not e:
            raise found from None
        raise
