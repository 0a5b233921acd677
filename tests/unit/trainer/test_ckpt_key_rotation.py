"""Key rotation as the trainer and server see it: the operator adds a key to the mounted Secret and
points current-key-id at it; checkpoints written before and after both load from that directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aidc_trainer import checkpoint as C
from aidc_trainer.examples import mlp
from aidc_trainer.keyring import KeyRing

SPEC = {"factory": mlp.FACTORY, "config": {"in_features": 10, "hidden": 100, "num_classes": 10}}


def mount(key_dir: Path, keys: dict[str, bytes], current: str) -> KeyRing:
    """What the kubelet writes for the key Secret (one file per data entry)."""
    key_dir.mkdir(exist_ok=True)
    for kid, key in keys.items():
        (key_dir / f"key-{kid}").write_bytes(key)
    (key_dir / "current-key-id").write_text(current)
    return KeyRing.from_dir(key_dir)


def test_checkpoints_before_and_after_rotation_both_load(tmp_path: Path) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    ckpt, keys = tmp_path / "ckpt", tmp_path / "keys"
    torch.manual_seed(1)
    before = mlp.build_model()
    assert C.save_checkpoint(
        ckpt, 100, {"model": before.state_dict()}, mount(keys, {"k1-a": k1}, "k1-a"), SPEC
    ).ok
    rotated = mount(keys, {"k1-a": k1, "k2-b": k2}, "k2-b")  # the Secret after rotation
    torch.manual_seed(2)
    after = mlp.build_model()
    assert C.save_checkpoint(ckpt, 200, {"model": after.state_dict()}, rotated, SPEC).ok

    assert C.peek_key_id(ckpt / "step-000000100" / "rank-0.bin") == "k1-a"
    assert C.peek_key_id(ckpt / "step-000000200" / "rank-0.bin") == "k2-b"
    for step, model in ((100, before), (200, after)):
        loaded = C.load_checkpoint(ckpt / C.step_dir_name(step), rotated)
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state["model"][name], tensor), (step, name)
    assert C.load_latest(ckpt, rotated).step == 200
