"""A real, local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and kwok (fake GPU nodes), all on loopback, built from Go modules by build.sh.

    python hack/cluster/localcluster.py up|down|status|env [--state-dir DIR] [--nodes N] [--fleet-nodes N] ...
    python hack/cluster/localcluster.py metrics-server|custom-metrics   # on a running cluster, for HPAs

Two kinds of fake node: `--nodes` GPU nodes each with a kwok agent of its own (killing one is a node
losing power; tests do that), and `--fleet-nodes` GPU nodes (fleet-node-i) that ONE kwok process
manages, Leases on, for datacenter-scale benchmarks (hundreds or thousands of nodes).

Importable too: the pytest plugin (tests/conftest.py) drives the same class. Every process is started in
its own session with a pid file under the state dir; `down` stops only those pids (and only if their
command line still names our binary), so a second cluster in another state dir never interferes.
"""

# This module is the cluster's life cycle (up, down, node agents); its parts live next to it:
# cluster_processes.py (pid files, start, wait, stop), cluster_pki.py (certificates, kubeconfigs),
# component_args.py (each component's command line, the audit policy), kwok_nodes.py (GPU nodes and
# pools), pod_addresses.py (pod IPs on lo) and cluster_cli.py (the command line above).

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import component_args
import kwok_nodes
import proctree
from cluster_pki import issue_identity, kubeconfig, write_pki
from cluster_processes import ClusterError, Processes, free_port, http_ok, log, port_in_use
from crd_wait import wait_established
from kwok_nodes import FLEET
from pod_addresses import (
    drop_node_pod_addresses,
    fleet_pod_cidr,
    pick_pod_net,
    pod_address_label,  # noqa: F401 - local_kubelet.py imports it from here
    release_pod_addresses,
)

