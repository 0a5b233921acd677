"""The TrainingJob state machine: observed world in, a plan out. Pure: no I/O, no clock of its own.

`plan()` is level-based — it derives everything from the spec, the last status and the pods and nodes
it is shown — so running it twice on the same input yields the same plan, and a restarted operator
converges from whatever it finds. The reconciler (handlers/trainingjob.py) gathers the input, applies
the plan and writes the status.

Gang rule: a restart bumps `status.attempt`; pods of any other attempt are deleted, and no pod of the
new attempt is created until every old one is gone, so two attempts are never alive at once.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import gang_pods as gp
from . import progress as pr
from . import recoveries
from .api.trainingjob import TrainingJobSpec, TrainingJobStatus
from .builders import trainingjob as build
from .builders.common import Owner
from .conditions import get_condition, set_condition
from .planner_failures import FailurePlanning
from .planner_queue import QueuePlanning
from .planner_replace import ReplacePlanning
from .planner_resize import ResizePlanning
from .queueing import Gate
from .recovery import NodeHealth, health_of, must_force_delete
from .restart_policy import one_line

FINISHED = ("Succeeded", "Failed")
# A pass runs when something it reads changes (watch events); this safety resync is the only pass a
# quiet job gets (the controller adds jitter so a thousand jobs never resync together).
RESYNC_SECONDS = float(os.environ.get("AIDC_RESYNC_SECONDS", "300"))
PREREQ_RETRY_SECONDS = 5.0  # a missing Secret/PVC is not watched: look again soon


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class PodDeletion:
    name: str
    force: bool  # grace period 0: the pod's node is gone and will never confirm


@dataclass(frozen=True)
class Prerequisites:
    """What must exist before pods can start (checked by the reconciler)."""

    ready: bool = True
    condition: str = "Ready"
    reason: str = ""
    message: str = ""
    key_id: str | None = None  # the checkpoint key id new checkpoints use
    events: tuple[Event, ...] = ()  # what the check did (key created, rotated …), for the audit trail


@dataclass
class Plan:
    status: TrainingJobStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[PodDeletion] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float = RESYNC_SECONDS
    delete_job: bool = False
    create_workload: bool = False  # Kueue: the job's Workload is to be made
    workload_write: Literal["requeue", "finished"] | None = None  # Kueue: the Workload status to write
    workload_active: bool | None = None  # Kueue: set the Workload's spec.active (suspend / resume)


class _Planner(FailurePlanning, QueuePlanning, ReplacePlanning, ResizePlanning):
    def __init__(
        self,
        owner: Owner,
        generation: int,
        spec: TrainingJobSpec,
        status: TrainingJobStatus,
        pods: list[dict[str, Any]],
        health: Mapping[str, NodeHealth],
        prereq: Prerequisites,
        now: dt.datetime,
        queue: Gate | None,
    ) -> None:
        self.owner, self.generation, self.spec, self.now = owner, generation, spec, now
        self.status = status.model_copy(deep=True)
        self.pods, self.health, self.prereq, self.queue = pods, health, prereq, queue
        self.plan = Plan(self.status, events=list(prereq.events))
        self.attempt_energy: float | None = None  # the running attempt's, as its rank 0 last reported
        if prereq.key_id:
            self.status.current_key_id = prereq.key_id

    # helpers --------------------------------------------------------------
    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, one_line(message)))

    def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        set_condition(
            self.status.conditions,
            type_,
            "True" if status else "False",
            reason,
            one_line(message),  # never a traceback: one bounded line
            gp.ts(self.now),
            self.generation,
        )

    def set_phase(self, phase: str, reason: str, message: str = "") -> None:
        if self.status.phase != phase:
            self.event(
                "Warning" if phase == "Failed" else "Normal", reason, message or f"TrainingJob is {phase}"
            )
        self.status.phase = phase  # type: ignore[assignment]

    def delete_pods(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            force = must_force_delete(pod, self.health)
            # A pod already terminating on a live node needs nothing more; on a dead node, force it.
            if pod["metadata"].get("deletionTimestamp") and not force:
                continue
            self.plan.delete.append(PodDeletion(pod["metadata"]["name"], force))
            node = pod.get("spec", {}).get("nodeName")
            if force and node and node not in self.status.excluded_nodes:
                # A node that died under the gang after it began restarting for another reason (its
                # peers failed first): keep the new attempt off it all the same.
                self.status.excluded_nodes.append(node)

    def gpu_accounting(self, current: list[dict[str, Any]], close: bool = False) -> None:
        """gpuSeconds = finished attempts' total + the current attempt's, recomputed from its pods;
        energyJoules likewise from the current attempt's last report (close: the attempt ends)."""
        st = self.status
        live = gp.gpu_seconds(current, build.gpus(self.spec), self.now)
        st.gpu_seconds = round(st.gpu_seconds_previous + live, 1)
        st.energy_joules = pr.energy_total(st.energy_joules_previous, self.attempt_energy)
        if close:
            st.gpu_seconds_previous = st.gpu_seconds
            st.energy_joules_previous = st.energy_joules

    # the decision -----------------------------------------------------------
    def run(self) -> Plan:
        st, spec = self.status, self.spec
        st.observed_generation = self.generation
        if (invalid := get_condition(st.conditions, "Invalid")) and invalid.status == "True":
            self.condition("Invalid", False, "Valid", "spec is valid")
        attempt = st.attempt
        current = [p for p in self.pods if gp.attempt(p) == attempt]
        old = [p for p in self.pods if gp.attempt(p) != attempt]
        self.attempt_energy = pr.lift(st, self.pods, finished=st.phase in FINISHED)
        for message in recoveries.resolve(st, self.pods):
            self.event("Normal", "Recovered", message)

        if st.phase in FINISHED:
            return self.finished(current + old)
        if spec.suspend:
            return self.suspend(current + old)
        if st.phase == "Suspended":
            self.condition("Suspended", False, "Resumed", "job resumed")
            st.attempt += 1
            self.set_phase("Pending", "Resumed", "TrainingJob resumed; recreating the gang")
            return self.rerun()
        if not self.prereq.ready:
            self.condition(self.prereq.condition, False, self.prereq.reason, self.prereq.message)
            if st.phase is None:
                st.phase = "Pending"
            self.plan.requeue_after = PREREQ_RETRY_SECONDS
            return self.plan
        if self.prereq.condition != "Ready":
            self.condition(self.prereq.condition, True, self.prereq.reason or "Ready", self.prereq.message)

        start = gp.parse_ts(st.start_time)
        if (
            spec.active_deadline_seconds
            and start
            and (self.now - start).total_seconds() > spec.active_deadline_seconds
        ):
            return self.fail(
                "DeadlineExceeded",
                f"job ran longer than activeDeadlineSeconds={spec.active_deadline_seconds}",
                current + old,
            )
        if old:
            # Finish tearing down the previous attempt before anything of this one starts.
            self.delete_pods(old)
            self.plan.requeue_after = 1
            return self.plan
        if self.queue is not None and not self.admitted(current):
            return self.plan
        current = self.resize(current)  # a changed spec.nodes: never a failure (planner_resize)
        current = self.drop_superseded(current)  # pods a ReplaceNode replacement took over
        if self.finished_with_standby(current):
            self.gpu_accounting(current, close=True)
            return self.succeed(current)
        if self.handle_failures(current):
            return self.plan
        expected = self.gang_target(current)
        if current and len(current) >= expected and all(gp.phase(p) == "Succeeded" for p in current):
            self.gpu_accounting(current, close=True)
            return self.succeed(current)

        st.excluded_nodes = [n for n in st.excluded_nodes if not health_of(self.health, n).healthy]
        restart_after = gp.parse_ts(st.restart_after)
        if restart_after and self.now < restart_after:
            self.plan.requeue_after = max(0.5, (restart_after - self.now).total_seconds())
            return self.plan
        st.restart_after = None

        have = {gp.rank(p) for p in current}
        missing = [r for r in range(expected) if r not in have]
        for rank in missing:
            if not self.spare_may_start(current, rank):
                self.plan.requeue_after = min(self.plan.requeue_after, 1.0)  # a pod event wakes it sooner
                continue
            self.plan.create.append(
                build.pod(self.owner, spec, rank, st.attempt, st.excluded_nodes, self.queue_placement())
            )
        if missing and not current:
            st.start_time = st.start_time or gp.ts(self.now)
            self.event(
                "Normal",
                "CreatingGang",
                f"creating {expected - self.spares()} pod(s) for attempt {st.attempt}"
                + (f" (+{self.spares()} standby spare(s) once they are placed)" if self.spares() else "")
                + (f", avoiding {', '.join(st.excluded_nodes)}" if st.excluded_nodes else ""),
            )
            self.condition("Created", True, "GangCreated", f"attempt {st.attempt}: {expected} pod(s)")

        if self.scheduling(current, expected):
            return self.plan
        ready = sum(1 for p in current if gp.ready(p))
        st.ready_nodes = ready
        # Standby spares are shown apart: NODES reads as the gang the user asked for.
        asked = expected - self.spares()
        st.nodes = f"{min(ready, asked)}/{asked}"
        st.spares = max(0, ready - asked)
        self.gpu_accounting(current)
        # elastic with fewer nodes, or standbys waiting for one: the waiting pods join when placed
        short = self.running_short(current) or self.spares_waiting(current)
        phases = [gp.phase(p) for p in current if not (short and gp.phase(p) == "Pending")]
        whole = not missing or self.growing  # an elastic gang adding ranks in place keeps running
        if current and whole and "Running" in phases and set(phases) <= {"Running", "Succeeded"}:
            # Ranks exit 0 one by one at the end: those that finished still count as running.
            done = phases.count("Succeeded")
            running = f"{len(phases) - done} pod(s) running" + (f", {done} finished" if done else "")
            if waiting := len(current) - len(phases):
                running += f", {waiting} waiting for a node (elastic: training with fewer meanwhile)"
            self.condition("Running", True, "AllPodsRunning", running)
            self.condition("Restarting", False, "AllPodsRunning")
            self.set_phase("Running", "Running", f"{running} (attempt {st.attempt})")
        elif st.phase not in ("Restarting",):
            st.phase = "Pending"
        if spec.active_deadline_seconds and st.start_time:
            # Nothing else would wake a quiet job when its deadline passes.
            left = spec.active_deadline_seconds - (self.now - gp.parse_ts(st.start_time)).total_seconds()
            self.plan.requeue_after = min(self.plan.requeue_after, max(1.0, left + 1))
        return self.plan

    def restart(self, current: list[dict[str, Any]], delay: int) -> None:
        st = self.status
        self.gpu_accounting(current, close=True)
        st.attempt += 1
        if delay:
            # Status times have 1 s resolution: round up so the backoff is never shorter than asked.
            at = self.now + dt.timedelta(seconds=delay)
            st.restart_after = gp.ts(
                at.replace(microsecond=0) + dt.timedelta(seconds=1 if at.microsecond else 0)
            )
        else:
            st.restart_after = None
        st.ready_nodes = 0
        self.condition("Running", False, "Restarting", f"gang restarting as attempt {st.attempt}")
        self.condition(
            "Restarting",
            True,
            st.last_failure.reason if st.last_failure else "Restart",
            st.last_failure.message if st.last_failure else "",
        )
        self.set_phase("Restarting", "Restarting", f"restarting the gang as attempt {st.attempt}")
        self.delete_pods(current)
        self.plan.requeue_after = 1

    def rerun(self) -> Plan:
        self.plan.requeue_after = 0.5
        return self.plan

    def fail(self, reason: str, message: str, pods: list[dict[str, Any]]) -> Plan:
        st = self.status
        current = [p for p in pods if gp.attempt(p) == st.attempt]
        self.gpu_accounting(current, close=True)
        st.completion_time = gp.ts(self.now)
        self.finished_figures(current)
        self.condition("Running", False, reason, message)
        self.condition("Failed", True, reason, message)
        self.set_phase("Failed", reason, message)
        self.cleanup(pods)
        return self.plan

    def succeed(self, pods: list[dict[str, Any]]) -> Plan:
        st = self.status
        st.completion_time = gp.ts(self.now)
        self.finished_figures(pods)
        self.condition("Running", False, "Completed")
        self.condition("Succeeded", True, "Completed", "all pods exited 0")
        self.set_phase("Succeeded", "Completed", "TrainingJob succeeded")
        self.cleanup(pods)
        return self.plan

    def finished_figures(self, current: list[dict[str, Any]]) -> None:
        """A finished job has nothing ready and nothing left to wait for: NODES reads like a Job's
        completions (pods that exited 0 / gang size), never a stale ready count or '0/N'."""
        st = self.status
        st.ready_nodes = 0
        size = max(self.gang_size(current), len(current)) - self.spares()  # spares are no nodes asked for
        done = sum(1 for p in current if gp.phase(p) == "Succeeded")
        st.nodes, st.spares = f"{min(done, size)}/{size}", 0
        pr.clear_eta(st)

    def cleanup(self, pods: list[dict[str, Any]]) -> None:
        self.finish_workload()
        policy = self.spec.clean_pod_policy
        if policy == "All":
            self.delete_pods(pods)
        elif policy == "Running":
            self.delete_pods([p for p in pods if gp.phase(p) in ("Pending", "Running")])
        self.schedule_ttl()

    def finished(self, pods: list[dict[str, Any]]) -> Plan:
        self.cleanup(pods)
        return self.plan

    def schedule_ttl(self) -> None:
        ttl, done = self.spec.ttl_seconds_after_finished, gp.parse_ts(self.status.completion_time)
        if ttl is None or done is None:
            self.plan.requeue_after = RESYNC_SECONDS
            return
        left = (done + dt.timedelta(seconds=ttl) - self.now).total_seconds()
        if left <= 0:
            self.plan.delete_job = True
            self.event("Normal", "TTLExpired", f"deleting the job {ttl}s after it finished")
        else:
            self.plan.requeue_after = left

    def suspend(self, pods: list[dict[str, Any]]) -> Plan:
        if self.status.phase != "Suspended":
            self.gpu_accounting([p for p in pods if gp.attempt(p) == self.status.attempt], close=True)
        self.delete_pods(pods)
        self.suspend_workload(pods)
        self.status.ready_nodes = 0
        self.status.nodes = f"0/{self.spec.nodes}"
        self.condition("Suspended", True, "Suspended", "spec.suspend is true; pods deleted")
        self.condition("Running", False, "Suspended")
        self.set_phase("Suspended", "Suspended", "TrainingJob suspended; pods deleted, status kept")
        self.plan.requeue_after = RESYNC_SECONDS
        return self.plan


def plan(
    body: dict[str, Any],
    spec: TrainingJobSpec,
    pods: list[dict[str, Any]],
    health: Mapping[str, NodeHealth],
    now: dt.datetime,
    prereq: Prerequisites = Prerequisites(),
    queue: Gate | None = None,
) -> Plan:
    """The next step for one TrainingJob (body: the object as read, for identity and last status;
    health: by node name, a missing name being a deleted node; the cache serves it lazily, so a pass
    looks only at the nodes it asks about; queue: what Kueue allows, for a job in a Kueue queue)."""
    try:
        status = TrainingJobStatus.model_validate(body.get("status") or {})
    except ValueError:
        status = TrainingJobStatus()  # a status we cannot read is rebuilt from the world, not fatal
    owner = Owner.of(body)
    return _Planner(
        owner,
        body["metadata"].get("generation", 0),
        spec,
        status,
        pods,
        health,
        prereq,
        now,
        queue,
    ).run()
