"""``python -m aidc_trainer``: the torchrun-compatible entry point and its exit codes.

Exit codes (docs/contracts.md): 0 finished, 3 wrong/missing key, 4 invalid config,
5 lost a peer (a collective or the rendezvous failed: retryable), 128+N stopped by signal N,
1 any other error.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

EXIT_OK, EXIT_ERROR, EXIT_KEY, EXIT_CONFIG, EXIT_PEER_LOST = 0, 1, 3, 4, 5
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


def _peer_lost(e: BaseException) -> bool:
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(h in str(e) for h in PEER_LOST_HINTS)


log = logging.getLogger("aidc_trainer")


def main(argv: list[str] | None = None) -> int:
    from aidc_trainer import log as jsonlog

    jsonlog.setup(int(os.environ.get("RANK", "0")) if "LOCAL_RANK" in os.environ else 0)
    from aidc_trainer.config import load_config
    from aidc_trainer.errors import ConfigError, MissingKeyError

    try:
        cfg = load_config(argv)
        from aidc_trainer.trainer import Stopped, run

        run(cfg)
        return EXIT_OK
    except ConfigError as e:
        log.error("invalid training config: %s", e, extra={"event": "exit", "exit_code": EXIT_CONFIG})
        return EXIT_CONFIG
    except MissingKeyError as e:  # includes WrongKeyError; message names the key id only
        log.error(
            "checkpoint key problem: %s",
            e,
            extra={"event": "exit", "exit_code": EXIT_KEY, "key_id": e.key_id},
        )
        return EXIT_KEY
    except Stopped as e:
        log.warning("stopped by signal %d", e.signum, extra={"event": "exit", "exit_code": 128 + e.signum})
        return 128 + e.signum
    except Exception as e:
        if _peer_lost(e):
            # Another rank (or its node) died: this rank is healthy, a gang restart will fix it.
            log.error("lost a peer: %s", e, extra={"event": "exit", "exit_code": EXIT_PEER_LOST})
            return EXIT_PEER_LOST
        log.exception("training failed", extra={"event": "exit", "exit_code": EXIT_ERROR})
        return EXIT_ERROR


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
