"""The Argo CD health checks users paste into argocd-cm (examples/gitops/argocd/argocd-cm-health.yaml, the
only copy: docs/gitops.md links to it), run in Lua 5.1 (lupa; Argo CD's gopher-lua is 5.1) against the
objects the operator really writes on the local cluster, in each state a user meets."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.integration.operator.test_kueue_trainingjobs import queued, queued_job
from tests.integration.operator.test_trainingjob import create_job, fail_pod, gang, status, succeed_pod
from tests.kube import Kube, wait_for
from tests.kueue_objects import need_kueue

lupa = pytest.importorskip("lupa.lua51", reason="lupa (hack/requirements.txt) runs Argo CD's Lua")
HEALTH = ROOT / "examples" / "gitops" / "argocd" / "argocd-cm-health.yaml"
KEY = "resource.customizations.health.aidc.dev_{}"


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """(hs.status, hs.message) as Argo CD computes them: the script runs with the object as global `obj`
    (JSON decoded into Lua tables, arrays 1-based) and returns the `hs` table."""
    script = yaml.safe_load(HEALTH.read_text())["data"][KEY.format(kind)]
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(script)
    return hs["status"], hs["message"]


def test_docs_point_at_the_one_copy_of_the_scripts() -> None:
    docs = (ROOT / "docs" / "gitops.md").read_text()
    assert "examples/gitops/argocd/argocd-cm-health.yaml" in docs
    assert "hs.status" not in docs, "a copy of the Lua in the docs would drift from the tested file"


def test_health_script_runs_in_lua_for_an_object_the_operator_has_not_seen() -> None:
    fresh = {"apiVersion": "aidc.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "x"}, "spec": {}}
    assert health("TrainingJob", fresh) == ("Progressing", "Waiting for the operator")
    assert health("InferenceService", {**fresh, "kind": "InferenceService"})[0] == "Progressing"


@pytest.mark.cluster
def test_trainingjob_health_for_real_running_succeeded_failed_and_invalid_jobs(
    kube: Kube, operator, namespace: str
) -> None:
    ns = namespace
    for name in ("running", "done", "broken"):
        create_job(kube, ns, name, nodes=1, gpusPerNode=0, failurePolicy={"maxRestarts": 0})
    # The webhook would refuse this spec; without one (failurePolicy Ignore, or none installed) the
    # reconciler reports it Invalid.
    create_job(kube, ns, "invalid", nodes=1, gpusPerNode=0, env=[{"name": "WORLD_SIZE", "value": "7"}])
    for name in ("running", "done", "broken"):
        wait_for(f"{name} Running", lambda n=name: status(kube, ns, n).get("phase") == "Running", timeout=90)
    succeed_pod(kube, ns, gang(kube, ns, "done")[0].metadata.name)
    fail_pod(kube, ns, gang(kube, ns, "broken")[0].metadata.name, 3, message="loss is NaN")
    for name, phase in (("done", "Succeeded"), ("broken", "Failed")):
        wait_for(f"{name} {phase}", lambda n=name, p=phase: status(kube, ns, n).get("phase") == p, timeout=90)
    wait_for(
        "invalid reported",
        lambda: any(
            c["type"] == "Invalid" and c["status"] == "True"
            for c in status(kube, ns, "invalid").get("conditions") or []
        ),
        timeout=90,
    )

    def of(name: str) -> tuple[str, str]:
        return health("TrainingJob", kube.get_cr("trainingjobs", ns, name))

    assert of("running") == ("Healthy", "Running 1/1")
    st, msg = of("done")
    assert st == "Healthy" and msg.startswith("Training finished"), msg
    st, msg = of("broken")
    assert st == "Degraded" and msg.startswith("Failed: ") and len(msg) > len("Failed: "), msg
    st, msg = of("invalid")
    assert (st, msg.split(" is set")[0]) == ("Degraded", "Invalid: spec.env[0].name: WORLD_SIZE"), msg


@pytest.mark.cluster
def test_trainingjob_health_while_queued_by_kueue(kube: Kube, operator, namespace: str) -> None:
    need_kueue(kube)
    queued_job(kube, namespace, "lost", "no-such-queue", nodes=1, gpusPerNode=1, procPerNode=1)
    wait_for(
        "lost Queued by Kueue",
        lambda: (c := queued(kube, namespace, "lost")) and "no-such-queue" in c["message"],
        timeout=120,
    )
    st, msg = health("TrainingJob", kube.get_cr("trainingjobs", namespace, "lost"))
    assert st == "Progressing" and msg.startswith("Queued: ") and "no-such-queue" in msg, msg


@pytest.mark.cluster
def test_inferenceservice_health_while_it_has_no_ready_replica(kube: Kube, operator, namespace: str) -> None:
    # Its model volume is a claim that does not exist, so no replica can ever be placed: a state that
    # stays put (kwok marks a placed pod Ready, which would race an emptyDir server to Ready).
    claim = {"persistentVolumeClaim": {"claimName": "no-such-claim"}}
    isvc = {
        "apiVersion": "aidc.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "svc"},
        "spec": {"model": {"storage": {"volume": claim, "path": "models/svc"}}},
    }
    kube.custom.create_namespaced_custom_object("aidc.dev", "v1alpha1", namespace, "inferenceservices", isvc)

    def unplaceable() -> dict[str, Any] | None:
        o = kube.get_cr("inferenceservices", namespace, "svc")
        reasons = {c.get("reason") for c in (o.get("status") or {}).get("conditions") or []}
        return o if o.get("status", {}).get("phase") and "VolumeNotFound" in reasons else None

    obj = wait_for("svc reported waiting for its missing claim", unplaceable, timeout=240)
    assert obj["status"]["phase"] != "Ready"
    assert health("InferenceService", obj) == ("Progressing", obj["status"]["phase"])
