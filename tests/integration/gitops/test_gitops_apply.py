"""GitOps: what Argo CD / Flux do on every sync — server-side apply the rendered overlay — changes nothing
once the operator has reconciled, because the operator writes only status and metadata, never spec, and
the chart's mutating webhook fills in the same defaults on every apply.

The webhooks are the chart's own (`helm template` of charts/aidc-operator, pointed at the local operator
process with `webhook.url`, as tests/e2e/test_helm_install.py does), served with the chart's certificate."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from cluster_processes import free_port
from localcluster import build_binaries
from tests.conftest import ROOT, OperatorProcess
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster
OVERLAY = ROOT / "examples" / "gitops" / "overlays" / "dev"
CHART = ROOT / "charts" / "aidc-operator"
MANAGER = "gitops"  # the field manager a GitOps controller applies with
WEBHOOK_CONFIGS = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")


@pytest.fixture(scope="module")
def webhooked_namespace(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A namespace served by an operator behind the chart's rendered admission webhooks."""
    kube, tmp = crds, tmp_path_factory.mktemp("gitops")
    ns = kube.create_namespace("gitops", prefix="o")  # not t-*: the session operator must not serve it
    port = free_port()
    release = f"gitops-{ns.rsplit('-', 1)[1]}"  # the configurations are cluster-scoped
    values = [f"--set=fullnameOverride={release}", f"--set=watchNamespaces={{{ns}}}"]
    values += [f"--set=webhook.url=https://127.0.0.1:{port}", "--set=webhook.certExtraIPs={127.0.0.1}"]
    rendered = subprocess.run(
        [
            str(build_binaries() / "helm"),
            "template",
            release,
            str(CHART),
            "--show-only=templates/webhook.yaml",
            *values,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    objs = [d for d in yaml.safe_load_all(rendered) if d]
    (secret,) = [o for o in objs if o["kind"] == "Secret"]
    for name in ("tls.crt", "tls.key"):
        (tmp / name).write_bytes(base64.b64decode(secret["data"][name]))
    configs = [o for o in objs if o["kind"] in WEBHOOK_CONFIGS]
    assert len(configs) == 2
    webhook = [f"--webhook-port={port}", "--webhook-addr=127.0.0.1"]
    webhook += [f"--webhook-cert={tmp / 'tls.crt'}", f"--webhook-key={tmp / 'tls.key'}"]
    op = OperatorProcess(kube, tmp / "operator.log", [ns], webhook).start()
    kube.kubectl("apply", "-f", "-", input="\n".join(json.dumps(c) for c in configs))
    try:
        probe = {"apiVersion": "aidc.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "probe"}}
        probe["spec"] = {"command": ["python"], "procPerNode": 3}
        wait_for(
            "the chart's mutating webhook answering",
            lambda: (
                (
                    out := kube.kubectl(
                        "apply",
                        "--dry-run=server",
                        "-o",
                        "json",
                        "-n",
                        ns,
                        "-f",
                        "-",
                        input=json.dumps(probe),
                        check=False,
                    )
                ).returncode
                == 0
                and json.loads(out.stdout)["spec"].get("gpusPerNode") == 3
            ),
            timeout=90,
        )
        yield ns
    finally:
        for c in configs:
            kube.kubectl("delete", c["kind"], c["metadata"]["name"], "--ignore-not-found", check=False)
        op.stop()
        kube.delete_namespace(ns)


# Beside the overlay: a job that leaves every field the webhook defaults (gpusPerNode, the checkpoint
# trigger) to it; the overlay's job sets them all.
DEFAULTED = {
    "apiVersion": "aidc.dev/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "defaulted"},
    "spec": {"command": ["python", "-m", "aidc_trainer", "--example", "mlp"], "procPerNode": 2},
}
OBJECTS = (("trainingjobs", "mnist"), ("trainingjobs", "defaulted"), ("inferenceservices", "mnist"))


def rendered(kube: Kube, namespace: str) -> str:
    docs = [d for d in yaml.safe_load_all(kube.kubectl("kustomize", str(OVERLAY)).stdout) if d]
    for doc in [*docs, DEFAULTED]:
        doc["metadata"]["namespace"] = namespace
    return "---\n".join(yaml.safe_dump(d) for d in [*docs, DEFAULTED])


def live(kube: Kube, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(plural, name): kube.get_cr(plural, namespace, name) for plural, name in OBJECTS}


def test_second_server_side_apply_after_reconcile_changes_nothing(
    kube: Kube, webhooked_namespace: str
) -> None:
    namespace = webhooked_namespace
    manifest = rendered(kube, namespace)
    apply = ["apply", "--server-side", f"--field-manager={MANAGER}", "-f", "-"]
    kube.kubectl(*apply, input=manifest)

    def reconciled() -> bool:
        phases = {key: (o.get("status") or {}).get("phase") for key, o in live(kube, namespace).items()}
        jobs = [p for (plural, _), p in phases.items() if plural == "trainingjobs"]
        return all(phases.values()) and all(p == "Running" for p in jobs)

    wait_for("the operator reconciled every object", reconciled, timeout=90)
    before = live(kube, namespace)
    # The mutating webhook did fill in defaults the manifests leave out: exactly what could drift.
    defaulted = before[("trainingjobs", "defaulted")]["spec"]
    assert defaulted["gpusPerNode"] == 2 and defaulted["checkpoint"]["everySeconds"] == 600, defaulted
    assert before[("inferenceservices", "mnist")]["spec"]["model"]["name"] == "mnist"

    # What `argocd app diff` / Flux's drift detection ask: would applying change anything?
    diff = kube.kubectl(
        "diff", "--server-side", f"--field-manager={MANAGER}", "-f", "-", input=manifest, check=False
    )
    assert diff.returncode == 0, f"drift after reconcile:\n{diff.stdout}{diff.stderr}"

    # Applying again without --force-conflicts: the operator owns no field the manifests set.
    kube.kubectl(*apply, input=manifest)
    after = live(kube, namespace)
    for key in before:
        assert after[key]["metadata"]["generation"] == before[key]["metadata"]["generation"], key
        assert after[key]["spec"] == before[key]["spec"], key
        for entry in after[key]["metadata"]["managedFields"]:
            if entry["manager"] != MANAGER:
                assert "f:spec" not in entry.get("fieldsV1", {}), f"{entry['manager']} wrote {key} spec"
    # The check is live: a real change to the manifests is drift (a field that may change while serving:
    # a running job's command may not).
    changed = manifest.replace("max: 2", "max: 3")
    assert changed.count("max: 3") == 1
    diff = kube.kubectl(
        "diff", "--server-side", f"--field-manager={MANAGER}", "-f", "-", input=changed, check=False
    )
    assert diff.returncode == 1 and "max: 3" in diff.stdout, diff.stderr
