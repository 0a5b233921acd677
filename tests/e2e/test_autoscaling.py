"""Autoscaling on load, for real: model-server pods run by the development kubelet, their CPU read from
/proc and served at each node's /metrics/resource, scraped by metrics-server v0.8.0 (built from its Go
module), read by kube-controller-manager's HPA through the aggregated metrics.k8s.io API. A closed-loop
HTTP client drives the Deployment from 1 replica to 2 or more; once it stops, the HPA scales back to 1.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

import metrics_server
from tests.e2e.helpers import hostpath_claim
from tests.e2e.test_train_recover_serve import train_into
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
CLIENTS = 4  # concurrent connections of the load


class Load:
    """CLIENTS threads, each sending the next request as soon as the last is answered, round-robin over
    the ready replicas (what the Service would do; ready_hosts() is asked again every second)."""

    def __init__(self, body: bytes, ready_hosts: Callable[[], list[str]]) -> None:
        self.body, self.ready_hosts, self.hosts = body, ready_hosts, list[str]()
        self.stop, self.answered, self.errors = threading.Event(), 0, 0
        self.by_host: collections.Counter[str] = collections.Counter()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        self.threads.append(threading.Thread(target=self._refresh, daemon=True))

    def _refresh(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # an API hiccup: keep the last list
                self.hosts = self.ready_hosts()
            self.stop.wait(1)

    def _client(self) -> None:
        for i in itertools.count():
            if self.stop.is_set():
                return
            hosts = self.hosts
            if not hosts:
                self.stop.wait(0.2)
                continue
            host = hosts[i % len(hosts)]
            req = urllib.request.Request(
                f"http://{host}:8080/v2/models/mlp/infer",
                data=self.body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
                self.answered += 1
                self.by_host[host] += 1
            except OSError:  # a replica going away while scaling: the next request goes elsewhere
                self.errors += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.mark.timeout(1500)  # metrics-server's first build, two replicas' start-up, two HPA decisions
def test_cpu_load_scales_the_deployment_up_and_back_down(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    if kube.local is None:
        pytest.skip("needs the project's local cluster (metrics-server runs as one of its processes)")
    metrics_server.start(kube.local)
    models = tmp_path / "pv"
    train_into(models, 5)
    hostpath_claim(kube, namespace, "models", models)
    kube.create_cr(
        "InferenceService",
        namespace,
        "auto",
        {
            "model": {
                "name": "mlp",
                "storage": {"volume": {"persistentVolumeClaim": {"claimName": "models"}}},
            },
            "replicas": {"min": 1, "max": 3, "metric": "cpu", "targetCpuUtilization": 50},
            "resources": {"requests": {"cpu": "200m"}},
        },
    )

    def ready_hosts() -> list[str]:
        hosts = []
        for pod in kube.pods(namespace, "aidc.dev/inferenceservice=auto"):
            conds = {c.type: c.status for c in (pod.status.conditions or [])}
            addr = kubelet / pod.metadata.name / "address"
            if conds.get("Ready") == "True" and addr.exists() and not pod.metadata.deletion_timestamp:
                hosts.append(addr.read_text())
        return hosts

    (host,) = wait_for("one ready model server", ready_hosts, timeout=180, interval=1)
    pod = kube.pods(namespace, "aidc.dev/inferenceservice=auto")[0]
    if host != pod.status.pod_ip:
        pytest.skip("the development kubelet cannot add addresses to lo (needs CAP_NET_ADMIN)")
    meta = json.load(urllib.request.urlopen(f"http://{host}:8080/v2/models/mlp", timeout=10))
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": meta["inputs"][0]["name"],
                    "shape": [64, 10],
                    "datatype": "FP32",
                    "data": [0.1] * 640,
                }
            ]
        }
    ).encode()

    def rescales() -> list[str]:
        events = kube.core.list_namespaced_event(
            namespace, field_selector="involvedObject.kind=HorizontalPodAutoscaler"
        )
        return [e.message for e in events.items if e.reason == "SuccessfulRescale"]

    def replicas() -> int:
        return kube.apps.read_namespaced_deployment("auto", namespace).spec.replicas or 0

    def pod_cpu() -> dict[str, str]:
        out = kube.kubectl("get", "--raw", f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods").stdout
        return {p["metadata"]["name"]: p["containers"][0]["usage"]["cpu"] for p in json.loads(out)["items"]}

    # The pipeline serves the replica's figures before any load: metrics.k8s.io knows the pod.
    wait_for(
        "metrics.k8s.io figures of the replica",
        lambda: pod.metadata.name in pod_cpu(),
        timeout=120,
        interval=2,
    )
    assert replicas() == 1
    with Load(body, ready_hosts) as load:
        wait_for("the HPA to scale up under load", lambda: replicas() >= 2, timeout=300, interval=2)
        # What it scaled on, in the HPA's own words: the replicas' real CPU over the target.
        wait_for(
            "the HPA's reason: CPU utilisation above target",
            lambda: any(
                "cpu resource utilization (percentage of request) above target" in m for m in rescales()
            ),
            timeout=60,
        )
        # The new replicas start, pass their readiness probe and take a share of the load.
        wait_for("a second ready replica", lambda: len(ready_hosts()) >= 2, timeout=240, interval=2)
        wait_for(
            "a new replica answering requests",
            lambda: any(load.by_host[h] > 0 for h in ready_hosts() if h != host),
            timeout=120,
        )
    assert load.answered > 0
    # Idle again: after the (shortened, component_args.py) downscale stabilisation it goes back to min.
    wait_for("the HPA to scale back down to 1", lambda: replicas() == 1, timeout=300, interval=2)
    wait_for(
        "the HPA's reason: all metrics below target", lambda: any("below target" in m for m in rescales())
    )
