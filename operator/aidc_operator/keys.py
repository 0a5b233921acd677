"""Checkpoint key lifecycle: the per-job data-key Secret (layout in docs/contracts.md).

Pure builders and validators; the reconciler does the API calls. Key material is created here with the
OS CSPRNG and never leaves the Secret's data: errors and events name the Secret, never its contents.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from .builders.common import LABEL_JOB, Owner, metadata

KEY_BYTES = 32
WRAPPED_KEY_BYTES = KEY_BYTES + 8  # RFC 3394 key wrap adds one 64-bit block
CURRENT = "current-key-id"
LABEL_KEY_FOR = "aidc.dev/checkpoint-key-for"
ANNOTATION_CREATED = "aidc.dev/key-created-at"
# The uid of the job that made the Secret: tells a key kept from an earlier job of the same name from
# one this job made in a pass that failed before its status said so (creation times have 1 s grain).
ANNOTATION_CREATED_FOR = "aidc.dev/key-created-for-uid"
# On the TrainingJob: set (or change) to any value to rotate the key once; the Secret remembers the
# last value it acted on, so a GitOps re-apply of the same value does not rotate again.
ANNOTATION_ROTATE = "aidc.dev/rotate-key"
ANNOTATION_ROTATED_FOR = "aidc.dev/rotated-for"
_DURATION = re.compile(r"([0-9]+)(ns|us|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")  # a 256-bit key written as hex: never a key id in a log


def new_key_id(generation: int) -> str:
    return f"k{generation}-{secrets.token_hex(3)}"


def key_secret(
    owner: Owner, name: str, retain: bool, now: dt.datetime, kek: bytes | None = None
) -> dict[str, Any]:
    """A fresh Secret holding one random AES-256 data key, wrapped with the KEK when one is given (the
    envelope: whoever reads the Secret also needs the KEK). Retained keys get no owner reference, so
    deleting the job leaves them (and its checkpoints readable); the label finds them again."""
    key_id = new_key_id(1)
    key = secrets.token_bytes(KEY_BYTES)
    if kek is not None:
        key = aes_key_wrap(kek, key)
    meta = metadata(
        owner,
        name,
        {LABEL_JOB: owner.name, LABEL_KEY_FOR: owner.name},
        annotations={
            ANNOTATION_CREATED: now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            ANNOTATION_CREATED_FOR: owner.uid,
        },
    )
    if retain:
        meta.pop("ownerReferences")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {
            CURRENT: base64.b64encode(key_id.encode()).decode(),
            f"key-{key_id}": base64.b64encode(key).decode(),
        },
    }


@dataclass(frozen=True)
class KeyCheck:
    ok: bool
    reason: str
    message: str
    key_id: str | None = None


def check_key_secret(secret: dict[str, Any] | None, name: str, wrapped: bool) -> KeyCheck:
    """Is this Secret a usable key Secret? The message names the Secret and the missing piece only."""
    if secret is None:
        return KeyCheck(False, "KeySecretMissing", f"checkpoint key Secret {name!r} not found")
    data = secret.get("data") or {}
    try:
        key_id = base64.b64decode(data.get(CURRENT, "")).decode().strip()
    except (ValueError, UnicodeDecodeError):
        key_id = ""
    if not KEY_ID.match(key_id):
        return KeyCheck(
            False,
            "KeySecretInvalid",
            f"Secret {name!r} has no valid {CURRENT!r} entry (a key id of [A-Za-z0-9._-])",
        )
    raw = data.get(f"key-{key_id}")
    if raw is None:
        return KeyCheck(False, "KeySecretInvalid", f"Secret {name!r} has no entry 'key-{key_id}'")
    size = len(base64.b64decode(raw))
    want = WRAPPED_KEY_BYTES if wrapped else KEY_BYTES
    if size != want:
        what = "a KEK-wrapped 256-bit key" if wrapped else "a 256-bit key"
        return KeyCheck(
            False,
            "KeySecretInvalid",
            f"Secret {name!r} entry 'key-{key_id}' is {size} bytes; {what} is {want} bytes",
        )
    return KeyCheck(True, "KeyReady", f"checkpoint key {key_id} in Secret {name!r}", key_id)


def check_kek_secret(secret: dict[str, Any] | None, name: str) -> KeyCheck:
    if secret is None:
        return KeyCheck(False, "KEKSecretMissing", f"key-encryption key Secret {name!r} not found")
    raw = (secret.get("data") or {}).get("kek")
    if raw is None or len(base64.b64decode(raw)) != KEY_BYTES:
        return KeyCheck(
            False, "KEKSecretInvalid", f"Secret {name!r} needs an entry 'kek' of {KEY_BYTES} bytes"
        )
    return KeyCheck(True, "KEKReady", f"key-encryption key in Secret {name!r}")


def duration_seconds(text: str) -> float:
    """Go-style duration ('720h', '1h30m') in seconds."""
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text))


def current_key_id(secret: dict[str, Any]) -> str:
    return base64.b64decode(secret["data"][CURRENT]).decode().strip()


def rotation_due(
    secret: dict[str, Any], rotate_after: str | None, request: str | None, now: dt.datetime
) -> str | None:
    """Why the key should rotate now (None: it should not)."""
    annotations = secret["metadata"].get("annotations") or {}
    if request and request != annotations.get(ANNOTATION_ROTATED_FOR):
        return f"requested by annotation {ANNOTATION_ROTATE}={request!r}"
    created = annotations.get(ANNOTATION_CREATED)
    if rotate_after and created:
        age = (now - dt.datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()
        if age >= duration_seconds(rotate_after):
            return f"key older than rotateAfter={rotate_after}"
    return None


def rotation_patch(
    secret: dict[str, Any], now: dt.datetime, request: str | None, kek: bytes | None = None
) -> tuple[str, dict[str, Any]]:
    """(new key id, merge patch) adding a fresh key and making it current. Old keys stay: checkpoints
    written with them must remain readable until they are pruned."""
    generation = len([k for k in secret.get("data") or {} if k.startswith("key-")]) + 1
    key_id = new_key_id(generation)
    key = secrets.token_bytes(KEY_BYTES)
    if kek is not None:
        key = aes_key_wrap(kek, key)
    annotations = {ANNOTATION_CREATED: now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if request:
        annotations[ANNOTATION_ROTATED_FOR] = request
    return key_id, {
        "metadata": {"annotations": annotations},
        "data": {
            CURRENT: base64.b64encode(key_id.encode()).decode(),
            f"key-{key_id}": base64.b64encode(key).decode(),
        },
    }


def prunable_key_ids(secret: dict[str, Any], last_checkpoint: dict[str, Any] | None) -> list[str]:
    """Key ids no retained checkpoint uses any more, by the trainer's latest report. Only a report made
    after the latest rotation counts (an older one cannot know about checkpoints written since), and
    the current key is never pruned."""
    if not last_checkpoint or not last_checkpoint.get("keyIds") or not last_checkpoint.get("time"):
        return []
    created = (secret["metadata"].get("annotations") or {}).get(ANNOTATION_CREATED)
    if not created or last_checkpoint["time"] <= created:  # RFC 3339 UTC strings sort by time
        return []
    keep = set(last_checkpoint["keyIds"]) | {current_key_id(secret)}
    return sorted(k[4:] for k in secret.get("data") or {} if k.startswith("key-") and k[4:] not in keep)


def unwraps(secret: dict[str, Any], kek: bytes) -> bool:
    """Does the KEK unwrap the current key? (RFC 3394 carries an integrity check.)"""
    try:
        aes_key_unwrap(kek, base64.b64decode(secret["data"][f"key-{current_key_id(secret)}"]))
    except (InvalidUnwrap, KeyError, ValueError):
        return False
    return True


def ownership_change(secret: dict[str, Any], owner: Owner, retain: bool) -> tuple[str, dict[str, Any]] | None:
    """What keyRetention asks of an operator-managed key Secret found in the cluster: ("own", patch)
    adds this job's owner reference (Delete: garbage-collected with the job), ("release", patch) drops
    it (Retain: outlives the job); None when the Secret already matches. A Secret kept by an earlier
    Retain job of this name must not silently outlive a job that says Delete. Strategic merge patches
    (ownerReferences merge by uid): other owners are left alone."""
    refs = secret["metadata"].get("ownerReferences") or []
    ours = any(r.get("uid") == owner.uid for r in refs)
    if retain and ours:
        return "release", {"metadata": {"ownerReferences": [{"$patch": "delete", "uid": owner.uid}]}}
    if not retain and not ours:
        return "own", {"metadata": {"ownerReferences": [owner.reference()]}}
    return None


def predates(secret: dict[str, Any], job_uid: str, job_created: str | None) -> bool:
    """Was this Secret made before the job existed, i.e. kept from an earlier job of the same name?"""
    made_for = (secret["metadata"].get("annotations") or {}).get(ANNOTATION_CREATED_FOR)
    if made_for:
        return made_for != job_uid
    # A Secret from before the annotation existed: by creation time (1 s grain, so a job re-created
    # within the same second as its predecessor's key reads as not earlier: no Event, nothing else).
    made = secret["metadata"].get("creationTimestamp")
    if not made or not job_created:
        return False

    def when(t: str) -> dt.datetime:  # "...Z" from raw JSON, "...+00:00" from the client's models
        return dt.datetime.fromisoformat(str(t).replace("Z", "+00:00"))

    return when(made) < when(job_created)


KEY_ACTIONS = ("create", "adopt", "own", "release", "rotate", "retire", "refuse")


def key_action_line(
    action: str, namespace: str, job: str, secret: str, key_ids: list[str] | tuple[str, ...], reason: str
) -> str:
    """One key action as one JSON line with fixed keys, for log pipelines and a trail that outlives
    Events. Key ids only (names of entries, never their bytes): anything not shaped like a key id is
    masked, so a caller's mistake cannot leak material through this line."""
    if action not in KEY_ACTIONS:
        raise ValueError(f"unknown key action {action!r}")
    ids = [k if KEY_ID.match(k) and not _HEX_KEY.match(k) else "?" for k in key_ids]
    return json.dumps(
        {
            "action": action,
            "namespace": namespace,
            "job": job,
            "secret": secret,
            "keyIds": ids,
            "reason": reason,
        },
        separators=(",", ":"),
    )
