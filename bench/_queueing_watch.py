"""What bench/queueing.py sees of one mode's namespace: three raw-JSON watches (pods, TrainingJobs and, with
Kueue, Workloads) folded into per-job state under one lock.

The bench is a client like kubectl: list once, then watch; nothing polls the apiserver. Raw JSON instead of
the kubernetes client's model objects because on two cores deserialising every pod event into models would
cost the bench more CPU than the operator it measures (the same reason as bench/_scale_watch.py). Every time
recorded is time.time() when the bench saw the event, so the clocks of all three watches agree."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

JOB_LABEL = "aidc.dev/job-name"
GPU = "nvidia.com/gpu"
TERMINAL = ("Succeeded", "Failed")

# (kind, obj, seen_at) -> None; called with the Tracker's lock held
Handler = Callable[[str, dict[str, Any], float], None]


class RawWatch:
    """list + watch of one collection, forever (relisting on 410), handing each event to a handler."""

    def __init__(
        self,
        name: str,
        lister: Callable[..., Any],
        handler: Handler,
        lock: threading.Lock,
        selector: str = "",
    ) -> None:
        self.name, self.lister, self.handler, self.lock = name, lister, handler, lock
        self.selector = selector  # pods and Workloads carry JOB_LABEL; TrainingJobs do not
        self.error: str | None = None
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def start(self, timeout: float = 60) -> None:
        self._thread.start()
        if not self._synced.wait(timeout):
            raise TimeoutError(f"{self.name} watch did not sync in {timeout:.0f}s ({self.error})")

    def stop(self, join: bool = True) -> None:
        self._stop.set()
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
        if join:
            self._thread.join(10)

    def _run(self) -> None:
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    resp = self.lister(
                        label_selector=self.selector, _preload_content=False, _request_timeout=120
                    )
                    data = json.loads(resp.data)
                    now = time.time()
                    with self.lock:
                        for obj in data["items"]:
                            self.handler("ADDED", obj, now)
                    self._synced.set()
                    rv = data["metadata"]["resourceVersion"]
                rv = self._watch(rv)
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                if self._stop.wait(1):
                    return

    def _watch(self, rv: str) -> str | None:
        self._resp = self.lister(
            label_selector=self.selector,
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
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                rv = obj["metadata"].get("resourceVersion", rv)
                if event["type"] != "BOOKMARK":
                    with self.lock:
                        self.handler(event["type"], obj, now)
            if self._stop.is_set():
                break
        return rv


@dataclass
class Pod:
    name: str
    node: str
    phase: str
    gpus: int
    deleting: bool
    unschedulable: bool  # the scheduler said PodScheduled=False, Unschedulable

    @property
    def holds_gpus(self) -> bool:
        """Bound to a node and not finished: the scheduler counts its GPUs as taken (a pod being deleted
        still does until it is gone)."""
        return bool(self.node) and self.phase not in TERMINAL


@dataclass
class Job:
    name: str
    nodes: int
    gpus_per_node: int
    duration: float
    pods: dict[str, Pod] = field(default_factory=dict)
    submitted: float | None = None
    first_pod: float | None = None  # the first pod of the job seen (no Kueue: its "admission")
    admitted: float | None = None  # its Workload first seen Admitted (Kueue)
    all_running: float | None = None  # first moment every pod of the gang was Running at once
    reported: float | None = None  # the bench wrote the kubelet's report (pods Succeeded)
    succeeded: float | None = None  # the operator's status said Succeeded
    failed: bool = False
    partial: bool = False  # held GPUs while the scheduler could not place a sibling pod
    partial_since: float | None = None
    partial_s: float = 0.0  # seconds spent as such a partial gang

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def live(self) -> list[Pod]:
        return [p for p in self.pods.values() if not p.deleting and p.phase not in TERMINAL]


class Tracker:
    """Per-job state from the three watches. Every method takes the lock; handlers run under it."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self.jobs = jobs
        self.lock = threading.Lock()
        self.last_progress = time.time()  # a gang newly all Running, or a job newly finished

    # handlers (lock held) ---------------------------------------------------------------------------
    def on_pod(self, kind: str, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        job = self.jobs.get((meta.get("labels") or {}).get(JOB_LABEL, ""))
        if job is None:
            return
        if kind == "DELETED":
            job.pods.pop(meta["name"], None)
        else:
            spec, status = obj.get("spec") or {}, obj.get("status") or {}
            gpus = sum(
                int(((c.get("resources") or {}).get("requests") or {}).get(GPU, 0))
                for c in spec.get("containers") or []
            )
            cond = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {})
            job.pods[meta["name"]] = Pod(
                name=meta["name"],
                node=spec.get("nodeName") or "",
                phase=status.get("phase", ""),
                gpus=gpus,
                deleting=bool(meta.get("deletionTimestamp")),
                unschedulable=cond.get("status") == "False" and cond.get("reason") == "Unschedulable",
            )
            job.first_pod = job.first_pod or now
        self._update(job, now)

    def _update(self, job: Job, now: float) -> None:
        live = job.live()
        if job.all_running is None and len(live) >= job.nodes and all(p.phase == "Running" for p in live):
            job.all_running = now
            self.last_progress = now
        bound = [p for p in live if p.node]
        stuck = [p for p in live if not p.node and p.unschedulable]
        is_partial = job.all_running is None and bool(bound) and bool(stuck)
        if is_partial and job.partial_since is None:
            job.partial, job.partial_since = True, now
        elif not is_partial and job.partial_since is not None:
            job.partial_s += now - job.partial_since
            job.partial_since = None

    def on_job(self, kind: str, obj: dict[str, Any], now: float) -> None:
        job = self.jobs.get(obj["metadata"]["name"])
        if job is None or kind == "DELETED":
            return
        phase = (obj.get("status") or {}).get("phase")
        if phase == "Succeeded" and job.succeeded is None:
            job.succeeded = now
            self.last_progress = now
        elif phase == "Failed" and not job.failed:
            job.failed = True
            self.last_progress = now

    def on_workload(self, kind: str, obj: dict[str, Any], now: float) -> None:
        job = self.jobs.get((obj["metadata"].get("labels") or {}).get(JOB_LABEL, ""))
        if job is None or kind == "DELETED" or job.admitted is not None:
            return
        conds = (obj.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Admitted" and c.get("status") == "True" for c in conds):
            job.admitted = now

    # queries ----------------------------------------------------------------------------------------
    def sample(self) -> tuple[int, int, int, int]:
        """(GPUs held by bound unfinished pods, of those by gangs not yet wholly Running, jobs done,
        gangs running)."""
        with self.lock:
            held = partial = done = running = 0
            for job in self.jobs.values():
                g = sum(p.gpus for p in job.pods.values() if p.holds_gpus)
                held += g
                if job.all_running is None:
                    partial += g
                elif job.reported is None:
                    running += 1
                done += job.succeeded is not None or job.failed
            return held, partial, done, running

    def due(self, now: float) -> list[tuple[str, list[str]]]:
        """Jobs whose gang has been Running for their duration: (job, its live pods) to report finished.
        Marks them reported."""
        out = []
        with self.lock:
            for job in self.jobs.values():
                if (
                    job.all_running is not None
                    and job.reported is None
                    and now >= job.all_running + job.duration
                ):
                    job.reported = now
                    out.append((job.name, [p.name for p in job.live()]))
        return out

    def close(self, now: float) -> None:
        with self.lock:
            for job in self.jobs.values():
                if job.partial_since is not None:
                    job.partial_s += now - job.partial_since
                    job.partial_since = None
