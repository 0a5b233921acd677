"""The development kubelet's pod network (local_kubelet.py): each pod's address, the cluster DNS names in
its environment, and a port space of its own for the ports other pods reach it on.

In a cluster each pod has a network namespace: two jobs' rank-0 pods both listen on 29500 (torchrun's
rendezvous store binds the port on every address). Here every pod shares the host's network namespace
and port space, so the second job's store failed with EADDRINUSE. What a CNI gives (pod IP:port is the
pod's own) this module gives by translation, without privileges:

- Addresses: a pod's address is the IP kwok put in its status, added to lo (needs CAP_NET_ADMIN); without
  it a 127.1.x.y address of its own.
- DNS: `host.subdomain.ns.svc[.cluster.local]` in an environment value becomes the address of the pod with
  that hostname and subdomain (a terminating or finished pod is no endpoint, as in a cluster).
- Ports: a port the target pod declares (containerPort) becomes a host port of this machine (HostPorts),
  one per (target pod, container port), the same for every pod that names that target: in
  `name:port` values (PET_RDZV_ENDPOINT) and in `X_PORT` variables whose `X_ADDR` or `X_HOST` names the
  pod (MASTER_ADDR/MASTER_PORT, PET_MASTER_ADDR/PET_MASTER_PORT). The target pod itself (rank 0 names
  itself as master) gets the same translation, so it binds the port its peers connect to. A new pod (a
  new attempt's rank 0) gets a new port; a port is handed back once its pod is gone and no pod that named
  it still runs. A port nothing names this way (the trainer's metrics port, a server's port reached by
  the pod proxy) is not translated and stays shared.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pod_addresses import add_loopback_address, remove_loopback_address

Pod = dict[str, Any]
DNS_NAME = re.compile(
    r"\b([a-z0-9-]+)\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?\b(?::(\d{1,5})\b)?"
)


class NotYet(Exception):
    """The pod cannot start in this sync (a pod it names has no IP yet); try again in the next."""


def find_pod(pods: Iterable[Pod], host: str, subdomain: str, namespace: str) -> Pod | None:
    """The pod a headless Service's DNS name resolves to: terminating and finished pods are no endpoints."""
    for p in pods:
        spec, meta = p["spec"], p["metadata"]
        if (
            meta["namespace"] == namespace
            and spec.get("hostname") == host
            and spec.get("subdomain") == subdomain
            and not meta.get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ):
            return p
    return None


def container_ports(pod: Pod) -> set[int]:
    return {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []}


def rewrite_env(
    env: dict[str, str],
    pods: list[Pod],
    address_of: Callable[[Pod], str],
    host_port: Callable[[Pod, int], int],
) -> dict[str, str]:
    """env with pod DNS names → addresses and the named pods' declared ports → their host ports."""

    def target(m: re.Match[str]) -> Pod | None:
        return find_pod(pods, m.group(1), m.group(2), m.group(3))

    def repl(m: re.Match[str]) -> str:
        pod = target(m)
        if pod is None:
            return m.group(0)
        out = address_of(pod)
        if m.group(4) is not None:
            port = int(m.group(4))
            out += f":{host_port(pod, port) if port in container_ports(pod) else port}"
        return out

    out = {k: DNS_NAME.sub(repl, v) for k, v in env.items()}
    for name, value in env.items():
        if not name.endswith("_PORT") or not value.isdigit():
            continue
        for partner in (name[: -len("PORT")] + "ADDR", name[: -len("PORT")] + "HOST"):
            m = DNS_NAME.fullmatch(env.get(partner, ""))
            if m and m.group(4) is None and (pod := target(m)) and int(value) in container_ports(pod):
                out[name] = str(host_port(pod, int(value)))
                break
    return out


def _port_free(port: int) -> bool:
    """Nothing listens on the port on any address (nor lingers on it) right now."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


class HostPorts:
    """Host ports handed out for (pod, container port), one file per port in `dir` naming its owner
    (`ns/uid/port`): created exclusively, so the kubelets sharing a state dir (one per test namespace)
    never hand out one port twice, and a restarted kubelet finds what it handed out. Ports come from below
    the ephemeral range, so no outgoing connection takes one between its allocation and its bind."""

    def __init__(self, dir: Path, low: int = 20000, high: int | None = None) -> None:
        self.dir, self.low = dir, low
        self.high = high if high is not None else max(low + 1000, min(32768, _ephemeral_low()))
        dir.mkdir(parents=True, exist_ok=True)

    def owners(self) -> dict[int, str]:
        out = {}
        for f in self.dir.iterdir():
            with contextlib.suppress(OSError, ValueError):
                out[int(f.name)] = f.read_text()
        return out

    def get(self, namespace: str, uid: str, port: int) -> int:
        owner = f"{namespace}/{uid}/{port}"
        for host, who in self.owners().items():
            if who == owner:
                return host
        span = self.high - self.low
        start = zlib.crc32(owner.encode()) % span  # spread, so kubelets seldom try the same port first
        for i in range(span):
            host = self.low + (start + i) % span
            if not _port_free(host):
                continue
            try:
                fd = os.open(self.dir / str(host), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(owner)
            return host
        raise RuntimeError(f"no free host port in {self.low}-{self.high}")

    def release(self, gone: Callable[[str, str], bool]) -> list[int]:
        """Drops the ports whose pod (namespace, uid) is gone; returns them."""
        dropped = []
        for host, owner in self.owners().items():
            parts = owner.split("/")
            if len(parts) == 3 and gone(parts[0], parts[1]):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / str(host)).unlink()
                dropped.append(host)
        return dropped


class Addresses:
    """Pod addresses on lo: kwok's pod IPs where we may add addresses, else 127.1.x.y of our own."""

    def __init__(self, pod_net: str, label: str) -> None:
        self.pod_net, self.label = pod_net, label
        self.fallback: dict[str, str] = {}  # "ns/pod" -> loopback address
        self.pod_ips = self._can_add()

    def _can_add(self) -> bool:
        probe = f"{self.pod_net}.255.254"
        if add_loopback_address(probe, self.label) is not None:
            return False
        remove_loopback_address(probe)
        return True

    def of(self, pod: Pod) -> str:
        """The pod's IP from its status (kwok's); in fallback mode a loopback address of its own."""
        if self.pod_ips:
            ip = (pod.get("status") or {}).get("podIP")
            if not ip:
                raise NotYet(f"pod {pod['metadata']['name']} has no IP yet")
            return str(ip)
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        if key not in self.fallback:
            n = len(self.fallback) + 1
            self.fallback[key] = f"127.1.{n // 250}.{n % 250 + 1}"
        return self.fallback[key]

    def claim(self, address: str) -> None:
        # "exists" is fine: a kubelet restarted over running pods finds its addresses still there
        if self.pod_ips:
            add_loopback_address(address, self.label)

    def release(self, address: str) -> None:
        if self.pod_ips:
            remove_loopback_address(address)
