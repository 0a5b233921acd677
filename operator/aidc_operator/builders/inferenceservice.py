"""InferenceService → the objects it serves with: a Deployment of model servers (plus an optional canary
Deployment), one Service in front of both, and a HorizontalPodAutoscaler for the primary.

Pure functions: no I/O, unit-tested without a cluster. Resolving `model.fromTrainingJob` needs the
TrainingJob object, which the handler reads and hands to `resolve_training_job`.

Canary traffic is split by replica ratio: the Service selects the pods of both Deployments and
kube-proxy spreads connections evenly over ready endpoints, so the canary's share is
canary / (primary + canary) replicas — an approximation that gets closer with more replicas (one
primary and one canary is 50 %, whatever was asked). 0 % takes the canary out of the Service, 100 %
takes the primary out. Promotion or rollback is an edit of the spec: move canary.model into model (or
delete canary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api.inferenceservice import InferenceServiceSpec, ModelSpec
from ..api.trainingjob import TrainingJobSpec
from .common import (
    LABEL_ISVC,
    LABEL_ROLE,
    MANAGED_BY,
    Owner,
    container_security_context,
    merge_env,
    metadata,
    pod_security_context,
)
from .trainingjob import CHECKPOINT_MOUNT, GPU, KEK_MOUNT, KEY_MOUNT, key_secret_name

MODEL_MOUNT = "/models"
TLS_MOUNT = "/var/run/aidc/tls"
PRIMARY, CANARY = "primary", "canary"
SERVER_COMMAND = ["python", "-m", "aidc_server"]
# The server drains on SIGTERM (readiness false, in-flight requests finish): give it time to.
TERMINATION_GRACE_SECONDS = 45
DRAIN_EXIT_MARGIN_SECONDS = 3  # left after the drain for the server to exit before SIGKILL


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's checkpoints live and how to decrypt them: everything a server pod needs."""

    volume: dict[str, Any]
    """Volume source holding the checkpoints (mounted read-only)."""
    mount_path: str
    checkpoint_dir: str
    """AIDC_CHECKPOINT_DIR: the directory with step-* checkpoints, inside mount_path."""
    key_secret: str | None = None
    kek_secret: str | None = None


