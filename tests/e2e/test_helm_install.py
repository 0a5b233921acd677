"""End to end: `helm install` the chart into the local cluster, then run the operator exactly as the
chart's Deployment configures it (its args and env) with the chart's ServiceAccount token and the chart's
webhook certificate, and check what users would: the RBAC matrix (`kubectl auth can-i`), a TrainingJob
through the webhooks to Succeeded, an InferenceService reconciled, no permission errors, and no key
material in anything the operator wrote.

The apiserver cannot reach in-cluster Services here (kwok plays the nodes; the chart's pods never really
run), so the chart is installed with `webhook.url` pointing at the local operator process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from cluster_processes import free_port
from localcluster import build_binaries
from tests.conftest import ROOT, OperatorProcess
from tests.integration.operator.test_trainingjob import succeed_pod, wait_running
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
CHART = ROOT / "charts" / "aidc-operator"


@dataclass
class Install:
    kube: Kube
    release: str
    system_ns: str  # where the chart is installed
    ns: str  # the namespace the operator serves (watchNamespaces)
    sa: str
    op: OperatorProcess
    values: list[str]  # the --set flags it was installed with

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.system_ns}:{self.sa}"


class ChartOperator(OperatorProcess):
    """The operator with the rendered Deployment's args/env, the SA's kubeconfig and local cert files."""

    def __init__(self, kube: Kube, log_path: Path, args: list[str], env: dict[str, str], kubeconfig: Path):
        super().__init__(kube, log_path, [])
        self.args, self.env, self.kubeconfig = args, env, kubeconfig

    def start(self) -> ChartOperator:
        self.health_port = free_port()
        args = [a for a in self.args if not a.startswith(("--metrics-port", "--health-port"))]
        self.metrics_port = free_port()
        args += [f"--metrics-port={self.metrics_port}", f"--health-port={self.health_port}"]
        args += ["--webhook-addr=127.0.0.1"]
        env_metrics = {"AIDC_METRICS_ADDR": "127.0.0.1"}
        env = {**self.kube.env(), **self.env, **env_metrics, "KUBECONFIG": str(self.kubeconfig)}
        env["PYTHONPATH"] = str(ROOT / "operator")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aidc_operator", *args],
            env=env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        wait_for("operator liveness endpoint", self._healthy, timeout=60)
        return self


def helm(kube: Kube, *args: str) -> str:
    proc = subprocess.run(
        [str(build_binaries() / "helm"), *args], env=kube.env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def service_account_kubeconfig(kube: Kube, ns: str, sa: str, path: Path) -> Path:
    token = kube.kubectl("create", "token", sa, "-n", ns, "--duration=2h").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster}],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "local", "user": sa}}],
                "current-context": "sa",
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def install(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    kube, tmp = crds, tmp_path_factory.mktemp("e2e")
    system_ns = kube.create_namespace("aidc-system", prefix="o")
    ns = kube.create_namespace("e2e", prefix="o")
    release = f"aidc-{ns.rsplit('-', 1)[1]}"  # cluster-scoped names must not collide across runs
    port = free_port()
    values = [
        f"--set=fullnameOverride={release}",
        f"--set=watchNamespaces={{{ns}}}",
        f"--set=webhook.port={port}",
        f"--set=webhook.url=https://127.0.0.1:{port}",
        "--set=webhook.certExtraIPs={127.0.0.1}",
    ]
    helm(kube, "install", release, str(CHART), "-n", system_ns, *values)
    op = None
    try:
        deploy = kube.apps.read_namespaced_deployment(release, system_ns)
        container = deploy.spec.template.spec.containers[0]
        sa = deploy.spec.template.spec.service_account_name
        secret = kube.core.read_namespaced_secret(f"{release}-webhook-cert", system_ns)
        certs = tmp / "webhook"
        certs.mkdir()
        args = []
        for arg in container.args:
            for flag in ("--webhook-cert", "--webhook-key"):
                if arg.startswith(flag + "="):
                    name = Path(arg.split("=", 1)[1]).name
                    (certs / name).write_bytes(base64.b64decode(secret.data[name]))
                    arg = f"{flag}={certs / name}"
            args.append(arg)
        env = {e.name: e.value for e in container.env if e.value is not None}
        env["POD_ID"] = f"{release}-local"
        kubeconfig = service_account_kubeconfig(kube, system_ns, sa, tmp / "sa.kubeconfig")
        op = ChartOperator(kube, tmp / "operator.log", args, env, kubeconfig).start()
        wait_for(
            "webhooks answering with the chart's certificate",
            lambda: (
                kube.kubectl(
                    "apply", "--dry-run=server", "-n", ns, "-f", "-", input=_tj("probe"), check=False
                ).returncode
                == 0
            ),
            timeout=90,
        )
        yield Install(kube, release, system_ns, ns, sa, op, values)
    finally:
        if op is not None:
            op.stop()
        if release in helm(kube, "list", "-q", "-n", system_ns).split():  # the last test uninstalls it
            helm(kube, "uninstall", release, "-n", system_ns)
        kube.delete_namespace(ns)
        kube.delete_namespace(system_ns)


def _tj(name: str, **spec: object) -> str:
    spec.setdefault("command", ["python", "-m", "aidc_trainer", "--example", "mlp"])
    return json.dumps(
        {"apiVersion": "aidc.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name}, "spec": spec}
    )


# (verb, resource, where: "ns" served, "other" not served, "" cluster-scoped or a namespace, allowed)
MATRIX = [
    ("create", "pods", "ns", True),
    ("delete", "pods", "ns", True),
    ("watch", "pods", "ns", True),
    ("create", "pods/exec", "ns", False),
    ("get", "pods/proxy", "ns", True),
    ("create", "pods/proxy", "ns", False),
    ("get", "pods/portforward", "ns", False),
    ("get", "pods/log", "ns", False),
    ("get", "secrets", "ns", True),
    ("create", "secrets", "ns", True),
    ("list", "secrets", "ns", False),
    ("watch", "secrets", "ns", False),
    ("patch", "secrets", "ns", True),
    ("update", "secrets", "ns", False),
    ("delete", "secrets", "ns", False),
    ("patch", "trainingjobs.aidc.dev/status", "ns", True),
    ("update", "trainingjobs.aidc.dev/status", "ns", False),
    ("delete", "trainingjobs.aidc.dev", "ns", True),
    ("create", "trainingjobs.aidc.dev", "ns", False),
    ("delete", "inferenceservices.aidc.dev", "ns", False),
    ("create", "networkpolicies.networking.k8s.io", "ns", True),
    ("create", "roles.rbac.authorization.k8s.io", "ns", True),
    ("escalate", "roles.rbac.authorization.k8s.io", "ns", False),
    ("bind", "roles.rbac.authorization.k8s.io", "ns", False),
    ("create", "deployments.apps", "ns", True),
    ("create", "horizontalpodautoscalers.autoscaling", "ns", True),
    ("get", "persistentvolumeclaims", "ns", True),
    ("create", "persistentvolumeclaims", "ns", False),
    ("create", "events", "ns", True),
    ("get", "configmaps", "ns", False),
    ("patch", "kopfpeerings.kopf.dev", "ns", True),
    ("create", "pods", "other", False),
    ("get", "secrets", "other", False),
    ("list", "trainingjobs.aidc.dev", "other", False),
    ("list", "leases.coordination.k8s.io", "kube-node-lease", True),
    ("get", "leases.coordination.k8s.io", "kube-node-lease", False),
    ("list", "leases.coordination.k8s.io", "other", False),
    ("list", "nodes", "", True),
    ("watch", "nodes", "", True),
    ("patch", "nodes", "", False),
    ("delete", "nodes", "", False),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", "", False),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", "", False),
    ("list", "namespaces", "", False),
    ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io", "", False),
    ("create", "clusterroles.rbac.authorization.k8s.io", "", False),
    ("list", "clusterkopfpeerings.kopf.dev", "", False),
]


def test_service_account_can_exactly_what_docs_security_says(install: Install) -> None:
    wrong = []
    for verb, resource, where, allowed in MATRIX:
        scope = {"ns": ["-n", install.ns], "other": ["-n", install.system_ns], "": []}.get(
            where, ["-n", where]
        )
        # "pods/exec" is a subresource; kubectl would read "TYPE/NAME" as an object name.
        resource, _, sub = resource.partition("/")
        scope += [f"--subresource={sub}"] if sub else []
        out = install.kube.kubectl(
            "auth", "can-i", verb, resource, *scope, f"--as={install.user}", check=False
        )
        if (out.stdout.strip() == "yes") != allowed:
            wrong.append(f"{verb} {resource} {where or 'cluster'}: {out.stdout.strip()}, expected {allowed}")
    assert not wrong, "\n".join(wrong)


def test_trainingjob_succeeds_under_the_charts_rbac_and_webhooks(install: Install) -> None:
    with operator_log_on_failure(install):
        kube, ns = install.kube, install.ns
        kube.kubectl("apply", "-n", ns, "-f", "-", input=_tj("smoke", nodes=2, procPerNode=2))
        spec = kube.get_cr("trainingjobs", ns, "smoke")["spec"]
        assert spec["gpusPerNode"] == 2, "the chart's mutating webhook did not default gpusPerNode"
        pods = wait_running(kube, ns, "smoke", attempt=0, nodes=2)
        for pod in pods:
            succeed_pod(kube, ns, pod.metadata.name)
        wait_for(
            "smoke Succeeded",
            lambda: (
                (kube.get_cr("trainingjobs", ns, "smoke").get("status") or {}).get("phase") == "Succeeded"
            ),
            timeout=60,
        )
        # The chart's webhook rejects bad specs too.
        bad = kube.kubectl("apply", "-n", ns, "-f", "-", input=_tj("bad", masterPort=9400), check=False)
        assert "spec.masterPort: 9400 is the trainer's metrics port" in bad.stderr
        assert_no_permission_errors(install)
        # What the dashboard shows about it, from the operator's /metrics.
        scraped = urllib.request.urlopen(
            f"http://127.0.0.1:{install.op.metrics_port}/metrics", timeout=5
        ).read()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scraped.decode())
            for s in family.samples
        }
        phase = ("aidc_trainingjob_phase", (("name", "smoke"), ("namespace", ns), ("phase", "Succeeded")))
        assert samples.get(phase) == 1, [k for k in samples if k[0].startswith("aidc_")]
        assert samples[("aidc_reconcile_seconds_count", (("resource", "TrainingJob"),))] >= 2
        rejected = (("allowed", "false"), ("webhook", "validate-trainingjob"))
        assert samples[("aidc_admission_requests_total", rejected)] >= 1


def test_inferenceservice_is_reconciled_under_the_charts_rbac(install: Install) -> None:
    with operator_log_on_failure(install):
        kube, ns = install.kube, install.ns
        isvc = {
            "apiVersion": "aidc.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": "smoke-svc"},
            "spec": {"model": {"storage": {"volume": {"emptyDir": {}}, "path": "models/smoke"}}},
        }
        kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc))
        assert kube.get_cr("inferenceservices", ns, "smoke-svc")["spec"]["model"]["name"] == "smoke-svc"
        wait_for(
            "InferenceService status written by the operator",
            lambda: (kube.get_cr("inferenceservices", ns, "smoke-svc").get("status") or {}).get("phase"),
            timeout=60,
        )
        # The operator asks running model servers why they are unready (pods/proxy): a permission it
        # lacks would surface here as the reason, not as an error in its log.
        wait_for("a model-server pod Running", lambda: kube.pods(ns, "aidc.dev/inferenceservice=smoke-svc"))
        time.sleep(4)  # a few reconcile passes that probe the pods
        status = json.dumps(kube.get_cr("inferenceservices", ns, "smoke-svc").get("status"))
        assert "Forbidden" not in status and "forbidden" not in status, status
        assert_no_permission_errors(install)


def test_key_material_never_leaves_the_secret(install: Install) -> None:
    """Everything the operator wrote about an encrypted job: its log, the job's Events, status and
    metadata. None of it may contain the data key, in any encoding."""
    with operator_log_on_failure(install):
        kube, ns = install.kube, install.ns
        kube.kubectl("apply", "-n", ns, "-f", "-", input=_tj("secretive", nodes=1))
        wait_running(kube, ns, "secretive", attempt=0, nodes=1)
        secret = kube.core.read_namespaced_secret("secretive-ckpt-key", ns)
        key_id = base64.b64decode(secret.data["current-key-id"]).decode()
        key = base64.b64decode(secret.data[f"key-{key_id}"])
        forms = {
            key.hex(),
            key.hex().upper(),
            secret.data[f"key-{key_id}"],
            base64.urlsafe_b64encode(key).decode(),
        }
        forms.add(key.decode("latin-1"))
        written = [
            install.op.log(),
            kube.kubectl("get", "events", "-n", ns, "-o", "json").stdout,
            json.dumps(kube.get_cr("trainingjobs", ns, "secretive")),
        ]
        for text in written:
            for form in forms:
                assert form not in text
        assert key_id in json.dumps(kube.get_cr("trainingjobs", ns, "secretive")), "status names the key id"


def test_upgrade_keeps_the_webhook_certificate(install: Install) -> None:
    """The chart generates its serving certificate once: an upgrade must not replace it (pods would serve
    a certificate the new caBundle does not trust until their Secret volume refreshes)."""
    kube = install.kube

    def cert_and_bundles() -> tuple[str, set[str]]:
        secret = kube.core.read_namespaced_secret(f"{install.release}-webhook-cert", install.system_ns)
        config = kube.kubectl("get", "validatingwebhookconfiguration", install.release, "-o", "json").stdout
        return secret.data["tls.crt"], {w["clientConfig"]["caBundle"] for w in json.loads(config)["webhooks"]}

    before = cert_and_bundles()
    helm(kube, "upgrade", install.release, str(CHART), "-n", install.system_ns, *install.values)
    assert cert_and_bundles() == before
    # ... and the operator still answers with it.
    out = kube.kubectl(
        "apply", "--dry-run=server", "-n", install.ns, "-f", "-", input=_tj("again"), check=False
    )
    assert out.returncode == 0, out.stderr


def served_certificate(install: Install) -> x509.Certificate:
    """The certificate the operator's webhook server answers with right now."""
    port = int(next(a for a in install.op.args if a.startswith("--webhook-port=")).split("=")[1])
    return x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())


