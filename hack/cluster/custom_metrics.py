"""Pods metrics for the HorizontalPodAutoscaler in the local cluster, from the parts a real cluster uses:

* **Prometheus** (github.com/prometheus/prometheus, pinned in hack/prometheus/go.mod; built with only its
  Kubernetes service discovery) finds pods through the API and scrapes every one that asks for it with the
  conventional prometheus.io/scrape, /port, /path, /scheme annotations (the model server's pods do), every
  5 s, labelling each series with its namespace and pod;
* **prometheus-adapter** (sigs.k8s.io/prometheus-adapter, pinned in hack/prometheus-adapter/go.mod) serves
  the series its rules name (hack/prometheus-adapter/rules.yaml: the model server's in-flight requests
  and queue depth) as custom.metrics.k8s.io, which kube-controller-manager's HPA reads for a Pods metric.

Both are built once per version into $AIDC_CACHE/bin/ and started only by what needs them (`start`: the
autoscaling test, `localcluster.py custom-metrics`). They run as plain processes: Prometheus on 127.0.0.1
(it reaches the development kubelet's pods at their addresses on lo), the adapter as an aggregated API
server on {pod_net}.255.252 (aggregated_api.py). Each authenticates with a client certificate for its
upstream ServiceAccount's user name, with no more RBAC than it needs (hack/prometheus-adapter/rbac.yaml).
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import aggregated_api
import go_modules
from cluster_processes import free_port, log
from localcluster import ROOT

if TYPE_CHECKING:
    from localcluster import LocalCluster

NAMESPACE = "monitoring"
PROMETHEUS = "prometheus"
ADAPTER = "prometheus-adapter"
PROMETHEUS_PIN = ROOT / "hack" / "prometheus"
ADAPTER_PIN = ROOT / "hack" / "prometheus-adapter"
PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
ADAPTER_MODULE = "sigs.k8s.io/prometheus-adapter"
PROMETHEUS_USER = f"system:serviceaccount:{NAMESPACE}:{PROMETHEUS}"
ADAPTER_USER = f"system:serviceaccount:{NAMESPACE}:{ADAPTER}"
API_SERVICES = ["v1beta1.custom.metrics.k8s.io", "v1beta2.custom.metrics.k8s.io"]
SCRAPE_INTERVAL = "5s"
# Only the discovery the local cluster uses: the default build links every cloud's SDK (minutes more).
PROMETHEUS_TAGS = "remove_all_sd,enable_kubernetes_sd"


def _build(name: str, pin: Path, module: str, package: str, tags: str = "") -> Path:
    env = go_modules.go_env(f"building {name}")
    version = go_modules.module_field(pin, env, module, "Version")
    with go_modules.cached(name, version) as out:
        if not (out / ".complete").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            go_modules.build_binary(pin, env, package, out / name, tags=tags)
            (out / ".complete").touch()
        return out / name


def build() -> tuple[Path, Path]:
    """The Prometheus and prometheus-adapter binaries, built on first use (minutes on 2 cores)."""
    prometheus = _build(
        PROMETHEUS, PROMETHEUS_PIN, PROMETHEUS_MODULE, f"{PROMETHEUS_MODULE}/cmd/prometheus", PROMETHEUS_TAGS
    )
    adapter = _build(ADAPTER, ADAPTER_PIN, ADAPTER_MODULE, f"{ADAPTER_MODULE}/cmd/adapter")
    return prometheus, adapter


def scrape_config(kubeconfig: Path) -> dict[str, Any]:
    """Prometheus' configuration: the conventional annotation-driven pod job (what most clusters' Prometheus
    runs), keeping namespace and pod as labels for the adapter."""

    def meta(name: str) -> str:
        return f"__meta_kubernetes_pod_{name}"

    def annotation(name: str) -> list[str]:
        return [meta(f"annotation_prometheus_io_{name}")]

    relabel = [
        {"source_labels": annotation("scrape"), "action": "keep", "regex": "true"},
        {"source_labels": annotation("path"), "regex": "(.+)", "target_label": "__metrics_path__"},
        {"source_labels": annotation("scheme"), "regex": "(https?)", "target_label": "__scheme__"},
        {
            "source_labels": ["__address__", *annotation("port")],
            "regex": r"([^:]+)(?::\d+)?;(\d+)",
            "replacement": "$1:$2",
            "target_label": "__address__",
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": [meta("name")], "target_label": "pod"},
    ]
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "kubernetes-pods",
                "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
                # The model server's own certificate is the user's; the cluster's CA cannot vouch for it.
                "tls_config": {"insecure_skip_verify": True},
                "relabel_configs": relabel,
            }
        ],
    }


def manifests(addr: str, port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """The namespace, RBAC, the adapter's Service and its APIServices (with our CA)."""
    docs = [d for d in yaml.safe_load_all((ADAPTER_PIN / "rbac.yaml").read_text()) if d]
    api_services = []
    for name in API_SERVICES:
        version, group = name.split(".", 1)
        api_services.append(
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": name},
                "spec": {
                    "group": group,
                    "version": version,
                    "service": {"name": ADAPTER, "namespace": NAMESPACE},
                    "caBundle": ca_bundle,
                    "groupPriorityMinimum": 100,
                    "versionPriority": 200 if version == "v1beta2" else 100,
                },
            }
        )
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    return [ns, *docs, *aggregated_api.service_and_endpoints(ADAPTER, NAMESPACE, addr, port), *api_services]


