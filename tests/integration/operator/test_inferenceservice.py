"""InferenceService reconciliation on the real local control plane (kube-apiserver, controller-manager
with the Deployment/ReplicaSet/HPA/garbage-collector controllers, scheduler, kwok nodes) with the operator
running as a real process. kwok plays the kubelet: pods go Running and Ready, no server really runs, so
these tests check what the operator renders and how it reacts, not inference (tests/integration/server)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "aidc.dev", "v1alpha1", "inferenceservices"
# A volume kwok's fake nodes accept without a provisioner (a real cluster: an RWX/ROX claim, NFS …).
NFS = {"nfs": {"server": "nfs.example", "path": "/ckpt"}}
LABEL_ISVC = "aidc.dev/inferenceservice"


def create_isvc(kube: Kube, ns: str, name: str, **spec: Any) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "metadata": {"name": name}}
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {**body, "spec": spec})


def patch_spec(kube: Kube, ns: str, name: str, spec: dict) -> None:
    kube.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": spec})


def create_job(kube: Kube, ns: str, name: str) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"gpusPerNode": 0, "checkpoint": {"volume": NFS}},
    }
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "trainingjobs", body)


def status(kube: Kube, ns: str, name: str) -> dict:
    return kube.get_cr(PLURAL, ns, name).get("status") or {}


def condition(kube: Kube, ns: str, name: str, type_: str) -> dict:
    return next((c for c in status(kube, ns, name).get("conditions") or [] if c["type"] == type_), {})


def deployment(kube: Kube, ns: str, name: str) -> client.V1Deployment:
    return kube.apps.read_namespaced_deployment(name, ns)


def wait_phase(kube: Kube, ns: str, name: str, phase: str, timeout: float = 60, **expect: Any) -> dict:
    def check() -> dict | None:
        st = status(kube, ns, name)
        ok = st.get("phase") == phase and all(st.get(k) == v for k, v in expect.items())
        return st if ok else None

    return wait_for(f"{name} {phase} {expect}", check, timeout=timeout)


def events(kube: Kube, ns: str, name: str) -> list[str]:
    items = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [f"{e.reason}: {e.message}" for e in items]


def env_of(dep: client.V1Deployment) -> dict[str, str]:
    return {e.name: e.value for e in dep.spec.template.spec.containers[0].env}


def test_serves_a_training_job_with_its_volume_key_and_version(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "mnist")
    create_isvc(
        kube,
        namespace,
        "digits",
        model={"fromTrainingJob": "mnist"},
        replicas={"min": 2, "max": 4},
        gpus=1,
        resources={"requests": {"cpu": "1"}},
    )
    st = wait_phase(kube, namespace, "digits", "Ready", readyReplicas=2)
    assert st["url"] == f"http://digits.{namespace}.svc.cluster.local/v2/models/digits"
    assert condition(kube, namespace, "digits", "ModelResolved")["status"] == "True"

    dep = deployment(kube, namespace, "digits")
    c = dep.spec.template.spec.containers[0]
    env = env_of(dep)
    assert c.command == ["python", "-m", "aidc_server"]
    assert env["AIDC_CHECKPOINT_DIR"] == "/checkpoints/mnist" and env["AIDC_MODEL_NAME"] == "digits"
    assert env["AIDC_KEY_DIR"] == "/var/run/aidc/keys"
    mounts = {m.mount_path: m for m in c.volume_mounts}
    assert mounts["/checkpoints"].read_only and mounts["/var/run/aidc/keys"].read_only
    vols = {v.name: v for v in dep.spec.template.spec.volumes}
    assert vols["model"].nfs.server == "nfs.example"
    assert vols["model-key"].secret.secret_name == "mnist-ckpt-key"  # the Secret the job's trainer uses
    assert c.readiness_probe.http_get.path == "/v2/health/ready"
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert (
        c.security_context.read_only_root_filesystem
        and dep.spec.template.spec.security_context.run_as_non_root
    )

    svc = kube.core.read_namespaced_service("digits", namespace)
    assert svc.spec.type == "ClusterIP" and svc.spec.ports[0].port == 80
    assert svc.spec.ports[0].target_port == "http"
    autoscaling = client.AutoscalingV2Api(kube.api)
    hpa = autoscaling.read_namespaced_horizontal_pod_autoscaler("digits", namespace)
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (2, 4)
    assert hpa.spec.scale_target_ref.name == "digits"

    def hpa_conditions() -> dict[str, tuple[str, str]] | None:
        st = autoscaling.read_namespaced_horizontal_pod_autoscaler("digits", namespace).status
        return {c.type: (c.status, c.reason) for c in st.conditions or []} or None

    # The cluster's own HPA controller took it up and reached the Deployment's scale subresource.
    # No metrics API runs here, so it cannot compute utilisation: that is all it reports.
    conds = wait_for("the HPA controller's verdict", hpa_conditions, timeout=60, interval=1)
    assert conds["AbleToScale"] == ("True", "SucceededGetScale"), conds
    assert conds["ScalingActive"] == ("False", "FailedGetResourceMetric"), conds
    pods = kube.pods(namespace, f"{LABEL_ISVC}=digits")
    assert len(pods) == 2 and all(p.metadata.owner_references for p in pods)

    # The trainer reports a checkpoint (rank 0's annotation, as aidc_trainer writes it): the servers
    # hot-swap to it, and the InferenceService shows that version.
    rank0 = wait_for("job rank 0", lambda: kube.pods(namespace, "aidc.dev/job-name=mnist"))[0]
    checkpoint = {"step": 300, "path": "/checkpoints/mnist/step-000000300"}
    kube.core.patch_namespaced_pod(
        rank0.metadata.name,
        namespace,
        {"metadata": {"annotations": {"aidc.dev/last-checkpoint": json.dumps(checkpoint)}}},
    )
    wait_phase(kube, namespace, "digits", "Ready", modelVersion="300")
    row = kube.kubectl("get", "aisvc", "digits", "-n", namespace).stdout.splitlines()[1].split()
    assert row[1] == "Ready" and row[3:5] == ["300", "2"]
    assert any(e.startswith("Created: created Deployment digits") for e in events(kube, namespace, "digits"))


def test_missing_training_job_waits_then_resolves(kube: Kube, operator, namespace: str) -> None:
    create_isvc(kube, namespace, "early", model={"fromTrainingJob": "later"})
    wait_for(
        "TrainingJobNotFound condition",
        lambda: condition(kube, namespace, "early", "ModelResolved").get("reason") == "TrainingJobNotFound",
    )
    st = status(kube, namespace, "early")
    assert st["phase"] == "Pending"
    assert condition(kube, namespace, "early", "ModelResolved")["status"] == "False"
    assert not kube.apps.list_namespaced_deployment(namespace).items
    assert any(e.startswith("TrainingJobNotFound") for e in events(kube, namespace, "early"))

    create_job(kube, namespace, "later")
    wait_phase(kube, namespace, "early", "Ready", readyReplicas=1, timeout=30)
    assert condition(kube, namespace, "early", "ModelResolved")["status"] == "True"
    assert env_of(deployment(kube, namespace, "early"))["AIDC_CHECKPOINT_DIR"] == "/checkpoints/later"


def test_canary_split_promotion_and_removal(kube: Kube, operator, namespace: str) -> None:
    storage = {"storage": {"volume": NFS, "path": "v1"}}
    canary_model = {"storage": {"volume": NFS, "path": "v2"}}
    create_isvc(
        kube,
        namespace,
        "split",
        model=storage,
        replicas={"min": 3, "max": 3},
        canary={"trafficPercent": 25, "model": canary_model},
    )
    wait_phase(kube, namespace, "split", "Ready", readyReplicas=3, canaryReadyReplicas=1)
    canary = deployment(kube, namespace, "split-canary")
    assert canary.spec.replicas == 1  # 1 of 4 ready endpoints = 25 %
    assert env_of(canary)["AIDC_CHECKPOINT_DIR"] == "/models/v2"
    assert env_of(canary)["AIDC_MODEL_NAME"] == "split"  # same URL whichever pod answers
    assert env_of(deployment(kube, namespace, "split"))["AIDC_CHECKPOINT_DIR"] == "/models/v1"
    svc = kube.core.read_namespaced_service("split", namespace)
    assert svc.spec.selector == {LABEL_ISVC: "split"}  # one Service in front of both
    endpoints = wait_for(
        "4 endpoints",
        lambda: (
            (s := kube.core.read_namespaced_endpoints("split", namespace).subsets)
            and len(s[0].addresses or []) == 4
            and s
        ),
    )
    assert len(endpoints[0].addresses) == 4
    assert "~25%" in condition(kube, namespace, "split", "CanaryReady")["message"]

    patch_spec(kube, namespace, "split", {"canary": {"trafficPercent": 100}})
    wait_phase(kube, namespace, "split", "Ready", canaryReadyReplicas=3)
    svc = kube.core.read_namespaced_service("split", namespace)
    assert svc.spec.selector == {LABEL_ISVC: "split", "aidc.dev/role": "canary"}

    # Promotion: the canary's model becomes the model, the canary goes.
    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "split",
        [
            {"op": "replace", "path": "/spec/model", "value": canary_model},
            {"op": "remove", "path": "/spec/canary"},
        ],
        _content_type="application/json-patch+json",
    )
    wait_for(
        "canary Deployment deleted",
        lambda: (
            not kube.apps.list_namespaced_deployment(namespace, label_selector="aidc.dev/role=canary").items
        ),
    )
    assert env_of(deployment(kube, namespace, "split"))["AIDC_CHECKPOINT_DIR"] == "/models/v2"
    svc = kube.core.read_namespaced_service("split", namespace)
    assert svc.spec.selector == {LABEL_ISVC: "split", "aidc.dev/role": "primary"}
    wait_phase(kube, namespace, "split", "Ready", readyReplicas=3, canaryReadyReplicas=0)


def test_spec_edit_rolls_out_and_deletion_cascades(kube: Kube, operator, namespace: str) -> None:
    create_isvc(
        kube,
        namespace,
        "edit",
        model={"storage": {"volume": NFS}},
        env=[{"name": "AIDC_LOG_LEVEL", "value": "debug"}],
    )
    wait_phase(kube, namespace, "edit", "Ready", readyReplicas=1)

    # Level-based and idempotent: passes over an unchanged spec write nothing.
    autoscaling = client.AutoscalingV2Api(kube.api)

    def versions() -> tuple:
        return (
            deployment(kube, namespace, "edit").metadata.generation,
            kube.core.read_namespaced_service("edit", namespace).metadata.resource_version,
            autoscaling.read_namespaced_horizontal_pod_autoscaler(
                "edit", namespace
            ).metadata.resource_version,
        )

    before = versions()
    for i in range(3):  # any change to the object wakes its reconcile loop
        kube.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "edit", {"metadata": {"annotations": {"poke": str(i)}}}
        )
        time.sleep(0.5)
    assert versions() == before
    assert not any(e.startswith("Updated") for e in events(kube, namespace, "edit"))

    patch_spec(kube, namespace, "edit", {"batching": {"maxBatchSize": 64}, "env": []})

    def rolled_out() -> bool:
        pods = [p for p in kube.pods(namespace, f"{LABEL_ISVC}=edit") if not p.metadata.deletion_timestamp]
        envs = [{e.name: e.value for e in p.spec.containers[0].env} for p in pods]
        return len(pods) == 1 and envs[0]["AIDC_MAX_BATCH_SIZE"] == "64" and "AIDC_LOG_LEVEL" not in envs[0]

    wait_for("new pods with the edited settings", rolled_out, timeout=60)
    assert any(e.startswith("Updated: updated Deployment edit") for e in events(kube, namespace, "edit"))
    st = wait_phase(kube, namespace, "edit", "Ready", readyReplicas=1)
    assert st["observedGeneration"] == 2

    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "edit")
    wait_for(
        "Deployment, Service, HPA and pods deleted with the InferenceService",
        lambda: (
            not kube.apps.list_namespaced_deployment(namespace).items
            and not [
                s for s in kube.core.list_namespaced_service(namespace).items if s.metadata.name == "edit"
            ]
            and not autoscaling.list_namespaced_horizontal_pod_autoscaler(namespace).items
            and not kube.pods(namespace, f"{LABEL_ISVC}=edit")
        ),
        timeout=90,  # the garbage collector, not the operator, deletes them: it takes its time
    )


def test_invalid_specs_are_rejected_or_reported(kube: Kube, operator, namespace: str) -> None:
    both = {"fromTrainingJob": "a", "storage": {"volume": NFS}}
    with pytest.raises(client.ApiException) as e:
        create_isvc(kube, namespace, "both", model=both)
    assert e.value.status == 422
    assert "exactly one of model.fromTrainingJob and model.storage" in json.loads(e.value.body)["message"]
    with pytest.raises(client.ApiException) as e:
        create_isvc(kube, namespace, "minmax", model={"fromTrainingJob": "a"}, replicas={"min": 5, "max": 2})
    assert e.value.status == 422
    assert "spec.replicas.min must be <= spec.replicas.max" in json.loads(e.value.body)["message"]

    # Passes the schema, but no HPA can scale to zero without a feature gate: the operator says so.
    create_isvc(kube, namespace, "zero", model={"storage": {"volume": NFS}}, replicas={"min": 0, "max": 2})
    wait_phase(kube, namespace, "zero", "Failed")
    invalid = condition(kube, namespace, "zero", "Invalid")
    assert invalid["status"] == "True" and "spec.replicas.min" in invalid["message"]
    assert any(ev.startswith("InvalidSpec: spec.replicas.min") for ev in events(kube, namespace, "zero"))
    assert not kube.apps.list_namespaced_deployment(namespace).items

    patch_spec(kube, namespace, "zero", {"replicas": {"min": 1}})
    wait_phase(kube, namespace, "zero", "Ready", readyReplicas=1)
    assert condition(kube, namespace, "zero", "Invalid")["status"] == "False"

    # Passed through to the Deployment as-is, so Kubernetes validates it: the rejection is reported,
    # and the running replicas keep serving.
    patch_spec(kube, namespace, "zero", {"resources": {"limits": {"cpu": "lots"}}})
    invalid = wait_for(
        "the API server's rejection in the Invalid condition",
        lambda: (c := condition(kube, namespace, "zero", "Invalid")).get("status") == "True" and c,
    )
    assert "spec.resources" in invalid["message"] and "quantities must match" in invalid["message"]
    assert deployment(kube, namespace, "zero").status.ready_replicas == 1


def test_the_example_pair_serves_on_the_local_cluster(kube: Kube, operator, namespace: str) -> None:
    """examples/: the claim binds to the local volume, the job's gang is placed on it, and the
    InferenceService resolves the job's volume and key and goes Ready (kwok plays the kubelet)."""
    examples = Path(__file__).resolve().parents[3] / "examples"
    pv = yaml.safe_load((examples / "local-checkpoints-pv.yaml").read_text())
    pv["metadata"]["name"] = f"{namespace}-ckpt"  # a cluster-scoped name of this test's own
    pv["spec"]["claimRef"] = {"namespace": namespace, "name": "mnist-checkpoints"}
    kube.core.create_persistent_volume(pv)
    try:
        for example in ("trainingjob-for-serving.yaml", "inferenceservice-from-trainingjob.yaml"):
            kube.kubectl("apply", "-n", namespace, "-f", str(examples / example))
        wait_phase(kube, namespace, "mnist", "Ready", timeout=120, readyReplicas=1)
        assert condition(kube, namespace, "mnist", "ModelResolved")["reason"] == "TrainingJobResolved"
        pods = kube.pods(namespace, "aidc.dev/job-name=mnist-train")
        assert pods and all(p.spec.node_name for p in pods)
        vols = {v.name: v for v in deployment(kube, namespace, "mnist").spec.template.spec.volumes}
        assert vols["model"].persistent_volume_claim.claim_name == "mnist-checkpoints"
    finally:
        kube.core.delete_persistent_volume(pv["metadata"]["name"])
