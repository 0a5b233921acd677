"""The TrainingJob planner's side of Kueue: no pod before admission, a graceful stop on eviction that
is neither a failure nor a restart, the quota handed back once the pods are gone, and the Workload
marked Finished with the job. A mixin of lifecycle._Planner (same state, split for size); pure."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from .api.trainingjob import TrainingJobStatus

if TYPE_CHECKING:
    from .lifecycle import Plan
    from .queueing import Gate


class QueuePlanning:
    """Kueue decisions of the planner; the state and the primitives are _Planner's."""

    if TYPE_CHECKING:
        status: TrainingJobStatus
        now: dt.datetime
        plan: Plan
        queue: Gate | None

        def event(self, type_: str, reason: str, message: str) -> None: ...
        def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None: ...
        def delete_pods(self, pods: list[dict[str, Any]]) -> None: ...
        def gpu_accounting(self, current: list[dict[str, Any]], close: bool = False) -> None: ...

    def admitted(self, current: list[dict[str, Any]]) -> bool:
        """May the gang run? Otherwise say why on the job (phase Queued, Kueue's own reason)."""
        gate, st = self.queue, self.status
        assert gate is not None
        if not gate.active:
            self.plan.workload_active = True  # resumed: back in the queue
        if gate.state == "admitted":
            if st.phase == "Queued":
                st.phase = "Pending"
            self.condition("Queued", False, "Admitted", gate.message)
            return True
        live = [p for p in current if not p["metadata"].get("deletionTimestamp")]
        if gate.state == "evicted":
            if live:
                # Stop gracefully: SIGTERM lets the trainer write its stop checkpoint, which the next
                # admission resumes from. Not a failure, not a restart: the next attempt waits for Kueue.
                self.gpu_accounting(current, close=True)
                st.attempt += 1
                st.ready_nodes = 0
                self.delete_pods(current)
                self.event("Warning", "Evicted", f"Kueue evicted the gang ({gate.reason}): {gate.message}")
            elif not current:
                self.plan.workload_write = "requeue"  # the pods are gone: hand the quota back
        elif gate.state == "create":
            self.plan.create_workload = True
        if live and gate.state != "evicted":
            self.delete_pods(current)  # admission withdrawn (the Workload was deleted): stop the gang
        if st.phase != "Queued":
            self.event("Normal", "Queued", f"waiting for Kueue: {gate.reason}: {gate.message}")
        st.phase = "Queued"  # type: ignore[assignment]
        st.nodes = None
        self.condition("Queued", True, gate.reason, gate.message)
        self.condition("Running", False, "Queued", gate.message)
        self.plan.requeue_after = 1 if current else self.plan.requeue_after  # pods going: look again soon
        return False

    def suspend_workload(self, pods: list[dict[str, Any]]) -> None:
        """A suspended job gives its quota back: its Workload is deactivated (Kueue evicts it), and once
        the pods are gone the admission is cleared, as for any eviction."""
        gate = self.queue
        if gate is None:
            return
        if gate.active:
            self.plan.workload_active = False
        elif gate.state == "evicted" and not pods:
            self.plan.workload_write = "requeue"

    def queue_placement(self) -> tuple[dict[str, str], list[dict[str, Any]]] | None:
        if self.queue is None:
            return None
        return self.queue.node_selector, self.queue.tolerations

    def finish_workload(self) -> None:
        if (
            self.queue is not None
            and not self.queue.finished
            and self.status.phase in ("Succeeded", "Failed")
        ):
            self.plan.workload_write = "finished"