def adapter_args(c: LocalCluster, addr: str, port: int, prometheus_url: str) -> list[str]:
    return [
        f"--prometheus-url={prometheus_url}",
        f"--config={ADAPTER_PIN / 'rules.yaml'}",
        "--metrics-relist-interval=10s",  # default 1 m: a new pod's series are served sooner
        f"--lister-kubeconfig={c.state_dir / f'{ADAPTER}.kubeconfig'}",
        *aggregated_api.server_flags(c, ADAPTER, addr, port),
        "--v=1",
    ]


def prometheus_url(c: LocalCluster) -> str:
    return f"http://127.0.0.1:{c.ports[PROMETHEUS]}"


def start(c: LocalCluster) -> None:
    """Starts Prometheus and the adapter and registers custom.metrics.k8s.io (idempotent); returns once
    the APIServices are Available. The apiserver must have been started with the aggregation flags."""
    if c.running_extra(ADAPTER):
        return
    prometheus, adapter = build()
    aggregated_api.check_aggregation(c)
    addr = aggregated_api.listen_address(c, 252, ADAPTER)
    c.ports[ADAPTER], c.ports[PROMETHEUS] = free_port(), free_port()
    c._save()
    ca_bundle = aggregated_api.write_certs(c, ADAPTER, NAMESPACE, ADAPTER_USER, addr)
    aggregated_api.apply(c, manifests(addr, c.ports[ADAPTER], ca_bundle))

    kubeconfig = aggregated_api.client_identity(c, PROMETHEUS, PROMETHEUS_USER)
    data = c.state_dir / PROMETHEUS
    data.mkdir(exist_ok=True)
    (data / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(kubeconfig)))
    c.start_process(
        PROMETHEUS,
        [
            str(prometheus),
            f"--config.file={data / 'prometheus.yml'}",
            f"--storage.tsdb.path={data / 'tsdb'}",
            "--storage.tsdb.retention.time=2h",
            f"--web.listen-address=127.0.0.1:{c.ports[PROMETHEUS]}",
            "--log.level=warn",
        ],
    )

    def prometheus_ready() -> bool:
        with urllib.request.urlopen(f"{prometheus_url(c)}/-/ready", timeout=3) as r:
            return r.status == 200

    c._wait("Prometheus ready", prometheus_ready, 120, PROMETHEUS, interval=1)
    c.start_process(ADAPTER, [str(adapter), *adapter_args(c, addr, c.ports[ADAPTER], prometheus_url(c))])
    aggregated_api.wait_available(c, API_SERVICES, ADAPTER)
    log(
        f"custom metrics up: Prometheus {prometheus_url(c)}, prometheus-adapter https://{addr}:{c.ports[ADAPTER]}"
        f" (logs: {c.logfile(PROMETHEUS)}, {c.logfile(ADAPTER)})"
    )
