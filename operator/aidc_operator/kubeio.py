"""The operator's API client and the few idempotent write patterns the reconcilers use.

Every request goes through one client whose REST layer counts it (aidc_api_requests_total by verb and
resource) and, except watches, passes a token bucket (AIDC_API_QPS / AIDC_API_BURST, as client-go's
QPS/Burst), so a burst of work queues up in the operator instead of flooding the apiserver."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import metrics
from .api import GROUP, VERSION

DEFAULT_QPS = 100.0
DEFAULT_BURST = 200
POOL_SIZE = 64
# A request the apiserver never answers must not hold a reconcile worker for good: every call but a
# watch gets these (connect, read) seconds unless it names its own. The apiserver itself gives up on
# a non-watch request after 60 s.
REQUEST_TIMEOUT = (10.0, 90.0)


class TokenBucket:
    """Blocks the calling thread until a request may go (qps <= 0: no limit)."""

    def __init__(self, qps: float, burst: int, clock: Any = time.monotonic, sleep: Any = time.sleep) -> None:
        self.qps, self.burst, self._clock, self._sleep = qps, max(1, burst), clock, sleep
        self._tokens, self._at = float(self.burst), clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if self.qps <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait:
            self._sleep(wait)


def request_kind(method: str, url: str) -> tuple[str, str]:
    """(verb, resource) of a REST call as the apiserver's metrics name them: get/list/watch/create/
    update/patch/delete, and the resource plural with its subresource (pods/status)."""
    parts = urlsplit(url)
    segs = [s for s in parts.path.split("/") if s]
    # /api/v1/... or /apis/<group>/<version>/...
    rest = segs[2:] if segs[:1] == ["api"] else segs[3:]
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]  # a namespaced resource, not the Namespace object itself
    resource = "/".join(rest[:1] + rest[2:3]) if rest else "?"
    named = len(rest) >= 2
    method = method.upper()
    if method == "GET":
        verb = (
            "watch"
            if parse_qs(parts.query).get("watch", [""])[0] in ("1", "true")
            else ("get" if named else "list")
        )
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method)
    return verb, resource


def _instrument(api_client: client.ApiClient, bucket: TokenBucket) -> client.ApiClient:
    rest = api_client.rest_client
    send = rest.request

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        verb, resource = request_kind(method, url)
        if verb != "watch":
            bucket.acquire()
            if kwargs.get("_request_timeout") is None:
                kwargs["_request_timeout"] = REQUEST_TIMEOUT
        metrics.API_REQUESTS.labels(verb, resource).inc()
        return send(method, url, *args, **kwargs)

    rest.request = request
    return api_client


def api_message(e: ApiException) -> str:
    """The apiserver's own sentence (it names the resource and verb, e.g. a missing RBAC rule)."""
    try:
        return json.loads(e.body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return f"{e.status} {e.reason}"


@functools.cache
def api() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    bucket = TokenBucket(
        float(os.environ.get("AIDC_API_QPS", DEFAULT_QPS)),
        int(os.environ.get("AIDC_API_BURST", DEFAULT_BURST)),
    )
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One pooled connection per informer watch plus one per worker: a smaller pool (the client's
    # default is 5 per core) makes every pass open, TLS-handshake and drop a new connection.
    configuration.connection_pool_maxsize = POOL_SIZE
    api_client = client.ApiClient(configuration)
    api_client.user_agent = "aidc-operator"
    return _instrument(api_client, bucket)


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api())


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def sanitize(obj: Any) -> Any:
    return api().sanitize_for_serialization(obj)


def raw(response: Any) -> Any:
    """The JSON of a response asked for with _preload_content=False: parsing it is a third of the cost
    of building the client's model objects and turning them back into dicts."""
    return json.loads(response.data)


def patch_status(plural: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """Merge-patches the status subresource; returns the object as stored (for the cache)."""
    return raw(
        custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status}, _preload_content=False
        )
    )


def create(obj: dict[str, Any]) -> dict[str, Any] | None:
    """Creates obj; an existing object of that name is left as it is (adoption). Returns the object as
    stored when created (the cache takes it at once), None when it already existed."""
    try:
        return raw(_dynamic_create(obj))
    except ApiException as e:
        if e.status == 409:
            return None
        raise


def _dynamic_create(obj: dict[str, Any]) -> Any:
    kind, ns = obj["kind"], obj["metadata"].get("namespace")
    if kind == "Pod":
        return core().create_namespaced_pod(ns, obj, _preload_content=False)
    if kind == "Service":
        return core().create_namespaced_service(ns, obj, _preload_content=False)
    if kind == "Secret":
        return core().create_namespaced_secret(ns, obj, _preload_content=False)
    if kind == "ServiceAccount":
        return core().create_namespaced_service_account(ns, obj, _preload_content=False)
    if kind == "Role":
        return client.RbacAuthorizationV1Api(api()).create_namespaced_role(ns, obj, _preload_content=False)
    if kind == "RoleBinding":
        return client.RbacAuthorizationV1Api(api()).create_namespaced_role_binding(
            ns, obj, _preload_content=False
        )
    if kind == "NetworkPolicy":
        return client.NetworkingV1Api(api()).create_namespaced_network_policy(ns, obj, _preload_content=False)
    if kind == "Deployment":
        return client.AppsV1Api(api()).create_namespaced_deployment(ns, obj, _preload_content=False)
    if kind == "HorizontalPodAutoscaler":
        return client.AutoscalingV2Api(api()).create_namespaced_horizontal_pod_autoscaler(
            ns, obj, _preload_content=False
        )
    if kind == "Workload":
        group, version = obj["apiVersion"].split("/")
        return custom().create_namespaced_custom_object(
            group, version, ns, "workloads", obj, _preload_content=False
        )
    raise ValueError(f"no create for kind {kind}")


