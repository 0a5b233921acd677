"""The command line of the local cluster: `python hack/cluster/localcluster.py up|down|status|build`
(the Makefile's cluster-* targets), `metrics-server` and `custom-metrics` (start metrics-server, or
Prometheus + prometheus-adapter, on a running cluster, for the HPA).
Its help is localcluster.py's docstring."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import localcluster
from cluster_processes import ClusterError, log
from localcluster import ROOT, LocalCluster, build_binaries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=localcluster.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=["up", "down", "status", "build", "metrics-server", "custom-metrics"])
    ap.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("AIDC_STATE_DIR", ROOT / ".state" / "cluster"))
    )
    ap.add_argument("--nodes", type=int, default=int(os.environ.get("AIDC_NODES", "4")))
    ap.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("AIDC_GPUS_PER_NODE", "8")))
    ap.add_argument("--node-monitor-grace-period", default=os.environ.get("AIDC_NODE_GRACE", "20s"))
    ap.add_argument(
        "--fleet-nodes",
        type=int,
        default=int(os.environ.get("AIDC_FLEET_NODES", "0")),
        help="more GPU nodes (fleet-node-i), all managed by one kwok process",
    )
    ap.add_argument("--fleet-lease-seconds", type=int, default=40, help="the fleet nodes' Lease duration")
    ap.add_argument("--no-kueue", action="store_true", help="leave Kueue out (also AIDC_KUEUE=0)")
    args = ap.parse_args(argv)
    state = args.state_dir.resolve()
    try:
        if args.command == "build":
            print(build_binaries())
            if not args.no_kueue and LocalCluster(state).kueue:
                import kueue

                kueue.build()
            import custom_metrics  # here, not at the top: they import localcluster
            import metrics_server

            metrics_server.build()
            custom_metrics.build()
        elif args.command == "up":
            c = LocalCluster(
                state,
                args.nodes,
                args.gpus_per_node,
                args.node_monitor_grace_period,
                fleet_nodes=args.fleet_nodes,
                fleet_lease_seconds=args.fleet_lease_seconds,
                **({"kueue": False} if args.no_kueue else {}),
            ).up()
            print(c.kubeconfig)
        elif args.command == "down":
            if (state / "cluster.json").exists():
                LocalCluster.load(state).down()
                log(f"stopped the cluster in {state}")
            else:
                log(f"no cluster recorded in {state}")
        elif args.command == "metrics-server":
            import metrics_server

            metrics_server.start(LocalCluster.load(state))
        elif args.command == "custom-metrics":
            import custom_metrics

            custom_metrics.start(LocalCluster.load(state))
        else:
            return status(state)
    except ClusterError as e:
        log(f"error: {e}")
        return 1
    return 0


def status(state: Path) -> int:
    """Each process, running or not, and the apiserver's health; 0 only when all is well."""
    if not (state / "cluster.json").exists():
        log(f"no cluster recorded in {state}")
        return 1
    c = LocalCluster.load(state)
    for name, pid in c.running().items():
        print(f"{name:25} {'running pid ' + str(pid) if pid else 'NOT RUNNING'}")
    print(f"{'apiserver':25} {c.server}  healthy={c.healthy()}")
    print(f"{'kubeconfig':25} {c.kubeconfig}")
    return 0 if c.healthy() else 1
