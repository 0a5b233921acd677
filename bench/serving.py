#!/usr/bin/env python3
"""aidc_server vs KServe's Python ModelServer: same checkpoint, same load, side by side.

    .venv/bin/python bench/serving.py                       # both models, concurrency 1, 8, 32
    .venv/bin/python bench/serving.py --models mlp --concurrency 16 --duration 5
    .venv/bin/python bench/serving.py --accuracy-only        # int8 quantization accuracy change
    .venv/bin/python bench/serving.py --grpc                 # also their gRPC ports (bench/_serving_grpc.py)

What it does, in order:
1. Trains the trainer's example MLP and small transformer with the real trainer CLI (a few hundred
   CPU steps) into a temporary checkpoint directory: both servers load that same checkpoint.
2. Creates (once) KServe's venv with bench/setup_kserve.sh (never the project venv).
3. For each model, starts the servers on loopback (aidc_server from the project venv; KServe from
   its venv, running this file with --serve-kserve; with --aidc-fast-io also aidc_server with
   uvloop + httptools), checks they give the same answer, then drives each with the same
   closed-loop load generator at each concurrency level: C keep-alive connections, each sending
   the next request when the previous answer arrives. Per level the servers take turns for
   --rounds rounds of --duration seconds (after one --warmup stretch each); the rounds are pooled.
   Prints throughput, p50/p99 and the aidc/KServe ratios, then each server's resident memory once
   ready and its peak under load (VmRSS / VmHWM of the server process and any children).
4. Before that, measures the accuracy change of --quantize int8 on each model's held-out split.

Fairness: both servers run one process with the same torch build and the same torch thread count,
neither logs per request (KServe's latency and access logs are switched off), and both get the
same JSON bodies. The load generator is a minimal asyncio HTTP/1.1 client (httpx costs more CPU
than the servers on a 2-core machine and would cap both). KServe runs its documented custom-model
path: a synchronous Model.predict on one request at a time (KServe has no in-process batcher).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRPC_SUFFIX = "/grpc"  # a server's gRPC rows: "aidc/grpc", "kserve/grpc"
MODELS = {
    # name: (trainer example, trainer args, one request's input tensor)
    "mlp": ("mlp", ["--steps", "300"], {"datatype": "FP32", "shape": [1, 10]}),
    "transformer": (
        "transformer",
        ["--steps", "300", "--batch-size", "32"],
        {"datatype": "INT64", "shape": [1, 32]},
    ),
}


# --------------------------------------------------------------------------------- KServe side


def serve_kserve(checkpoint_dir: str, model_name: str, port: int, threads: int, grpc_port: int = 0) -> None:
    """Runs inside KServe's venv: the model as KServe's docs write a custom v2 model."""
    import torch
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

    from aidc_trainer.checkpoint import build_model_from_manifest, load_latest

    torch.set_num_threads(threads)

    class CheckpointModel(Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.load()

        def load(self) -> bool:
            loaded = load_latest(checkpoint_dir, None)
            net = build_model_from_manifest(loaded.manifest)
            net.load_state_dict(loaded.state["model"])
            self.net = net.eval()
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            x = torch.from_numpy(payload.inputs[0].as_numpy())
            with torch.inference_mode():
                y = self.net(x).numpy()
            out = InferOutput(name="output", shape=list(y.shape), datatype="FP32")
            out.set_data_from_numpy(y, binary_data=False)
            return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)

    server = ModelServer(
        http_port=port,
        grpc_port=grpc_port or 8081,
        enable_grpc=bool(grpc_port),
        workers=1,
        enable_latency_logging=False,
    )
    # KServe's log config puts uvicorn's access log at INFO (one line per request, as aidc_server
    # does not do); KSERVE_LOGLEVEL does not reach it. Silence it so neither server logs requests.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([CheckpointModel(model_name)])


# ---------------------------------------------------------------------------------- load generator


@dataclass
class Result:
    server: str
    model: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None = None  # rows per forward pass, from aidc_server's /metrics
    rss_ready_mib: float | None = None  # the server's processes once ready, before any load
    rss_peak_mib: float | None = None  # their high-water mark after every level of this model

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        length = int(lower[at + 15 : lower.index(b"\r\n", at)])
        return status, await reader.readexactly(length)
    body = b""  # chunked
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def _drive(port: int, request: bytes, concurrency: int, seconds: float, max_requests: int):
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                started = time.perf_counter()
                writer.write(request)
                status, _ = await _read_response(reader)
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def run_load(port: int, path: str, body: bytes, concurrency: int, args, warm: bool):
    """One measured stretch of closed-loop load (after a warm-up stretch if `warm`)."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    if warm:
        asyncio.run(_drive(port, request, concurrency, args.warmup, 10**9))
    return asyncio.run(_drive(port, request, concurrency, args.duration, args.max_requests))


