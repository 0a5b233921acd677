"""The development kubelet's resource metrics endpoint: `/metrics/resource`, what metrics-server scrapes.

A real kubelet reads its figures from the containers' cgroups; here a pod is a tree of local processes
(proctree.py), so the figures are that tree's, read from /proc at each scrape:

- CPU: utime + stime of every live process of the pod and of the children they reaped (cutime, cstime),
  plus the last figure of each process gone that no process of the pod reaped (so the counter never goes
  backwards, as a cgroup's does not) — core-seconds;
- memory working set: the sum of the processes' resident set size (VmRSS; shared pages are counted in
  each process, so this is an upper bound of what a cgroup would report);
- start time: the pod's main process's start time.

The node figures are the sums over the node's pods (a kwok node has no machine of its own); a node
running no pod reports 0, which metrics-server skips as incomplete, as it does for a real node without
figures. It is served over HTTPS with mutual TLS (a client certificate from the cluster CA, as
metrics-server presents from its kubeconfig), on the node's InternalIP (added to lo) and the port the
node advertises in status.daemonEndpoints.kubeletEndpoint.Port — metrics-server's
--kubelet-use-node-status-port reads it there.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client

import proctree
from cluster_pki import issue_cert, new_key, pem_key, x509_name
from cluster_processes import free_port
from pod_addresses import add_loopback_address, remove_loopback_address

if TYPE_CHECKING:
    from localcluster import LocalCluster

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
log = logging.getLogger("local-kubelet")
NODE_ADDRESS_LABEL = "lo:aidcnode"  # marks the node addresses the kubelet put on lo


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    container: str
    node: str
    markers: dict[str, str] = field(hash=False, compare=False)  # proctree's: finds its processes


@dataclass
class Sample:
    cpu_seconds: float
    memory_bytes: int
    start_time: float


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


BOOT_TIME = _boot_time()


@dataclass
class Proc:
    cpu: float  # seconds: its own, and that of its children it has reaped (cutime, cstime)
    ppid: int
    rss: int  # bytes
    start: float  # seconds since the epoch


def _proc(pid: int) -> Proc | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state) of proc(5): ppid 4, utime..cstime 14-17, starttime 22, rss 24.
    cpu = sum(int(f) for f in fields[11:15]) / CLK_TCK
    return Proc(cpu, int(fields[1]), int(fields[21]) * PAGE, BOOT_TIME + int(fields[19]) / CLK_TCK)


@dataclass
class PodCounter:
    """One pod's cumulative CPU across processes that come and go. A child reaped by a process of the
    pod is in that parent's cutime/cstime; one whose parent is not the pod's (the pod's main process,
    reaped by the kubelet; an orphan) is kept at its last figure, so the counter never goes back."""

    last: dict[int, Proc] = field(default_factory=dict)  # at the last scrape
    exited: float = 0.0  # cpu seconds of processes gone since that no parent of the pod accounts for

    def sample(self, pids: Iterable[int]) -> Sample | None:
        now = {pid: p for pid in pids if (p := _proc(pid)) is not None}
        memory = sum(p.rss for p in now.values())
        start = min((p.start for p in now.values()), default=0.0)
        self.exited += sum(p.cpu for pid, p in self.last.items() if pid not in now and p.ppid not in now)
        self.last = now
        if not now:
            return None
        return Sample(self.exited + sum(p.cpu for p in now.values()), memory, start)


def render(node: str, pods: dict[PodRef, Sample], now: float) -> str:
    """The Prometheus text a kubelet serves at /metrics/resource, for NODE's pods."""
    ts = int(now * 1000)
    mine = {p: s for p, s in pods.items() if p.node == node}
    out: list[str] = []

    def family(name: str, kind: str, doc: str, rows: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} [STABLE] {doc}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value!r} {ts}" for labels, value in rows)

    def labels(p: PodRef, container: bool = True) -> str:
        c = f'container="{p.container}",' if container else ""
        return f'{{{c}namespace="{p.namespace}",pod="{p.name}"}}'

    family(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
        [(labels(p), s.cpu_seconds) for p, s in mine.items()],
    )
    family(
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set of the container in bytes",
        [(labels(p), float(s.memory_bytes)) for p, s in mine.items()],
    )
    family(
        "container_start_time_seconds",
        "gauge",
        "Start time of the container since unix epoch in seconds",
        [(labels(p), s.start_time) for p, s in mine.items()],
    )
    family(
        "node_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
        [("", sum(s.cpu_seconds for s in mine.values()))],
    )
    family(
        "node_memory_working_set_bytes",
        "gauge",
        "Current working set of the node in bytes",
        [("", float(sum(s.memory_bytes for s in mine.values())))],
    )
    family(
        "pod_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the pod in core-seconds",
        [(labels(p, False), s.cpu_seconds) for p, s in mine.items()],
    )
    family(
        "pod_memory_working_set_bytes",
        "gauge",
        "Current working set of the pod in bytes",
        [(labels(p, False), float(s.memory_bytes)) for p, s in mine.items()],
    )
    family(
        "resource_scrape_error", "gauge", "1 if there was an error while getting container metrics", [("", 0)]
    )
    return "\n".join(out) + "\n"


