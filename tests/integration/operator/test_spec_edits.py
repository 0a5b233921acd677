"""Editing a running TrainingJob on a real apiserver and operator (kwok pods): a field the running gang
cannot take is rejected at apply time naming the field; a changed spec.nodes is a declared resize,
never a node failure, and the NODES column keeps telling the truth."""

from __future__ import annotations

import pytest
from kubernetes.client.rest import ApiException

from tests.integration.operator.test_trainingjob import (
    GROUP,
    PLURAL,
    VERSION,
    create_job,
    gang,
    job,
    status,
    wait_running,
)
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster


def patch_spec(kube: Kube, ns: str, name: str, spec: dict) -> None:
    kube.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": spec})


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def test_immutable_field_edit_is_rejected_naming_the_field(kube: Kube, operator, namespace: str) -> None:
    create_job(kube, namespace, "frozen", nodes=2)
    wait_running(kube, namespace, "frozen", attempt=0, nodes=2)
    for change, field in [
        ({"image": "example.com/trainer:2"}, "spec.image"),
        ({"procPerNode": 2, "gpusPerNode": 2}, "spec.procPerNode"),
        ({"command": ["python", "-m", "aidc_trainer", "--example", "cnn"]}, "spec.command"),
    ]:
        with pytest.raises(ApiException) as rejected:
            patch_spec(kube, namespace, "frozen", change)
        assert rejected.value.status == 422 and f"{field} cannot change" in rejected.value.body
    assert job(kube, namespace, "frozen")["spec"]["image"] != "example.com/trainer:2"
    # What the operator acts on is still editable: a failure-policy change is accepted.
    patch_spec(kube, namespace, "frozen", {"failurePolicy": {"maxRestarts": 7}})


@pytest.mark.parametrize("new_size", [3, 1])
def test_resize_of_a_static_running_job_is_pending(
    kube: Kube, operator, namespace: str, new_size: int
) -> None:
    create_job(kube, namespace, "resize", nodes=2)
    before = {p.metadata.name for p in wait_running(kube, namespace, "resize", attempt=0, nodes=2)}
    patch_spec(kube, namespace, "resize", {"nodes": new_size})  # accepted: a declared resize
    generation = job(kube, namespace, "resize")["metadata"]["generation"]
    wait_for(
        "ResizePending",
        lambda: (
            condition(st := status(kube, namespace, "resize"), "ResizePending").get("status") == "True"
            and st.get("observedGeneration") == generation
        ),
        timeout=60,
    )
    st = status(kube, namespace, "resize")
    message = condition(st, "ResizePending")["message"]
    assert f"spec.nodes is {new_size}" in message and "has 2 node(s)" in message
    assert st["phase"] == "Running" and st["nodes"] == "2/2", "NODES shows the running gang"
    assert st.get("nodeFailures", 0) == 0 and st.get("restarts", 0) == 0 and st["attempt"] == 0
    assert {p.metadata.name for p in gang(kube, namespace, "resize")} == before, "no pod added or removed"

    def reasons() -> set[str]:
        selector = "involvedObject.name=resize"
        return {e.reason for e in kube.core.list_namespaced_event(namespace, field_selector=selector).items}

    wait_for("a ResizePending Event", lambda: "ResizePending" in reasons(), timeout=60)
    assert "NodeFailure" not in reasons()
