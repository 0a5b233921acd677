"""InferenceService passes, woken by their pods' and children's watch events and by changes of the
TrainingJob they serve. Each pass resolves the model source from the store, server-side-applies the
Deployment(s), Service and HPA the builders render — only when what they render changed (a hash of it
rides on each child) — and writes status when it differs: level-based and idempotent, so a restarted
operator simply adopts what exists, and a quiet service costs no request between safety resyncs."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from .. import admission, kubeio, lifecycle, metrics, volumes
from ..api import GROUP, VERSION
from ..api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus, ModelSpec
from ..builders import httproute as routing
from ..builders import inferenceservice as build
from ..builders.common import LABEL_ISVC, LABEL_ROLE, Owner
from ..cache import INFERENCESERVICE, TRAININGJOB
from ..conditions import get_condition, set_condition
from ..kubeio import api_message
from ..runtime import CONFIG, STORE
from ..serving_status import (
    Event,
    Resolution,
    ServerReport,
    ask_again,
    plan_status,
    ready_replicas,
    server_reason,
    transition_events,
    version_recheck,
)
from .loop import Controller, Outcome
from .validation import describe_validation_error

PLURAL = "inferenceservices"
PROBED_PODS = 5  # servers asked per pass: enough to explain, cheap at any scale
PROXY_TIMEOUT_SECONDS = 5
RESYNC_SECONDS = lifecycle.RESYNC_SECONDS  # events wake a pass; this is only the safety net
WAITING_RESYNC_SECONDS = 30.0  # model source missing: TrainingJob events wake us; this is a fallback
INITIAL_SCALE_MANAGER = "aidc-operator-initial-scale"
APPLIED_HASH = "aidc.dev/applied-hash"  # on each child: a digest of what we last applied
# Waiting reasons that are just a pod starting, not a problem worth showing.
_STARTING = {"ContainerCreating", "PodInitializing"}
log = logging.getLogger("aidc.inferenceservice")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resolve(namespace: str, model: ModelSpec) -> Resolution:
    if model.storage is not None:
        return Resolution(
            build.resolve_storage(model), "StorageConfigured", "serving checkpoints from model.storage"
        )
    job_name = model.from_training_job
    job = STORE.get(TRAININGJOB, namespace, job_name or "")
    if job is None:
        return Resolution(None, "TrainingJobNotFound", f"TrainingJob {job_name!r} not found; waiting for it")
    try:
        resolved = build.resolve_training_job(job)
    except build.Unresolvable as e:
        return Resolution(None, e.reason, e.message, job)
    except ValidationError as e:
        return Resolution(
            None, "TrainingJobInvalid", f"TrainingJob {job_name!r}: {e.error_count()} error(s)", job
        )
    return Resolution(resolved, "TrainingJobResolved", f"serving TrainingJob {job_name!r} checkpoints", job)


def _invalid(body: dict[str, Any], message: str) -> Outcome:
    """Record an invalid spec once per generation (Invalid condition, phase Failed, Event naming the field);
    existing children are left serving what they serve until the spec is fixed."""
    old = body.get("status") or {}
    generation = body["metadata"].get("generation")
    st = InferenceServiceStatus.model_validate(old)
    already = get_condition(st.conditions, "Invalid")
    if already and already.status == "True" and already.observed_generation == generation:
        return Outcome(RESYNC_SECONDS)
    set_condition(st.conditions, "Invalid", "True", "InvalidSpec", message, _now(), generation)
    st.phase, st.observed_generation = "Failed", generation
    meta = body["metadata"]
    status = st.model_dump(by_alias=True, mode="json")
    STORE.upsert(INFERENCESERVICE, kubeio.patch_status(PLURAL, meta["namespace"], meta["name"], status))
    return Outcome(RESYNC_SECONDS, [Event("Warning", "InvalidSpec", message)], body)


def applied_hash(desired: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(desired, sort_keys=True).encode()).hexdigest()[:20]


def _apply(
    desired: dict[str, Any], before: dict[str, Any] | None, what: str, events: list[Event]
) -> dict[str, Any]:
    """Server-side apply, skipped when the child already carries the digest of exactly this rendering
    (an edit of the child by hand is then left alone until the spec changes)."""
    digest = applied_hash(desired)
    if before is not None and (before["metadata"].get("annotations") or {}).get(APPLIED_HASH) == digest:
        return before
    meta = desired["metadata"]
    desired = {
        **desired,
        "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), APPLIED_HASH: digest}},
    }
    after = kubeio.apply(desired)
    STORE.upsert(desired["kind"], after)
    name = desired["metadata"]["name"]
    if before is None:
        events.append(Event("Normal", "Created", f"created {what} {name}"))
    elif _spec_of_interest(before) != _spec_of_interest(after):
        events.append(Event("Normal", "Updated", f"updated {what} {name}"))
    return after


def _spec_of_interest(obj: dict[str, Any]) -> dict[str, Any]:
    # An HPA moving a Deployment's replicas is not our update.
    spec = dict(obj.get("spec") or {})
    if obj.get("kind") == "Deployment":
        spec.pop("replicas", None)
    return spec


def _pod_trouble(namespace: str, name: str) -> str | None:
    """Why the service's pods are not starting (ImagePullBackOff, CrashLoopBackOff …), if they say."""
    for pod in STORE.pods_with(LABEL_ISVC, namespace, name):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason and reason not in _STARTING:
                return f"pod {pod['metadata']['name']}: {reason}: {waiting.get('message') or ''}".strip(": ")
    return None


