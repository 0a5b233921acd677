"""The operator as the node-failure benchmarks run it: CRDs installed, the namespace ready, and
`python -m aidc_operator --standalone` watching only that namespace, its log in the cluster's logs/;
on the way out the operator stops and the cluster goes down, whatever happened."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from cluster_processes import free_port, poll
from localcluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def operator_on(c: LocalCluster, namespace: str) -> Iterator[subprocess.Popen[bytes]]:
    op = None
    try:
        c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        c.wait_crds("trainingjobs.aidc.dev")
        c.kubectl("create", "namespace", namespace, check=False)
        poll(
            "default service account",
            lambda: c.kubectl("get", "sa", "default", "-n", namespace, check=False),
            60,
        )
        env = {**os.environ, "KUBECONFIG": str(c.kubeconfig), "PYTHONPATH": str(ROOT / "operator")}
        operator = [sys.executable, "-m", "aidc_operator", "--standalone", "--namespace", namespace]
        op = subprocess.Popen(
            [*operator, "--metrics-port", "0", "--health-port", str(free_port())],
            env=env,
            stdout=(c.state_dir / "logs" / "operator.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        yield op
    finally:
        if op:
            op.terminate()
            op.wait(15)
        c.down()