# ----------------------------------------------------------------------------------------- servers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


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
    grpc_port: int | None = None  # with --grpc: its Open Inference Protocol gRPC port

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def start_aidc(model: str, ckpt: Path, args, log: Path, fast_io: Path | None = None) -> Server:
    port = free_port()
    cmd = [
        sys.executable, "-m", "aidc_server", "--checkpoint-dir", str(ckpt), "--model-name", model,
        "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
        "--max-latency-ms", str(args.max_latency_ms), "--torch-threads", str(args.torch_threads),
        "--log-level", "warning",
    ]  # fmt: skip
    # Always a port of its own: two servers on gRPC's default 8081 would share it (SO_REUSEPORT).
    grpc_port = free_port() if args.grpc else 0
    cmd += ["--grpc-port", str(grpc_port)]
    env = _env(args)
    if fast_io is not None:  # uvloop + httptools borrowed from KServe's venv (uvicorn picks them up)
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{fast_io}"
    server = Server("aidc+uvloop" if fast_io else "aidc", cmd, env, port, log)
    server.grpc_port = grpc_port or None
    return server


def start_kserve(kserve_python: str, model: str, ckpt: Path, args, log: Path) -> Server:
    port = free_port()
    cmd = [
        kserve_python, str(Path(__file__).resolve()), "--serve-kserve", "--checkpoint", str(ckpt),
        "--serve-model", model, "--serve-port", str(port), "--torch-threads", str(args.torch_threads),
    ]  # fmt: skip
    grpc_port = free_port() if args.grpc else 0
    cmd += ["--serve-grpc-port", str(grpc_port)]
    env = _env(args) | {"KSERVE_LOGLEVEL": "WARNING"}  # no per-request access/timing log lines
    server = Server("kserve", cmd, env, port, log)
    server.grpc_port = grpc_port or None
    return server


