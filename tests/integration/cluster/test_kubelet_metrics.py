"""The development kubelet's /metrics/resource: a real process tree's CPU and memory from /proc, served over
mutual TLS in the Prometheus text metrics-server parses (no cluster needed)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kubelet_metrics
import proctree
from cluster_pki import write_pki
from cluster_processes import free_port
from tests.kube import wait_for

pytestmark = pytest.mark.slow

# The pod: burns 0.6 s of CPU in a child that then exits, and 0.4 s itself; then idles until killed.
POD = """
import os, sys, time
def burn(s):
    t = time.process_time()
    while time.process_time() - t < s:
        pass
if os.fork() == 0:
    burn(0.6)
    os._exit(0)
os.wait()
burn(0.4)
open(sys.argv[1], "w").close()
time.sleep(600)
"""


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[tuple[kubelet_metrics.PodRef, Path]]:
    markers = proctree.markers(tmp_path, "gpu-node-0", "uid-1")
    done = tmp_path / "burnt"
    proc = subprocess.Popen([sys.executable, "-c", POD, str(done)], env={**os.environ, **markers})
    yield kubelet_metrics.PodRef("team-a", "server-0", "server", "gpu-node-0", markers), done
    proc.kill()
    proc.wait(10)


def scrape(url: str, pki: Path, client_cert: bool = True) -> dict[str, dict[tuple, float]]:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client_cert:
        ctx.load_cert_chain(pki / "admin.crt", pki / "admin.key")
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        text = r.read().decode()
    return {
        f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
        for f in text_string_to_metric_families(text)
    }


def test_serves_the_pod_process_trees_real_cpu_and_memory(pod, tmp_path: Path) -> None:
    ref, done = pod
    pki = tmp_path / "pki"
    write_pki(pki)
    metrics = kubelet_metrics.ResourceMetrics(lambda: [ref])
    port = free_port()
    nodes = {"gpu-node-0": "127.0.0.1", "gpu-node-1": "127.0.0.2"}  # each node at its own address
    ctx = kubelet_metrics.serving_context(pki, tmp_path / "kubelet", list(nodes.values()))
    servers = kubelet_metrics.serve(nodes, port, metrics, ctx)
    try:
        url = f"https://127.0.0.1:{port}/metrics/resource"
        labels = (("container", "server"), ("namespace", "team-a"), ("pod", "server-0"))
        first = scrape(url, pki)  # while the child still burns: the counter must survive its exit
        wait_for("the pod to burn its CPU", done.exists, timeout=120)
        m = scrape(url, pki)
        cpu = m["container_cpu_usage_seconds"][labels]  # the parser drops _total from counters
        # 1.0 s burnt in all (clock ticks round each process's figure down by up to 10 ms).
        assert 0.95 <= cpu < 5, m
        assert cpu >= first["container_cpu_usage_seconds"][labels]
        memory = m["container_memory_working_set_bytes"][labels]
        assert 1 << 20 < memory < 1 << 30  # a Python interpreter's resident set
        assert m["pod_cpu_usage_seconds"][(("namespace", "team-a"), ("pod", "server-0"))] == cpu
        assert m["node_cpu_usage_seconds"][()] == cpu and m["node_memory_working_set_bytes"][()] == memory
        assert m["container_start_time_seconds"][labels] > 1.6e9
        # The other node runs none of the pods: no pod rows, and 0 for the node (metrics-server skips it).
        other = scrape(f"https://127.0.0.2:{port}/metrics/resource", pki)
        assert other["container_cpu_usage_seconds"] == {} and other["node_cpu_usage_seconds"][()] == 0
        # metrics-server's client certificate is required: without one, no figures.
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            scrape(url, pki, client_cert=False)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
