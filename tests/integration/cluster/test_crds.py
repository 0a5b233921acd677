"""The CRDs on a real apiserver: examples are accepted, invalid specs are rejected by the apiserver
(schema + CEL) with a message that names the field, defaults are filled in, kubectl explain teaches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes.client.rest import ApiException

from tests.kube import Kube
from tests.unit.operator.test_admission import EDIT_CASES

pytestmark = pytest.mark.cluster
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def tj(name: str, **spec) -> dict:
    return {
        "apiVersion": "aidc.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def isvc(name: str, **spec) -> dict:
    return {
        "apiVersion": "aidc.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_accepted(crds: Kube, namespace: str, example: str) -> None:
    out = crds.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLES / example))
    assert "created (server dry run)" in out.stdout


@pytest.mark.parametrize(
    ("obj", "field", "words"),
    [
        (tj("bad-nodes", nodes=0), "spec.nodes", "greater than or equal to 1"),
        (tj("bad-gpus", gpusPerNode=1.5), "spec.gpusPerNode", "integer"),
        (
            tj("bad-elastic", nodes=3, elastic={"minNodes": 4, "maxNodes": 2}),
            "spec.elastic.minNodes",
            "minNodes must be <= spec.elastic.maxNodes",
        ),
        (tj("bad-range", nodes=8, elastic={"minNodes": 2, "maxNodes": 4}), "spec.nodes", "must lie within"),
        (
            tj("bad-interval", checkpoint={"everySeconds": -5}),
            "spec.checkpoint.everySeconds",
            "greater than or equal to 1",
        ),
        (
            tj("bad-policy", failurePolicy={"nodeFailure": "Ignore"}),
            "spec.failurePolicy.nodeFailure",
            "Unsupported value",
        ),
        (
            tj("bad-backoff", failurePolicy={"backoffSeconds": 600, "maxBackoffSeconds": 60}),
            "spec.failurePolicy.backoffSeconds",
            "maxBackoffSeconds",
        ),
        (
            tj("bad-retention", checkpoint={"encryption": {"keyRetention": "Forever"}}),
            "spec.checkpoint.encryption.keyRetention",
            "Unsupported value",
        ),
        (
            tj("bad-duration", checkpoint={"encryption": {"rotateAfter": "a week"}}),
            "spec.checkpoint.encryption.rotateAfter",
            "should match",
        ),
        (
            tj("bad-grace", podTemplate={"terminationGracePeriodSeconds": -1}),
            "spec.podTemplate.terminationGracePeriodSeconds",
            "greater than or equal to 0",
        ),
        (isvc("bad-model", model={}), "spec.model", "exactly one of model.fromTrainingJob and model.storage"),
        (
            isvc("bad-replicas", model={"fromTrainingJob": "x"}, replicas={"min": 5, "max": 2}),
            "spec.replicas.min",
            "min must be <= spec.replicas.max",
        ),
        (
            isvc(
                "bad-canary",
                model={"fromTrainingJob": "x"},
                canary={"trafficPercent": 150, "model": {"fromTrainingJob": "y"}},
            ),
            "spec.canary.trafficPercent",
            "less than or equal to 100",
        ),
    ],
)
def test_invalid_specs_are_rejected_naming_the_field(
    crds: Kube, namespace: str, obj: dict, field: str, words: str
) -> None:
    out = crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    assert out.returncode != 0, f"apiserver accepted {obj}"
    assert field in out.stderr, out.stderr
    assert words in out.stderr, out.stderr


def test_defaults_are_filled_in_by_the_apiserver(crds: Kube, namespace: str) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(tj("defaults", nodes=2)))
    spec = crds.get_cr("trainingjobs", namespace, "defaults")["spec"]
    assert spec["procPerNode"] == 1 and spec["masterPort"] == 29500
    assert spec["failurePolicy"] == {
        "maxRestarts": 3,
        "backoffSeconds": 10,
        "maxBackoffSeconds": 300,
        "nodeFailure": "RestartGang",
        "maxNodeFailures": 10,
        "spareNodes": 0,
    }
    assert spec["checkpoint"]["encryption"] == {"enabled": True, "keyRetention": "Retain"}
    assert spec["cleanPodPolicy"] == "Running"


def test_kubectl_explain_and_short_names(crds: Kube, namespace: str) -> None:
    explain = crds.kubectl("explain", "trainingjob.spec.failurePolicy.nodeFailure").stdout
    assert "recreate the gang on healthy nodes" in explain
    explain = crds.kubectl("explain", "inferenceservice.spec.model.fromTrainingJob").stdout
    assert "newest verified checkpoint" in explain
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(tj("short")))
    listed = crds.kubectl("get", "tj", "-n", namespace).stdout
    header = listed.splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "NODES", "RESTARTS", "SPARES", "STEP"] and "CHECKPOINT" in header


def test_kubectl_explain_shows_defaults(crds: Kube) -> None:
    explain = crds.kubectl("explain", "trainingjob.spec.checkpoint", "--recursive=false").stdout
    assert "Default: 3." in explain  # keep
    explain = crds.kubectl("explain", "trainingjob.spec.checkpoint.encryption").stdout
    assert "Default: Retain." in explain and "Default: true." in explain


@pytest.mark.parametrize(("case", "status", "change", "field"), EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_the_apiserver_rejects_edits_a_started_job_cannot_take(
    crds: Kube, namespace: str, case: str, status: dict, change: dict, field: str | None
) -> None:
    """The CRD's CEL transition rules, on the same cases as the webhook's (test_admission.py)."""
    g, v, plural = "aidc.dev", "v1alpha1", "trainingjobs"
    crds.custom.create_namespaced_custom_object(g, v, namespace, plural, tj(case, nodes=2))
    crds.custom.patch_namespaced_custom_object_status(g, v, namespace, plural, case, {"status": status})
    try:
        crds.custom.patch_namespaced_custom_object(g, v, namespace, plural, case, {"spec": change})
    except ApiException as e:
        assert field is not None, f"{case}: rejected: {e.body}"
        assert e.status == 422 and f"{field} cannot change" in e.body, e.body
        return
    assert field is None, f"{case}: the apiserver accepted an edit of {field}"
