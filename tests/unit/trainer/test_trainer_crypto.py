"""aidc_trainer.crypto and aidc_trainer.keyring: chunked AES-256-GCM files and the mounted key ring."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from aidc_trainer.crypto import EncryptingWriter, decrypt_bytes, encrypt_bytes, read_header
from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError, WrongKeyError
from aidc_trainer.keyring import KeyRing

KEY = bytes(range(32))
RING = KeyRing({"k1": KEY}, "k1")
CHUNK = 1000


def _layout(blob: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Header length and (offset, length) of every record, parsed from the documented format."""
    hdr = len(read_header(io.BytesIO(blob)).raw)
    recs, off = [], hdr
    while off < len(blob):
        (n,) = struct.unpack(">I", blob[off : off + 4])
        recs.append((off, 4 + 12 + n))
        off += 4 + 12 + n
    return hdr, recs


def _enc(data: bytes, identity: str = "step-000000001/rank-0.bin") -> bytes:
    return encrypt_bytes(data, KEY, "k1", identity, chunk_size=CHUNK)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 17])
def test_round_trip_any_size(size: int) -> None:
    data = os.urandom(size)
    assert decrypt_bytes(_enc(data), RING, "step-000000001/rank-0.bin") == data


def test_streaming_writer_with_many_small_writes_matches_plaintext() -> None:
    data = os.urandom(7 * CHUNK + 3)
    out = io.BytesIO()
    with EncryptingWriter(out, KEY, "k1", "f", chunk_size=CHUNK) as w:
        for i in range(0, len(data), 77):
            w.write(data[i : i + 77])
    assert decrypt_bytes(out.getvalue(), RING, "f") == data
    assert len(_layout(out.getvalue())[1]) == 8  # 7 full chunks + final partial one


def test_nonces_are_fresh_so_equal_plaintexts_encrypt_differently() -> None:
    data = b"A" * (3 * CHUNK)
    assert _enc(data) != _enc(data)


def test_ciphertext_contains_no_plaintext_pattern() -> None:
    marker = b"AIDC-PLAINTEXT-MARKER-0123456789"
    blob = _enc(marker * 200)
    assert marker not in blob
    assert marker[:16] not in blob


def test_flipped_byte_is_reported_as_tampered() -> None:
    blob = bytearray(_enc(os.urandom(3 * CHUNK)))
    _, recs = _layout(bytes(blob))
    off, _ = recs[1]
    blob[off + 4 + 12 + 5] ^= 0x01
    with pytest.raises(CheckpointCorruptError, match=r"chunk 1 failed authentication") as e:
        decrypt_bytes(bytes(blob), RING)
    assert e.value.reason == "tampered"


def test_truncated_mid_chunk_is_reported_as_truncated() -> None:
    blob = _enc(os.urandom(3 * CHUNK))
    with pytest.raises(CheckpointCorruptError, match=r"truncated: chunk 2 is cut short") as e:
        decrypt_bytes(blob[:-10], RING)
    assert e.value.reason == "truncated"


def test_dropped_final_chunks_are_reported_as_truncated() -> None:
    blob = _enc(os.urandom(3 * CHUNK + 5))
    _, recs = _layout(blob)
    cut = recs[2][0]  # keep chunks 0 and 1 only: a clean cut at a record boundary
    with pytest.raises(
        CheckpointCorruptError, match=r"truncated: file ends after chunk 1, which is not the final"
    ):
        decrypt_bytes(blob[:cut], RING)


def test_swapped_chunks_are_reported_as_reordered() -> None:
    blob = _enc(os.urandom(3 * CHUNK + 5))
    hdr, recs = _layout(blob)
    (a0, an), (b0, bn) = recs[0], recs[1]
    swapped = blob[:hdr] + blob[b0 : b0 + bn] + blob[a0 : a0 + an] + blob[b0 + bn :]
    with pytest.raises(
        CheckpointCorruptError, match=r"position 0 is chunk 1 of this file \(chunks reordered\)"
    ) as e:
        decrypt_bytes(swapped, RING)
    assert e.value.reason == "reordered"


def test_appended_chunk_is_detected() -> None:
    blob = _enc(os.urandom(2 * CHUNK + 5))
    _, recs = _layout(blob)
    off, n = recs[0]
    with pytest.raises(CheckpointCorruptError, match="data appended after the final chunk 2"):
        decrypt_bytes(blob + blob[off : off + n], RING)


def test_wrong_key_names_the_key_id_and_not_the_key() -> None:
    other = os.urandom(32)
    with pytest.raises(WrongKeyError) as e:
        decrypt_bytes(_enc(b"x" * 100), KeyRing({"k1": other}, "k1"))
    msg = str(e.value)
    assert "'k1'" in msg and "not the key this file was encrypted with" in msg
    assert e.value.key_id == "k1"
    for secret in (other, KEY):
        assert secret.hex() not in msg and repr(secret) not in msg


