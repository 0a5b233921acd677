"""The TrainingJob's checkpoint key Secret, checked when a gang is about to start: created once, adopted
from an earlier job of the same name, owned or released as keyRetention says, rotated and pruned. Every
decision is an Event and one JSON log line (keys.key_action_line); no key byte is ever in either."""

from __future__ import annotations

import base64
import datetime as dt
import logging
from typing import Any

from .. import keys, kubeio, lifecycle
from ..api.trainingjob import TrainingJobSpec
from ..builders import trainingjob as build
from ..builders.common import Owner
from ..keys import check_kek_secret, check_key_secret, key_secret

key_log = logging.getLogger("aidc.keys")  # one JSON line per key action
# The last key Secret we read or wrote, by (namespace, name): Secrets are not watched (no list/watch
# RBAC on Secrets), so a running job's rotation check reads this instead of the apiserver.
_key_secrets: dict[tuple[str, str], dict[str, Any]] = {}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _read_key_secret(namespace: str, name: str) -> dict[str, Any] | None:
    secret = kubeio.read_secret(namespace, name)
    _remember_secret(namespace, name, secret)
    return secret


def _remember_secret(namespace: str, name: str, secret: Any) -> dict[str, Any] | None:
    if secret is None:
        _key_secrets.pop((namespace, name), None)
        return None
    _key_secrets[(namespace, name)] = stored = kubeio.sanitize(secret)
    return stored


def _key_work_due(secret: dict[str, Any], spec: TrainingJobSpec, body: dict[str, Any]) -> bool:
    """Would the key check change anything (a rotation due or requested, old key ids to prune)?"""
    enc = spec.checkpoint.encryption
    request = (body["metadata"].get("annotations") or {}).get(keys.ANNOTATION_ROTATE)
    last = (body.get("status") or {}).get("lastCheckpoint")
    return bool(
        keys.rotation_due(secret, enc.rotate_after, request, _now())
        or keys.prunable_key_ids(secret, last)
        or keys.ownership_change(secret, Owner.of(body), enc.key_retention == "Retain")
    )


def _key_action(action: str, owner: Owner, secret: str, ids: list[str], reason: str) -> None:
    key_log.info(keys.key_action_line(action, owner.namespace, owner.name, secret, ids, reason))


def _refusal(
    owner: Owner, body: dict[str, Any], name: str, why: lifecycle.Prerequisites
) -> lifecycle.Prerequisites:
    """A key the job cannot use: logged once per distinct reason (not on every pass while it waits)."""
    said = any(
        c.get("type") == why.condition and c.get("status") == "False" and c.get("reason") == why.reason
        for c in (body.get("status") or {}).get("conditions") or []
    )
    if not said:
        _key_action("refuse", owner, name, [], f"{why.reason}: {why.message}")
    return why


