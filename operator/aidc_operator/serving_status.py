"""What an InferenceService's status says, given what its pass observed: pure (no I/O, no clock of its
own), so every verdict — ready, why not, which version is served, how the canary does — is unit-tested
without a cluster. handlers/inferenceservice.py gathers the observations and writes the result."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from .builders import inferenceservice as build
from .builders.common import Owner
from .conditions import get_condition, set_condition
from .lifecycle import RESYNC_SECONDS
from .volumes import Trouble


@dataclass
class Event:
    type: str
    reason: str
    message: str


@dataclass
class Resolution:
    """A model source looked up: resolved (servable), or why not. job: the TrainingJob, when there is one."""

    model: build.ResolvedModel | None
    reason: str
    message: str
    job: dict[str, Any] | None = None


def ready_replicas(dep: dict[str, Any] | None) -> int:
    return ((dep or {}).get("status") or {}).get("readyReplicas") or 0


@dataclass(frozen=True)
class ServerReport:
    """What the primary's model servers say about themselves (GET through the apiserver's pod proxy)."""

    versions: frozenset[str] = frozenset()  # checkpoint steps the ready servers serve
    not_ready: str | None = None  # the first unready server's own reason
    unanswered: int = 0  # running servers that gave neither (still starting, or too slow to answer)


def server_reason(body: str | bytes | None) -> str | None:
    """The model server's own reason in an error answered through the pod proxy. None when the body is
    the apiserver's own Status (the pod could not be reached, e.g. the server is still starting): that
    says nothing about the model."""
    try:
        doc = json.loads(body or "{}")
    except (ValueError, TypeError):
        return None
    if not isinstance(doc, dict) or doc.get("kind") == "Status":
        return None
    reason = doc.get("reason") or doc.get("error")
    return str(reason) if reason else None


def plan_status(
    old: InferenceServiceStatus,
    owner: Owner,
    spec: InferenceServiceSpec,
    generation: int | None,
    primary: Resolution,
    canary: Resolution | None,
    primary_dep: dict[str, Any] | None,
    canary_dep: dict[str, Any] | None,
    canary_wanted: int,
    pod_trouble: str | None,
    now: str,
    report: ServerReport = ServerReport(),
    placement: Trouble | None = None,
    routed: bool = False,
) -> InferenceServiceStatus:
    """The status the observed world adds up to (pure). placement: why the servers' pods are not placed
    (a missing or unbound claim, the scheduler's words), when they are not. routed: an HTTPRoute splits
    the traffic by weight (builders/httproute.py), not the replica ratio."""
    st = old.model_copy(deep=True)
    st.observed_generation = generation
    st.url = build.url(owner, spec)
    st.ready_replicas = ready_replicas(primary_dep)
    st.canary_ready_replicas = ready_replicas(canary_dep) if spec.canary else 0
    conds = st.conditions
    if get_condition(conds, "Invalid"):
        set_condition(conds, "Invalid", "False", "Valid", "spec is valid", now, generation)

    resolved = "True" if primary.model is not None else "False"
    set_condition(conds, "ModelResolved", resolved, primary.reason, primary.message, now, generation)

    percent = spec.canary.traffic_percent if spec.canary else 0
    behind_service = st.ready_replicas if percent < 100 else 0
    behind_service += st.canary_ready_replicas if percent > 0 else 0
    if behind_service:
        st.phase = "Ready"
        n = behind_service
        set_condition(
            conds, "Ready", "True", "Serving", f"{n} ready replica(s) behind the Service", now, generation
        )
    else:
        st.phase = "NotReady" if old.phase in ("Ready", "NotReady") else "Pending"
        if primary.model is None and primary_dep is None:
            reason, message = "ModelUnresolved", primary.message
        elif placement is not None:
            # A server that never ran has no checkpoint to blame: say what keeps it off every node.
            reason, message = placement.reason, placement.message
        elif pod_trouble:
            reason, message = "PodsNotStarting", pod_trouble
        elif report.not_ready:
            reason, message = "ModelNotLoaded", report.not_ready
        else:
            reason = "NoReadyReplicas"
            message = (
                "no model-server replica is ready yet; a server stays unready while it has no checkpoint "
                "that verifies and decrypts (GET /v2/health/ready on a pod gives its reason)"
            )
        set_condition(conds, "Ready", "False", reason, message, now, generation)

    # What the ready servers say they serve (several during a hot swap). When none could be asked, the
    # version they converge to: the newest checkpoint the TrainingJob reported (servers load the newest
    # verified one and hot-swap within model.watchSeconds). Storage alone gives no version.
    last = ((primary.job or {}).get("status") or {}).get("lastCheckpoint") or {}
    if report.versions:
        st.model_version = ",".join(sorted(report.versions, key=lambda v: (len(v), v)))
    else:
        st.model_version = str(last["step"]) if st.ready_replicas and "step" in last else None

    if spec.canary is None:
        st.conditions = [c for c in conds if c.type != "CanaryReady"]
    elif canary is not None and canary.model is None:
        set_condition(
            conds, "CanaryReady", "False", canary.reason, f"canary: {canary.message}", now, generation
        )
    elif canary_wanted == 0:
        set_condition(
            conds, "CanaryReady", "True", "NoTrafficAsked", "0% asked: canary scaled to zero", now, generation
        )
    else:
        ready = st.canary_ready_replicas
        share = build.effective_canary_percent(st.ready_replicas, ready, percent)
        message = (
            f"{ready}/{canary_wanted} canary replicas ready; canary gets ~{share}% of connections "
            f"(asked {percent}%: the split follows the ready-replica ratio)"
        )
        if routed:
            message = f"{ready}/{canary_wanted} canary replicas ready; the HTTPRoute sends it {percent}%"
        ok = "True" if ready >= canary_wanted else "False"
        set_condition(
            conds,
            "CanaryReady",
            ok,
            "CanaryServing" if ok == "True" else "CanaryNotReady",
            message,
            now,
            generation,
        )
    return st


def transition_events(old: InferenceServiceStatus, new: InferenceServiceStatus) -> list[Event]:
    """Events for conditions that changed status (or reason) since the last pass."""
    events = []
    for cond in new.conditions:
        before = get_condition(old.conditions, cond.type)
        if before and (before.status, before.reason) == (cond.status, cond.reason):
            continue
        if before is None and cond.type == "Invalid":
            continue
        good = (cond.status == "True") != (cond.type == "Invalid")
        events.append(Event("Normal" if good else "Warning", cond.reason or cond.type, cond.message))
    return events


# A running server that has not said whether it is ready (still importing torch, or too busy to answer
# in time): no pod event comes while its probe keeps failing, so ask again soon. One that gave its reason
# is asked again now and then: the reason may change with no event either.
ASK_AGAIN_SECONDS = 5.0
REASON_RECHECK_SECONDS = 30.0


def ask_again(report: ServerReport, ready: int) -> float:
    """When the next pass should ask unready servers again (RESYNC_SECONDS: nothing to ask)."""
    if ready:
        return RESYNC_SECONDS
    if report.unanswered:
        return ASK_AGAIN_SECONDS
    return REASON_RECHECK_SECONDS if report.not_ready else RESYNC_SECONDS


def version_recheck(spec: InferenceServiceSpec, primary: Resolution, report: ServerReport) -> float:
    """Servers hot-swap a new checkpoint within model.watchSeconds of the job reporting it, with no event
    to tell us: while what they serve lags the job's newest checkpoint, ask again after that."""
    step = (((primary.job or {}).get("status") or {}).get("lastCheckpoint") or {}).get("step")
    lagging = report.versions and step is not None and str(step) not in report.versions
    return float(spec.model.watch_seconds) + 1 if lagging and spec.model.watch_seconds else RESYNC_SECONDS
