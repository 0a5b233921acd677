"""Kubernetes Events about our objects, posted through the operator's own (counted, rate-limited)
client. An Event that cannot be posted is logged and dropped: it never fails a pass."""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import Any

from kubernetes.client.exceptions import ApiException

from . import kubeio

COMPONENT = "aidc-operator"
MAX_MESSAGE = 1024
log = logging.getLogger("aidc.events")


def event_body(
    obj: dict[str, Any], type_: str, reason: str, message: str, now: dt.datetime
) -> dict[str, Any]:
    meta = obj["metadata"]
    ts = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "count": 1,
    }


def post(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    body = event_body(obj, type_, reason, message, dt.datetime.now(dt.UTC))
    meta = obj["metadata"]
    log.log(
        logging.WARNING if type_ == "Warning" else logging.INFO,
        "[%s/%s] %s: %s",
        meta["namespace"],
        meta["name"],
        reason,
        message,
    )
    try:
        kubeio.core().create_namespaced_event(body["metadata"]["namespace"], body, _preload_content=False)
    except ApiException as e:
        log.warning(
            "could not post event %s on %s: %s", reason, obj["metadata"]["name"], kubeio.api_message(e)
        )
