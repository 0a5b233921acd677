"""The operator serving its admission webhooks for one namespace, the real apiserver calling them:
the MutatingWebhookConfiguration and ValidatingWebhookConfiguration that point at it (with the test
CA's caBundle, limited to the namespace), made and removed around a test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster_processes import free_port
from tests.conftest import OperatorProcess
from tests.kube import Kube
from tests.tls import serving_cert


def webhook_configurations(name: str, url: str, ca_bundle: str, namespace: str) -> list[dict[str, Any]]:
    def hook(kind: str, plural: str, singular: str) -> dict[str, Any]:
        return {
            "name": f"{plural}.{kind}.aidc.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "rules": [
                {
                    "apiGroups": ["aidc.dev"],
                    "apiVersions": ["v1alpha1"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": [plural],
                }
            ],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "clientConfig": {"url": f"{url}/{kind}-{singular}", "caBundle": ca_bundle},
        }

    kinds = (("trainingjobs", "trainingjob"), ("inferenceservices", "inferenceservice"))
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": f"{config}WebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [hook(kind, plural, singular) for plural, singular in kinds],
        }
        for config, kind in (("Mutating", "mutate"), ("Validating", "validate"))
    ]


@contextmanager
def operator_with_webhooks(
    kube: Kube, ns: str, workdir: Path, name: str
) -> Iterator[tuple[OperatorProcess, int]]:
    """(the operator, its webhook port) while the webhook configurations `<name>-<ns>` send it the
    namespace's TrainingJobs and InferenceServices."""
    cert = serving_cert(workdir / "cert")
    port = free_port()
    flags = [f"--webhook-port={port}", "--webhook-addr=127.0.0.1"]
    flags += [f"--webhook-cert={cert.cert_file}", f"--webhook-key={cert.key_file}"]
    op = OperatorProcess(kube, workdir / "operator.log", [ns], flags).start()
    configs = webhook_configurations(f"{name}-{ns}", f"https://127.0.0.1:{port}", cert.ca_bundle, ns)
    try:
        kube.kubectl("apply", "-f", "-", input="\n".join(json.dumps(c) for c in configs))
        yield op, port
    finally:
        for c in configs:
            kube.kubectl("delete", c["kind"], c["metadata"]["name"], "--ignore-not-found", check=False)
        op.stop()