class Unresolvable(Exception):
    """The model source exists but cannot be served from (reason: one CamelCase word)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# The server's wiring, set by the operator; other AIDC_* tuning in spec.env reaches the server as given.
RESERVED_ENV = frozenset(
    {"AIDC_CHECKPOINT_DIR", "AIDC_MODEL_NAME", "AIDC_KEY_DIR", "AIDC_KEK_FILE", "AIDC_PORT", "AIDC_GRPC_PORT"}
)
# The server's Open Inference Protocol gRPC port (its --grpc-port default), in the pod and on the Service.
GRPC_PORT = 8081


def grpc_port(spec: InferenceServiceSpec) -> int:
    """8081, unless spec.port (HTTP) took it."""
    return GRPC_PORT if spec.port != GRPC_PORT else GRPC_PORT + 1


def resolve_storage(model: ModelSpec) -> ResolvedModel:
    assert model.storage is not None
    storage = model.storage
    path = storage.path.strip("/")
    return ResolvedModel(
        volume=dict(storage.volume),
        mount_path=MODEL_MOUNT,
        checkpoint_dir=f"{MODEL_MOUNT}/{path}" if path else MODEL_MOUNT,
        key_secret=storage.key_secret_ref.name if storage.key_secret_ref else None,
        kek_secret=storage.kek_secret_ref.name if storage.kek_secret_ref else None,
    )


def resolve_training_job(job: dict[str, Any]) -> ResolvedModel:
    """The job's checkpoint volume and key Secrets, named exactly as the TrainingJob builder names them,
    so the servers read what the trainer writes (docs/contracts.md)."""
    spec = TrainingJobSpec.model_validate(job.get("spec") or {})
    owner = Owner.of(job)
    if not spec.checkpoint.volume:
        raise Unresolvable(
            "TrainingJobHasNoCheckpointVolume",
            f"TrainingJob {owner.name!r} checkpoints to an emptyDir, which no other pod can read; "
            "give it spec.checkpoint.volume (a ReadWriteMany/ReadOnlyMany claim, NFS …)",
        )
    enc = spec.checkpoint.encryption
    return ResolvedModel(
        volume=dict(spec.checkpoint.volume),
        mount_path=CHECKPOINT_MOUNT,
        checkpoint_dir=f"{CHECKPOINT_MOUNT}/{owner.name}",
        key_secret=key_secret_name(owner, spec),
        kek_secret=enc.kek_secret_ref.name if enc.enabled and enc.kek_secret_ref else None,
    )


def model_name_of(spec: InferenceServiceSpec, isvc_name: str | None = None) -> str:
    return spec.model.name or isvc_name or ""


def deployment_name(isvc: str, role: str) -> str:
    return isvc if role == PRIMARY else f"{isvc}-canary"


def url(owner: Owner, spec: InferenceServiceSpec) -> str:
    scheme = "https" if spec.tls_secret_ref else "http"
    host = f"{owner.name}.{owner.namespace}.svc.cluster.local"
    return f"{scheme}://{host}/v2/models/{model_name_of(spec, owner.name)}"


def canary_replicas(primary_replicas: int, traffic_percent: int) -> int:
    """Canary replicas giving about traffic_percent of the connections next to primary_replicas, at least
    one while any traffic is asked for; at 100 % the canary mirrors the primary's size."""
    if traffic_percent <= 0:
        return 0
    if traffic_percent >= 100:
        return max(primary_replicas, 1)
    return max(1, round(primary_replicas * traffic_percent / (100 - traffic_percent)))


def effective_canary_percent(primary_ready: int, canary_ready: int, traffic_percent: int) -> int:
    """The share the canary really gets: the ratio of ready endpoints behind the Service."""
    if traffic_percent <= 0 or canary_ready == 0:
        return 0
    if traffic_percent >= 100 or primary_ready == 0:
        return 100
    return round(100 * canary_ready / (primary_ready + canary_ready))


def server_env(
    owner: Owner, spec: InferenceServiceSpec, model: ModelSpec, resolved: ResolvedModel
) -> list[dict[str, Any]]:
    env = {
        "AIDC_CHECKPOINT_DIR": resolved.checkpoint_dir,
        # The canary serves under the primary's name: one URL, whichever pod answers.
        "AIDC_MODEL_NAME": model_name_of(spec, owner.name),
        "AIDC_PORT": str(spec.port),
        "AIDC_GRPC_PORT": str(grpc_port(spec)),
        "AIDC_MAX_BATCH_SIZE": str(spec.batching.max_batch_size),
        "AIDC_MAX_LATENCY_MS": str(spec.batching.max_latency_ms),
        "AIDC_QUANTIZE": model.quantize,
        # The GPU the device plugin gives the pod, or the CPU: never a silent fallback either way.
        "AIDC_DEVICE": "cuda" if spec.gpus else "cpu",
        "AIDC_PRECISION": spec.precision,
        "AIDC_MAX_REQUEST_BYTES": str(spec.max_request_bytes),
        "AIDC_WATCH_SECONDS": str(model.watch_seconds),
    }
    if resolved.key_secret:
        env["AIDC_KEY_DIR"] = KEY_MOUNT
        if resolved.kek_secret:
            env["AIDC_KEK_FILE"] = f"{KEK_MOUNT}/kek"
    if spec.tls_secret_ref:
        env["AIDC_TLS_CERT"] = f"{TLS_MOUNT}/tls.crt"
        env["AIDC_TLS_KEY"] = f"{TLS_MOUNT}/tls.key"
    return [{"name": k, "value": v} for k, v in env.items()]


