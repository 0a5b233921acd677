"""The aidc trainer behind a barrier, for tests whose jobs must run at the same time: each worker drops
a file named after its pod in $BARRIER_DIR, waits until $BARRIER_COUNT are there, then runs
`python -m aidc_trainer` with its arguments. Under torchrun the rendezvous is over by then, so every
job's rendezvous store is bound while its workers wait: no job can finish before all have started.

    torchrun barrier_trainer.py <aidc_trainer arguments>
"""

import os
import sys
import time
from pathlib import Path

barrier = Path(os.environ["BARRIER_DIR"])
(barrier / os.environ["AIDC_POD_NAME"]).touch()
deadline = time.monotonic() + 1200  # a budget for the slowest job's start on a loaded machine
while len(list(barrier.iterdir())) < int(os.environ["BARRIER_COUNT"]):
    if time.monotonic() > deadline:
        sys.exit("barrier: not every job started")
    time.sleep(0.2)

from aidc_trainer.launch import exit_process, main  # noqa: E402 - after the barrier, as a worker would

exit_process(main(sys.argv[1:]))
