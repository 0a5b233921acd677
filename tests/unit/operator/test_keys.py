"""Checkpoint key Secret decisions (pure): validation messages, rotation triggers, envelope, pruning."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from aidc_operator import keys
from aidc_operator.builders.common import Owner

OWNER = Owner("TrainingJob", "job", "ns", "uid")
NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)


def secret(**extra) -> dict:
    return keys.key_secret(OWNER, "job-ckpt-key", retain=True, now=NOW, **extra)


def test_new_secret_holds_one_random_key_and_retain_means_no_owner() -> None:
    a, b = secret(), secret()
    kid = keys.current_key_id(a)
    assert len(base64.b64decode(a["data"][f"key-{kid}"])) == 32
    assert a["data"][f"key-{kid}"] != b["data"][f"key-{keys.current_key_id(b)}"]
    assert "ownerReferences" not in a["metadata"]
    owned = keys.key_secret(OWNER, "job-ckpt-key", retain=False, now=NOW)
    assert owned["metadata"]["ownerReferences"][0]["uid"] == "uid"
    assert keys.check_key_secret(a, "job-ckpt-key", wrapped=False).ok


def test_kek_envelope_round_trip_and_mismatch() -> None:
    kek = os.urandom(32)
    s = secret(kek=kek)
    raw = base64.b64decode(s["data"][f"key-{keys.current_key_id(s)}"])
    assert len(raw) == 40 and len(aes_key_unwrap(kek, raw)) == 32
    assert keys.unwraps(s, kek) and not keys.unwraps(s, os.urandom(32))
    assert keys.check_key_secret(s, "job-ckpt-key", wrapped=True).ok
    bad = keys.check_key_secret(s, "job-ckpt-key", wrapped=False)
    assert not bad.ok and "40 bytes" in bad.message and "job-ckpt-key" in bad.message


def test_validation_names_the_secret_never_the_contents() -> None:
    s = secret()
    kid = keys.current_key_id(s)
    s["data"][f"key-{kid}"] = base64.b64encode(b"short-secret-bytes").decode()
    check = keys.check_key_secret(s, "job-ckpt-key", wrapped=False)
    assert check.reason == "KeySecretInvalid" and "short-secret-bytes" not in check.message
    assert keys.check_key_secret(None, "x", wrapped=False).reason == "KeySecretMissing"


def test_rotation_triggers() -> None:
    s = secret()
    assert keys.rotation_due(s, None, None, NOW) is None
    assert keys.rotation_due(s, "1h", None, NOW + dt.timedelta(minutes=59)) is None
    assert "rotateAfter=1h" in keys.rotation_due(s, "1h", None, NOW + dt.timedelta(hours=1))
    assert "requested" in keys.rotation_due(s, None, "v2", NOW)
    new_id, patch = keys.rotation_patch(s, NOW, "v2")
    s["metadata"]["annotations"].update(patch["metadata"]["annotations"])
    s["data"].update(patch["data"])
    assert keys.current_key_id(s) == new_id
    assert keys.rotation_due(s, None, "v2", NOW) is None, "the same request does not rotate twice"
    assert keys.duration_seconds("1h30m") == 5400


def test_pruning_follows_the_trainers_report() -> None:
    s = secret()
    old = keys.current_key_id(s)
    later = NOW + dt.timedelta(hours=1)
    new_id, patch = keys.rotation_patch(s, later, None)
    s["metadata"]["annotations"].update(patch["metadata"]["annotations"])
    s["data"].update(patch["data"])

    def report(when: dt.datetime, ids: list[str]) -> dict:
        return {"step": 1, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "keyIds": ids}

    assert keys.prunable_key_ids(s, report(later + dt.timedelta(seconds=5), [new_id])) == [old]
    assert keys.prunable_key_ids(s, report(later + dt.timedelta(seconds=5), [old, new_id])) == []
    assert keys.prunable_key_ids(s, report(later - dt.timedelta(seconds=5), [])) == [], "stale report"
    assert keys.prunable_key_ids(s, report(later + dt.timedelta(seconds=5), [old])) == []
    assert keys.prunable_key_ids(s, None) == []


def test_retention_decides_ownership_of_a_found_secret() -> None:
    kept = secret()  # an earlier Retain job's Secret: no owner
    action, patch = keys.ownership_change(kept, OWNER, retain=False)
    assert action == "own" and patch["metadata"]["ownerReferences"][0]["uid"] == "uid"
    assert keys.ownership_change(kept, OWNER, retain=True) is None
    owned = keys.key_secret(OWNER, "job-ckpt-key", retain=False, now=NOW)
    assert keys.ownership_change(owned, OWNER, retain=False) is None
    action, patch = keys.ownership_change(owned, OWNER, retain=True)
    assert action == "release" and patch["metadata"]["ownerReferences"] == [
        {"$patch": "delete", "uid": "uid"}
    ]
    # Only this job's reference counts: another (earlier) job's owner reference does not make it ours.
    other = keys.key_secret(
        Owner("TrainingJob", "job", "ns", "old-uid"), "job-ckpt-key", retain=False, now=NOW
    )
    assert keys.ownership_change(other, OWNER, retain=False)[0] == "own"


def test_predates_tells_an_earlier_jobs_secret_from_our_own() -> None:
    s = secret()  # made for OWNER (uid "uid")
    same_second = "2026-11-26T12:00:00Z"
    s["metadata"]["creationTimestamp"] = "2026-11-26T12:00:00+00:00"  # as the client's models render it
    # By the uid it was made for: exact even when the job was re-created within the same second.
    assert keys.predates(s, "new-uid", same_second)
    assert not keys.predates(s, "uid", "2026-11-26T12:00:01Z")
    # A Secret made before the annotation existed: by creation time.
    del s["metadata"]["annotations"][keys.ANNOTATION_CREATED_FOR]
    assert keys.predates(s, "new-uid", "2026-11-26T12:00:01Z")
    assert not keys.predates(s, "new-uid", same_second)
    assert not keys.predates(s, "new-uid", None)


def test_key_action_line_is_one_json_object_with_fixed_keys_and_ids_only() -> None:
    line = keys.key_action_line("rotate", "ns", "job", "job-ckpt-key", ["k2-abc123"], "requested")
    assert "\n" not in line
    assert json.loads(line) == {
        "action": "rotate",
        "namespace": "ns",
        "job": "job",
        "secret": "job-ckpt-key",
        "keyIds": ["k2-abc123"],
        "reason": "requested",
    }
    raw = os.urandom(32)
    leaky = [raw.hex(), base64.b64encode(raw).decode()]
    line = keys.key_action_line("retire", "ns", "job", "job-ckpt-key", leaky, "")
    assert json.loads(line)["keyIds"] == ["?", "?"]
    assert raw.hex() not in line and base64.b64encode(raw).decode() not in line
    with pytest.raises(ValueError):
        keys.key_action_line("leak", "ns", "job", "s", [], "")
