"""metrics-server (sigs.k8s.io/metrics-server, pinned in hack/metrics-server/go.mod) as one more process
of the local cluster: it serves metrics.k8s.io, the resource metrics a HorizontalPodAutoscaler reads.

Built once per version into $AIDC_CACHE/bin/metrics-server-<version>/ (with the RBAC and APIService
manifests shipped in the module). Started only by what needs it (`start(cluster)`: the autoscaling
tests, `localcluster.py metrics-server`), not with every cluster. What a plain process on loopback needs
instead of the upstream Deployment:

* it listens on {pod_net}.255.253, an address of this cluster's pod network put on lo, and a selectorless
  Service with hand-made Endpoints names it; the apiserver runs with --enable-aggregator-routing (so it
  dials that endpoint, not the Service's unroutable ClusterIP) and the front-proxy flags
  (component_args.aggregation_flags);
* the APIService v1beta1.metrics.k8s.io carries our CA as caBundle instead of insecureSkipTLSVerify;
* it authenticates as the upstream ServiceAccount's user name (a client certificate with
  CN=system:serviceaccount:kube-system:metrics-server), so the upstream RBAC applies unchanged, and
  presents the same certificate to the kubelets;
* the kubelets are the development kubelet's /metrics/resource endpoints (kubelet_metrics.py), at each
  node's InternalIP and advertised port, verified against the cluster CA.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import subprocess
import threading
import time
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
from pod_addresses import pod_address_label

if TYPE_CHECKING:
    from localcluster import LocalCluster

MODULE = "sigs.k8s.io/metrics-server"
PIN = ROOT / "hack" / "metrics-server"  # go.mod/go.sum pinning MODULE
COMPONENT = "metrics-server"
NAMESPACE = "kube-system"
USER = "system:serviceaccount:kube-system:metrics-server"  # the upstream RBAC's subject, as a user name
API_SERVICE = "v1beta1.metrics.k8s.io"
MANIFESTS = ("rbac.yaml", "apiservice.yaml")  # of the module's manifests/base
RESOLUTION = "10s"  # how often it scrapes the kubelets: metrics-server's minimum (default 15 s)


def _go_env() -> dict[str, str]:
    return go_modules.go_env("building metrics-server")


def _go_list(env: dict[str, str], field: str) -> str:
    return go_modules.module_field(PIN, env, MODULE, field)


def build() -> Path:
    """The directory holding the metrics-server binary and its manifests/, built on first use (a few
    minutes on 2 cores) and reused afterwards; a lock lets two clones share one build."""
    env = _go_env()
    version = _go_list(env, "Version")
    with go_modules.cached("metrics-server", version) as out:
        if (out / ".complete").exists():
            log(f"metrics-server {version}: cached in {out}")
        else:
            _build_binary(env, version, out)
        if not all((out / "manifests" / m).exists() for m in MANIFESTS):
            src = Path(_go_list(env, "Dir")) / "manifests" / "base"
            (out / "manifests").mkdir(parents=True, exist_ok=True)
            for m in MANIFESTS:
                shutil.copyfile(src / m, out / "manifests" / m)  # the module cache's files are read-only
        return out


def _build_binary(env: dict[str, str], version: str, out: Path) -> None:
    log(f"metrics-server {version}: building {MODULE}/cmd/metrics-server (first time only; minutes)")
    t0 = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vpkg = "k8s.io/client-go/pkg/version"  # what upstream's Makefile stamps
    ldflags = (
        f"-s -w -X {vpkg}.gitVersion={version} -X {vpkg}.gitCommit=aidc-module-build"
        f" -X {vpkg}.buildDate=1970-01-01T00:00:00Z"
    )
    binary = out / "metrics-server"
    argv = [
        "go",
        "build",
        "-v",
        "-trimpath",
        "-ldflags",
        ldflags,
        "-o",
        str(binary),
        f"{MODULE}/cmd/metrics-server",
    ]
    proc = subprocess.Popen(["nice", "-n", "19", *argv], cwd=PIN, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    packages, tail = [0], []

    def progress() -> None:  # -v names each package as it compiles: report the count twice a minute
        while proc.poll() is None:
            time.sleep(30)
            log(f"metrics-server: {packages[0]} packages compiled ({time.monotonic() - t0:.0f}s)")

    threading.Thread(target=progress, daemon=True).start()
    for line in proc.stderr:
        packages[0] += 1
        tail = [*tail[-40:], line]
    if proc.wait() != 0 or not binary.exists():
        raise ClusterError(
            "building metrics-server failed; check access to the Go module proxy and disk space:\n"
            + "".join(tail)
        )
    (out / ".complete").touch()
    log(f"metrics-server {version}: built in {time.monotonic() - t0:.0f}s")


def address(c: LocalCluster) -> str:
    """Where it listens: an address of this cluster's pod network that no pod or probe gets."""
    return f"{c.pod_net}.255.253"