def drain_env(grace: int | None) -> list[dict[str, Any]]:
    """A grace period the user set decides how long the server drains on SIGTERM: unready for up to
    2 s (endpoints stop routing to it), then in-flight requests until shortly before SIGKILL. Unset,
    the server's defaults (2 s + 30 s) fit the default 45 s. The user's own values still win."""
    if grace is None:
        return []
    usable = max(0.0, grace - DRAIN_EXIT_MARGIN_SECONDS)
    unready = min(2.0, usable / 2)
    return [
        {"name": "AIDC_DRAIN_SECONDS", "value": f"{unready:g}"},
        {"name": "AIDC_DRAIN_TIMEOUT_SECONDS", "value": f"{usable - unready:g}"},
    ]


def volumes(
    spec: InferenceServiceSpec, resolved: ResolvedModel
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): a writable /tmp under the read-only root, the model volume read-only, and the key,
    KEK and TLS Secrets as read-only files (never env vars)."""
    vols: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {**resolved.volume, "name": "model"}]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "model", "mountPath": resolved.mount_path, "readOnly": True},
    ]

    def secret(volume: str, secret_name: str, path: str, items: list[dict[str, str]] | None = None) -> None:
        source: dict[str, Any] = {"secretName": secret_name, "defaultMode": 0o440}
        if items:
            source["items"] = items
        vols.append({"name": volume, "secret": source})
        mounts.append({"name": volume, "mountPath": path, "readOnly": True})

    if resolved.key_secret:
        secret("model-key", resolved.key_secret, KEY_MOUNT)
        if resolved.kek_secret:
            secret("model-kek", resolved.kek_secret, KEK_MOUNT, [{"key": "kek", "path": "kek"}])
    if spec.tls_secret_ref:
        secret("tls", spec.tls_secret_ref.name, TLS_MOUNT)
    tmpl = spec.pod_template
    return vols + list(tmpl.volumes), mounts + list(tmpl.volume_mounts)


def resources(spec: InferenceServiceSpec) -> dict[str, Any]:
    res = {k: dict(v) for k, v in (spec.resources or {}).items()}
    if spec.gpus:
        res.setdefault("limits", {})[GPU] = str(spec.gpus)
        res.setdefault("requests", {})[GPU] = str(spec.gpus)
    return res


def _probe(path: str, scheme: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http", "scheme": scheme},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def scrape_annotations(spec: InferenceServiceSpec) -> dict[str, str]:
    """The conventional annotations a Prometheus pod job scrapes by (KServe's servers carry the same):
    the server's /metrics, including the load gauges an inflight autoscaler reads through an adapter."""
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(spec.port),
        "prometheus.io/path": "/metrics",
        "prometheus.io/scheme": "https" if spec.tls_secret_ref else "http",
    }


def selector(owner: Owner, role: str) -> dict[str, str]:
    return {LABEL_ISVC: owner.name, LABEL_ROLE: role}


