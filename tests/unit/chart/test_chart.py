"""The Helm chart, rendered with the project's helm: lint, golden output, schema errors users see,
security settings, and agreement with the operator (webhook paths, RBAC documented in docs/security.md).

Regenerate the golden files after an intended chart change:
    AIDC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/chart -q
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from localcluster import build_binaries

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "aidc-operator"
GOLDEN = Path(__file__).parent / "golden"
KUBE_VERSION = "1.34.0"  # the goldens pin it; helm's own default is the pinned Kubernetes (build.sh)
# (golden file, values) — the default install and a namespaced one with cert-manager and monitoring.
VARIANTS = {
    "default.yaml": [],
    "namespaced-certmanager.yaml": [
        "--set=watchNamespaces={team-a,team-b}",
        "--set=webhook.certManager.enabled=true",
        "--set=metrics.serviceMonitor.enabled=true",
        "--set=metrics.prometheusRule.enabled=true",
        "--set=grafanaDashboard.enabled=true",
    ],
}
GENERATED = re.compile(r"^(\s*(?:tls\.crt|tls\.key|ca\.crt|caBundle)): \S+$", re.M)


@pytest.fixture(scope="module")
def helm() -> str:
    return str(build_binaries() / "helm")


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(helm: str, *values: str) -> str:
    return run_helm(
        helm, "template", "aidc", str(CHART), "-n", "aidc-system", f"--kube-version={KUBE_VERSION}", *values
    ).stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def test_helm_lint_is_clean(helm: str) -> None:
    for values in VARIANTS.values():
        out = run_helm(helm, "lint", "--strict", str(CHART), f"--kube-version={KUBE_VERSION}", *values)
        assert "0 chart(s) failed" in out.stdout


def test_helm_template_needs_no_kube_version(helm: str) -> None:
    """What a user types first. helm's default Kubernetes version is a link-time constant (v1.20 unless
    build.sh sets it), below the chart's kubeVersion: without it this fails "chart requires kubeVersion"."""
    proc = run_helm(helm, "template", "aidc", str(CHART), check=False)
    assert proc.returncode == 0, proc.stderr
    assert find(objects(proc.stdout), "Deployment")
    lint = run_helm(helm, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in lint.stdout


@pytest.mark.parametrize("golden", sorted(VARIANTS))
def test_rendered_chart_matches_golden_file(helm: str, golden: str) -> None:
    # Certificates are generated per render; everything else must match byte for byte.
    text = GENERATED.sub(r"\1: <generated>", render(helm, *VARIANTS[golden]))
    path = GOLDEN / golden
    if os.environ.get("AIDC_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with AIDC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"chart output differs from {path.relative_to(ROOT)}; if intended, regenerate with "
        "AIDC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/chart"
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("replicaCount=0", ["/replicaCount", "minimum"]),
        ("webhook.failurePolicy=Sometimes", ["/webhook/failurePolicy", "'Fail', 'Ignore'"]),
        ("webhok.enabled=false", ["'webhok' not allowed"]),
        ("watchNamespaces={Team_A}", ["/watchNamespaces/0", "does not match pattern"]),
        ("peering.lifetime=1", ["/peering/lifetime", "minimum"]),
        ("image.digest=latest", ["/image/digest", "does not match pattern"]),
    ],
)
def test_broken_values_fail_with_a_schema_message(helm: str, value: str, words: list[str]) -> None:
    proc = run_helm(
        helm, "template", "aidc", str(CHART), f"--kube-version={KUBE_VERSION}", f"--set={value}", check=False
    )
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_operator_pods_are_hardened_and_peered(helm: str) -> None:
    objs = objects(render(helm))
    (deploy,) = find(objs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deploy["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "--peering=aidc" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert [o["metadata"]["name"] for o in find(objs, "ClusterKopfPeering")] == ["aidc"]
    assert find(objs, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == 1
    # A single replica gets no PDB: minAvailable 1 would block every node drain.
    assert not find(objects(render(helm, "--set=replicaCount=1")), "PodDisruptionBudget")


def test_webhook_paths_are_the_operators_admission_handlers(helm: str) -> None:
    import kopf

    from aidc_operator.handlers import admission  # noqa: F401 - registers the admission handlers

    handler_ids = {h.id for h in kopf.get_default_registry()._webhooks.get_all_handlers()}
    objs = objects(render(helm))
    paths = {
        w["clientConfig"]["service"]["path"].lstrip("/")
        for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
        for w in find(objs, kind)[0]["webhooks"]
    }
    assert paths == handler_ids
    (deploy,) = find(objs, "Deployment")
    assert "--webhook-port=9443" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]


def test_generated_serving_certificate_is_signed_by_the_ca_bundle(helm: str) -> None:
    objs = objects(render(helm, "--set=webhook.certExtraIPs={127.0.0.1}"))
    (secret,) = [s for s in find(objs, "Secret") if s["metadata"]["name"].endswith("-webhook-cert")]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "aidc-aidc-operator-webhook.aidc-system.svc" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for config in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for hook in find(objs, config)[0]["webhooks"]:
            assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]


def test_namespaced_mode_grants_nothing_cluster_wide_but_reading_nodes_and_kueue_classes(helm: str) -> None:
    objs = objects(render(helm, "--set=watchNamespaces={team-a,team-b}"))
    hook = [o for o in objs if "helm.sh/hook" in (o["metadata"].get("annotations") or {})]
    assert not [o for o in hook if o["kind"].startswith("Cluster")], "the uninstall hook too"
    objs = [o for o in objs if o not in hook]
    (cluster_role,) = find(objs, "ClusterRole")
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
        {"apiGroups": ["kueue.x-k8s.io"], "resources": ["resourceflavors"], "verbs": ["list", "watch"]},
        {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloadpriorityclasses"], "verbs": ["get"]},
        {"apiGroups": ["scheduling.k8s.io"], "resources": ["priorityclasses"], "verbs": ["get"]},
    ], "cluster-scoped and read only: nodes, and what a queued job's Workload is made with"
    roles = sorted(r["metadata"]["namespace"] for r in find(objs, "Role"))
    assert roles == ["kube-node-lease", "team-a", "team-b"]
    assert sorted(p["metadata"]["namespace"] for p in find(objs, "KopfPeering")) == ["team-a", "team-b"]
    for hook in find(objs, "ValidatingWebhookConfiguration")[0]["webhooks"]:
        assert hook["namespaceSelector"]["matchExpressions"] == [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
        ]


def _permissions(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_docs_security_lists_exactly_the_permissions_the_chart_grants(helm: str) -> None:
    objs = objects(render(helm, "--set=uninstallHook.enabled=false"))
    (cluster_role,) = find(objs, "ClusterRole")
    (leases,) = [r for r in find(objs, "Role") if r["metadata"]["namespace"] == "kube-node-lease"]
    granted = _permissions(cluster_role["rules"]) | _permissions(leases["rules"])
    # docs/security.md: "| `group` | `resource` | verb, verb | why |" rows ("core" is the "" group).
    documented: set[tuple[str, str, str]] = set()
    for group, resource, verbs in re.findall(
        r"^\| `([^`]+)` \| `([^`]+)` \| ([a-z, ]+) \|", (ROOT / "docs" / "security.md").read_text(), re.M
    ):
        for verb in verbs.split(","):
            documented.add(("" if group == "core" else group, resource, verb.strip()))
    assert granted == documented


def test_chart_ships_the_same_crds_as_crds_dir() -> None:
    for crd in (ROOT / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text(), crd.name