def patch_workload_status(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    """Merge-patches a Kueue Workload's status; None when it is gone."""
    return _patch_workload(custom().patch_namespaced_custom_object_status, namespace, name, patch)


def patch_workload(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    """Merge-patches a Kueue Workload (its spec.active); None when it is gone."""
    return _patch_workload(custom().patch_namespaced_custom_object, namespace, name, patch)


def _patch_workload(call: Any, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return raw(
            call("kueue.x-k8s.io", "v1beta2", namespace, "workloads", name, patch, _preload_content=False)
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def priority_value(kind: str, name: str) -> int | None:
    """The value of a WorkloadPriorityClass or PriorityClass; None when it does not exist."""
    try:
        if kind == "PriorityClass":
            return int(client.SchedulingV1Api(api()).read_priority_class(name).value)
        wpc = custom().get_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "workloadpriorityclasses", name)
        return int(wpc["value"])
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def served_resources(group_version: str) -> set[str] | None:
    """The resources (plurals) the apiserver serves in this API group version, None when it serves no
    such group version (one discovery request)."""
    method, url, headers, _, _ = api().param_serialize(
        "GET",
        f"/apis/{group_version}",
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    resp = api().call_api(method, url, header_params=headers, _request_timeout=(10, 30))
    body = resp.read()
    if resp.status not in (200, 404):
        raise ApiException(status=resp.status, reason=resp.reason)
    if resp.status == 404:
        return None
    return {r["name"] for r in json.loads(body).get("resources") or [] if "/" not in r["name"]}


def serves(group_version: str) -> bool:
    """Does the apiserver serve this API group version?"""
    return served_resources(group_version) is not None


def delete_pod(namespace: str, name: str, force: bool) -> dict[str, Any] | None:
    """Deletes a pod (grace 0 when forced); returns it as stored while it terminates, else None."""
    try:
        result = raw(
            core().delete_namespaced_pod(
                name,
                namespace,
                grace_period_seconds=0 if force else None,
                propagation_policy="Background",
                _preload_content=False,
            )
        )
    except ApiException as e:
        if e.status != 404:
            raise
        return None
    terminating = isinstance(result, dict) and (result.get("metadata") or {}).get("deletionTimestamp")
    return result if terminating else None


def read_pod(namespace: str, name: str) -> dict[str, Any] | None:
    """The pod as stored now (one GET), None when it does not exist."""
    try:
        return raw(core().read_namespaced_pod(name, namespace, _preload_content=False))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def read_secret(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return sanitize(core().read_namespaced_secret(name, namespace))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


FIELD_MANAGER = "aidc-operator"
ROUTE_PLURALS = {"HTTPRoute": "httproutes", "GRPCRoute": "grpcroutes"}  # Gateway API, v1


def apply(obj: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
    """Server-side apply (create or patch, forcing our ownership of the fields we render): a field we
    stop rendering is removed, fields others own (an HPA's replicas) are left alone. Returns the object
    as stored."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    kw: dict[str, Any] = {
        "field_manager": field_manager,
        "force": True,
        "_content_type": "application/apply-patch+yaml",
        "_preload_content": False,
    }
    if kind == "Deployment":
        result = client.AppsV1Api(api()).patch_namespaced_deployment(name, ns, obj, **kw)
    elif kind == "Service":
        result = core().patch_namespaced_service(name, ns, obj, **kw)
    elif kind == "HorizontalPodAutoscaler":
        result = client.AutoscalingV2Api(api()).patch_namespaced_horizontal_pod_autoscaler(
            name, ns, obj, **kw
        )
    elif kind in ROUTE_PLURALS:
        group, version = obj["apiVersion"].split("/")
        plural = ROUTE_PLURALS[kind]
        result = custom().patch_namespaced_custom_object(group, version, ns, plural, name, obj, **kw)
    else:
        raise ValueError(f"no apply for kind {kind}")
    return raw(result)


def remove_child(kind: str, namespace: str, name: str) -> None:
    """Delete a Service, HTTPRoute or GRPCRoute we made (gone already is fine)."""
    try:
        if kind == "Service":
            core().delete_namespaced_service(name, namespace)
        elif kind in ROUTE_PLURALS:
            custom().delete_namespaced_custom_object(
                "gateway.networking.k8s.io", "v1", namespace, ROUTE_PLURALS[kind], name
            )
        else:
            raise ValueError(f"no delete for kind {kind}")
    except ApiException as e:
        if e.status != 404:
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
