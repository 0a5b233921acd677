"""The reconcile machinery both kinds share, shaped like a controller-runtime controller: a work queue of
object keys fed by watch events, a fixed pool of workers running level-based passes (in threads: the
Kubernetes client is synchronous), Events posted after each pass, and a timed pass when a pass asks.

kopf runs one tiny daemon per object (activate/deactivate below). It reconciles nothing: it tells the
controller which objects this replica serves, so peering (a standby replica pauses its daemons) and
deletion stop the passes exactly as kopf stops daemons."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from .. import events, metrics
from ..cache import Key
from ..kubeio import api_message
from ..workqueue import WorkQueue

JITTER_FROM = 60.0  # requeues this long or longer are spread out, so resyncs never come in a wave
MAX_ERROR_BACKOFF = 300.0
# A pass reads the cache and makes a few bounded API calls: one still running after this long is stuck
# somewhere, and the log says where (code locations only), every this many seconds until it returns.
SLOW_PASS_SECONDS = 60.0


class EventLike(Protocol):
    type: str
    reason: str
    message: str


@dataclass
class Outcome:
    """What one pass asks of the controller: when to run again, and what to tell the user (about
    `subject`, the object as the pass read it)."""

    requeue_after: float
    events: list[Any] = field(default_factory=list)
    subject: dict[str, Any] | None = None


Reconcile = Callable[[str, str], Outcome | None]


def jittered(delay: float) -> float:
    return delay * random.uniform(1.0, 1.2) if delay >= JITTER_FROM else delay


class Controller:
    """One kind's queue and workers. reconcile(namespace, name) -> Outcome, or None when the object is
    gone (then on_gone(namespace, name))."""

    def __init__(
        self,
        kind: str,
        reconcile: Reconcile,
        workers: int = 4,
        on_gone: Callable[[str, str], None] | None = None,
    ) -> None:
        self.kind, self.reconcile, self.workers, self.on_gone = kind, reconcile, workers, on_gone
        self.log = logging.getLogger(f"aidc.{kind.lower()}")
        self.active: set[Key] = set()
        self.queue: WorkQueue[Key] = WorkQueue()
        self._errors: dict[Key, int] = {}
        self._threads: dict[Key, int] = {}  # key -> the worker thread running its pass
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # feeding the queue ------------------------------------------------------------
    def activate(self, key: Key) -> None:
        self.active.add(key)
        self.wake(key)

    def deactivate(self, key: Key) -> None:
        self.active.discard(key)
        self.queue.forget(key)

    def wake(self, key: Key) -> None:
        """Run a pass for key soon (loop thread only)."""
        if key in self.active:
            self.queue.add(key)
            metrics.QUEUE_DEPTH.labels(self.kind).set(len(self.queue))

    def wake_threadsafe(self, key: Key) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.wake, key)

    async def serve(self, key: Key, stopped: Any) -> None:
        """The body of a kind's kopf daemon: passes run for key until kopf stops the daemon."""
        self.activate(key)
        try:
            await stopped.wait()
        finally:
            self.deactivate(key)

    # running ----------------------------------------------------------------------
    def start(self, synced: asyncio.Event) -> None:
        """Workers begin once the cache has synced: a pass must never mistake a cache still filling for
        a world without pods."""
        self._loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(self.workers, thread_name_prefix=f"reconcile-{self.kind.lower()}")
        self._tasks = [asyncio.create_task(self.queue.run_timer())]
        self._tasks += [asyncio.create_task(self._worker(executor, synced)) for _ in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self, executor: ThreadPoolExecutor, synced: asyncio.Event) -> None:
        await synced.wait()
        loop = asyncio.get_running_loop()
        while True:
            key, waited = await self.queue.get()
            metrics.QUEUE_DEPTH.labels(self.kind).set(len(self.queue))
            try:
                if key in self.active:
                    metrics.QUEUE_WAIT.labels(self.kind).observe(waited)
                    delay = await self._watched(loop.run_in_executor(executor, self._pass, key), key)
                    if delay is not None and key in self.active:
                        self.queue.schedule(key, delay)
            finally:
                self.queue.done(key)

    async def _watched(self, running: asyncio.Future[float | None], key: Key) -> float | None:
        """Awaits a pass, logging where it is whenever it has run SLOW_PASS_SECONDS more."""
        waited = 0.0
        while True:
            done, _ = await asyncio.wait({running}, timeout=SLOW_PASS_SECONDS)
            if done:
                return running.result()
            waited += SLOW_PASS_SECONDS
            metrics.SLOW_PASSES.labels(self.kind).inc()
            self.log.warning(
                "pass for %s/%s still running after %.0fs, at %s", *key, waited, self._where(key)
            )

    def _where(self, key: Key) -> str:
        frame = sys._current_frames().get(self._threads.get(key, -1))
        if frame is None:
            return "?"
        stack = traceback.extract_stack(frame)[-4:]
        return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(stack))

    def _pass(self, key: Key) -> float | None:
        """One pass and its Events (worker thread). Returns when to look again (None: gone)."""
        namespace, name = key
        self._threads[key] = threading.get_ident()
        started = time.monotonic()
        metrics.PASSES.labels(self.kind).inc()
        try:
            outcome = self.reconcile(namespace, name)
        except Exception as e:  # an API hiccup or a bug: log, back off, never crash the operator
            errors = self._errors[key] = self._errors.get(key, 0) + 1
            delay = min(MAX_ERROR_BACKOFF, 2.0 ** min(errors, 10))
            metrics.RECONCILE_ERRORS.labels(self.kind).inc()
            if isinstance(e, ApiException):
                self.log.warning(
                    "reconcile %s/%s: API error %s: %s; retrying in %.0fs",
                    namespace,
                    name,
                    e.status,
                    api_message(e),
                    delay,
                )
            else:
                self.log.exception("reconcile %s/%s failed; retrying in %.0fs", namespace, name, delay)
            return delay
        finally:
            self._threads.pop(key, None)
            metrics.RECONCILE_SECONDS.labels(self.kind).observe(time.monotonic() - started)
        self._errors.pop(key, None)
        if outcome is None:
            if self.on_gone:
                self.on_gone(namespace, name)
            return None
        if outcome.subject is not None:
            for ev in outcome.events:
                events.post(outcome.subject, ev.type, ev.reason, ev.message)
        return jittered(outcome.requeue_after)
