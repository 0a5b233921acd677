"""Fixtures of the end-to-end tests: the development kubelet that really runs the pods."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Kube

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def kubelet(kube: Kube, namespace: str, operator) -> Iterator[Path]:
    """The development kubelet for this test's namespace; yields the directory holding pod logs."""
    if kube.local is None:
        pytest.skip("needs the project's local cluster")
    state = kube.local.state_dir
    log = (state / "logs").joinpath(f"kubelet-{namespace}.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "hack" / "cluster" / "local_kubelet.py"),
            "--state-dir",
            str(state),
            "--namespace",
            namespace,
        ],
        env={**kube.env(), "PYTHONPATH": f"{ROOT / 'hack' / 'cluster'}:{ROOT / 'operator'}"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield state / "pods" / namespace
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
