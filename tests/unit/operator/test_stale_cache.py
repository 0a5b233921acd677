"""Safety nets against a stale cache or a stuck pass: a terminating pod the cache holds long after its
grace period is confirmed with the apiserver and dropped when gone; a stalled watch stream resumes
where it was without a relist; a pass that hangs is reported with where it hangs; no request waits
forever."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from aidc_operator import informer as informer_mod
from aidc_operator import kubeio
from aidc_operator.cache import POD, Store
from aidc_operator.handlers import loop as loop_mod
from aidc_operator.stale_pods import GRACE_MARGIN, RECHECK_SECONDS, StalePods, overdue

T0 = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC)


def pod(name: str, rv: int, deleting_at: dt.datetime | None = None, uid: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "uid": uid or f"uid-{name}",
        "resourceVersion": str(rv),
        "labels": {"aidc.dev/job-name": "j"},
    }
    if deleting_at is not None:
        meta["deletionTimestamp"] = deleting_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": meta, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}


def test_only_pods_past_their_grace_period_and_the_margin_are_overdue() -> None:
    pods = [pod("live", 1), pod("ending", 2, T0), pod("late", 3, T0 - dt.timedelta(seconds=GRACE_MARGIN + 1))]
    assert [p["metadata"]["name"] for p in overdue(pods, T0)] == ["late"]


def test_a_ghost_pod_is_dropped_once_the_apiserver_says_it_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    store, now = Store(), [100.0]
    late = T0 - dt.timedelta(seconds=GRACE_MARGIN + 5)
    for p in (pod("a-0", 10, late), pod("a-1", 11, late), pod("b-0", 12)):
        store.upsert(POD, p)
    asked: list[str] = []
    cluster = {"a-1": pod("a-1", 11, late)}  # a-0 is gone; a-1 really is still terminating

    def read(namespace: str, name: str) -> dict[str, Any] | None:
        asked.append(name)
        return cluster.get(name)

    stale = StalePods(store, read, lambda: now[0])
    with caplog.at_level(logging.INFO, "aidc.cache"):
        kept = stale.confirm(store.pods_with("aidc.dev/job-name", "ns", "j"), T0)
    assert sorted(p["metadata"]["name"] for p in kept) == ["a-1", "b-0"]
    assert store.get(POD, "ns", "a-0") is None, "dropped from the cache, so every later pass agrees"
    assert sorted(asked) == ["a-0", "a-1"], "only overdue pods cost a request"
    assert "a missed watch event" in caplog.text and "still terminating" in caplog.text
    # The one still terminating is asked about again only after RECHECK_SECONDS: a pass a second
    # costs no request a second.
    stale.confirm(store.pods_with("aidc.dev/job-name", "ns", "j"), T0)
    assert sorted(asked) == ["a-0", "a-1"]
    now[0] += RECHECK_SECONDS
    stale.confirm(store.pods_with("aidc.dev/job-name", "ns", "j"), T0)
    assert sorted(asked) == ["a-0", "a-1", "a-1"]
    # A late write-through of the ghost cannot revive it (the drop leaves a tombstone).
    store.upsert(POD, pod("a-0", 10, late))
    assert store.get(POD, "ns", "a-0") is None


def test_a_new_pod_with_the_old_name_is_not_mistaken_for_the_ghost() -> None:
    store = Store()
    late = T0 - dt.timedelta(seconds=GRACE_MARGIN + 5)
    store.upsert(POD, pod("a-0", 10, late, uid="old"))
    stale = StalePods(store, lambda ns, n: pod(n, 20, uid="new"), lambda: 0.0)
    assert stale.confirm(store.pods_with("aidc.dev/job-name", "ns", "j"), T0) == []
    assert store.get(POD, "ns", "a-0") is None


def test_a_hung_pass_is_reported_with_where_it_hangs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loop_mod, "SLOW_PASS_SECONDS", 0.05)
    release = threading.Event()

    def waiting_on_the_apiserver(namespace: str, name: str) -> loop_mod.Outcome:
        release.wait(60)
        return loop_mod.Outcome(300)

    async def scenario() -> None:
        controller = loop_mod.Controller("Thing", waiting_on_the_apiserver, workers=1)
        synced = asyncio.Event()
        synced.set()
        controller.start(synced)
        controller.activate(("ns", "stuck"))
        for _ in range(2000):  # until the warning is out (a condition, not a speed)
            if "still running" in caplog.text:
                break
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.sleep(0.05)
        await controller.stop()

    with caplog.at_level(logging.WARNING, "aidc.thing"):
        asyncio.run(scenario())
    line = next(r.getMessage() for r in caplog.records if "still running" in r.getMessage())
    assert "ns/stuck" in line and "waiting_on_the_apiserver" in line, line


def test_every_request_but_a_watch_gets_a_timeout() -> None:
    sent: list[tuple[str, Any]] = []

    class Rest:
        def request(self, method: str, url: str, **kwargs: Any) -> None:
            sent.append((url, kwargs.get("_request_timeout")))

    class Client:
        rest_client = Rest()

    client = kubeio._instrument(Client(), kubeio.TokenBucket(0, 1))  # type: ignore[arg-type]
    client.rest_client.request("GET", "https://h/api/v1/namespaces/ns/pods/p")
    client.rest_client.request("DELETE", "https://h/api/v1/namespaces/ns/pods/p", _request_timeout=(1, 2))
    client.rest_client.request("GET", "https://h/api/v1/pods?watch=true")
    assert [t for _, t in sent] == [kubeio.REQUEST_TIMEOUT, (1, 2), None]


# A stalled watch stream, served over real HTTP on loopback -------------------------------------------


class _Apiserver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lists = 0
        self.watches: list[str] = []
        self.stall = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Apiserver

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if "watch=true" not in self.path:
            self.server.lists += 1
            body = json.dumps({"items": [pod("p-0", 5)], "metadata": {"resourceVersion": "5"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.server.watches.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(event: dict[str, Any]) -> None:
            line = json.dumps(event).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()

        if len(self.server.watches) == 1:
            send({"type": "MODIFIED", "object": pod("p-0", 7)})
            self.server.stall.wait(120)  # then silence: no event, no bookmark, no end
            return
        send({"type": "DELETED", "object": pod("p-0", 9)})
        self.server.stall.wait(120)


@pytest.fixture
def apiserver(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Apiserver]:
    server = _Apiserver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_port}"
    api_client = kubeio._instrument(client.ApiClient(configuration), kubeio.TokenBucket(0, 1))
    monkeypatch.setattr(kubeio, "api", lambda: api_client)
    yield server
    server.stall.set()
    server.shutdown()


def test_a_silent_watch_is_resumed_from_its_last_version_without_a_relist(
    apiserver: _Apiserver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(informer_mod, "WATCH_IDLE_SECONDS", 1)
    store = Store()
    inf = informer_mod.Informer(informer_mod.Resource(POD, "v1", "pods"), store, "ns")
    inf.start()
    try:
        for _ in range(6000):  # the deletion sent on the resumed stream reaches the cache
            if inf.synced.is_set() and store.get(POD, "ns", "p-0") is None:
                break
            threading.Event().wait(0.01)
        assert inf.synced.is_set() and store.get(POD, "ns", "p-0") is None
    finally:
        inf.stop()
        apiserver.stall.set()
    assert apiserver.lists == 1, "resumed, not relisted"
    assert "resourceVersion=7" in apiserver.watches[1], apiserver.watches
