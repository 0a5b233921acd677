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


FIELD_MANAGER = "aidc-operator"


def apply(obj: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
    """Server-side apply (create or patch, forcing our ownership of the fields we render): a field we
    stop rendering is removed, fields others own (an HPA's replicas) are left alone. Returns the object
    as stored."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    kw: dict[str, Any] = {
        "field_manager": field_manager,
        "force": True,
        "_content_type": "application/apply-patch+yaml",
    }
    if kind == "Deployment":
        result = client.AppsV1Api(api()).patch_namespaced_deployment(name, ns, obj, **kw)
    elif kind == "Service":
        result = core().patch_namespaced_service(name, ns, obj, **kw)
    elif kind == "HorizontalPodAutoscaler":
        result = client.AutoscalingV2Api(api()).patch_namespaced_horizontal_pod_autoscaler(
            name, ns, obj, **kw
        )
    else:
        raise ValueError(f"no apply for kind {kind}")
    return sanitize(result)


def read(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """A Deployment, Service or HorizontalPodAutoscaler as stored, or None."""
    readers = {
        "Deployment": lambda: client.AppsV1Api(api()).read_namespaced_deployment(name, namespace),
        "Service": lambda: core().read_namespaced_service(name, namespace),
        "HorizontalPodAutoscaler": lambda: client.AutoscalingV2Api(
            api()
        ).read_namespaced_horizontal_pod_autoscaler(name, namespace),
    }
    try:
        return sanitize(readers[kind]())
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def delete_deployment(namespace: str, name: str) -> None:
    try:
        client.AppsV1Api(api()).delete_namespaced_deployment(name, namespace, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:
            raise


def scale_deployment(namespace: str, name: str, replicas: int, field_manager: str) -> None:
    """Sets replicas as its own (non-apply) field manager, so whoever scales next (an HPA) simply takes
    the field over and our applies, which leave replicas out, never fight it. A plain patch of the
    Deployment (not its scale subresource) needs no extra RBAC."""
    client.AppsV1Api(api()).patch_namespaced_deployment(
        name, namespace, {"spec": {"replicas": replicas}}, field_manager=field_manager
    )
