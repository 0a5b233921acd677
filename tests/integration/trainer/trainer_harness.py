"""Helpers to run real torchrun "nodes" of the aidc trainer on localhost (gloo, CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cluster_processes import free_port as free_port  # one port picker for every test server

ROOT = Path(__file__).resolve().parents[3]


def make_keys(d: Path, key_id: str = "k1") -> Path:
    keys = d / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / f"key-{key_id}").write_bytes(os.urandom(32))
    (keys / "current-key-id").write_text(key_id)
    return keys


def trainer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIDC_", "PET_"))}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "trainer"), env.get("PYTHONPATH", "")]),
        AIDC_METRICS_PORT="-1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Node:
    """One ``torchrun`` invocation (a "node"), in its own process group so it can be killed whole."""

    def __init__(
        self,
        log: Path,
        args: Sequence[str],
        nnodes: int = 1,
        nproc: int = 2,
        node_rank: int = 0,
        port: int | None = None,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        # prefix: a wrapper that execs the rest (e.g. unshare); preexec_fn: limits torchrun and its
        # workers inherit (e.g. RLIMIT_FSIZE).
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            f"--node-rank={node_rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port or free_port()}",
            "-m",
            "aidc_trainer",
            *args,
        ]
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in wait/kill
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=env or trainer_env(),
            start_new_session=True,
            preexec_fn=preexec_fn,
        )

    def workers(self) -> list[int]:
        """PIDs of the worker processes torchrun started."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pids.append(int(stat.parent.name))
        return sorted(pids)

    def signal_workers(self, sig: int) -> None:
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        """SIGKILL torchrun and its workers (torchrun puts each worker in a session of its own)."""
        workers = self.workers()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._fh.close()


def run_nodes(
    logdir: Path, args: Sequence[str], nnodes: int = 2, nproc: int = 2, timeout: float = 120
) -> list[int]:
    port = free_port()
    nodes = [Node(logdir / f"node{i}.log", args, nnodes, nproc, i, port) for i in range(nnodes)]
    try:
        return [n.wait(timeout) for n in nodes]
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()


def events(log: Path, event: str | None = None) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if event is None or rec.get("event") == event:
                out.append(rec)
    return out


def wait_for(pred: Any, timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (relative path) -> sha256 of a file's bytes, or "dir"."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def termination_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines workers appended to their termination log (each one must parse whole)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), raw
    lines = raw.decode().splitlines()
    assert all(len(line.encode()) < 1024 for line in lines), lines
    return [json.loads(line) for line in lines]
