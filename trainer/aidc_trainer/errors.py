"""Exceptions shared by the trainer and the model server.

Messages name key ids and file paths, never key bytes or plaintext.
"""

from __future__ import annotations


class MissingKeyError(KeyError):
    """A key id is not in the key ring, or the key directory is unusable (trainer exit code 3)."""

    def __init__(self, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WrongKeyError(MissingKeyError):
    """The key exists but is not the one the data was encrypted (or wrapped) with."""


class CheckpointCorruptError(Exception):
    """A checkpoint or encrypted file failed verification; it must never be loaded.

    ``reason`` is a short machine-readable tag: ``tampered``, ``truncated``, ``reordered``,
    ``identity``, ``format``, ``size``, ``sha256``, ``manifest``, ``missing-file``.
    """

    def __init__(self, message: str, reason: str, path: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


class ConfigError(ValueError):
    """Invalid training configuration (trainer exit code 4)."""
