"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def kubelet(dev_kubelet: Path, operator) -> Path:
    """The development kubelet with the operator running: pods are rendered by the operator and really
    run; yields the directory of their pod dirs (logs, addresses)."""
    return dev_kubelet