def _placement(namespace: str, name: str) -> tuple[volumes.Trouble | None, float | None]:
    """Why the service's pods are not placed (from the cache: the pods' PodScheduled condition and the
    claims they mount), and when to look again if a Pending claim is not yet worth reporting."""
    pods = STORE.pods_with(LABEL_ISVC, namespace, name)
    pvcs = {c: STORE.get(volumes.PVC, namespace, c) for p in pods for c in volumes.claims(p)}
    return volumes.first_trouble(pods, pvcs, dt.datetime.now(dt.UTC))


def _server_reports(namespace: str, name: str, spec: InferenceServiceSpec) -> ServerReport:
    """Ask each running primary pod, through the apiserver's pod proxy (pods/proxy), for its readiness
    reason and served version: Kubernetes keeps a failed probe's body to itself, and this is what lets
    the InferenceService say *why* a server is unready (no verified checkpoint, tampered, wrong key …).
    Unreachable pods are skipped; this never fails a reconcile."""
    scheme = "https" if spec.tls_secret_ref else "http"
    model = build.model_name_of(spec, name)
    versions: set[str] = set()
    not_ready: str | None = None
    unanswered = 0
    core = kubeio.core()
    pods = [
        p
        for p in STORE.pods_with(LABEL_ISVC, namespace, name)
        if (p["metadata"].get("labels") or {}).get(LABEL_ROLE) == build.PRIMARY
        and (p.get("status") or {}).get("phase") == "Running"
        and not p["metadata"].get("deletionTimestamp")
    ]
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"])[:PROBED_PODS]:
        pod_name = pod["metadata"]["name"]
        target = f"{scheme}:{pod_name}:{spec.port}"
        try:
            # Raw bytes: for a 'str' response the client parses the JSON and hands back its repr.
            resp = core.connect_get_namespaced_pod_proxy_with_path(
                target,
                namespace,
                f"v2/models/{model}",
                _request_timeout=PROXY_TIMEOUT_SECONDS,
                _preload_content=False,
            )
            meta = json.loads(resp.data)
            versions.update(str(v) for v in meta.get("versions") or [])
        except ApiException as e:
            reason = server_reason(e.body)
            if reason is None:
                unanswered += 1
            elif not_ready is None:
                not_ready = f"pod {pod_name}: {reason}"
        except Exception:
            unanswered += 1
    return ServerReport(frozenset(versions), not_ready, unanswered)


