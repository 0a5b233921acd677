"""metrics-server (sigs.k8s.io/metrics-server, pinned in hack/metrics-server/go.mod) as one more process
of the local cluster: it serves metrics.k8s.io, the resource metrics a HorizontalPodAutoscaler reads.

Built once per version into $AIDC_CACHE/bin/metrics-server-<version>/ (with the RBAC and APIService
manifests shipped in the module). Started only by what needs it (`start(cluster)`: the autoscaling
tests, `localcluster.py metrics-server`), not with every cluster. What a plain process on loopback needs
instead of the upstream Deployment:

* it listens on {pod_net}.255.253, behind a Service, with our CA in its APIService, and authenticates as
  the upstream ServiceAccount's user name (aggregated_api.py), presenting the same certificate to the
  kubelets; the apiserver runs with the front-proxy flags (component_args.aggregation_flags);
* the kubelets are the development kubelet's /metrics/resource endpoints (kubelet_metrics.py), at each
  node's InternalIP and advertised port, verified against the cluster CA.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import aggregated_api
import go_modules
from cluster_processes import free_port, log
from localcluster import ROOT

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
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vpkg = "k8s.io/client-go/pkg/version"  # what upstream's Makefile stamps
    ldflags = (
        f"-s -w -X {vpkg}.gitVersion={version} -X {vpkg}.gitCommit=aidc-module-build"
        f" -X {vpkg}.buildDate=1970-01-01T00:00:00Z"
    )
    go_modules.build_binary(PIN, env, f"{MODULE}/cmd/metrics-server", out / COMPONENT, ldflags)
    (out / ".complete").touch()


def manifests(src: Path, addr: str, port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """Upstream's RBAC and APIService (with our CA), and a Service whose Endpoints name ADDR:PORT."""
    docs = [d for m in MANIFESTS for d in yaml.safe_load_all((src / m).read_text()) if d]
    for d in docs:
        if d["kind"] == "APIService":
            d["spec"].pop("insecureSkipTLSVerify", None)
            d["spec"]["caBundle"] = ca_bundle
    return [*aggregated_api.service_and_endpoints(COMPONENT, NAMESPACE, addr, port), *docs]


def args(c: LocalCluster, addr: str, port: int) -> list[str]:
    return [
        f"--kubeconfig={c.state_dir / f'{COMPONENT}.kubeconfig'}",
        *aggregated_api.server_flags(c, COMPONENT, addr, port),
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
    aggregated_api.check_aggregation(c)
    addr = aggregated_api.listen_address(c, 253, COMPONENT)
    port = c.ports[COMPONENT] = free_port()
    c._save()
    ca_bundle = aggregated_api.write_certs(c, COMPONENT, NAMESPACE, USER, addr)
    aggregated_api.apply(c, manifests(ms_dir / "manifests", addr, port, ca_bundle))
    c.start_process(COMPONENT, [str((ms_dir / COMPONENT).resolve()), *args(c, addr, port)])
    aggregated_api.wait_available(c, [API_SERVICE], COMPONENT)
    log(f"metrics-server up at https://{addr}:{port} (log: {c.logfile(COMPONENT)})")
