"""Helpers of the end-to-end tests: hostPath volumes, a job's status, the trainer's JSON log events."""

from __future__ import annotations

import json
from pathlib import Path

from tests.kube import Kube, wait_for


def hostpath_claim(kube: Kube, namespace: str, name: str, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    kube.core.create_persistent_volume(
        {
            "metadata": {"name": f"{namespace}-{name}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": str(path)},
                "claimRef": {"namespace": namespace, "name": name},
                "persistentVolumeReclaimPolicy": "Retain",
            },
        }
    )
    kube.core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": f"{namespace}-{name}",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    wait_for(
        "PVC bound",
        lambda: kube.core.read_namespaced_persistent_volume_claim(name, namespace).status.phase == "Bound",
    )


def status(kube: Kube, ns: str, name: str) -> dict:
    return kube.get_cr("trainingjobs", ns, name).get("status") or {}


def events_of(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
