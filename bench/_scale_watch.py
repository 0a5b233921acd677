"""One label-selected watch over a namespace's pods for bench/scale.py: the live pods of every job, and
per job the first moment all its pods existed and the first moment all were Running.

Raw JSON (no model objects): on two cores the kubernetes client's deserialisation of thousands of pod
events would cost the benchmark's own client more CPU than the operators it measures."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client


@dataclass
class PodState:
    job: str
    uid: str
    node: str
    phase: str
    deleting: bool


@dataclass
class JobTimes:
    all_exist: float | None = None  # time.time() when the job first had all its pods
    all_running: float | None = None  # ... and when all of them were first Running at once


@dataclass
class PodWatch:
    core: client.CoreV1Api
    namespace: str
    job_label: str  # pods carry <job_label>=<job name>
    pods_per_job: int
    pods: dict[str, PodState] = field(default_factory=dict)
    by_job: dict[str, dict[str, PodState]] = field(default_factory=dict)  # the same pods, per job
    jobs: dict[str, JobTimes] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)

    # lifecycle ---------------------------------------------------------------
    def start(self, timeout: float = 60) -> PodWatch:
        self._thread.start()
        if not self._synced.wait(timeout):
            raise TimeoutError(f"pod watch did not sync in {timeout:.0f}s ({self.error})")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._resp is not None:
            with contextlib.suppress(Exception):  # a stream the watch thread is reading
                self._resp.close()
        self._thread.join(10)

    def _run(self) -> None:
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                rv = self._watch(rv)
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                if self._stop.wait(1):
                    return

    def _list(self) -> str:
        resp = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.job_label, _preload_content=False, _request_timeout=120
        )
        data = json.loads(resp.data)
        now = time.time()
        with self._lock:
            self.pods.clear()
            self.by_job.clear()
            for pod in data["items"]:
                self._apply("ADDED", pod, now)
        self._synced.set()
        return data["metadata"]["resourceVersion"]

    def _watch(self, rv: str) -> str | None:
        """Streams events from rv; returns the last resourceVersion seen, None when it is too old."""
        self._resp = self.core.list_namespaced_pod(
            self.namespace,
            label_selector=self.job_label,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=300,
            _preload_content=False,
            _request_timeout=(10, 400),
        )
        buf = b""
        for chunk in self._resp.stream(None, decode_content=False):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            now = time.time()
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    if obj.get("code") == 410:
                        return None  # expired: list again
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                rv = obj["metadata"].get("resourceVersion", rv)
                if event["type"] != "BOOKMARK":
                    with self._lock:
                        self._apply(event["type"], obj, now)
            if self._stop.is_set():
                break
        return rv

    def _apply(self, kind: str, pod: dict[str, Any], now: float) -> None:
        meta = pod["metadata"]
        name = meta["name"]
        if kind == "DELETED":
            if old := self.pods.pop(name, None):
                self.by_job.get(old.job, {}).pop(name, None)
            return
        job = (meta.get("labels") or {}).get(self.job_label, "")
        state = PodState(
            job=job,
            uid=meta["uid"],
            node=pod["spec"].get("nodeName") or "",
            phase=(pod.get("status") or {}).get("phase", ""),
            deleting=bool(meta.get("deletionTimestamp")),
        )
        self.pods[name] = state
        self.by_job.setdefault(job, {})[name] = state
        times = self.jobs.setdefault(job, JobTimes())
        if times.all_running is not None:
            return
        live = [p for p in self.by_job[job].values() if not p.deleting]
        if len(live) >= self.pods_per_job:
            times.all_exist = times.all_exist or now
            if sum(p.phase == "Running" for p in live) >= self.pods_per_job:
                times.all_running = now

    # queries -----------------------------------------------------------------
    def live(self, job: str | None = None) -> list[PodState]:
        """Pods not being deleted (of one job, or all)."""
        with self._lock:
            pods = self.pods.values() if job is None else self.by_job.get(job, {}).values()
            return [p for p in pods if not p.deleting]

    def count(self) -> int:
        with self._lock:
            return len(self.pods)

    def times(self) -> dict[str, JobTimes]:
        with self._lock:
            return {k: JobTimes(v.all_exist, v.all_running) for k, v in self.jobs.items()}

    def uids(self) -> dict[str, set[str]]:
        with self._lock:
            out: dict[str, set[str]] = {}
            for p in self.pods.values():
                out.setdefault(p.job, set()).add(p.uid)
            return out

    def reset_times(self) -> None:
        with self._lock:
            self.jobs.clear()
