"""The development kubelet (hack/cluster/local_kubelet.py) for one test's namespace."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Kube

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def dev_kubelet(kube: Kube, namespace: str) -> Iterator[Path]:
    """Runs the namespace's aidc-labelled pods as local processes; yields the directory of their pod dirs."""
    if kube.local is None:
        pytest.skip("needs the project's local cluster")
    state = kube.local.state_dir
    log = (state / "logs").joinpath(f"kubelet-{namespace}.log").open("ab")
    kubelet = str(ROOT / "hack" / "cluster" / "local_kubelet.py")
    proc = subprocess.Popen(
        [sys.executable, kubelet, "--state-dir", str(state), "--namespace", namespace],
        env={**kube.env(), "PYTHONPATH": f"{ROOT / 'hack' / 'cluster'}:{ROOT / 'operator'}"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield state / "pods" / namespace
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
