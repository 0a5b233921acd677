"""aidc trainer vs a plain torchrun DDP script: same model, data, batch and steps.

Runs (interleaved, ``--reps`` times each): plain DDP script, aidc with checkpointing off, aidc with
encrypted async checkpoints every ``--ckpt-every`` steps. Compares training-loop wall time (start
of the first step to the end of the last, measured inside rank 0; process start-up, the final
evaluation and the final checkpoint are excluded for both) and prints the ratios, with each
variant's peak resident memory (rank 0's ``ru_maxrss``; an async checkpoint holds one host copy of
the state while it is written).

    .venv/bin/python bench/trainer_overhead.py --nproc 2 --steps 2000 --reps 3
    .venv/bin/python bench/trainer_overhead.py --in-process --cpu --steps 3000 --reps 10

``--in-process`` runs both loops alternately in one process with one rank (see ``in_process``):
the precise per-step comparison where separate processes are too noisy to resolve 2 %.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ plain DDP worker
def plain_worker(steps: int, batch: int, hidden: int, lr: float) -> None:
    """What a user would write by hand: the same model, data and Adam, no aidc."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    elapsed = plain_loop(steps, batch, hidden, lr, device, rank, world)
    if rank == 0:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"event": "done", "loop_seconds": elapsed, "max_rss_mb": rss}), flush=True)
    dist.destroy_process_group()


def plain_loop(steps: int, batch: int, hidden: int, lr: float, device, rank: int, world: int) -> float:
    """The hand-written DDP training loop (process group already up); returns its wall time."""
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)  # same synthetic task as aidc_trainer.examples.mlp
    teacher = torch.randn(10, 10, generator=g)
    x = torch.randn(8192 + 2048, 10, generator=g)
    y = (x @ teacher + 0.1 * torch.randn(8192 + 2048, 10, generator=g)).argmax(-1)
    x, y = x[:8192], y[:8192]
    model = DDP(nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(device))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    n, per_step = len(x), batch * world
    perm, epoch = None, -1
    t0 = time.perf_counter()
    for step in range(steps):
        pos = step * per_step
        if pos // n != epoch:
            epoch = pos // n
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        assert perm is not None
        start = pos % n + rank * batch
        idx = perm[start : start + batch] if start + batch <= n else perm[:batch]
        loss = loss_fn(model(x[idx].to(device, non_blocking=True)), y[idx].to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 and rank == 0:
            _ = loss.item()  # a typical script logs its loss now and then
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def in_process(a: argparse.Namespace) -> None:
    """Both loops in one process (one rank), alternating: no process-to-process variance.

    Separate torchrun processes on a small shared VM differ by a few percent from run to run
    (memory layout, scheduling), as much as the overhead to be measured. Here the same process
    group, the same allocator state and the same threads serve both loops, and each repetition
    yields a paired ratio. Caveat: aidc's global settings (deterministic algorithms) stay on for
    the plain loop too; they measured no difference on CPU.
    """
    import logging

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RANK="0", LOCAL_RANK="0")
    os.environ.update(WORLD_SIZE="1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "trainer"))
    from aidc_trainer import distributed as D
    from aidc_trainer import log as jsonlog
    from aidc_trainer import recipe as R
    from aidc_trainer.config import load_config
    from aidc_trainer.trainer import Trainer

    jsonlog.setup(0)  # the JSON log lines are formatted and written as in a pod, to /dev/null
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))  # noqa: SIM115
    argv = ["--example", "mlp", "--steps", str(a.steps), "--batch-size", str(a.batch_size)]
    argv += ["--lr", str(a.lr), "--eval-every", "0", "--metrics-port", "-1", "--parallel", "ddp"]
    argv += ["--model-config", json.dumps({"hidden": a.hidden}), "--device", "cpu" if a.cpu else "auto"]
    cfg = load_config(argv)
    env = D.init(cfg)

    def aidc() -> float:
        trainer = Trainer(cfg, R.resolve(cfg), env)
        trainer.fit()
        return float(trainer._loop_seconds)

    def plain() -> float:
        return plain_loop(a.steps, a.batch_size, a.hidden, a.lr, env.device, 0, 1)

    times: dict[str, list[float]] = {"plain": [], "aidc": []}
    for rep in range(a.reps):
        for name, loop in (
            (("plain", plain), ("aidc", aidc)) if rep % 2 == 0 else (("aidc", aidc), ("plain", plain))
        ):
            times[name].append(loop())
        print(f"rep {rep}: plain {times['plain'][-1]:.3f}s, aidc {times['aidc'][-1]:.3f}s", flush=True)
    paired = [x / y for x, y in zip(times["aidc"], times["plain"], strict=True)]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nMLP 10-{a.hidden}-10, one process ({env.backend}, {env.device}), {a.steps} steps x batch "
        f"{a.batch_size}, {a.reps} alternating reps"
    )
    print(
        f"plain {1000 * med['plain'] / a.steps:.3f} ms/step, aidc {1000 * med['aidc'] / a.steps:.3f} ms/step"
    )
    print(
        f"aidc / plain: ratio of medians {med['aidc'] / med['plain']:.3f}, "
        f"median of paired ratios {statistics.median(paired):.3f} "
        f"(min {min(paired):.3f}, max {max(paired):.3f})"
    )


