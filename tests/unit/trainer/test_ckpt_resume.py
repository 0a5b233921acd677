"""aidc_trainer.checkpoint_resume (one process): which checkpoint resumes, and the policy when
checkpoints exist but none verifies."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from aidc_trainer import checkpoint as C
from aidc_trainer import checkpoint_resume as R
from aidc_trainer.config import load_config
from aidc_trainer.errors import ConfigError, MissingKeyError, NoValidCheckpointError
from aidc_trainer.keyring import KeyRing

RING = KeyRing({"k1": os.urandom(32)}, "k1")


def _save(root: Path, step: int) -> None:
    assert C.save_checkpoint(root, step, {"model": {"w": torch.full((64,), float(step))}}, RING, keep=10).ok


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _damage_all(root: Path) -> None:
    (root / "step-000000010/manifest.json").unlink()
    f = root / "step-000000020/rank-0.bin"
    b = bytearray(f.read_bytes())
    b[100] ^= 1
    f.write_bytes(bytes(b))


def test_resume_takes_the_newest_that_verifies_and_moves_nothing(tmp_path: Path) -> None:
    for s in (10, 20, 30):
        _save(tmp_path, s)
    (tmp_path / "step-000000030/manifest.json").unlink()
    loaded = R.resume(tmp_path, RING, 0, 1, on_no_valid="StartFresh")
    assert loaded is not None and loaded.step == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("damaged-")]
    assert R.resume(tmp_path / "empty", RING, 0, 1) is None  # nothing there: a first start


def test_none_verifies_fails_with_reasons_and_touches_nothing(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    _damage_all(tmp_path)
    before = _digest(tmp_path)
    with pytest.raises(NoValidCheckpointError, match="2 checkpoint") as e:
        R.resume(tmp_path, RING, 0, 1)
    reasons = dict(e.value.checkpoints)
    assert list(reasons) == ["step-000000020", "step-000000010"]
    assert reasons["step-000000020"].startswith("sha256: rank-0.bin: sha256 does not match")
    assert reasons["step-000000010"] == "manifest: incomplete checkpoint: no manifest.json"
    assert str(tmp_path) not in reasons["step-000000020"]  # relative: the entry names the directory
    assert _digest(tmp_path) == before


def test_a_key_problem_is_never_no_valid_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    (tmp_path / "step-000000020/manifest.json").unlink()
    with pytest.raises(MissingKeyError, match="is not the key this file was encrypted with"):
        R.resume(tmp_path, KeyRing({"k1": os.urandom(32)}, "k1"), 0, 1, on_no_valid="StartFresh")
    with pytest.raises(MissingKeyError):
        R.resume(tmp_path, None, 0, 1)
    assert len(C.list_checkpoints(tmp_path)) == 2  # nothing moved


def test_start_fresh_moves_them_aside_with_their_bytes(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    _damage_all(tmp_path)
    (tmp_path / "progress.json").write_text("{}")
    before = _digest(tmp_path)
    assert R.resume(tmp_path, RING, 0, 1, on_no_valid="StartFresh") is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("damaged-")]
    assert len(aside) == 1 and C.list_checkpoints(tmp_path) == []
    moved = {k: v for k, v in before.items() if k.startswith("step-")}
    assert _digest(aside[0]) == moved and (tmp_path / "progress.json").read_text() == "{}"


def test_move_aside_never_reuses_a_directory(tmp_path: Path) -> None:
    for name in ("step-000000001", "step-000000002"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    a = R.move_aside(tmp_path, ["step-000000001"])
    b = R.move_aside(tmp_path, ["step-000000002"])  # same second: a new name, nothing merged
    assert a != b and (a / "step-000000001/f").read_text() == "step-000000001"
    assert (b / "step-000000002/f").read_text() == "step-000000002"


def test_policy_comes_from_env_or_flag_and_is_checked() -> None:
    assert load_config([], {}).on_no_valid_checkpoint == "Fail"
    env = {"AIDC_ON_NO_VALID_CHECKPOINT": "StartFresh"}
    assert load_config([], env).on_no_valid_checkpoint == "StartFresh"
    assert load_config(["--on-no-valid-checkpoint", "Fail"], env).on_no_valid_checkpoint == "Fail"
    with pytest.raises(ConfigError, match=r"Fail\|StartFresh"):
        load_config(["--on-no-valid-checkpoint", "startfresh"], {})
