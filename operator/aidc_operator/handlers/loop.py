"""The reconcile loop both kinds share: one kopf daemon per object runs a level-based pass (in a
thread: the Kubernetes client is synchronous), posts the pass's Events, and sleeps until the pass's
requeue time or until a watch event wakes it. A restarted operator simply starts the loops again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import kopf
from kubernetes.client.exceptions import ApiException

from .. import metrics


class EventLike(Protocol):
    type: str
    reason: str
    message: str


@dataclass
class Outcome:
    """What one pass asks of the loop: when to run again, and what to tell the user."""

    requeue_after: float
    events: list[Any] = field(default_factory=list)


def api_message(e: ApiException) -> str:
    """The apiserver's own sentence (it names the resource and verb, e.g. a missing RBAC rule)."""
    try:
        return json.loads(e.body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return f"{e.status} {e.reason}"


class ReconcileLoops:
    """The running loops of one kind, by (namespace, name), so watch handlers can wake them."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.log = logging.getLogger(f"aidc.{kind.lower()}")
        self._wakeups: dict[tuple[str, str], asyncio.Event] = {}

    def wake(self, namespace: str | None = None, name: str | None = None) -> None:
        """Run now: one object's loop, every loop in a namespace (name None), or all (both None)."""
        for (ns, obj), event in list(self._wakeups.items()):
            if (namespace is None or ns == namespace) and (name is None or obj == name):
                event.set()

    async def run(
        self,
        namespace: str,
        name: str,
        body: kopf.Body,
        stopped: kopf.DaemonStopped,
        reconcile: Callable[[str, str], Outcome | None],
        on_gone: Callable[[str, str], None] | None = None,
    ) -> None:
        key = (namespace, name)
        wakeup = self._wakeups.setdefault(key, asyncio.Event())
        try:
            while not stopped:
                wakeup.clear()
                started = time.monotonic()
                try:
                    outcome = await asyncio.to_thread(reconcile, namespace, name)
                except ApiException as e:
                    self.log.warning(
                        "reconcile %s/%s: API error %s: %s; retrying",
                        namespace,
                        name,
                        e.status,
                        api_message(e),
                    )
                    metrics.RECONCILE_ERRORS.labels(self.kind).inc()
                    outcome = Outcome(5)
                finally:
                    metrics.RECONCILE_SECONDS.labels(self.kind).observe(time.monotonic() - started)
                if outcome is None:  # the object is gone
                    if on_gone:
                        on_gone(namespace, name)
                    return
                for ev in outcome.events:
                    kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout=outcome.requeue_after)
        finally:
            self._wakeups.pop(key, None)
