"""Admission rules (pure): defaulting and the validation the CRD schema and its CEL rules cannot express.

The webhook handlers (handlers/admission.py) only call these. Every function takes plain dicts as the
apiserver sends them (camelCase, possibly incomplete or of the wrong type) and never raises: problems come
back as messages that start with the field's path, the way `kubectl apply` users read them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from . import volumes
from .api import InferenceServiceSpec, TrainingJobSpec, transitions
from .builders import inferenceservice as isvc_build
from .builders.trainingjob import RESERVED_ENV, RESERVED_ENV_PREFIXES
from .handlers.validation import describe_validation_error

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
DURATION_PART = re.compile(r"([0-9]+)(ns|us|ms|s|m|h)")
TRAINER_METRICS_PORT = 9400  # the trainer's Prometheus port on rank 0 (docs/contracts.md)
GPU = "nvidia.com/gpu"
DEFAULT_CHECKPOINT_SECONDS = transitions.DEFAULT_CHECKPOINT_SECONDS
# Labels the operator sets on pods and selects them by; a user value would detach pods from their job.
OPERATOR_LABEL_PREFIX = "aidc.dev/"


# ------------------------------------------------------------------------------------------ defaulting


def default_trainingjob(spec: Any) -> dict[str, Any]:
    """The spec with the defaults that depend on other fields filled in (the CRD schema fills the static
    ones): gpusPerNode = procPerNode, and a time-based checkpoint trigger when none is given. Returns a
    new dict; what the user set is never changed; idempotent."""
    if not isinstance(spec, dict):
        return spec
    out = copy.deepcopy(spec)
    if out.get("gpusPerNode") is None and _is_int(out.get("procPerNode", 1)):
        out["gpusPerNode"] = out.get("procPerNode", 1)
    ckpt = out.get("checkpoint")
    if ckpt is None:
        ckpt = out["checkpoint"] = {}
    if isinstance(ckpt, dict) and ckpt.get("everySteps") is None and ckpt.get("everySeconds") is None:
        ckpt["everySeconds"] = DEFAULT_CHECKPOINT_SECONDS
    return out


def default_inferenceservice(name: str, spec: Any) -> dict[str, Any]:
    """The model's protocol name defaults to the InferenceService's name, and the canary's to the same
    name: both Deployments serve one URL behind one Service, so a client's /v2/models/<name>/infer must
    find the model whichever pod answers."""
    if not isinstance(spec, dict):
        return spec
    out = copy.deepcopy(spec)
    model = out.get("model")
    if isinstance(model, dict) and not model.get("name"):
        model["name"] = name
    canary = out.get("canary")
    if isinstance(canary, dict) and isinstance(canary.get("model"), dict) and not canary["model"].get("name"):
        served = model.get("name") if isinstance(model, dict) else None
        canary["model"]["name"] = served if isinstance(served, str) and served else name
    return out


# ------------------------------------------------------------------------------------------ validation


def validate_trainingjob(name: str, spec: Any) -> list[str]:
    """Every problem with a TrainingJob, each message starting with the field path; [] when valid."""
    problems = _name_problems(name, "TrainingJob", reserve=len("-1023"))
    try:
        tj = TrainingJobSpec.model_validate(spec)
    except ValidationError as e:
        return [*problems, describe_validation_error(e)]
    # The CRD's CEL rules, repeated so one answer lists every problem (and for clusters that skip CEL).
    if tj.elastic is not None:
        if tj.elastic.min_nodes > tj.elastic.max_nodes:
            problems.append(
                f"spec.elastic.minNodes: {tj.elastic.min_nodes} is more than "
                f"spec.elastic.maxNodes ({tj.elastic.max_nodes})"
            )
        elif not tj.elastic.min_nodes <= tj.nodes <= tj.elastic.max_nodes:
            problems.append(
                f"spec.nodes: {tj.nodes} is outside [spec.elastic.minNodes, spec.elastic.maxNodes] = "
                f"[{tj.elastic.min_nodes}, {tj.elastic.max_nodes}]"
            )
    fp = tj.failure_policy
    if fp.backoff_seconds > fp.max_backoff_seconds:
        problems.append(
            f"spec.failurePolicy.backoffSeconds: {fp.backoff_seconds} is more than "
            f"spec.failurePolicy.maxBackoffSeconds ({fp.max_backoff_seconds})"
        )
    if fp.spare_nodes and fp.node_failure != "ReplaceNode":
        problems.append(
            f"spec.failurePolicy.spareNodes: {fp.spare_nodes} needs spec.failurePolicy.nodeFailure: "
            f"ReplaceNode (it is {fp.node_failure})"
        )
    elif fp.spare_nodes and tj.elastic is not None:
        problems.append(
            f"spec.failurePolicy.spareNodes: {fp.spare_nodes} needs a fixed-size gang (remove spec.elastic)"
        )
    for i, code in enumerate(fp.retryable_exit_codes):
        if not 1 <= code <= 255:
            problems.append(f"spec.failurePolicy.retryableExitCodes[{i}]: {code} is not an exit code (1-255)")
    enc = tj.checkpoint.encryption
    if not enc.enabled and (enc.key_secret_ref or enc.kek_secret_ref):
        problems.append(
            "spec.checkpoint.encryption.enabled: false, but keySecretRef/kekSecretRef are set "
            "(they need encryption enabled)"
        )
    if enc.key_secret_ref and enc.rotate_after:
        problems.append(
            "spec.checkpoint.encryption.rotateAfter: applies to operator-managed keys only; "
            "remove it or keySecretRef"
        )
    if enc.rotate_after and _duration_seconds(enc.rotate_after) <= 0:
        problems.append(f"spec.checkpoint.encryption.rotateAfter: {enc.rotate_after!r} must be positive")
    # Beyond the schema: what would otherwise fail only once the pods run.
    gpus = tj.proc_per_node if tj.gpus_per_node is None else tj.gpus_per_node
    if 0 < gpus < tj.proc_per_node:
        problems.append(
            f"spec.gpusPerNode: {gpus} GPUs for procPerNode {tj.proc_per_node} worker processes; each "
            "process needs its own GPU (set gpusPerNode: 0 to train on CPU)"
        )
    for where in ("limits", "requests"):
        section = tj.resources.get(where)
        if isinstance(section, dict) and GPU in section:
            problems.append(
                f"spec.resources.{where}[{GPU}]: set by the operator from spec.gpusPerNode; set that instead"
            )
    problems += _env_problems("spec.env", tj.env, _trainer_reserved)
    problems += _env_problems("spec.podTemplate.env", tj.pod_template.env, _trainer_reserved)
    problems += _label_problems("spec.podTemplate.labels", tj.pod_template.labels)
    if tj.master_port == TRAINER_METRICS_PORT:
        problems.append(
            f"spec.masterPort: {TRAINER_METRICS_PORT} is the trainer's metrics port; choose another"
        )
    problems += _volume_problems("spec.checkpoint.volume", tj.checkpoint.volume)
    problems += volumes.backup_problems(tj.checkpoint)
    if not tj.command[0].strip():
        problems.append("spec.command[0]: must name a program or module")
    problems += _image_problems("spec.image", tj.image)
    return problems


def trainingjob_edit_problems(old: Any, new: Any) -> list[str]:
    """An UPDATE's edits that a started job cannot take (old/new: the whole objects). The CRD's CEL
    transition rules say the same (api/transitions.py); the reconciler never calls this, so a stored
    object never turns Invalid because of these rules."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    before = default_trainingjob(old.get("spec") or {})
    after = default_trainingjob(new.get("spec") or {})
    return [
        transitions.message(f)
        for f in transitions.FROZEN
        if transitions.locked(f, old.get("status"))
        and _effective(before, f.path) != _effective(after, f.path)
    ]


