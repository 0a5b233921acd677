"""Test-side helpers for the local control plane: a cluster handle, namespaces, waits and node failures.

Used by tests/conftest.py; kept apart so integration tests can import the helpers by name.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config

from crd_wait import wait_established
from localcluster import LocalCluster, build_binaries

T = TypeVar("T")


def wait_for(what: str, fn: Callable[[], T], timeout: float = 60, interval: float = 0.3) -> T:
    """Polls fn until it returns something truthy; fails the test with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:
            last_error = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}"
        + (f" (last error: {last_error})" if last_error else "")
    )


@dataclass
class Kube:
    """A running cluster as tests see it: kubeconfig, kubectl, API clients and failure injection."""

    kubeconfig: Path
    kubectl_bin: str
    local: LocalCluster | None = None

    def __post_init__(self) -> None:
        self.api = config.new_client_from_config(str(self.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.coordination = client.CoordinationV1Api(self.api)

    def wait_crds(self, *names: str, timeout: float = 120) -> None:
        """Until every named CRD is Established (crd_wait: kubectl wait can fail on a fresh one)."""
        wait_established([self.kubectl_bin, f"--kubeconfig={self.kubeconfig}"], names, timeout)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (operator, helm) that talks to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    # namespaces -----------------------------------------------------------
    def create_namespace(self, hint: str, prefix: str = "t") -> str:
        slug = re.sub(r"[^a-z0-9-]", "-", hint.lower())[:30].strip("-")
        name = f"{prefix}-{slug}-{uuid.uuid4().hex[:5]}"
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        # Pods are refused until the ServiceAccount controller has made the namespace's default SA.
        wait_for(
            f"default ServiceAccount in {name}",
            lambda: self.core.read_namespaced_service_account("default", name),
            timeout=30,
        )
        return name

    def delete_namespace(self, name: str) -> None:
        try:
            self.core.delete_namespace(name)
        except client.ApiException as e:
            if e.status != 404:
                raise

    # nodes ----------------------------------------------------------------
    def node(self, name: str) -> client.V1Node:
        return self.core.read_node(name)

    def node_ready(self, name: str) -> str:
        """Ready condition status of a node: 'True', 'False' or 'Unknown'."""
        for c in self.node(name).status.conditions or []:
            if c.type == "Ready":
                return c.status
        return "Unknown"

    def _local(self) -> LocalCluster:
        if self.local is None:
            import pytest

            pytest.skip("node-failure injection needs the project's local cluster (KUBECONFIG is set)")
        return self.local

    def fail_node(self, name: str) -> None:
        """A node dies: its kwok agent is SIGKILLed, so its Lease lapses, exactly what a kubelet that
        lost power looks like. After --node-monitor-grace-period the node lifecycle controller marks it
        Unknown and taints it node.kubernetes.io/unreachable."""
        self._local().stop_node_agent(name)

    def restore_node(self, name: str) -> None:
        """The node comes back: its agent restarts and reports it Ready."""
        self._local().start_node_agent(name)

    def delete_node(self, name: str) -> None:
        self.core.delete_node(name)

    def recreate_node(self, name: str) -> None:
        """Brings back a deleted node with the cluster's standard GPU node shape."""
        index = int(name.rsplit("-", 1)[-1])
        self.kubectl("apply", "-f", "-", input=json.dumps(self._local().node_manifest(index)))

    def _lease_renewed_after(self, name: str, since: dt.datetime) -> bool:
        lease = self.coordination.read_namespaced_lease(name, "kube-node-lease")
        renewed = lease.spec.renew_time
        return renewed is not None and renewed > since

    def gpu_nodes(self) -> list[str]:
        return sorted(n.metadata.name for n in self.core.list_node(label_selector="type=kwok").items)

    def ensure_all_nodes_ready(self, timeout: float = 90) -> None:
        """Undo any failure a previous test left: every standard node exists, is managed and Ready."""
        if self.local is None:
            return
        local = self.local
        present = set(self.gpu_nodes())
        restored = []
        for name in local.node_names():
            if name not in present:
                self.recreate_node(name)
            if not local.running().get(f"kwok-{name}"):
                restored.append((name, dt.datetime.now(dt.UTC)))
                self.restore_node(name)
        # Ready and untainted is the node controller's verdict; the operator also reads the Lease, which
        # a restarted agent renews a moment later. Until it does, the node still looks dead to the operator.
        for name, since in restored:
            wait_for(
                f"{name}'s Lease renewed",
                lambda n=name, t=since: self._lease_renewed_after(n, t),
                timeout=timeout,
            )
        wait_for(
            "all GPU nodes Ready and untainted",
            lambda: all(
                self.node_ready(n) == "True"
                and not any(t.key.startswith("node.kubernetes.io/") for t in (self.node(n).spec.taints or []))
                for n in local.node_names()
            ),
            timeout=timeout,
        )

    # custom resources -----------------------------------------------------
    def get_cr(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object("aidc.dev", "v1alpha1", namespace, plural, name)

    def create_cr(self, kind: str, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "aidc.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}
        plural = kind.lower() + "s"
        return self.custom.create_namespaced_custom_object("aidc.dev", "v1alpha1", namespace, plural, body)

    def pods(self, namespace: str, selector: str = "") -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(namespace, label_selector=selector).items


def start_cluster(state_dir: Path) -> Kube:
    """The session's cluster: the one KUBECONFIG names, or a fresh local control plane."""
    external = os.environ.get("KUBECONFIG")
    if external:
        kubectl = shutil.which("kubectl") or str(build_binaries() / "kubectl")
        return Kube(Path(external), kubectl)
    local = LocalCluster(
        state_dir,
        nodes=4,
        gpus_per_node=8,
        node_monitor_grace_period=os.environ.get("AIDC_NODE_GRACE", "20s"),
    ).up()
    assert local.bin_dir is not None
    return Kube(local.kubeconfig, str(local.bin_dir / "kubectl"), local)
