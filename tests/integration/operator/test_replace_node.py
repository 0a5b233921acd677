"""ReplaceNode on the real control plane (kwok GPU nodes, the operator as a process): the operator's
decisions when a node under a gang dies — one pod replaced, the others untouched — standby spares in
status and in `kubectl get`, and the API refusing spares it cannot honour. (tests/e2e/test_replace_node.py
runs the trainer for real.)"""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from tests.integration.operator.test_trainingjob import create_job, events, gang, status
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

REPLACE = {"nodeFailure": "ReplaceNode"}


def _running(kube: Kube, ns: str, name: str, pods: int) -> dict[str, str]:
    wait_for(
        f"{name} Running with {pods} ready pod(s)",
        lambda: (s := status(kube, ns, name)).get("phase") == "Running" and s.get("readyNodes") == pods,
        timeout=120,
    )
    return {p.metadata.name: p.metadata.uid for p in gang(kube, ns, name)}


def test_a_lost_node_replaces_only_its_pod(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "one", nodes=3, failurePolicy=REPLACE)
    before = _running(kube, namespace, "one", 3)
    rank1 = next(p for p in gang(kube, namespace, "one") if p.metadata.labels["aidc.dev/node-rank"] == "1")
    victim = rank1.spec.node_name
    kube.fail_node(victim)
    wait_for(
        "the replacement running",
        lambda: "one-a0-1-r1" in _running(kube, namespace, "one", 3),
        timeout=120,
    )
    after = {p.metadata.name: p for p in gang(kube, namespace, "one")}
    assert set(after) == {"one-a0-0", "one-a0-2", "one-a0-1-r1"}
    assert {n: after[n].metadata.uid for n in ("one-a0-0", "one-a0-2")} == {
        n: before[n] for n in ("one-a0-0", "one-a0-2")
    }
    new = after["one-a0-1-r1"]
    assert new.spec.node_name != victim and new.spec.hostname == "one-1"
    st = status(kube, namespace, "one")
    assert st["attempt"] == 0 and st["nodeFailures"] == 1 and victim in st["excludedNodes"]
    (rec,) = st["recoveries"]
    assert (rec["mode"], rec["node"], rec["lostPod"], rec["replacement"]) == (
        "ReplaceNode",
        victim,
        "one-a0-1",
        "one-a0-1-r1",
    )
    assert any("one-a0-1 with one-a0-1-r1" in e for e in events(kube, namespace, "one"))


def test_spares_run_beside_the_gang_and_show_in_kubectl_get(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "spared", nodes=2, failurePolicy={**REPLACE, "spareNodes": 1})
    pods = _running(kube, namespace, "spared", 3)
    assert sorted(pods) == ["spared-a0-0", "spared-a0-1", "spared-a0-2"]
    st = status(kube, namespace, "spared")
    assert st["nodes"] == "2/2" and st["spares"] == 1
    table = kube.kubectl("get", "trainingjobs", "spared", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert "SPARES" in header.split()
    assert row.split()[header.split().index("SPARES")] == "1"


def test_spares_without_replace_node_are_refused_naming_the_field(kube: Kube, crds, namespace: str) -> None:
    with pytest.raises(ApiException) as e:
        create_job(kube, namespace, "bad", nodes=2, failurePolicy={"spareNodes": 1})
    assert e.value.status == 422
    assert "spec.failurePolicy.spareNodes" in e.value.body and "ReplaceNode" in e.value.body


def test_spares_the_cluster_cannot_place_are_a_condition_not_a_block(
    kube: Kube, operator, namespace: str
) -> None:
    nodes = len(kube.gpu_nodes())
    create_job(kube, namespace, "toomany", nodes=nodes - 1, failurePolicy={**REPLACE, "spareNodes": 2})

    def spares_unschedulable() -> dict | None:
        st = status(kube, namespace, "toomany")
        cond = next((c for c in st.get("conditions", []) if c["type"] == "Unschedulable"), None)
        return st if cond and cond["reason"] == "SparesUnschedulable" else None

    st = wait_for("the spare reported unschedulable", spares_unschedulable, timeout=120)
    wait_for(
        "the gang running whole",
        lambda: (s := status(kube, namespace, "toomany")).get("phase") == "Running" and s["spares"] == 1,
        timeout=120,
    )
    st = status(kube, namespace, "toomany")
    assert st["nodes"] == f"{nodes - 1}/{nodes - 1}" and st["attempt"] == 0
    assert any(e.startswith("SparesUnschedulable") for e in events(kube, namespace, "toomany"))
