"""InferenceService status from the observed world (plan_status), without a cluster."""

from __future__ import annotations

from aidc_operator.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from aidc_operator.builders import inferenceservice as build
from aidc_operator.builders.common import Owner
from aidc_operator.serving_status import (
    Resolution,
    ServerReport,
    plan_status,
    server_reason,
    transition_events,
)
from aidc_operator.volumes import Trouble

OWNER = Owner("InferenceService", "digits", "ns", "uid")
NOW = "2026-11-26T00:00:00Z"
RESOLVED = build.ResolvedModel({"nfs": {}}, "/checkpoints", "/checkpoints/mnist")
JOB = {"status": {"lastCheckpoint": {"step": 300, "path": "/checkpoints/mnist/step-000000300"}}}


def spec(**kw) -> InferenceServiceSpec:
    kw.setdefault("model", {"fromTrainingJob": "mnist"})
    return InferenceServiceSpec.model_validate(kw)


def dep(ready: int, replicas: int = 1) -> dict:
    return {"spec": {"replicas": replicas}, "status": {"readyReplicas": ready}}


def status(
    old: InferenceServiceStatus | None = None,
    s: InferenceServiceSpec | None = None,
    primary: Resolution | None = None,
    canary: Resolution | None = None,
    primary_dep: dict | None = None,
    canary_dep: dict | None = None,
    canary_wanted: int = 0,
    trouble: str | None = None,
    placement: Trouble | None = None,
) -> InferenceServiceStatus:
    return plan_status(
        old or InferenceServiceStatus(),
        OWNER,
        s or spec(),
        3,
        primary or Resolution(RESOLVED, "TrainingJobResolved", "ok", JOB),
        canary,
        primary_dep,
        canary_dep,
        canary_wanted,
        trouble,
        NOW,
        placement=placement,
    )


def cond(st: InferenceServiceStatus, type_: str):
    return next(c for c in st.conditions if c.type == type_)


def test_missing_training_job_is_pending_with_the_reason() -> None:
    missing = Resolution(None, "TrainingJobNotFound", "TrainingJob 'mnist' not found; waiting for it")
    st = status(primary=missing)
    assert st.phase == "Pending" and st.observed_generation == 3
    assert (cond(st, "ModelResolved").status, cond(st, "ModelResolved").reason) == (
        "False",
        "TrainingJobNotFound",
    )
    assert cond(st, "Ready").reason == "ModelUnresolved"
    assert st.url == "http://digits.ns.svc.cluster.local/v2/models/digits"
    events = transition_events(InferenceServiceStatus(), st)
    assert any(e.type == "Warning" and e.reason == "TrainingJobNotFound" for e in events)


def test_ready_replicas_make_it_ready_with_the_jobs_checkpoint_as_version() -> None:
    st = status(primary_dep=dep(2, 2))
    assert st.phase == "Ready" and st.ready_replicas == 2
    assert st.model_version == "300"
    assert cond(st, "Ready").status == "True"


def test_no_version_is_claimed_without_ready_replicas_or_for_storage() -> None:
    assert status(primary_dep=dep(0)).model_version is None
    storage = Resolution(RESOLVED, "StorageConfigured", "ok")
    assert status(primary=storage, primary_dep=dep(1)).model_version is None


def test_losing_all_replicas_is_not_ready_and_pod_trouble_is_shown() -> None:
    was_ready = status(primary_dep=dep(1))
    st = status(old=was_ready, primary_dep=dep(0), trouble="pod digits-x: ImagePullBackOff: not found")
    assert st.phase == "NotReady"
    assert cond(st, "Ready").reason == "PodsNotStarting" and "ImagePullBackOff" in cond(st, "Ready").message
    assert [e.type for e in transition_events(was_ready, st) if e.reason == "PodsNotStarting"] == ["Warning"]


def test_unchanged_world_gives_unchanged_status_and_no_events() -> None:
    first = status(primary_dep=dep(1))
    again = status(old=first, primary_dep=dep(1))
    assert again == first
    assert transition_events(first, again) == []


def test_canary_condition_reports_the_real_share() -> None:
    s = spec(canary={"trafficPercent": 10, "model": {"fromTrainingJob": "v2"}})
    canary = Resolution(RESOLVED, "TrainingJobResolved", "ok", JOB)
    st = status(s=s, canary=canary, primary_dep=dep(1), canary_dep=dep(1), canary_wanted=1)
    c = cond(st, "CanaryReady")
    assert c.status == "True" and "~50%" in c.message and "asked 10%" in c.message
    assert st.canary_ready_replicas == 1

    at_100 = spec(canary={"trafficPercent": 100, "model": {"fromTrainingJob": "v2"}})
    only_canary = status(s=at_100, canary=canary, primary_dep=dep(1), canary_dep=dep(0), canary_wanted=1)
    assert only_canary.phase == "Pending"  # the Service selects canary pods only, and none is ready

    removed = status(old=st, primary_dep=dep(1))
    assert not any(c.type == "CanaryReady" for c in removed.conditions) and removed.canary_ready_replicas == 0


