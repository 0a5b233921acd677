"""``python -m aidc_trainer``: the torchrun-compatible entry point and its exit codes.

Exit codes (docs/contracts.md; aidc_trainer.termination maps them to causes): 0 finished,
3 wrong/missing key, 4 invalid config, 5 lost a peer (retryable), 6 a final or stop checkpoint
was not saved (retryable), 7 checkpoints exist but none verifies, 128+N stopped by signal N,
1 any other error. A non-zero exit also appends one JSON line to ``$AIDC_TERMINATION_LOG``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from aidc_trainer.termination import EXIT_OK, Cause, Failure, classify, rank_from_env
from aidc_trainer.termination import write as write_termination_message

log = logging.getLogger("aidc_trainer")


def main(argv: list[str] | None = None) -> int:
    from aidc_trainer import log as jsonlog

    jsonlog.setup(int(os.environ.get("RANK", "0")) if "LOCAL_RANK" in os.environ else 0)
    from aidc_trainer.config import load_config

    try:
        cfg = load_config(argv)
        from aidc_trainer.trainer import run

        run(cfg)
        return EXIT_OK
    except Exception as e:
        failure = classify(e)
        _log_exit(failure, e)
        write_termination_message(failure, rank_from_env())
        return failure.exit_code


def _log_exit(f: Failure, e: Exception) -> None:
    """The log keeps what the one-line termination message leaves out: the error's full text."""
    extra = {"event": "exit", "exit_code": f.exit_code, "cause": str(f.cause)}
    if f.cause is not Cause.ERROR and "\n" in str(e).strip():
        extra["error"] = str(e)  # e.g. c10d's C++ stack frames after a lost peer
    if f.cause is Cause.STOPPED:
        log.warning("stopped by signal %d", f.exit_code - 128, extra=extra)
    elif f.cause is Cause.ERROR:  # unexpected: the traceback is the useful part
        log.exception("training failed", extra=extra)
    elif f.cause is Cause.CHECKPOINT_KEY_ERROR:
        log.error("%s", f.message, extra={**extra, "key_id": getattr(e, "key_id", None)})
    elif f.cause is Cause.PEER_LOST:
        # Another rank (or its node) died: this rank is healthy, a gang restart will fix it.
        log.error("%s", f.message, extra={**extra, "peer": f.peer})
    elif f.cause is Cause.NO_VALID_CHECKPOINT:
        cks = [{"path": p, "reason": r} for p, r in f.checkpoints]
        log.error("%s", f.message, extra={**extra, "checkpoints": cks})
    else:
        log.error("%s", f.message, extra=extra)


def exit_process(code: int) -> NoReturn:
    """Flush and exit without interpreter finalization.

    Gloo's worker threads may still be dropping their last reference to a finished collective
    (tensors owned by Python) when the interpreter starts finalizing; taking the GIL then aborts
    the process ("terminate called without an active exception", SIGABRT), which turned about one
    finished run in ten into a failed worker. By the time main() returns every checkpoint is
    committed and the process group destroyed, so nothing is lost by skipping finalization.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
