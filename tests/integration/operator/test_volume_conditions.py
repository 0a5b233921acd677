"""A pod that waits for its volume says so, naming the claim, on the real local control plane (kube-
scheduler's own verdicts, the PV controller binding claims, kwok nodes): a TrainingJob whose claim is
unbound, or whose provisioner never answers, and an InferenceService whose claim is missing or unbound,
each get a condition and an Event that name the claim and why, and recover once the claim binds."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster
NOWHERE = "aidc-test-nothing"  # a StorageClass that does not exist: nothing provisions its claims


def claim(kube: Kube, ns: str, name: str, storage_class: str = NOWHERE) -> None:
    spec = {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": storage_class,
        "resources": {"requests": {"storage": "1Gi"}},
    }
    kube.core.create_namespaced_persistent_volume_claim(ns, {"metadata": {"name": name}, "spec": spec})


@pytest.fixture
def cluster_objects(kube: Kube) -> Iterator[list[tuple[str, str]]]:
    """Cluster-scoped objects a test makes ((kind, name)), deleted after it."""
    made: list[tuple[str, str]] = []
    yield made
    for kind, name in made:
        kube.kubectl("delete", kind, name, "--ignore-not-found", "--wait=false", check=False)


def volume_for(kube: Kube, made: list, ns: str, claim_name: str, storage_class: str = NOWHERE) -> None:
    """A PersistentVolume reserved for the claim: the PV controller binds them."""
    name = f"pv-{uuid.uuid4().hex[:8]}"
    body = {
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": storage_class,
            "nfs": {"server": "nfs.example", "path": "/ckpt"},
            "claimRef": {"namespace": ns, "name": claim_name},
        },
    }
    kube.core.create_persistent_volume(body)
    made.append(("pv", name))


def conditions(kube: Kube, plural: str, ns: str, name: str) -> dict[str, dict[str, Any]]:
    st = kube.get_cr(plural, ns, name).get("status") or {}
    return {c["type"]: c for c in st.get("conditions") or []}


def wait_condition(
    kube: Kube, plural: str, ns: str, name: str, type_: str, status: str, reason: str, timeout: float = 120
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        c = conditions(kube, plural, ns, name).get(type_) or {}
        return c if (c.get("status"), c.get("reason")) == (status, reason) else None

    return wait_for(f"{plural}/{name} {type_}={status} ({reason})", check, timeout=timeout)


def events(kube: Kube, ns: str, name: str) -> list[tuple[str, str, str]]:
    items = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [(e.type, e.reason, e.message) for e in items]


def job(kube: Kube, ns: str, name: str, claim_name: str) -> None:
    volume = {"persistentVolumeClaim": {"claimName": claim_name}}
    kube.create_cr("TrainingJob", ns, name, {"gpusPerNode": 0, "checkpoint": {"volume": volume}})


def test_a_job_on_an_unbound_claim_says_which_claim_and_recovers_when_it_binds(
    kube: Kube, operator, namespace: str, cluster_objects: list
) -> None:
    claim(kube, namespace, "ckpt")
    job(kube, namespace, "unbound", "ckpt")
    cond = wait_condition(
        kube, "trainingjobs", namespace, "unbound", "CheckpointVolumeReady", "False", "VolumeNotBound"
    )
    assert "PersistentVolumeClaim 'ckpt' is Pending" in cond["message"]
    assert f"nothing provisions StorageClass '{NOWHERE}'" in cond["message"]
    assert kube.get_cr("trainingjobs", namespace, "unbound")["status"]["phase"] == "Pending"
    wait_for(
        "a VolumeNotBound Event naming the claim",
        lambda: any(
            t == "Warning" and r == "VolumeNotBound" and "'ckpt'" in m
            for t, r, m in events(kube, namespace, "unbound")
        ),
    )

    volume_for(kube, cluster_objects, namespace, "ckpt")
    wait_condition(kube, "trainingjobs", namespace, "unbound", "CheckpointVolumeReady", "True", "VolumeReady")
    wait_for(
        "the gang placed",
        lambda: all(p.spec.node_name for p in kube.pods(namespace, "aidc.dev/job-name=unbound")),
    )


def test_a_job_whose_provisioner_never_answers_says_so_after_the_grace(
    kube: Kube, operator, namespace: str, cluster_objects: list
) -> None:
    """A WaitForFirstConsumer class whose provisioner is not running: the scheduler holds the pod with
    no condition of its own for up to ten minutes; the claim's state tells why."""
    klass = f"aidc-wffc-{uuid.uuid4().hex[:6]}"
    kube.kubectl(
        "apply",
        "-f",
        "-",
        input=(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\n"
            f"metadata: {{name: {klass}}}\nprovisioner: example.com/nobody\n"
            "volumeBindingMode: WaitForFirstConsumer\n"
        ),
    )
    cluster_objects.append(("storageclass", klass))
    claim(kube, namespace, "late", storage_class=klass)
    job(kube, namespace, "waiting", "late")
    cond = wait_condition(
        kube, "trainingjobs", namespace, "waiting", "CheckpointVolumeReady", "False", "VolumeNotBound"
    )
    assert "'late'" in cond["message"] and "provisioner 'example.com/nobody'" in cond["message"]


def test_a_server_on_a_missing_claim_blames_the_claim_not_the_checkpoint(
    kube: Kube, operator, namespace: str, cluster_objects: list
) -> None:
    storage = {"volume": {"persistentVolumeClaim": {"claimName": "models"}}, "path": "m"}
    kube.create_cr("InferenceService", namespace, "srv", {"model": {"storage": storage}})
    ready = wait_condition(kube, "inferenceservices", namespace, "srv", "Ready", "False", "VolumeNotFound")
    assert "PersistentVolumeClaim 'models' not found" in ready["message"]
    assert "checkpoint" not in ready["message"]
    wait_for(
        "a VolumeNotFound Event",
        lambda: any(r == "VolumeNotFound" and "'models'" in m for _, r, m in events(kube, namespace, "srv")),
    )

    claim(kube, namespace, "models")  # exists now, but nothing binds it yet
    ready = wait_condition(kube, "inferenceservices", namespace, "srv", "Ready", "False", "VolumeNotBound")
    assert "PersistentVolumeClaim 'models' is Pending" in ready["message"]

    volume_for(kube, cluster_objects, namespace, "models")
    # kwok plays the kubelet: once placed, the server pod goes Ready.
    wait_condition(kube, "inferenceservices", namespace, "srv", "Ready", "True", "Serving")
