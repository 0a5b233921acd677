"""How often the training loop does its periodic work, on an injectable clock (tests pass a fake one,
so they count steps instead of depending on how fast the machine runs)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]
DEFAULT_CLOCK: Clock = time.monotonic


def sync_interval_vote(step_seconds: float, target_seconds: float, max_steps: int) -> int:
    """Steps between control syncs this rank asks for: about ``target_seconds`` apart, at most
    ``max_steps`` (fast steps: the sync's cost stays negligible), at least 1 (slow steps: a stop
    request must land well inside the pod's termination grace period)."""
    if step_seconds <= 0:
        return max_steps
    return max(1, min(max_steps, int(target_seconds / step_seconds)))


class Every:
    """Due at most once per ``seconds`` of ``clock``; the first time is always due."""

    def __init__(self, seconds: float, clock: Clock = DEFAULT_CLOCK) -> None:
        self.seconds, self.clock = seconds, clock
        self.last = -math.inf

    def due(self, force: bool = False) -> bool:
        now = self.clock()
        if force or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


class Rate:
    """Steps per second over the window since the previous :meth:`update` (or since ``start``)."""

    def __init__(self, step: int, clock: Clock = DEFAULT_CLOCK) -> None:
        self.clock = clock
        self._from = (clock(), step)

    def update(self, step: int) -> float | None:
        now, (t0, s0) = self.clock(), self._from
        if step <= s0 or now <= t0:
            return None  # nothing new to measure: keep the window open
        self._from = (now, step)
        return (step - s0) / (now - t0)
