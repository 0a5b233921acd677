"""Autoscaling on load, for real, on both metrics an InferenceService offers. cpu: model-server pods run
by the development kubelet, their CPU read from /proc and served at each node's /metrics/resource,
scraped by metrics-server v0.8.0 (built from its Go module), read by kube-controller-manager's HPA through
the aggregated metrics.k8s.io API. inflight: the server's own gauge through Prometheus and
prometheus-adapter (custom_metrics.py) as custom.metrics.k8s.io. In each, a closed-loop HTTP client
drives the Deployment from 1 replica to 2 or more; once it stops, the HPA scales back to 1.
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
from typing import Any

import pytest

import custom_metrics
import metrics_server
from aidc_operator.builders.inferenceservice import INFLIGHT_METRIC
from tests.e2e.helpers import hostpath_claim
from tests.e2e.test_train_recover_serve import train_into
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROWS = 2048  # rows per request of the in-flight load: ~200 KB of JSON each way


class Load:
    """`clients` threads, each sending the next request as soon as the last is answered, round-robin over the
    ready replicas (what the Service would do; ready_hosts() is asked again every second)."""

    def __init__(self, body: bytes, ready_hosts: Callable[[], list[str]], clients: int) -> None:
        self.body, self.ready_hosts, self.hosts = body, ready_hosts, list[str]()
        self.stop, self.answered, self.errors = threading.Event(), 0, 0
        self.by_host: collections.Counter[str] = collections.Counter()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
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


class Served:
    """InferenceService `auto` serving the trainer's MLP from a volume on the development kubelet, with the
    given replicas and extra spec; what the tests read of it."""

    def __init__(
        self, kube: Kube, namespace: str, kubelet: Path, tmp_path: Path, spec: dict[str, Any]
    ) -> None:
        self.kube, self.namespace, self.kubelet = kube, namespace, kubelet
        models = tmp_path / "pv"
        train_into(models, 5)
        hostpath_claim(kube, namespace, "models", models)
        model = {"name": "mlp", "storage": {"volume": {"persistentVolumeClaim": {"claimName": "models"}}}}
        kube.create_cr("InferenceService", namespace, "auto", {"model": model, **spec})
        (self.host,) = wait_for("one ready model server", self.ready_hosts, timeout=180, interval=1)
        self.pod = kube.pods(namespace, "aidc.dev/inferenceservice=auto")[0]
        if self.host != self.pod.status.pod_ip:
            pytest.skip("the development kubelet cannot add addresses to lo (needs CAP_NET_ADMIN)")
        meta = json.load(urllib.request.urlopen(f"http://{self.host}:8080/v2/models/mlp", timeout=10))
        self.input_name = meta["inputs"][0]["name"]

    def body(self, rows: int) -> bytes:
        """A JSON inference request of ROWS rows."""
        tensor = {"name": self.input_name, "shape": [rows, 10], "datatype": "FP32", "data": [0.1] * rows * 10}
        return json.dumps({"inputs": [tensor]}).encode()

    def ready_hosts(self) -> list[str]:
        hosts = []
        for pod in self.kube.pods(self.namespace, "aidc.dev/inferenceservice=auto"):
            conds = {c.type: c.status for c in (pod.status.conditions or [])}
            addr = self.kubelet / pod.metadata.name / "address"
            if conds.get("Ready") == "True" and addr.exists() and not pod.metadata.deletion_timestamp:
                hosts.append(addr.read_text())
        return hosts

    def rescales(self) -> list[str]:
        events = self.kube.core.list_namespaced_event(
            self.namespace, field_selector="involvedObject.kind=HorizontalPodAutoscaler"
        )
        return [e.message for e in events.items if e.reason == "SuccessfulRescale"]

    def replicas(self) -> int:
        return self.kube.apps.read_namespaced_deployment("auto", self.namespace).spec.replicas or 0

    def scale_up_and_down(self, load: Load, reason: str) -> None:
        """Under LOAD: ≥ 2 replicas for REASON (the HPA's own words), a new replica answering; after it,
        back to 1 with every metric below target."""
        with load:
            wait_for("the HPA to scale up under load", lambda: self.replicas() >= 2, timeout=300, interval=2)
            wait_for(f"the HPA's reason: {reason}", lambda: any(reason in m for m in self.rescales()))
            # The new replicas start, pass their readiness probe and take a share of the load.
            wait_for("a second ready replica", lambda: len(self.ready_hosts()) >= 2, timeout=240, interval=2)
            wait_for(
                "a new replica answering requests",
                lambda: any(load.by_host[h] > 0 for h in self.ready_hosts() if h != self.host),
                timeout=120,
            )
        assert load.answered > 0
        # Idle again: after the (shortened, component_args.py) downscale stabilisation it goes back to min.
        wait_for("the HPA to scale back down to 1", lambda: self.replicas() == 1, timeout=300, interval=2)
        wait_for(
            "the HPA's reason: all metrics below target",
            lambda: any("below target" in m for m in self.rescales()),
        )


@pytest.mark.timeout(1500)  # metrics-server's first build, two replicas' start-up, two HPA decisions
def test_cpu_load_scales_the_deployment_up_and_back_down(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    if kube.local is None:
        pytest.skip("needs the project's local cluster (metrics-server runs as one of its processes)")
    metrics_server.start(kube.local)
    spec = {
        "replicas": {"min": 1, "max": 3, "metric": "cpu", "targetCpuUtilization": 50},
        "resources": {"requests": {"cpu": "200m"}},
    }
    served = Served(kube, namespace, kubelet, tmp_path, spec)

    def pod_cpu() -> dict[str, str]:
        out = kube.kubectl("get", "--raw", f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods").stdout
        return {p["metadata"]["name"]: p["containers"][0]["usage"]["cpu"] for p in json.loads(out)["items"]}

    # The pipeline serves the replica's figures before any load: metrics.k8s.io knows the pod.
    wait_for(
        "metrics.k8s.io figures of the replica",
        lambda: served.pod.metadata.name in pod_cpu(),
        timeout=120,
        interval=2,
    )
    assert served.replicas() == 1
    reason = "cpu resource utilization (percentage of request) above target"
    served.scale_up_and_down(Load(served.body(64), served.ready_hosts, clients=4), reason)


@pytest.mark.timeout(1800)  # Prometheus' and the adapter's first build, start-ups, two HPA decisions
def test_inflight_requests_scale_the_deployment_up_and_back_down(
    kube: Kube, namespace: str, kubelet: Path, tmp_path: Path
) -> None:
    """replicas.metric: inflight, end to end: the server's in-flight gauge, scraped by Prometheus through
    the pods' prometheus.io annotations, served as a Pods metric by prometheus-adapter, read by the HPA.
    Each request carries ROWS rows, so the server's side of it (parsing, the forward pass, encoding the
    answer) outweighs the client's (sending bytes it made once): 8 closed-loop connections then keep
    most of their requests in flight on one replica whatever the machine's speed, above a target of 2."""
    if kube.local is None:
        pytest.skip("needs the project's local cluster (Prometheus and the adapter run as its processes)")
    custom_metrics.start(kube.local)
    spec = {"replicas": {"min": 1, "max": 3, "metric": "inflight", "targetInflightRequests": 2}}
    served = Served(kube, namespace, kubelet, tmp_path, spec)
    metric = INFLIGHT_METRIC
    url = f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{namespace}/pods/*/{metric}"

    def served_pods() -> dict[str, str]:
        out = kube.kubectl("get", "--raw", url).stdout
        return {i["describedObject"]["name"]: i["value"] for i in json.loads(out)["items"]}

    # Prometheus found the replica by its annotations and the adapter serves its series: idle, 0.
    idle = wait_for(
        "custom.metrics.k8s.io figures of the replica",
        lambda: served_pods().get(served.pod.metadata.name),
        timeout=180,
        interval=2,
    )
    assert idle == "0", idle
    assert served.replicas() == 1
    load = Load(served.body(ROWS), served.ready_hosts, clients=8)
    served.scale_up_and_down(load, f"pods metric {metric} above target")