def deployment(
    owner: Owner,
    spec: InferenceServiceSpec,
    role: str,
    resolved: ResolvedModel,
    replicas: int | None = None,
) -> dict[str, Any]:
    """The model-server Deployment for one role. replicas None leaves spec.replicas to its owner (the
    HorizontalPodAutoscaler, for the primary)."""
    model = spec.model if role == PRIMARY else spec.canary.model  # type: ignore[union-attr]
    tmpl = spec.pod_template
    labels = selector(owner, role)
    scheme = "HTTPS" if spec.tls_secret_ref else "HTTP"
    vols, mounts = volumes(spec, resolved)
    container = {
        "name": "server",
        "image": spec.image,
        "command": SERVER_COMMAND,
        # Users may tune the server (AIDC_TORCH_THREADS, AIDC_LOG_LEVEL …); the wiring above is ours.
        "env": merge_env(
            drain_env(tmpl.termination_grace_period_seconds),
            [v for v in [*spec.env, *tmpl.env] if v["name"] not in RESERVED_ENV],
            server_env(owner, spec, model, resolved),
        ),
        "ports": [
            {"name": "http", "containerPort": spec.port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": grpc_port(spec), "protocol": "TCP"},
        ],
        "resources": resources(spec),
        "readinessProbe": _probe("/v2/health/ready", scheme, period=5, failures=2),
        # Liveness answers from the event loop (inference runs off it), so a busy server stays alive.
        "livenessProbe": _probe("/v2/health/live", scheme, period=10, failures=6),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    grace = tmpl.termination_grace_period_seconds
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,  # the server never talks to the API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS if grace is None else grace,
        "containers": [container],
        "volumes": vols,
    }
    if tmpl.service_account_name:
        pod_spec["serviceAccountName"] = tmpl.service_account_name
    if tmpl.node_selector:
        pod_spec["nodeSelector"] = dict(tmpl.node_selector)
    tolerations = list(tmpl.tolerations)
    if spec.gpus:
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule; a GPU server belongs there.
        tolerations.insert(0, {"key": GPU, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if tmpl.affinity:
        pod_spec["affinity"] = dict(tmpl.affinity)
    if tmpl.priority_class_name:
        pod_spec["priorityClassName"] = tmpl.priority_class_name
    if tmpl.image_pull_secrets:
        pod_spec["imagePullSecrets"] = list(tmpl.image_pull_secrets)
    # managed-by on the pods too: the operator's pod watch selects on it (server-side filtering).
    pod_meta: dict[str, Any] = {
        "labels": {**tmpl.labels, **MANAGED_BY, **labels},
        "annotations": {**scrape_annotations(spec), **tmpl.annotations},
    }
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        # Surge first: capacity never drops below the current replicas during a rollout.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}},
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    if replicas is not None:
        dep_spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, deployment_name(owner.name, role), labels),
        "spec": dep_spec,
    }


def service(owner: Owner, spec: InferenceServiceSpec, routed: bool = False) -> dict[str, Any]:
    """One ClusterIP Service for primary and canary; 0 % / 100 % canary narrow it to one role. routed:
    an HTTPRoute splits by weight (builders/httproute.py), so this Service is the primary's alone."""
    sel = {LABEL_ISVC: owner.name}
    if routed or (spec.canary and spec.canary.traffic_percent <= 0):
        sel[LABEL_ROLE] = PRIMARY
    elif spec.canary and spec.canary.traffic_percent >= 100:
        sel[LABEL_ROLE] = CANARY
    elif not spec.canary:
        sel[LABEL_ROLE] = PRIMARY  # a canary being deleted gets no more traffic
    port = 443 if spec.tls_secret_ref else 80
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, owner.name, {LABEL_ISVC: owner.name}),
        "spec": {
            "type": "ClusterIP",
            "selector": sel,
            "ports": [
                {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"},
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
            ],
        },
    }


# The model server's gauge of requests being handled (server/aidc_server/metrics.py), as a
# custom-metrics adapter serves it per pod (metric: inflight).
INFLIGHT_METRIC = "aidc_server_requests_in_flight"


def autoscaler_metric(spec: InferenceServiceSpec) -> dict[str, Any]:
    """cpu: utilisation against the containers' CPU requests (set spec.resources.requests.cpu, or the
    HPA has nothing to measure against and holds at its bounds); inflight: average in-flight requests
    per pod, a Pods metric."""
    r = spec.replicas
    if r.metric == "inflight":
        return {
            "type": "Pods",
            "pods": {
                "metric": {"name": INFLIGHT_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(r.target_inflight_requests)},
            },
        }
    return {
        "type": "Resource",
        "resource": {
            "name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": r.target_cpu_utilization},
        },
    }


def autoscaler(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """HPA on the primary Deployment, on the metric spec.replicas.metric names."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(owner, owner.name, {LABEL_ISVC: owner.name}),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment_name(owner.name, PRIMARY),
            },
            "minReplicas": spec.replicas.min,
            "maxReplicas": spec.replicas.max,
            "metrics": [autoscaler_metric(spec)],
        },
    }