def test_missing_key_id_is_a_key_error_naming_the_id() -> None:
    with pytest.raises(MissingKeyError, match=r"key id 'k1' is not in the key ring") as e:
        decrypt_bytes(_enc(b"x"), KeyRing({"k2": KEY}, "k2"))
    assert isinstance(e.value, KeyError)
    assert not isinstance(e.value, WrongKeyError)


def test_file_from_another_rank_is_rejected_by_identity() -> None:
    blob = _enc(b"rank one data", identity="step-000000001/rank-1.bin")
    with pytest.raises(CheckpointCorruptError, match=r"identity is 'step-000000001/rank-1.bin'") as e:
        decrypt_bytes(blob, RING, "step-000000001/rank-0.bin")
    assert e.value.reason == "identity"


def test_edited_header_identity_fails_authentication() -> None:
    blob = _enc(b"payload" * 50, identity="step-000000001/rank-1.bin")
    forged = blob.replace(b"step-000000001/rank-1.bin", b"step-000000001/rank-0.bin")
    with pytest.raises(CheckpointCorruptError, match="failed authentication"):
        decrypt_bytes(forged, RING, "step-000000001/rank-0.bin")


def test_garbage_is_not_mistaken_for_an_encrypted_file() -> None:
    with pytest.raises(CheckpointCorruptError, match="bad magic"):
        decrypt_bytes(b"PK\x03\x04 a zip file, not ours", RING)


# ---------------------------------------------------------------------------------------- KeyRing


def _secret_dir(tmp: Path, keys: dict[str, bytes], current: str) -> Path:
    """Lay the directory out like a kubelet Secret mount (timestamped dir + ..data symlinks)."""
    d = tmp / "keys"
    real = d / "..2026_11_26_00_00_00.1"
    real.mkdir(parents=True)
    (real / "current-key-id").write_text(current + "\n")
    for kid, raw in keys.items():
        (real / f"key-{kid}").write_bytes(raw)
    (d / "..data").symlink_to(real.name)
    for name in ["current-key-id", *(f"key-{k}" for k in keys)]:
        (d / name).symlink_to(f"..data/{name}")
    return d


def test_keyring_from_secret_mount(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    ring = KeyRing.from_dir(_secret_dir(tmp_path, {"v1": old, "v2": new}, "v2"))
    assert ring.current_id == "v2"
    assert ring.key("v2") == new and ring.key("v1") == old
    assert ring.ids() == ["v1", "v2"]
    assert new.hex() not in repr(ring)


def test_keyring_unwraps_keys_with_a_kek(tmp_path: Path) -> None:
    kek, key = os.urandom(32), os.urandom(32)
    d = _secret_dir(tmp_path, {"v1": aes_key_wrap(kek, key)}, "v1")
    (tmp_path / "kek").write_bytes(kek)
    ring = KeyRing.from_dir(d, tmp_path / "kek")
    assert ring.key("v1") == key
    # data written under the unwrapped key decrypts with a ring built from the plain key
    assert (
        decrypt_bytes(encrypt_bytes(b"hello", ring.key("v1"), "v1", "f"), KeyRing({"v1": key}, "v1"))
        == b"hello"
    )


def test_keyring_wrong_kek_is_a_wrong_key_error(tmp_path: Path) -> None:
    d = _secret_dir(tmp_path, {"v1": aes_key_wrap(os.urandom(32), os.urandom(32))}, "v1")
    (tmp_path / "kek").write_bytes(os.urandom(32))
    with pytest.raises(WrongKeyError, match=r"key 'v1' could not be unwrapped with the KEK"):
        KeyRing.from_dir(d, tmp_path / "kek")


def test_keyring_wrapped_key_without_kek_is_explained(tmp_path: Path) -> None:
    d = _secret_dir(tmp_path, {"v1": aes_key_wrap(os.urandom(32), os.urandom(32))}, "v1")
    with pytest.raises(MissingKeyError, match="looks wrapped"):
        KeyRing.from_dir(d)


def test_keyring_current_id_without_its_key_fails_at_startup(tmp_path: Path) -> None:
    d = _secret_dir(tmp_path, {"v1": os.urandom(32)}, "v2")
    with pytest.raises(MissingKeyError, match=r"key id 'v2' is not in the key ring"):
        KeyRing.from_dir(d)


def test_keyring_rejects_short_keys_and_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(MissingKeyError, match="expected 32"):
        KeyRing.from_dir(_secret_dir(tmp_path / "a", {"v1": b"short"}, "v1"))
    with pytest.raises(MissingKeyError, match="invalid key id"):
        KeyRing.from_dir(_secret_dir(tmp_path / "b", {"v1": os.urandom(32)}, "../etc/passwd"))
    with pytest.raises(MissingKeyError, match="does not exist"):
        KeyRing.from_dir(tmp_path / "nowhere")