# kueue.py and cluster_cli.py import this module by name; run as a script, that name must mean this
# module, not a copy.
sys.modules.setdefault("localcluster", sys.modules[__name__])
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def build_binaries() -> Path:
    """Runs build.sh (cached after the first time) and returns the directory holding the binaries."""
    proc = subprocess.run(["bash", str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ClusterError("building the control plane failed (output above); fix that and rerun")
    return Path(proc.stdout.strip().splitlines()[-1])


@dataclass
class LocalCluster:
    state_dir: Path
    nodes: int = 4
    gpus_per_node: int = 8
    node_monitor_grace_period: str = "20s"
    bin_dir: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    pod_net: str = "10.244"  # the first two octets of this cluster's pod addresses (kwok's --cidr)
    fleet_nodes: int = 0  # fleet-node-i, all managed by one kwok process (component kwok-fleet)
    fleet_lease_seconds: int = 40  # the fleet's node Lease duration (a real kubelet's default)
    audit_users: tuple[str, ...] = ()  # also log every request of these users (Metadata level, no bodies)
    # Kueue (kueue.py) as one more process; AIDC_KUEUE=0 or --no-kueue leaves it out.
    kueue: bool = field(
        default_factory=lambda: os.environ.get("AIDC_KUEUE", "1").lower() not in ("0", "false", "no")
    )

    # paths ------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def procs(self) -> Processes:
        return Processes(self.state_dir)

    def _pidfile(self, name: str) -> Path:
        return self.procs.pidfile(name)

    def logfile(self, name: str) -> Path:
        return self.procs.logfile(name)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "logs" / "audit.log"

    @property
    def audit_policy(self) -> Path:
        return self.state_dir / "audit-policy.yaml"

    @property
    def fleet_pod_cidr(self) -> str:
        return fleet_pod_cidr(self.pod_net)

    def _save(self) -> None:
        (self.state_dir / "cluster.json").write_text(
            json.dumps(
                {
                    "ports": self.ports,
                    "bin_dir": str(self.bin_dir),
                    "nodes": self.nodes,
                    "gpus_per_node": self.gpus_per_node,
                    "node_monitor_grace_period": self.node_monitor_grace_period,
                    "pod_net": self.pod_net,
                    "fleet_nodes": self.fleet_nodes,
                    "fleet_lease_seconds": self.fleet_lease_seconds,
                    "audit_users": list(self.audit_users),
                    "kueue": self.kueue,
                },
                indent=1,
            )
        )

    @classmethod
    def load(cls, state_dir: Path) -> LocalCluster:
        meta = json.loads((state_dir / "cluster.json").read_text())
        return cls(
            state_dir=state_dir,
            nodes=meta["nodes"],
            gpus_per_node=meta["gpus_per_node"],
            node_monitor_grace_period=meta["node_monitor_grace_period"],
            bin_dir=Path(meta["bin_dir"]),
            ports=meta["ports"],
            pod_net=meta.get("pod_net", "10.244"),
            fleet_nodes=meta.get("fleet_nodes", 0),
            fleet_lease_seconds=meta.get("fleet_lease_seconds", 40),
            audit_users=tuple(meta.get("audit_users", ())),
            kueue=meta.get("kueue", False),
        )

    # processes --------------------------------------------------------------
    def binary(self, name: str) -> str:
        assert self.bin_dir is not None
        return str((self.bin_dir / name).resolve())

    def node_names(self) -> list[str]:
        return [f"gpu-node-{i}" for i in range(self.nodes)]

    def fleet_node_names(self) -> list[str]:
        return [f"fleet-node-{i}" for i in range(self.fleet_nodes)]

    def components(self) -> list[str]:
        fleet = [FLEET] if self.fleet_nodes else []
        kueue = ["kueue"] if self.kueue else []
        return [*CONTROL_PLANE, *(f"kwok-{n}" for n in self.node_names()), *fleet, *kueue]

    def _start(self, name: str, args: list[str]) -> None:
        """Starts component NAME from our binaries (every kwok-* runs the kwok binary)."""
        self.start_process(name, [self.binary("kwok" if name.startswith("kwok-") else name), *args])

    def running_extra(self, name: str) -> int | None:
        """Pid of a process started with start_process, if it still runs."""
        return self.procs.alive(name)

    def start_process(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Starts a long-running process in its own session (it outlives the caller, e.g. `make run`),
        logging to logs/NAME.log; `down` stops it by the recorded pid."""
        return self.procs.start(name, argv, env)

    def _wait(
        self,
        what: str,
        check: Callable[[], Any],
        timeout: float,
        component: str | None = None,
        interval: float = 0.3,
    ) -> None:
        self.procs.wait(what, check, timeout, component, interval)

    def _https_ok(self, url: str, cert: str | None = None) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if cert is None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.load_cert_chain(self.pki / f"{cert}.crt", self.pki / f"{cert}.key")
        with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
            return r.status == 200

    def running(self) -> dict[str, int | None]:
        return {c: self.procs.alive(c) for c in self.components()}

    def healthy(self) -> bool:
        if not all(self.running().values()):
            return False
        try:
            return self._https_ok(f"{self.server}/readyz", cert="admin")
        except (OSError, urllib.error.URLError):
            return False

    # public -----------------------------------------------------------------
    def up(self, timeout: float = 180) -> LocalCluster:
        if (self.state_dir / "cluster.json").exists():
            existing = LocalCluster.load(self.state_dir)
            if existing.healthy():
                log(f"already up ({existing.server}); kubeconfig {existing.kubeconfig}")
                existing.ensure_nodes()
                return existing
            log("a previous cluster in this state dir is incomplete; stopping what is left of it")
            existing.down()
        t0 = time.monotonic()
        self.bin_dir = self.bin_dir or build_binaries()
        for sub in ("pids", "logs", "etcd", "pki"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        fixed = os.environ.get("AIDC_APISERVER_PORT")
        if fixed and port_in_use(int(fixed)):
            raise ClusterError(f"port {fixed} (AIDC_APISERVER_PORT) is in use; free it or unset the variable")
        for p in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler"):
            self.ports[p] = free_port()
        if fixed:
            self.ports["apiserver"] = int(fixed)
        self.pod_net = pick_pod_net()
        write_pki(self.pki)
        self.kubeconfig.write_text(kubeconfig(self.server, self.pki, "admin"))
        for ident in ("controller-manager", "scheduler", "kwok"):
            (self.state_dir / f"{ident}.kubeconfig").write_text(kubeconfig(self.server, self.pki, ident))
        self.audit_policy.write_text(component_args.audit_policy(self.audit_users))
        self._save()
        self._start_etcd()
        self._start_apiserver()
        self._start_controllers()
        self.ensure_nodes()
        # Pods are refused until the ServiceAccount controller has made the namespace's default SA.
        self._wait(
            "the default ServiceAccount",
            lambda: (
                self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).strip() != ""
            ),
            60,
            "kube-controller-manager",
        )
        if self.kueue:
            import kueue  # here, not at the top: kueue.py imports this module

            kueue.start(self)
        fleet = f" + {self.fleet_nodes} fleet nodes" if self.fleet_nodes else ""
        log(
            f"up in {time.monotonic() - t0:.1f}s: {self.server}, {self.nodes} GPU nodes{fleet}; "
            f"export KUBECONFIG={self.kubeconfig}"
        )
        return self

    def _start_etcd(self) -> None:
        self._start("etcd", component_args.etcd(self))

        def etcd_ok() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['etcd']}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"

        self._wait("etcd to become healthy", etcd_ok, 30, "etcd")

    def _start_apiserver(self) -> None:
        self._start("kube-apiserver", component_args.apiserver(self))
        self._wait(
            "kube-apiserver /readyz",
            lambda: self._https_ok(f"{self.server}/readyz", "admin"),
            90,
            "kube-apiserver",
        )

    def _start_controllers(self) -> None:
        p = self.ports
        self._start("kube-controller-manager", component_args.controller_manager(self))
        self._start("kube-scheduler", component_args.scheduler(self))
        for name, port in (
            ("kube-controller-manager", p["controller_manager"]),
            ("kube-scheduler", p["scheduler"]),
        ):
            self._wait(
                f"{name} /healthz",
                lambda port=port: self._https_ok(f"https://127.0.0.1:{port}/healthz"),
                60,
                name,
            )
        for node in self.node_names():
            self.start_node_agent(node)
        if self.fleet_nodes:
            self.start_fleet_agent()

    def start_fleet_agent(self) -> None:
        """ONE kwok process for every fleet node (those annotated kwok.x-k8s.io/node=fleet): node status,
        node Leases (fleet_lease_seconds) and the pods bound to them."""
        self._start_kwok(
            FLEET, "kwok for the fleet nodes", lambda port: component_args.kwok_fleet_agent(self, port)
        )

    def _start_kwok(self, name: str, what: str, args: Callable[[int], list[str]]) -> None:
        """Starts kwok component NAME with args(its port, kept across restarts) and waits for its /healthz."""
        assert self.bin_dir is not None
        port = self.ports.setdefault(name, free_port())
        self._save()
        self._start(name, args(port))
        self._wait(what, lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, name)

    def identity_kubeconfig(self, user: str) -> Path:
        """A kubeconfig for a client certificate CN=user, O=system:masters signed by the cluster CA, so a
        process (an operator in a benchmark) acts as a cluster admin under a name of its own, which the
        audit log and the apiserver's metrics can tell apart. Written to <state>/<user>.kubeconfig."""
        issue_identity(self.pki, user)
        path = self.state_dir / f"{user}.kubeconfig"
        path.write_text(kubeconfig(self.server, self.pki, user))
        return path

    def start_node_agent(self, node: str) -> None:
        """One kwok process per node, standing in for that node's kubelet: killing it is a node losing
        power (its Lease lapses, the node lifecycle controller marks it Unknown and taints it), starting
        it again is the node coming back."""
        self._start_kwok(
            f"kwok-{node}", f"kwok for {node}", lambda port: component_args.kwok_node_agent(self, node, port)
        )

    def stop_node_agent(self, node: str) -> None:
        """The node loses power, all of it before this returns: every process of every pod the development
        kubelet runs there is frozen, the node's kwok is SIGKILLed (no goodbye: its Lease lapses), the
        frozen processes are SIGKILLed and the pods' addresses leave lo. No process of the node runs a
        step after the cut, none exits gracefully, and the kubelet, finding the agent gone first, reports
        nothing for those pods (proctree.py says how a pod's processes are found)."""
        proctree.power_cut(
            proctree.markers(self.state_dir, node), meanwhile=lambda: self.procs.kill(f"kwok-{node}")
        )
        drop_node_pod_addresses(self.state_dir, self.pod_net, node)

    def wait_crds(self, *names: str, timeout: float = 120) -> None:
        """Until every named CRD is Established (crd_wait: kubectl wait can fail on a fresh one)."""
        wait_established([self.binary("kubectl"), f"--kubeconfig={self.kubeconfig}"], names, timeout)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        assert self.bin_dir is not None
        proc = subprocess.run(
            [self.binary("kubectl"), f"--kubeconfig={self.kubeconfig}", "--request-timeout=30s", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def node_manifest(self, i: int) -> dict:
        return kwok_nodes.node_manifest(i, self.gpus_per_node)

    def fleet_node_manifest(self, i: int) -> dict:
        return kwok_nodes.fleet_node_manifest(i, self.gpus_per_node)

    def ensure_nodes(self, timeout: float = 60) -> None:
        items = "\n".join(json.dumps(self.node_manifest(i)) for i in range(self.nodes))
        self.kubectl("apply", "-f", "-", input=items)
        if not self.fleet_nodes:
            self._wait(f"{self.nodes} nodes Ready", lambda: self.ready_nodes() >= self.nodes, timeout)
            return
        kwok_nodes.create_fleet_nodes(self)
        total = self.nodes + self.fleet_nodes
        # kwok initialises the fleet one node after another; on 2 busy cores that is tens of nodes a second.
        self._wait(
            f"{total} nodes Ready",
            lambda: self.ready_nodes() >= total,
            timeout + 0.5 * self.fleet_nodes,
            FLEET,
            interval=2,
        )

    def ready_nodes(self) -> int:
        return kwok_nodes.ready_nodes(self)

    def down(self) -> None:
        # Everything else (node agents, the operator, the local kubelet) first, then the control plane
        # from the top down, etcd last.
        rank = {n: i for i, n in enumerate(CONTROL_PLANE)}
        self.procs.stop(
            sorted(self.procs.recorded(), key=lambda n: rank.get(n, len(CONTROL_PLANE)), reverse=True)
        )
        release_pod_addresses(self.pod_net)
        for sub in ("etcd", "pki", "apiserver", "controller-manager", "pids", "pods", "prometheus"):
            shutil.rmtree(self.state_dir / sub, ignore_errors=True)
        for f in ("cluster.json", "kubeconfig", "audit-policy.yaml"):
            (self.state_dir / f).unlink(missing_ok=True)
        # The components' and identity_kubeconfig's: their certificates are gone.
        for f in self.state_dir.glob("*.kubeconfig"):
            f.unlink(missing_ok=True)


if __name__ == "__main__":
    from cluster_cli import main

    sys.exit(main())
