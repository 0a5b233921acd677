"""Shared pieces of the aidc API models."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "aidc.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A Kubernetes object embedded as-is (a Volume source, ResourceRequirements, Affinity …): the apiserver
# keeps every field and Kubernetes itself validates it when the operator creates the pod.
KubeObject = Annotated[
    dict[str, Any],
    Field(json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
KubeList = Annotated[
    list[dict[str, Any]],
    Field(
        json_schema_extra={
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        }
    ),
]
DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error (the CRD prunes them)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=True
    )

    def wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(ApiModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str
    """Condition type, e.g. Running, Succeeded, Failed, Invalid, CheckpointKeyReady."""
    status: str = Field(json_schema_extra={"enum": ["True", "False", "Unknown"]})
    """True, False or Unknown."""
    reason: str = ""
    """One CamelCase word that machines can switch on."""
    message: str = ""
    """A sentence for humans."""
    last_transition_time: str | None = None
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class SecretRef(ApiModel):
    """A Secret in the same namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS1123)
    """Name of the Secret."""


class PodTemplateOverrides(ApiModel):
    """Parts of the pod a user may set; merged into what the operator renders (user values win for scalars,
    lists are appended)."""

    labels: dict[str, str] = Field(default_factory=dict)
    """Extra pod labels."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Extra pod annotations."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Extra nodeSelector terms."""
    tolerations: KubeList = Field(default_factory=list)
    """Extra tolerations."""
    affinity: KubeObject | None = None
    """Affinity; the operator adds its own anti-affinity terms to what is given here."""
    priority_class_name: str | None = None
    """PriorityClass of the pods."""
    service_account_name: str | None = None
    """ServiceAccount the pods run as (default: the one the operator creates for the job)."""
    env: KubeList = Field(default_factory=list)
    """Extra environment variables (EnvVar objects)."""
    volumes: KubeList = Field(default_factory=list)
    """Extra volumes."""
    volume_mounts: KubeList = Field(default_factory=list)
    """Extra volume mounts for the main container."""
    image_pull_secrets: KubeList = Field(default_factory=list)
    """Image pull secrets."""
    termination_grace_period_seconds: int | None = Field(default=None, ge=0, le=86400)
    """Seconds between SIGTERM and SIGKILL (default: 60 for trainers, time to write a final
    checkpoint; 45 for model servers, time to drain)."""
