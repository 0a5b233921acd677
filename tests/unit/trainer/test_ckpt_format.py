"""aidc_trainer.checkpoint: format, verification, load_latest fallback, pruning, full disk."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aidc_trainer import checkpoint as C
from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError, WrongKeyError
from aidc_trainer.examples import mlp
from aidc_trainer.keyring import KeyRing

KEY = os.urandom(32)
RING = KeyRing({"k1": KEY}, "k1")
SPEC = {"factory": mlp.FACTORY, "config": {"in_features": 10, "hidden": 100, "num_classes": 10}}
ROOT = Path(__file__).resolve().parents[3]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp.build_model()


def _save(root: Path, step: int, ring: KeyRing | None = RING, keep: int = 10, seed: int = 0) -> C.SaveResult:
    m = _model(seed)
    res = C.save_checkpoint(root, step, {"model": m.state_dict()}, ring, SPEC, keep=keep)
    assert res.ok, res.error
    return res


def test_saved_checkpoint_follows_the_contract(tmp_path: Path) -> None:
    res = _save(tmp_path, 100)
    d = tmp_path / "step-000000100"
    assert res.path == d and sorted(p.name for p in d.iterdir()) == ["manifest.json", "rank-0.bin"]
    man = json.loads((d / "manifest.json").read_text())
    assert man["step"] == 100 and man["world_size"] == 1 and man["key_id"] == "k1"
    assert man["model"] == SPEC and man["time"].endswith("Z")
    assert man["files"]["rank-0.bin"]["size"] == (d / "rank-0.bin").stat().st_size
    assert len(man["files"]["rank-0.bin"]["sha256"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_server_can_rebuild_and_load_the_model(tmp_path: Path) -> None:
    _save(tmp_path, 5, seed=3)
    loaded = C.load_latest(tmp_path, RING)
    assert loaded is not None and loaded.step == 5
    model = C.build_model_from_manifest(loaded.manifest)
    model.load_state_dict(loaded.state["model"])
    x = torch.randn(4, 10)
    assert torch.equal(model(x), _model(3)(x))


def test_unencrypted_checkpoint_has_null_key_id_and_loads_without_keys(tmp_path: Path) -> None:
    _save(tmp_path, 1, ring=None)
    loaded = C.load_latest(tmp_path, None)
    assert loaded is not None and loaded.manifest["key_id"] is None


def test_encrypted_file_contains_no_plaintext_tensor_bytes(tmp_path: Path) -> None:
    m = _model()
    with torch.no_grad():
        m[0].weight.fill_(1.2345678)  # a known, recognisable byte pattern
    pattern = torch.full((8,), 1.2345678).numpy().tobytes()
    C.save_checkpoint(tmp_path / "enc", 1, {"model": m.state_dict()}, RING, SPEC)
    C.save_checkpoint(tmp_path / "plain", 1, {"model": m.state_dict()}, None, SPEC)
    assert pattern in (tmp_path / "plain/step-000000001/rank-0.bin").read_bytes()  # control
    assert pattern not in (tmp_path / "enc/step-000000001/rank-0.bin").read_bytes()


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_each_kind_of_damage_gets_its_own_message(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4, 5):
        _save(tmp_path, s)
    d = {s: tmp_path / f"step-{s:09d}" for s in (1, 2, 3, 4, 5)}
    _flip(d[2] / "rank-0.bin", 300)
    with pytest.raises(CheckpointCorruptError, match="sha256 does not match") as e:
        C.verify(d[2], RING)
    assert e.value.reason == "sha256"

    data = (d[3] / "rank-0.bin").read_bytes()
    (d[3] / "rank-0.bin").write_bytes(data[:-100])
    with pytest.raises(CheckpointCorruptError, match="truncated") as e:
        C.verify(d[3], RING)
    assert e.value.reason == "truncated"

    (d[4] / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"incomplete checkpoint: no manifest\.json"):
        C.verify(d[4], RING)

    with pytest.raises(WrongKeyError, match="'k1' is not the key this file was encrypted with"):
        C.verify(d[5], KeyRing({"k1": os.urandom(32)}, "k1"))
    with pytest.raises(MissingKeyError, match="'k1'"):
        C.verify(d[5], KeyRing({"k9": os.urandom(32)}, "k9"))
    with pytest.raises(MissingKeyError, match="no key is configured"):
        C.verify(d[5], None)
    assert C.verify(d[1], RING)["step"] == 1


def test_tampering_that_also_rewrites_the_manifest_hash_is_still_caught(tmp_path: Path) -> None:
    _save(tmp_path, 7)
    d = tmp_path / "step-000000007"
    _flip(d / "rank-0.bin", 500)
    man = json.loads((d / "manifest.json").read_text())
    import hashlib

    man["files"]["rank-0.bin"]["sha256"] = hashlib.sha256((d / "rank-0.bin").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointCorruptError, match="manifest authentication failed"):
        C.verify(d, RING)


def test_manifest_model_factory_cannot_be_swapped(tmp_path: Path) -> None:
    _save(tmp_path, 8)
    d = tmp_path / "step-000000008"
    man = json.loads((d / "manifest.json").read_text())
    man["model"]["factory"] = "os:system"
    (d / "manifest.json").write_text(json.dumps(man))
    assert C.load_latest(tmp_path, RING) is None  # never loaded, never imported


def test_load_latest_skips_corrupt_newest_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save(tmp_path, 10, seed=1)
    _save(tmp_path, 20, seed=2)
    _flip(tmp_path / "step-000000020" / "rank-0.bin", 100)
    with caplog.at_level(logging.WARNING, logger="aidc_trainer.checkpoint"):
        loaded = C.load_latest(tmp_path, RING)
    assert loaded is not None and loaded.step == 10
    assert torch.equal(loaded.state["model"]["0.weight"], _model(1).state_dict()["0.weight"])
    assert any("step-000000020" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)


def test_load_latest_refuses_to_fall_back_on_a_key_problem(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    with pytest.raises(WrongKeyError):
        C.load_latest(tmp_path, KeyRing({"k1": os.urandom(32)}, "k1"))


def test_keep_n_prunes_oldest_and_temp_dirs_are_invisible(tmp_path: Path) -> None:
    for s in range(1, 6):
        _save(tmp_path, s * 10, keep=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step-000000040", "step-000000050"]
    (tmp_path / ".tmp-step-000000060-dead").mkdir()
    assert [p.name for p in C.list_checkpoints(tmp_path)][-1] == "step-000000050"
    assert C.list_checkpoints(tmp_path / "missing") == []


def test_full_disk_during_save_keeps_previous_checkpoints(tmp_path: Path) -> None:
    """A real process whose file-size limit makes the second (large) save fail mid-write."""
    script = textwrap.dedent(
        f"""
        import os, resource, signal, sys, torch
        sys.path.insert(0, {str(ROOT / "trainer")!r})
        from aidc_trainer import checkpoint as C
        from aidc_trainer.keyring import KeyRing
        ring = KeyRing({{"k1": bytes.fromhex({KEY.hex()!r})}}, "k1")
        root = {str(tmp_path)!r}
        assert C.save_checkpoint(root, 1, {{"model": {{"w": torch.ones(1000)}}}}, ring).ok
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG like a full disk, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        res = C.save_checkpoint(root, 2, {{"model": {{"w": torch.ones(1_000_000)}}}}, ring)
        print("ok" if res.ok else "failed:" + res.error)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("failed:") and "File too large" in out.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000001"]  # no partial step-2, no temp dir
    loaded = C.load_latest(tmp_path, RING)
    assert loaded is not None and loaded.step == 1
