"""Checkpoint key lifecycle on the local cluster: creation, KEK envelope, rotation, retention, audit."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable
from functools import partial

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from kubernetes import client

from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster
GROUP, VERSION = "aidc.dev", "v1alpha1"


def create_job(kube: Kube, ns: str, name: str, **spec) -> None:
    kube.custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "trainingjobs",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingJob",
            "metadata": {"name": name},
            "spec": {"nodes": 1, **spec},
        },
    )


def status(kube: Kube, ns: str, name: str) -> dict:
    return kube.get_cr("trainingjobs", ns, name).get("status") or {}


def key_data(kube: Kube, ns: str, name: str) -> dict[str, bytes]:
    data = kube.core.read_namespaced_secret(name, ns).data or {}
    return {k: base64.b64decode(v) for k, v in data.items()}


def absent(read: Callable[..., object], *args: str) -> bool:
    """True once read(*args) answers 404 (the object is gone)."""
    try:
        read(*args)
    except client.ApiException as e:
        return e.status == 404
    return False


def reasons(kube: Kube, ns: str, name: str) -> list[str]:
    evs = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [e.reason for e in evs]


def test_key_created_once_and_rotated_on_request(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "rot")
    wait_for("running", lambda: status(kube, namespace, "rot").get("phase") == "Running")
    secrets_for_job = kube.core.list_namespaced_secret(
        namespace, label_selector="aidc.dev/checkpoint-key-for=rot"
    )
    assert len(secrets_for_job.items) == 1
    first = key_data(kube, namespace, "rot-ckpt-key")
    k1 = first["current-key-id"].decode()
    assert len(first[f"key-{k1}"]) == 32
    assert status(kube, namespace, "rot")["currentKeyId"] == k1
    wait_for("KeyCreated event", lambda: "KeyCreated" in reasons(kube, namespace, "rot"))

    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "trainingjobs",
        "rot",
        {"metadata": {"annotations": {"aidc.dev/rotate-key": "2026-11"}}},
    )
    wait_for("rotated", lambda: status(kube, namespace, "rot").get("currentKeyId") not in (None, k1))
    after = key_data(kube, namespace, "rot-ckpt-key")
    k2 = after["current-key-id"].decode()
    assert k2 == status(kube, namespace, "rot")["currentKeyId"]
    assert after[f"key-{k1}"] == first[f"key-{k1}"], "the old key stays: old checkpoints remain readable"
    assert len(after[f"key-{k2}"]) == 32 and after[f"key-{k2}"] != after[f"key-{k1}"]
    wait_for("KeyRotated event", lambda: "KeyRotated" in reasons(kube, namespace, "rot"))
    # Re-applying the same annotation (a GitOps sync) does not rotate again.
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingjobs", "rot", {"spec": {"failurePolicy": {"maxRestarts": 4}}}
    )
    wait_for("observed", lambda: status(kube, namespace, "rot").get("observedGeneration") == 2)
    assert key_data(kube, namespace, "rot-ckpt-key")["current-key-id"].decode() == k2


def test_kek_envelope_and_wrong_kek(kube: Kube, operator, namespace: str) -> None:
    kek = secrets.token_bytes(32)
    kube.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "kek"}, "data": {"kek": base64.b64encode(kek).decode()}}
    )
    create_job(kube, namespace, "env", checkpoint={"encryption": {"kekSecretRef": {"name": "kek"}}})
    wait_for("running", lambda: status(kube, namespace, "env").get("phase") == "Running")
    data = key_data(kube, namespace, "env-ckpt-key")
    kid = data["current-key-id"].decode()
    assert len(data[f"key-{kid}"]) == 40, "stored wrapped (RFC 3394), not as the raw key"
    assert len(aes_key_unwrap(kek, data[f"key-{kid}"])) == 32
    pod = kube.pods(namespace, "aidc.dev/job-name=env")[0]
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["AIDC_KEK_FILE"] == "/var/run/aidc/kek/kek"

    # Someone replaces the KEK with one that does not unwrap the key: a clear condition, no new pods.
    kube.core.patch_namespaced_secret(
        "kek", namespace, {"data": {"kek": base64.b64encode(secrets.token_bytes(32)).decode()}}
    )
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingjobs", "env", {"spec": {"suspend": True}}
    )
    wait_for("suspended", lambda: status(kube, namespace, "env").get("phase") == "Suspended")
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingjobs", "env", {"spec": {"suspend": False}}
    )
    wait_for(
        "KEK mismatch condition",
        lambda: any(
            c["type"] == "CheckpointKeyReady" and c["reason"] == "KEKMismatch" and "'kek'" in c["message"]
            for c in status(kube, namespace, "env").get("conditions", [])
        ),
    )
    assert not kube.pods(namespace, "aidc.dev/job-name=env")
    wait_for("KeyUnwrapFailed event", lambda: "KeyUnwrapFailed" in reasons(kube, namespace, "env"))
    assert key_data(kube, namespace, "env-ckpt-key") == data, "nothing deleted or rewritten"


def test_key_retention_delete_cascades_with_the_job(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "tmp", checkpoint={"encryption": {"keyRetention": "Delete"}})
    wait_for("running", lambda: status(kube, namespace, "tmp").get("phase") == "Running")
    secret = kube.core.read_namespaced_secret("tmp-ckpt-key", namespace)
    assert [r.kind for r in secret.metadata.owner_references or []] == ["TrainingJob"]
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", "tmp")

    secret_gone = partial(absent, kube.core.read_namespaced_secret, "tmp-ckpt-key", namespace)
    wait_for("key Secret garbage-collected", secret_gone, timeout=60)


def test_old_key_ids_are_pruned_once_no_retained_checkpoint_uses_them(
    kube: Kube, operator, namespace: str
) -> None:
    create_job(kube, namespace, "prune")
    wait_for("running", lambda: status(kube, namespace, "prune").get("phase") == "Running")
    k1 = key_data(kube, namespace, "prune-ckpt-key")["current-key-id"].decode()
    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "trainingjobs",
        "prune",
        {"metadata": {"annotations": {"aidc.dev/rotate-key": "now"}}},
    )
    wait_for("rotated", lambda: status(kube, namespace, "prune").get("currentKeyId") not in (None, k1))
    k2 = status(kube, namespace, "prune")["currentKeyId"]
    rank0 = kube.pods(namespace, "aidc.dev/job-name=prune")[0].metadata.name

    def report(step: int, key_ids: list[str]) -> None:
        time.sleep(1.1)  # reports carry 1-second timestamps; be strictly after the rotation
        kube.core.patch_namespaced_pod(
            rank0,
            namespace,
            {
                "metadata": {
                    "annotations": {
                        "aidc.dev/last-checkpoint": json.dumps(
                            {
                                "step": step,
                                "path": f"/checkpoints/prune/step-{step:09d}",
                                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "keyIds": key_ids,
                            }
                        )
                    }
                }
            },
        )

    # The gang started before the rotation still writes with k1: both stay.
    report(100, [k1, k2])
    wait_for(
        "report lifted",
        lambda: (status(kube, namespace, "prune").get("lastCheckpoint") or {}).get("step") == 100,
    )
    time.sleep(2)
    assert f"key-{k1}" in key_data(kube, namespace, "prune-ckpt-key")
    # keep-N has pruned the last k1 checkpoint: k1 goes, k2 (current) stays.
    report(200, [k2])
    wait_for("k1 pruned", lambda: f"key-{k1}" not in key_data(kube, namespace, "prune-ckpt-key"))
    assert f"key-{k2}" in key_data(kube, namespace, "prune-ckpt-key")
    wait_for("KeysPruned event", lambda: "KeysPruned" in reasons(kube, namespace, "prune"))


def key_actions(operator, ns: str, job: str) -> list[dict]:
    """The operator's structured key-action lines for this job (one JSON object per line)."""
    found = []
    for line in operator.log().splitlines():
        start = line.find('{"action":')
        if start >= 0:
            entry = json.loads(line[start:])
            if entry["namespace"] == ns and entry["job"] == job:
                found.append(entry)
    return found


