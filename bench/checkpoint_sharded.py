"""Sharded FSDP checkpoints: aidc (DCP, encrypted, verified) vs plain DCP async_save vs the full-state path.

For each model size and world size, ``torchrun`` starts that many gloo ranks on the CPU; each builds a
stack of ``Linear(2048, 2048)`` layers (``--params-b`` billion parameters in all), shards every layer
with FSDP2 (``fully_shard``), takes one optimiser step (so the optimiser state exists) and then, for each
variant in turn, saves ``--reps`` times and resumes once:

- ``dcp``  — the baseline: ``dcp.async_save`` of the sharded model + optimiser state dicts, unencrypted,
  stock ``FileSystemWriter``; resume = ``dcp.load`` into the sharded state dicts + ``set_state_dict``.
- ``aidc`` — ``ShardedCheckpointer``: the same async DCP save through the AES-256-GCM storage writer,
  with per-file sha256, the manifest written last (MAC'd) and the atomic publish; resume = the
  collective verify (each rank hashes 1/world of the files) + the sharded load.
- ``full`` — the previous aidc path: ``get_state_dict(full_state_dict=True, cpu_offload=True)`` gathers
  everything to rank 0, which writes one encrypted file; every rank reads that whole file on resume.

Per rank it records: the stall (what the training thread is blocked for), the total save time (until the
checkpoint is durable and published), the bytes this rank wrote, the peak host RSS above the rank's
resting RSS while saving and while resuming (a 5 ms sampler of /proc/self/status), and the resume time.

    .venv/bin/python bench/checkpoint_sharded.py --params-b 0.1 --ranks 2 4
    .venv/bin/python bench/checkpoint_sharded.py --params-b 1 --ranks 2 4 --optim sgd --variants dcp aidc

The 1 B run needs a host with at least 48 GiB (it is OOM-killed on 24 GiB). Results go to
bench/results/checkpoint_sharded.json (merged by size and world size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))
RESULTS = ROOT / "bench" / "results" / "checkpoint_sharded.json"
WIDTH = 2048


class PeakRSS:
    """Peak resident set size of this process during a window, sampled every 5 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.now()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self.now())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def extra(self) -> int:
        return self.peak - self.base


