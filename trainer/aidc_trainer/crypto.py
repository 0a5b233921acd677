"""AES-256-GCM chunked streaming encryption: the encrypted file format (the key ring is ``keyring``).

File layout (integers big-endian)::

    header  = b"AIDCGCM1" | u32 chunk_size | 16B file_id | 16B key_check
              | u16 len | key_id (utf-8) | u16 len | identity (utf-8)
    record  = u32 len(ciphertext) | 12B nonce | ciphertext (plaintext + 16B GCM tag)

Every record is authenticated with AAD = header | u64 chunk_index | u8 is_final, so a changed byte,
a reordered chunk, a dropped tail or a file swapped for another (different identity) all fail the
GCM tag. The reader then classifies the failure to give a distinct message. ``key_check`` is an
HMAC of a constant under the key: a wrong key is reported as such instead of as tampering.
Nonces are 96 random bits per chunk, so one key can safely encrypt far more data than a job writes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError, WrongKeyError
from aidc_trainer.keyring import KeyRing, check_key_id

# KeyRing and the errors stay importable from here: docs/trainer.md and user scripts import them so.
__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "CheckpointCorruptError",
    "DecryptingReader",
    "EncryptingWriter",
    "KeyRing",
    "MissingKeyError",
    "WrongKeyError",
    "decrypt_bytes",
    "decrypt_file",
    "encrypt_bytes",
    "is_encrypted",
    "read_header",
]

MAGIC = b"AIDCGCM1"
DEFAULT_CHUNK_SIZE = 1 << 20  # big enough to amortise per-call cost, small enough to stream
_NONCE = 12
_TAG = 16
_REC = struct.Struct(">I")
_IDX = struct.Struct(">QB")
_MAX_RECLASSIFY = 4096  # bound the work spent explaining a failed chunk
RECORD_OVERHEAD = _REC.size + _NONCE + _TAG  # bytes a record adds to its plaintext chunk


def key_check(key: bytes) -> bytes:
    """16-byte commitment to a key; reveals nothing about it but lets a reader detect a wrong key."""
    return hmac.new(key, b"aidc key check v1", hashlib.sha256).digest()[:16]


# ------------------------------------------------------------------------------------------ header


class Header:
    __slots__ = ("chunk_size", "file_id", "identity", "key_check", "key_id", "raw")

    def __init__(self, chunk_size: int, file_id: bytes, kcheck: bytes, key_id: str, identity: str) -> None:
        self.chunk_size, self.file_id, self.key_check = chunk_size, file_id, kcheck
        self.key_id, self.identity = key_id, identity
        kid, ident = key_id.encode(), identity.encode()
        self.raw = (
            MAGIC
            + struct.pack(">I", chunk_size)
            + file_id
            + kcheck
            + struct.pack(">H", len(kid))
            + kid
            + struct.pack(">H", len(ident))
            + ident
        )

    def aad(self, index: int, final: bool) -> bytes:
        return self.raw + _IDX.pack(index, 1 if final else 0)


def read_header(src: BinaryIO, name: str = "<stream>") -> Header:
    """Parse the header of an encrypted stream (no key needed)."""

    def take(n: int) -> bytes:
        b = src.read(n)
        if len(b) != n:
            raise CheckpointCorruptError(f"{name}: truncated: file ends inside the header", "truncated", name)
        return b

    magic = src.read(len(MAGIC))
    if magic != MAGIC:
        if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
            raise CheckpointCorruptError(f"{name}: truncated: file ends inside the header", "truncated", name)
        raise CheckpointCorruptError(f"{name}: not an aidc encrypted file (bad magic)", "format", name)
    (chunk_size,) = struct.unpack(">I", take(4))
    file_id, kcheck = take(16), take(16)
    key_id = take(struct.unpack(">H", take(2))[0]).decode("utf-8", "replace")
    identity = take(struct.unpack(">H", take(2))[0]).decode("utf-8", "replace")
    if chunk_size == 0 or chunk_size > 1 << 30:
        raise CheckpointCorruptError(f"{name}: implausible chunk size {chunk_size}", "format", name)
    return Header(chunk_size, file_id, kcheck, key_id, identity)


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


# ------------------------------------------------------------------------------------------ writer


class EncryptingWriter:
    """Write-only file object: plaintext in, encrypted records out to ``dst``.

    Buffers at most one chunk ahead so the last chunk can be flagged final on :meth:`close`.
    Usable directly as the target of ``torch.save``.
    """

    def __init__(
        self,
        dst: BinaryIO,
        key: bytes,
        key_id: str,
        identity: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        check_key_id(key_id)
        self._dst = dst
        self._aead = AESGCM(key)
        self._header = Header(chunk_size, os.urandom(16), key_check(key), key_id, identity)
        self._chunk = chunk_size
        self._buf = bytearray()
        self._out = bytearray(chunk_size + _TAG)  # reused ciphertext buffer: no allocation per chunk
        self._index = 0
        self._closed = False
        self.plaintext_bytes = 0
        dst.write(self._header.raw)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data).cast("B")
        n, pos = len(mv), 0
        self.plaintext_bytes += n
        if self._buf:  # top up the held-back partial chunk first
            pos = min(self._chunk - len(self._buf), n)
            self._buf += mv[:pos]
            if pos == n:
                return n  # nothing follows yet: the buffer may still become the final chunk
            self._emit(self._buf, final=False)
            self._buf.clear()
        # whole chunks straight from the caller's buffer (no copy); always hold data back, since
        # only close() knows which chunk is final
        while n - pos > self._chunk:
            self._emit(mv[pos : pos + self._chunk], final=False)
            pos += self._chunk
        self._buf += mv[pos:]
        return n

    def _emit(self, chunk: memoryview | bytes | bytearray, final: bool) -> None:
        nonce = os.urandom(_NONCE)
        out = memoryview(self._out)[: len(chunk) + _TAG]
        self._aead.encrypt_into(nonce, chunk, self._header.aad(self._index, final), out)
        self._dst.write(_REC.pack(len(out)) + nonce)
        self._dst.write(out)
        self._index += 1

    def flush(self) -> None:
        self._dst.flush()

    def close(self) -> None:
        """Emit the final chunk (possibly empty). Does not close ``dst``."""
        if not self._closed:
            self._emit(bytes(self._buf), final=True)
            self._buf.clear()
            self._closed = True
            self._dst.flush()

    def __enter__(self) -> EncryptingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


# ------------------------------------------------------------------------------------------ reader


class DecryptingReader:
    """Iterate the verified plaintext chunks of an encrypted stream.

    Raises :class:`MissingKeyError` (key id absent), :class:`WrongKeyError` (key check fails) or
    :class:`CheckpointCorruptError` with reason ``identity``, ``truncated``, ``reordered``,
    ``tampered`` or ``format``. No plaintext is yielded from a chunk before its tag verified.
    """

    def __init__(self, src: BinaryIO, keyring: KeyRing, identity: str | None = None, name: str = "<stream>"):
        self._src, self._name = src, name
        self.header = read_header(src, name)
        if identity is not None and self.header.identity != identity:
            raise CheckpointCorruptError(
                f"{name}: file identity is {self.header.identity!r}, expected {identity!r} "
                "(file swapped or copied from another checkpoint)",
                "identity",
                name,
            )
        key = keyring.key(self.header.key_id)
        if not hmac.compare_digest(key_check(key), self.header.key_check):
            raise WrongKeyError(
                f"{name}: key {self.header.key_id!r} is not the key this file was encrypted with",
                self.header.key_id,
            )
        self._aead = AESGCM(key)

    def _records(self) -> Iterator[tuple[int, bytes, bytes]]:
        idx = 0
        while True:
            lenb = self._src.read(_REC.size)
            if not lenb:
                return
            if len(lenb) < _REC.size:
                raise self._truncated(f"file ends inside the length prefix of chunk {idx}")
            (ct_len,) = _REC.unpack(lenb)
            if ct_len < _TAG or ct_len > self.header.chunk_size + _TAG:
                raise CheckpointCorruptError(
                    f"{self._name}: chunk {idx} has an impossible length {ct_len} (tampered)",
                    "tampered",
                    self._name,
                )
            nonce = self._src.read(_NONCE)
            ct = self._src.read(ct_len)
            if len(nonce) < _NONCE or len(ct) < ct_len:
                got = len(nonce) + len(ct)
                raise self._truncated(f"chunk {idx} is cut short ({got} of {_NONCE + ct_len} bytes present)")
            yield idx, nonce, ct
            idx += 1

    def _truncated(self, what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{self._name}: truncated: {what}", "truncated", self._name)

    def chunks(self) -> Iterator[bytes]:
        pending: tuple[int, bytes, bytes] | None = None
        for rec in self._records():
            if pending is not None:
                yield self._open(*pending, final=False)
            pending = rec
        if pending is None:
            raise self._truncated("no chunks after the header")
        yield self._open(*pending, final=True)

    def _open(self, idx: int, nonce: bytes, ct: bytes, final: bool) -> bytes:
        h = self.header
        try:
            return self._aead.decrypt(nonce, ct, h.aad(idx, final))
        except InvalidTag:
            pass
        # Explain the failure: is this an intact chunk that belongs elsewhere?
        if final:
            try:
                self._aead.decrypt(nonce, ct, h.aad(idx, False))
                raise self._truncated(f"file ends after chunk {idx}, which is not the final chunk")
            except InvalidTag:
                pass
        for other in range(min(_MAX_RECLASSIFY, 1 + idx + 64)):
            if other == idx:
                continue  # same position, other flag: handled above and below
            for fin in (False, True):
                try:
                    self._aead.decrypt(nonce, ct, h.aad(other, fin))
                except InvalidTag:
                    continue
                raise CheckpointCorruptError(
                    f"{self._name}: chunk at position {idx} is chunk {other} of this file (chunks reordered)",
                    "reordered",
                    self._name,
                )
        if not final:
            try:
                self._aead.decrypt(nonce, ct, h.aad(idx, True))
                raise CheckpointCorruptError(
                    f"{self._name}: data appended after the final chunk {idx}", "tampered", self._name
                )
            except InvalidTag:
                pass
        raise CheckpointCorruptError(
            f"{self._name}: chunk {idx} failed authentication (data modified or corrupted)",
            "tampered",
            self._name,
        )

    def open_chunk(self, index: int, nonce: bytes, ciphertext: bytes, final: bool) -> bytes:
        """Verify and decrypt one record read at random (``index``: its position in the file).

        Raises as :meth:`chunks` does, so random-access readers classify failures the same way.
        """
        return self._open(index, nonce, ciphertext, final)

    def read_all(self) -> bytes:
        return b"".join(self.chunks())


def encrypt_bytes(
    data: bytes, key: bytes, key_id: str, identity: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> bytes:
    import io

    out = io.BytesIO()
    with EncryptingWriter(out, key, key_id, identity, chunk_size) as w:
        w.write(data)
    return out.getvalue()


def decrypt_bytes(data: bytes, keyring: KeyRing, identity: str | None = None, name: str = "<bytes>") -> bytes:
    import io

    return DecryptingReader(io.BytesIO(data), keyring, identity, name).read_all()


def decrypt_file(path: str | os.PathLike[str], keyring: KeyRing, identity: str | None = None) -> bytes:
    """Decrypt a whole file into memory (never to disk)."""
    with open(path, "rb") as f:
        return DecryptingReader(f, keyring, identity, str(path)).read_all()
