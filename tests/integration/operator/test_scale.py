"""Fifty TrainingJobs on fifty kwok GPU nodes, on a control plane of their own: the operator's cache and
queue at a size where a per-job poll would show. Not timed: every wait is on a condition.

- no rank of any job ever has two live pods (a watch sees every pod from the start);
- once all jobs run, the operator sends (almost) no request: steady state reads the cache;
- a change to one node wakes exactly the jobs with pods on it;
- an operator killed with SIGKILL and started again re-converges with no pod deleted or created.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import watch

from cluster_processes import free_port
from localcluster import LocalCluster
from tests.conftest import OperatorProcess
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
JOBS, NODES, RANKS = 50, 50, 4


@pytest.fixture(scope="module")
def fleet() -> Iterator[Kube]:
    if os.environ.get("KUBECONFIG"):
        pytest.skip("needs a control plane of its own with 50 fleet nodes (KUBECONFIG names another)")
    state = ROOT / ".state" / f"scale-cluster-{os.getpid()}"
    local = LocalCluster(state, nodes=1, fleet_nodes=NODES - 1, fleet_lease_seconds=40).up(timeout=300)
    assert local.bin_dir is not None
    kube = Kube(local.kubeconfig, str(local.bin_dir / "kubectl"), local)
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kube.wait_crds("trainingjobs.aidc.dev", "inferenceservices.aidc.dev")
    try:
        yield kube
    finally:
        local.down()
        shutil.rmtree(state, ignore_errors=True)


class PodLedger:
    """Every pod of the namespace as a watch sees it; remembers the most live pods any rank ever had."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self.live: dict[tuple[str, str], set[str]] = {}
        self.max_live = 0
        self.uids: set[str] = set()  # every pod ever seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # Each stream starts with the namespace's current pods: begin from exactly those.
            self.live.clear()
            try:
                self._stream()
            except Exception:  # the stream broke (teardown, an apiserver hiccup): list and watch again
                if self._stop.is_set():
                    return
                time.sleep(0.5)

    def _stream(self) -> None:
        w = watch.Watch()
        for event in w.stream(
            self.kube.core.list_namespaced_pod, self.namespace, timeout_seconds=30, _request_timeout=60
        ):
            pod = event["object"]
            labels = pod.metadata.labels or {}
            rank = (labels.get("aidc.dev/job-name", "?"), labels.get("aidc.dev/node-rank", "?"))
            pods = self.live.setdefault(rank, set())
            if event["type"] == "DELETED":
                pods.discard(pod.metadata.uid)
            elif pod.metadata.uid not in pods:
                pods.add(pod.metadata.uid)
                self.uids.add(pod.metadata.uid)
                self.max_live = max(self.max_live, len(pods))
            if self._stop.is_set():
                return

    def stop(self) -> None:
        self._stop.set()


def metric(port: int, name: str, exclude: tuple[str, ...] = ()) -> float:
    """The sum of a counter's series (skipping series whose labels contain any of `exclude`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not any(x in line for x in exclude):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled(port: int, name: str, quiet: float = 3.0, timeout: float = 180) -> float:
    """The counter's value once it has not moved for `quiet` seconds."""
    last, since = metric(port, name), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = metric(port, name)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError(f"{name} kept moving for {timeout}s")


def start_operator(kube: Kube, namespace: str, log: Path, port: int) -> OperatorProcess:
    op = OperatorProcess(kube, log, [namespace], ["--metrics-port", str(port)])
    os.environ["AIDC_RESYNC_SECONDS"] = "3600"  # no safety resync inside the test's windows
    try:
        return op.start()
    finally:
        del os.environ["AIDC_RESYNC_SECONDS"]


def phases(kube: Kube, namespace: str) -> dict[str, str]:
    jobs = kube.custom.list_namespaced_custom_object("aidc.dev", "v1alpha1", namespace, "trainingjobs")[
        "items"
    ]
    return {j["metadata"]["name"]: (j.get("status") or {}).get("phase", "") for j in jobs}


def test_fifty_jobs_hold_steady_wake_precisely_and_survive_an_operator_restart(
    fleet: Kube, tmp_path: Path
) -> None:
    kube = fleet
    ns = kube.create_namespace("fifty", prefix="scale")
    ledger = PodLedger(kube, ns)
    port = free_port()
    op = start_operator(kube, ns, tmp_path / "operator.log", port)
    try:
        for i in range(JOBS):
            kube.create_cr(
                "TrainingJob",
                ns,
                f"job-{i:02d}",
                {
                    "nodes": RANKS,
                    "gpusPerNode": 1,
                    "command": ["python", "-m", "aidc_trainer", "--example", "mlp"],
                },
            )
        wait_for(
            f"all {JOBS} jobs Running",
            lambda: list(phases(kube, ns).values()).count("Running") == JOBS,
            timeout=600,
            interval=2,
        )
        assert ledger.max_live == 1, "a rank had two live pods at once"
        assert len(ledger.uids) == JOBS * RANKS

        # Steady state: everything below reads the cache; watches reconnecting are not passes' doing.
        settled(port, "aidc_reconcile_passes_total")
        before = metric(port, "aidc_api_requests_total", exclude=('verb="watch"',))
        time.sleep(30)
        after = metric(port, "aidc_api_requests_total", exclude=('verb="watch"',))
        assert after - before <= 3, f"{after - before:.0f} requests in 30 s with nothing changing"

        # A harmless change to one node (a taint a health verdict reads) wakes only the jobs on it.
        pods = kube.pods(ns)
        node = pods[0].spec.node_name
        on_node = {p.metadata.labels["aidc.dev/job-name"] for p in pods if p.spec.node_name == node}
        passes = settled(port, "aidc_reconcile_passes_total")
        kube.kubectl("taint", "node", node, "aidc.dev/scale-test=yes:PreferNoSchedule", "--overwrite")
        woken = settled(port, "aidc_reconcile_passes_total") - passes
        kube.kubectl("taint", "node", node, "aidc.dev/scale-test-")
        assert woken == len(on_node), f"{woken:.0f} passes for a node hosting {len(on_node)} job(s)"

        # kill -9 and start again: the new operator rebuilds its cache and changes nothing.
        uids = {p.metadata.uid for p in kube.pods(ns)}
        op.kill()
        op = start_operator(kube, ns, tmp_path / "operator-2.log", port)
        assert settled(port, "aidc_reconcile_passes_total") >= JOBS  # every job looked at again
        assert {p.metadata.uid for p in kube.pods(ns)} == uids
        assert set(phases(kube, ns).values()) == {"Running"}
        assert ledger.max_live == 1 and len(ledger.uids) == JOBS * RANKS
        assert "Traceback" not in op.log()
    finally:
        ledger.stop()
        op.stop()
        kube.delete_namespace(ns)
