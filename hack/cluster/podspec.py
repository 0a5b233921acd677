"""What the development kubelet (local_kubelet.py) makes of a pod's spec on this machine: its volumes as
local directories (Secret volumes as files, a PersistentVolumeClaim as its bound PV's hostPath), a
ServiceAccount token bound to the pod, and the container's environment with the image's absolute paths
rewritten to those local files (podnet.py then rewrites its DNS names and ports).

Everything secret the kubelet writes for a pod lies under its directory's `volumes/` (Secret volumes, and
emptyDirs) and `serviceaccount/` (the token): `scrub` removes both once the pod's processes are gone, as
a kubelet tears down a terminated pod's volumes, so no key outlives its pod on this disk.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

from kubernetes import client


def secret_data(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, bytes]:
    secret = core.read_namespaced_secret(name, namespace)
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def materialise_volumes(core: client.CoreV1Api, pod: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
    """Volume name → local directory."""
    ns = pod["metadata"]["namespace"]
    local: dict[str, Path] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        if "secret" in vol:
            target = pod_dir / "volumes" / name
            target.mkdir(parents=True, exist_ok=True)
            data = secret_data(core, ns, vol["secret"]["secretName"])
            items = vol["secret"].get("items")
            mapping = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
            for key, path in mapping.items():
                f = target / path
                f.write_bytes(data[key])
                f.chmod(0o400)
            local[name] = target
        elif "persistentVolumeClaim" in vol:
            claim = core.read_namespaced_persistent_volume_claim(
                vol["persistentVolumeClaim"]["claimName"], ns
            )
            pv = core.read_persistent_volume(claim.spec.volume_name)
            if not pv.spec.host_path:
                raise RuntimeError(f"PV {pv.metadata.name} is not a hostPath volume")
            local[name] = Path(pv.spec.host_path.path)
            local[name].mkdir(parents=True, exist_ok=True)
        elif "hostPath" in vol:
            local[name] = Path(vol["hostPath"]["path"])
        else:  # emptyDir and anything else: a private directory
            local[name] = pod_dir / "volumes" / name
            local[name].mkdir(parents=True, exist_ok=True)
    return local


def service_account_dir(core: client.CoreV1Api, pod: dict[str, Any], pod_dir: Path, ca: Path) -> Path:
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    sa = pod["spec"].get("serviceAccountName") or "default"
    token = core.create_namespaced_service_account_token(
        sa,
        ns,
        {
            "spec": {
                "audiences": [],
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": name,
                    "uid": pod["metadata"]["uid"],
                },
            }
        },
    ).status.token
    sa_dir = pod_dir / "serviceaccount"
    sa_dir.mkdir(parents=True, exist_ok=True)
    (sa_dir / "token").write_text(token)
    (sa_dir / "ca.crt").write_bytes(ca.read_bytes())
    (sa_dir / "namespace").write_text(ns)
    return sa_dir


def container_env(
    core: client.CoreV1Api,
    pod: dict[str, Any],
    container: dict[str, Any],
    files: dict[str, Path],
    address: str,
) -> dict[str, str]:
    """The container's env: values, downward API fields, Secret keys; a value naming a mount path (or
    below it) or the termination message path is rewritten to the local file."""
    meta = pod["metadata"]
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            value = var["value"]
        elif ref := (var.get("valueFrom") or {}).get("fieldRef"):
            value = {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "status.podIP": address,
                "spec.nodeName": pod["spec"].get("nodeName", ""),
            }.get(ref["fieldPath"], "")
        elif ref := (var.get("valueFrom") or {}).get("secretKeyRef"):
            value = secret_data(core, meta["namespace"], ref["name"])[ref["key"]].decode()
        else:
            continue
        for mount_path, local in sorted(files.items(), key=lambda kv: -len(kv[0])):
            if value == mount_path or value.startswith(mount_path + "/"):
                value = str(local) + value[len(mount_path) :]
                break
        env[var["name"]] = value
    return env


SECRET_DIRS = ("volumes", "serviceaccount")


def scrub(pod_dir: Path) -> None:
    """Removes the pod's volumes (Secret files, emptyDirs) and its ServiceAccount token; its log,
    termination message and address stay for whoever reads them."""
    for name in SECRET_DIRS:
        shutil.rmtree(pod_dir / name, ignore_errors=True)
