"""CustomResourceDefinitions generated from the pydantic models (`make crds` writes crds/*.yaml).

pydantic's JSON Schema is close to what Kubernetes wants; this turns it into a *structural* schema:
$refs inlined, Optional[X] as a non-required X, titles dropped, CEL rules attached where fields meet.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel

from .base import GROUP, VERSION
from .inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from .trainingjob import TrainingJobSpec, TrainingJobStatus
from .transitions import cel_rules as trainingjob_transition_rules

# CEL rules for invariants that span fields, keyed by the JSON path of the object they sit on.
TRAININGJOB_RULES: dict[str, list[dict[str, str]]] = {
    "": [
        {
            "rule": "!has(self.elastic) || self.elastic.minNodes <= self.elastic.maxNodes",
            "message": "spec.elastic.minNodes must be <= spec.elastic.maxNodes",
            "fieldPath": ".elastic.minNodes",
        },
        {
            "rule": "!has(self.elastic) || "
            "(self.elastic.minNodes <= self.nodes && self.nodes <= self.elastic.maxNodes)",
            "message": "spec.nodes must lie within [spec.elastic.minNodes, spec.elastic.maxNodes]",
            "fieldPath": ".nodes",
        },
        {
            "rule": "self.failurePolicy.spareNodes == 0 || self.failurePolicy.nodeFailure == 'ReplaceNode'",
            "message": "spec.failurePolicy.spareNodes needs spec.failurePolicy.nodeFailure: ReplaceNode",
            "fieldPath": ".failurePolicy.spareNodes",
        },
        {
            "rule": "self.failurePolicy.spareNodes == 0 || !has(self.elastic)",
            "message": "spec.failurePolicy.spareNodes needs a fixed-size gang (no spec.elastic)",
            "fieldPath": ".failurePolicy.spareNodes",
        },
        {
            "rule": "self.failurePolicy.backoffSeconds <= self.failurePolicy.maxBackoffSeconds",
            "message": "spec.failurePolicy.backoffSeconds must be <= spec.failurePolicy.maxBackoffSeconds",
            "fieldPath": ".failurePolicy.backoffSeconds",
        },
        {
            "rule": "self.checkpoint.encryption.enabled || (!has(self.checkpoint.encryption.keySecretRef)"
            " && !has(self.checkpoint.encryption.kekSecretRef))",
            "message": "spec.checkpoint.encryption.keySecretRef/kekSecretRef need encryption.enabled: true",
            "fieldPath": ".checkpoint.encryption.enabled",
        },
        {
            "rule": "!has(self.checkpoint.encryption.keySecretRef) "
            "|| !has(self.checkpoint.encryption.rotateAfter)",
            "message": "spec.checkpoint.encryption.rotateAfter applies to operator-managed keys only; "
            "remove it or keySecretRef",
            "fieldPath": ".checkpoint.encryption.rotateAfter",
        },
    ],
}
INFERENCESERVICE_RULES: dict[str, list[dict[str, str]]] = {
    "": [
        {
            "rule": "self.replicas.min <= self.replicas.max",
            "message": "spec.replicas.min must be <= spec.replicas.max",
            "fieldPath": ".replicas.min",
        },
    ],
    ".model": [
        {
            "rule": "has(self.fromTrainingJob) != has(self.storage)",
            "message": "set exactly one of model.fromTrainingJob and model.storage",
        }
    ],
    ".canary.model": [
        {
            "rule": "has(self.fromTrainingJob) != has(self.storage)",
            "message": "set exactly one of canary.model.fromTrainingJob and canary.model.storage",
        }
    ],
}


def _inline(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Resolve $ref, unwrap Optional, drop what structural schemas forbid."""
    if "$ref" in schema:
        target = defs[schema["$ref"].split("/")[-1]]
        merged = {**copy.deepcopy(target), **{k: v for k, v in schema.items() if k != "$ref"}}
        return _inline(merged, defs)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express union {schema['anyOf']} structurally")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return _inline({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("title", "$defs") or (key == "additionalProperties" and not isinstance(value, dict)):
            continue  # structural schemas allow neither titles nor additionalProperties: false
        if key == "properties":
            out[key] = {}
            for name, sub in value.items():
                out[key][name] = _inline(sub, defs)
                if "$ref" in sub and name not in schema.get("required", []):
                    # A sub-object with a default_factory: `default: {}` makes the apiserver fill in
                    # its fields' defaults too, so stored objects are complete and CEL can rely on them.
                    out[key][name]["default"] = {}
        elif key in ("items", "additionalProperties"):
            out[key] = _inline(value, defs)
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if out.get("default") is None:
        out.pop("default", None)
    elif out["default"] not in ({}, []) and "description" in out:
        # kubectl explain prints descriptions, never `default:`: say it where users read.
        out["description"] = f"{out['description'].rstrip()}\nDefault: {_shown(out['default'])}."
    if out.get("x-kubernetes-preserve-unknown-fields"):
        for key in ("additionalProperties", "properties", "default"):
            out.pop(key, None)  # free-form objects: {} / [] defaults only add noise to kubectl get
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
    return out


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _inline(raw, raw.get("$defs", {}))


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    for part in filter(None, path.split(".")):
        schema = schema["properties"][part]
    return schema


