"""The admission webhooks as users meet them: the operator serves them over TLS, the real apiserver
calls them (Mutating/ValidatingWebhookConfiguration with a caBundle, limited to this test's namespace),
and kubectl shows the defaults and the field-named rejections."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OperatorProcess
from tests.kube import Kube, wait_for
from tests.webhooks import operator_with_webhooks

pytestmark = pytest.mark.cluster


def trainingjob(name: str, **spec: Any) -> str:
    spec.setdefault("command", ["python", "-m", "aidc_trainer", "--example", "mlp"])
    return json.dumps(
        {"apiVersion": "aidc.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name}, "spec": spec}
    )


class Webhooked:
    def __init__(self, kube: Kube, ns: str, op: OperatorProcess) -> None:
        self.kube, self.ns, self.op = kube, ns, op

    def apply(self, manifest: str, *flags: str) -> Any:
        return self.kube.kubectl("apply", "-n", self.ns, *flags, "-f", "-", input=manifest, check=False)

    def wait_serving(self) -> None:
        wait_for(
            "admission webhooks answering",
            lambda: self.apply(trainingjob("probe"), "--dry-run=server").returncode == 0,
            timeout=60,
        )


@pytest.fixture(scope="module")
def webhooked(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhooked]:
    kube = crds
    tmp: Path = tmp_path_factory.mktemp("webhooks")
    ns = kube.create_namespace("webhooks", prefix="o")
    with operator_with_webhooks(kube, ns, tmp, "aidc-test") as (op, _port):
        w = Webhooked(kube, ns, op)
        try:
            w.wait_serving()
            yield w
        finally:
            kube.delete_namespace(ns)


def test_defaults_are_written_into_the_stored_spec(webhooked: Webhooked) -> None:
    out = webhooked.apply(trainingjob("defaulted", nodes=1, procPerNode=2))
    assert out.returncode == 0, out.stderr
    spec = webhooked.kube.get_cr("trainingjobs", webhooked.ns, "defaulted")["spec"]
    assert spec["gpusPerNode"] == 2
    assert spec["checkpoint"]["everySeconds"] == 600
    # A value the user set is kept as it is.
    webhooked.apply(trainingjob("cpu", nodes=1, procPerNode=2, gpusPerNode=0))
    assert webhooked.kube.get_cr("trainingjobs", webhooked.ns, "cpu")["spec"]["gpusPerNode"] == 0


def test_a_canary_defaulted_by_the_webhook_is_valid_to_the_reconciler(webhooked: Webhooked) -> None:
    """One rule for defaulting and validation: the canary serves the primary's model name, so the spec
    the mutating webhook stores is one the validating webhook and the reconciler both accept."""
    storage = {"volume": {"emptyDir": {}}}
    isvc = {
        "apiVersion": "aidc.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "canaried"},
        "spec": {
            "model": {"storage": {**storage, "path": "v1"}},
            "canary": {"trafficPercent": 10, "model": {"storage": {**storage, "path": "v2"}}},
        },
    }
    out = webhooked.apply(json.dumps(isvc))
    assert out.returncode == 0, out.stderr
    spec = webhooked.kube.get_cr("inferenceservices", webhooked.ns, "canaried")["spec"]
    assert spec["model"]["name"] == spec["canary"]["model"]["name"] == "canaried"

    def reconciled() -> dict | None:
        st = webhooked.kube.get_cr("inferenceservices", webhooked.ns, "canaried").get("status") or {}
        return st if st.get("observedGeneration") == 1 else None

    st = wait_for("the reconciler's verdict", reconciled, timeout=60)
    assert not any(c["type"] == "Invalid" and c["status"] == "True" for c in st.get("conditions") or []), st
    # A name that differs is rejected by the webhook, naming the field.
    isvc["metadata"]["name"] = "renamed"
    isvc["spec"]["canary"]["model"]["name"] = "other"
    out = webhooked.apply(json.dumps(isvc))
    assert out.returncode != 0 and "spec.canary.model.name: must be 'renamed'" in out.stderr


def test_invalid_spec_is_rejected_with_every_field_named(webhooked: Webhooked) -> None:
    out = webhooked.apply(
        trainingjob("bad", procPerNode=4, gpusPerNode=2, env=[{"name": "RANK", "value": "3"}])
    )
    assert out.returncode != 0
    assert 'admission webhook "trainingjobs.validate.aidc.dev" denied the request' in out.stderr
    assert "spec.gpusPerNode: 2 GPUs for procPerNode 4 worker processes" in out.stderr
    assert "spec.env[0].name: RANK is set by the operator" in out.stderr
    # An InferenceService too, and the CRD schema still runs first for what it can express.
    isvc = {
        "apiVersion": "aidc.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "bad-svc"},
        "spec": {"model": {"storage": {"volume": {"emptyDir": {}}, "path": "../etc"}}},
    }
    out = webhooked.apply(json.dumps(isvc))
    assert out.returncode != 0
    assert "spec.model.storage.path: '../etc' must be relative to the volume" in out.stderr


def test_webhook_unavailable_fails_closed_and_recovers(webhooked: Webhooked, tmp_path: Path) -> None:
    port = int(webhooked.op.extra[0].split("=")[1])
    webhooked.op.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "webhook port still open"
    out = webhooked.apply(trainingjob("while-down"))
    assert out.returncode != 0
    assert 'failed calling webhook "trainingjobs.mutate.aidc.dev"' in out.stderr
    webhooked.op.start()
    webhooked.wait_serving()
    assert webhooked.apply(trainingjob("after-recovery")).returncode == 0
