"""Kubernetes-style conditions: one entry per type, lastTransitionTime moves only when status changes."""

from __future__ import annotations

from .api.base import Condition


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> None:
    for c in conditions:
        if c.type == type_:
            if c.status != status:
                c.last_transition_time = now
            c.status, c.reason, c.message, c.observed_generation = status, reason, message, generation
            return
    conditions.append(
        Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=generation,
        )
    )


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