def name_rule(kind: str, reserve: int) -> dict[str, str]:
    """The object's name must fit the names derived from it (Service, pod hostnames: DNS-1035 labels of
    at most 63 characters): rejected at admission, not discovered by the reconciler later."""
    limit = 63 - reserve
    return {
        "rule": f"size(self.metadata.name) <= {limit} && "
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": (
            f"metadata.name: must be a DNS-1035 label of at most {limit} characters (lower-case letters, "
            f"digits, '-', starting with a letter): the {kind}'s Service and pod hostnames use it"
        ),
    }


def _crd(
    kind: str,
    plural: str,
    short: list[str],
    spec: type[BaseModel],
    status: type[BaseModel],
    rules: dict[str, list[dict[str, str]]],
    columns: list[dict[str, Any]],
    description: str,
    name_reserve: int,
    root_rules: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    spec_schema = structural_schema(spec)
    for path, path_rules in rules.items():
        _at(spec_schema, path)["x-kubernetes-validations"] = path_rules
    status_schema = structural_schema(status)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "aidc"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["aidc", "all"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            # Rules that read status (a started job's locked fields) sit on the root.
                            "x-kubernetes-validations": [name_rule(kind, name_reserve), *(root_rules or [])],
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def trainingjob_crd() -> dict[str, Any]:
    return _crd(
        "TrainingJob",
        "trainingjobs",
        ["tj"],
        TrainingJobSpec,
        TrainingJobStatus,
        TRAININGJOB_RULES,
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {
                "name": "Nodes",
                "type": "string",
                "jsonPath": ".status.nodes",
                "description": "ready/total pods while running; pods that exited 0/total once finished",
            },
            {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
            {"name": "Node-Failures", "type": "integer", "jsonPath": ".status.nodeFailures", "priority": 1},
            {"name": "Spares", "type": "integer", "jsonPath": ".status.spares"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
            {
                "name": "ETA",
                "type": "string",
                "jsonPath": ".status.progress.eta",
                "description": "training time left at the reported rate",
            },
            {
                "name": "Accuracy",
                "type": "number",
                "jsonPath": ".status.evaluation.accuracy",
                "description": "latest held-out accuracy",
            },
            {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.lastCheckpoint.step"},
            {
                "name": "Backup",
                "type": "integer",
                "jsonPath": ".status.lastBackup.step",
                "description": "newest checkpoint step copied to spec.checkpoint.backup",
                "priority": 1,
            },
            {
                "name": "Energy-J",
                "type": "number",
                "jsonPath": ".status.energyJoules",
                "description": "GPU energy in joules, all attempts",
                "priority": 1,
            },
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "A gang of torch.distributed (torchrun) pods that trains a model, checkpoints it encrypted, "
        "and restarts from the last checkpoint when a pod or node fails.",
        len("-1023"),  # pod hostnames: <name>-<rank>
        trainingjob_transition_rules(),
    )


def inferenceservice_crd() -> dict[str, Any]:
    return _crd(
        "InferenceService",
        "inferenceservices",
        ["aisvc"],
        InferenceServiceSpec,
        InferenceServiceStatus,
        INFERENCESERVICE_RULES,
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "URL", "type": "string", "jsonPath": ".status.url"},
            {"name": "Version", "type": "string", "jsonPath": ".status.modelVersion"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Canary", "type": "integer", "jsonPath": ".status.canaryReadyReplicas", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "Model-server pods (Deployment, Service, HorizontalPodAutoscaler) serving a model over the Open "
        "Inference Protocol v2, from storage or from a TrainingJob's newest checkpoint.",
        len("-canary"),  # the canary Deployment and Service: <name>-canary
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name → CRD object."""
    return {
        "aidc.dev_trainingjobs.yaml": trainingjob_crd(),
        "aidc.dev_inferenceservices.yaml": inferenceservice_crd(),
    }
