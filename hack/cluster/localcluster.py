"""A real, local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and kwok (fake GPU nodes), all on loopback, built from Go modules by build.sh.

    python hack/cluster/localcluster.py up|down|status|env [--state-dir DIR] [--nodes N] [--fleet-nodes N] ...

Two kinds of fake node: `--nodes` GPU nodes each with a kwok agent of its own (killing one is a node
losing power; tests do that), and `--fleet-nodes` GPU nodes (fleet-node-i) that ONE kwok process
manages, Leases on, for datacenter-scale benchmarks (hundreds or thousands of nodes).

Importable too: the pytest plugin (tests/conftest.py) drives the same class. Every process is started in
its own session with a pid file under the state dir; `down` stops only those pids (and only if their
command line still names our binary), so a second cluster in another state dir never interferes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import proctree
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

T = TypeVar("T")
# kueue.py imports this module by name; run as a script, that name must mean this module, not a copy.
sys.modules.setdefault("localcluster", sys.modules[__name__])
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
FLEET = "kwok-fleet"  # the component (pid file, log) of the one kwok process managing every fleet node
# Identities write_pki issues; identity_kubeconfig refuses these names so it never overwrites one.
RESERVED_IDENTITIES = ("ca", "sa", "apiserver", "admin", "controller-manager", "scheduler", "kwok")
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_POOL_LABEL = "aidc.dev/gpu-pool"  # Kueue ResourceFlavors (examples/kueue/) select nodes by it
GPU_POOLS = {"h100": GPU_PRODUCT, "a100": "NVIDIA-A100-SXM4-80GB"}


class ClusterError(RuntimeError):
    """A failure with a message that says what went wrong and how to fix it."""


def log(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def poll(what: str, fn: Callable[[], T], timeout: float, interval: float = 0.3) -> T:
    """fn's first truthy value. Transient errors (an API hiccup, a file not written yet) are retried;
    a ClusterError ends the wait at once; running out of time is a ClusterError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := fn():
                return value
        except ClusterError:
            raise
        except Exception:  # noqa: BLE001, S110 - not there yet
            pass
        time.sleep(interval)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


def build_binaries() -> Path:
    """Runs build.sh (cached after the first time) and returns the directory holding the binaries."""
    proc = subprocess.run(["bash", str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ClusterError("building the control plane failed (output above); fix that and rerun")
    return Path(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- pod addresses
# kwok gives each pod an IP from its node's --cidr; the development kubelet (local_kubelet.py) puts that
# IP on the loopback device so the pod's processes listen where the API says the pod is. That is what
# lets the apiserver's pod proxy reach them: it refuses 127.0.0.0/8 but not a 10.x address on lo.


def pod_address_label(pod_net: str) -> str:
    """The `ip addr` label marking one cluster's pod addresses (so `down` removes exactly those)."""
    return f"lo:aidc{pod_net.split('.')[1]}"


def pick_pod_net() -> str:
    """A 10.K prefix that no address on this machine uses yet (several clusters may run at once)."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    used = {int(m) for m in re.findall(r"inet 10\.(\d+)\.", out)}
    free = [k for k in range(64, 250) if k not in used]
    return f"10.{random.choice(free)}" if free else "10.244"


def release_pod_addresses(pod_net: str) -> None:
    with contextlib.suppress(OSError):
        subprocess.run(["ip", "-4", "addr", "flush", "dev", "lo", "label", pod_address_label(pod_net)],
                       capture_output=True)


# ---------------------------------------------------------------- certificates


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = [x509.ExtendedKeyUsageOID.SERVER_AUTH] if server else [x509.ExtendedKeyUsageOID.CLIENT_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def x509_name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def write_pki(pki: Path) -> None:
    """CA, apiserver serving cert, one client cert per component identity, service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = new_key()
    ca_name = x509_name("aidc-local-ca")
    ca = issue_cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(pem_key(ca_key))

    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in (
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    )]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.96.0.1")]
    identities = {
        "apiserver": (x509_name("kube-apiserver"), True),
        "admin": (x509_name("aidc-admin", "system:masters"), False),
        "controller-manager": (x509_name("system:kube-controller-manager"), False),
        "scheduler": (x509_name("system:kube-scheduler"), False),
        # kwok plays the nodes' kubelets; the Node authorizer is off, so it acts as a cluster admin.
        "kwok": (x509_name("kwok", "system:masters"), False),
    }
    for ident, (subject, server) in identities.items():
        key = new_key()
        cert = issue_cert(subject, key, ca_name, ca_key, server=server, sans=sans if server else None)
        (pki / f"{ident}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (pki / f"{ident}.key").write_bytes(pem_key(key))
    sa = new_key()
    (pki / "sa.key").write_bytes(pem_key(sa))
    (pki / "sa.pub").write_bytes(
        sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def kubeconfig(server: str, pki: Path, ident: str) -> str:
    import base64

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "aidc-local", "cluster": {
            "server": server, "certificate-authority-data": b64(pki / "ca.crt")}}],
        "users": [{"name": ident, "user": {
            "client-certificate-data": b64(pki / f"{ident}.crt"),
            "client-key-data": b64(pki / f"{ident}.key")}}],
        "contexts": [{"name": "aidc-local", "context": {"cluster": "aidc-local", "user": ident}}],
        "current-context": "aidc-local",
    }, indent=1)


