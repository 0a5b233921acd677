"""The operator as the node-failure benchmarks run it: CRDs installed, the namespace ready, and
`python -m aidc_operator --standalone` watching only that namespace, its log in the cluster's logs/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster_processes import free_port, poll
from localcluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]


def start_operator(c: LocalCluster, namespace: str) -> subprocess.Popen[bytes]:
    c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    c.kubectl("wait", "--for=condition=Established", "crd/trainingjobs.aidc.dev", "--timeout=60s")
    c.kubectl("create", "namespace", namespace, check=False)
    poll(
        "default service account", lambda: c.kubectl("get", "sa", "default", "-n", namespace, check=False), 60
    )
    env = {**os.environ, "KUBECONFIG": str(c.kubeconfig), "PYTHONPATH": str(ROOT / "operator")}
    operator = [sys.executable, "-m", "aidc_operator", "--standalone", "--namespace", namespace]
    return subprocess.Popen(
        [*operator, "--metrics-port", "0", "--health-port", str(free_port())],
        env=env,
        stdout=(c.state_dir / "logs" / "operator.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
