"""Every TrainingJob and InferenceService shipped in examples/ passes the admission rules (after the
webhook's defaulting), so `kubectl apply` of an example, and `make run`'s demo, never end Invalid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aidc_operator.admission import (
    default_inferenceservice,
    default_trainingjob,
    validate_inferenceservice,
    validate_trainingjob,
)

ROOT = Path(__file__).resolve().parents[3]
KINDS = ("TrainingJob", "InferenceService")


def problems(doc: dict) -> list[str]:
    """What the webhook (and the reconciler) would say about the applied document."""
    name, spec = doc["metadata"]["name"], doc["spec"]
    if doc["kind"] == "TrainingJob":
        return validate_trainingjob(name, default_trainingjob(spec))
    return validate_inferenceservice(name, default_inferenceservice(name, spec))


def shipped() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in KINDS:
                found.append((f"{path.relative_to(ROOT)}:{doc['metadata']['name']}", doc))
    return found


def test_the_examples_include_both_kinds() -> None:
    kinds = {doc["kind"] for _, doc in shipped()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("where,doc", shipped(), ids=[w for w, _ in shipped()])
def test_an_example_passes_admission(where: str, doc: dict) -> None:
    assert problems(doc) == [], where
