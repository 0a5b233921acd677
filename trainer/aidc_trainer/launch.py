"""``python -m aidc_trainer``: the torchrun-compatible entry point and its exit codes.

Exit codes (docs/contracts.md): 0 finished, 3 wrong/missing key, 4 invalid config,
128+N stopped by signal N, 1 any other error.
"""

from __future__ import annotations

import logging
import os
import sys

EXIT_OK, EXIT_ERROR, EXIT_KEY, EXIT_CONFIG = 0, 1, 3, 4

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
    except Exception:
        log.exception("training failed", extra={"event": "exit", "exit_code": EXIT_ERROR})
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
