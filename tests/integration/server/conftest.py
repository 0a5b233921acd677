"""Makes server_testkit importable from this directory's tests (no __init__.py: importlib mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server_testkit import ServerProcess


@pytest.fixture
def server_process():
    started: list[ServerProcess] = []

    def start(*args: str, **kw) -> ServerProcess:
        proc = ServerProcess(*args, **kw)
        started.append(proc)
        proc.wait_live()
        return proc

    yield start
    for proc in started:
        proc.stop()
