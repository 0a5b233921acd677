"""Start-up of the watch-fed machinery, and who wakes whom.

The watch set (docs/operations.md lists it): the operator's own pods and children, selected by the
`app.kubernetes.io/managed-by=aidc-operator` label on the apiserver; the PersistentVolumeClaims of the
watched namespaces (read when a pod waits for one; a claim's change wakes nobody, its pod's change
does); Nodes and the node Leases in kube-node-lease (both needed whole: any node may host a job);
TrainingJobs and InferenceServices through kopf. Each change wakes only the objects it concerns:
- a pod or child → the job or inference service named by its aidc label;
- a Node whose health-relevant fields changed (heartbeats are trimmed away) → the jobs with pods on it
  and the jobs that avoid it (status.excludedNodes: they stop avoiding it once it is healthy);
- a Lease that stops (or resumes) being renewed → the same jobs (the watchdog below: a lapse is the
  *absence* of events, so it is noticed by time, once a second, over the nodes our jobs concern);
- a TrainingJob → itself and the InferenceServices that serve it;
- with Kueue, a Workload we made → its job (by the same aidc label as a pod);
- with the Gateway API served, an HTTPRoute or GRPCRoute we made → its InferenceService (same label).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from .. import kubeio, metrics, queueing, volumes
from ..builders.common import LABEL_ISVC, LABEL_JOB
from ..builders.common import MANAGED_BY_SELECTOR as _SELECTOR
from ..cache import INFERENCESERVICE, LEASE, NODE, POD, TRAININGJOB
from ..informer import Informer, Resource
from ..runtime import CONFIG, STORE
from . import gateway_discovery
from .inferenceservice import SERVICES, services_serving
from .trainingjob import JOBS

log = logging.getLogger("aidc.cache")
NODE_LEASE_NAMESPACE = "kube-node-lease"  # kubelets renew one Lease per node here
WATCHDOG_SECONDS = 1.0
OWNED = (
    Resource(POD, "v1", "pods", selector=_SELECTOR),
    Resource("Service", "v1", "services", selector=_SELECTOR),
    Resource("ServiceAccount", "v1", "serviceaccounts", selector=_SELECTOR),
    Resource("Role", "rbac.authorization.k8s.io/v1", "roles", selector=_SELECTOR),
    Resource("RoleBinding", "rbac.authorization.k8s.io/v1", "rolebindings", selector=_SELECTOR),
    Resource("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies", selector=_SELECTOR),
    Resource("Deployment", "apps/v1", "deployments", selector=_SELECTOR),
    Resource("HorizontalPodAutoscaler", "autoscaling/v2", "horizontalpodautoscalers", selector=_SELECTOR),
)
NODES = Resource(NODE, "v1", "nodes", namespaced=False)
# The users' PersistentVolumeClaims (not ours, so not selected): a pod waiting for one says which and why.
CLAIMS = Resource(volumes.PVC, "v1", "persistentvolumeclaims")
LEASES = Resource(LEASE, "coordination.k8s.io/v1", "leases")
# With Kueue: the Workloads we made (a change wakes its job by its aidc label) and the ResourceFlavors
# whose node labels an admitted gang is placed with.
KUEUE = (
    Resource(queueing.WORKLOAD, queueing.API_VERSION, "workloads", selector=_SELECTOR),
    Resource(queueing.FLAVOR, queueing.API_VERSION, "resourceflavors", namespaced=False),
)


def namespace_filter(patterns: list[str]) -> tuple[list[str | None], Any]:
    """(namespaces to watch, which namespaces' objects to keep) for the --namespace patterns: exact
    names are watched one by one (a namespaced install's RBAC allows no more); globs need a
    cluster-wide watch filtered here; no pattern is the whole cluster."""
    if not patterns:
        return [None], lambda _ns: True
    if all(not set(p) & set("*?[]!,") for p in patterns):
        return list(patterns), lambda _ns: True
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]

    def accepts(ns: str) -> bool:
        return any(fnmatch.fnmatchcase(ns, p) for p in include or ["*"]) and not any(
            fnmatch.fnmatchcase(ns, p) for p in exclude
        )

    return [None], accepts


def jobs_concerning(node: str) -> set[tuple[str, str]]:
    """Jobs with a pod on the node, and jobs keeping their gang off it."""
    keys = STORE.owners_on_node(node, LABEL_JOB)
    for job in STORE.list(TRAININGJOB):
        if node in ((job.get("status") or {}).get("excludedNodes") or ()):
            keys.add((job["metadata"]["namespace"], job["metadata"]["name"]))
    return keys


def watched_nodes() -> set[str]:
    nodes = set(STORE.nodes_with_pods())
    for job in STORE.list(TRAININGJOB):
        nodes.update((job.get("status") or {}).get("excludedNodes") or ())
    return nodes


def route(kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
    """Store listener (any thread): wake exactly the objects this change concerns."""
    obj = new or old
    assert obj is not None
    meta = obj["metadata"]
    if kind == LEASE:
        return  # renewals are the watchdog's business
    if kind == NODE:
        for key in jobs_concerning(meta["name"]):
            JOBS.wake_threadsafe(key)
        return
    ns = meta.get("namespace") or ""
    if kind == TRAININGJOB:
        JOBS.wake_threadsafe((ns, meta["name"]))
        for isvc in services_serving(ns, meta["name"]):
            SERVICES.wake_threadsafe((ns, isvc))
        return
    if kind == INFERENCESERVICE:
        SERVICES.wake_threadsafe((ns, meta["name"]))
        return
    labels = meta.get("labels") or {}
    if job := labels.get(LABEL_JOB):
        JOBS.wake_threadsafe((ns, job))
    if isvc := labels.get(LABEL_ISVC):
        SERVICES.wake_threadsafe((ns, isvc))


async def lease_watchdog() -> None:
    """Wakes the jobs on a node the moment its Lease lapses (and once more when it is renewed)."""
    lapsed: set[str] = set()
    while True:
        await asyncio.sleep(WATCHDOG_SECONDS)
        now = STORE.clock()
        for node in watched_nodes():
            is_lapsed = STORE.leases.lapsed(node, now)
            if is_lapsed == (node in lapsed):
                continue
            (lapsed.add if is_lapsed else lapsed.discard)(node)
            if is_lapsed:
                log.warning("node %s: Lease not renewed for its leaseDurationSeconds; waking its jobs", node)
            for key in jobs_concerning(node):
                JOBS.wake(key)


_running: dict[str, Any] = {}


@kopf.on.startup()
async def start_cache(logger: kopf.Logger, **_: Any) -> None:
    loop = asyncio.get_running_loop()
    synced = asyncio.Event()
    scopes, accepts = namespace_filter(CONFIG.namespaces)
    informers = [Informer(r, STORE, ns, accepts) for r in (*OWNED, CLAIMS) for ns in scopes]
    informers += [Informer(NODES, STORE), Informer(LEASES, STORE, NODE_LEASE_NAMESPACE)]
    if CONFIG.kueue != "off":
        CONFIG.kueue_served = await loop.run_in_executor(None, kubeio.serves, queueing.API_VERSION)
        if CONFIG.kueue == "on" and not CONFIG.kueue_served:
            # Its informers would never sync, and no pass would ever run: refuse to start instead.
            raise kopf.PermanentError(f"--kueue on, but the cluster does not serve {queueing.API_VERSION}")
    if CONFIG.kueue_served:
        informers += [Informer(KUEUE[0], STORE, ns, accepts) for ns in scopes] + [Informer(KUEUE[1], STORE)]
    # A watch of a resource the cluster does not serve would never sync (and no pass would run): the
    # route kinds served now are watched from the start, the others once they are installed.
    routes: list[Resource] = []
    try:
        routes = await asyncio.to_thread(gateway_discovery.served_routes)
    except ApiException as e:  # optional: weighted canaries say so in their Routed condition
        logger.warning(f"cannot tell whether the Gateway API is served ({e.status}); checking again later")
    gateway_discovery.mark_served(routes)

    def informers_for(resource: Resource) -> list[Informer]:
        return [Informer(resource, STORE, ns, accepts) for ns in scopes]

    informers += [i for r in routes for i in informers_for(r)]

    initial = list(informers)  # route informers started later do not hold the first passes back

    def on_synced() -> None:
        if all(i.synced.is_set() for i in initial):
            loop.call_soon_threadsafe(synced.set)

    for informer in initial:
        informer.on_synced = on_synced
    STORE.subscribe(route)
    for informer in initial:
        informer.start()
    JOBS.start(synced)
    SERVICES.start(synced)
    _running.update(informers=informers, watchdog=asyncio.create_task(lease_watchdog()))
    later = gateway_discovery.await_routes(routes, informers_for, informers)  # stopped with the rest
    _running["gateway"] = asyncio.create_task(later)
    logger.info(
        f"watching {len(informers)} resource scopes; passes start once the cache has synced "
        f"({CONFIG.job_workers} TrainingJob and {CONFIG.service_workers} InferenceService workers; "
        f"Kueue integration {'on' if CONFIG.kueue_served else 'off'}; "
        f"Gateway API {'served' if CONFIG.gateway_api_served else 'not served'})"
    )


@kopf.on.cleanup()
async def stop_cache(**_: Any) -> None:
    for informer in _running.get("informers", []):
        informer.stop()
    for name in ("watchdog", "gateway"):
        if task := _running.get(name):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await JOBS.stop()
    await SERVICES.stop()
    metrics.QUEUE_DEPTH.labels("TrainingJob").set(0)
