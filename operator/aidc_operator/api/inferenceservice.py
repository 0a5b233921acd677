"""InferenceService: model-server pods (Deployment + Service + HPA) serving a checkpoint."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from .base import DNS1123, ApiModel, Condition, KubeList, KubeObject, PodTemplateOverrides, SecretRef

DEFAULT_SERVER_IMAGE = "ghcr.io/aidc-dev/aidc-server:0.1.0"


class StorageSource(ApiModel):
    """A checkpoint directory on a volume."""

    volume: KubeObject
    """A Volume source (persistentVolumeClaim, nfs …) mounted read-only at /models."""
    path: str = Field(default="", max_length=4096)
    """Directory inside the volume holding step-* checkpoints."""
    key_secret_ref: SecretRef | None = None
    """Key Secret for encrypted checkpoints."""
    kek_secret_ref: SecretRef | None = None
    """Key-encryption key Secret, if the key Secret is wrapped."""


class ModelSpec(ApiModel):
    """Which model to serve: exactly one of fromTrainingJob or storage."""

    from_training_job: str | None = Field(default=None, min_length=1, max_length=253, pattern=DNS1123)
    """Serve the newest verified checkpoint of this TrainingJob (same namespace), with its key."""
    storage: StorageSource | None = None
    """Serve checkpoints from a volume."""
    name: str | None = Field(default=None, min_length=1, max_length=253, pattern=DNS1123)
    """Model name in the v2 protocol URLs; defaults to the InferenceService name."""
    quantize: Literal["none", "int8"] = "none"
    """int8 dynamic quantization of Linear layers (CPU serving)."""
    watch_seconds: int = Field(default=30, ge=0, le=86400)
    """Look for a newer checkpoint this often and hot-swap it; 0 disables."""


class Replicas(ApiModel):
    """Replica bounds; the HorizontalPodAutoscaler moves between them."""

    min: int = Field(default=1, ge=0, le=1000)
    """Fewest replicas."""
    max: int = Field(default=1, ge=1, le=1000)
    """Most replicas."""
    target_cpu_utilization: int = Field(default=80, ge=1, le=100)
    """Average CPU utilisation (percent of requests) the autoscaler aims for (metric: cpu)."""
    metric: Literal["cpu", "inflight"] = "cpu"
    """What the autoscaler scales on: cpu, a Resource metric (metrics.k8s.io, e.g. metrics-server;
    set resources.requests.cpu), or inflight, the Pods metric aidc_server_requests_in_flight (a
    custom-metrics adapter such as prometheus-adapter must serve it; docs/serving.md has the rule)."""
    target_inflight_requests: int = Field(default=8, ge=1, le=100000)
    """Average in-flight inference requests per pod the autoscaler aims for (metric: inflight)."""


class Batching(ApiModel):
    """Server-side dynamic batching."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Most requests merged into one forward pass."""
    max_latency_ms: int = Field(default=5, ge=0, le=10000)
    """Longest a request waits for others to fill a batch."""


class GatewayRef(ApiModel):
    """A Gateway API Gateway the canary's traffic split is routed through."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS1123)
    """The Gateway's name."""
    namespace: str | None = Field(default=None, min_length=1, max_length=63, pattern=DNS1123)
    """The Gateway's namespace (default: the InferenceService's); its listeners must allow the route."""
    section_name: str | None = Field(default=None, min_length=1, max_length=253, pattern=DNS1123)
    """One listener of the Gateway; unset attaches to every listener that allows the route."""


class Canary(ApiModel):
    """A second model version receiving a share of the traffic."""

    traffic_percent: int = Field(ge=0, le=100)
    """Share of requests sent to the canary: by HTTPRoute weight with a gateway, else by replica ratio."""
    model: ModelSpec
    """The canary's model."""
    gateway: GatewayRef | None = None
    """Split by weight at this Gateway: an HTTPRoute sends trafficPercent to the <name>-canary Service."""


class InferenceServiceSpec(ApiModel):
    """Desired state of an InferenceService."""

    model: ModelSpec
    """The model to serve."""
    image: str = Field(default=DEFAULT_SERVER_IMAGE, min_length=1)
    """Model server image (aidc_server installed)."""
    replicas: Replicas = Field(default_factory=Replicas)
    """Replica bounds and autoscaling target."""
    batching: Batching = Field(default_factory=Batching)
    """Dynamic batching."""
    resources: KubeObject = Field(default_factory=dict)
    """Container resources per replica."""
    gpus: int = Field(default=0, ge=0, le=16)
    """nvidia.com/gpu per replica; with gpus the model runs on the (first) GPU, else on the CPU."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Weights and float inputs cast to this for inference (bf16/fp16 mainly for GPUs)."""
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=2**31 - 1)
    """Largest inference request body a server accepts; larger ones get 413."""
    env: KubeList = Field(default_factory=list)
    """Extra environment variables."""
    port: int = Field(default=8080, ge=1024, le=65535)
    """HTTP port of the server."""
    tls_secret_ref: SecretRef | None = None
    """kubernetes.io/tls Secret: serve HTTPS with it."""
    canary: Canary | None = None
    """Optional canary."""
    pod_template: PodTemplateOverrides = Field(default_factory=PodTemplateOverrides)
    """Scheduling and pod-level overrides."""


class InferenceServiceStatus(ApiModel):
    """Observed state of an InferenceService; written only by the operator."""

    model_config = ConfigDict(extra="ignore")  # tolerate fields a newer operator wrote

    phase: Literal["Pending", "Ready", "NotReady", "Failed"] | None = None
    """Pending, Ready, NotReady or Failed."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, ModelResolved, CanaryReady, Invalid …"""
    observed_generation: int | None = None
    """metadata.generation the status reflects."""
    url: str | None = None
    """In-cluster URL of the v2 endpoint."""
    model_version: str | None = None
    """Checkpoint step being served (reported by the ready replicas)."""
    ready_replicas: int = 0
    """Ready replicas of the primary Deployment."""
    canary_ready_replicas: int = 0
    """Ready replicas of the canary Deployment."""
