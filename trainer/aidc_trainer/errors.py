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

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None]]:
        # picklable with its reason: DCP gathers each rank's exception to every rank
        return (type(self), (str(self.args[0]), self.reason, self.path))


class ConfigError(ValueError):
    """Invalid training configuration (trainer exit code 4)."""


class CheckpointSaveError(Exception):
    """A checkpoint the run depends on (the final one, or the stop checkpoint) was not published
    (trainer exit code 6). ``reason`` is the underlying error, e.g. ``OSError: [Errno 28] …``."""

    def __init__(self, step: int, reason: str, what: str = "final") -> None:
        super().__init__(f"{what} checkpoint at step {step} was not saved: {reason}")
        self.step, self.reason, self.what = step, reason, what


class NoValidCheckpointError(Exception):
    """Checkpoints exist but none verifies, and the policy is Fail (trainer exit code 7).

    ``checkpoints`` lists ``(directory name, reason)`` for each one that failed verification.
    """

    def __init__(self, message: str, checkpoints: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.checkpoints = list(checkpoints)


class Stopped(Exception):
    """Training stopped by a signal; exit code is 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
