"""What the local cluster's custom-metrics pipeline is configured with, without starting it: the identities
its certificates carry are the ones its RBAC names, the APIServices trust our CA and point at the
adapter's Endpoints, and the adapter's rules serve the metric the operator's HPA asks for."""

from __future__ import annotations

import yaml

import custom_metrics
from aidc_operator.builders.inferenceservice import INFLIGHT_METRIC


def test_rbac_subjects_are_the_users_the_certificates_name() -> None:
    docs = [d for d in yaml.safe_load_all((custom_metrics.ADAPTER_PIN / "rbac.yaml").read_text()) if d]
    users = {
        f"system:serviceaccount:{s['namespace']}:{s['name']}"
        for d in docs
        if d["kind"].endswith("Binding")
        for s in d["subjects"]
    }
    assert users == {custom_metrics.PROMETHEUS_USER, custom_metrics.ADAPTER_USER}


def test_api_services_trust_our_ca_and_reach_the_adapter() -> None:
    objs = custom_metrics.manifests("10.7.255.252", 40123, "Q0E=")
    services = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "APIService"}
    assert set(services) == {"v1beta1.custom.metrics.k8s.io", "v1beta2.custom.metrics.k8s.io"}
    for spec in services.values():
        assert spec["caBundle"] == "Q0E=" and "insecureSkipTLSVerify" not in spec
        assert spec["service"] == {"name": "prometheus-adapter", "namespace": "monitoring"}
    (endpoints,) = [o for o in objs if o["kind"] == "Endpoints"]
    assert endpoints["subsets"] == [
        {"addresses": [{"ip": "10.7.255.252"}], "ports": [{"name": "https", "port": 40123}]}
    ]
    assert objs[0] == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "monitoring"}}


def test_the_rules_serve_the_metric_the_hpa_asks_for_per_pod() -> None:
    rules = yaml.safe_load((custom_metrics.ADAPTER_PIN / "rules.yaml").read_text())["rules"]
    inflight = next(r for r in rules if INFLIGHT_METRIC in r["seriesQuery"])
    assert inflight["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert inflight["name"] == {"matches": "^(.*)$", "as": "${1}"}  # served under its own name


def test_prometheus_keeps_annotated_pods_only_and_labels_namespace_and_pod() -> None:
    (job,) = custom_metrics.scrape_config(custom_metrics.ROOT / "kubeconfig")["scrape_configs"]
    relabel = job["relabel_configs"]
    assert relabel[0] == {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
        "action": "keep",
        "regex": "true",
    }
    labels = {r["target_label"]: r["source_labels"] for r in relabel if "target_label" in r}
    assert labels["namespace"] == ["__meta_kubernetes_namespace"]
    assert labels["pod"] == ["__meta_kubernetes_pod_name"]