def _apply_children(
    owner: Owner,
    spec: InferenceServiceSpec,
    primary: Resolution,
    canary: Resolution | None,
    events: list[Event],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, int]:
    """Deployment(s), HPA and Service as rendered. (primary, canary, canary replicas wanted)."""
    namespace, name = owner.namespace, owner.name
    canary_name = build.deployment_name(name, build.CANARY)
    primary_dep = STORE.get("Deployment", namespace, name)
    if primary.model is not None:
        # No replicas in what we apply: the HPA owns them. A new Deployment starts at replicas.min.
        created = primary_dep is None
        primary_dep = _apply(
            build.deployment(owner, spec, build.PRIMARY, primary.model), primary_dep, "Deployment", events
        )
        if created:
            kubeio.scale_deployment(namespace, name, spec.replicas.min, INITIAL_SCALE_MANAGER)
            primary_dep = {**primary_dep, "spec": {**primary_dep["spec"], "replicas": spec.replicas.min}}
    if primary_dep is not None:
        _apply(
            build.autoscaler(owner, spec),
            STORE.get("HorizontalPodAutoscaler", namespace, name),
            "HorizontalPodAutoscaler",
            events,
        )
    routed = routing.routed(spec, CONFIG.gateway_api_served)
    _apply(build.service(owner, spec, routed), STORE.get("Service", namespace, name), "Service", events)

    canary_dep = STORE.get("Deployment", namespace, canary_name)
    canary_wanted = 0
    if spec.canary is None:
        if canary_dep is not None:
            kubeio.delete_deployment(namespace, canary_name)
            events.append(Event("Normal", "CanaryRemoved", f"deleted Deployment {canary_name}"))
            canary_dep = None
    elif canary is not None and canary.model is not None:
        primary_replicas = ((primary_dep or {}).get("spec") or {}).get("replicas") or spec.replicas.min
        canary_wanted = build.canary_replicas(primary_replicas, spec.canary.traffic_percent)
        desired = build.deployment(owner, spec, build.CANARY, canary.model, replicas=canary_wanted)
        canary_dep = _apply(desired, canary_dep, "canary Deployment", events)

    _apply_route(owner, spec, routed, events)
    return primary_dep, canary_dep, canary_wanted


def _apply_route(owner: Owner, spec: InferenceServiceSpec, routed: bool, events: list[Event]) -> None:
    """A weighted canary's `<name>-canary` Service, HTTPRoute and GRPCRoute (builders/httproute.py; the
    GRPCRoute where the cluster serves it), or none: all go when the canary or its gateway does."""
    namespace, name = owner.namespace, owner.name
    canary_svc = routing.canary_service_name(name)
    if routed:
        svc = routing.canary_service(owner, spec)
        _apply(svc, STORE.get("Service", namespace, canary_svc), "Service", events)
        route = routing.http_route(owner, spec)
        _apply(route, STORE.get(routing.KIND, namespace, name), routing.KIND, events)
        if CONFIG.grpc_routes_served:
            grpc = routing.grpc_route(owner, spec)
            _apply(grpc, STORE.get(routing.GRPC_KIND, namespace, name), routing.GRPC_KIND, events)
        return
    for kind, child in ((routing.KIND, name), (routing.GRPC_KIND, name), ("Service", canary_svc)):
        if (existing := STORE.get(kind, namespace, child)) is not None:
            kubeio.remove_child(kind, namespace, child)
            STORE.delete(kind, existing)  # the next pass must not delete (and tell) it again
            events.append(Event("Normal", "Deleted", f"deleted {kind} {child}"))


def _rejected(e: ApiException) -> bool:
    """The API server refuses the object itself (retrying cannot help). Server-side apply reports a
    malformed field (a quantity like "lots") as a 500 that says it cannot convert the object."""
    message = api_message(e)
    return e.status in (400, 422) or (
        e.status == 500 and ("typed patch object" in message or "failed to convert new object" in message)
    )