def _env(args) -> dict[str, str]:
    threads = str(args.torch_threads)
    pythonpath = os.pathsep.join(str(ROOT / p) for p in ("server", "trainer"))
    return os.environ | {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


# -------------------------------------------------------------------------------------- the bench


def train(model: str, out: Path) -> Path:
    example, extra, _ = MODELS[model]
    ckpt = out / model
    cmd = [
        sys.executable, "-m", "aidc_trainer", "--example", example, *extra, "--checkpoint-dir", str(ckpt),
        "--parallel", "none", "--device", "cpu", "--metrics-port", "-1", "--eval-every", "0",
    ]  # fmt: skip
    print(f"# training {model}: {' '.join(cmd[1:])}", flush=True)
    env = os.environ | {"PYTHONPATH": str(ROOT / "trainer")}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return ckpt


def request_body(model: str, seed: int = 0) -> bytes:
    import numpy as np

    spec = MODELS[model][2]
    rng = np.random.default_rng(seed)
    if spec["datatype"] == "INT64":
        data = rng.integers(0, 30, size=spec["shape"]).ravel().tolist()
    else:
        data = rng.standard_normal(spec["shape"]).astype(np.float32).ravel().tolist()
    return json.dumps({"id": "bench", "inputs": [{"name": "input", **spec, "data": data}]}).encode()


def answer(server: Server, model: str, body: bytes):
    import numpy as np

    status, raw = http("POST", f"http://127.0.0.1:{server.port}/v2/models/{model}/infer", body)
    if status != 200:
        raise RuntimeError(f"{server.name} answered {status}: {raw[:300]!r}")
    return np.array(json.loads(raw)["outputs"][0]["data"], dtype=np.float32)


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


def bench_model(
    model: str, ckpt: Path, kserve_python: str | None, args, logs: Path, fast_io: Path | None
) -> list[Result]:
    """All servers up at once (idle ones cost nothing); rounds interleave them at each level.

    The machine is shared, so load from elsewhere drifts over minutes: running the servers in
    alternation, --rounds times, and pooling the rounds spreads that drift over all of them.
    """
    import numpy as np

    body = request_body(model)
    path = f"/v2/models/{model}/infer"
    servers = [start_aidc(model, ckpt, args, logs / f"aidc-{model}.log")]
    if fast_io is not None:
        servers.append(start_aidc(model, ckpt, args, logs / f"aidc-fast-{model}.log", fast_io))
    if kserve_python:
        servers.append(start_kserve(kserve_python, model, ckpt, args, logs / f"kserve-{model}.log"))
    results: list[Result] = []
    try:
        reference = None  # aidc's answer; every other server must agree
        ready_rss: dict[str, float] = {}
        targets = load_targets(servers, model, path, body, args)
        for server in servers:
            server.wait_ready(model)
            ready_rss[server.name] = memory_mib(server.proc.pid)[0]
        for name, _server, _, ask in targets:
            got = ask()
            if reference is None:
                reference = got
            elif not np.allclose(reference, got, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"{name} and aidc disagree on {model}: not the same model?")
        for c in args.concurrency:
            # name -> [latencies, errors, seconds, rows batched, batches]
            pooled: dict[str, list] = {t[0]: [[], 0, 0.0, 0.0, 0.0] for t in targets}
            for round_ in range(args.rounds):
                order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
                for name, server, drive, _ in order:
                    before = batch_stats(server)
                    latencies, errors, seconds = drive(c, round_ == 0)
                    after = batch_stats(server)
                    pooled[name][0] += latencies
                    pooled[name][1] += errors
                    pooled[name][2] += seconds
                    if before and after:  # this protocol's batches alone: the targets take turns
                        pooled[name][3] += after[0] - before[0]
                        pooled[name][4] += after[1] - before[1]
            for name, _server, _, _ in targets:
                latencies, errors, seconds, batched_rows, batches = pooled[name]
                ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
                r = Result(name, model, c, len(latencies), errors, seconds, *np.percentile(ms, [50, 99]))
                if batches:
                    r.mean_batch = batched_rows / batches
                batching = f", {r.mean_batch:.1f} rows/batch" if r.mean_batch else ""
                print(
                    f"  {r.server:11s} {model:12s} c={c:<3d} {r.rps:8.0f} req/s  p50 {r.p50_ms:7.2f} ms  "
                    f"p99 {r.p99_ms:7.2f} ms  ({r.requests} ok, {r.errors} errors{batching})",
                    flush=True,
                )
                results.append(r)
        for server in servers:
            peak = memory_mib(server.proc.pid)[1]
            for r in results:
                if r.server == server.name:
                    r.rss_ready_mib, r.rss_peak_mib = ready_rss[server.name], peak
            print(
                f"  {server.name:11s} {model:12s} resident once ready {ready_rss[server.name]:7.1f} MiB, "
                f"peak under load {peak:7.1f} MiB",
                flush=True,
            )
    finally:
        for server in servers:
            server.stop()
    return results


def load_targets(servers: list[Server], model: str, path: str, body: bytes, args) -> list[tuple]:
    """(name, server, drive(concurrency, warm), one answer) per server and protocol."""
    targets: list[tuple] = [
        (
            s.name,
            s,
            lambda c, warm, s=s: run_load(s.port, path, body, c, args, warm),
            lambda s=s: answer(s, model, body),
        )
        for s in servers
    ]
    if args.grpc:
        sys.path[:0] = [str(ROOT / "server")]  # the generated stubs (aidc_server.proto)
        import _serving_grpc as serving_grpc

        request = serving_grpc.infer_request(model, MODELS[model][2])
        for s in servers:
            address = f"127.0.0.1:{s.grpc_port}"
            targets.append(
                (
                    s.name + GRPC_SUFFIX,
                    s,
                    lambda c, warm, a=address: serving_grpc.run_grpc_load(a, request, c, args, warm),
                    lambda a=address: serving_grpc.answer(a, request),
                )
            )
    return targets


def batch_stats(server: Server) -> tuple[float, float] | None:
    """(rows, batches) so far, from aidc_server's batch-size histogram; None for KServe."""
    if not server.name.startswith("aidc"):
        return None
    status, text = http("GET", f"http://127.0.0.1:{server.port}/metrics")
    values = {}
    for line in text.decode().splitlines():
        for key in ("aidc_server_batch_size_sum", "aidc_server_batch_size_count"):
            if line.startswith(key + "{"):
                values[key] = float(line.rsplit(" ", 1)[1])
    if status != 200 or len(values) != 2:
        return None
    return values["aidc_server_batch_size_sum"], values["aidc_server_batch_size_count"]


def accuracy(model: str, ckpt: Path) -> dict[str, float]:
    """Held-out accuracy of the served network, float32 vs --quantize int8 (server code path)."""
    import numpy as np

    sys.path[:0] = [str(ROOT / "server"), str(ROOT / "trainer")]
    from aidc_server.checkpoint_model import CheckpointModel
    from aidc_trainer.examples import mlp, transformer_lm

    data = mlp.make_data() if model == "mlp" else transformer_lm.make_data()
    x, y = data.eval.inputs.numpy(), data.eval.targets.numpy()
    scores = {}
    for quantize in (None, "int8"):
        served = CheckpointModel(model, ckpt, quantize=quantize)
        assert served.load(), served.status.reason
        out = np.concatenate(
            [served.predict({"input": x[i : i + 256]})["output"] for i in range(0, len(x), 256)]
        )
        scores[quantize or "fp32"] = float((out.argmax(-1) == y).mean())
        scores[f"{quantize or 'fp32'}_bytes"] = sum(
            b.numel() * b.element_size() for b in _weights(served.network.module)
        )
    return scores


def _weights(module):
    import torch

    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            yield t
        elif isinstance(t, tuple):  # packed quantized params: (weight, bias)
            yield from (p for p in t if isinstance(p, torch.Tensor))


def setup_kserve(version: str) -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "setup_kserve.sh")],
        env=os.environ | {"KSERVE_VERSION": version},
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def print_table(results: list[Result]) -> None:
    """Markdown: each aidc variant next to KServe at the same model and concurrency."""
    print("\n| model | concurrency | server | req/s | p50 ms | p99 ms | vs KServe: throughput | p99 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    by = {(r.server, r.model, r.concurrency): r for r in results}
    for r in results:
        suffix = GRPC_SUFFIX if r.server.endswith(GRPC_SUFFIX) else ""  # gRPC against KServe's gRPC
        k = by.get(("kserve" + suffix, r.model, r.concurrency))
        ratio = p99 = ""
        if k and r.server != k.server and k.rps:
            ratio = f"**{r.rps / k.rps:.2f}x**"
            p99 = "lower" if r.p99_ms <= k.p99_ms else "higher"
        print(
            f"| {r.model} | {r.concurrency} | {r.server} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {ratio} | {p99} |"
        )


def print_memory_table(results: list[Result]) -> None:
    print("\n| model | server | resident once ready (MiB) | peak under load (MiB) | peak vs KServe |")
    print("|---|---|---:|---:|---:|")
    seen = set()
    by = {(r.server, r.model): r for r in results}
    for r in results:
        if (r.server, r.model) in seen or r.rss_peak_mib is None:
            continue
        seen.add((r.server, r.model))
        k = by.get(("kserve", r.model))
        vs = k is not None and k.rss_peak_mib and r.server != "kserve"
        ratio = f"{r.rss_peak_mib / k.rss_peak_mib:.2f}x" if vs else ""  # type: ignore[union-attr]
        print(f"| {r.model} | {r.server} | {r.rss_ready_mib:.0f} | {r.rss_peak_mib:.0f} | {ratio} |")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,transformer")
    p.add_argument("--concurrency", default="1,8,32", type=lambda s: [int(c) for c in s.split(",")])
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per server, level and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level (pooled)")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per server and level")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap per server, level and round")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-latency-ms", type=float, default=5.0)
    p.add_argument("--kserve-version", default="0.21.0")
    p.add_argument("--skip-kserve", action="store_true")
    p.add_argument(
        "--aidc-fast-io",
        action="store_true",
        help="also run aidc_server with uvloop + httptools (KServe's default I/O), borrowed from its venv",
    )
    p.add_argument(
        "--grpc",
        action="store_true",
        help="also drive each server's Open Inference Protocol gRPC port (raw tensor contents)",
    )
    p.add_argument("--accuracy-only", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    # internal: the KServe side, run with KServe's venv python
    p.add_argument("--serve-kserve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--serve-model", help=argparse.SUPPRESS)
    p.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-grpc-port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_kserve:
        sys.argv = sys.argv[:1]  # KServe parses sys.argv itself at import
        serve_kserve(
            args.checkpoint, args.serve_model, args.serve_port, args.torch_threads, args.serve_grpc_port
        )
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cpus = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    print(f"# machine: {platform.node()}, {cpus}, Python {platform.python_version()}")
    print(f"# command: {' '.join(sys.argv)}")
    print(f"# load average before: {_load()} (other work on this machine skews results)")
    work = Path(tempfile.mkdtemp(prefix="aidc-bench-serving-"))
    try:
        ckpts = {m: train(m, work) for m in models}
        report: dict = {"accuracy": {}, "results": []}
        for m in models:
            acc = accuracy(m, ckpts[m])
            report["accuracy"][m] = acc
            print(
                f"# int8 {m}: accuracy {acc['fp32']:.4f} -> {acc['int8']:.4f} "
                f"({(acc['int8'] - acc['fp32']) * 100:+.2f} points), weights {acc['fp32_bytes']} -> "
                f"{acc['int8_bytes']} bytes",
                flush=True,
            )
        if args.accuracy_only:
            return 0
        kserve_python = (
            setup_kserve(args.kserve_version) if not args.skip_kserve or args.aidc_fast_io else None
        )
        fast_io = fast_io_dir(kserve_python, work) if args.aidc_fast_io else None
        if args.skip_kserve:
            kserve_python = None
        results: list[Result] = []
        for m in models:
            results += bench_model(m, ckpts[m], kserve_python, args, work, fast_io)
        print(f"# load average after: {_load()}")
        print_table(results)
        print_memory_table(results)
        if args.json:
            report["results"] = [r.__dict__ | {"rps": r.rps} for r in results]
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