# ---------------------------------------------------------------- the cluster


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
    audit_users: tuple[str, ...] = ()  # log these users' requests to logs/audit.log (Metadata level)
    # Kueue (kueue.py) as one more process; AIDC_KUEUE=0 or --no-kueue leaves it out.
    kueue: bool = field(
        default_factory=lambda: os.environ.get("AIDC_KUEUE", "1").lower() not in ("0", "false", "no"))

    # paths ------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    def _pidfile(self, name: str) -> Path:
        return self.state_dir / "pids" / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

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
        """kwok-fleet's --cidr. The per-node agents draw from {pod_net}.{i % 250}.1/24 and the local
        kubelet probes {pod_net}.255.254, which leaves 1.5 k addresses of this cluster's 10.K/16: too few
        for 1,000 nodes x 8 pods. So the fleet takes a /16 of the RFC 6598 shared space 100.64.0.0/10,
        which no per-node range (always 10/8) can reach, chosen by K as pod_net is."""
        return f"100.{64 + int(self.pod_net.split('.')[1]) % 64}.0.1/16"

    def _save(self) -> None:
        (self.state_dir / "cluster.json").write_text(json.dumps({
            "ports": self.ports, "bin_dir": str(self.bin_dir), "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "node_monitor_grace_period": self.node_monitor_grace_period, "pod_net": self.pod_net,
            "fleet_nodes": self.fleet_nodes, "fleet_lease_seconds": self.fleet_lease_seconds,
            "audit_users": list(self.audit_users), "kueue": self.kueue,
        }, indent=1))

    @classmethod
    def load(cls, state_dir: Path) -> LocalCluster:
        meta = json.loads((state_dir / "cluster.json").read_text())
        return cls(
            state_dir=state_dir, nodes=meta["nodes"], gpus_per_node=meta["gpus_per_node"],
            node_monitor_grace_period=meta["node_monitor_grace_period"],
            bin_dir=Path(meta["bin_dir"]), ports=meta["ports"], pod_net=meta.get("pod_net", "10.244"),
            fleet_nodes=meta.get("fleet_nodes", 0), fleet_lease_seconds=meta.get("fleet_lease_seconds", 40),
            audit_users=tuple(meta.get("audit_users", ())), kueue=meta.get("kueue", False),
        )

    # processes --------------------------------------------------------------
    def _binary(self, name: str) -> str:
        assert self.bin_dir is not None
        return str((self.bin_dir / name).resolve())

    def _pid_alive(self, name: str) -> int | None:
        """The recorded pid of NAME if that process is alive and still runs the executable we started
        (the pid file holds both), so a recycled pid is never mistaken for ours."""
        try:
            pid_text, _, exe_recorded = self._pidfile(name).read_text().partition("\n")
            pid = int(pid_text)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            exe = os.readlink(f"/proc/{pid}/exe")
        except (OSError, ValueError, IndexError):
            return None
        if state in ("Z", "X"):
            return None
        return pid if exe == exe_recorded.strip() else None

    @staticmethod
    def _binary_name(component: str) -> str:
        return "kwok" if component.startswith("kwok-") else component

    def node_names(self) -> list[str]:
        return [f"gpu-node-{i}" for i in range(self.nodes)]

    def fleet_node_names(self) -> list[str]:
        return [f"fleet-node-{i}" for i in range(self.fleet_nodes)]

    def components(self) -> list[str]:
        fleet = [FLEET] if self.fleet_nodes else []
        kueue = ["kueue"] if self.kueue else []
        return [*CONTROL_PLANE, *(f"kwok-{n}" for n in self.node_names()), *fleet, *kueue]

    def _start(self, name: str, args: list[str]) -> None:
        self.start_process(name, [self._binary(self._binary_name(name)), *args])

    def running_extra(self, name: str) -> int | None:
        """Pid of a process started with start_process, if it still runs."""
        return self._pid_alive(name)

    def start_process(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Starts a long-running process in its own session (it outlives the caller, e.g. `make run`),
        logging to logs/NAME.log; `down` stops it by the recorded pid."""
        (self.state_dir / "pids").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        out = self.logfile(name).open("ab")
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        self._pidfile(name).write_text(f"{proc.pid}\n{os.readlink(f'/proc/{proc.pid}/exe')}")
        return proc.pid

    def _wait(self, what: str, check: Callable[[], Any], timeout: float, component: str | None = None,
              interval: float = 0.3) -> None:
        def alive_and_ready() -> Any:
            if component and not self._pid_alive(component):
                tail = self.logfile(component).read_text(errors="replace")[-3000:]
                raise ClusterError(f"{component} exited during start-up; last log lines:\n{tail}")
            return check()

        hint = f" (log: {self.logfile(component)})" if component else ""
        poll(what + hint, alive_and_ready, timeout, interval)

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
        return {c: self._pid_alive(c) for c in self.components()}

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
        if self.audit_users:
            self._write_audit_policy()
        self._save()
        self._start_etcd()
        self._start_apiserver()
        self._start_controllers()
        self.ensure_nodes()
        # Pods are refused until the ServiceAccount controller has made the namespace's default SA.
        self._wait("the default ServiceAccount", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False).strip() != "", 60,
            "kube-controller-manager")
        if self.kueue:
            import kueue  # here, not at the top: kueue.py imports this module

            kueue.start(self)
        fleet = f" + {self.fleet_nodes} fleet nodes" if self.fleet_nodes else ""
        log(f"up in {time.monotonic() - t0:.1f}s: {self.server}, {self.nodes} GPU nodes{fleet}; "
            f"export KUBECONFIG={self.kubeconfig}")
        return self

    def _start_etcd(self) -> None:
        p = self.ports
        self._start("etcd", [
            "--name=aidc", f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
            f"--initial-cluster=aidc=http://127.0.0.1:{p['etcd_peer']}",
            "--unsafe-no-fsync",  # a throwaway test store: durability buys nothing, fsync costs seconds
            "--log-level=warn",
        ])

        def etcd_ok() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{p['etcd']}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"

        self._wait("etcd to become healthy", etcd_ok, 30, "etcd")

    def _start_apiserver(self) -> None:
        pki, p = self.pki, self.ports
        self._start("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
            "--bind-address=127.0.0.1", f"--secure-port={p['apiserver']}", "--advertise-address=127.0.0.1",
            f"--cert-dir={self.state_dir / 'apiserver'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            # The default admission chain (ServiceAccount, DefaultTolerationSeconds, PodSecurity, quota,
            # webhooks ...) stays on: tests see what a real cluster does.
            "--endpoint-reconciler-type=none",  # the 'kubernetes' Endpoints cannot point at loopback
            "--profiling=false", "--v=1",
            *self._audit_flags(),
        ])
        self._wait("kube-apiserver /readyz", lambda: self._https_ok(f"{self.server}/readyz", "admin"),
                   90, "kube-apiserver")

    def _start_controllers(self) -> None:
        pki, p, sd = self.pki, self.ports, self.state_dir
        self._start("kube-controller-manager", [
            f"--kubeconfig={sd / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={sd / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={sd / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={p['controller_manager']}",
            f"--cert-dir={sd / 'controller-manager'}",
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            # Node lifecycle: how long a silent node stays Ready. Short here so failure tests are quick.
            f"--node-monitor-grace-period={self.node_monitor_grace_period}", "--node-monitor-period=2s",
            "--horizontal-pod-autoscaler-sync-period=5s",  # default 15 s: tests see HPA status sooner
            "--v=1",
        ])
        self._start("kube-scheduler", [
            f"--kubeconfig={sd / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={sd / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={sd / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={p['scheduler']}", "--leader-elect=false", "--v=1",
        ])
        for name, port in (("kube-controller-manager", p["controller_manager"]),
                           ("kube-scheduler", p["scheduler"])):
            self._wait(f"{name} /healthz", lambda port=port: self._https_ok(f"https://127.0.0.1:{port}/healthz"),
                       60, name)
        for node in self.node_names():
            self.start_node_agent(node)
        if self.fleet_nodes:
            self.start_fleet_agent()

    def _write_audit_policy(self) -> None:
        """Metadata-level events (who, verb, resource, when; no bodies) for audit_users' requests only,
        one per stage after RequestReceived; everyone else's requests are not logged."""
        users = json.dumps(list(self.audit_users))
        self.audit_policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n"
            f"- level: Metadata\n  users: {users}\n- level: None\n"
        )

    def _audit_flags(self) -> list[str]:
        if not self.audit_users:
            return []
        return [
            f"--audit-policy-file={self.audit_policy}", f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json", "--audit-log-mode=blocking",
            # lumberjack rotates at 100 MB when maxsize is 0: make rotation practically never happen.
            "--audit-log-maxsize=1000000", "--audit-log-maxbackup=0", "--audit-log-maxage=0",
        ]

    def start_fleet_agent(self) -> None:
        """ONE kwok process for every fleet node (those annotated kwok.x-k8s.io/node=fleet): node status,
        node Leases (fleet_lease_seconds) and the pods bound to them."""
        assert self.bin_dir is not None
        port = self.ports.setdefault(FLEET, free_port())
        self._save()
        self._start(FLEET, [
            f"--kubeconfig={self.state_dir / 'kwok.kubeconfig'}",
            f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fleet",
            f"--node-lease-duration-seconds={self.fleet_lease_seconds}",
            f"--cidr={self.fleet_pod_cidr}",
            f"--server-address=127.0.0.1:{port}",
        ])
        self._wait("kwok for the fleet nodes", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200, 30, FLEET)

    def identity_kubeconfig(self, user: str) -> Path:
        """A kubeconfig for a client certificate CN=user, O=system:masters signed by the cluster CA, so a
        process (an operator in a benchmark) acts as a cluster admin under a name of its own, which the
        audit log and the apiserver's metrics can tell apart. Written to <state>/<user>.kubeconfig."""
        if user in RESERVED_IDENTITIES or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9:._-]*", user):
            raise ClusterError(f"{user!r} cannot be an identity name (reserved, or not [A-Za-z0-9:._-]+)")
        ca_key = serialization.load_pem_private_key((self.pki / "ca.key").read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate((self.pki / "ca.crt").read_bytes())
        key = new_key()
        cert = issue_cert(x509_name(user, "system:masters"), key, ca.subject, ca_key)
        (self.pki / f"{user}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.pki / f"{user}.key").write_bytes(pem_key(key))
        path = self.state_dir / f"{user}.kubeconfig"
        path.write_text(kubeconfig(self.server, self.pki, user))
        return path

    def start_node_agent(self, node: str) -> None:
        """One kwok process per node, standing in for that node's kubelet: killing it is a node losing
        power (its Lease lapses, the node lifecycle controller marks it Unknown and taints it), starting
        it again is the node coming back."""
        assert self.bin_dir is not None
        port = self.ports.setdefault(f"kwok-{node}", free_port())
        self._save()
        self._start(f"kwok-{node}", [
            f"--kubeconfig={self.state_dir / 'kwok.kubeconfig'}",
            f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            f"--manage-single-node={node}",
            "--node-lease-duration-seconds=10",
            f"--cidr={self.pod_net}.{int(node.rsplit('-', 1)[1]) % 250}.1/24",
            f"--server-address=127.0.0.1:{port}",
        ])
        self._wait(f"kwok for {node}", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200, 30, f"kwok-{node}")

    def stop_node_agent(self, node: str) -> None:
        """The node loses power, all of it before this returns: every process of every pod the development
        kubelet runs there is frozen, the node's kwok is SIGKILLed (no goodbye: its Lease lapses), the
        frozen processes are SIGKILLed and the pods' addresses leave lo. No process of the node runs a
        step after the cut, none exits gracefully, and the kubelet, finding the agent gone first, reports
        nothing for those pods (proctree.py says how a pod's processes are found)."""

        def kill_agent() -> None:
            if pid := self._pid_alive(f"kwok-{node}"):
                os.kill(pid, signal.SIGKILL)
                while self._pid_alive(f"kwok-{node}"):
                    time.sleep(0.01)

        proctree.power_cut(proctree.markers(self.state_dir, node), meanwhile=kill_agent)
        self._drop_pod_addresses(node)

    def _drop_pod_addresses(self, node: str) -> None:
        """Takes the addresses of the node's pods off lo (the kubelet records a pod's node and address in
        its directory). An address kwok gave out again stays on this node: its pod is dead as well."""
        for node_file in (self.state_dir / "pods").glob("*/*/node"):
            with contextlib.suppress(OSError):
                address = node_file.with_name("address").read_text().strip()
                if node_file.read_text().strip() == node and address.startswith(f"{self.pod_net}."):
                    subprocess.run(["ip", "-4", "addr", "del", f"{address}/32", "dev", "lo"],
                                   capture_output=True)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        assert self.bin_dir is not None
        proc = subprocess.run(
            [self._binary("kubectl"), f"--kubeconfig={self.kubeconfig}", "--request-timeout=30s", *args],
            input=input, capture_output=True, text=True, timeout=120,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def node_manifest(self, i: int) -> dict:
        return self._gpu_node(f"gpu-node-{i}", i, "fake", f"10.240.{i // 250}.{i % 250 + 1}")

    def fleet_node_manifest(self, i: int) -> dict:
        """fleet-node-i: the same shape as node_manifest, annotated for kwok-fleet."""
        return self._gpu_node(f"fleet-node-{i}", i, "fleet", f"10.241.{i // 250}.{i % 250 + 1}")

    def _gpu_node(self, name: str, i: int, kwok: str, address: str) -> dict:
        gpus = str(self.gpus_per_node)
        # Pairs of nodes alternate h100, a100 (0,1 h100; 2,3 a100; ...): half of each pool in each zone.
        pool = ("h100", "a100")[i // 2 % 2]
        resources = {"cpu": "96", "memory": "1024Gi", "pods": "110", "nvidia.com/gpu": gpus,
                     "ephemeral-storage": "2Ti"}
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_ANNOTATION: kwok},
                "labels": {
                    "type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    GPU_POOL_LABEL: pool, "nvidia.com/gpu.product": GPU_POOLS[pool],
                    "nvidia.com/gpu.count": gpus, "topology.kubernetes.io/zone": f"zone-{'ab'[i % 2]}",
                },
            },
            "status": {
                "capacity": resources, "allocatable": resources,
                "addresses": [{"type": "InternalIP", "address": address},
                              {"type": "Hostname", "address": name}],
            },
        }

    def ensure_nodes(self, timeout: float = 60) -> None:
        items = "\n".join(json.dumps(self.node_manifest(i)) for i in range(self.nodes))
        self.kubectl("apply", "-f", "-", input=items)
        if not self.fleet_nodes:
            self._wait(f"{self.nodes} nodes Ready", lambda: self.ready_nodes() >= self.nodes, timeout)
            return
        self._create_fleet_nodes()
        total = self.nodes + self.fleet_nodes
        # kwok initialises the fleet one node after another; on 2 busy cores that is tens of nodes a second.
        self._wait(f"{total} nodes Ready", lambda: self.ready_nodes() >= total,
                   timeout + 0.5 * self.fleet_nodes, FLEET, interval=2)

    def _create_fleet_nodes(self, chunk: int = 100, parallel: int = 4) -> None:
        """Creates the fleet nodes that do not exist yet: a few `kubectl create` of a List at a time (no
        last-applied annotation: every watcher of Nodes gets these objects with each heartbeat)."""
        out = self.kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.name}")
        present = set(out.split())
        todo = [self.fleet_node_manifest(i) for i in range(self.fleet_nodes)
                if f"fleet-node-{i}" not in present]
        running: list[subprocess.Popen[str]] = []
        argv = [self._binary("kubectl"), f"--kubeconfig={self.kubeconfig}", "--request-timeout=60s",
                "create", "-f", "-", "-o", "name"]

        def reap(p: subprocess.Popen[str]) -> None:
            _, err = p.communicate(timeout=600)
            if p.returncode != 0 and "AlreadyExists" not in err:
                raise ClusterError(f"creating fleet nodes failed: {err.strip()[-2000:]}")

        for start in range(0, len(todo), chunk):
            if len(running) >= parallel:
                reap(running.pop(0))
            with tempfile.TemporaryFile("w+") as items:  # the child keeps its own descriptor of it
                json.dump({"apiVersion": "v1", "kind": "List", "items": todo[start:start + chunk]}, items)
                items.seek(0)
                running.append(subprocess.Popen(argv, stdin=items, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True))
        for p in running:
            reap(p)

    def ready_nodes(self) -> int:
        if self.fleet_nodes:  # thousands of nodes: let kubectl pick out the one field instead of all JSON
            ready = '{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}'
            out = self.kubectl("get", "nodes", "--chunk-size=500", "-o", f"jsonpath={ready}")
            return out.split().count("True")
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
        return sum(
            1 for n in nodes for c in n.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        )

    def down(self) -> None:
        names = [f.stem for f in (self.state_dir / "pids").glob("*.pid")]
        # Everything else (node agents, the operator, the local kubelet) first, then the control plane
        # from the top down, etcd last.
        rank = {n: i for i, n in enumerate(CONTROL_PLANE)}
        order = sorted(names, key=lambda n: rank.get(n, len(CONTROL_PLANE)), reverse=True)
        for name in order:
            if pid := self._pid_alive(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name in order:
            while (pid := self._pid_alive(name)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._pidfile(name).unlink(missing_ok=True)
        release_pod_addresses(self.pod_net)
        for sub in ("etcd", "pki", "apiserver", "controller-manager", "pids", "pods"):
            shutil.rmtree(self.state_dir / sub, ignore_errors=True)
        for f in ("cluster.json", "kubeconfig", "controller-manager.kubeconfig", "scheduler.kubeconfig",
                  "kwok.kubeconfig", "audit-policy.yaml"):
            (self.state_dir / f).unlink(missing_ok=True)
        for f in self.state_dir.glob("*.kubeconfig"):  # identity_kubeconfig's: their certificates are gone
            f.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status", "build"])
    ap.add_argument("--state-dir", type=Path, default=Path(os.environ.get(
        "AIDC_STATE_DIR", ROOT / ".state" / "cluster")))
    ap.add_argument("--nodes", type=int, default=int(os.environ.get("AIDC_NODES", "4")))
    ap.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("AIDC_GPUS_PER_NODE", "8")))
    ap.add_argument("--node-monitor-grace-period", default=os.environ.get("AIDC_NODE_GRACE", "20s"))
    ap.add_argument("--fleet-nodes", type=int, default=int(os.environ.get("AIDC_FLEET_NODES", "0")),
                    help="more GPU nodes (fleet-node-i), all managed by one kwok process")
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
        elif args.command == "up":
            c = LocalCluster(state, args.nodes, args.gpus_per_node, args.node_monitor_grace_period,
                             fleet_nodes=args.fleet_nodes, fleet_lease_seconds=args.fleet_lease_seconds,
                             **({"kueue": False} if args.no_kueue else {})).up()
            print(c.kubeconfig)
        elif args.command == "down":
            if (state / "cluster.json").exists():
                LocalCluster.load(state).down()
                log(f"stopped the cluster in {state}")
            else:
                log(f"no cluster recorded in {state}")
        else:
            if not (state / "cluster.json").exists():
                log(f"no cluster recorded in {state}")
                return 1
            c = LocalCluster.load(state)
            for name, pid in c.running().items():
                print(f"{name:25} {'running pid ' + str(pid) if pid else 'NOT RUNNING'}")
            print(f"{'apiserver':25} {c.server}  healthy={c.healthy()}")
            print(f"{'kubeconfig':25} {c.kubeconfig}")
            return 0 if c.healthy() else 1
    except ClusterError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
