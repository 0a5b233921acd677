"""Which objects a change wakes, the namespaces the watches cover, and when status is written."""

from __future__ import annotations

import asyncio
import threading

import pytest

from aidc_operator.cache import NODE, POD, TRAININGJOB
from aidc_operator.handlers import wiring
from aidc_operator.handlers.trainingjob import status_write_due
from aidc_operator.lifecycle import RESYNC_SECONDS
from aidc_operator.runtime import STORE


@pytest.fixture
def woken(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    seen: dict[str, list] = {"jobs": [], "services": []}
    monkeypatch.setattr(wiring.JOBS, "wake_threadsafe", seen["jobs"].append)
    monkeypatch.setattr(wiring.SERVICES, "wake_threadsafe", seen["services"].append)
    return seen


def pod(name: str, job: str, node: str) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": "1",
            "labels": {"aidc.dev/job-name": job},
        },
        "spec": {"nodeName": node},
    }


def test_a_node_change_wakes_only_the_jobs_on_it_or_avoiding_it(woken: dict[str, list]) -> None:
    for i, (job, node) in enumerate([("a", "n1"), ("a", "n2"), ("b", "n2"), ("c", "n3")]):
        STORE.upsert(POD, pod(f"{job}-{i}", job, node))
    STORE.upsert(
        TRAININGJOB,
        {
            "metadata": {"name": "d", "namespace": "ns", "resourceVersion": "1"},
            "status": {"excludedNodes": ["n2"]},
        },
    )
    ready = {"metadata": {"name": "n2"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    woken["jobs"].clear()
    wiring.route(NODE, None, ready)
    assert sorted(woken["jobs"]) == [("ns", "a"), ("ns", "b"), ("ns", "d")]
    woken["jobs"].clear()
    wiring.route("Lease", None, {"metadata": {"name": "n2"}})
    assert woken["jobs"] == []  # renewals are the watchdog's, not a wake each


def test_a_trainingjob_change_wakes_itself_and_the_services_serving_it(woken: dict[str, list]) -> None:
    for name, spec in [
        ("primary", {"model": {"fromTrainingJob": "tj"}}),
        ("canary", {"model": {"storage": {}}, "canary": {"model": {"fromTrainingJob": "tj"}}}),
        ("other", {"model": {"fromTrainingJob": "elsewhere"}}),
    ]:
        STORE.upsert(
            "InferenceService",
            {"metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"}, "spec": spec},
        )
    woken["services"].clear()
    wiring.route(TRAININGJOB, None, {"metadata": {"name": "tj", "namespace": "ns"}})
    assert woken["jobs"] == [("ns", "tj")]
    assert sorted(woken["services"]) == [("ns", "canary"), ("ns", "primary")]


def test_children_wake_their_owner_by_label(woken: dict[str, list]) -> None:
    wiring.route(
        "Deployment",
        None,
        {"metadata": {"name": "d", "namespace": "ns", "labels": {"aidc.dev/inferenceservice": "s"}}},
    )
    wiring.route(
        "Service", None, {"metadata": {"name": "x", "namespace": "ns", "labels": {"aidc.dev/job-name": "j"}}}
    )
    assert woken == {"jobs": [("ns", "j")], "services": [("ns", "s")]}


def test_namespace_patterns_choose_the_watches() -> None:
    assert wiring.namespace_filter([])[0] == [None]
    scopes, accepts = wiring.namespace_filter(["team-a", "team-b"])
    assert scopes == ["team-a", "team-b"]  # exact names: one watch each (namespaced RBAC)
    scopes, accepts = wiring.namespace_filter(["t-*", "!t-skip"])
    assert scopes == [None]
    assert accepts("t-one") and not accepts("t-skip") and not accepts("default")


def test_status_is_written_on_real_change_and_ticking_figures_at_their_cadence() -> None:
    old = {"phase": "Running", "gpuSeconds": 10.0, "progress": {"step": 1}}
    assert status_write_due(old, dict(old), 0.0, 0.0) == (False, None)
    assert status_write_due(old, {**old, "phase": "Restarting"}, 100.0, 101.0) == (True, None)
    # gpuSeconds alone waits for the safety resync's cadence (a woken pass does not write it)
    assert status_write_due(old, {**old, "gpuSeconds": 12.0}, 100.0, 160.0) == (False, RESYNC_SECONDS - 60)
    assert status_write_due(old, {**old, "gpuSeconds": 12.0}, 100.0, 100 + RESYNC_SECONDS) == (True, None)
    # progress: written once 30 s have passed since our last write
    assert status_write_due(old, {**old, "progress": {"step": 2}}, 100.0, 110.0) == (False, 20.0)
    assert status_write_due(old, {**old, "progress": {"step": 2}}, 100.0, 131.0) == (True, None)
    both = {**old, "progress": {"step": 2}, "gpuSeconds": 11.0}
    assert status_write_due(old, both, 100.0, 131.0) == (True, None)


def test_route_kinds_installed_later_are_watched_and_wake_the_gateway_canaries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CRDs arrive after start-up, one kind per discovery check, with a failed check between:
    each kind is watched once served (never twice), and the canaries naming a Gateway are woken."""
    from kubernetes.client.exceptions import ApiException

    from aidc_operator.handlers import gateway_discovery as gd
    from aidc_operator.runtime import CONFIG

    monkeypatch.setattr(CONFIG, "gateway_api_served", False)
    monkeypatch.setattr(CONFIG, "grpc_routes_served", False)
    woken: list = []
    monkeypatch.setattr(gd.SERVICES, "wake", woken.append)
    for name, canary in [
        ("routed", {"gateway": {"name": "gw"}}),
        ("ratio", {"trafficPercent": 10}),
        ("plain", None),
    ]:
        spec = {"model": {"storage": {}}, **({"canary": canary} if canary else {})}
        STORE.upsert(
            "InferenceService",
            {"metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"}, "spec": spec},
        )
    answers: list = [
        [],
        ApiException(status=503),
        [gd.GRPC_ROUTES],
        ConnectionError(),
        [gd.ROUTES, gd.GRPC_ROUTES],
    ]

    def discover() -> list:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    class Watch:
        def __init__(self, kind: str) -> None:
            self.kind, self.synced = kind, threading.Event()

        def start(self) -> None:
            self.synced.set()

    started: list = []
    asyncio.run(
        gd.await_routes([], lambda r: [Watch(r.kind)], started, recheck=(0.0, 0.0), discover=discover)
    )
    assert answers == []  # it stopped checking once both kinds were served
    assert [w.kind for w in started] == ["GRPCRoute", "HTTPRoute"]
    assert CONFIG.gateway_api_served and CONFIG.grpc_routes_served
    assert woken == [("ns", "routed"), ("ns", "routed")]  # once per newly served kind; never the others
