"""aidc_trainer.checkpoint_backup (one process): verified copies to the backup root, keep-N there, only
the newest while a copy runs, failures that do not stop training, and resume falling back to the backup."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from aidc_trainer import checkpoint as C
from aidc_trainer import checkpoint_backup as B
from aidc_trainer import checkpoint_resume as R
from aidc_trainer.config import load_config
from aidc_trainer.errors import CheckpointCorruptError, ConfigError, NoValidCheckpointError
from aidc_trainer.keyring import KeyRing
from aidc_trainer.progress import LAST_BACKUP, ProgressReporter

RING = KeyRing({"k1": os.urandom(32)}, "k1")


def _save(root: Path, step: int, ring: KeyRing = RING) -> Path:
    res = C.save_checkpoint(root, step, {"model": {"w": torch.full((256,), float(step))}}, ring, keep=100)
    assert res.ok and res.path is not None
    return res.path


def _flip(f: Path, at: int = 100) -> None:
    b = bytearray(f.read_bytes())
    b[at] ^= 1
    f.write_bytes(bytes(b))


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_copy_is_byte_identical_and_loads_from_the_backup(tmp_path: Path) -> None:
    src = _save(tmp_path / "primary", 10)
    path, size = B.copy_checkpoint(src, tmp_path / "backup")
    assert path == tmp_path / "backup" / "step-000000010"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == {p.name: p.read_bytes() for p in src.iterdir()}
    assert size == sum(p.stat().st_size for p in src.iterdir())
    loaded = C.load_checkpoint(path, RING)  # still encrypted, and still verifies where it landed
    assert torch.equal(loaded.state["model"]["w"], torch.full((256,), 10.0))
    assert _entries(tmp_path / "backup") == ["step-000000010"]  # no temp directory left


def test_a_damaged_source_is_detected_and_not_published(tmp_path: Path) -> None:
    src = _save(tmp_path / "primary", 10)
    _flip(src / "rank-0.bin")
    with pytest.raises(CheckpointCorruptError, match=r"rank-0\.bin: the copy does not match the manifest"):
        B.copy_checkpoint(src, tmp_path / "backup")
    assert _entries(tmp_path / "backup") == []


def test_a_copy_damaged_on_the_way_is_detected_and_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _save(tmp_path / "primary", 10)
    B.copy_checkpoint(src, tmp_path / "backup")  # an older good copy of the same step
    real_copy = shutil.copyfile

    def bitrot(a: Path, b: Path) -> None:
        real_copy(a, b)
        _flip(Path(b), 7)

    monkeypatch.setattr(B.shutil, "copyfile", bitrot)
    with pytest.raises(CheckpointCorruptError, match="the copy does not match"):
        B.copy_checkpoint(src, tmp_path / "backup")
    # The good copy stays in place; the bad one never got its step-… name.
    assert _entries(tmp_path / "backup") == ["step-000000010"]
    C.verify(tmp_path / "backup" / "step-000000010", RING)


def test_a_manifest_naming_files_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    src = _save(tmp_path / "primary", 10)
    m = json.loads((src / "manifest.json").read_text())
    m["files"]["../escape"] = {"size": 1, "sha256": "0" * 64}
    (src / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointCorruptError, match="bad file name"):
        B.copy_checkpoint(src, tmp_path / "backup")
    assert not (tmp_path / "escape").exists()


def test_writer_keeps_the_newest_n_in_the_backup(tmp_path: Path) -> None:
    copied: list[B.BackupResult] = []
    w = B.BackupWriter(tmp_path / "backup", keep=2, on_copied=copied.append)
    for step in (10, 20, 30):
        w.submit(_save(tmp_path / "primary", step))
        assert w.wait(timeout=60)
    w.close()
    assert [r.step for r in copied] == [10, 20, 30] and all(r.ok for r in copied)
    assert _entries(tmp_path / "backup") == ["step-000000020", "step-000000030"]


def test_checkpoints_landing_during_a_copy_are_skipped_but_the_newest(tmp_path: Path) -> None:
    release, first_done = threading.Event(), threading.Event()
    copied: list[int] = []

    def on_copied(res: B.BackupResult) -> None:  # runs while the writer still counts as busy
        copied.append(res.step)
        first_done.set()
        assert release.wait(60)

    w = B.BackupWriter(tmp_path / "backup", keep=10, on_copied=on_copied)
    w.submit(_save(tmp_path / "primary", 10))
    assert first_done.wait(60)
    for step in (20, 30, 40):  # land while the first copy is still in flight
        w.submit(_save(tmp_path / "primary", step))
    assert not w.wait(timeout=0)
    release.set()
    w.close(timeout=60)
    assert copied == [10, 40] and w.skipped == 2
    assert _entries(tmp_path / "backup") == ["step-000000010", "step-000000040"]


def test_a_failed_copy_is_logged_and_the_next_one_still_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backup = tmp_path / "backup"
    backup.write_text("not a directory")  # e.g. a volume that is not mounted writable
    w = B.BackupWriter(backup, keep=3)
    with caplog.at_level(logging.ERROR, logger="aidc_trainer.checkpoint"):
        w.submit(_save(tmp_path / "primary", 10))
        assert w.wait(timeout=60)
    assert w.failures == 1 and w.last is not None and not w.last.ok
    line = next(r for r in caplog.records if getattr(r, "event", "") == "checkpoint_backup_failed")
    assert "step-000000010" in line.getMessage() and "training carries on" in line.getMessage()
    backup.unlink()
    w.submit(_save(tmp_path / "primary", 20))
    w.close(timeout=60)
    assert w.last is not None and w.last.ok and _entries(backup) == ["step-000000020"]


def _backed_up(tmp_path: Path, steps: tuple[int, ...]) -> tuple[Path, Path]:
    primary, backup = tmp_path / "primary", tmp_path / "backup"
    for s in steps:
        B.copy_checkpoint(_save(primary, s), backup)
    return primary, backup


def test_resume_prefers_a_verifying_primary(tmp_path: Path) -> None:
    primary, backup = _backed_up(tmp_path, (10, 20))
    B.copy_checkpoint(_save(tmp_path / "elsewhere", 30), backup)  # a newer copy only in the backup
    loaded = R.resume(primary, RING, 0, 1, backup=backup)
    assert loaded is not None and loaded.path == primary / "step-000000020"


def test_resume_falls_back_to_the_backup_when_the_primary_is_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    primary, backup = _backed_up(tmp_path, (10, 20))
    shutil.rmtree(primary)
    with caplog.at_level(logging.WARNING, logger="aidc_trainer.checkpoint"):
        loaded = R.resume(primary, RING, 0, 1, backup=backup)
    assert loaded is not None and loaded.path == backup / "step-000000020" and loaded.step == 20
    assert torch.equal(loaded.state["model"]["w"], torch.full((256,), 20.0))
    msg = next(r.getMessage() for r in caplog.records if getattr(r, "event", "") == "resume_from_backup")
    assert "step-000000020" in msg and "has no checkpoint" in msg


def test_resume_falls_back_when_every_primary_checkpoint_is_damaged(tmp_path: Path) -> None:
    primary, backup = _backed_up(tmp_path, (10, 20))
    _flip(primary / "step-000000020" / "rank-0.bin")
    (primary / "step-000000010" / "manifest.json").unlink()
    before = sorted(p.name for p in primary.iterdir())
    loaded = R.resume(primary, RING, 0, 1, on_no_valid="Fail", backup=backup)
    assert loaded is not None and loaded.path == backup / "step-000000020"
    assert sorted(p.name for p in primary.iterdir()) == before  # the damaged ones stay for a person


def test_nothing_verifies_anywhere_applies_the_policy(tmp_path: Path) -> None:
    primary, backup = _backed_up(tmp_path, (10,))
    _flip(primary / "step-000000010" / "rank-0.bin")
    _flip(backup / "step-000000010" / "rank-0.bin")
    with pytest.raises(NoValidCheckpointError, match="1 checkpoint"):
        R.resume(primary, RING, 0, 1, on_no_valid="Fail", backup=backup)
    assert (primary / "step-000000010").exists() and (backup / "step-000000010").exists()
    # StartFresh moves the damaged ones aside in both roots (a stale copy must not outrank new ones).
    assert R.resume(primary, RING, 0, 1, on_no_valid="StartFresh", backup=backup) is None
    for root in (primary, backup):
        assert [p.name.startswith("damaged-") for p in root.iterdir()] == [True]
    assert R.resume(tmp_path / "none", RING, 0, 1, backup=tmp_path / "none2") is None  # first start


def test_key_ids_of_backup_copies_are_retained(tmp_path: Path) -> None:
    old = KeyRing({"k1": RING.key("k1")}, "k1")
    primary, backup = _backed_up(tmp_path, (10,))
    new = KeyRing({"k1": RING.key("k1"), "k2": os.urandom(32)}, "k2")
    _save(primary, 20, new)
    shutil.rmtree(primary / "step-000000010")  # pruned on the primary, still in the backup
    ck = C.Checkpointer(primary, keyring=old, backup_root=backup)
    assert ck.retained_key_ids() == ["k1", "k2"]


def test_backup_settings_and_report(tmp_path: Path) -> None:
    cfg = load_config(
        [],
        {"AIDC_CHECKPOINT_DIR": "/c", "AIDC_CHECKPOINT_BACKUP_DIR": "/b", "AIDC_CHECKPOINT_BACKUP_KEEP": "5"},
    )
    assert (cfg.checkpoint_backup_dir, cfg.checkpoint_backup_keep) == ("/b", 5)
    with pytest.raises(ConfigError, match="needs checkpoint_dir"):
        load_config(["--checkpoint-backup-dir", "/b"], {})
    with pytest.raises(ConfigError, match="must differ"):
        load_config(["--checkpoint-dir", "/c", "--checkpoint-backup-dir", "/c/"], {})
    reporter = ProgressReporter(str(tmp_path), environ={})
    cfg = load_config(["--checkpoint-dir", str(tmp_path), "--checkpoint-backup-dir", str(tmp_path / "b")], {})
    w = B.writer_for(cfg, "0", reporter)
    assert w is not None and w.keep == 3  # the checkpoint's keep when none is given
    assert B.writer_for(cfg, "0", None) is None  # ranks other than 0
    w.submit(_save(tmp_path, 10))
    w.close(timeout=60)
    reporter.close()
    report = json.loads((tmp_path / "progress.json").read_text())[LAST_BACKUP]
    assert report["step"] == 10 and report["path"] == str(tmp_path / "b" / "step-000000010")
