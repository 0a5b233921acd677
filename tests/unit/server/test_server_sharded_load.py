"""The server's loader for DCP-layout checkpoints: verified, decrypted in memory, no code from the volume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from aidc_trainer import checkpoint_publish as publish
from aidc_trainer import checkpoint_sharded as sharded
from aidc_trainer.checkpoint_format import step_dir_name
from aidc_trainer.checkpoint_sharded_load import load_servable, read_dcp_metadata
from aidc_trainer.dcp_storage import EncryptedWriter
from aidc_trainer.errors import CheckpointCorruptError, WrongKeyError
from aidc_trainer.examples import mlp
from aidc_trainer.keyring import KeyRing
from aidc_trainer.model_registry import ModelRegistry

SPEC = {"factory": mlp.FACTORY, "config": {"in_features": 10, "hidden": 100, "num_classes": 10}}


def keyring(where: Path, key_id: str = "k1") -> KeyRing:
    where.mkdir(parents=True, exist_ok=True)
    (where / f"key-{key_id}").write_bytes(os.urandom(32))
    (where / "current-key-id").write_text(key_id)
    return KeyRing.from_dir(where)


def write_manifest(step_dir: Path, step: int, files: dict[str, Any], ring: KeyRing | None) -> None:
    """The manifest of the DCP layout, written by the trainer's own writer."""
    key_id = ring.current_id if ring is not None else None
    header = {"format": sharded.FORMAT, "layout": sharded.LAYOUT, "parallelism": "fsdp"}
    publish.write_manifest(step_dir, step, 1, files, key_id, ring, SPEC, {}, header)


def save_dcp(root: Path, step: int, ring: KeyRing | None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = mlp.build_model(**SPEC["config"])
    step_dir = root / step_dir_name(step)
    writer = EncryptedWriter(step_dir, ring, step)
    state = {"model": model.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}}
    dcp.save(state, storage_writer=writer, no_dist=True)
    write_manifest(step_dir, step, writer.files(), ring)
    return model


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_encrypted_dcp_checkpoint_loads_bitwise(tmp_path: Path) -> None:
    ring = keyring(tmp_path / "keys")
    saved = save_dcp(tmp_path / "ck", 7, ring, seed=3)
    shard = tmp_path / "ck" / "step-000000007" / "__0_0.distcp"
    weight = next(iter(saved.state_dict().values()))
    assert weight.numpy().tobytes()[:64] not in shard.read_bytes()  # encrypted at rest
    loaded = load_servable(tmp_path / "ck" / "step-000000007", ring)
    assert loaded.step == 7
    assert_same_params(loaded.module, saved)


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_tampered_file_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    ring = keyring(tmp_path / "keys")
    save_dcp(tmp_path / "ck", 7, ring)
    path = tmp_path / "ck" / "step-000000007" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=name) as err:
        load_servable(path.parent, ring)
    assert err.value.reason == "sha256"


def test_wrong_key_is_the_clear_error_of_today(tmp_path: Path) -> None:
    save_dcp(tmp_path / "ck", 7, keyring(tmp_path / "keys"))
    with pytest.raises(WrongKeyError):
        load_servable(tmp_path / "ck" / "step-000000007", keyring(tmp_path / "other"))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_pickled_code_in_unencrypted_metadata_never_runs(tmp_path: Path) -> None:
    save_dcp(tmp_path / "ck", 7, None)
    step_dir = tmp_path / "ck" / "step-000000007"
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_Payload(marker))
    (step_dir / ".metadata").write_bytes(payload)
    # An unencrypted manifest has no MAC: the writer of the volume fixes up the sha256 too.
    manifest = json.loads((step_dir / "manifest.json").read_text())
    files = manifest["files"]
    files[".metadata"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    write_manifest(step_dir, 7, files, None)
    with pytest.raises(CheckpointCorruptError, match="not allowed in DCP metadata"):
        load_servable(step_dir, None, ModelRegistry())
    assert not marker.exists()
    pickle.loads(payload)  # what DCP's own reader would have done
    assert marker.exists()


def test_metadata_unpickler_refuses_dotted_paths_out_of_allowed_modules(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    def text(t: str) -> bytes:
        return b"\x8c" + bytes([len(t)]) + t.encode()

    # protocol 4: module, "attribute.path" (STACK_GLOBAL), (command,) REDUCE: os.system via metadata's imports
    payload = (
        b"\x80\x04"
        + text("torch.distributed.checkpoint.metadata")
        + text("torch.serialization.os.system")
        + b"\x93"
        + text(f"touch {marker}")
        + b"\x85R."
    )
    with pytest.raises(CheckpointCorruptError, match="not allowed in DCP metadata"):
        read_dcp_metadata(io.BytesIO(payload))
    assert not marker.exists()
    pickle.loads(payload)  # plain pickle would have run it
    assert marker.exists()
