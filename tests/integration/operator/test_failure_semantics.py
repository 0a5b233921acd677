"""Failure semantics on the real local control plane, with the operator running without its admission
webhook (as `make run` runs it): a power cut whose survivors exit first is still a node failure, an
invalid spec gets the webhook's answer from the reconciler, and a gang the scheduler cannot place says
so in the scheduler's words. Container exits are the kubelet's reports (see test_trainingjob.py)."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from tests.integration.operator.test_trainingjob import create_job, events, fail_pod, status, wait_running
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster


def condition(kube: Kube, ns: str, name: str, type_: str) -> dict:
    return next((c for c in status(kube, ns, name).get("conditions") or [] if c["type"] == type_), {})


def peer_lost(rank: int) -> str:
    """The trainer's structured exit report, as it appends it to the termination message."""
    return json.dumps(
        {"cause": "PeerLost", "exitCode": 5, "rank": rank, "message": "Connection reset by peer"}
    )


def test_power_cut_whose_survivors_exit_first_is_a_node_failure(kube: Kube, operator, namespace: str) -> None:
    """maxRestarts 0: before, the survivors' 'lost a peer' exits, seen before the dead node's Lease lapsed,
    spent the restart budget and failed the job."""
    create_job(kube, namespace, "cut", nodes=3, failurePolicy={"maxRestarts": 0, "backoffSeconds": 60})
    pods = wait_running(kube, namespace, "cut", attempt=0, nodes=3)
    victim = pods[2].spec.node_name
    kube.fail_node(victim)
    for pod in pods[:2]:  # torchrun exits 1; the worker's report says why
        fail_pod(
            kube,
            namespace,
            pod.metadata.name,
            1,
            "Error",
            peer_lost(int(pod.metadata.labels["aidc.dev/node-rank"])),
        )

    wait_for(
        "the exits held until the nodes are judged",
        lambda: (
            status(kube, namespace, "cut").get("peerLostSince")
            or status(kube, namespace, "cut").get("attempt")
        ),
        timeout=120,
    )
    wait_running(kube, namespace, "cut", attempt=1, nodes=3, timeout=180)
    st = status(kube, namespace, "cut")
    assert st["nodeFailures"] == 1 and st["restarts"] == 0, st
    assert victim in st["excludedNodes"] and st["lastFailure"]["node"] == victim
    assert not st.get("restartAfter"), "a node failure restarts at once, with no backoff"
    assert any(e.startswith("NodeFailure") for e in events(kube, namespace, "cut"))


def test_invalid_spec_without_the_webhook_gets_the_same_answer(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "reserved", nodes=1, env=[{"name": "WORLD_SIZE", "value": "7"}])
    cond = wait_for(
        "Invalid condition",
        lambda: (c := condition(kube, namespace, "reserved", "Invalid")).get("status") == "True" and c,
        timeout=60,
    )
    assert cond["message"].startswith("spec.env[0].name: WORLD_SIZE is set by the operator"), cond
    assert not kube.pods(namespace, "aidc.dev/job-name=reserved"), "an invalid job starts nothing"
    assert any(e.startswith("InvalidSpec: spec.env[0].name") for e in events(kube, namespace, "reserved"))


def test_a_name_too_long_for_its_pods_is_rejected_by_the_crd(kube: Kube, crds, namespace: str) -> None:
    with pytest.raises(ApiException) as e:
        create_job(kube, namespace, "x" * 60, nodes=1)
    assert e.value.status == 422 and "metadata.name: must be a DNS-1035 label of at most 58" in e.value.body


def test_a_gang_the_scheduler_cannot_place_says_why(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "huge", nodes=1, gpusPerNode=64, procPerNode=1)
    cond = wait_for(
        "Unschedulable condition",
        lambda: (c := condition(kube, namespace, "huge", "Unschedulable")).get("status") == "True" and c,
        timeout=60,
    )
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond
    assert any(e.startswith("Unschedulable") for e in events(kube, namespace, "huge"))

    nodes = len(kube.gpu_nodes())
    create_job(kube, namespace, "wide", nodes=nodes + 1, gpusPerNode=1)
    cond = wait_for(
        "Unschedulable condition",
        lambda: (c := condition(kube, namespace, "wide", "Unschedulable")).get("status") == "True" and c,
        timeout=60,
    )
    assert f"1 of {nodes + 1} pod(s) cannot be scheduled" in cond["message"], cond