def validate_inferenceservice(name: str, spec: Any) -> list[str]:
    """Every problem with an InferenceService, each message starting with the field path; [] when valid."""
    problems = _name_problems(name, "InferenceService", reserve=len("-canary"))
    try:
        isvc = InferenceServiceSpec.model_validate(spec)
    except ValidationError as e:
        return [*problems, describe_validation_error(e)]
    if isvc.replicas.min < 1:
        problems.append(
            "spec.replicas.min: must be >= 1 (a HorizontalPodAutoscaler scales to zero only with the "
            "HPAScaleToZero feature gate)"
        )
    if isvc.replicas.min > isvc.replicas.max:
        problems.append(
            f"spec.replicas.min: {isvc.replicas.min} is more than spec.replicas.max ({isvc.replicas.max})"
        )
    models = [("spec.model", isvc.model)]
    if isvc.canary is not None:
        models.append(("spec.canary.model", isvc.canary.model))
        if isvc.canary.model.model_dump() == isvc.model.model_dump():
            problems.append("spec.canary.model: is the same model as spec.model")
        served = isvc.model.name or name
        if isvc.canary.model.name and isvc.canary.model.name != served:
            problems.append(
                f"spec.canary.model.name: must be {served!r} (or unset): both Deployments serve one URL "
                "behind one Service"
            )
    for path, model in models:
        if (model.from_training_job is None) == (model.storage is None):
            problems.append(f"{path}: set exactly one of fromTrainingJob and storage")
        if model.storage is not None:
            problems += _volume_problems(f"{path}.storage.volume", model.storage.volume)
            parts = model.storage.path.split("/")
            if model.storage.path.startswith("/") or ".." in parts:
                problems.append(
                    f"{path}.storage.path: {model.storage.path!r} must be relative to the volume (no '..')"
                )
        if model.quantize == "int8" and isvc.gpus > 0:
            problems.append(f"{path}.quantize: int8 runs on CPU; use gpus: 0 or quantize: none")
        if model.quantize == "int8" and isvc.precision != "fp32":
            problems.append(f"{path}.quantize: int8 does not combine with precision {isvc.precision}")
    for where in ("limits", "requests"):
        section = isvc.resources.get(where)
        if isinstance(section, dict) and GPU in section:
            problems.append(f"spec.resources.{where}[{GPU}]: set by the operator from spec.gpus; set that")
    problems += _env_problems("spec.env", isvc.env, isvc_build.RESERVED_ENV.__contains__)
    problems += _env_problems(
        "spec.podTemplate.env", isvc.pod_template.env, isvc_build.RESERVED_ENV.__contains__
    )
    problems += _label_problems("spec.podTemplate.labels", isvc.pod_template.labels)
    problems += _image_problems("spec.image", isvc.image)
    return problems


