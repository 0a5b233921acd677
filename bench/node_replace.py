"""Recovery from a lost node by gang size and policy, side by side in one run on kwok fleet nodes:
RestartGang, ReplaceNode and ReplaceNode with one standby spare, for gangs of 4, 16 and 64 pods.

Each trial starts a TrainingJob (one pod per node, no processes: kwok plays every kubelet), waits for
all its pods Running and Ready, then deletes the Node under rank 1 at t0 (the operator judges a deleted
node lost at once, so the clock measures the recovery path, not detection) and stops the clock when the
gang has all its pods Running and Ready again, none on the lost node. It counts the pods deleted and
created by the recovery (pod UIDs before and after). tests/e2e/test_replace_node.py covers the trainer
side with real processes (survivors restarting in place, spares taking over).

Goals (issue 14): with ReplaceNode the recovery time does not grow with the gang (64 pods: at most 1.2
times the 4-pod time) and touches exactly one pod.

    python bench/node_replace.py [--sizes 4,16,64] [--trials 3] [--fleet-nodes 80]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "hack" / "cluster"), str(ROOT / "operator")]

from _operator_run import operator_on  # noqa: E402
from kubernetes import client, config  # noqa: E402

from cluster_processes import poll  # noqa: E402
from kwok_nodes import create_fleet_nodes, ready_nodes  # noqa: E402
from localcluster import LocalCluster  # noqa: E402

NS = "bench-replace"
MODES = {
    "RestartGang": {"nodeFailure": "RestartGang"},
    "ReplaceNode": {"nodeFailure": "ReplaceNode"},
    "ReplaceNode+1 spare": {"nodeFailure": "ReplaceNode", "spareNodes": 1},
}


Pod = dict[str, Any]


def ready(pod: Pod) -> bool:
    st = pod.get("status") or {}
    return (
        st.get("phase") == "Running"
        and not pod["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or [])
    )


def node_of(pod: Pod) -> str | None:
    return (pod.get("spec") or {}).get("nodeName")


def trial(c: LocalCluster, core: client.CoreV1Api, name: str, size: int, mode: str) -> dict[str, Any]:
    failure = MODES[mode]
    pods = size + failure.get("spareNodes", 0)
    spec = {
        "nodes": size,
        "procPerNode": 1,
        "checkpoint": {"encryption": {"enabled": False}},
        "failurePolicy": {**failure, "backoffSeconds": 0},
    }
    body = {"apiVersion": "aidc.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name}}
    body["spec"] = spec
    c.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(body))
    sel = f"aidc.dev/job-name={name}"

    def gang() -> list[Pod]:
        # raw JSON: building the client's models for 64 pods takes longer than the recovery itself,
        # and the clock would measure the poll
        raw = core.list_namespaced_pod(NS, label_selector=sel, _preload_content=False)
        return json.loads(raw.data)["items"]

    poll(f"{name} running", lambda: sum(map(ready, gang())) == pods, 300, 0.2)
    before = gang()
    victim = next(node_of(p) for p in before if p["metadata"]["labels"]["aidc.dev/node-rank"] == "1")
    t0 = time.monotonic()
    core.delete_node(victim)

    def recovered() -> list[Pod] | None:
        now = gang()
        live = [p for p in now if ready(p)]
        if len(live) == pods and victim not in {node_of(p) for p in live}:
            return now
        return None

    after = poll(f"{name} recovered", recovered, 600, 0.05)
    seconds = time.monotonic() - t0
    uids_before = {p["metadata"]["uid"] for p in before}
    uids_after = {p["metadata"]["uid"] for p in after if not p["metadata"].get("deletionTimestamp")}
    c.kubectl("delete", "trainingjob", name, "-n", NS, "--wait=false")
    poll(f"{name} gone", lambda: not gang(), 300, 0.5)
    create_fleet_nodes(c)  # the deleted node comes back for the next trial
    poll("every fleet node Ready", lambda: ready_nodes(c) >= c.fleet_nodes, 120, 0.5)
    return {
        "size": size,
        "mode": mode,
        "seconds": round(seconds, 2),
        "pods_deleted": len(uids_before - uids_after),
        "pods_created": len(uids_after - uids_before),
    }


def report(results: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for mode in MODES:
        for size in sizes:
            rows = [r for r in results if r["mode"] == mode and r["size"] == size]
            table[f"{mode} @ {size}"] = {
                "median_s": round(statistics.median(r["seconds"] for r in rows), 2),
                "max_s": max(r["seconds"] for r in rows),
                "pods_deleted": sorted({r["pods_deleted"] for r in rows}),
                "pods_created": sorted({r["pods_created"] for r in rows}),
            }
            t = table[f"{mode} @ {size}"]
            print(
                f"{mode:>20} {size:>3} pods: median {t['median_s']:6.2f} s  max {t['max_s']:6.2f} s  "
                f"deleted {t['pods_deleted']} created {t['pods_created']}"
            )
    lo, hi = min(sizes), max(sizes)
    ratios = {
        mode: round(table[f"{mode} @ {hi}"]["median_s"] / table[f"{mode} @ {lo}"]["median_s"], 2)
        for mode in MODES
    }
    for mode, ratio in ratios.items():
        print(f"{mode}: {hi}-pod / {lo}-pod recovery time = {ratio}x")
    rg, rn = table[f"RestartGang @ {hi}"]["median_s"], table[f"ReplaceNode @ {hi}"]["median_s"]
    print(f"at {hi} pods RestartGang / ReplaceNode = {rg / rn:.2f}x")
    return {"table": table, "growth": ratios}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,16,64")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--fleet-nodes", type=int, default=80)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.fleet_nodes < max(sizes) + 3:
        ap.error("--fleet-nodes must leave room for the gang, a spare and a replacement")
    state = ROOT / ".state" / "bench-node-replace"
    c = LocalCluster(state, nodes=1, fleet_nodes=args.fleet_nodes).up()
    with operator_on(c, NS):
        for n in c.node_names():  # fleet nodes only: the per-node one is not deleted and restored
            c.kubectl("cordon", n)
        config.load_kube_config(str(c.kubeconfig))
        core = client.CoreV1Api()
        results = []
        for t in range(args.trials):  # interleaved, so drift on the machine hits every mode alike
            for size in sizes:
                for i, mode in enumerate(MODES):
                    results.append(trial(c, core, f"g{size}-m{i}-t{t}", size, mode))
                    print(json.dumps(results[-1]), flush=True)
        summary = report(results, sizes)
        out = ROOT / "bench" / "results" / "node_replace.json"
        meta = {
            "command": "bench/node_replace.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores",
            "fleet_nodes": args.fleet_nodes,
            "loss": "Node object deleted at t0 (judged lost at once)",
        }
        out.write_text(json.dumps({**meta, **summary, "trials": results}, indent=1))
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
