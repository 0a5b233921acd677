"""Kueue (sigs.k8s.io/kueue, pinned in hack/kueue/go.mod) as one more process of the local cluster.

Built once per version into $AIDC_CACHE/bin/kueue-<version>/ together with the parts of the module's
config/components the cluster applies (CRDs, the manager's ClusterRoles, the webhook configurations).
No kustomize: this module does the few rewrites a plain process on loopback needs:

* webhooks and CRD conversion point at `url: https://127.0.0.1:<port>/...` with our CA as caBundle,
  because nothing routes a Service in kueue-system to a process on this machine;
* only the webhooks of Kueue's own types and of the enabled frameworks are registered: Kueue answers
  the others (Pods, Deployments, ...) with no-op webhooks anyway, and leaving them out means a stopped
  Kueue never blocks pod creation in tests that have nothing to do with queues;
* Kueue runs as user aidc-kueue, bound to the upstream manager ClusterRole plus the TrainingJob role
  from examples/kueue/, so the RBAC the docs tell operators to install is what runs here.

LocalCluster starts it unless told not to (LocalCluster(kueue=False), --no-kueue, AIDC_KUEUE=0).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import go_modules
from cluster_pki import issue_cert, kubeconfig, new_key, pem_key, x509_name
from cluster_processes import ClusterError, free_port, log
from localcluster import ROOT

if TYPE_CHECKING:
    from localcluster import LocalCluster

MODULE = "sigs.k8s.io/kueue"
PIN = ROOT / "hack" / "kueue"  # go.mod/go.sum pinning MODULE
NAMESPACE = "kueue-system"
USER = "aidc-kueue"  # the manager's client-certificate identity (CN); RBAC binds to it
COMPONENT = "kueue"  # pid file and log name under the state dir
# Kueue framework name -> (API group, resource) its webhooks intercept. Only these get webhooks here.
FRAMEWORKS = {"batch/job": ("batch", "jobs")}
EXTERNAL_FRAMEWORKS = ["TrainingJob.v1alpha1.aidc.dev"]  # Workloads for aidc's TrainingJobs
TRAININGJOB_RBAC = ROOT / "examples" / "kueue" / "rbac-trainingjobs.yaml"
# What build() copies out of the module's config/components (read-only in the module cache).
CONFIG_PARTS = (
    "crd/bases",
    "crd/patches",
    "crd/kustomization.yaml",
    "rbac/role.yaml",
    "rbac/metrics_auth_role.yaml",
    "rbac/manager_secrets_role.yaml",
    "webhook/manifests.yaml",
)
# Kueue v0.17 reads its metrics certificate from this fixed path when its own cert management is off.
METRICS_CERT_PATH = "/etc/kueue/metrics/certs"
# Run inside a private mount namespace: a tmpfs-backed overlay on /etc adds kueue/metrics/certs (our
# certificate) without touching the host's /etc; then exec Kueue, so the pid stays the one we started.
OVERLAY_SH = r"""set -e
mnt=$1 certs=$2; shift 2
mount -t tmpfs aidc-kueue "$mnt"
mkdir -p "$mnt/upper/kueue/metrics/certs" "$mnt/work"
cp "$certs/tls.crt" "$certs/tls.key" "$mnt/upper/kueue/metrics/certs/"
mount -t overlay aidc-kueue -o "lowerdir=/etc,upperdir=$mnt/upper,workdir=$mnt/work" /etc
exec "$@"
"""


def _go_env() -> dict[str, str]:
    return go_modules.go_env("building Kueue (or set AIDC_KUEUE=0 to start the cluster without it)")


def _go_list(env: dict[str, str], field: str) -> str:
    return go_modules.module_field(PIN, env, MODULE, field)


def build() -> Path:
    """The directory holding the kueue binary and its config/, built on first use (a few minutes on 2
    cores) and reused afterwards; a lock lets two clones share one build."""
    env = _go_env()
    version = _go_list(env, "Version")
    with go_modules.cached("kueue", version) as out:
        if (out / ".complete").exists():
            log(f"kueue {version}: cached in {out}")
        else:
            _build_binary(env, version, out)
        # The config is copied apart from the binary, so that needing one more file never costs a rebuild.
        stamp = _config_stamp(out)
        if not stamp.exists() or stamp.read_text() != repr(CONFIG_PARTS):
            _copy_config(env, out)
        return out


def _build_binary(env: dict[str, str], version: str, out: Path) -> None:
    log(f"kueue {version}: building {MODULE}/cmd/kueue (first time only; several minutes on 2 cores)")
    t0 = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vpkg = f"{MODULE}/pkg/version"
    ldflags = (
        f"-s -w -X {vpkg}.GitVersion={version} -X {vpkg}.GitCommit=aidc-module-build"
        f" -X {vpkg}.BuildDate=1970-01-01T00:00:00Z"
    )
    argv = ["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(out / "kueue"), f"{MODULE}/cmd/kueue"]
    if subprocess.run(argv, cwd=PIN, env=env).returncode != 0:
        raise ClusterError(
            "building Kueue failed (output above): check access to the Go module proxy"
            " and disk space, or set AIDC_KUEUE=0 to start the cluster without Kueue"
        )
    (out / ".complete").touch()
    log(f"kueue {version}: built in {time.monotonic() - t0:.0f}s")


def _config_stamp(out: Path) -> Path:
    return out / "config" / ".parts"


def _copy_config(env: dict[str, str], out: Path) -> None:
    src = Path(_go_list(env, "Dir")) / "config" / "components"
    shutil.rmtree(out / "config", ignore_errors=True)
    for part in CONFIG_PARTS:
        files = sorted((src / part).glob("*.yaml")) if (src / part).is_dir() else [src / part]
        for f in files:
            dest = out / "config" / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)  # copyfile, not copy: the module cache's files are read-only
    _config_stamp(out).write_text(repr(CONFIG_PARTS))


# ---------------------------------------------------------------- certificates and manifests


def _write_certs(c: LocalCluster) -> str:
    """Serving certs (webhook, metrics) for 127.0.0.1 and a client cert for USER, all from the cluster
    CA; returns the CA as a caBundle."""
    ca_key = serialization.load_pem_private_key((c.pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_pem = (c.pki / "ca.crt").read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    for name in ("webhook", "metrics"):
        key = new_key()
        cert = issue_cert(x509_name(f"kueue-{name}"), key, ca.subject, ca_key, server=True, sans=sans)
        d = c.pki / f"kueue-{name}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "tls.key").write_bytes(pem_key(key))
    key = new_key()
    cert = issue_cert(x509_name(USER), key, ca.subject, ca_key)
    (c.pki / f"{USER}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (c.pki / f"{USER}.key").write_bytes(pem_key(key))
    (c.state_dir / "kueue.kubeconfig").write_text(kubeconfig(c.server, c.pki, USER))
    return base64.b64encode(ca_pem).decode()


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _crds(config: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """The CRDs, with conversion webhooks served from url where upstream's kustomization patches one in
    (the patches directory holds more files than the kustomization uses)."""
    crd = config / "crd"
    crds = {d["metadata"]["name"]: d for f in sorted((crd / "bases").glob("*.yaml")) for d in _load(f)}
    patches = [p["path"] for p in _load(crd / "kustomization.yaml")[0].get("patches", [])]
    for path in patches:
        for p in _load(crd / path):
            conversion = p["spec"]["conversion"]
            conversion["webhook"]["clientConfig"] = {"url": f"{url}/convert", "caBundle": ca_bundle}
            crds[p["metadata"]["name"]]["spec"]["conversion"] = conversion
    return list(crds.values())


def _kept(webhook: dict[str, Any]) -> bool:
    """A webhook for Kueue's own API or an enabled framework's resource (see the module docstring)."""
    wanted = {("kueue.x-k8s.io", "*"), *FRAMEWORKS.values()}
    return any(
        (g, r) in wanted or (g, "*") in wanted
        for rule in webhook.get("rules", [])
        for g in rule["apiGroups"]
        for r in rule["resources"]
    )


def _webhook_configs(config: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    docs = _load(config / "webhook" / "manifests.yaml")
    for d in docs:
        d["metadata"]["name"] = f"kueue-{d['metadata']['name']}"  # upstream's kustomize namePrefix
        d["webhooks"] = [w for w in d["webhooks"] if _kept(w)]
        for w in d["webhooks"]:
            w["clientConfig"] = {"url": url + w["clientConfig"]["service"]["path"], "caBundle": ca_bundle}
    return docs


def _rbac(config: Path) -> list[dict[str, Any]]:
    """Upstream's manager, metrics-auth and secrets roles and aidc's TrainingJob role, bound to USER."""
    roles = [
        *_load(config / "rbac" / "role.yaml"),
        *_load(config / "rbac" / "metrics_auth_role.yaml"),
        *_load(config / "rbac" / "manager_secrets_role.yaml"),  # a Role: Secrets in kueue-system only
    ]
    for r in roles:
        r["metadata"]["name"] = f"kueue-{r['metadata']['name']}"  # upstream's kustomize namePrefix
        if r["kind"] == "Role":
            r["metadata"]["namespace"] = NAMESPACE
    roles += [d for d in _load(TRAININGJOB_RBAC) if d["kind"] == "ClusterRole"]
    bindings = []
    for r in roles:
        meta: dict[str, str] = {"name": f"aidc-local-{r['metadata']['name']}"}
        if r["kind"] == "Role":
            meta["namespace"] = NAMESPACE
        bindings.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": f"{r['kind']}Binding",
                "metadata": meta,
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": r["kind"],
                    "name": r["metadata"]["name"],
                },
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}],
            }
        )
    return [*roles, *bindings]


def _configuration(c: LocalCluster) -> dict[str, Any]:
    p = c.ports
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{p['kueue_health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{p['kueue_metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": p["kueue_webhook"], "certDir": str(c.pki / "kueue-webhook")},
        "leaderElection": {"leaderElect": False},  # one replica; no Lease to hold
        "internalCertManagement": {"enable": False},  # its certs name a Service; ours name 127.0.0.1
        "manageJobsWithoutQueueName": False,  # only jobs that ask for a queue are queued
        # waitForPodsReady is off by leaving it out (in v1beta2 its presence turns it on).
        "integrations": {"frameworks": list(FRAMEWORKS), "externalFrameworks": EXTERNAL_FRAMEWORKS},
        # The visibility API server reads fixed-path certs and needs an APIService backed by a Service.
        "featureGates": {"VisibilityOnDemand": False},
    }


def _apply(c: LocalCluster, docs: list[dict[str, Any]]) -> None:
    items = {"apiVersion": "v1", "kind": "List", "items": docs}
    c.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=aidc-localcluster",
        "-f",
        "-",
        input=json.dumps(items),
    )


# ---------------------------------------------------------------- the process


def start(c: LocalCluster, kueue_dir: Path | None = None) -> None:
    """Applies Kueue's CRDs, RBAC and webhook configurations and starts its manager; returns once its
    readyz answers and its webhooks admit a (dry-run) object."""
    kueue_dir = kueue_dir or build()
    config = kueue_dir / "config"
    for key in ("kueue_webhook", "kueue_health", "kueue_metrics"):
        c.ports[key] = free_port()
    c._save()  # record the ports before anything uses them
    url = f"https://127.0.0.1:{c.ports['kueue_webhook']}"
    ca_bundle = _write_certs(c)
    crds = _crds(config, url, ca_bundle)
    _apply(
        c, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}, *_rbac(config), *crds]
    )
    c.wait_crds(*(d["metadata"]["name"] for d in crds))
    _apply(c, _webhook_configs(config, url, ca_bundle))
    conf = c.state_dir / "kueue-config.yaml"
    conf.write_text(yaml.safe_dump(_configuration(c), sort_keys=False))

    binary = str((kueue_dir / "kueue").resolve())
    mnt = c.pki / "kueue-mnt"
    mnt.mkdir(exist_ok=True)
    argv = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--",
        "sh",
        "-c",
        OVERLAY_SH,
        "kueue-overlay",
        str(mnt),
        str(c.pki / "kueue-metrics"),
        binary,
        f"--config={conf}",
        "--zap-log-level=2",
    ]
    env = {**os.environ, "KUBECONFIG": str(c.state_dir / "kueue.kubeconfig")}
    pid = c.start_process(COMPONENT, argv, env=env)
    _record_exec(c, pid, binary)
    c._wait(
        "kueue /readyz",
        lambda: _http_ok(f"http://127.0.0.1:{c.ports['kueue_health']}/readyz"),
        120,
        COMPONENT,
    )
    probe = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ResourceFlavor",
        "metadata": {"name": "aidc-webhook-probe"},
    }
    c._wait(
        "kueue's webhooks to admit a ResourceFlavor (dry run)",
        lambda: c.kubectl(
            "create", "--dry-run=server", "-o", "name", "-f", "-", input=json.dumps(probe), check=False
        ),
        60,
        COMPONENT,
    )
    log(f"kueue up: webhooks at {url}, readyz on :{c.ports['kueue_health']} (log: {c.logfile(COMPONENT)})")


def _record_exec(c: LocalCluster, pid: int, binary: str) -> None:
    """start_process recorded the executable it saw first (unshare); once the wrapper has exec'd Kueue,
    record that instead, so `down` and `status` recognise the process by the binary it really runs."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = ""
        if exe == binary:
            c._pidfile(COMPONENT).write_text(f"{pid}\n{exe}")  # the format start_process writes
            return
        if not exe:  # the wrapper failed (no user namespaces, no overlay): its log says why
            tail = c.logfile(COMPONENT).read_text(errors="replace")[-2000:]
            raise ClusterError(
                f"kueue's mount-namespace wrapper exited: {tail.strip()}\nKueue v0.17 reads its metrics"
                f" certificate from {METRICS_CERT_PATH}; the cluster provides it through `unshare --user"
                " --mount` and an overlay on /etc. Allow unprivileged user namespaces, or set AIDC_KUEUE=0."
            )
        time.sleep(0.05)
    raise ClusterError(f"kueue did not start within 30s (log: {c.logfile(COMPONENT)})")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as r:
        return r.status == 200
