"""Prometheus metrics of one server instance (own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
        self.model_version.labels(model_name).set(-1)
        self.model_ready.labels(model_name).set(0)
        # Bound children: the hot path skips the label lookup.
        self.latency_child = self.latency.labels(model_name)
        self.batch_child = self.batch_size.labels(model_name)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
