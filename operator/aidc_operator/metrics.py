"""Operator metrics (prometheus-client), served on --metrics-port."""

from __future__ import annotations

import contextlib
import datetime as dt
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
SLOW_PASSES = Counter(
    "aidc_reconcile_slow_passes_total",
    "Times a reconcile pass was still running after another SLOW_PASS_SECONDS (60 s)",
    ["resource"],
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
RECOVERY_SECONDS = Histogram(
    "aidc_trainingjob_recovery_seconds",
    "From the failure that restarted a gang (status.lastFailure.time) to the gang Running again",
    ["reason"],
    buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600),
)
ADMISSIONS = Counter(
    "aidc_admission_requests_total",
    "Admission webhook requests answered, by webhook and outcome",
    ["webhook", "allowed"],
)

API_REQUESTS = Counter(
    "aidc_api_requests", "Requests the operator sent to the apiserver", ["verb", "resource"]
)
WATCH_EVENTS = Counter("aidc_watch_events", "Watch events the cache took in", ["resource"])
CACHE_OBJECTS = Gauge("aidc_cache_objects", "Objects held in the watch-fed cache", ["resource"])
QUEUE_DEPTH = Gauge("aidc_workqueue_depth", "Objects waiting for a reconcile pass", ["resource"])
QUEUE_WAIT = Histogram(
    "aidc_workqueue_wait_seconds",
    "From an object being queued to its pass starting",
    ["resource"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PASSES = Counter("aidc_reconcile_passes", "Reconcile passes run", ["resource"])

RESUMED_SECONDS = Histogram(
    "aidc_trainingjob_training_resumed_seconds",
    "From the operator judging a node lost to the first training step after it (status.recoveries)",
    ["mode"],
    buckets=(1, 5, 10, 20, 30, 60, 120, 300, 600, 1200),
)

_PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")


def observe_trainingjob(body: dict[str, Any], plan: Any, now: dt.datetime | None = None) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    old = body.get("status") or {}
    new = plan.status
    for phase in _PHASES:
        JOB_PHASE.labels(ns, name, phase).set(1 if new.phase == phase else 0)
    if new.restarts > old.get("restarts", 0):
        RESTARTS.labels(ns, name).inc(new.restarts - old.get("restarts", 0))
    if new.node_failures > old.get("nodeFailures", 0):
        NODE_FAILURES.labels(ns, name).inc(new.node_failures - old.get("nodeFailures", 0))
    recovered = recovery_seconds(old, new, now)
    if recovered is not None:
        RECOVERY_SECONDS.labels(recovered[0]).observe(recovered[1])
    for mode, seconds in resumed(old, new):
        RESUMED_SECONDS.labels(mode).observe(seconds)


def resumed(old: dict[str, Any], new: Any) -> list[tuple[str, float]]:
    """(mode, seconds) of the recoveries this pass closed (their resumedAt newly set)."""
    closed = {
        (r.get("detectedAt"), r.get("lostPod")) for r in old.get("recoveries") or [] if r.get("resumedAt")
    }
    return [
        (r.mode, r.seconds)
        for r in new.recoveries
        if r.resumed_at and r.seconds is not None and (r.detected_at, r.lost_pod) not in closed
    ]


def forget_trainingjob(namespace: str, name: str) -> None:
    """Drop a deleted job's series, so its last phase (Failed, say) does not stay on dashboards and keep
    alerts firing until the operator restarts."""
    series = [(JOB_PHASE, (namespace, name, phase)) for phase in _PHASES]
    series += [(RESTARTS, (namespace, name)), (NODE_FAILURES, (namespace, name))]
    for metric, labels in series:
        with contextlib.suppress(KeyError):  # never observed
            metric.remove(*labels)


def recovery_seconds(
    old: dict[str, Any], new: Any, now: dt.datetime | None = None
) -> tuple[str, float] | None:
    """(failure reason, seconds) when this pass brings a restarted gang back to Running, else None."""
    failure = new.last_failure
    # A restarted gang stays Restarting until all its pods run (lifecycle.py); first starts and
    # resumes from suspension are not recoveries.
    if new.phase != "Running" or old.get("phase") != "Restarting":
        return None
    if failure is None or not failure.time:
        return None
    failed_at = dt.datetime.fromisoformat(failure.time.replace("Z", "+00:00"))
    return failure.reason, max(0.0, ((now or dt.datetime.now(dt.UTC)) - failed_at).total_seconds())
