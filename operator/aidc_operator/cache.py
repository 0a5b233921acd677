"""The operator's picture of the cluster: one in-memory store, fed by watches, that every reconcile pass
reads instead of asking the apiserver (the shape of a controller-runtime informer cache).

Informers (informer.py) and kopf's custom-resource events write here; passes read. The store keeps
- every watched object by kind and (namespace, name), with managedFields dropped and Nodes trimmed to
  what a health verdict needs, so 1,000 nodes and 4,000 pods stay a few tens of MiB;
- pods indexed by the aidc label that owns them (job, inference service) and by node, so a pass finds
  its pods, and a node change finds the jobs it concerns, without scanning;
- a LeaseClock: when each node's Lease was last seen renewed, on the operator's monotonic clock.
Listeners hear each real change (kind, old, new); an object seen again unchanged (our own write coming
back through the watch) is not a change. Thread-safe: informers write from their threads.
Objects handed out are the store's own: callers treat them as read-only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from . import metrics
from .recovery import LeaseClock, NodeHealth, node_health

Key = tuple[str, str]  # (namespace, name); "" for cluster-scoped objects
Listener = Callable[[str, dict[str, Any] | None, dict[str, Any] | None], None]

POD, NODE, LEASE = "Pod", "Node", "Lease"
TRAININGJOB, INFERENCESERVICE = "TrainingJob", "InferenceService"
INDEXED_LABELS = ("aidc.dev/job-name", "aidc.dev/inferenceservice")
TOMBSTONES = 20_000  # recently deleted objects remembered, so a late write-through cannot revive one


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


def _version(obj: dict[str, Any] | None) -> int | None:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # opaque: never compared


def trim_node(node: dict[str, Any]) -> dict[str, Any]:
    """What a health verdict reads: deletion, Ready condition, taints. Heartbeat times are dropped, so
    a node's routine status updates compare equal and wake nobody."""
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "resourceVersion": meta.get("resourceVersion"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {
            "taints": [{"key": t.get("key"), "effect": t.get("effect")} for t in spec.get("taints") or []]
        },
        "status": {
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or []
                if c.get("type") == "Ready"
            ]
        },
    }


def trim_lease(lease: dict[str, Any]) -> dict[str, Any]:
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    return {
        "metadata": {"name": meta.get("name"), "resourceVersion": meta.get("resourceVersion")},
        "spec": {
            "renewTime": spec.get("renewTime"),
            "leaseDurationSeconds": spec.get("leaseDurationSeconds"),
        },
    }


