"""Admission webhooks (kopf): thin wrappers over the pure rules in aidc_operator.admission.

Served only when the operator runs with --webhook-port (main.py imports this module then); the chart's
Validating/MutatingWebhookConfiguration route /validate-<kind> and /mutate-<kind> here. A rejection is
HTTP 422 with every problem, each starting with its field path.
"""

from __future__ import annotations

from typing import Any

import kopf

from .. import admission, metrics
from ..api import GROUP, VERSION


def _spec_unchanged(old: kopf.Body | None, new: kopf.Body | None) -> bool:
    # Metadata-only updates (labels, finalizers, deletion) must never be blocked by a spec that was
    # admitted earlier under older rules.
    return old is not None and new is not None and old.get("spec") == new.get("spec")


def _reject(webhook: str, problems: list[str]) -> None:
    metrics.ADMISSIONS.labels(webhook, "false" if problems else "true").inc()
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=422)


def _apply_defaults(patch: kopf.Patch, spec: dict[str, Any], defaulted: dict[str, Any]) -> None:
    for key, value in defaulted.items():
        if spec.get(key) != value:
            patch.spec[key] = value


@kopf.on.mutate(GROUP, VERSION, "trainingjobs", id="mutate-trainingjob", operations=["CREATE", "UPDATE"])
def mutate_trainingjob(spec: kopf.Spec, patch: kopf.Patch, **_: Any) -> None:
    current = dict(spec)
    _apply_defaults(patch, current, admission.default_trainingjob(current))


@kopf.on.validate(GROUP, VERSION, "trainingjobs", id="validate-trainingjob", operations=["CREATE", "UPDATE"])
def validate_trainingjob(
    name: str | None, spec: kopf.Spec, old: kopf.Body | None, new: kopf.Body | None, **_: Any
) -> None:
    if _spec_unchanged(old, new):
        return
    problems = admission.validate_trainingjob(name or "", dict(spec))
    if old is not None and new is not None:  # UPDATE: what a started job cannot take
        problems += admission.trainingjob_edit_problems(dict(old), dict(new))
    _reject("validate-trainingjob", problems)


@kopf.on.mutate(
    GROUP, VERSION, "inferenceservices", id="mutate-inferenceservice", operations=["CREATE", "UPDATE"]
)
def mutate_inferenceservice(name: str | None, spec: kopf.Spec, patch: kopf.Patch, **_: Any) -> None:
    current = dict(spec)
    _apply_defaults(patch, current, admission.default_inferenceservice(name or "", current))


@kopf.on.validate(
    GROUP, VERSION, "inferenceservices", id="validate-inferenceservice", operations=["CREATE", "UPDATE"]
)
def validate_inferenceservice(
    name: str | None, spec: kopf.Spec, old: kopf.Body | None, new: kopf.Body | None, **_: Any
) -> None:
    if _spec_unchanged(old, new):
        return
    _reject("validate-inferenceservice", admission.validate_inferenceservice(name or "", dict(spec)))