def _write_certs(c: LocalCluster, addr: str) -> str:
    """Its serving cert (for the Service's DNS names and ADDR) and its client identity, from the
    cluster CA; returns the CA as a caBundle."""
    ca_key = serialization.load_pem_private_key((c.pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_pem = (c.pki / "ca.crt").read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    sans: list[x509.GeneralName] = [
        x509.DNSName(f"{COMPONENT}.{NAMESPACE}.svc"),
        x509.DNSName(f"{COMPONENT}.{NAMESPACE}.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address(addr)),
    ]
    d = c.pki / COMPONENT
    d.mkdir(parents=True, exist_ok=True)
    key = new_key()
    cert = issue_cert(x509_name(COMPONENT), key, ca.subject, ca_key, server=True, sans=sans)
    (d / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "tls.key").write_bytes(pem_key(key))
    key = new_key()
    cert = issue_cert(x509_name(USER, "system:serviceaccounts"), key, ca.subject, ca_key)
    (c.pki / f"{COMPONENT}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (c.pki / f"{COMPONENT}.key").write_bytes(pem_key(key))
    (c.state_dir / f"{COMPONENT}.kubeconfig").write_text(kubeconfig(c.server, c.pki, COMPONENT))
    return base64.b64encode(ca_pem).decode()


def manifests(src: Path, addr: str, port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """Upstream's RBAC and APIService (with our CA), and a Service whose Endpoints name ADDR:PORT."""
    docs = [d for m in MANIFESTS for d in yaml.safe_load_all((src / m).read_text()) if d]
    for d in docs:
        if d["kind"] == "APIService":
            d["spec"].pop("insecureSkipTLSVerify", None)
            d["spec"]["caBundle"] = ca_bundle
    meta = {"name": COMPONENT, "namespace": NAMESPACE, "labels": {"k8s-app": COMPONENT}}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port, "protocol": "TCP"}]},
    }
    endpoints = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": meta,
        "subsets": [{"addresses": [{"ip": addr}], "ports": [{"name": "https", "port": port}]}],
    }
    return [service, endpoints, *docs]


def args(c: LocalCluster, addr: str, port: int) -> list[str]:
    kc = c.state_dir / f"{COMPONENT}.kubeconfig"
    certs = c.pki / COMPONENT
    return [
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        f"--bind-address={addr}",
        f"--secure-port={port}",
        f"--tls-cert-file={certs / 'tls.crt'}",
        f"--tls-private-key-file={certs / 'tls.key'}",
        f"--cert-dir={certs}",
        f"--kubelet-certificate-authority={c.pki / 'ca.crt'}",  # the development kubelet's CA: verified
        "--kubelet-preferred-address-types=InternalIP",
        "--kubelet-use-node-status-port",
        f"--metric-resolution={RESOLUTION}",
        "--kubelet-request-timeout=5s",  # must be below the resolution (default 10 s)
        "--v=1",
    ]


def start(c: LocalCluster, ms_dir: Path | None = None) -> None:
    """Registers metrics.k8s.io and starts metrics-server (idempotent); returns once the APIService is
    Available. The apiserver must have been started with the aggregation flags."""
    if c.running_extra(COMPONENT):
        return
    ms_dir = ms_dir or build()
    apiserver = c.procs.alive("kube-apiserver")
    if apiserver is None:
        raise ClusterError(f"no kube-apiserver runs for {c.state_dir}: start the cluster first")
    flags = Path(f"/proc/{apiserver}/cmdline").read_bytes()
    if b"--enable-aggregator-routing=true" not in flags:
        raise ClusterError(
            "this cluster's kube-apiserver was started without the aggregation flags (an older"
            " checkout started it): `python hack/cluster/localcluster.py down` and start it again"
        )
    addr = address(c)
    added = subprocess.run(
        ["ip", "-4", "addr", "add", f"{addr}/32", "dev", "lo", "label", pod_address_label(c.pod_net)],
        capture_output=True,
        text=True,
    )
    if added.returncode != 0 and "File exists" not in added.stderr:
        raise ClusterError(
            f"cannot put {addr} on lo for metrics-server (needs CAP_NET_ADMIN): {added.stderr}"
        )
    port = c.ports[COMPONENT] = free_port()
    c._save()
    ca_bundle = _write_certs(c, addr)
    items = {
        "apiVersion": "v1",
        "kind": "List",
        "items": manifests(ms_dir / "manifests", addr, port, ca_bundle),
    }
    apply = ("apply", "--server-side", "--force-conflicts", "--field-manager=aidc-localcluster", "-f", "-")
    c.kubectl(*apply, input=json.dumps(items))
    c.start_process(COMPONENT, [str((ms_dir / COMPONENT).resolve()), *args(c, addr, port)])

    def available() -> bool:
        svc = json.loads(c.kubectl("get", "apiservice", API_SERVICE, "-o", "json"))
        conds = svc.get("status", {}).get("conditions", [])
        return any(x["type"] == "Available" and x["status"] == "True" for x in conds)

    c._wait(f"APIService {API_SERVICE} Available", available, 120, COMPONENT, interval=1)
    log(f"metrics-server up at https://{addr}:{port} (log: {c.logfile(COMPONENT)})")