def reconcile_once(namespace: str, name: str) -> Outcome | None:
    """One level-based pass. None: the service is gone (stop looping)."""
    body = STORE.get(INFERENCESERVICE, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        with contextlib.suppress(KeyError):
            metrics.ISVC_READY.remove(namespace, name)
        return None
    try:
        spec = InferenceServiceSpec.model_validate(body.get("spec") or {})
    except ValidationError as e:
        return _invalid(body, describe_validation_error(e))
    # The webhook's rules, enforced here too: a cluster without the webhook gets the same answer.
    raw = admission.default_inferenceservice(name, body.get("spec") or {})
    if problems := admission.validate_inferenceservice(name, raw):
        return _invalid(body, "; ".join(problems))

    owner = Owner.of(body)
    generation = body["metadata"].get("generation")
    events: list[Event] = []
    primary = _resolve(namespace, spec.model)
    canary = _resolve(namespace, spec.canary.model) if spec.canary else None

    try:
        primary_dep, canary_dep, canary_wanted = _apply_children(owner, spec, primary, canary, events)
    except ApiException as e:
        if not _rejected(e):
            raise
        return _invalid(
            body,
            "the API server rejects what this spec renders (spec.resources, spec.env and spec.podTemplate "
            f"reach the Deployment as written): {api_message(e)}",
        )

    old = InferenceServiceStatus.model_validate(body.get("status") or {})
    trouble = None if ready_replicas(primary_dep) else _pod_trouble(namespace, name)
    placing, recheck = (None, None) if ready_replicas(primary_dep) else _placement(namespace, name)
    report = _server_reports(namespace, name, spec) if primary_dep else ServerReport()
    st = plan_status(
        old,
        owner,
        spec,
        generation,
        primary,
        canary,
        primary_dep,
        canary_dep,
        canary_wanted,
        trouble,
        _now(),
        report,
        placing,
        routing.routed(spec, CONFIG.gateway_api_served),
    )
    routes = [STORE.get(routing.KIND, namespace, name)]
    if CONFIG.grpc_routes_served:
        routes.append(STORE.get(routing.GRPC_KIND, namespace, name))
    served = CONFIG.gateway_api_served
    if cond := routing.route_condition(name, spec, served, routes, CONFIG.grpc_routes_served):
        set_condition(st.conditions, routing.CONDITION, *cond, _now(), generation)
    else:
        st.conditions = [c for c in st.conditions if c.type != routing.CONDITION]
    events += transition_events(old, st)
    new_status = st.model_dump(by_alias=True, mode="json")
    if new_status != {k: (body.get("status") or {}).get(k) for k in new_status}:
        STORE.upsert(INFERENCESERVICE, kubeio.patch_status(PLURAL, namespace, name, new_status))
    metrics.ISVC_READY.labels(namespace, name).set(st.ready_replicas)
    waiting = primary.model is None or (canary is not None and canary.model is None)
    requeue = WAITING_RESYNC_SECONDS if waiting else version_recheck(spec, primary, report)
    requeue = min(requeue, ask_again(report, ready_replicas(primary_dep)))
    return Outcome(min(requeue, recheck + 1) if recheck is not None else requeue, events, body)


def services_serving(namespace: str, job: str) -> list[str]:
    """The InferenceServices in the namespace whose primary or canary serves this TrainingJob."""
    names = []
    for isvc in STORE.list(INFERENCESERVICE, namespace):
        spec = isvc.get("spec") or {}
        models = [spec.get("model") or {}, (spec.get("canary") or {}).get("model") or {}]
        if any(m.get("fromTrainingJob") == job for m in models):
            names.append(isvc["metadata"]["name"])
    return names


SERVICES = Controller("InferenceService", reconcile_once, CONFIG.service_workers)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def inferenceservice_served(name: str, namespace: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """Passes run for this service while kopf keeps this daemon (see handlers/loop.py)."""
    await SERVICES.serve((namespace, name), stopped)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def inferenceservice_event(event: kopf.RawEvent, **_: Any) -> None:
    STORE.take(INFERENCESERVICE, event["type"], event["object"])