def test_reapplied_job_with_delete_takes_ownership_of_a_retained_key(
    kube: Kube, operator, namespace: str
) -> None:
    """A Secret kept by an earlier Retain job of the same name must follow the new job's Delete policy:
    owned by (and garbage-collected with) the new job, said in an Event and the key-action log."""
    create_job(kube, namespace, "again")  # keyRetention: Retain (the default)
    wait_for("running", lambda: status(kube, namespace, "again").get("phase") == "Running")
    kept = key_data(kube, namespace, "again-ckpt-key")
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", "again")

    job_gone = partial(absent, kube.get_cr, "trainingjobs", namespace, "again")
    wait_for("first job deleted", job_gone, timeout=60)
    assert not kube.core.read_namespaced_secret("again-ckpt-key", namespace).metadata.owner_references

    create_job(kube, namespace, "again", checkpoint={"encryption": {"keyRetention": "Delete"}})
    wait_for("running again", lambda: status(kube, namespace, "again").get("phase") == "Running")
    uid = kube.get_cr("trainingjobs", namespace, "again")["metadata"]["uid"]
    secret = kube.core.read_namespaced_secret("again-ckpt-key", namespace)
    assert [(r.kind, r.uid) for r in secret.metadata.owner_references or []] == [("TrainingJob", uid)]
    assert key_data(kube, namespace, "again-ckpt-key") == kept, "the same key: old checkpoints stay readable"
    wait_for(
        "adoption Events",
        lambda: {"KeyAdopted", "KeyOwnershipTaken"} <= set(reasons(kube, namespace, "again")),
    )
    kid = kept["current-key-id"].decode()
    wait_for(
        "key-action log lines",
        lambda: {"adopt", "own"} <= {e["action"] for e in key_actions(operator, namespace, "again")},
    )
    for entry in key_actions(operator, namespace, "again"):
        assert set(entry) == {"action", "namespace", "job", "secret", "keyIds", "reason"}
        assert entry["secret"] == "again-ckpt-key" and entry["keyIds"] in ([kid], [])

    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", "again")

    secret_gone = partial(absent, kube.core.read_namespaced_secret, "again-ckpt-key", namespace)
    wait_for("key Secret garbage-collected with the job that said Delete", secret_gone, timeout=90)
