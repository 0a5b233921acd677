"""Pod addresses of the local cluster.

kwok gives each pod an IP from its node's --cidr; the development kubelet (local_kubelet.py) puts that
IP on the loopback device so the pod's processes listen where the API says the pod is. That is what
lets the apiserver's pod proxy reach them: it refuses 127.0.0.0/8 but not a 10.x address on lo.
"""

from __future__ import annotations

import contextlib
import random
import re
import subprocess
from pathlib import Path


def add_loopback_address(address: str, label: str) -> str | None:
    """Puts ADDRESS/32 on lo under LABEL. None when it is there now (also when it was already: a
    restarted kubelet finds its pods' addresses, another cluster may share a node address); else why
    not (without CAP_NET_ADMIN, or without `ip`)."""
    try:
        cmd = ["ip", "-4", "addr", "add", f"{address}/32", "dev", "lo", "label", label]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        return str(e)
    if proc.returncode == 0 or "File exists" in proc.stderr:
        return None
    return proc.stderr.strip() or f"ip exited with {proc.returncode}"


def remove_loopback_address(address: str) -> None:
    with contextlib.suppress(OSError):
        subprocess.run(["ip", "-4", "addr", "del", f"{address}/32", "dev", "lo"], capture_output=True)


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


def node_pod_cidr(pod_net: str, node: str) -> str:
    """The --cidr of the kwok agent of NODE (gpu-node-i): {pod_net}.{i % 250}.1/24."""
    return f"{pod_net}.{int(node.rsplit('-', 1)[1]) % 250}.1/24"


def fleet_pod_cidr(pod_net: str) -> str:
    """kwok-fleet's --cidr. The per-node agents draw from {pod_net}.{i % 250}.1/24 and the local
    kubelet probes {pod_net}.255.254, which leaves 1.5 k addresses of this cluster's 10.K/16: too few
    for 1,000 nodes x 8 pods. So the fleet takes a /16 of the RFC 6598 shared space 100.64.0.0/10,
    which no per-node range (always 10/8) can reach, chosen by K as pod_net is."""
    return f"100.{64 + int(pod_net.split('.')[1]) % 64}.0.1/16"


def release_pod_addresses(pod_net: str) -> None:
    """Takes every address of this cluster's pods off lo."""
    with contextlib.suppress(OSError):
        subprocess.run(
            ["ip", "-4", "addr", "flush", "dev", "lo", "label", pod_address_label(pod_net)],
            capture_output=True,
        )


def drop_node_pod_addresses(state_dir: Path, pod_net: str, node: str) -> None:
    """Takes the addresses of NODE's pods off lo (the kubelet records a pod's node and address in
    its directory). An address kwok gave out again stays on this node: its pod is dead as well."""
    for node_file in (state_dir / "pods").glob("*/*/node"):
        with contextlib.suppress(OSError):
            address = node_file.with_name("address").read_text().strip()
            if node_file.read_text().strip() == node and address.startswith(f"{pod_net}."):
                remove_loopback_address(address)
