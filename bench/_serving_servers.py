"""The servers bench/serving.py compares, as processes on loopback: starting, readiness, memory, metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack" / "cluster"))
from cluster_processes import free_port  # noqa: E402  (the project's one port picker)


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body); status 0 when nothing answers."""
    req = urllib.request.Request(
        url, data=body, method=method, headers=headers or {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    except OSError:
        return 0, {}, b""


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of a process and its descendants (a server may fork workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    rss = hwm = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
        except OSError:
            continue
        rss += int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
        hwm += int(fields.get("VmHWM", "0 kB").split()[0]) / 1024
    return rss, hwm


class Server:
    grpc_port: int | None = None  # its Open Inference Protocol gRPC port, when gRPC is benched

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    @property
    def is_aidc(self) -> bool:
        return self.name.startswith("aidc")

    def wait_ready(self, model: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log_file.flush()
                tail = self.log.read_text()[-2000:]
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{tail}")
            if http("GET", f"http://127.0.0.1:{self.port}/v2/models/{model}/ready")[0] == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s; see {self.log}")

    def batch_stats(self) -> tuple[float, float] | None:
        """(rows, batches) so far, from aidc_server's batch-size histogram; None for KServe."""
        if not self.is_aidc:
            return None
        status, _, text = http("GET", f"http://127.0.0.1:{self.port}/metrics")
        values = {}
        for line in text.decode().splitlines():
            for key in ("aidc_server_batch_size_sum", "aidc_server_batch_size_count"):
                if line.startswith(key + "{"):
                    values[key] = float(line.rsplit(" ", 1)[1])
        if status != 200 or len(values) != 2:
            return None
        return values["aidc_server_batch_size_sum"], values["aidc_server_batch_size_count"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def start_aidc(model: str, ckpt: Path, args, log: Path, grpc: bool, fast_io: Path | None = None) -> Server:
    port = free_port()
    cmd = [
        sys.executable, "-m", "aidc_server", "--checkpoint-dir", str(ckpt), "--model-name", model,
        "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
        "--max-latency-ms", str(args.max_latency_ms), "--torch-threads", str(args.torch_threads),
        "--log-level", "warning",
    ]  # fmt: skip
    # Always a port of its own: two servers on gRPC's default 8081 would share it (SO_REUSEPORT).
    grpc_port = free_port() if grpc else 0
    cmd += ["--grpc-port", str(grpc_port)]
    env = _env(args)
    if fast_io is not None:  # uvloop + httptools borrowed from KServe's venv (uvicorn picks them up)
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{fast_io}"
    server = Server("aidc+uvloop" if fast_io else "aidc", cmd, env, port, log)
    server.grpc_port = grpc_port or None
    return server


def start_kserve(kserve_python: str, model: str, ckpt: Path, args, log: Path, grpc: bool) -> Server:
    port = free_port()
    grpc_port = free_port() if grpc else 0
    cmd = [
        kserve_python, str(ROOT / "bench" / "_serving_kserve.py"), "--checkpoint", str(ckpt),
        "--model", model, "--port", str(port), "--grpc-port", str(grpc_port),
        "--torch-threads", str(args.torch_threads),
    ]  # fmt: skip
    env = _env(args) | {"KSERVE_LOGLEVEL": "WARNING"}  # no per-request access/timing log lines
    server = Server("kserve", cmd, env, port, log)
    server.grpc_port = grpc_port or None
    return server


def _env(args) -> dict[str, str]:
    threads = str(args.torch_threads)
    pythonpath = os.pathsep.join(str(ROOT / p) for p in ("server", "trainer"))
    return os.environ | {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def setup_kserve(version: str) -> str:
    """KServe's venv (created once by bench/setup_kserve.sh): its python."""
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "setup_kserve.sh")],
        env=os.environ | {"KSERVE_VERSION": version},
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def fast_io_dir(kserve_python: str, work: Path) -> Path:
    """A directory holding only uvloop and httptools from KServe's venv, for --aidc-fast-io."""
    site = subprocess.run(
        [kserve_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout.strip()  # fmt: skip
    out = work / "fast-io"
    out.mkdir(exist_ok=True)
    for pkg in ("uvloop", "httptools"):
        (out / pkg).symlink_to(Path(site) / pkg)
    return out
