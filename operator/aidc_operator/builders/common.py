"""Pieces every builder shares: object identity, labels, owner references, hardened security contexts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import API_VERSION

MANAGED_BY = {"app.kubernetes.io/managed-by": "aidc-operator"}
MANAGED_BY_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())  # the watches' labelSelector
LABEL_JOB = "aidc.dev/job-name"
LABEL_RANK = "aidc.dev/node-rank"
LABEL_ATTEMPT = "aidc.dev/attempt"
LABEL_REPLACEMENT = "aidc.dev/replacement"  # k of a pod that took a lost pod's rank over
LABEL_ISVC = "aidc.dev/inferenceservice"
LABEL_ROLE = "aidc.dev/role"
# Labels copied from a job to its pods so queueing and policy systems (Kueue, Volcano) see them.


@dataclass(frozen=True)
class Owner:
    """The identity of a custom resource, enough to name and own what is built from it."""

    kind: str
    name: str
    namespace: str
    uid: str
    labels: dict[str, str] | None = None

    @classmethod
    def of(cls, body: dict[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(body["kind"], meta["name"], meta["namespace"], meta["uid"], dict(meta.get("labels") or {}))

    def reference(self, controller: bool = True) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": controller,
            "blockOwnerDeletion": True,
        }


def metadata(owner: Owner, name: str, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**MANAGED_BY, **labels},
        "ownerReferences": [owner.reference()],
        **extra,
    }


def pod_security_context() -> dict[str, Any]:
    # Non-root with a fixed uid/gid so a shared checkpoint volume is writable (fsGroup) across attempts.
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def merge_env(base: list[dict[str, Any]], *extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Environment variables in order; a later definition of the same name replaces an earlier one."""
    merged: dict[str, dict[str, Any]] = {}
    for env in (base, *extra):
        for var in env:
            merged[var["name"]] = var
    return list(merged.values())
