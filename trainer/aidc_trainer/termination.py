"""Exit codes, their causes, and the structured termination message (docs/contracts.md).

A worker that exits non-zero appends one JSON line to ``$AIDC_TERMINATION_LOG`` (the operator points
it at the container's terminationMessagePath)::

    {"cause": "NoValidCheckpoint", "exitCode": 7, "rank": 0, "message": "...",
     "checkpoints": [{"path": "step-000000020", "reason": "sha256: rank-0.bin: ..."}]}

Several workers of one pod may each append a line; the operator takes the most severe. A line is at
most 1 KiB and goes out in one ``write`` on an O_APPEND descriptor, so lines never interleave. Every
text field is one line (the cause and the exception's one-line summary): the operator puts it in a
condition, and the full error with its traceback goes to the log only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger("aidc_trainer")

ENV = "AIDC_TERMINATION_LOG"
MAX_LINE_BYTES = 1024  # newline included
MAX_MESSAGE_CHARS = 300
MAX_CHECKPOINTS = 8
_MIN_REASON_CHARS = 40

EXIT_OK, EXIT_ERROR, EXIT_KEY, EXIT_CONFIG = 0, 1, 3, 4
EXIT_PEER_LOST, EXIT_CHECKPOINT_SAVE, EXIT_NO_VALID_CHECKPOINT = 5, 6, 7


class Cause(StrEnum):
    ERROR = "Error"
    CHECKPOINT_KEY_ERROR = "CheckpointKeyError"
    INVALID_CONFIG = "InvalidConfig"
    PEER_LOST = "PeerLost"  # retryable
    CHECKPOINT_SAVE_FAILED = "CheckpointSaveFailed"  # retryable
    NO_VALID_CHECKPOINT = "NoValidCheckpoint"  # not retryable (unless StartFresh, which never exits 7)
    STOPPED = "Stopped"  # 128 + signal number


EXIT_CODES: dict[Cause, int] = {
    Cause.ERROR: EXIT_ERROR,
    Cause.CHECKPOINT_KEY_ERROR: EXIT_KEY,
    Cause.INVALID_CONFIG: EXIT_CONFIG,
    Cause.PEER_LOST: EXIT_PEER_LOST,
    Cause.CHECKPOINT_SAVE_FAILED: EXIT_CHECKPOINT_SAVE,
    Cause.NO_VALID_CHECKPOINT: EXIT_NO_VALID_CHECKPOINT,
}


def cause_of(exit_code: int) -> Cause | None:
    """The cause a worker's exit code stands for (None for 0). Other codes are script errors."""
    if exit_code == EXIT_OK:
        return None
    if exit_code > 128:
        return Cause.STOPPED
    return next((c for c, code in EXIT_CODES.items() if code == exit_code), Cause.ERROR)


# What gloo/NCCL/the c10d store say when another rank's process or node went away.
PEER_LOST_HINTS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Socket Timeout",
    "NCCL communicator was aborted",
    "remote process exited",
    "Connection refused",
    "timed out",
)
# gloo: "Connection closed by peer [10.0.0.7]:40123"; the store: "... connect to 10.0.0.7:29500".
_PEER_ADDR = (re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d+)"), re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3}):(\d+)\b"))


def peer_lost(e: BaseException) -> bool:
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(h in str(e) for h in PEER_LOST_HINTS)


def peer_of(e: BaseException) -> str | None:
    """The lost peer's address when the error names one. Ranks are not extracted: c10d prefixes
    its messages with the reporting (own) rank, which would name the wrong process."""
    text = str(e)
    for pattern in _PEER_ADDR:
        if m := pattern.search(text):
            return f"{m.group(1)}:{m.group(2)}"
    return None


def one_line(text: str) -> str:
    """The first non-blank line: c10d and CUDA errors append C++ stack frames to their message, and a
    condition or an Event must stay readable."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def summary(e: BaseException) -> str:
    """An exception's one-line summary: its message's first line, else its type's name."""
    return one_line(str(e)) or type(e).__name__


@dataclass
class Failure:
    """Why a worker exits non-zero: what launch.main logs, returns and writes to the termination log."""

    cause: Cause
    exit_code: int
    message: str
    peer: str | None = None
    checkpoints: list[tuple[str, str]] = field(default_factory=list)  # (dir name, reason)

    def __post_init__(self) -> None:
        assert cause_of(self.exit_code) == self.cause, (self.cause, self.exit_code)


