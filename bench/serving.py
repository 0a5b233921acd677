#!/usr/bin/env python3
"""aidc_server vs KServe's Python ModelServer: same checkpoint, same load, side by side, over REST JSON,
REST binary and gRPC.

    .venv/bin/python bench/serving.py                       # both models, 3 protocols, concurrency 1, 16, 64
    .venv/bin/python bench/serving.py --models transformer --protocols json,binary --concurrency 16
    .venv/bin/python bench/serving.py --accuracy-only        # int8 quantization accuracy change

What it does, in order:
1. Trains the trainer's example MLP and small transformer with the real trainer CLI (a few hundred
   CPU steps) into a temporary checkpoint directory: both servers load that same checkpoint.
2. Measures the accuracy change of --quantize int8 on each model's held-out split.
3. Creates (once) KServe's venv with bench/setup_kserve.sh (never the project venv).
4. For each model, starts the servers on loopback (aidc_server from the project venv; KServe from
   its venv, running bench/_serving_kserve.py; with --aidc-fast-io also aidc_server with uvloop +
   httptools), checks that every server and protocol gives the same answer, then drives each with
   the same closed-loop load at each concurrency level: C connections, each sending the next request
   when the previous answer arrives. Protocols (--protocols):
   - json: v2 REST, JSON body and JSON logits (bench/_serving_load.py);
   - binary: v2 REST with the binary tensor data extension: JSON header + raw input bytes, the
     logits asked for and sent back as raw FP32 bytes (bench/_serving_load.py);
   - grpc: the Open Inference Protocol's gRPC half, raw input contents (bench/_serving_grpc.py).
   Per level every server/protocol row takes turns for --rounds rounds of --duration seconds (after
   one --warmup stretch each); the rounds are pooled. Prints throughput, p50/p99, aidc / KServe in
   the same protocol, binary and gRPC / JSON on the same server, issue 16's goals cell by cell, then
   each server's resident memory once ready and its peak under load (VmRSS / VmHWM of the server
   process and any children).

Fairness: both servers run one process with the same torch build and the same torch thread count,
neither logs per request (KServe's latency and access logs are switched off), and both get the same
request bytes per protocol. KServe runs its documented custom-model path: a synchronous Model.predict
on one request at a time (KServe has no in-process batcher), its response built as KServe's own
get_predict_response builds one (so it honours binary outputs). The load generators are minimal
asyncio clients (httpx costs more CPU than the servers on a 2-core machine and would cap both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _serving_load as rest
from _serving_report import Result, print_goals, print_memory_table, print_table, to_json
from _serving_servers import ROOT, Server, fast_io_dir, memory_mib, setup_kserve, start_aidc, start_kserve

PROTOCOLS = ("json", "binary", "grpc")
MODELS = {
    # name: (trainer example, trainer args, one request's input tensor)
    "mlp": ("mlp", ["--steps", "300"], {"datatype": "FP32", "shape": [1, 10]}),
    "transformer": (
        "transformer",
        ["--steps", "300", "--batch-size", "32"],
        {"datatype": "INT64", "shape": [1, 32]},
    ),
}


@dataclass
class Target:
    """One row: a server driven over one protocol."""

    server: Server
    protocol: str
    drive: Callable[[int, bool], tuple[list[float], int, float]]  # (concurrency, warm) -> one stretch
    ask: Callable[[], tuple]  # one answer: (flattened output, how it came back)

    @property
    def row(self) -> str:
        return f"{self.server.name}/{self.protocol}"


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


def targets_for(servers: list[Server], model: str, protocols: list[str], args) -> list[Target]:
    one = MODELS[model][2]
    spec = {**one, "shape": [args.rows, *one["shape"][1:]]}
    return [
        _grpc_target(s, model, spec, args)
        if protocol == "grpc"
        else _rest_target(s, protocol, model, spec, args)
        for s in servers
        for protocol in protocols
    ]


def _rest_target(server: Server, protocol: str, model: str, spec: dict, args) -> Target:
    body, headers = rest.rest_request(protocol, spec)
    path = f"/v2/models/{model}/infer"
    return Target(
        server,
        protocol,
        drive=lambda c, warm: rest.run_load(server.port, path, body, headers, c, args, warm),
        ask=lambda: rest.answer(server.port, path, body, headers),
    )


def _grpc_target(server: Server, model: str, spec: dict, args) -> Target:
    if str(ROOT / "server") not in sys.path:
        sys.path.insert(0, str(ROOT / "server"))  # the generated stubs (aidc_server.proto)
    import _serving_grpc as grpc_load

    request = grpc_load.infer_request(model, spec)
    address = f"127.0.0.1:{server.grpc_port}"
    return Target(
        server,
        "grpc",
        drive=lambda c, warm: grpc_load.run_grpc_load(address, request, c, args, warm),
        ask=lambda: grpc_load.answer(address, request),
    )


def bench_model(
    model: str, ckpt: Path, kserve_python: str | None, args, logs: Path, fast_io: Path | None
) -> list[Result]:
    """All servers up at once (idle ones cost nothing); rounds interleave every row at each level.

    The machine is shared, so load from elsewhere drifts over minutes: running the rows in
    alternation, --rounds times, and pooling the rounds spreads that drift over all of them.
    """
    import numpy as np

    grpc = "grpc" in args.protocols
    servers = [start_aidc(model, ckpt, args, logs / f"aidc-{model}.log", grpc)]
    if fast_io is not None:
        servers.append(start_aidc(model, ckpt, args, logs / f"aidc-fast-{model}.log", grpc, fast_io))
    if kserve_python:
        servers.append(start_kserve(kserve_python, model, ckpt, args, logs / f"kserve-{model}.log", grpc))
    results: list[Result] = []
    try:
        ready_rss: dict[str, float] = {}
        for server in servers:
            server.wait_ready(model)
            ready_rss[server.name] = memory_mib(server.proc.pid)[0]
        targets = targets_for(servers, model, args.protocols, args)
        reference = None  # the first row's answer (aidc/json); every other row must agree
        output: dict[str, str] = {}  # row -> how its output came back
        for t in targets:
            got, output[t.row] = t.ask()
            if reference is None:
                reference = got
            elif not np.allclose(reference, got, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"{t.row} and {targets[0].row} disagree on {model}: not the same model?")
            if t.protocol == "binary" and output[t.row] != "binary":
                print(f"# {t.row}: asked for binary logits, got {output[t.row]}", flush=True)
        for c in args.concurrency:
            # row -> [latencies, errors, seconds, rows batched, batches]
            pooled: dict[str, list] = {t.row: [[], 0, 0.0, 0.0, 0.0] for t in targets}
            for round_ in range(args.rounds):
                order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
                for t in order:
                    before = t.server.batch_stats()
                    latencies, errors, seconds = t.drive(c, round_ == 0)
                    after = t.server.batch_stats()
                    pooled[t.row][0] += latencies
                    pooled[t.row][1] += errors
                    pooled[t.row][2] += seconds
                    if before and after:  # this row's batches alone: the rows take turns
                        pooled[t.row][3] += after[0] - before[0]
                        pooled[t.row][4] += after[1] - before[1]
            for t in targets:
                latencies, errors, seconds, batched_rows, batches = pooled[t.row]
                ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
                p50, p99 = np.percentile(ms, [50, 99])
                r = Result(t.server.name, t.protocol, model, c, len(latencies), errors, seconds, p50, p99)
                r.output = output[t.row]
                if batches:
                    r.mean_batch = batched_rows / batches
                batching = f", {r.mean_batch:.1f} rows/batch" if r.mean_batch else ""
                print(
                    f"  {r.row:18s} {model:12s} c={c:<3d} {r.rps:8.0f} req/s  p50 {r.p50_ms:7.2f} ms  "
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
                f"  {server.name:18s} {model:12s} resident once ready {ready_rss[server.name]:7.1f} MiB, "
                f"peak under load {peak:7.1f} MiB",
                flush=True,
            )
    finally:
        for server in servers:
            server.stop()
    return results


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


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _protocols(text: str) -> list[str]:
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise argparse.ArgumentTypeError(f"protocols are a comma-separated subset of {','.join(PROTOCOLS)}")
    return protocols


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,transformer")
    p.add_argument("--protocols", default=list(PROTOCOLS), type=_protocols, help="default: json,binary,grpc")
    p.add_argument("--concurrency", default="1,16,64", type=lambda s: [int(c) for c in s.split(",")])
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per row, level and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level (pooled)")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per row and level")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap per row, level and round")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=1, help="rows per request (the logits grow with it)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-latency-ms", type=float, default=5.0)
    p.add_argument("--kserve-version", default="0.21.0")
    p.add_argument("--skip-kserve", action="store_true")
    p.add_argument(
        "--aidc-fast-io",
        action="store_true",
        help="also run aidc_server with uvloop + httptools (KServe's default I/O), borrowed from its venv",
    )
    p.add_argument("--grpc", action="store_true", help=argparse.SUPPRESS)  # older CLI: grpc is a default now
    p.add_argument("--accuracy-only", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.grpc and "grpc" not in args.protocols:
        args.protocols.append("grpc")
    return args


def main() -> int:
    args = parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cpus = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    print(f"# machine: {platform.node()}, {cpus}, Python {platform.python_version()}")
    print(f"# command: {' '.join(sys.argv)}")
    print(f"# load average before: {_load()} (other work on this machine skews results)")
    work = Path(tempfile.mkdtemp(prefix="aidc-bench-serving-"))
    try:
        ckpts = {m: train(m, work) for m in models}
        report: dict = {"command": " ".join(sys.argv), "rows": args.rows, "accuracy": {}, "results": []}
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
        print_goals(results)
        print_memory_table(results)
        if args.json:
            report["results"] = to_json(results)
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