def trim(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    if kind == NODE:
        return trim_node(obj)
    if kind == LEASE:
        return trim_lease(obj)
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return obj


def same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal apart from resourceVersion (a Node's heartbeat, once trimmed, changes only that)."""
    if a is None or b is None:
        return a is b

    def strip(o: dict[str, Any]) -> dict[str, Any]:
        return {**o, "metadata": {k: v for k, v in o["metadata"].items() if k != "resourceVersion"}}

    return strip(a) == strip(b)


class Store:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.leases = LeaseClock()
        self._lock = threading.RLock()
        self._objects: dict[str, dict[Key, dict[str, Any]]] = defaultdict(dict)
        self._by_label: dict[tuple[str, str, str], set[Key]] = defaultdict(set)  # (label, ns, value)
        self._by_node: dict[str, set[Key]] = defaultdict(set)
        self._tombstones: OrderedDict[tuple[str, Key], int | None] = OrderedDict()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # reads ------------------------------------------------------------------
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects[kind].get((namespace, name))

    def list(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            objs = self._objects[kind]
            return [o for (ns, _), o in objs.items() if namespace is None or ns == namespace]

    def names(self, kind: str) -> list[str]:
        with self._lock:
            return [name for _, name in self._objects[kind]]

    def count(self, kind: str) -> int:
        with self._lock:
            return len(self._objects[kind])

    def pods_with(self, label: str, namespace: str, value: str) -> list[dict[str, Any]]:
        with self._lock:
            pods = self._objects[POD]
            return [pods[k] for k in self._by_label.get((label, namespace, value), ()) if k in pods]

    def owners_on_node(self, node: str, label: str) -> set[Key]:
        """(namespace, label value) of every pod on the node carrying the label: the jobs it concerns."""
        with self._lock:
            pods = self._objects[POD]
            found = set()
            for k in self._by_node.get(node, ()):
                value = ((pods.get(k) or {}).get("metadata", {}).get("labels") or {}).get(label)
                if value:
                    found.add((k[0], value))
            return found

    def nodes_with_pods(self) -> list[str]:
        with self._lock:
            return [n for n, keys in self._by_node.items() if keys]

    def health(self) -> NodeHealthView:
        return NodeHealthView(self, self.clock())

    # writes -----------------------------------------------------------------
    def upsert(self, kind: str, obj: dict[str, Any]) -> bool:
        """Takes obj (a watch event, a list item, or the answer to our own write). An older version than
        the one held is ignored, so a write-through is never undone by a late event. True: it changed."""
        obj = trim(kind, obj)
        key = key_of(obj)
        with self._lock:
            old = self._objects[kind].get(key)
            new_v, old_v = _version(obj), _version(old)
            if old is not None and new_v is not None and old_v is not None and new_v <= old_v:
                return False
            if old is None and (kind, key) in self._tombstones:
                gone_v = self._tombstones[(kind, key)]
                if new_v is not None and gone_v is not None and new_v <= gone_v:
                    return False  # our own write's answer, arriving after the watch saw it deleted
                del self._tombstones[(kind, key)]
            self._objects[kind][key] = obj
            self._index(kind, key, old, obj)
            if kind == LEASE:
                self.leases.observe(key[1], obj, self.clock())
        if same(old, obj):
            return False
        self._notify(kind, old, obj)
        return True

    def take(self, kind: str, event_type: str | None, obj: dict[str, Any]) -> bool:
        """A watch event as kopf or an informer delivers it."""
        return self.delete(kind, obj) if event_type == "DELETED" else self.upsert(kind, obj)

    def delete(self, kind: str, obj: dict[str, Any]) -> bool:
        key = key_of(obj)
        with self._lock:
            old = self._objects[kind].pop(key, None)
            self._tombstones[(kind, key)] = _version(obj)
            self._tombstones.move_to_end((kind, key))
            if len(self._tombstones) > TOMBSTONES:
                self._tombstones.popitem(last=False)
            self._index(kind, key, old, None)
            if kind == LEASE:
                self.leases.observe(key[1], None, self.clock())
        if old is None:
            return False
        self._notify(kind, old, None)
        return True

    def replace(self, kind: str, objs: list[dict[str, Any]], in_scope: Callable[[Key], bool]) -> None:
        """A fresh list (start, or a watch too old to resume): objects in scope that it lacks are gone."""
        fresh = {key_of(o) for o in objs}
        with self._lock:
            gone = [o for k, o in self._objects[kind].items() if in_scope(k) and k not in fresh]
        for o in gone:
            self.delete(kind, o)
        for o in objs:
            self.upsert(kind, o)

    def _index(self, kind: str, key: Key, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        if (old is None) != (new is None):  # the count changed
            metrics.CACHE_OBJECTS.labels(kind).set(len(self._objects[kind]))
        if kind != POD:
            return
        for obj, add in ((old, False), (new, True)):
            if obj is None:
                continue
            labels = obj["metadata"].get("labels") or {}
            slots = [self._by_label[(lbl, key[0], labels[lbl])] for lbl in INDEXED_LABELS if lbl in labels]
            node = (obj.get("spec") or {}).get("nodeName")
            if node:
                slots.append(self._by_node[node])
            for slot in slots:
                if add:
                    slot.add(key)
                else:
                    slot.discard(key)

    def _notify(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        for listener in self._listeners:
            listener(kind, old, new)


class NodeHealthView(Mapping[str, NodeHealth]):
    """Node health as the planner asks for it, computed per node on demand at one instant: a pass looks
    at its own pods' nodes, not at all 1,000. A missing name is a deleted node."""

    def __init__(self, store: Store, now: float) -> None:
        self._store, self._now = store, now

    def __getitem__(self, name: str) -> NodeHealth:
        node = self._store.get(NODE, "", name)
        if node is None:
            raise KeyError(name)
        leases = self._store.leases
        return node_health(node, name, leases.lapsed(name, self._now), leases.renewal(name, self._now))

    def __iter__(self) -> Iterator[str]:
        return iter(self._store.names(NODE))

    def __len__(self) -> int:
        return self._store.count(NODE)
