"""What a TrainingJob's spec may not change once the job has started: one rule set, emitted as the CRD's
CEL transition rules (api/crd.py) and checked again by the admission webhook (admission.py).

A started job's pods were built from its spec (image, torchrun's wiring, the checkpoint environment …) and
Kubernetes cannot change a running pod, so an edit to those fields would be silently ignored until some
later restart. They are locked while the job has (or may have) pods and once it has finished; a job not
yet started, or suspended, takes any edit (a suspended job's next gang is built from the new spec).
`nodes` and the elastic range are not here: changing them is a declared resize (lifecycle / planner_resize).
"""

from __future__ import annotations

from dataclasses import dataclass

# Where a checkpoint trigger is absent the webhook / reconciler set everySeconds (admission.py).
DEFAULT_CHECKPOINT_SECONDS = 600


@dataclass(frozen=True)
class Frozen:
    path: str
    """Dotted camelCase path under spec."""
    why: str
    """Why a started job cannot take the change."""
    value: str | None = None
    """CEL for the field's effective value ('{o}' is self or oldSelf) when 'unset' means something, so a
    webhook filling in that meaning later is no change."""
    finished_only: bool = False
    """Locked only once the job has finished (a resize: a running job takes it, a finished one cannot)."""


FROZEN: tuple[Frozen, ...] = (
    Frozen("image", "running pods keep the image they started with"),
    Frozen("command", "running pods keep the command they started with"),
    Frozen("procPerNode", "torchrun's worker processes per pod are fixed for a gang"),
    Frozen(
        "gpusPerNode",
        "a pod's GPUs are fixed when it is scheduled",
        "(has({o}.spec.gpusPerNode) ? {o}.spec.gpusPerNode : {o}.spec.procPerNode)",
    ),
    Frozen("masterPort", "the gang's rendezvous runs on it"),
    Frozen("env", "a running container's environment cannot change"),
    Frozen("resources", "a running pod's resources are fixed when it is scheduled"),
    Frozen("podTemplate", "running pods cannot take pod-level changes"),
    Frozen("elastic", "static and elastic gangs rendezvous differently", "has({o}.spec.elastic)"),
    Frozen(
        "elastic.maxRestarts",
        "torchrun reads it when a pod starts",
        "(has({o}.spec.elastic) ? {o}.spec.elastic.maxRestarts : -1)",
    ),
    Frozen("checkpoint.volume", "the job's checkpoints live on it"),
    Frozen("checkpoint.everySteps", "the trainer reads it when a pod starts"),
    Frozen(
        "checkpoint.everySeconds",
        "the trainer reads it when a pod starts",
        "(has({o}.spec.checkpoint.everySeconds) ? {o}.spec.checkpoint.everySeconds : "
        f"(has({{o}}.spec.checkpoint.everySteps) ? 0 : {DEFAULT_CHECKPOINT_SECONDS}))",
    ),
    Frozen("checkpoint.keep", "the trainer reads it when a pod starts"),
    Frozen("checkpoint.onNoValidCheckpoint", "the trainer reads it when a pod starts"),
    Frozen("checkpoint.backup", "the pods mount the backup volume and the trainer reads keep when it starts"),
    Frozen("checkpoint.encryption.enabled", "the existing checkpoints are stored that way"),
    Frozen("checkpoint.encryption.keySecretRef", "the existing checkpoints are encrypted with that key"),
    Frozen("checkpoint.encryption.kekSecretRef", "the existing checkpoints' key is wrapped by it"),
    Frozen("nodes", "a finished job starts no more gangs", finished_only=True),
    Frozen(
        "elastic.minNodes",
        "a finished job starts no more gangs",
        "(has({o}.spec.elastic) ? {o}.spec.elastic.minNodes : -1)",
        finished_only=True,
    ),
    Frozen(
        "elastic.maxNodes",
        "a finished job starts no more gangs",
        "(has({o}.spec.elastic) ? {o}.spec.elastic.maxNodes : -1)",
        finished_only=True,
    ),
)

# Phases that run no pods of a started job: a suspended job takes edits for its next gang.
LOCKED_CEL = (
    "has(oldSelf.status) && has(oldSelf.status.phase) && "
    "(oldSelf.status.phase in ['Succeeded', 'Failed'] || "
    "(has(oldSelf.status.startTime) && oldSelf.status.phase != 'Suspended'))"
)
FINISHED_CEL = (
    "has(oldSelf.status) && has(oldSelf.status.phase) && oldSelf.status.phase in ['Succeeded', 'Failed']"
)


def locked(frozen: Frozen, old_status: object) -> bool:
    """The same test as the CEL rule's guard, on the old object's status (a dict, as sent)."""
    if not isinstance(old_status, dict) or not old_status.get("phase"):
        return False
    phase = old_status["phase"]
    if phase in ("Succeeded", "Failed"):
        return True
    return not frozen.finished_only and bool(old_status.get("startTime")) and phase != "Suspended"


def message(frozen: Frozen) -> str:
    if frozen.finished_only:
        return f"spec.{frozen.path} cannot change once the job has finished ({frozen.why})"
    return (
        f"spec.{frozen.path} cannot change once the job has started ({frozen.why}); suspend the job "
        "(spec.suspend: true) to change it for its next gang, or create a new TrainingJob"
    )


def _present(path: str, o: str) -> str:
    """has() of the field and of every optional object above it (checkpoint/encryption have defaults)."""
    parts = path.split(".")
    always = ("checkpoint", "checkpoint.encryption")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return " && ".join(f"has({o}.spec.{p})" for p in prefixes if p not in always)


def cel_rule(frozen: Frozen) -> dict[str, str]:
    if frozen.value:
        same = f"{frozen.value.format(o='self')} == {frozen.value.format(o='oldSelf')}"
    else:
        new, old = _present(frozen.path, "self"), _present(frozen.path, "oldSelf")
        p = frozen.path
        same = f"({new}) == ({old}) && (!({new}) || self.spec.{p} == oldSelf.spec.{p})"
    return {
        "rule": f"!({FINISHED_CEL if frozen.finished_only else LOCKED_CEL}) || ({same})",
        "message": message(frozen),
        "fieldPath": f".spec.{frozen.path}",
    }


def cel_rules() -> list[dict[str, str]]:
    return [cel_rule(f) for f in FROZEN]
