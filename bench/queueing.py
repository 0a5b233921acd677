"""Gang queueing with Kueue against the scheduler alone: 200 mixed TrainingJobs submitted at once to 64 GPUs.

    python bench/queueing.py [--jobs 200] [--seed 13] [--min-duration 10] [--max-duration 30]
                             [--timeout-seconds 30] [--backoff-seconds 10] [--cap-seconds 720]
                             [--only kueue|fifo] [--out bench/results/queueing.json] [--keep-cluster]

Method. One dedicated local cluster (hack/cluster/localcluster.py, state in .state/bench-queueing): etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, Kueue v0.17.0 as a process, 8 fleet nodes x 8
nvidia.com/gpu managed by one kwok process: the pool, exactly 64 GPUs. (The cluster always has one
per-node kwok node, gpu-node-0; the bench cordons it, so nothing lands there.) The operator runs as a
real process (`python -m aidc_operator --standalone --namespace <ns>`), one fresh one per mode.

The job mix is fixed by --seed: per job nodes in {1,2,4,8} (weights 45/30/15/10), GPUs per node in
{1,2,4,8} (35/30/20/15) and a run time drawn uniformly from [--min-duration, --max-duration] seconds.
The same 200 jobs run twice, one mode after the other, each in a fresh namespace, all submitted at once:

  kueue  a ResourceFlavor (no node labels: the whole pool), a ClusterQueue with nominalQuota 64
         nvidia.com/gpu (BestEffortFIFO), a LocalQueue; every job labelled kueue.x-k8s.io/queue-name.
         Kueue admits a Workload only when its whole gang fits the quota; no pod exists before.
  fifo   no label: Kueue ignores the jobs and kube-scheduler places pods first come, first served.

Both modes carry spec.scheduling {timeoutSeconds: --timeout-seconds, backoffSeconds: --backoff-seconds}:
a gang not wholly placed in time is deleted (its GPUs freed) and retried after the backoff. In fifo mode
that is the only guard against partial gangs; with Kueue it only matters when the quota admits a gang the
nodes cannot hold (quota counts GPUs, not which node has them free).

kwok plays the kubelet, so nothing ends on its own: once every pod of a gang has been Running for the
job's run time the bench writes the kubelet's report (each pod's status: phase Succeeded, container
terminated with exit code 0); the operator marks the job Succeeded and, with Kueue, its Workload Finished,
which frees the quota. The bench's own API use is one list+watch each of pods, TrainingJobs and Workloads,
those status patches, and one list of TrainingJobs at the end.

Measured per mode: GPUs held over time (pods bound to a node and not finished, their GPU requests,
sampled every --sample-seconds) and its mean over capacity; admission -> all Running p50/p99 (admission:
Workload Admitted with Kueue, the job's first pod created without); submit -> all Running; partial gangs
(jobs that held GPUs while the scheduler reported a sibling pod Unschedulable) and the GPU-seconds held by
gangs not yet wholly Running; scheduling timeouts; deadlock (no gang started and no job finished for
--stall-seconds while jobs remain); makespan (submit -> the last job Succeeded), or what completed by
--cap-seconds. Everything shares the machine's cores, so absolute times depend on it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "hack" / "cluster"), str(ROOT / "bench")]

from _queueing_run import Mode, Settings, job_mix  # noqa: E402
from _scale_measure import AuditLog  # noqa: E402
from _scale_ops import Aidc  # noqa: E402
from _scale_run import Bench, dump, say  # noqa: E402
from kubernetes import client, config  # noqa: E402

from localcluster import LocalCluster  # noqa: E402

FLEET_NODES, GPUS_PER_NODE = 8, 8
PLOTS_VENV = (
    Path(os.environ.get("AIDC_CACHE", Path.home() / ".cache" / "aidc")) / "plots-venv-matplotlib-3.11.2"
)
# (key, label, better): "low" or "high" is better, None: a count to read as is.
METRICS = [
    ("outcome", "outcome", None),
    ("makespan_s", "makespan, submit -> every job Succeeded (s)", "low"),
    ("jobs_succeeded", "jobs Succeeded", "high"),
    ("allocation_mean", "GPUs held / capacity, mean", None),
    ("useful_allocation", "GPU-s of finished work / capacity", "high"),
    ("admission_to_running_p50_s", "admission -> all Running p50 (s)", "low"),
    ("admission_to_running_p99_s", "admission -> all Running p99 (s)", "low"),
    ("submit_to_running_p50_s", "submit -> all Running p50 (s)", "low"),
    ("submit_to_running_p99_s", "submit -> all Running p99 (s)", "low"),
    ("partial_gangs", "partial gangs (held GPUs, sibling unschedulable)", "low"),
    ("partial_gangs_5s", "  of those, partial for 5 s or more", "low"),
    ("gpu_seconds_partial_gangs", "GPU-s held by gangs not wholly Running", "low"),
    ("scheduling_timeouts", "gangs deleted by the timeout", "low"),
    ("deadlocked", "deadlocked", None),
]


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return "-" if v is None else str(v)
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def table(runs: dict[str, dict[str, Any]]) -> str:
    k, f = runs.get("kueue") or {}, runs.get("fifo") or {}
    head = f"{'metric':50} {'kueue':>10} {'fifo':>10} {'fifo/kueue':>11}"
    lines = [head, "-" * len(head)]
    for key, label, better in METRICS:
        a, b = k.get(key), f.get(key)
        nums = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
        ratio = f"{b / a:.2f}x" if better and nums and a else "-"
        lines.append(f"{label:50} {fmt(a):>10} {fmt(b):>10} {ratio:>11}")
    for mode, r in runs.items():
        if r.get("error"):
            lines.append(f"{mode}: FAILED: {r['error']}")
        if r.get("unfinished"):
            lines.append(f"{mode}: {len(r['unfinished'])} not finished: {', '.join(r['unfinished'][:12])}")
    return "\n".join(lines)


def plot(out: Path) -> None:
    """docs/img/queueing.png, drawn by bench/_queueing_plot.py in the plots venv `make plots` uses."""
    py = PLOTS_VENV / "bin" / "python"
    if not py.exists():
        say(f"no plots venv at {PLOTS_VENV} (make plots creates it); skipped the plot")
        return
    subprocess.run([str(py), str(ROOT / "bench" / "_queueing_plot.py"), str(out)], check=False)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--min-duration", type=int, default=10, help="seconds a gang runs, lowest")
    ap.add_argument("--max-duration", type=int, default=30, help="seconds a gang runs, highest")
    ap.add_argument("--timeout-seconds", type=int, default=30, help="spec.scheduling.timeoutSeconds")
    ap.add_argument("--backoff-seconds", type=int, default=10, help="spec.scheduling.backoffSeconds")
    ap.add_argument("--cap-seconds", type=float, default=720, help="give a mode up after this long")
    ap.add_argument("--stall-seconds", type=float, default=180, help="no progress this long: deadlock")
    ap.add_argument("--sample-seconds", type=float, default=2)
    ap.add_argument("--only", choices=["kueue", "fifo"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "queueing.json")
    ap.add_argument("--keep-cluster", action="store_true")
    args = ap.parse_args()
    s = Settings(
        jobs=args.jobs, seed=args.seed, pool_gpus=FLEET_NODES * GPUS_PER_NODE,
        min_duration=args.min_duration, max_duration=args.max_duration,
        timeout_seconds=args.timeout_seconds, backoff_seconds=args.backoff_seconds,
        cap_seconds=args.cap_seconds, stall_seconds=args.stall_seconds, sample_seconds=args.sample_seconds,
    )  # fmt: skip
    modes = [m for m in ("kueue", "fifo") if args.only in (None, m)]
    mix = job_mix(s)
    work = sum(n * g * d for n, g, d in mix)
    signal.signal(signal.SIGTERM, _interrupt)
    state = ROOT / ".state" / "bench-queueing"
    if (state / "cluster.json").exists():
        LocalCluster.load(state).down()
    shutil.rmtree(state / "logs", ignore_errors=True)
    c = LocalCluster(state, nodes=1, fleet_nodes=FLEET_NODES, gpus_per_node=GPUS_PER_NODE)
    if "kueue" in modes and not c.kueue:
        ap.error("the kueue mode needs the local cluster's Kueue (unset AIDC_KUEUE=0, or --only fifo)")
    meta: dict[str, Any] = {
        "command": "bench/queueing.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "settings": s.__dict__,
        "pool": f"{FLEET_NODES} kwok nodes x {GPUS_PER_NODE} GPUs",
        "mix": {
            "gpus_requested": sum(n * g for n, g, _ in mix),
            "gpu_seconds_of_work": work,
            "ideal_makespan_s": round(work / s.pool_gpus, 1),
            "multi_node_jobs": sum(n > 1 for n, _, _ in mix),
            "whole_pool_jobs": sum(n * g == s.pool_gpus for n, g, _ in mix),
            "jobs": mix,
        },
    }
    say(
        f"mix: {meta['mix']['gpu_seconds_of_work']} GPU-s of work: "
        f"{meta['mix']['ideal_makespan_s']}s on a perfectly packed pool"
    )
    runs: dict[str, dict[str, Any]] = {}
    try:
        t0 = time.monotonic()
        c.up(timeout=180)
        c.kubectl("cordon", "gpu-node-0")  # the pool is the 8 fleet nodes alone: exactly 64 GPUs
        meta["cluster_up_s"] = round(time.monotonic() - t0, 1)
        api = config.new_client_from_config(str(c.kubeconfig))
        b = Bench(c, client.CoreV1Api(api), client.CustomObjectsApi(api), AuditLog(c.audit_log), "", 0)
        Aidc("").install(c)
        for m in modes:
            b.namespace = f"bench-queueing-{m}"
            runs[m] = Mode(b, s, m, c.state_dir / "logs").run(mix)
            dump(args.out, {**meta, "runs": runs})
        print(table(runs))
        print(f"\nresults: {args.out}")
    finally:
        if runs:
            dump(args.out, {**meta, "runs": runs})
        if args.keep_cluster:
            say(f"cluster left running: export KUBECONFIG={c.kubeconfig}")
        else:
            c.down()
    if runs:
        plot(args.out)
    return 1 if any(r.get("error") for r in runs.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped")
        sys.exit(130)
