"""Dynamic batching on asyncio: coalesce concurrent requests into one forward pass.

Requests are grouped by input signature (names, dtypes, per-row shapes) so only concatenable
tensors share a batch. A batch is dispatched when it holds `max_batch_size` rows, when its oldest
request has waited `max_latency`, or as soon as no other request is on its way in (the
`pending_arrivals` hint), so a lone request never idles for the full latency budget. Inference
runs on one worker thread; while it computes, new requests queue up and form the next batch.
A lone request whose forward pass has been measured shorter than a thread hand-off (`inline_max_s`)
runs on the event loop instead: for a small model the two thread switches cost more than the math.
A model on a GPU hands the batcher an allocator of pinned host memory: every request's rows are
copied once into one pinned buffer per input, which then goes to the GPU in a single transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
# predict(batch) -> (tag, outputs); the tag (the model version that ran) goes to every request.
PredictFn = Callable[[Arrays], tuple[Any, Arrays]]
# (shape, dtype) -> an uninitialised array to assemble a batch in (aidc_server.device.Allocator).
Allocator = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def signature(inputs: Arrays) -> tuple:
    """Requests with equal signatures can be concatenated along the first dimension."""
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


def rows(inputs: Arrays) -> int:
    return next(iter(inputs.values())).shape[0]


def concat(batch: list[Arrays], allocate: Allocator | None = None) -> Arrays:
    """One array per input with every request's rows; in `allocate`'s memory when given (even for a
    lone request: pinned memory is what makes the device copy one transfer)."""
    if len(batch) == 1 and allocate is None:
        return batch[0]
    out = {}
    for name in batch[0]:
        parts = [item[name] for item in batch]
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        buffer = (allocate or np.empty)(shape, parts[0].dtype)
        np.concatenate(parts, out=buffer)
        out[name] = buffer
    return out


def split(outputs: Arrays, sizes: list[int]) -> list[Arrays]:
    """Cut batched outputs back into per-request pieces (first dimension = rows)."""
    if len(sizes) == 1:
        return [outputs]
    bounds = np.cumsum(sizes)[:-1]
    pieces = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: pieces[name][i] for name in outputs} for i in range(len(sizes))]


@dataclass
class _Pending:
    inputs: Arrays
    rows: int
    key: tuple
    enqueued: float
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    def __init__(
        self,
        predict: PredictFn,
        max_batch_size: int = 32,
        max_latency_s: float = 0.005,
        pending_arrivals: Callable[[], int] = lambda: 0,
        on_batch: Callable[[int], None] = lambda size: None,
        inline_max_s: float = 0.0003,
        clock: Callable[[], float] = time.perf_counter,
        allocate: Allocator | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_latency_s = max(0.0, max_latency_s)
        self.pending_arrivals = pending_arrivals
        self.on_batch = on_batch
        self.inline_max_s = inline_max_s
        self.clock = clock  # times forward passes; injectable so tests need not depend on speed
        self.allocate = allocate  # batch buffers (pinned host memory for a GPU model); None: numpy
        # Moving average of a lone request's forward pass per row: an overestimate for more rows
        # (fixed costs dominate a small model), which errs towards the worker thread.
        self._row_s: float | None = None
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aidc-infer")
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aidc-batcher")

    async def close(self) -> None:
        """Finish everything queued, then stop the loop and the worker thread."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def forget_timing(self) -> None:
        """A new model version may be far slower: measure it on the worker thread before inlining."""
        self._row_s = None

    async def submit(self, inputs: Arrays) -> tuple[Any, Arrays]:
        """Queue one request (arrays with a leading batch dimension) and await its outputs."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, rows(inputs), signature(inputs), time.monotonic(), future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._collect()
            await self._execute(batch)

    async def _collect(self) -> list[_Pending]:
        """Take the oldest request plus compatible followers until full, late or nobody is coming."""
        first = self._queue.popleft()
        batch, size = [first], first.rows
        deadline = first.enqueued + self.max_latency_s
        while size < self.max_batch_size:
            taken = self._take_compatible(first.key, self.max_batch_size - size)
            for item in taken:
                batch.append(item)
                size += item.rows
            if size >= self.max_batch_size or self._closed:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.pending_arrivals() == 0:
                break
            # Someone is mid-upload: give them until the deadline to join.
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        return batch

    def _take_compatible(self, key: tuple, room: int) -> list[_Pending]:
        taken, kept = [], deque()
        while self._queue:
            item = self._queue.popleft()
            if item.key == key and item.rows <= room:
                taken.append(item)
                room -= item.rows
            else:
                kept.append(item)
        self._queue = kept
        return taken

    async def _execute(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # a client may have gone away
        if not live:
            return
        sizes = [p.rows for p in live]
        self.on_batch(sum(sizes))
        if len(live) == 1 and self._row_s is not None and self._row_s * sizes[0] <= self.inline_max_s:
            results = self._predict_batch(live, sizes)
        else:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._predict_batch, live, sizes)
        for p, result in zip(live, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    def _predict_batch(
        self, live: list[_Pending], sizes: list[int]
    ) -> list[tuple[Any, Arrays] | BaseException]:
        started = self.clock()
        try:
            tag, outputs = self.predict(concat([p.inputs for p in live], self.allocate))
            if len(live) == 1 and sizes[0] > 0:  # an empty request says nothing about the per-row cost
                row_s = (self.clock() - started) / sizes[0]
                self._row_s = row_s if self._row_s is None else 0.8 * self._row_s + 0.2 * row_s
            return [(tag, out) for out in split(outputs, sizes)]
        except Exception as e:
            if len(live) == 1:
                log.exception("inference failed for a request of %d rows", sizes[0])
                return [e]
        # One bad request must not fail its batch-mates: rerun them one by one.
        log.warning("batch of %d requests failed; retrying them one by one", len(live))
        return [self._predict_batch([p], [n])[0] for p, n in zip(live, sizes, strict=True)]
