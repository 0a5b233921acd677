"""GitOps: what Argo CD / Flux do on every sync — server-side apply the rendered overlay — changes nothing
once the operator has reconciled, because the operator writes only status and metadata, never spec."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster
OVERLAY = ROOT / "examples" / "gitops" / "overlays" / "dev"
MANAGER = "gitops"  # the field manager a GitOps controller applies with


def rendered(kube: Kube, namespace: str) -> str:
    docs = [d for d in yaml.safe_load_all(kube.kubectl("kustomize", str(OVERLAY)).stdout) if d]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    return "---\n".join(yaml.safe_dump(d) for d in docs)


def live(kube: Kube, namespace: str) -> dict[str, dict[str, Any]]:
    return {
        plural: kube.get_cr(plural, namespace, "mnist") for plural in ("trainingjobs", "inferenceservices")
    }


def test_second_server_side_apply_after_reconcile_changes_nothing(
    kube: Kube, operator, namespace: str
) -> None:
    manifest = rendered(kube, namespace)
    apply = ["apply", "--server-side", f"--field-manager={MANAGER}", "-f", "-"]
    kube.kubectl(*apply, input=manifest)
    wait_for(
        "the operator reconciled both objects",
        lambda: (
            all((o.get("status") or {}).get("phase") for o in live(kube, namespace).values())
            and live(kube, namespace)["trainingjobs"]["status"]["phase"] == "Running"
        ),
        timeout=60,
    )
    before = live(kube, namespace)

    # What `argocd app diff` / Flux's drift detection ask: would applying change anything?
    diff = kube.kubectl(
        "diff", "--server-side", f"--field-manager={MANAGER}", "-f", "-", input=manifest, check=False
    )
    assert diff.returncode == 0, f"drift after reconcile:\n{diff.stdout}{diff.stderr}"

    # Applying again without --force-conflicts: the operator owns no field the manifests set.
    kube.kubectl(*apply, input=manifest)
    after = live(kube, namespace)
    for plural in before:
        assert after[plural]["metadata"]["generation"] == before[plural]["metadata"]["generation"], plural
        assert after[plural]["spec"] == before[plural]["spec"], plural
        for entry in after[plural]["metadata"]["managedFields"]:
            if entry["manager"] != MANAGER:
                assert "f:spec" not in entry.get("fieldsV1", {}), f"{entry['manager']} wrote {plural} spec"
    # The check is live: a real change to the manifests is drift.
    changed = manifest.replace("- '200'", "- '300'")
    assert changed != manifest
    diff = kube.kubectl(
        "diff", "--server-side", f"--field-manager={MANAGER}", "-f", "-", input=changed, check=False
    )
    assert diff.returncode == 1 and "300" in diff.stdout
