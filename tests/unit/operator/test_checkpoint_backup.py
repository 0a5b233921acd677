"""spec.checkpoint.backup on the operator side: what the pods mount and are told, what the webhook and the
reconciler refuse, what a started job cannot change, the pre-start claim check and status.lastBackup."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from aidc_operator import progress as pr
from aidc_operator.admission import default_trainingjob, trainingjob_edit_problems, validate_trainingjob
from aidc_operator.api.crd import trainingjob_crd
from aidc_operator.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import LABEL_ATTEMPT, LABEL_RANK, Owner
from aidc_operator.handlers import trainingjob as handler

OWNER = Owner("TrainingJob", "mnist", "team-a", "uid-123", {})
PRIMARY = {"persistentVolumeClaim": {"claimName": "ckpt"}}
BACKUP = {"persistentVolumeClaim": {"claimName": "ckpt-backup"}}


def _spec(backup: dict[str, Any] | None, volume: dict[str, Any] | None = PRIMARY, keep: int = 4) -> dict:
    ckpt: dict[str, Any] = {"keep": keep, "everySteps": 10}
    if volume is not None:
        ckpt["volume"] = volume
    if backup is not None:
        ckpt["backup"] = backup
    return {"nodes": 2, "checkpoint": ckpt}


def _container(spec: dict) -> dict[str, Any]:
    return build.pod(OWNER, TrainingJobSpec.model_validate(spec), rank=1, attempt=0)["spec"]["containers"][0]


def _env(spec: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in _container(spec)["env"]}


def test_pods_mount_the_backup_read_write_and_the_trainer_is_told_where_and_how_many() -> None:
    spec = _spec({"volume": BACKUP})
    pod = build.pod(OWNER, TrainingJobSpec.model_validate(spec), rank=1, attempt=0)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["checkpoint-backup"] == {**BACKUP, "name": "checkpoint-backup"}
    assert vols["checkpoints"] == {**PRIMARY, "name": "checkpoints"}
    mount = next(m for m in _container(spec)["volumeMounts"] if m["name"] == "checkpoint-backup")
    assert mount == {"name": "checkpoint-backup", "mountPath": "/checkpoint-backup"}  # no readOnly
    env = _env(spec)
    assert env["AIDC_CHECKPOINT_BACKUP_DIR"] == "/checkpoint-backup/mnist"
    assert env["AIDC_CHECKPOINT_BACKUP_KEEP"] == "4"  # spec.checkpoint.keep when backup.keep is unset
    assert _env(_spec({"volume": BACKUP, "keep": 9}))["AIDC_CHECKPOINT_BACKUP_KEEP"] == "9"


def test_without_a_backup_nothing_extra_is_rendered() -> None:
    spec = _spec(None)
    assert not [k for k in _env(spec) if "BACKUP" in k]
    assert not [m for m in _container(spec)["volumeMounts"] if m["name"] == "checkpoint-backup"]


@pytest.mark.parametrize(
    ("backup", "volume", "message"),
    [
        ({"volume": BACKUP}, None, "spec.checkpoint.backup: needs spec.checkpoint.volume"),
        (
            {"volume": PRIMARY},
            PRIMARY,
            "spec.checkpoint.backup.volume.persistentVolumeClaim.claimName: 'ckpt' is",
        ),
        (
            {"volume": {"emptyDir": {}}},
            PRIMARY,
            "spec.checkpoint.backup.volume: an emptyDir does not outlive",
        ),
        ({"volume": {}}, PRIMARY, "spec.checkpoint.backup.volume: needs exactly one volume source"),
        ({"volume": {"persistentVolumeClaim": {}}}, PRIMARY, "claimName: required"),
        ({"volume": BACKUP, "keep": 0}, PRIMARY, "keep"),
        ({"keep": 2}, PRIMARY, "volume"),
    ],
)
def test_invalid_backups_are_refused_naming_the_field(
    backup: dict, volume: dict | None, message: str
) -> None:
    problems = validate_trainingjob("mnist", default_trainingjob(_spec(backup, volume)))
    assert len(problems) == 1 and message in problems[0], problems


def test_a_valid_backup_passes() -> None:
    assert validate_trainingjob("mnist", default_trainingjob(_spec({"volume": BACKUP, "keep": 2}))) == []
    nfs = {"nfs": {"server": "nfs.example", "path": "/backups"}}
    assert validate_trainingjob("mnist", default_trainingjob(_spec({"volume": nfs}))) == []


def test_the_backup_is_frozen_once_the_job_started() -> None:
    started = {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}
    before, after = _spec(None), _spec({"volume": BACKUP})
    problems = trainingjob_edit_problems(
        {"spec": before, "status": started}, {"spec": after, "status": started}
    )
    assert problems and problems[0].startswith(
        "spec.checkpoint.backup cannot change once the job has started"
    )
    suspended = {**started, "phase": "Suspended"}
    assert trainingjob_edit_problems({"spec": before, "status": suspended}, {"spec": after}) == []
    rules = trainingjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert any(r.get("fieldPath") == ".spec.checkpoint.backup" for r in rules)


class _Core:
    def __init__(self, existing: set[str]) -> None:
        self.existing, self.asked = existing, []

    def read_namespaced_persistent_volume_claim(self, name: str, namespace: str) -> dict:
        self.asked.append(name)
        if name not in self.existing:
            raise ApiException(status=404)
        return {}


def test_the_pre_start_check_covers_the_backup_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TrainingJobSpec.model_validate(_spec({"volume": BACKUP}))
    core = _Core({"ckpt"})
    monkeypatch.setattr(handler.kubeio, "core", lambda: core)
    pre = handler._ensure_volume(OWNER, spec)
    assert pre is not None and pre.reason == "PersistentVolumeClaimMissing"
    assert "'ckpt-backup' not found (spec.checkpoint.backup.volume)" in pre.message
    core.existing.add("ckpt-backup")
    assert handler._ensure_volume(OWNER, spec) is None and core.asked == ["ckpt", "ckpt-backup"] * 2


def _pod(rank: int, annotations: dict[str, Any], attempt: int = 0) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"mnist-a{attempt}-{rank}",
            "labels": {LABEL_RANK: str(rank), LABEL_ATTEMPT: str(attempt)},
            "annotations": {k: v if isinstance(v, str) else json.dumps(v) for k, v in annotations.items()},
        }
    }


def test_the_backup_report_is_lifted_from_whichever_pod_rank_0_runs_in() -> None:
    # With a c10d rendezvous the trainer's global rank 0 may run in any pod of the gang.
    st = TrainingJobStatus()
    report = {"step": 40, "path": "/checkpoint-backup/mnist/step-000000040", "time": "2026-01-01T00:00:05Z"}
    pr.lift(st, [_pod(0, {}), _pod(1, {pr.ANNOTATION_BACKUP: report})], False)
    assert st.last_backup is not None
    dumped = st.model_dump(by_alias=True, mode="json", exclude_none=True)["lastBackup"]
    assert dumped == report
    pr.lift(st, [_pod(0, {pr.ANNOTATION_BACKUP: "{not json"})], False)  # garbled: ignored
    pr.lift(st, [_pod(0, {pr.ANNOTATION_BACKUP: {"path": "no step"}})], False)  # invalid: ignored
    assert st.last_backup.step == 40
    older = {"step": 30, "path": "x", "time": "2026-01-01T00:00:01Z"}  # a pod that was rank 0 before
    pr.lift(st, [_pod(0, {pr.ANNOTATION_BACKUP: older}), _pod(2, {pr.ANNOTATION_BACKUP: report})], False)
    assert st.last_backup.step == 40  # never back to an older copy
    pr.lift(st, [_pod(0, {pr.ANNOTATION_BACKUP: {**report, "step": 50}}, attempt=1)], False)
    assert st.last_backup.step == 50


def test_kubectl_get_wide_shows_the_backup_step() -> None:
    columns = trainingjob_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    backup = next(c for c in columns if c["name"] == "Backup")
    assert backup["jsonPath"] == ".status.lastBackup.step" and backup["priority"] == 1
