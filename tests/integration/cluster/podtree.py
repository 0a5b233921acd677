"""A pod-like process tree for the power-cut tests: main → child → grandchild, the grandchild in a
session of its own (as torchrun starts its workers), ignoring SIGTERM and writing a counter every 2 ms.
Each process writes its pid to <role>.pid in the working directory; main appends a line to `starts`.

    python podtree.py [main|child|grandchild]
"""

import os
import signal
import subprocess
import sys
import time

role = sys.argv[1] if len(sys.argv) > 1 else "main"
if role == "main":
    with open("starts", "a") as f:
        f.write("started\n")
with open(f"{role}.pid.tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(f"{role}.pid.tmp", f"{role}.pid")
if role == "grandchild":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only a SIGKILL ends it
    n = 0
    while True:
        n += 1
        with open("counter.tmp", "w") as f:
            f.write(str(n))
        os.replace("counter.tmp", "counter")
        time.sleep(0.002)
nxt = {"main": "child", "child": "grandchild"}[role]
subprocess.Popen([sys.executable, __file__, nxt], start_new_session=nxt == "grandchild")
while True:
    time.sleep(1)
