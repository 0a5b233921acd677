"""Session fixtures: one real control plane per test session (or the cluster KUBECONFIG names), a
namespace per test, the CRDs installed, and an operator process watching test namespaces."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Kube, start_cluster

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    state = ROOT / ".state" / f"test-cluster-{os.getpid()}"
    k = start_cluster(state)
    try:
        yield k
    finally:
        if k.local is not None and not os.environ.get("AIDC_KEEP_CLUSTER"):
            k.local.down()


@pytest.fixture(scope="session")
def crds(kube: Kube) -> Kube:
    """The aidc CRDs applied and Established."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for crd in ("trainingjobs.aidc.dev", "inferenceservices.aidc.dev"):
        kube.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    return kube


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (t-<test>-<random>) deleted after the test; failed nodes are restored first."""
    kube.ensure_all_nodes_ready()
    ns = kube.create_namespace(request.node.name)
    yield ns
    kube.delete_namespace(ns)
