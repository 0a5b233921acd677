"""Terminating pods the cache has held long past their grace period are confirmed with one GET.

The store drops a pod on its DELETED watch event. Were that event ever missed (a watch stream that
stalls under load, a write-through that races it), the pod would stay in the cache as terminating and
a gang waiting for its previous attempt to end would wait for good: the planner deletes a terminating
pod on a live node only once, so no API request would ever tell it otherwise. A pass that sees such a
pod asks the apiserver, at most once per RECHECK_SECONDS per pod, and drops it from the store on 404.
While deletions complete normally this costs nothing: no pod is overdue.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from . import gang_pods as gp
from .cache import POD, Store

log = logging.getLogger("aidc.cache")
# Seconds past deletionTimestamp (the deletion request + the grace period): a late kubelet, or a miss.
GRACE_MARGIN = 30.0
RECHECK_SECONDS = 30.0
Reader = Callable[[str, str], dict[str, Any] | None]  # (namespace, name) -> the pod as stored, None on 404


def overdue(
    pods: list[dict[str, Any]], now: dt.datetime, margin: float = GRACE_MARGIN
) -> list[dict[str, Any]]:
    """Pods whose deletion should have completed more than `margin` seconds ago."""
    late = []
    for pod in pods:
        ends = gp.parse_ts(pod["metadata"].get("deletionTimestamp"))
        if ends is not None and (now - ends).total_seconds() > margin:
            late.append(pod)
    return late


class StalePods:
    def __init__(self, store: Store, read: Reader, clock: Callable[[], float]) -> None:
        self.store, self.read, self.clock = store, read, clock
        self._checked: dict[str, float] = {}  # pod uid -> when we last asked

    def confirm(self, pods: list[dict[str, Any]], now: dt.datetime) -> list[dict[str, Any]]:
        """`pods` without those the apiserver no longer has (dropped from the store as well)."""
        vanished: set[str] = set()
        for pod in overdue(pods, now):
            meta = pod["metadata"]
            uid = meta.get("uid") or f"{meta.get('namespace')}/{meta['name']}"
            if self.clock() - self._checked.get(uid, -RECHECK_SECONDS) < RECHECK_SECONDS:
                continue
            self._checked[uid] = self.clock()
            stored = self.read(meta["namespace"], meta["name"])
            if stored is not None and stored["metadata"].get("uid") == meta.get("uid"):
                log.info(
                    "pod %s/%s still terminating %s after its grace period ended (node %s)",
                    meta["namespace"],
                    meta["name"],
                    meta.get("deletionTimestamp"),
                    (pod.get("spec") or {}).get("nodeName") or "none",
                )
                continue
            log.warning(
                "pod %s/%s is gone from the cluster but the cache still held it (a missed watch event)",
                meta["namespace"],
                meta["name"],
            )
            self.store.delete(POD, pod)
            self._checked.pop(uid, None)
            vanished.add(uid)
        return [p for p in pods if p["metadata"].get("uid") not in vanished] if vanished else pods
