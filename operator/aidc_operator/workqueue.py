"""A rate-free work queue with client-go's semantics, on the asyncio loop.

- A key is queued at most once however often it is added (a burst of events costs one pass).
- A key being processed is never handed to a second worker; added meanwhile, it runs again after.
- Keys come out in the order they were first added (1,000 creations are worked through in order).
- `schedule(key, delay)` sets the key's next timed pass (the latest call wins: the newest pass knows
  best when it needs to look again).
Memory is bounded by the number of distinct keys. Not thread-safe: call from the loop (other threads
use loop.call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._added_at: dict[K, float] = {}
        self._due: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._nonempty = asyncio.Event()
        self._timer_changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: K) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        self._added_at.setdefault(key, self.clock())
        if key not in self._processing:
            self._queue.append(key)
            self._nonempty.set()

    def schedule(self, key: K, delay: float) -> None:
        due = self.clock() + max(0.0, delay)
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        if len(self._heap) > 2 * len(self._due) + 64:  # superseded entries: rebuild from the live ones
            self._heap = [(d, next(self._seq), k) for k, d in self._due.items()]
            heapq.heapify(self._heap)
        self._timer_changed.set()

    def forget(self, key: K) -> None:
        """No timed pass for this key any more (the object is gone)."""
        self._due.pop(key, None)

    async def get(self) -> tuple[K, float]:
        """The next key and how long it waited in the queue."""
        while not self._queue:
            self._nonempty.clear()
            await self._nonempty.wait()
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key, self.clock() - self._added_at.pop(key, self.clock())

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._nonempty.set()

    def pop_due(self) -> float | None:
        """Queues every key whose time has come; returns seconds until the next one (None: none)."""
        now = self.clock()
        while self._heap:
            due, _, key = self._heap[0]
            if self._due.get(key) != due:
                heapq.heappop(self._heap)  # superseded by a later schedule() or forgotten
                continue
            if due > now:
                return due - now
            heapq.heappop(self._heap)
            del self._due[key]
            self.add(key)
        return None

    async def run_timer(self) -> None:
        while True:
            wait = self.pop_due()
            self._timer_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_changed.wait(), timeout=wait)
