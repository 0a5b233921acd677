"""`python -m aidc_operator release`: what the chart's pre-delete hook runs on `helm uninstall`.

kopf puts the finalizer `aidc.dev/operator` on every TrainingJob and InferenceService it serves (it runs a
daemon per object and must stop it before the object goes). Once the operator is uninstalled nobody removes
it, and deleting such an object would hang forever. So, before helm deletes the operator:

1. scale the operator's Deployment to 0 and wait until its pods are gone: a running replica would put
   the finalizer straight back on the next event;
2. remove only that finalizer from every object in the namespaces it served. The objects, their pods and
   key Secrets stay as they are; a later install adopts them again (kopf re-adds its finalizer).

Every step is idempotent, so a retried hook (or running this by hand) is safe.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .api.base import GROUP, VERSION

FINALIZER = f"{GROUP}/operator"  # kopf's settings.persistence.finalizer (main.py)
PLURALS = ("trainingjobs", "inferenceservices")
log = logging.getLogger("aidc.release")


def without_finalizer(finalizers: Iterable[str] | None) -> list[str] | None:
    """The finalizer list with the operator's removed, or None when it carries none (nothing to write)."""
    current = list(finalizers or [])
    return [f for f in current if f != FINALIZER] if FINALIZER in current else None


def stop_operator(
    apps: client.AppsV1Api,
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Scale the Deployment to 0 and wait until none of its pods is left (terminating ones included)."""
    try:
        deploy = apps.read_namespaced_deployment(name, namespace)
    except ApiException as e:
        if e.status == 404:
            log.info("deployment %s/%s not found: nothing to stop", namespace, name)
            return
        raise
    apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 0}})
    labels = deploy.spec.selector.match_labels or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    deadline = clock() + timeout
    while pods := core.list_namespaced_pod(namespace, label_selector=selector).items:
        if clock() > deadline:
            names = ", ".join(p.metadata.name for p in pods)
            raise SystemExit(f"operator pods still running after {timeout:.0f} s: {names}")
        sleep(1.0)
    log.info("operator %s/%s scaled to 0, no pod left", namespace, name)


def release_finalizers(custom: client.CustomObjectsApi, namespaces: list[str]) -> int:
    """Remove the operator's finalizer from every served object; returns how many were changed."""
    changed = 0
    for plural in PLURALS:
        for obj in _list(custom, plural, namespaces):
            meta = obj["metadata"]
            rest = without_finalizer(meta.get("finalizers"))
            if rest is None:
                continue
            # resourceVersion: a concurrent change makes this a 409 instead of dropping someone's finalizer.
            patch: dict[str, Any] = {
                "metadata": {"finalizers": rest, "resourceVersion": meta["resourceVersion"]}
            }
            try:
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], plural, meta["name"], patch
                )
            except ApiException as e:
                if e.status == 404:
                    continue
                raise
            changed += 1
            log.info("released %s %s/%s", plural, meta["namespace"], meta["name"])
    return changed


def _list(custom: client.CustomObjectsApi, plural: str, namespaces: list[str]) -> list[dict[str, Any]]:
    if not namespaces:
        return custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]
    items: list[dict[str, Any]] = []
    for ns in namespaces:
        items += custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]
    return items


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="aidc-operator release", description=__doc__.splitlines()[0])
    ap.add_argument("--deployment", required=True, help="the operator's Deployment")
    ap.add_argument("--deployment-namespace", required=True)
    ap.add_argument("-n", "--namespace", action="append", default=[], help="served namespace; default: all")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the operator pods")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    stop_operator(
        client.AppsV1Api(api), client.CoreV1Api(api), args.deployment_namespace, args.deployment, args.timeout
    )
    total = release_finalizers(client.CustomObjectsApi(api), args.namespace)
    log.info("released %d object(s) from finalizer %s", total, FINALIZER)
