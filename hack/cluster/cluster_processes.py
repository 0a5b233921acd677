"""Process supervision for the local cluster: every process runs in its own session, logs to
<state>/logs/NAME.log and is recorded in <state>/pids/NAME.pid (its pid, then the executable it runs).

A pid counts as ours only while /proc says it still runs that executable, so a recycled pid is never
signalled, and a second cluster in another state dir never touches this one's processes.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
STOP_GRACE_SECONDS = 15  # how long `stop` waits for SIGTERM before it sends SIGKILL


class ClusterError(RuntimeError):
    """A failure with a message that says what went wrong and how to fix it."""


def log(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_handed_out: set[int] = set()


def free_port() -> int:
    """A port no one listens on, for a server this process is about to start.

    Taken from below the kernel's ephemeral range: a port from bind(0) lies inside it, and between our
    close and the server's bind the kernel may give it to any outgoing connection (the operator's own
    apiserver clients, say) and the server fails with EADDRINUSE. Ports below the range are only ever
    taken by an explicit bind."""
    low, _ = _ephemeral_range()
    first = max(1024, low - 12000)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(first, low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise ClusterError(f"no free port in {first}-{low - 1}: close some listeners or widen the range")


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def poll(what: str, fn: Callable[[], T], timeout: float, interval: float = 0.3) -> T:
    """fn's first truthy value. Transient errors (an API hiccup, a file not written yet) are retried;
    a ClusterError ends the wait at once; running out of time is a ClusterError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := fn():
                return value
        except ClusterError:
            raise
        except Exception:  # not there yet
            pass
        time.sleep(interval)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_ok(url: str) -> bool:
    """Whether a plain-HTTP health endpoint answers 200 (kwok's /healthz)."""
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


@dataclass(frozen=True)
class Processes:
    """The processes started under one state dir, by name (a component: etcd, kwok-gpu-node-0, ...)."""

    state_dir: Path

    def pidfile(self, name: str) -> Path:
        return self.state_dir / "pids" / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def recorded(self) -> list[str]:
        """The names with a pid file, running or not."""
        return [f.stem for f in (self.state_dir / "pids").glob("*.pid")]

    def alive(self, name: str) -> int | None:
        """The recorded pid of NAME if that process is alive and still runs the executable we started
        (the pid file holds both), so a recycled pid is never mistaken for ours."""
        try:
            pid_text, _, exe_recorded = self.pidfile(name).read_text().partition("\n")
            pid = int(pid_text)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            exe = os.readlink(f"/proc/{pid}/exe")
        except (OSError, ValueError, IndexError):
            return None
        if state in ("Z", "X"):
            return None
        return pid if exe == exe_recorded.strip() else None

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Starts a long-running process in its own session (it outlives the caller, e.g. `make run`),
        logging to logs/NAME.log; `stop` stops it by the recorded pid."""
        (self.state_dir / "pids").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        out = self.logfile(name).open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.pidfile(name).write_text(f"{proc.pid}\n{os.readlink(f'/proc/{proc.pid}/exe')}")
        return proc.pid

    def wait(
        self,
        what: str,
        check: Callable[[], Any],
        timeout: float,
        component: str | None = None,
        interval: float = 0.3,
    ) -> None:
        """Polls check until truthy; if COMPONENT dies meanwhile, fails at once with its log's tail."""

        def alive_and_ready() -> Any:
            if component and not self.alive(component):
                tail = self.logfile(component).read_text(errors="replace")[-3000:]
                raise ClusterError(f"{component} exited during start-up; last log lines:\n{tail}")
            return check()

        hint = f" (log: {self.logfile(component)})" if component else ""
        poll(what + hint, alive_and_ready, timeout, interval)

    def kill(self, name: str) -> None:
        """SIGKILL, no goodbye; returns once the process is gone."""
        if pid := self.alive(name):
            os.kill(pid, signal.SIGKILL)
            while self.alive(name):
                time.sleep(0.01)

    def stop(self, order: Iterable[str]) -> None:
        """SIGTERM to each in ORDER, then waits for them in that order (STOP_GRACE_SECONDS in all),
        SIGKILLs those still there and forgets every pid file."""
        order = list(order)
        for name in order:
            if pid := self.alive(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for name in order:
            while (pid := self.alive(name)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.pidfile(name).unlink(missing_ok=True)