def ensure_key(
    owner: Owner, spec: TrainingJobSpec, body: dict[str, Any], gang_started: bool = False
) -> lifecycle.Prerequisites:
    """The key Secret exists (made once by us, or the user's is valid), the KEK (if any) unwraps it, and
    an operator-managed key is rotated when due. Every decision is an Event; no key byte is ever in one.
    Once a gang has started, its key was checked (the trainer reads keys at start), so only an owned
    key's rotation or pruning can be due, judged from the Secret as last read: no request."""
    enc = spec.checkpoint.encryption
    name = build.key_secret_name(owner, spec)
    if name is None:
        return lifecycle.Prerequisites()
    ns = owner.namespace
    if gang_started:
        if enc.key_secret_ref is not None:
            return lifecycle.Prerequisites()
        known = _key_secrets.get((ns, name)) or _read_key_secret(ns, name)
        check = check_key_secret(known, name, wrapped=enc.kek_secret_ref is not None)
        if known is not None and check.ok and not _key_work_due(known, spec, body):
            return lifecycle.Prerequisites(
                True, "CheckpointKeyReady", "KeyReady", check.message, check.key_id
            )
    events: list[lifecycle.Event] = []

    def waiting(reason: str, message: str) -> lifecycle.Prerequisites:
        return _refusal(
            owner, body, name, lifecycle.Prerequisites(False, "CheckpointKeyReady", reason, message)
        )

    kek = None
    if enc.kek_secret_ref:
        kek_secret = kubeio.read_secret(ns, enc.kek_secret_ref.name)
        check = check_kek_secret(kek_secret, enc.kek_secret_ref.name)
        if not check.ok:
            return waiting(check.reason, check.message)
        kek = base64.b64decode(kek_secret["data"]["kek"])  # type: ignore[index]
    owned, created = enc.key_secret_ref is None, None
    # A job that never had a key (no status.currentKeyId) almost surely has no Secret yet: create
    # first and read only if one exists (a retained key of an earlier job of that name): one request.
    fresh = owned and not (body.get("status") or {}).get("currentKeyId")
    secret = None if fresh else _read_key_secret(ns, name)
    if secret is None and owned:
        retain = enc.key_retention == "Retain"
        created = secret = _remember_secret(
            ns, name, kubeio.create(key_secret(owner, name, retain=retain, now=_now(), kek=kek))
        )
        if secret is None:  # it exists (made earlier, or meanwhile by someone else): read it
            secret = _read_key_secret(ns, name)
    if created is not None:
        _key_action(
            "create", owner, name, [keys.current_key_id(created)], f"keyRetention: {enc.key_retention}"
        )
        events.append(
            lifecycle.Event(
                "Normal",
                "KeyCreated",
                f"created checkpoint key Secret {name!r}"
                + (f" wrapped with the KEK in {enc.kek_secret_ref.name!r}" if enc.kek_secret_ref else "")
                + (
                    "; retained after the job is deleted (keyRetention: Retain)"
                    if retain
                    else "; deleted with the job (keyRetention: Delete)"
                ),
            )
        )
    check = check_key_secret(secret, name, wrapped=kek is not None)
    if not check.ok:
        return waiting(check.reason, check.message)
    assert secret is not None
    if kek is not None and not keys.unwraps(secret, kek):
        kek_name = enc.kek_secret_ref.name if enc.kek_secret_ref else ""
        return _refusal(
            owner,
            body,
            name,
            lifecycle.Prerequisites(
                False,
                "CheckpointKeyReady",
                "KEKMismatch",
                f"the KEK in Secret {kek_name!r} does not unwrap key {check.key_id} in {name!r}",
                events=(
                    lifecycle.Event(
                        "Warning",
                        "KeyUnwrapFailed",
                        f"KEK {kek_name!r} does not unwrap the key in {name!r}",
                    ),
                ),
            ),
        )
    key_id = check.key_id
    if (
        fresh
        and created is None
        and keys.predates(secret, owner.uid, body["metadata"].get("creationTimestamp"))
    ):
        _key_action("adopt", owner, name, [key_id or ""], "existing Secret of an earlier job of this name")
        events.append(
            lifecycle.Event(
                "Normal", "KeyAdopted", f"using the existing checkpoint key Secret {name!r} (key {key_id})"
            )
        )
    if owned and (change := keys.ownership_change(secret, owner, enc.key_retention == "Retain")):
        # keyRetention decides the Secret's fate, whoever made it: Delete takes ownership (deleted
        # with this job), Retain lets go. docs/encryption.md says why we take ownership, not refuse.
        action, patch = change
        secret = _remember_secret(ns, name, kubeio.core().patch_namespaced_secret(name, ns, patch)) or secret
        _key_action(action, owner, name, [key_id or ""], f"keyRetention: {enc.key_retention}")
        events.append(
            lifecycle.Event(
                "Warning",
                "KeyOwnershipTaken",
                f"key Secret {name!r} is now owned by this job (keyRetention: Delete): it is deleted with "
                "the job and checkpoints it encrypted become unreadable; set keyRetention: Retain to keep it",
            )
            if action == "own"
            else lifecycle.Event(
                "Normal",
                "KeyReleased",
                f"key Secret {name!r} is no longer owned by this job (keyRetention: Retain): it stays after "
                "the job is deleted",
            )
        )
    if enc.key_secret_ref is None:  # only keys we own are rotated
        request = (body["metadata"].get("annotations") or {}).get(keys.ANNOTATION_ROTATE)
        why = keys.rotation_due(secret, enc.rotate_after, request, _now())
        stale = keys.prunable_key_ids(secret, (body.get("status") or {}).get("lastCheckpoint"))
        if stale and not why:
            _remember_secret(
                ns,
                name,
                kubeio.core().patch_namespaced_secret(name, ns, {"data": {f"key-{k}": None for k in stale}}),
            )
            _key_action("retire", owner, name, stale, "no retained checkpoint uses them")
            events.append(
                lifecycle.Event(
                    "Normal",
                    "KeysPruned",
                    f"removed key id(s) {', '.join(stale)} from {name!r}: no retained checkpoint uses them",
                )
            )
        if why:
            key_id, patch = keys.rotation_patch(secret, _now(), request, kek)
            _remember_secret(ns, name, kubeio.core().patch_namespaced_secret(name, ns, patch))
            _key_action("rotate", owner, name, [key_id], why)
            events.append(
                lifecycle.Event(
                    "Normal",
                    "KeyRotated",
                    f"rotated the checkpoint key in {name!r} to {key_id} ({why}); older ids stay readable",
                )
            )
    return lifecycle.Prerequisites(
        True,
        "CheckpointKeyReady",
        "KeyReady",
        f"checkpoint key {key_id} in Secret {name!r}",
        key_id,
        tuple(events),
    )