# ------------------------------------------------------------------------------------- driver
def _port() -> int:
    if str(ROOT / "hack" / "cluster") not in sys.path:
        sys.path.insert(0, str(ROOT / "hack" / "cluster"))
    from cluster_processes import free_port  # the project's one port picker

    return free_port()


def _torchrun(nproc: int, target: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(training-loop seconds, peak RSS of rank 0 in MiB) of one torchrun run."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={_port()}", *target,
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"run failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-4000:]}")
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("{") and '"done"' in line:
            rec = json.loads(line)
            if rec.get("event") == "done" and rec.get("loop_seconds") is not None:
                return float(rec["loop_seconds"]), float(rec["max_rss_mb"])
    raise SystemExit("no timing found in output")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["plain"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--cpu", action="store_true", help="hide GPUs: gloo on CPU even on a GPU machine")
    p.add_argument(
        "--in-process", action="store_true", help="both loops alternating in one process, one rank"
    )
    a = p.parse_args()
    if a.in_process:
        if a.cpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        in_process(a)
        return
    if a.worker == "plain":
        plain_worker(a.steps, a.batch_size, a.hidden, a.lr)
        # Same exit as aidc_trainer (launch.exit_process): gloo threads can abort a finishing
        # process during interpreter finalization, which would fail the baseline run.
        sys.stdout.flush()
        os._exit(0)

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDC_")}
    env.update(
        OMP_NUM_THREADS="1",
        AIDC_METRICS_PORT="-1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "trainer"), env.get("PYTHONPATH", "")]),
    )
    if a.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    common = [
        "--steps",
        str(a.steps),
        "--batch-size",
        str(a.batch_size),
        "--lr",
        str(a.lr),
        "--eval-every",
        "0",
    ]
    common += ["--model-config", json.dumps({"hidden": a.hidden})]
    plain = [str(Path(__file__).resolve()), "--worker", "plain", "--steps", str(a.steps)]
    plain += ["--batch-size", str(a.batch_size), "--hidden", str(a.hidden), "--lr", str(a.lr)]
    times: dict[str, list[float]] = {"plain": [], "aidc": [], "aidc+ckpt": []}
    rss: dict[str, list[float]] = {k: [] for k in times}
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.mkdir()
        (keys / "key-b1").write_bytes(os.urandom(32))
        (keys / "current-key-id").write_text("b1")
        for rep in range(a.reps):
            ck = ["--checkpoint-dir", f"{tmp}/ck{rep}", "--checkpoint-every-steps", str(a.ckpt_every)]
            ck += ["--key-dir", str(keys)]
            runs = {"plain": plain, "aidc": ["-m", "aidc_trainer", *common]}
            runs["aidc+ckpt"] = ["-m", "aidc_trainer", *common, *ck]
            for name, target in runs.items():
                seconds, peak = _torchrun(a.nproc, target, env)
                times[name].append(seconds)
                rss[name].append(peak)
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    import torch

    where = "gloo, CPU" if a.cpu or not torch.cuda.is_available() else f"NCCL, {torch.cuda.get_device_name()}"
    print(
        f"\nMLP 10-{a.hidden}-10, {a.nproc} procs ({where}), {a.steps} steps x batch {a.batch_size}/rank, "
        f"{a.reps} interleaved reps"
    )
    head = f"{'variant':<12} {'median s':>9} {'ms/step':>8} {'ratio (median)':>15} {'ratio (best)':>13}"
    print(f"{head} {'peak RSS MiB':>13} {'RSS ratio':>10}")
    rss_med = {k: statistics.median(v) for k, v in rss.items()}
    for k, v in med.items():
        r_best = best[k] / best["plain"]
        row = f"{k:<12} {v:9.3f} {1000 * v / a.steps:8.3f} {v / med['plain']:15.3f} {r_best:13.3f}"
        print(f"{row} {rss_med[k]:13.1f} {rss_med[k] / rss_med['plain']:10.3f}")
    print(f"checkpointing: encrypted, every {a.ckpt_every} steps, async")


if __name__ == "__main__":
    main()
