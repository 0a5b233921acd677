"""The TrainingJob planner's ReplaceNode recovery (spec.failurePolicy.nodeFailure: ReplaceNode): a lost
node costs one pod, not the gang. The lost pod is force-deleted and a pod of the same rank (same
hostname, so the rank's DNS name moves to it) is created off the lost node; the surviving pods keep
running, their torchrun agents restart the workers in place and wait in the c10d rendezvous for it
(builders/torchrun.py). Standby spares (spareNodes) are ranks beyond spec.nodes that the rendezvous keeps
waiting; a lost rank is taken over by one of them and the replacement becomes the new spare.

The whole gang restarts instead when the lost pod is rank 0 (its agent hosts the rendezvous store, so
the survivors cannot meet again) or when a survivor's agent already gave up (its pod exited).

A mixin of lifecycle._Planner (same state, split for size); pure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import gang_pods as gp
from . import recoveries
from .api.trainingjob import TrainingJobSpec, TrainingJobStatus
from .builders import trainingjob as build
from .builders.common import Owner
from .recovery import LostPod, NodeHealth
from .restart_policy import PodExit, terminated

if TYPE_CHECKING:
    from .lifecycle import Plan


def lost_rank(current: list[dict[str, Any]], lost: LostPod) -> int | None:
    """The rank of a lost pod: its label while the pod is still seen, else what the loss recorded."""
    pod = next((p for p in current if p["metadata"]["name"] == lost.pod), None)
    return gp.rank(pod) if pod is not None else lost.rank


class ReplacePlanning:
    """ReplaceNode decisions of the planner; the state and the primitives are _Planner's."""

    if TYPE_CHECKING:
        owner: Owner
        spec: TrainingJobSpec
        status: TrainingJobStatus
        health: Mapping[str, NodeHealth]
        now: dt.datetime
        plan: Plan

        def event(self, type_: str, reason: str, message: str) -> None: ...
        def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None: ...
        def delete_pods(self, pods: list[dict[str, Any]]) -> None: ...
        def queue_placement(self) -> tuple[dict[str, str], list[dict[str, Any]]] | None: ...
        def asked_size(self, current: list[dict[str, Any]]) -> int: ...

    def spares(self) -> int:
        """Standby pods beyond spec.nodes (a fixed-size ReplaceNode gang only; admission says so)."""
        fp = self.spec.failure_policy
        return fp.spare_nodes if fp.node_failure == "ReplaceNode" and self.spec.elastic is None else 0

    def spares_waiting(self, current: list[dict[str, Any]]) -> bool:
        """The gang runs whole — the pods asked for, the rendezvous host among them — while standby pods
        wait for a node: spares never hold the gang back, nor time it out."""
        if not self.spares():
            return False
        live = [p for p in current if not p["metadata"].get("deletionTimestamp")]
        running = [p for p in live if gp.phase(p) == "Running"]
        asked = self.asked_size(current)
        pending = any(gp.phase(p) == "Pending" for p in live)
        return pending and len(running) >= asked and any(gp.rank(p) == 0 for p in running)

    def spare_may_start(self, current: list[dict[str, Any]], rank: int) -> bool:
        """A spare's pod is created once every rank of the gang is placed, so that the scheduler never
        gives a standby the node a rank needed."""
        asked = self.asked_size(current)
        placed = {gp.rank(p) for p in current if (p.get("spec") or {}).get("nodeName")}
        return rank < asked or all(r in placed for r in range(asked))

    def drop_superseded(self, current: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pods a replacement took over are no longer the gang's: make sure they go (a pod on a dead
        node is force-deleted again until it is gone) and judge the gang without them."""
        old = gp.superseded(current)
        if not old:
            return current
        self.delete_pods(old)
        gone = {p["metadata"]["name"] for p in old}
        return [p for p in current if p["metadata"]["name"] not in gone]

    def finished_with_standby(self, current: list[dict[str, Any]]) -> bool:
        """Did training finish while spares stood by? torchrun's agents exit 0 only after the whole
        worker group succeeded; a standby's agent, which ran no worker, ends with the rendezvous: exit 0
        when it sees it closed, or a lost-store exit when the rank-0 agent was quicker to leave. So:
        the pods asked for succeeded and every other pod ended one of those two ways."""
        done = sum(1 for p in current if gp.phase(p) == "Succeeded")
        if not self.spares() or done < self.asked_size(current):
            return False
        for pod in current:
            if gp.phase(pod) == "Succeeded":
                continue
            ended = terminated(pod)
            if ended is None or not ended.peer_lost:
                return False
        return True

    def gang_restart_needed(
        self, current: list[dict[str, Any]], lost: list[LostPod], exits: list[PodExit]
    ) -> str | None:
        """Why replacing the lost pods would not do (the gang restarts), or None."""
        if exits:
            return f"{len(exits)} pod(s) of the gang already exited ({exits[0].pod})"
        for lp in lost:
            rank = lost_rank(current, lp)
            if rank is None or rank < 0:
                return f"the rank of lost pod {lp.pod} is unknown"
            if rank == 0:
                return f"pod {lp.pod} was rank 0, whose agent hosts the rendezvous"
        return None

    def replace(self, current: list[dict[str, Any]], lost: list[LostPod], message: str) -> None:
        """One new pod per lost pod; the survivors are left alone (same pods, same UIDs)."""
        st = self.status
        made = []
        for lp in lost:
            rank = lost_rank(current, lp)
            assert rank is not None  # gang_restart_needed said so
            self.delete_pods([p for p in current if p["metadata"]["name"] == lp.pod])
            new = build.pod(
                self.owner,
                self.spec,
                rank,
                st.attempt,
                st.excluded_nodes,
                self.queue_placement(),
                replacement=st.node_failures,
            )
            name = new["metadata"]["name"]
            self.plan.create.append(new)
            made.append(f"{lp.pod} with {name}")
            recoveries.record(st, lp, "ReplaceNode", name, self.now, self.health)
        kept = len(current) - len(lost)
        text = (
            f"{message}; replacing pod {', '.join(made)} on a healthy node; the other {kept} pod(s) keep "
            f"running and restart training in place from the newest checkpoint (node failure "
            f"{st.node_failures}/{self.spec.failure_policy.max_node_failures})"
        )
        self.event("Warning", "NodeFailure", text)
        self.condition("Running", False, "ReplacingNode", text)
        self.condition("Restarting", True, "ReplacingNode", text)
        st.phase = "Restarting"  # the NodeFailure event above says it all: no second one
        self.plan.requeue_after = 1
