"""Operator metrics (prometheus-client), served on --metrics-port."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram(
    "aidc_reconcile_seconds",
    "Time of one reconcile pass",
    ["resource"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter(
    "aidc_reconcile_errors_total", "Reconcile passes that hit an API error", ["resource"]
)
JOB_PHASE = Gauge(
    "aidc_trainingjob_phase", "1 for the phase each TrainingJob is in", ["namespace", "name", "phase"]
)
RESTARTS = Counter("aidc_trainingjob_restarts_total", "Gang restarts for pod failures", ["namespace", "name"])
NODE_FAILURES = Counter(
    "aidc_node_failures_handled_total", "Gang restarts for lost nodes", ["namespace", "name"]
)
ISVC_READY = Gauge(
    "aidc_inferenceservice_ready_replicas", "Ready model-server replicas", ["namespace", "name"]
)

_PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")


def observe_trainingjob(body: dict[str, Any], plan: Any) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    old = body.get("status") or {}
    new = plan.status
    for phase in _PHASES:
        JOB_PHASE.labels(ns, name, phase).set(1 if new.phase == phase else 0)
    if new.restarts > old.get("restarts", 0):
        RESTARTS.labels(ns, name).inc(new.restarts - old.get("restarts", 0))
    if new.node_failures > old.get("nodeFailures", 0):
        NODE_FAILURES.labels(ns, name).inc(new.node_failures - old.get("nodeFailures", 0))
