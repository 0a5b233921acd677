"""The local apiserver's audit trail (hack/cluster/audit-policy.yaml): who changed a job, who rotated its
key — and never a Secret's data."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from component_args import AUDIT_POLICY
from tests.conftest import ROOT, OperatorProcess
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster
GROUP, VERSION = "aidc.dev", "v1alpha1"
OPERATOR_USER = "aidc-operator-audited"  # the operator's own identity, so the log can tell it apart


def audit_events(path: Path, namespace: str) -> list[dict]:
    events = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if (e.get("objectRef") or {}).get("namespace") == namespace:
            events.append(e)
    return events


@pytest.fixture
def audited_operator(crds: Kube, tmp_path: Path) -> Iterator[tuple[str, OperatorProcess]]:
    """A namespace served by an operator that runs as OPERATOR_USER (a client certificate of its own),
    as the chart's operator runs as its ServiceAccount."""
    if crds.local is None:
        pytest.skip("reads the local cluster's audit log")
    ns = crds.create_namespace("audit", prefix="audit")
    as_operator = Kube(crds.local.identity_kubeconfig(OPERATOR_USER), crds.kubectl_bin, crds.local)
    op = OperatorProcess(as_operator, tmp_path / "operator.log", [ns]).start()
    try:
        yield ns, op
    finally:
        op.stop()
        crds.delete_namespace(ns)


def test_key_rotation_is_in_the_audit_log_with_its_user_and_no_data(
    kube: Kube, audited_operator: tuple[str, OperatorProcess]
) -> None:
    ns, op = audited_operator
    assert kube.local is not None
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "metadata": {"name": "rot"}}
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, "trainingjobs", {**body, "spec": {"nodes": 1}}
    )

    def current_key() -> str | None:
        return (kube.get_cr("trainingjobs", ns, "rot").get("status") or {}).get("currentKeyId")

    k1 = wait_for("the job's key", current_key, timeout=90)
    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "trainingjobs",
        "rot",
        {"metadata": {"annotations": {"aidc.dev/rotate-key": "audit"}}},
    )
    k2 = wait_for("rotated", lambda: (k := current_key()) not in (None, k1) and k, timeout=90)

    def secret_writes() -> list[dict]:
        return [
            e
            for e in audit_events(kube.local.audit_log, ns)
            if e["objectRef"].get("resource") == "secrets" and e["objectRef"].get("name") == "rot-ckpt-key"
        ]

    # The operator created the key Secret, then patched it to rotate; the log says who, not what.
    wait_for(
        "the rotation's Secret patch by the operator's user",
        lambda: any(e["verb"] == "patch" and e["user"]["username"] == OPERATOR_USER for e in secret_writes()),
    )
    writes = secret_writes()
    assert {(e["verb"], e["user"]["username"]) for e in writes} >= {
        ("create", OPERATOR_USER),
        ("patch", OPERATOR_USER),
    }
    for e in writes:
        assert e["level"] == "Metadata" and "requestObject" not in e and "responseObject" not in e

    # Who asked for it: the admin's patch of the job, with its body (Request level).
    def sets_rotate_annotation(e: dict) -> bool:
        body = e.get("requestObject")  # a merge patch here; JSON patches (lists) are someone else's
        annotations = (
            ((body or {}).get("metadata") or {}).get("annotations") if isinstance(body, dict) else None
        )
        return (annotations or {}).get("aidc.dev/rotate-key") == "audit"

    asked = [
        e
        for e in audit_events(kube.local.audit_log, ns)
        if e["objectRef"].get("resource") == "trainingjobs"
        and e["verb"] == "patch"
        and sets_rotate_annotation(e)
    ]
    me = client.AuthenticationV1Api(kube.api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    )
    assert [e["user"]["username"] for e in asked] == [me.status.user_info.username] != [OPERATOR_USER]
    # No key byte anywhere in the audit log, in any form.
    secret = kube.core.read_namespaced_secret("rot-ckpt-key", ns)
    log_text = kube.local.audit_log.read_text()
    for kid in (k1, k2):
        raw = base64.b64decode(secret.data[f"key-{kid}"])
        for form in (secret.data[f"key-{kid}"], raw.hex(), base64.urlsafe_b64encode(raw).decode()):
            assert form not in log_text
    # The log stays small: no status writes, reads, pods or Events of this namespace.
    for e in audit_events(kube.local.audit_log, ns):
        assert e["objectRef"].get("resource") in ("secrets", "trainingjobs", "inferenceservices"), e
        assert not e["objectRef"].get("subresource") and e["verb"] not in ("get", "list", "watch"), e
    # The operator's own trail: one JSON line per key action, ids only.
    lines = [ln[ln.find('{"action":') :] for ln in op.log().splitlines() if '{"action":' in ln]
    rotated = [a for a in map(json.loads, lines) if a["action"] == "rotate"]
    assert [(a["namespace"], a["job"], a["secret"], a["keyIds"]) for a in rotated] == [
        (ns, "rot", "rot-ckpt-key", [k2])
    ]


def test_docs_show_the_policy_the_local_cluster_runs() -> None:
    """docs/security.md's policy for a real cluster is the local cluster's, rule for rule."""
    doc = (ROOT / "docs" / "security.md").read_text()
    shown = re.search(r"```yaml\n(apiVersion: audit\.k8s\.io/v1\n.*?)```", doc, re.S)
    assert shown, "docs/security.md shows the audit policy"

    def rules(text: str) -> list[str]:
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]

    assert rules(shown.group(1)) == rules(AUDIT_POLICY.read_text())
