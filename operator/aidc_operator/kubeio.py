"""The operator's API client and the few idempotent write patterns the reconcilers use."""

from __future__ import annotations

import functools
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .api import GROUP, VERSION


@functools.cache
def api() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api())


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def sanitize(obj: Any) -> Any:
    return api().sanitize_for_serialization(obj)


def get_cr(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def patch_status(plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
    custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, plural, name, {"status": status}
    )


def create(obj: dict[str, Any]) -> bool:
    """Creates obj; an existing object of that name is left as it is (adoption). True if created."""
    try:
        _dynamic_create(obj)
        return True
    except ApiException as e:
        if e.status == 409:
            return False
        raise


def _dynamic_create(obj: dict[str, Any]) -> None:
    kind, ns = obj["kind"], obj["metadata"].get("namespace")
    if kind == "Pod":
        core().create_namespaced_pod(ns, obj)
    elif kind == "Service":
        core().create_namespaced_service(ns, obj)
    elif kind == "Secret":
        core().create_namespaced_secret(ns, obj)
    elif kind == "ServiceAccount":
        core().create_namespaced_service_account(ns, obj)
    elif kind == "Role":
        client.RbacAuthorizationV1Api(api()).create_namespaced_role(ns, obj)
    elif kind == "RoleBinding":
        client.RbacAuthorizationV1Api(api()).create_namespaced_role_binding(ns, obj)
    elif kind == "NetworkPolicy":
        client.NetworkingV1Api(api()).create_namespaced_network_policy(ns, obj)
    elif kind == "Deployment":
        client.AppsV1Api(api()).create_namespaced_deployment(ns, obj)
    elif kind == "HorizontalPodAutoscaler":
        client.AutoscalingV2Api(api()).create_namespaced_horizontal_pod_autoscaler(ns, obj)
    else:
        raise ValueError(f"no create for kind {kind}")


def delete_pod(namespace: str, name: str, force: bool) -> None:
    try:
        core().delete_namespaced_pod(
            name,
            namespace,
            grace_period_seconds=0 if force else None,
            propagation_policy="Background",
        )
    except ApiException as e:
        if e.status != 404:
            raise


def read_secret(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return sanitize(core().read_namespaced_secret(name, namespace))
    except ApiException as e:
        if e.status == 404:
            return None
        raise
