"""Operator metrics a dashboard relies on: recovery time after a gang restart, phase gauges."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from prometheus_client import REGISTRY

from aidc_operator import metrics
from aidc_operator.api.trainingjob import FailureRecord, RecoveryRecord, TrainingJobStatus

NOW = dt.datetime(2026, 11, 26, 12, 0, 30, tzinfo=dt.UTC)


def body(name: str, **status: object) -> dict:
    return {"metadata": {"namespace": "ns", "name": name}, "status": status}


def status(phase: str, restarts: int = 0, node_failures: int = 0, failed_at: str | None = None):
    failure = FailureRecord(reason="NodeFailure", node="gpu-node-1", time=failed_at) if failed_at else None
    return TrainingJobStatus(
        phase=phase, restarts=restarts, node_failures=node_failures, last_failure=failure
    )


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def test_gang_back_to_running_after_a_node_failure_observes_recovery_seconds() -> None:
    before = sample("aidc_trainingjob_recovery_seconds_count", reason="NodeFailure")
    before_sum = sample("aidc_trainingjob_recovery_seconds_sum", reason="NodeFailure")
    plan = SimpleNamespace(status=status("Running", node_failures=1, failed_at="2026-11-26T12:00:00Z"))
    metrics.observe_trainingjob(body("recovering", phase="Restarting", nodeFailures=1), plan, now=NOW)
    assert sample("aidc_trainingjob_recovery_seconds_count", reason="NodeFailure") == before + 1
    assert sample("aidc_trainingjob_recovery_seconds_sum", reason="NodeFailure") - before_sum == 30.0
    assert (
        sample("aidc_node_failures_handled_total", namespace="ns", name="recovering") == 0
    )  # counted earlier
    assert sample("aidc_trainingjob_phase", namespace="ns", name="recovering", phase="Running") == 1
    assert sample("aidc_trainingjob_phase", namespace="ns", name="recovering", phase="Restarting") == 0


def test_first_start_resume_and_steady_running_are_not_recoveries() -> None:
    failed = "2026-11-26T11:00:00Z"
    cases = [
        ({"phase": "Pending"}, status("Running")),  # first start
        ({"phase": "Pending", "restarts": 1}, status("Running", restarts=1, failed_at=failed)),  # resumed
        ({"phase": "Running", "restarts": 1}, status("Running", restarts=1, failed_at=failed)),  # steady
        ({"phase": "Restarting", "restarts": 1}, status("Restarting", restarts=1, failed_at=failed)),
    ]
    for old, new in cases:
        assert metrics.recovery_seconds(old, new, NOW) is None, (old, new.phase)


def test_restart_counters_count_increments_once() -> None:
    plan = SimpleNamespace(status=status("Restarting", restarts=2, failed_at="2026-11-26T12:00:00Z"))
    metrics.observe_trainingjob(body("flaky", phase="Running", restarts=0), plan, now=NOW)
    metrics.observe_trainingjob(body("flaky", phase="Restarting", restarts=2), plan, now=NOW)  # same status
    assert sample("aidc_trainingjob_restarts_total", namespace="ns", name="flaky") == 2


def test_a_deleted_job_leaves_no_series_behind() -> None:
    plan = SimpleNamespace(status=status("Failed", restarts=1, failed_at="2026-11-26T12:00:00Z"))
    metrics.observe_trainingjob(body("gone", phase="Running"), plan, now=NOW)
    assert sample("aidc_trainingjob_phase", namespace="ns", name="gone", phase="Failed") == 1
    metrics.forget_trainingjob("ns", "gone")
    metrics.forget_trainingjob("ns", "never-seen")  # harmless
    assert (
        REGISTRY.get_sample_value(
            "aidc_trainingjob_phase", {"namespace": "ns", "name": "gone", "phase": "Failed"}
        )
        is None
    )
    assert (
        REGISTRY.get_sample_value("aidc_trainingjob_restarts_total", {"namespace": "ns", "name": "gone"})
        is None
    )


def test_a_recovery_closed_by_the_trainer_observes_training_resumed_seconds_once() -> None:
    rec = {"lostPod": "p-a0-1", "mode": "ReplaceNode", "detectedAt": "2026-11-26T12:00:00Z"}
    before = sample("aidc_trainingjob_training_resumed_seconds_count", mode="ReplaceNode")
    closed = RecoveryRecord.model_validate({**rec, "resumedAt": "2026-11-26T12:00:07Z", "seconds": 7.0})
    st = status("Running", node_failures=1)
    st.recoveries = [closed]
    plan = SimpleNamespace(status=st)
    metrics.observe_trainingjob(body("resumes", phase="Running", recoveries=[rec]), plan, now=NOW)
    assert sample("aidc_trainingjob_training_resumed_seconds_count", mode="ReplaceNode") == before + 1
    wire = closed.model_dump(by_alias=True, mode="json")
    metrics.observe_trainingjob(body("resumes", phase="Running", recoveries=[wire]), plan, now=NOW)
    assert sample("aidc_trainingjob_training_resumed_seconds_count", mode="ReplaceNode") == before + 1