class ResourceMetrics:
    """Samples the pods the kubelet runs (pods() lists them) and serves each node's figures."""

    def __init__(self, pods: Callable[[], list[PodRef]]) -> None:
        self.pods = pods
        self.counters: dict[tuple[str, str], PodCounter] = {}
        self.lock = threading.Lock()

    def scrape(self, node: str) -> str:
        with self.lock:  # one /proc walk at a time; counters are shared by all nodes' servers
            refs = self.pods()
            samples: dict[PodRef, Sample] = {}
            for ref in (r for r in refs if r.node == node):
                counter = self.counters.setdefault((ref.namespace, ref.name), PodCounter())
                if (s := counter.sample(proctree.find(ref.markers))) is not None:
                    samples[ref] = s
            live = {(r.namespace, r.name) for r in refs}
            self.counters = {k: v for k, v in self.counters.items() if k in live}
            return render(node, samples, time.time())


def serving_context(pki: Path, out: Path, addresses: list[str]) -> ssl.SSLContext:
    """TLS for the endpoint: a serving cert for ADDRESSES from the cluster CA (written to OUT), client
    certificates required and checked against the same CA."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = new_key()
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = issue_cert(x509_name("aidc-dev-kubelet"), key, ca.subject, ca_key, server=True, sans=sans)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kubelet.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "kubelet.key").write_bytes(pem_key(key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(out / "kubelet.crt", out / "kubelet.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def add_node_address(address: str) -> bool:
    """Puts ADDRESS on lo (another cluster's kubelet may have done so already); False without privilege."""
    return add_loopback_address(address, NODE_ADDRESS_LABEL) is None


class _Handler(BaseHTTPRequestHandler):
    server: _NodeServer

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics/resource":
            self.send_error(404)
            return
        body = self.server.metrics.scrape(self.server.node).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:  # one scrape per node every few seconds: not worth a line
        pass


class _NodeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: str, port: int, node: str, metrics: ResourceMetrics, ctx: ssl.SSLContext):
        super().__init__((address, port), _Handler)
        self.node, self.metrics = node, metrics
        # The handshake happens on the handler's first read, in its own thread: a client that connects
        # and says nothing must not block the accept loop.
        self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)


def serve(
    nodes: dict[str, str], port: int, metrics: ResourceMetrics, ctx: ssl.SSLContext
) -> list[ThreadingHTTPServer]:
    """One HTTPS server per node (name -> InternalIP) on PORT, each in a daemon thread."""
    servers: list[ThreadingHTTPServer] = []
    for node, address in nodes.items():
        s = _NodeServer(address, port, node, metrics, ctx)
        threading.Thread(target=s.serve_forever, name=f"metrics-{node}", daemon=True).start()
        servers.append(s)
    return servers


class NodeEndpoints:
    """The kubelet's side of each node: its InternalIP on lo, an HTTPS server there, and the port in
    the node's status (re-asserted now and then: kwok re-initialises a node's status when it comes back,
    and another cluster's kubelet stopping may have taken a shared node address off lo)."""

    RECHECK_SECONDS = 10.0

    def __init__(
        self, core: client.CoreV1Api, cluster: LocalCluster, pods: Callable[[], list[PodRef]]
    ) -> None:
        self.core, self.port, self.next_check = core, free_port(), 0.0
        self.addresses: dict[str, str] = {}
        self.servers: list[ThreadingHTTPServer] = []
        self.ok = False
        try:  # the kubelet runs pods without it: a failure here costs the metrics, nothing else
            for n in cluster.node_names():
                if address := _internal_ip(core.read_node(n)):
                    self.addresses[n] = address
            if not all(add_node_address(a) for a in self.addresses.values()):
                log.warning("cannot add node addresses to lo (needs CAP_NET_ADMIN): no /metrics/resource")
                return
            ctx = serving_context(
                cluster.pki, cluster.state_dir / "kubelet", sorted(set(self.addresses.values()))
            )
            self.servers = serve(self.addresses, self.port, ResourceMetrics(pods), ctx)
            self.ok = True
            log.info("serving /metrics/resource on port %d of %s", self.port, sorted(self.addresses.values()))
        except (OSError, client.ApiException) as e:
            log.warning("no /metrics/resource: %s", e)

    def maintain(self) -> None:
        if not self.ok or time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + self.RECHECK_SECONDS
        for node, address in self.addresses.items():
            add_node_address(address)
            try:
                status = self.core.read_node_status(node).status
                ep = status.daemon_endpoints.kubelet_endpoint if status.daemon_endpoints else None
                if ep is None or ep.port != self.port:
                    body = {"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}}}}
                    self.core.patch_node_status(node, body)
            except client.ApiException as e:  # a node deleted meanwhile, an API hiccup: next round
                log.warning("cannot advertise the metrics port of %s: API error %s", node, e.status)

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()
        for address in set(self.addresses.values()):
            remove_loopback_address(address)


def _internal_ip(node: client.V1Node) -> str | None:
    for a in node.status.addresses or []:
        if a.type == "InternalIP":
            return a.address
    return None
