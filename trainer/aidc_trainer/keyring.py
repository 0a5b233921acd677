"""The checkpoint key ring: data keys by id, read from the job's mounted key Secret (docs/contracts.md).

Keys may be wrapped (RFC 3394) under a KEK; they are unwrapped on first use. Errors name the key id
and the file, never key bytes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from aidc_trainer.errors import MissingKeyError, WrongKeyError

__all__ = ["KEY_ID_RE", "KeyRing", "check_key_id"]

KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class KeyRing:
    """Data keys by id, as mounted from the job's key Secret (see docs/contracts.md).

    ``current_id`` is the id new checkpoints are written with; ``key(id)`` returns the 32-byte key
    for any id still present. Wrapped keys (RFC 3394 under a KEK) are unwrapped on first use.
    """

    def __init__(self, keys: dict[str, bytes], current_id: str | None) -> None:
        for key_id, key in keys.items():
            check_key_id(key_id)
            if len(key) != 32:
                raise MissingKeyError(f"key {key_id!r} is {len(key)} bytes, expected 32 (AES-256)", key_id)
        self._keys = dict(keys)
        self._loaders: dict[str, Path] = {}
        self._kek: bytes | None = None
        self._current_id = current_id

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike[str], kek_file: str | os.PathLike[str] | None = None
    ) -> KeyRing:
        """Read a mounted key Secret: ``current-key-id`` plus ``key-<id>`` files.

        The current key is loaded (and unwrapped) eagerly so a bad mount fails at start-up;
        other ids lazily. Raises :class:`MissingKeyError` (or :class:`WrongKeyError`) on problems.
        """
        root = Path(path)
        if not root.is_dir():
            raise MissingKeyError(f"key directory {str(root)!r} does not exist")
        ring = cls({}, None)
        if kek_file is not None:
            kek = _read_file(Path(kek_file), "KEK file")
            if len(kek) not in (16, 24, 32):
                raise MissingKeyError(
                    f"KEK file {str(kek_file)!r} is {len(kek)} bytes, expected 16, 24 or 32"
                )
            ring._kek = kek
        for entry in root.iterdir():  # Secret mounts also hold ..data symlinks: take key-* only
            if entry.name.startswith("key-") and KEY_ID_RE.match(entry.name[4:]):
                ring._loaders[entry.name[4:]] = entry
        current_file = root / "current-key-id"
        if not current_file.exists():
            raise MissingKeyError(f"key directory {str(root)!r} has no current-key-id file")
        current = _read_file(current_file, "current-key-id").decode("utf-8", "replace").strip()
        check_key_id(current)
        ring._current_id = current
        ring.key(current)
        return ring

    @property
    def current_id(self) -> str:
        if self._current_id is None:
            raise MissingKeyError("key ring has no current key id")
        return self._current_id

    def ids(self) -> list[str]:
        return sorted(set(self._keys) | set(self._loaders))

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys or key_id in self._loaders

    def key(self, key_id: str) -> bytes:
        if key_id in self._keys:
            return self._keys[key_id]
        loader = self._loaders.get(key_id)
        if loader is None:
            raise MissingKeyError(f"key id {key_id!r} is not in the key ring (have: {self.ids()})", key_id)
        raw = _read_file(loader, f"key {key_id!r}")
        if self._kek is not None:
            if len(raw) != 40:
                raise MissingKeyError(
                    f"key {key_id!r} is {len(raw)} bytes; with a KEK, 40 wrapped bytes are expected",
                    key_id,
                )
            try:
                raw = aes_key_unwrap(self._kek, raw)
            except InvalidUnwrap:
                raise WrongKeyError(
                    f"key {key_id!r} could not be unwrapped with the KEK (wrong KEK or damaged key)", key_id
                ) from None
        elif len(raw) == 40:
            raise MissingKeyError(
                f"key {key_id!r} looks wrapped (40 bytes) but no KEK file is configured", key_id
            )
        if len(raw) != 32:
            raise MissingKeyError(f"key {key_id!r} is {len(raw)} bytes, expected 32 (AES-256)", key_id)
        self._keys[key_id] = raw
        return raw

    def __repr__(self) -> str:  # never show key bytes
        return f"KeyRing(current_id={self._current_id!r}, ids={self.ids()})"


def check_key_id(key_id: str) -> None:
    if not KEY_ID_RE.match(key_id):
        raise MissingKeyError(f"invalid key id {key_id!r}: must match [A-Za-z0-9._-]+", key_id)


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise MissingKeyError(f"cannot read {what} at {str(path)!r}: {e.strerror}") from None
