"""Node-failure detection and exit-code classification: the decisions behind every gang restart."""

from __future__ import annotations

import datetime as dt

from aidc_operator.recovery import LeaseClock, assess, lost_pods, must_force_delete, node_health
from aidc_operator.restart_policy import PodExit, backoff_seconds, retryable, terminated, worker_exit_code

NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)


def node(name: str, ready: str = "True", taints: list[str] | None = None) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {"taints": [{"key": k, "effect": "NoExecute"} for k in taints or []]},
        "status": {"conditions": [{"type": "Ready", "status": ready}]},
    }


def lease(renewed_seconds_ago: float, duration: int = 40) -> dict:
    t = (NOW - dt.timedelta(seconds=renewed_seconds_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"spec": {"renewTime": t, "leaseDurationSeconds": duration}}


def pod(name: str, node_name: str | None, phase: str = "Running", conditions: list | None = None) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {"nodeName": node_name},
        "status": {"phase": phase, "conditions": conditions or []},
    }


def test_node_verdicts() -> None:
    assert node_health(node("a"), "a").healthy
    assert node_health(None, "a").reason == "NodeDeleted"
    assert node_health(node("a", "Unknown"), "a").reason == "NodeUnreachable"
    assert node_health(node("a", "False"), "a").reason == "NodeNotReady"
    assert node_health(node("a", taints=["node.kubernetes.io/unreachable"]), "a").reason == "NodeUnreachable"
    assert node_health(node("a", taints=["nvidia.com/gpu"]), "a").healthy


def test_a_lease_lapses_on_the_observers_clock_not_by_comparing_wall_clocks() -> None:
    clock = LeaseClock()
    # The kubelet's clock is an hour behind the operator's: its renewTime looks ancient, yet it renews.
    skewed = lease(3600, duration=40)
    clock.observe("a", skewed, now=1000.0)
    assert not clock.lapsed("a", 1039.0)
    assert clock.lapsed("a", 1041.0)  # not seen renewed for 41 s > 40 s
    renewed = lease(3590, duration=40)
    clock.observe("a", renewed, now=1041.5)
    assert not clock.lapsed("a", 1080.0)
    # The same renewTime seen again (a resync, another field changing) is not a renewal.
    clock.observe("a", renewed, now=1070.0)
    assert clock.lapsed("a", 1082.0)
    assert not clock.lapsed("unknown", 1e9)  # no lease: fall back to conditions
    clock.observe("a", None, now=1100.0)  # Lease deleted
    assert not clock.lapsed("a", 1e9)
    h = node_health(node("a"), "a", lease_lapsed=True)
    assert not h.healthy and h.reason == "NodeLeaseExpired"


def test_lost_pods_and_force_deletion() -> None:
    health = assess({"a": node("a"), "b": node("b", "Unknown")})
    pods = [
        pod("p0", "a"),
        pod("p1", "b"),
        pod("p2", "gone"),
        pod("p3", "b", phase="Succeeded"),
        pod(
            "p4",
            "a",
            conditions=[
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": "preempted",
                }
            ],
        ),
        pod("p5", None, phase="Pending"),
    ]
    lost = {lp.pod: lp.reason for lp in lost_pods(pods, health)}
    assert lost == {"p1": "NodeUnreachable", "p2": "NodeDeleted", "p4": "Preempted"}
    assert must_force_delete(pods[1], health) and not must_force_delete(pods[0], health)


def failed(code: int, reason: str = "Error", message: str = "") -> dict:
    return {
        "metadata": {"name": "p"},
        "spec": {"nodeName": "a"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"exitCode": code, "reason": reason, "message": message}}}
            ],
        },
    }


TORCHRUN_REPORT = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
aidc_trainer FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 4242)
  error_file: <N/A>
============================================================"""


def test_torchrun_root_cause_is_what_gets_classified() -> None:
    assert worker_exit_code(1, TORCHRUN_REPORT.format(code=3)) == 3
    assert worker_exit_code(1, TORCHRUN_REPORT.format(code=-9)) == 137
    assert worker_exit_code(1, "Traceback: ValueError") == 1
    assert worker_exit_code(137, TORCHRUN_REPORT.format(code=3)) == 137
    exit_ = terminated(failed(1, message=TORCHRUN_REPORT.format(code=5)))
    assert exit_ is not None and exit_.exit_code == 5 and retryable(exit_, [])


def test_retryable_classification() -> None:
    def code(c: int, reason: str = "Error") -> PodExit:
        return PodExit("p", "a", c, reason, "")

    assert retryable(code(137, "OOMKilled"), [])
    assert retryable(code(143), [])
    assert not retryable(code(1), [])
    assert retryable(code(42), [42])
    assert not retryable(code(3), [3]), "a key error never restarts: the key will not fix itself"
    assert terminated(pod("p", "a")) is None


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_seconds(n, 10, 60) for n in range(0, 6)] == [0, 10, 20, 40, 60, 60]
