"""Backup copies (spec.checkpoint.backup) with the real trainer CLI: two gloo ranks on CPU, encrypted
checkpoints; the primary checkpoint directory is wiped between runs and the next run resumes from the
backup's newest copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aidc_trainer.checkpoint import list_checkpoints, verify
from aidc_trainer.keyring import KeyRing
from tests.integration.trainer.trainer_harness import Node, events, make_keys, trainer_env

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, name: str, steps: int, ck: Path, backup: Path, keys: Path, parallel: str) -> Path:
    log = tmp_path / f"{name}.log"
    args = ["--parallel", parallel, "--steps", str(steps), "--batch-size", "16", "--eval-every", "0"]
    args += ["--log-every", "5"]
    args += ["--checkpoint-dir", str(ck), "--checkpoint-every-steps", "10", "--checkpoint-keep", "2"]
    args += ["--checkpoint-backup-dir", str(backup), "--checkpoint-backup-keep", "3"]
    node = Node(log, args, nproc=2, env=trainer_env(AIDC_KEY_DIR=str(keys)))
    assert node.wait(timeout=400) == 0, log.read_text()[-3000:]
    return log


def _steps(root: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(root)]


# ddp: rank 0's single-writer layout; fsdp: every rank's DCP shards. The copy is the same for both.
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_wiped_checkpoint_volume_resumes_from_the_backup(tmp_path: Path, parallel: str) -> None:
    ck, backup, keys = tmp_path / "ck", tmp_path / "backup", make_keys(tmp_path)
    ring = KeyRing.from_dir(str(keys))

    first = _run(tmp_path, "first", 40, ck, backup, keys, parallel)
    # The final checkpoint is always copied before the run ends; earlier ones may be skipped while a
    # copy is in flight (only the newest waits), and the backup keeps its own 3.
    copied = _steps(backup)
    assert copied[-1] == 40 and set(copied) <= {10, 20, 30, 40} and len(copied) <= 3, copied
    assert _steps(ck) == [30, 40]  # the primary keeps its own 2
    for path in list_checkpoints(backup):
        verify(path, ring)  # every copy verifies where it landed (manifest MAC, sha256, every GCM tag)
        manifest = json.loads((path / "manifest.json").read_text())
        assert sorted(p.name for p in path.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert [e["step"] for e in events(first, "checkpoint_backup")][-1] == 40
    report = json.loads((ck / "progress.json").read_text())["aidc.dev/last-backup"]
    assert report["step"] == 40 and report["path"] == str(backup / "step-000000040")

    for entry in ck.iterdir():  # the primary volume loses everything
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    second = _run(tmp_path, "second", 60, ck, backup, keys, parallel)
    fallback = events(second, "resume_from_backup")
    assert len(fallback) == 1 and fallback[0]["step"] == 40
    assert "resuming from the backup copy step-000000040" in fallback[0]["msg"]
    resumed = events(second, "resume")
    assert resumed and resumed[0]["step"] == 40 and resumed[0]["path"] == str(backup / "step-000000040")
    done = events(second, "done")
    assert done and done[0]["steps_run"] == 20
    assert _steps(ck) == [50, 60] and _steps(backup)[-1] == 60
