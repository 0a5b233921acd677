"""The operator at datacenter scale, side by side with Kubeflow's training-operator v1.8.1.

    python bench/scale.py [--sizes 100,300,1000] [--fleet-nodes 1000] [--steady-seconds 120]
                          [--only aidc|kubeflow] [--out bench/results/scale.json] [--keep-cluster]

Method. One dedicated local cluster (hack/cluster/localcluster.py, state in .state/bench-scale):
etcd, kube-apiserver, kube-controller-manager, kube-scheduler; 2 GPU nodes with a kwok agent each
(node Lease 10 s; the ones a node-kill hits) and --fleet-nodes GPU nodes (8 x nvidia.com/gpu each)
all managed by ONE kwok process with 40 s node Leases, as real kubelets have. The apiserver audits the
two operators' users (Metadata level, nothing else), so their API requests are counted apiserver-side;
each operator runs with a client certificate of its own (aidc-operator, training-operator; both in
system:masters, so RBAC costs neither anything).

For each size N, aidc first, then Kubeflow, one operator at a time, in a fresh namespace:
  1. start the operator (aidc: `python -m aidc_operator --standalone --namespace bench-scale`;
     Kubeflow: its binary, PyTorchJob controller only), wait for its health endpoint;
  2. create N jobs as fast as 4 client threads can: aidc TrainingJob nodes=4 (1 GPU per pod, the
     defaults otherwise: checkpoint encryption on, so a key Secret per job); Kubeflow PyTorchJob
     1 Master + 3 Workers x 1 GPU. One label-selected pod watch records per job when all 4 pods
     existed and when all 4 were Running;
  3. wait until every job's own status says Running (the operator has caught up), 10 s to settle,
     then a steady-state window: requests/s and CPU with nothing changing;
  4. aidc only: SIGKILL the kwok agent of a per-node node hosting job pods (a node losing power),
     time each affected gang back to Running elsewhere, check no other job's pods changed;
  5. delete every job (one deletecollection), time until every pod is gone; stop the operator;
     delete the namespace and wait until it is gone.
Operator CPU is utime+stime of its process tree (/proc), memory its sampled RSS peak and VmHWM.
Requests are audit-log events of its user (one per request, counted when received; a watch counts
once), with the operator's own counter beside them as a cross-check (aidc_api_requests_total;
controller-runtime's rest_client_requests_total for Kubeflow).

Honesty notes: everything shares the same cores (apiserver, etcd, scheduler, kwok, the benchmark's own
client and watch, and the operator), so absolute numbers depend on the machine; the ratios are what to
read. The table prints aidc / Kubeflow for every metric (lower is better for aidc in all of them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "hack" / "cluster"), str(ROOT / "bench")]

from _scale_measure import AuditLog  # noqa: E402
from _scale_ops import Aidc, Kubeflow, Operator  # noqa: E402
from _scale_run import Bench, dump, run_one, say  # noqa: E402
from kubernetes import client, config  # noqa: E402

from localcluster import LocalCluster  # noqa: E402

NS = "bench-scale"
USERS = ("aidc-operator", "training-operator")
# (section, key, label) of each metric in the table; all are costs, lower is better.
METRICS = [
    ("create", "all_pods_created_s", "all 4N pods created (s)"),
    ("create", "all_running_s", "all 4N pods Running (s)"),
    ("create", "status_running_s", "every job's status Running (s)"),
    ("create", "job_latency_p50_s", "job create->Running p50 (s)"),
    ("create", "job_latency_p99_s", "job create->Running p99 (s)"),
    ("create", "cpu_s", "operator CPU, creation (s)"),
    ("create", "peak_rss_mb", "operator peak RSS, creation (MB)"),
    ("create", "requests", "API requests, creation"),
    ("steady", "requests_per_s", "API requests/s, steady"),
    ("steady", "cpu_per_s", "operator CPU s/s, steady"),
    ("delete", "pods_gone_s", "delete -> all pods gone (s)"),
    ("delete", "requests", "API requests, deletion"),
    ("overall", "cpu_s_without_node_kill", "operator CPU, whole run* (s)"),
    ("overall", "vm_hwm_mb", "operator VmHWM, whole run (MB)"),
    ("overall", "requests_without_node_kill", "API requests, whole run*"),
]


def value(run: dict[str, Any] | None, section: str, key: str) -> float | None:
    if not run or not isinstance(run.get(section), dict):
        return None
    v = run[section].get(key)
    return v if isinstance(v, int | float) else None


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def table(runs: list[dict[str, Any]]) -> str:
    sizes = sorted({r["size"] for r in runs})
    by = {(r["operator"], r["size"]): r for r in runs}
    head = f"{'metric':34}" + "".join(f" | N={n:<5} aidc  kubeflow  ratio" for n in sizes)
    lines = [head, "-" * len(head)]
    for section, key, label in METRICS:
        row = f"{label:34}"
        for n in sizes:
            a, k = value(by.get(("aidc", n)), section, key), value(by.get(("kubeflow", n)), section, key)
            ratio = f"{a / k:.2f}x" if a is not None and k else "-"
            row += f" | {'':7}{fmt(a):>5} {fmt(k):>9} {ratio:>6}"
        lines.append(row)
    lines.append("* without aidc's node-kill step, which Kubeflow does not run")
    for n in sizes:
        nk = (by.get(("aidc", n)) or {}).get("node_kill")
        if nk:
            lines.append(
                f"aidc node kill, N={n}: {nk['affected_jobs']} gang(s) on {nk['victim']} back to Running in "
                f"max {nk['recovery_max_s']}s (median {nk['recovery_median_s']}s); other jobs untouched: "
                f"{nk['other_jobs_untouched']}"
            )
    for r in runs:
        if r.get("error"):
            lines.append(f"{r['operator']} N={r['size']}: FAILED: {r['error']}")
    return "\n".join(lines)


def cross_check(runs: list[dict[str, Any]]) -> str:
    """Audit-log counts beside the operator's own counter, creation phase."""
    lines = []
    for r in runs:
        create = r.get("create") or {}
        audit, own = create.get("requests_by"), create.get("counter_by")
        lines.append(f"{r['operator']} N={r['size']}, creation: audit log {audit}")
        lines.append(f"{'':>{len(r['operator']) + 3 + len(str(r['size']))}}  own counter {own}")
    return "\n".join(lines)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM ends the run as Ctrl-C does: through the finally blocks that stop what we started."""
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,300,1000", help="job counts, comma-separated")
    ap.add_argument("--fleet-nodes", type=int, default=1000)
    ap.add_argument("--steady-seconds", type=float, default=120)
    ap.add_argument("--only", choices=["aidc", "kubeflow"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    ap.add_argument("--grace", default="20s", help="kube-controller-manager --node-monitor-grace-period")
    ap.add_argument("--no-node-kill", action="store_true", help="skip aidc's node-loss step")
    ap.add_argument("--keep-cluster", action="store_true", help="leave the cluster running at the end")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    gpus = 8 * (2 + args.fleet_nodes)
    if 4 * max(sizes) + 4 > gpus:
        ap.error(f"{max(sizes)} jobs x 4 GPUs (+4 for a probe job) do not fit on {gpus} GPUs")

    signal.signal(signal.SIGTERM, _interrupt)
    state = ROOT / ".state" / "bench-scale"
    if (state / "cluster.json").exists():
        LocalCluster.load(state).down()  # a fresh cluster: nothing left from an earlier run
    if (state / "logs").exists():  # the previous run's logs (audit log included) move aside
        shutil.rmtree(state / "logs.previous", ignore_errors=True)
        (state / "logs").rename(state / "logs.previous")
    c = LocalCluster(
        state, nodes=2, fleet_nodes=args.fleet_nodes, node_monitor_grace_period=args.grace, audit_users=USERS
    )
    runs: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "command": "bench/scale.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "per_node_nodes": 2,
        "fleet_nodes": args.fleet_nodes,
        "gpus_per_node": 8,
        "fleet_lease_seconds": c.fleet_lease_seconds,
        "node_monitor_grace_period": args.grace,
        "steady_seconds": args.steady_seconds,
        "settle_seconds": 10,
    }
    try:
        t0 = time.monotonic()
        c.up(timeout=120)
        meta["cluster_up_s"] = round(time.monotonic() - t0, 1)
        logs = c.state_dir / "logs"
        say(f"cluster up in {meta['cluster_up_s']}s: {c.nodes} + {c.fleet_nodes} nodes; logs in {logs}")
        api = config.new_client_from_config(str(c.kubeconfig))
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        b = Bench(c, core, custom, AuditLog(c.audit_log), NS, args.steady_seconds)
        ops: list[Operator] = []
        if args.only != "kubeflow":
            ops.append(Aidc(NS))
        if args.only != "aidc":
            ops.append(Kubeflow())
        for op in ops:
            op.install(c)
        for n in sizes:
            for op in ops:
                kill = op.name == "aidc" and not args.no_node_kill
                runs.append(run_one(b, op, n, logs, node_kill_test=kill))
                dump(args.out, {**meta, "runs": runs})  # after every run: a later failure keeps these
        print(table(runs))
        print()
        print(cross_check(runs))
        print(f"\nresults: {args.out}")
    finally:
        if runs:
            dump(args.out, {**meta, "runs": runs})
        if args.keep_cluster:
            say(f"cluster left running: export KUBECONFIG={c.kubeconfig}")
        else:
            c.down()
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped")
        sys.exit(130)