def test_a_fixed_spec_clears_invalid() -> None:
    old = InferenceServiceStatus.model_validate(
        {"phase": "Failed", "conditions": [{"type": "Invalid", "status": "True", "reason": "InvalidSpec"}]}
    )
    st = status(old=old, primary_dep=dep(0))
    assert st.phase == "Pending" and cond(st, "Invalid").status == "False"


def test_only_the_servers_own_answer_counts_as_its_reason() -> None:
    answer = '{"name": "mlp", "ready": false, "reason": "no checkpoint passed verification"}'
    assert server_reason(answer) == "no checkpoint passed verification"
    assert server_reason('{"error": "model mlp is not ready: loading"}') == "model mlp is not ready: loading"
    # the apiserver could not reach the pod (a server still importing torch): nothing about the model
    unreachable = (
        '{"kind":"Status","apiVersion":"v1","status":"Failure","message":"error trying to reach service:'
        ' dial tcp 10.0.0.2:8080: connect: connection refused","reason":"ServiceUnavailable","code":503}'
    )
    assert server_reason(unreachable) is None
    assert server_reason("<html>bad gateway</html>") is None and server_reason(None) is None


def test_servers_own_reports_give_the_unready_reason_and_the_served_version() -> None:
    """What the model servers answer through the apiserver's pod proxy outranks what the operator
    can infer: the reason a server refuses its checkpoint, and the version it really serves."""
    tampered = ServerReport(not_ready="pod digits-x: no usable checkpoint: step-000000300 refused (tampered)")
    st = plan_status(
        InferenceServiceStatus(),
        OWNER,
        spec(),
        3,
        Resolution(RESOLVED, "TrainingJobResolved", "ok", JOB),
        None,
        dep(0),
        None,
        0,
        None,
        NOW,
        tampered,
    )
    assert cond(st, "Ready").reason == "ModelNotLoaded" and "tampered" in cond(st, "Ready").message
    serving = ServerReport(versions=frozenset({"200", "1000"}))  # mid hot-swap: two replicas disagree
    st = plan_status(
        InferenceServiceStatus(),
        OWNER,
        spec(),
        3,
        Resolution(RESOLVED, "TrainingJobResolved", "ok", JOB),
        None,
        dep(2, 2),
        None,
        0,
        None,
        NOW,
        serving,
    )
    assert st.model_version == "200,1000", "the servers' word, not the job's last checkpoint (300)"


def test_a_server_that_cannot_be_placed_is_reported_by_its_volume_not_its_checkpoint() -> None:
    """A missing claim keeps every server off every node: the reason names the claim, and the Event
    says so, instead of blaming a checkpoint no server ever looked at."""
    missing = Trouble(
        "VolumeNotFound", "PersistentVolumeClaim 'models' not found: pod d-1 cannot be scheduled"
    )
    st = status(primary_dep=dep(0), placement=missing, trouble="pod d-1: ContainerCreating")
    ready = cond(st, "Ready")
    assert (st.phase, ready.status, ready.reason) == ("Pending", "False", "VolumeNotFound")
    assert "'models' not found" in ready.message and "checkpoint" not in ready.message
    events = transition_events(InferenceServiceStatus(), st)
    assert any(e.type == "Warning" and e.reason == "VolumeNotFound" for e in events)
    # Placed, the same servers' unreadiness is theirs to explain again.
    assert cond(status(primary_dep=dep(0)), "Ready").reason == "NoReadyReplicas"


def test_unready_servers_are_asked_again_until_they_say_why() -> None:
    """A server still starting answers nothing, and no pod event follows while its probe keeps failing:
    the InferenceService must not wait for the 5-minute resync to learn why it is not ready."""
    from aidc_operator.lifecycle import RESYNC_SECONDS
    from aidc_operator.serving_status import ASK_AGAIN_SECONDS, REASON_RECHECK_SECONDS, ask_again

    starting = ServerReport(unanswered=1)
    explained = ServerReport(not_ready="pod p: no checkpoint passed verification")
    assert ask_again(starting, ready=0) == ASK_AGAIN_SECONDS
    assert ask_again(explained, ready=0) == REASON_RECHECK_SECONDS
    assert ask_again(ServerReport(), ready=0) == RESYNC_SECONDS  # no running server to ask
    assert ask_again(starting, ready=1) == RESYNC_SECONDS  # serving: pod events tell us the rest
