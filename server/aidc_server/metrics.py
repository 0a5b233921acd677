"""Prometheus metrics of one server instance (own registry, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from aidc_server.energy import EnergyReading

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.requests = Counter(
            "aidc_server_requests",
            "Inference requests by HTTP status code",
            ["model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "aidc_server_request_latency_seconds",
            "Inference request latency from body received to response encoded",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "aidc_server_batch_size",
            "Rows per forward pass after dynamic batching",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "aidc_server_queue_depth",
            "Requests waiting in the batching queue",
            ["model"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "aidc_server_requests_in_flight",
            "Inference requests being handled",
            ["model"],
            registry=self.registry,
        )
        self.model_version = Gauge(
            "aidc_server_model_version",
            "Checkpoint step of the served model (-1 while none is loaded)",
            ["model"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "aidc_server_model_ready",
            "1 when the model is loaded and verified",
            ["model"],
            registry=self.registry,
        )
        self.inferences = Counter(
            "aidc_server_inferences",
            "Rows inferred (the first dimension of each answered request)",
            ["model"],
            registry=self.registry,
        )
        self.model_version.labels(model_name).set(-1)
        self.model_ready.labels(model_name).set(0)
        # Bound children: the hot path skips the label lookup.
        self.latency_child = self.latency.labels(model_name)
        self.batch_child = self.batch_size.labels(model_name)
        self.inferences_child = self.inferences.labels(model_name)
        self._codes: dict[int, Counter] = {}

    def count(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.requests.labels(self.model_name, str(code))
        child.inc()

    def set_model(self, version: str | None, ready: bool) -> None:
        try:
            step = float(version) if version is not None else -1.0
        except ValueError:
            step = -1.0
        self.model_version.labels(self.model_name).set(step)
        self.model_ready.labels(self.model_name).set(1 if ready else 0)

    def attach_energy(self, reading: Callable[[], EnergyReading]) -> None:
        """Export GPU energy from `reading` at each scrape (the caller samples NVML before rendering)."""
        self.registry.register(_EnergyCollector(self.model_name, reading))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EnergyCollector:
    """aidc_server_energy_joules_total only while measured; aidc_server_energy_measured always.

    Both carry the `model` label, like aidc_server_inferences_total, so joules per inference is a
    plain division of the two series of one pod.
    """

    def __init__(self, model_name: str, reading: Callable[[], EnergyReading]) -> None:
        self.model_name = model_name
        self.reading = reading

    def describe(self) -> list[Metric]:
        return []  # names are not fixed (the counter comes and goes): skip the registry's check

    def collect(self) -> Iterator[Metric]:
        r = self.reading()
        doc = "1 when GPU energy is measured; 0 with a one-word reason (no_gpu, no_nvml, ...) when not"
        if r.joules is None:
            measured = GaugeMetricFamily("aidc_server_energy_measured", doc, labels=["model", "reason"])
            measured.add_metric([self.model_name, r.reason or "unknown"], 0)
            yield measured
            return
        measured = GaugeMetricFamily("aidc_server_energy_measured", doc, labels=["model"])
        measured.add_metric([self.model_name], 1)
        yield measured
        joules = CounterMetricFamily(
            "aidc_server_energy_joules",
            "GPU energy since the server started, summed over every GPU the pod sees (NVML)",
            labels=["model"],
        )
        joules.add_metric([self.model_name], r.joules)
        yield joules
