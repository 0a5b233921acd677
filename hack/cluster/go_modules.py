"""What the local cluster takes from Go modules pinned by go.mod files the project owns (hack/kueue,
hack/metrics-server, hack/prometheus, hack/prometheus-adapter, hack/gateway-api): the Go environment,
`go` run in the pin's directory, a logged build, and the cache directory keyed by the pinned version
that the first clone fills and every later one reuses."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster_processes import ClusterError, log


def go_env(needs: str, cgo: bool = False) -> dict[str, str]:
    """The environment for `go` (the official tarball's place added when go is not on PATH); raises
    ClusterError saying what `needs` it when there is no toolchain."""
    env = {**os.environ, "GOFLAGS": "-mod=readonly", **({} if cgo else {"CGO_ENABLED": "0"})}
    if not shutil.which("go", path=env.get("PATH")) and Path("/usr/local/go/bin/go").exists():
        env["PATH"] = f"/usr/local/go/bin:{env.get('PATH', '')}"
    if not shutil.which("go", path=env.get("PATH")):
        raise ClusterError(f"{needs} needs a Go toolchain on PATH (https://go.dev/doc/install)")
    return env


def go(pin: Path, env: dict[str, str], *args: str) -> str:
    """`go args…` in the pin's directory; its stdout, or ClusterError with go's own message."""
    proc = subprocess.run(["go", *args], cwd=pin, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"go {' '.join(args)} in {pin} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def module_field(pin: Path, env: dict[str, str], module: str, field: str) -> str:
    """A field of the pinned module as `go list -m` reports it: Version, Dir (its files)…"""
    return go(pin, env, "list", "-m", "-f", "{{." + field + "}}", module)


@contextmanager
def cached(name: str, version: str, under: str = "bin") -> Iterator[Path]:
    """$AIDC_CACHE/<under>/<name>-<version>, held under a lock so that two clones fill it once."""
    cache = Path(os.environ.get("AIDC_CACHE", Path.home() / ".cache" / "aidc")) / under
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cache / f"{name}-{version}"


def build_binary(
    pin: Path, env: dict[str, str], package: str, binary: Path, ldflags: str = "-s -w", tags: str = ""
) -> None:
    """`go build` of PACKAGE (as pinned by PIN's go.mod) into BINARY at the lowest CPU priority, logging
    how many packages have compiled twice a minute (a first build takes minutes on 2 cores)."""
    name = binary.name
    log(f"{name}: building {package} (first time only; minutes)")
    t0 = time.monotonic()
    argv = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, *(["-tags", tags] if tags else [])]
    argv += ["-o", str(binary), package]
    proc = subprocess.Popen(["nice", "-n", "19", *argv], cwd=pin, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    packages, tail = [0], list[str]()

    def progress() -> None:  # -v names each package as it compiles: report the count
        while True:
            time.sleep(30)
            if proc.poll() is not None:
                return
            log(f"{name}: {packages[0]} packages compiled ({time.monotonic() - t0:.0f}s)")

    threading.Thread(target=progress, daemon=True).start()
    for line in proc.stderr:
        packages[0] += 1
        tail = [*tail[-40:], line]
    if proc.wait() != 0 or not binary.exists():
        raise ClusterError(
            f"building {name} failed; check access to the Go module proxy and disk space:\n" + "".join(tail)
        )
    log(f"{name}: built in {time.monotonic() - t0:.0f}s")