# ------------------------------------------------------------------------------------------ pieces


_UNSET = object()


def _effective(spec: Any, path: str) -> Any:
    """The value transitions compare: `elastic` by presence only (its range is a resize), else the
    field at the dotted path (unset → a marker)."""
    value = spec
    for part in path.split("."):
        value = value.get(part, _UNSET) if isinstance(value, dict) else _UNSET
    if path == "elastic":
        return value not in (_UNSET, None)
    return _UNSET if value is None else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name_problems(name: Any, kind: str, reserve: int) -> list[str]:
    # Pods' hostnames and the Service are named after the object: a DNS-1035 label with room to spare.
    limit = 63 - reserve
    if not isinstance(name, str) or not name:
        return []  # generateName: the apiserver names it, within limits we cannot check here
    if len(name) > limit or not DNS1035.match(name):
        return [
            f"metadata.name: {name!r} must be a DNS-1035 label of at most {limit} characters (lower-case "
            f"letters, digits, '-', starting with a letter): the {kind}'s Service and pod hostnames use it"
        ]
    return []


def _trainer_reserved(name: str) -> bool:
    return name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)


def _env_problems(path: str, env: list[dict[str, Any]], reserved: Callable[[str], bool]) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for i, var in enumerate(env):
        name = var.get("name")
        if not isinstance(name, str) or not ENV_NAME.match(name):
            problems.append(f"{path}[{i}].name: {name!r} is not a valid environment variable name")
            continue
        if reserved(name):
            problems.append(f"{path}[{i}].name: {name} is set by the operator and cannot be overridden")
        if name in seen:
            problems.append(f"{path}[{i}].name: {name} is set twice")
        seen.add(name)
    return problems


def _label_problems(path: str, labels: dict[str, str]) -> list[str]:
    return [
        f"{path}[{key}]: labels under {OPERATOR_LABEL_PREFIX} are the operator's"
        for key in sorted(labels)
        if key.startswith(OPERATOR_LABEL_PREFIX)
    ]


def _volume_problems(path: str, volume: dict[str, Any] | None) -> list[str]:
    if volume is None:
        return []
    sources = sorted(k for k in volume if k != "name")
    if len(sources) != 1:
        return [
            f"{path}: needs exactly one volume source (persistentVolumeClaim, nfs, emptyDir …), "
            f"got {sources or 'none'}"
        ]
    return []


def _image_problems(path: str, image: str) -> list[str]:
    if image != image.strip() or any(c.isspace() for c in image):
        return [f"{path}: {image!r} contains whitespace"]
    return []


def _duration_seconds(text: str) -> float:
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * unit[u] for n, u in DURATION_PART.findall(text))