def test_upgrade_with_new_certificate_ips_reissues_the_certificate(install: Install) -> None:
    """A new webhook.certExtraIPs needs a certificate that names it: reusing the old one (as the chart did)
    made every apiserver call to the new address fail TLS. The bundle trusts the old CA through the
    rollout, so replicas still serving the old certificate keep answering."""
    kube, ns = install.kube, install.ns
    name = f"{install.release}-webhook-cert"
    old = kube.core.read_namespaced_secret(name, install.system_ns).data
    old_template = kube.apps.read_namespaced_deployment(install.release, install.system_ns).spec.template
    values = [*install.values, "--set=webhook.certExtraIPs={127.0.0.1,127.0.0.2}"]
    helm(kube, "upgrade", install.release, str(CHART), "-n", install.system_ns, *values)
    new = kube.core.read_namespaced_secret(name, install.system_ns).data
    cert = x509.load_pem_x509_certificate(base64.b64decode(new["tls.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)) == ["127.0.0.1", "127.0.0.2"]
    # The Deployment rolls, so pods pick the new certificate up at once.
    template = kube.apps.read_namespaced_deployment(install.release, install.system_ns).spec.template
    assert template.metadata.annotations != old_template.metadata.annotations

    def admitted() -> bool:
        out = kube.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=_tj("again"), check=False)
        return out.returncode == 0

    # The running operator still serves the old certificate: the apiserver trusts it through the rollout.
    config = kube.kubectl("get", "mutatingwebhookconfiguration", install.release, "-o", "json").stdout
    (bundle,) = {w["clientConfig"]["caBundle"] for w in json.loads(config)["webhooks"]}
    assert base64.b64decode(bundle) == base64.b64decode(new["ca.crt"]) + base64.b64decode(old["ca.crt"])
    assert served_certificate(install).serial_number != cert.serial_number
    assert admitted()
    # The kubelet refreshes the Secret volume; the operator reloads the changed files.
    for arg in install.op.args:
        for flag, key in (("--webhook-cert=", "tls.crt"), ("--webhook-key=", "tls.key")):
            if arg.startswith(flag):
                Path(arg[len(flag) :]).write_bytes(base64.b64decode(new[key]))
    wait_for("the new certificate served", lambda: served_certificate(install) == cert, timeout=90)
    assert admitted()
    # Asking for the same SANs again keeps it, and the bundle is back to the one CA.
    helm(kube, "upgrade", install.release, str(CHART), "-n", install.system_ns, *values)
    assert kube.core.read_namespaced_secret(name, install.system_ns).data == new
    config = kube.kubectl("get", "validatingwebhookconfiguration", install.release, "-o", "json").stdout
    assert {w["clientConfig"]["caBundle"] for w in json.loads(config)["webhooks"]} == {new["ca.crt"]}
    assert admitted()
    install.values[:] = values


def test_after_uninstall_deleting_a_trainingjob_completes(install: Install, tmp_path: Path) -> None:
    """Last in this module: it uninstalls the release. kopf's finalizer would make every later delete
    hang; the chart's pre-delete hook stops the operator and removes it.

    kwok plays the nodes, so the hook Job's pod would be marked Completed without running anything: the
    test runs the Job's container command itself, as a local process, from the hook manifest helm
    rendered (`helm get hooks`), with the hook's own ServiceAccount and RBAC created from that manifest
    — exactly what the Job's pod would do — and then runs the real `helm uninstall`."""
    kube, ns, system_ns = install.kube, install.ns, install.system_ns
    kube.kubectl("apply", "-n", ns, "-f", "-", input=_tj("left", nodes=1))
    wait_for(
        "the operator's finalizer on the job",
        lambda: (
            "aidc.dev/operator"
            in (kube.get_cr("trainingjobs", ns, "left")["metadata"].get("finalizers") or [])
        ),
        timeout=60,
    )
    hooks = [d for d in yaml.safe_load_all(helm(kube, "get", "hooks", install.release, "-n", system_ns)) if d]
    (job,) = [d for d in hooks if d["kind"] == "Job"]
    kube.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in hooks if d is not job))
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    kubeconfig = service_account_kubeconfig(kube, system_ns, pod["serviceAccountName"], tmp_path / "hook")
    env = {**kube.env(), "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(ROOT / "operator")}
    # The hook releases the finalizers once the operator's pods are gone. Here kwok's pods go at once
    # while the replica really running is the local operator: a finalizer of the test's keeps each pod
    # until that process has exited, so "pod gone" means "operator gone" as it does in a real cluster.
    replicas = _hold_pods(kube, system_ns, install.release)
    hook = subprocess.Popen(
        [sys.executable, "-m", "aidc_operator", *container["args"]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        # The hook scales the Deployment to 0; the replica that stops here is the local operator.
        wait_for(
            "the operator's Deployment scaled to 0",
            lambda: kube.apps.read_namespaced_deployment(install.release, system_ns).spec.replicas == 0,
            timeout=60,
        )
        install.op.stop()
        install.op.proc.wait(30)  # type: ignore[union-attr]
    finally:
        _release_pods(kube, system_ns, replicas)
    try:
        out, _ = hook.communicate(timeout=180)
    finally:
        if hook.poll() is None:
            hook.kill()
    assert hook.returncode == 0, out
    assert f"released trainingjobs {ns}/left" in out, out
    helm(kube, "uninstall", install.release, "-n", system_ns)
    assert kube.get_cr("trainingjobs", ns, "left")["metadata"].get("finalizers") in (None, []), (
        "kept, released"
    )
    kube.kubectl("delete", "trainingjob", "left", "-n", ns, "--timeout=60s")
    gone = kube.kubectl("get", "trainingjob", "left", "-n", ns, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    # ... and so does every other object the operator served (earlier tests' jobs and services).
    kube.kubectl("delete", "trainingjobs,inferenceservices", "--all", "-n", ns, "--timeout=60s")
    assert not kube.kubectl("get", "trainingjobs,inferenceservices", "-n", ns, "-o", "name").stdout.strip()


HOLD = "test.aidc.dev/local-operator"


def _hold_pods(kube: Kube, namespace: str, deployment: str) -> list[str]:
    """Put HOLD on the Deployment's pods (at least one); returns their names."""
    labels = kube.apps.read_namespaced_deployment(deployment, namespace).spec.selector.match_labels
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    names = [p.metadata.name for p in kube.core.list_namespaced_pod(namespace, label_selector=selector).items]
    assert names, f"no pod of Deployment {namespace}/{deployment}: the hook would have nothing to wait for"
    for name in names:
        kube.core.patch_namespaced_pod(name, namespace, {"metadata": {"finalizers": [HOLD]}})
    return names


def _release_pods(kube: Kube, namespace: str, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(ApiException):  # 404: already gone
            pod = kube.core.read_namespaced_pod(name, namespace)
            rest = [f for f in pod.metadata.finalizers or [] if f != HOLD]
            patch = [{"op": "replace", "path": "/metadata/finalizers", "value": rest}]
            kube.core.patch_namespaced_pod(name, namespace, patch)


@contextlib.contextmanager
def operator_log_on_failure(install: Install) -> Iterator[None]:
    """A failing e2e check shows the end of the operator's log: the first thing anyone asks for."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"{e}\n---- operator log (tail) ----\n{install.op.log()[-6000:]}") from e


# A refused request as kopf and the client log it; a bare "403" would also match a timestamp (",403").
PERMISSION_PROBLEM = re.compile(r"Forbidden|forbidden|Not enough permissions|(?<![\d,.])403(?!\d)")


def assert_no_permission_errors(install: Install) -> None:
    lines = [line for line in install.op.log().splitlines() if PERMISSION_PROBLEM.search(line)]
    assert not lines, "permission problems under the chart's RBAC:\n" + "\n".join(lines[:10])


def test_cluster_wide_install_grants_reads_by_name_but_no_secret_listing(crds: Kube) -> None:
    """The default (cluster-wide) install, RBAC only: webhooks off, so no other namespace's admission
    depends on a webhook nobody serves here."""
    kube = crds
    system_ns = kube.create_namespace("aidc-wide", prefix="o")
    release = f"aidcw-{system_ns.rsplit('-', 1)[1]}"
    values = [f"--set=fullnameOverride={release}", "--set=webhook.enabled=false"]
    helm(kube, "install", release, str(CHART), "-n", system_ns, *values)
    helm_uninstall = ("uninstall", release, "-n", system_ns)
    try:
        # Upgrading in place works too (CRDs and the peering object already there).
        helm(kube, "upgrade", release, str(CHART), "-n", system_ns, *values)
        user = f"--as=system:serviceaccount:{system_ns}:{release}"
        expectations = [
            (["get", "secrets", "-n", "default"], True),
            (["list", "secrets", "-n", "default"], False),
            (["list", "secrets", "--all-namespaces"], False),
            (["create", "pods", "-n", "default"], True),
            (["patch", "clusterkopfpeerings.kopf.dev"], True),
            (["patch", "kopfpeerings.kopf.dev", "-n", "default"], False),
            (["list", "customresourcedefinitions.apiextensions.k8s.io"], True),
            (["list", "namespaces"], False),
            (["create", "mutatingwebhookconfigurations.admissionregistration.k8s.io"], False),
        ]
        wrong = [
            f"{' '.join(args)}: {out}"
            for args, allowed in expectations
            if ((out := kube.kubectl("auth", "can-i", *args, user, check=False).stdout.strip()) == "yes")
            != allowed
        ]
        assert not wrong, "\n".join(wrong)
        peerings = kube.kubectl("get", "clusterkopfpeerings", "-o", "name").stdout.split()
        assert "clusterkopfpeering.kopf.dev/aidc" in peerings
    finally:
        helm(kube, *helm_uninstall)
        kube.delete_namespace(system_ns)
