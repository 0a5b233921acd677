"""The aidc trainer behind a barrier, for tests whose jobs must run at the same time: each worker drops
a file named after its pod in <barrier dir>, waits until <count> are there, then runs
`python -m aidc_trainer` with the remaining arguments. Under torchrun the rendezvous is over by then, so
every job's rendezvous store is bound while its workers wait: no job can finish before all have started.

    torchrun barrier_trainer.py <barrier dir> <count> <aidc_trainer arguments>

The directory comes as an argument, not in the environment: the development kubelet maps environment
values under a mount path (/tmp is each pod's own) into the pod's volume, which would give every pod a
barrier of its own when the checkout lies under /tmp.
"""

import os
import sys
import time
from pathlib import Path

barrier, count = Path(sys.argv[1]), int(sys.argv[2])
(barrier / os.environ["AIDC_POD_NAME"]).touch()
deadline = time.monotonic() + 1200  # a budget for the slowest job's start on a loaded machine
while len(list(barrier.iterdir())) < count:
    if time.monotonic() > deadline:
        sys.exit("barrier: not every job started")
    time.sleep(0.2)

from aidc_trainer.launch import exit_process, main  # noqa: E402 - after the barrier, as a worker would

exit_process(main(sys.argv[3:]))
