"""The TrainingJob planner's decisions about trouble: failed and lost pods, preemption and a gang the
scheduler cannot place whole. A mixin of lifecycle._Planner (same state, split for size); pure."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import gang_pods as gp
from . import gang_scheduling as gs
from . import recoveries, verdict
from .api.trainingjob import FailureRecord, TrainingJobSpec, TrainingJobStatus
from .builders import trainingjob as build
from .builders.common import Owner
from .conditions import get_condition
from .recovery import LostPod, NodeHealth, lost_pods
from .restart_policy import PodExit, backoff_seconds, describe, terminated

if TYPE_CHECKING:
    from .lifecycle import Plan

# Non-retryable exits by the trainer's code: the Failed condition's reason.
FAIL_REASONS = {3: "CheckpointKeyError", 4: "InvalidConfig", 7: "NoValidCheckpoint"}


class FailurePlanning:
    """Failure decisions of the planner; the state and the primitives are _Planner's."""

    if TYPE_CHECKING:
        owner: Owner
        spec: TrainingJobSpec
        status: TrainingJobStatus
        health: Mapping[str, NodeHealth]
        now: dt.datetime
        plan: Plan

        def event(self, type_: str, reason: str, message: str) -> None: ...
        def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None: ...
        def fail(self, reason: str, message: str, pods: list[dict[str, Any]]) -> Plan: ...
        def restart(self, current: list[dict[str, Any]], delay: int) -> None: ...
        def gang_size(self, current: list[dict[str, Any]]) -> int: ...
        def delete_pods(self, pods: list[dict[str, Any]]) -> None: ...
        def running_short(self, current: list[dict[str, Any]]) -> bool: ...
        def spares_waiting(self, current: list[dict[str, Any]]) -> bool: ...
        def gang_restart_needed(
            self, current: list[dict[str, Any]], lost: list[LostPod], exits: list[PodExit]
        ) -> str | None: ...
        def replace(self, current: list[dict[str, Any]], lost: list[LostPod], message: str) -> None: ...

    def handle_failures(self, current: list[dict[str, Any]]) -> bool:
        st, policy = self.status, self.spec.failure_policy
        exits = [e for e in (terminated(p) for p in current) if e]
        held_since = gp.parse_ts(st.peer_lost_since)
        held_for = (self.now - held_since).total_seconds() if held_since else None
        v = verdict.judge(
            current, exits, self.lost(current), self.health, policy.retryable_exit_codes, held_for
        )
        if v.kind != "hold":
            st.peer_lost_since = None
        if v.kind == "none":
            return False
        if v.kind == "hold":
            assert v.exit is not None
            if held_since is None:
                st.peer_lost_since = gp.ts(self.now)
                self.event(
                    "Normal",
                    "PeerLost",
                    f"{describe(v.exit)}; waiting up to {v.wait:.0f}s for the gang's nodes to be judged "
                    "before counting it",
                )
            self.plan.requeue_after = max(0.5, min(1.0, v.wait))  # Lease renewals wake no job
            return True
        if v.kind == "node":
            self.node_failure(current, v.lost, exits)
            return True
        assert v.exit is not None
        decisive, message = v.exit, describe(v.exit)
        if v.kind == "retry" and decisive.exit_code == 6:  # the trainer's checkpoint was not saved
            ckpt = st.last_checkpoint
            message += f"; newest checkpoint: {f'step {ckpt.step}' if ckpt else 'none'}"
        st.last_failure = FailureRecord(
            reason=decisive.cause or decisive.reason,
            message=message,
            node=decisive.node,
            time=gp.ts(self.now),
        )
        if v.kind == "fail":
            reason = FAIL_REASONS.get(decisive.exit_code, "NonRetryableExit")
            if reason == "NoValidCheckpoint":
                self.condition(reason, True, reason, message)
            self.fail(reason, message, current)
            return True
        if st.restarts >= policy.max_restarts:
            self.fail(
                "BackoffLimitExceeded", f"{message}; maxRestarts={policy.max_restarts} reached", current
            )
            return True
        st.restarts += 1
        delay = backoff_seconds(st.restarts, policy.backoff_seconds, policy.max_backoff_seconds)
        self.event(
            "Warning",
            "PodFailed",
            f"{message}; restarting the gang in {delay}s (restart {st.restarts}/{policy.max_restarts})",
        )
        self.restart(current, delay=delay)
        return True

    def lost(self, current: list[dict[str, Any]]) -> list[LostPod]:
        """Pods of the gang that lost nodes took, and (while Running) pods someone else deleted."""
        st = self.status
        lost = lost_pods(current, self.health)
        if st.phase != "Running":
            return lost
        expected = self.gang_size(current)
        have = {gp.rank(p) for p in current}
        lost += [
            LostPod(
                build.pod_name(self.owner.name, st.attempt, r),
                None,
                "PodDeleted",
                f"pod of rank {r} was deleted",
                rank=r,
            )
            for r in range(expected)
            if r not in have
        ]
        named = {lp.pod for lp in lost}
        lost += [
            LostPod(
                p["metadata"]["name"],
                p.get("spec", {}).get("nodeName"),
                "PodDeleted",
                f"pod {p['metadata']['name']} is being deleted",
            )
            for p in current
            if p["metadata"].get("deletionTimestamp") and p["metadata"]["name"] not in named
        ]
        return lost

    def node_failure(self, current: list[dict[str, Any]], lost: list[LostPod], exits: list[PodExit]) -> None:
        st, policy = self.status, self.spec.failure_policy
        if all(lp.reason == "Preempted" for lp in lost):
            return self.preempted(current, lost[0])
        lost = [lp for lp in lost if lp.reason != "Preempted"]
        first = lost[0]
        message = first.message
        if exits:
            message += f"; {len(exits)} rank(s) of the gang exited after it ({describe(exits[0])})"
        st.last_failure = FailureRecord(
            reason=first.reason, message=message, node=first.node, time=gp.ts(self.now)
        )
        if policy.node_failure == "Fail":
            self.fail("NodeFailure", message, current)
            return
        if st.node_failures >= policy.max_node_failures:
            self.fail(
                "NodeFailureBudgetExceeded",
                f"{message}; maxNodeFailures={policy.max_node_failures} reached",
                current,
            )
            return
        st.node_failures += 1
        for lp in lost:
            if lp.node and lp.node not in st.excluded_nodes:
                st.excluded_nodes.append(lp.node)
        if policy.node_failure == "ReplaceNode":
            why = self.gang_restart_needed(current, lost, exits)
            if why is None:
                return self.replace(current, lost, message)
            message += f"; {why}"
        for lp in lost:
            recoveries.record(st, lp, "RestartGang", None, self.now, self.health)
        self.event(
            "Warning",
            "NodeFailure",
            f"{message}; restarting the gang on healthy nodes "
            f"(node failure {st.node_failures}/{policy.max_node_failures})",
        )
        self.restart(current, delay=0)

    def preempted(self, current: list[dict[str, Any]], first: LostPod) -> None:
        """The scheduler evicted a pod for a higher-priority one: the gang restarts when it fits again,
        spending no budget and avoiding no node."""
        st = self.status
        st.last_failure = FailureRecord(
            reason="Preempted", message=first.message, node=first.node, time=gp.ts(self.now)
        )
        st.preemptions += 1
        self.event(
            "Warning",
            "Preempted",
            f"pod {first.pod} preempted ({first.message}); the gang restarts when it fits",
        )
        self.restart(current, delay=0)

    def scheduling(self, current: list[dict[str, Any]], expected: int) -> bool:
        """All-or-nothing placement. The scheduler's own words go on the TrainingJob while pods of the gang
        cannot be placed; a gang not wholly placed within spec.scheduling.timeoutSeconds is deleted so its
        placed pods release their GPUs, and tried again after backoff. True: the gang was given up."""
        st, policy = self.status, self.spec.scheduling
        placing = gs.placement(current, policy.timeout_seconds, self.now)
        have = get_condition(st.conditions, "Unschedulable")
        spares = self.spares_waiting(current)
        if placing.timed_out and not self.running_short(current) and not spares:
            return self.scheduling_timeout(current, placing)
        if placing.stuck:
            name, words = placing.stuck[0]
            message = f"{len(placing.stuck)} of {expected} pod(s) cannot be scheduled; {name}: {words}"
            reason = "Unschedulable"
            if spares:
                reason = "SparesUnschedulable"
                message = (
                    f"{len(placing.stuck)} standby spare(s) cannot be scheduled, the gang runs without "
                    f"them; {name}: {words}"
                )
            if have is None or have.status != "True" or have.reason != reason:
                self.event("Warning", reason, message)
            self.condition("Unschedulable", True, reason, message)
        elif have is not None and have.status == "True" and not placing.unplaced:
            self.condition("Unschedulable", False, "Scheduled", "every pod of the gang is scheduled")
        if placing.deadline_in is not None:
            self.plan.requeue_after = min(self.plan.requeue_after, max(1.0, placing.deadline_in))
        return False

    def scheduling_timeout(self, current: list[dict[str, Any]], placing: gs.Placement) -> bool:
        st, policy = self.status, self.spec.scheduling
        words = placing.stuck[0][1] if placing.stuck else "pods not yet scheduled"
        message = (
            f"{len(placing.unplaced)} of {len(current)} pod(s) not scheduled within "
            f"spec.scheduling.timeoutSeconds={policy.timeout_seconds}: {words}"
        )
        if policy.max_retries is not None and st.scheduling_retries >= policy.max_retries:
            self.condition("Unschedulable", True, "SchedulingTimeout", message)
            self.fail(
                "Unschedulable",
                f"{message}; spec.scheduling.maxRetries={policy.max_retries} reached",
                current,
            )
            return True
        st.scheduling_retries += 1
        st.attempt += 1
        at = self.now + dt.timedelta(seconds=policy.backoff_seconds)
        st.restart_after = gp.ts(at.replace(microsecond=0) + dt.timedelta(seconds=1))
        st.ready_nodes = 0
        message += f"; deleted the partial gang to free its GPUs, retrying in {policy.backoff_seconds}s"
        self.condition("Unschedulable", True, "SchedulingTimeout", message)
        self.event("Warning", "SchedulingTimeout", message)
        st.phase = "Pending"
        self.delete_pods(current)
        self.plan.requeue_after = 1
        return True
