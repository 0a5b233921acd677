"""Every Kubernetes API call in the operator's code is allowed by the chart's RBAC: a new call (say,
listing Leases or proxying to pods) fails here, with what to add, instead of as a 403 in production.
Custom-object calls (TrainingJob/InferenceService, kopf's peering) are kopf's and the e2e test's domain."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from localcluster import build_binaries

ROOT = Path(__file__).resolve().parents[3]
# A method call on an API client (not on self): .list_namespaced_lease(, .connect_get_..._proxy_with_path(
CALL = re.compile(
    r"(?<!self)(?<!asyncio)\.(create|read|list|patch|delete|replace|connect_get|connect_post)_(namespaced_)?([a-z_]+)\("
)
VERB = {
    "create": "create",
    "read": "get",
    "list": "list",
    "patch": "patch",
    "delete": "delete",
    "replace": "update",
    "connect_get": "get",
    "connect_post": "create",
}
SUBRESOURCES = {"_proxy_with_path": "proxy", "_proxy": "proxy", "_status": "status", "_scale": "scale"}
# python client name -> (API group, plural)
RESOURCES = {
    "pod": ("", "pods"),
    "service": ("", "services"),
    "secret": ("", "secrets"),
    "service_account": ("", "serviceaccounts"),
    "persistent_volume_claim": ("", "persistentvolumeclaims"),
    "node": ("", "nodes"),
    "event": ("", "events"),
    "config_map": ("", "configmaps"),
    "namespace": ("", "namespaces"),
    "role": ("rbac.authorization.k8s.io", "roles"),
    "role_binding": ("rbac.authorization.k8s.io", "rolebindings"),
    "network_policy": ("networking.k8s.io", "networkpolicies"),
    "deployment": ("apps", "deployments"),
    "horizontal_pod_autoscaler": ("autoscaling", "horizontalpodautoscalers"),
    "lease": ("coordination.k8s.io", "leases"),
    "priority_class": ("scheduling.k8s.io", "priorityclasses"),
    "workload": ("kueue.x-k8s.io", "workloads"),  # kubeio.patch_workload_status
}


def calls_in_code() -> set[tuple[str, str, str]]:
    """(group, resource[/subresource], verb) for each typed client call under operator/."""
    found = set()
    for path in (ROOT / "operator" / "aidc_operator").rglob("*.py"):
        for verb, _, name in CALL.findall(path.read_text()):
            if name.endswith(("custom_object", "custom_object_status")) or name == "status":
                continue  # custom objects (kubeio.patch_status is TrainingJob/InferenceService status)
            sub = ""
            for suffix, subresource in SUBRESOURCES.items():
                if name.endswith(suffix):
                    name, sub = name[: -len(suffix)], subresource
                    break
            assert name in RESOURCES, (
                f"{path.name}: unknown resource {name!r}: map it here and grant it in the chart"
            )
            group, plural = RESOURCES[name]
            found.add((group, plural + (f"/{sub}" if sub else ""), VERB[verb]))
    return found


def watches_in_code() -> set[tuple[str, str, str]]:
    """(group, resource, verb) for the list+watch of every informer the operator starts."""
    from aidc_operator.handlers.gateway_discovery import GRPC_ROUTES, ROUTES
    from aidc_operator.handlers.wiring import CLAIMS, KUEUE, LEASES, NODES, OWNED

    found = set()
    for r in (*OWNED, CLAIMS, NODES, LEASES, *KUEUE, ROUTES, GRPC_ROUTES):
        group = r.group_version.rpartition("/")[0]
        found |= {(group, r.plural, "list"), (group, r.plural, "watch")}
    return found


def granted() -> set[tuple[str, str, str]]:
    chart = str(ROOT / "charts" / "aidc-operator")
    out = subprocess.run(
        [str(build_binaries() / "helm"), "template", "a", chart, "--kube-version=1.34.0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rules = [
        rule
        for doc in yaml.safe_load_all(out)
        if doc and doc["kind"] in ("ClusterRole", "Role")
        for rule in doc["rules"]
    ]
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_every_api_call_in_the_operator_is_granted() -> None:
    calls = calls_in_code()
    assert len(calls) >= 10, calls  # the scan finds the reconcilers' calls
    watches = watches_in_code()
    assert ("", "pods", "watch") in watches and ("coordination.k8s.io", "leases", "watch") in watches
    calls |= watches
    missing = sorted(calls - granted())
    assert not missing, f"operator code makes calls the chart's RBAC does not allow: {missing}"
