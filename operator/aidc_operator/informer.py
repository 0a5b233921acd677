"""List-then-watch of one resource into the Store, as client-go's reflector does.

One thread per (resource, namespace scope). It lists (paged), hands the list to the store, then watches
from the list's resourceVersion with bookmarks, resuming from the last version it saw; a watch too old
to resume (410 Gone) relists. The label selector goes to the apiserver, so the operator receives only
its own pods and children, never every pod of the cluster. Responses are parsed as plain JSON: no
client model objects are built for the thousands of events a large cluster sends.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from . import kubeio, metrics
from .cache import Key, Store

log = logging.getLogger("aidc.cache")
PAGE = 500
WATCH_SECONDS = 300  # the apiserver ends each watch after about this long; we resume (jittered)
# The apiserver's watch cache sends a bookmark about once a minute on every watch that asked for them,
# so a stream silent this long is stalled, not quiet: give it up and resume from the last version
# (cheap) rather than wait out WATCH_SECONDS with deletions unseen.
WATCH_IDLE_SECONDS = 150


@dataclass(frozen=True)
class Resource:
    kind: str
    group_version: str  # "v1", "apps/v1", …
    plural: str
    namespaced: bool = True
    selector: str | None = None

    def path(self, namespace: str | None) -> str:
        base = "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"
        return f"{base}/namespaces/{namespace}/{self.plural}" if namespace else f"{base}/{self.plural}"


def _timed_out(e: BaseException) -> bool:
    """urllib3 reports a read timeout mid-stream as a ProtocolError wrapping it."""
    while e is not None:
        if isinstance(e, ReadTimeoutError) or "timed out" in str(e):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


class Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


def _get(path: str, query: list[tuple[str, str]], read_timeout: float) -> Any:
    api = kubeio.api()
    method, url, headers, _, _ = api.param_serialize(
        "GET",
        path,
        query_params=query,
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(method, url, header_params=headers, _request_timeout=(10, read_timeout))
    if resp.status != 200:
        body = resp.read()
        raise ApiException(status=resp.status, reason=resp.reason, body=body.decode(errors="replace"))
    return resp.response


class Informer(threading.Thread):
    def __init__(
        self,
        resource: Resource,
        store: Store,
        namespace: str | None = None,
        accepts: Callable[[str], bool] = lambda _ns: True,
        on_synced: Callable[[], None] = lambda: None,
    ) -> None:
        """namespace: watch one namespace (None: all); accepts: which namespaces' objects to keep
        (namespace globs that the apiserver cannot filter)."""
        scope = namespace or "all namespaces"
        super().__init__(name=f"informer-{resource.plural}-{scope}", daemon=True)
        self.resource, self.store, self.namespace = resource, store, namespace
        self.accepts, self.on_synced = accepts, on_synced
        self.synced = threading.Event()
        self.last_version = ""  # the newest resourceVersion the current watch delivered
        self._stop = threading.Event()
        self._events = metrics.WATCH_EVENTS.labels(resource.kind)  # one label lookup, not one per event

    def stop(self) -> None:
        self._stop.set()

    def _query(self, **extra: str) -> list[tuple[str, str]]:
        q = [(k, v) for k, v in extra.items()]
        if self.resource.selector:
            q.append(("labelSelector", self.resource.selector))
        return q

    def _in_scope(self, key: Key) -> bool:
        return (self.namespace is None or key[0] == self.namespace) and self.accepts(key[0])

    def _keep(self, obj: dict[str, Any]) -> bool:
        return self.accepts((obj.get("metadata") or {}).get("namespace") or "")

    def list(self) -> str:
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            extra = {"limit": str(PAGE), **({"continue": cont} if cont else {})}
            resp = _get(self.resource.path(self.namespace), self._query(**extra), 60)
            doc = json.loads(resp.data)
            items += [o for o in doc.get("items") or [] if self._keep(o)]
            cont = (doc.get("metadata") or {}).get("continue") or ""
            if not cont:
                break
        self.store.replace(self.resource.kind, items, self._in_scope)
        return doc["metadata"]["resourceVersion"]

    def watch(self, version: str) -> str:
        seconds = int(WATCH_SECONDS * random.uniform(1.0, 1.5))
        query = self._query(
            watch="true",
            resourceVersion=version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(seconds),
        )
        resp = _get(self.resource.path(self.namespace), query, min(seconds + 30, WATCH_IDLE_SECONDS))
        self.last_version = version
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", ""))
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                self.last_version = version
                if kind == "BOOKMARK" or not self._keep(obj):
                    continue
                self._events.inc()
                self.store.take(self.resource.kind, kind, obj)
        finally:
            resp.release_conn()
        return version

    def run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                version = self.list()
                if not self.synced.is_set():
                    self.synced.set()
                    self.on_synced()
                backoff = 1.0
                while not self._stop.is_set():
                    try:
                        version = self.watch(version)
                    except (ReadTimeoutError, ProtocolError) as e:
                        if not _timed_out(e):
                            raise
                        log.info("watch of %s went silent; resuming", self.resource.plural)
                        version = self.last_version
            except Gone:
                log.info("watch of %s too old; listing again", self.resource.plural)
            except Exception as e:  # an apiserver restart, a network blip, missing RBAC: retry
                message = kubeio.api_message(e) if isinstance(e, ApiException) else repr(e)
                log.warning(
                    "watch of %s failed (%s); retrying in %.0fs", self.resource.plural, message, backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
