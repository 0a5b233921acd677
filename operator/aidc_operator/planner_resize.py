"""The TrainingJob planner's side of a declared resize: `spec.nodes` (or an elastic job's range) edited
while a gang runs. Never a failure and never a restart budget spent:

- a static gang keeps the size its pods were started with (their WORLD_SIZE) until its next start;
  until then condition ResizePending says both numbers;
- an elastic gang grows or shrinks in place (pods added or removed at the top ranks; torchrun's c10d
  rendezvous re-forms the gang), as long as spec.nodes lies within the range its pods were started with
  and no queueing system (Kueue) holds its quota; otherwise the change waits for the next gang start.

A mixin of lifecycle._Planner (same state, split for size); pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import gang_pods as gp
from .api.trainingjob import TrainingJobSpec, TrainingJobStatus
from .conditions import get_condition
from .recovery import NodeHealth, healthy_nodes

if TYPE_CHECKING:
    from .queueing import Gate

RESIZE_PENDING = "ResizePending"


def pod_env(pod: dict[str, Any], name: str) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for var in container.get("env") or []:
            if var.get("name") == name and isinstance(var.get("value"), str):
                return var["value"]
    return None


def started_size(current: list[dict[str, Any]]) -> int | None:
    """The gang size a static attempt's pods were started with (torchrun's --nnodes: N, or N:N for a
    fixed-size c10d rendezvous), if they say."""
    for pod in current:
        low, _, high = (pod_env(pod, "PET_NNODES") or "").partition(":")
        if low.isdigit() and (not high or high == low):
            return int(low)
    return None


def started_range(current: list[dict[str, Any]]) -> tuple[int, int] | None:
    """The [min, max] an elastic attempt's pods rendezvous with (PET_NNODES 'min:max')."""
    for pod in current:
        low, sep, high = (pod_env(pod, "PET_NNODES") or "").partition(":")
        if sep and low.isdigit() and high.isdigit():
            return int(low), int(high)
    return None


class ResizePlanning:
    """Resize decisions of the planner; the state and the primitives are _Planner's."""

    if TYPE_CHECKING:
        spec: TrainingJobSpec
        status: TrainingJobStatus
        health: Mapping[str, NodeHealth]
        queue: Gate | None

        def event(self, type_: str, reason: str, message: str) -> None: ...
        def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None: ...
        def delete_pods(self, pods: list[dict[str, Any]]) -> None: ...
        def spares(self) -> int: ...

    growing = False  # an elastic gang is adding ranks in place: it stays Running meanwhile

    def gang_size(self, current: list[dict[str, Any]]) -> int:
        """Pods the current attempt was started with (what a lost pod is counted against): a static
        gang's size from its pods, plus its standby spares, an elastic gang's highest rank + 1; with no
        pods yet, the size a new attempt gets: spec.nodes (+ spares), or for an elastic job as many as
        there are healthy nodes (not fewer than minNodes)."""
        spec = self.spec
        if current:
            if not spec.elastic:
                return (started_size(current) or spec.nodes) + self.spares()
            return max(gp.rank(p) for p in current) + 1
        if not spec.elastic:
            return spec.nodes + self.spares()
        usable = healthy_nodes(self.health) - set(self.status.excluded_nodes)
        return max(spec.elastic.min_nodes, min(spec.nodes, len(usable)))

    def asked_size(self, current: list[dict[str, Any]]) -> int:
        """The nodes the gang asked for: its size without the standby spares."""
        return self.gang_size(current) - self.spares()

    def gang_target(self, current: list[dict[str, Any]]) -> int:
        """Pods the current attempt should have now: its size, or an elastic gang's in-place target."""
        size = self.gang_size(current)
        if not current or not self.in_place(current):
            return size
        spec = self.spec
        if spec.nodes <= size:
            return spec.nodes
        usable = healthy_nodes(self.health) - set(self.status.excluded_nodes)
        return min(spec.nodes, max(size, len(usable)))

    def running_short(self, current: list[dict[str, Any]]) -> bool:
        """An elastic gang trains in place with at least minNodes while its other pods wait for a node
        (a lost node's replacement with no capacity left): it runs on, and grows back when they start."""
        elastic = self.spec.elastic
        if elastic is None or not self.in_place(current):
            return False
        phases = [gp.phase(p) for p in current if not p["metadata"].get("deletionTimestamp")]
        return "Pending" in phases and phases.count("Running") >= elastic.min_nodes

    def in_place(self, current: list[dict[str, Any]]) -> bool:
        """An elastic gang resizes in place while its pods rendezvous within the spec's range (pods built
        now join the same rendezvous); a static gang's --nnodes is fixed, and Kueue admitted a fixed pod
        count."""
        elastic = self.spec.elastic
        if elastic is None or self.queue is not None:
            return False
        started = started_range(current)
        return started is None or started == (elastic.min_nodes, elastic.max_nodes)

    def resize(self, current: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply or declare a change of spec.nodes / the elastic range; returns the pods that stay in
        the gang (an elastic gang's removed top ranks are being deleted, not lost)."""
        if not current:
            self.resize_settled(self.gang_size(current))
            return current
        spec, size = self.spec, self.gang_size(current)
        if self.in_place(current):
            target = self.gang_target(current)
            extra = [p for p in current if gp.rank(p) >= target]
            if any(not p["metadata"].get("deletionTimestamp") for p in extra):
                self.event(
                    "Normal",
                    "Resizing",
                    f"shrinking the elastic gang from {size} to {target} node(s) in place, as spec.nodes "
                    "asks; it re-forms at the next rendezvous",
                )
            elif target > size:
                self.growing = True
                self.event(
                    "Normal",
                    "Resizing",
                    f"growing the elastic gang from {size} to {target} node(s) in place (spec.nodes: "
                    f"{spec.nodes}); it re-forms at the next rendezvous",
                )
            self.delete_pods(extra)
            self.resize_settled(target)
            return [p for p in current if gp.rank(p) < target]
        size = self.asked_size(current)
        started = started_range(current) if spec.elastic else None
        wanted = (spec.elastic.min_nodes, spec.elastic.max_nodes) if spec.elastic else None
        if started and wanted and started != wanted:
            self.resize_pending(
                f"spec.nodes is {spec.nodes} within [{wanted[0]}, {wanted[1]}]; the running gang has "
                f"{size} node(s) within [{started[0]}, {started[1]}]: the new range applies at the next "
                "gang start (suspend and resume the job to apply it now)"
            )
        elif spec.nodes != size:
            self.resize_pending(
                f"spec.nodes is {spec.nodes}; the running gang has {size} node(s): the new size applies "
                "at the next gang start (suspend and resume the job to apply it now)"
            )
        else:
            self.resize_settled(size)
        return current

    def resize_pending(self, message: str) -> None:
        have = get_condition(self.status.conditions, RESIZE_PENDING)
        if have is None or have.status != "True" or have.message != message:
            self.event("Normal", RESIZE_PENDING, message)
        self.condition(RESIZE_PENDING, True, RESIZE_PENDING, message)

    def resize_settled(self, size: int) -> None:
        have = get_condition(self.status.conditions, RESIZE_PENDING)
        if have is None or have.status != "True":
            return  # no resize was ever pending: no condition to clutter the status with
        message = f"the gang has {size} node(s) as the spec asks"
        self.event("Normal", "Resized", message)
        self.condition(RESIZE_PENDING, False, "Resized", message)