def classify(e: BaseException) -> Failure:
    """Map an exception that ended training to its cause and exit code."""
    from aidc_trainer.errors import (
        CheckpointSaveError,
        ConfigError,
        MissingKeyError,
        NoValidCheckpointError,
        Stopped,
    )

    if isinstance(e, ConfigError):
        return Failure(Cause.INVALID_CONFIG, EXIT_CONFIG, f"invalid training config: {summary(e)}")
    if isinstance(e, MissingKeyError):  # includes WrongKeyError; messages name key ids, never bytes
        return Failure(Cause.CHECKPOINT_KEY_ERROR, EXIT_KEY, f"checkpoint key problem: {summary(e)}")
    if isinstance(e, Stopped):
        return Failure(Cause.STOPPED, 128 + e.signum, summary(e))
    if isinstance(e, CheckpointSaveError):
        return Failure(Cause.CHECKPOINT_SAVE_FAILED, EXIT_CHECKPOINT_SAVE, summary(e))
    if isinstance(e, NoValidCheckpointError):
        return Failure(
            Cause.NO_VALID_CHECKPOINT, EXIT_NO_VALID_CHECKPOINT, summary(e), checkpoints=e.checkpoints
        )
    if peer_lost(e):
        return Failure(Cause.PEER_LOST, EXIT_PEER_LOST, f"lost a peer: {summary(e)}", peer=peer_of(e))
    text = one_line(str(e))
    return Failure(
        Cause.ERROR, EXIT_ERROR, f"training failed: {type(e).__name__}" + (f": {text}" if text else "")
    )


def rank_from_env(environ: dict[str, str] | None = None) -> int | None:
    """Global rank under torchrun; a plain ``python -m aidc_trainer`` runs alone, as rank 0."""
    env = os.environ if environ is None else environ
    if "LOCAL_RANK" not in env:
        return 0
    try:
        return int(env["RANK"])
    except (KeyError, ValueError):
        return None


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: max(0, n - 3)] + "..."


def _encode(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()  # ASCII: escapes non-ASCII


def record(failure: Failure, rank: int | None) -> bytes:
    """The JSON line (newline-terminated, at most MAX_LINE_BYTES): trims reasons first, then drops
    the oldest listed checkpoints, then shortens the message, then drops the peer."""
    rec: dict[str, Any] = {
        "cause": str(failure.cause),
        "exitCode": failure.exit_code,
        "rank": rank,
        "message": _cut(one_line(failure.message), MAX_MESSAGE_CHARS),
    }
    if failure.peer:
        rec["peer"] = _cut(one_line(failure.peer), 100)
    if failure.checkpoints:
        rec["checkpoints"] = [
            {"path": _cut(one_line(p), 100), "reason": _cut(one_line(r), 200)}
            for p, r in failure.checkpoints[:MAX_CHECKPOINTS]
        ]
    line = _encode(rec)
    while len(line) > MAX_LINE_BYTES:
        cks = rec.get("checkpoints", [])
        longest = max((len(c["reason"]) for c in cks), default=0)
        if longest > _MIN_REASON_CHARS:
            n = max(_MIN_REASON_CHARS, longest * 3 // 4)
            for c in cks:
                c["reason"] = _cut(c["reason"], n)
        elif len(cks) > 1:
            cks.pop()  # listed newest first: the oldest goes
        elif len(rec["message"]) > 80:
            rec["message"] = _cut(rec["message"], len(rec["message"]) * 3 // 4)
        elif "peer" in rec:
            del rec["peer"]
        else:  # only escapes can still be this long: keep the fields the operator classifies by
            rec = {k: rec[k] for k in ("cause", "exitCode", "rank")} | {"message": ""}
        line = _encode(rec)
    return line


def write(failure: Failure, rank: int | None, path: str | None = None) -> bool:
    """Append the failure's line to ``path`` (default ``$AIDC_TERMINATION_LOG``; unset: nothing).

    One ``write`` on an O_APPEND descriptor: a line from another worker of the pod never lands in
    the middle of this one. Never raises: the exit code is what matters, the message is a courtesy.
    """
    path = path if path is not None else os.environ.get(ENV, "")
    if not path:
        return False
    line = record(failure, rank)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot write the termination message to %s: %s", path, e)
        return False
    return True