# ------------------------------------------------------------------------------------------ worker


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    from aidc_trainer.checkpoint import Checkpointer
    from aidc_trainer.checkpoint_format import load_latest
    from aidc_trainer.checkpoint_sharded import ShardedCheckpointer, restore_training_state, training_state
    from aidc_trainer.distributed import rng_state
    from aidc_trainer.keyring import KeyRing

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    layers = max(1, round(args.params_b * 1e9 / (WIDTH * WIDTH + WIDTH)))

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        # Built on the meta device and materialised already sharded: a 1 B model never exists whole
        # in one rank's memory (4 GB per rank otherwise, before sharding).
        with torch.device("meta"):
            model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        for layer in model:
            layer.reset_parameters()
        if args.optim == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        model(torch.randn(2, WIDTH)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return model, opt

    model, opt = build()
    keyring = KeyRing({"k1": hashlib.sha256(b"bench key, the same on every rank").digest()}, "k1")
    base = Path(args.dir)
    out: dict[str, Any] = {"rank": rank, "world": world, "layers": layers}

    def files_by(root: Path, mine: Any) -> int:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and mine(p))

    def barrier() -> None:
        dist.barrier()

    def save_once(variant: str, root: Path, step: int) -> tuple[float, float, int]:
        """(stall, total save time, peak extra RSS) of one save of ``variant``."""
        if variant == "dcp" and rank == 0:  # keep one, as keep-N does for the others (disk space)
            shutil.rmtree(root / f"step-{step - 1}", ignore_errors=True)
        barrier()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            if variant == "dcp":
                msd, osd = get_state_dict(model, opt)
                fut = dcp.async_save(
                    {"model": msd, "optimizer": osd}, checkpoint_id=str(root / f"step-{step}")
                )
                stall = time.perf_counter() - t0
                fut.result()
            elif variant == "aidc":
                ck = ShardedCheckpointer(root, rank, world, keyring, keep=1, run_id="bench")
                ck.save(step, training_state(model, opt, None, True), rng_state())
                stall = time.perf_counter() - t0
                res = ck.wait()
                assert res is not None and res.ok, res
            else:  # full: the previous path, gathered to rank 0
                ck = Checkpointer(root, rank, world, keyring, keep=1, run_id="bench")
                opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
                msd, osd = get_state_dict(model, opt, options=opts)
                shared = {"model": msd, "optimizer": osd} if rank == 0 else None
                ck.save(step, shared, rng_state())
                stall = time.perf_counter() - t0  # the gather to rank 0 included
                del msd, osd, shared
                res = ck.wait()
                assert res is not None and res.ok, res
            barrier()  # the save is done when every rank's part is
            total = time.perf_counter() - t0
        return stall, total, rss.extra

    def written_by_me(variant: str, last: Path) -> int:
        def mine(p: Path) -> bool:
            if variant == "full":
                return p.name == f"rank-{rank}.bin" or (rank == 0 and p.name == "manifest.json")
            return p.name.startswith(f"__{rank}_") or (rank == 0 and not p.name.startswith("__"))

        return files_by(last, mine)

    def resume_once(variant: str, root: Path, last: Path) -> tuple[float, int]:
        """(seconds, peak extra RSS) of resuming a fresh model from ``variant``'s newest checkpoint."""
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            if variant == "dcp":
                msd, osd = get_state_dict(model, opt)
                state = {"model": msd, "optimizer": osd}
                dcp.load(state, checkpoint_id=str(last))
                set_state_dict(
                    model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
                )
                del state, msd, osd
            elif variant == "aidc":
                ck = ShardedCheckpointer(root, rank, world, keyring, keep=1, run_id="bench2")
                loaded = ck.resume()
                assert loaded is not None
                restore_training_state(loaded, model, opt, None, keyring, None, rank, world, True)
                del loaded
            else:
                loaded = load_latest(root, keyring, rank)
                assert loaded is not None
                set_state_dict(
                    model,
                    opt,
                    model_state_dict=loaded.state["model"],
                    optim_state_dict=loaded.state["optimizer"],
                    options=StateDictOptions(full_state_dict=True),
                )
                del loaded
            seconds = time.perf_counter() - t0
        return seconds, rss.extra

    roots = {v: base / v for v in args.variants}
    if rank == 0:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
    samples: dict[str, list[tuple[float, float, int]]] = {v: [] for v in args.variants}
    for rep in range(args.reps):
        # Interleaved, in a rotating order: the disk's write-back of one save never favours one variant.
        order = args.variants[rep % len(args.variants) :] + args.variants[: rep % len(args.variants)]
        for variant in order:
            samples[variant].append(save_once(variant, roots[variant], rep + 1))
    for variant in args.variants:
        root = roots[variant]
        last = sorted(p for p in root.glob("step-*") if p.is_dir())[-1]
        written = written_by_me(variant, last)
        del model, opt
        model, opt = build()  # a fresh model, as a restarted job has
        barrier()
        resume_s, resume_rss = resume_once(variant, root, last)
        barrier()
        stalls, totals, peaks = zip(*samples[variant], strict=True)
        out[variant] = {
            "stall_s": statistics.median(stalls),
            "save_s": statistics.median(totals),
            "bytes_written": written,
            "peak_extra_rss_save": max(peaks),
            "peak_extra_rss_resume": resume_rss,
            "resume_s": resume_s,
        }
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        Path(args.out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ launcher


def _run(params_b: float, ranks: int, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    out = tmp / f"out-{params_b}-{ranks}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        __file__,
        "--worker",
        "--params-b",
        str(params_b),
        "--reps",
        str(args.reps),
        "--optim",
        args.optim,
        "--dir",
        str(tmp / "ckpt"),
        "--out",
        str(out),
        "--variants",
        *args.variants,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "trainer")}
    print(f"[{time.strftime('%H:%M:%S')}] {params_b} B parameters on {ranks} ranks …", flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _report(
    params_b: float, ranks: int, per_rank: list[dict[str, Any]], variants: list[str]
) -> dict[str, Any]:
    summary: dict[str, Any] = {"params_b": params_b, "ranks": ranks, "optim": per_rank[0].get("optim")}
    for v in variants:
        rows = [r[v] for r in per_rank]
        summary[v] = {
            "stall_s": max(r["stall_s"] for r in rows),
            "save_s": max(r["save_s"] for r in rows),
            "bytes_per_rank": [r["bytes_written"] for r in rows],
            "peak_extra_rss_save_max": max(r["peak_extra_rss_save"] for r in rows),
            "peak_extra_rss_resume_max": max(r["peak_extra_rss_resume"] for r in rows),
            "resume_s": max(r["resume_s"] for r in rows),
        }
    print(f"\n{params_b} B parameters, {ranks} ranks (worst rank)")
    head = f"{'stall s':>9} {'save s':>9} {'resume s':>9} {'save +RSS':>11} {'resume +RSS':>12}"
    print(f"{'':6} {head}  bytes/rank")
    for v in variants:
        s = summary[v]
        print(
            f"{v:6} {s['stall_s']:9.3f} {s['save_s']:9.2f} {s['resume_s']:9.2f} "
            f"{_gb(s['peak_extra_rss_save_max']):>11} {_gb(s['peak_extra_rss_resume_max']):>12}  "
            + ", ".join(_gb(b) for b in s["bytes_per_rank"])
        )
    if "dcp" in summary and "aidc" in summary:
        d, a = summary["dcp"], summary["aidc"]
        summary["ratios"] = {
            "stall_aidc_vs_dcp": a["stall_s"] / d["stall_s"],
            "save_aidc_vs_dcp": a["save_s"] / d["save_s"],
        }
        print(
            f"aidc / plain DCP: stall {summary['ratios']['stall_aidc_vs_dcp']:.2f}x (goal <= 1.2), "
            f"save {summary['ratios']['save_aidc_vs_dcp']:.2f}x (goal <= 1.10)"
        )
    if "full" in summary and "aidc" in summary:
        f, a = summary["full"], summary["aidc"]
        summary.setdefault("ratios", {})["resume_aidc_vs_full"] = a["resume_s"] / f["resume_s"]
        ratio = a["resume_s"] / f["resume_s"]
        print(f"aidc / full-state: resume {ratio:.2f}x (goal <= 1/{ranks} = {1 / ranks:.2f})")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params-b", type=float, nargs="+", default=[0.1])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--optim", choices=["adam", "sgd"], default="adam")
    p.add_argument("--variants", nargs="+", default=["dcp", "aidc", "full"], choices=["dcp", "aidc", "full"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.params_b = args.params_b[0]
        _worker(args)
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    with tempfile.TemporaryDirectory(prefix="aidc-bench-ckpt-", dir=os.environ.get("AIDC_BENCH_DIR")) as tmp:
        for params_b in args.params_b:
            for ranks in args.ranks:
                per_rank = _run(params_b, ranks, args, Path(tmp))
                summary = _report(params_b, ranks, per_rank, args.variants)
                summary["optim"] = args.optim
                summary["reps"] = args.reps
                summary["machine"] = f"{os.cpu_count()} CPUs, {os.uname().machine}"
                results[f"{params_b}B-{ranks}ranks-{args.optim}"] = summary
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
