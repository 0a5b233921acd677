"""kopf wiring for InferenceServices (the serving reconciler)."""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

from ..api import GROUP, VERSION, InferenceServiceSpec
from .validation import describe_validation_error

PLURAL = "inferenceservices"


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def observe_inferenceservice(spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
    try:
        InferenceServiceSpec.model_validate(dict(spec))
    except ValidationError as e:
        patch.status["phase"] = "Failed"
        patch.status["observedGeneration"] = meta.get("generation")
        raise kopf.PermanentError(describe_validation_error(e)) from e
    patch.status["phase"] = "Pending"
    patch.status["observedGeneration"] = meta.get("generation")
    kopf.info(dict(spec), reason="Observed", message="InferenceService accepted")
