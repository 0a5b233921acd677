"""DynamicBatcher: coalesces concurrent requests, respects limits, never mixes shapes."""

import asyncio
import threading
import time

import numpy as np
import pytest

from aidc_server.batching import DynamicBatcher, concat, signature, split


def rows_of(n, width=3, fill=0.0, dtype=np.float32):
    return {"x": np.full((n, width), fill, dtype=dtype)}


def test_concat_and_split_are_inverse():
    parts = [rows_of(1, fill=1), rows_of(3, fill=2), rows_of(2, fill=3)]
    joined = concat(parts)
    assert joined["x"].shape == (6, 3)
    for original, piece in zip(parts, split(joined, [1, 3, 2]), strict=True):
        np.testing.assert_array_equal(original["x"], piece["x"])


def test_signature_separates_incompatible_requests():
    assert signature(rows_of(1)) == signature(rows_of(5))
    assert signature(rows_of(1)) != signature(rows_of(1, width=4))
    assert signature(rows_of(1)) != signature(rows_of(1, dtype=np.float64))


class FakeClock:
    """The batcher's forward-pass clock: moves only when a Recorder says its pass took time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A real predict function (row sums) that remembers each batch it ran.

    `delay` really sleeps (to let requests pile up); `cost` is what the pass "took" on `clock`,
    so timing decisions do not depend on the machine's speed.
    """

    def __init__(self, delay: float = 0.0, cost: float = 0.0, clock: FakeClock | None = None) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.cost = cost
        self.clock = clock or FakeClock()
        self.threads: set[str] = set()
        self.ran_on: list[str] = []  # the thread of each batch

    def __call__(self, inputs):
        self.threads.add(threading.current_thread().name)
        self.ran_on.append(threading.current_thread().name)
        self.batches.append(inputs["x"].shape[0])
        time.sleep(self.delay)
        self.clock.now += self.cost
        return "v1", {"y": inputs["x"].sum(axis=1, keepdims=True)}


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_answered_in_order():
    recorder = Recorder(delay=0.02)

    async def main():
        batcher = DynamicBatcher(recorder, max_batch_size=8, max_latency_s=0.05)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows_of(1, fill=i)) for i in range(20)))
        await batcher.close()
        return results

    results = run(main())
    for i, (tag, out) in enumerate(results):
        assert tag == "v1"
        np.testing.assert_array_equal(out["y"], [[3.0 * i]])
    assert sum(recorder.batches) == 20
    assert max(recorder.batches) == 8, recorder.batches
    assert recorder.threads == {t for t in recorder.threads if t.startswith("aidc-infer")}


def test_batches_never_exceed_max_rows_and_oversized_requests_run_alone():
    recorder = Recorder()

    async def main():
        batcher = DynamicBatcher(recorder, max_batch_size=4, max_latency_s=0.05)
        batcher.start()
        await asyncio.gather(*(batcher.submit(rows_of(n)) for n in (3, 3, 2, 9, 1)))
        await batcher.close()

    run(main())
    assert 9 in recorder.batches and sum(recorder.batches) == 18
    assert all(b <= 4 for b in recorder.batches if b != 9), recorder.batches


def test_incompatible_shapes_go_to_separate_batches():
    recorder = Recorder()

    async def main():
        batcher = DynamicBatcher(recorder, max_batch_size=16, max_latency_s=0.05)
        batcher.start()
        out = await asyncio.gather(
            batcher.submit(rows_of(1, width=3)),
            batcher.submit(rows_of(1, width=5)),
            batcher.submit(rows_of(1)),
        )
        await batcher.close()
        return out

    out = run(main())
    assert sorted(recorder.batches) == [1, 2]
    assert [o["y"].shape for _, o in out] == [(1, 1)] * 3


def test_lone_request_does_not_wait_for_the_latency_budget():
    recorder = Recorder()

    async def main():
        # An hour of latency budget: answered at all within the (generous) wait means not waited for.
        batcher = DynamicBatcher(recorder, max_batch_size=32, max_latency_s=3600, pending_arrivals=lambda: 0)
        batcher.start()
        answer = await asyncio.wait_for(batcher.submit(rows_of(1)), timeout=120)
        await batcher.close()
        return answer

    assert run(main())[0] == "v1"
    assert recorder.batches == [1]


def test_waits_for_a_request_still_arriving_and_batches_it():
    recorder = Recorder()
    arriving = [1]  # the server's count of requests mid-upload

    async def main():
        batcher = DynamicBatcher(
            recorder, max_batch_size=32, max_latency_s=3600, pending_arrivals=lambda: arriving[0]
        )
        batcher.start()
        first = asyncio.create_task(batcher.submit(rows_of(1)))
        for _ in range(100):  # loop turns, not seconds: plenty for the batcher to take `first`
            await asyncio.sleep(0)
        # Taken, but with someone on the way it waits for them instead of running it alone.
        assert batcher.queue_depth == 0 and recorder.batches == [] and not first.done()
        arriving[0] = 0  # the upload finished: that request is now queued
        second = asyncio.create_task(batcher.submit(rows_of(1)))
        await asyncio.wait_for(asyncio.gather(first, second), timeout=120)
        await batcher.close()

    run(main())
    assert recorder.batches == [2]


def test_stops_waiting_for_arrivals_at_the_latency_deadline():
    recorder = Recorder()

    async def main():
        # Someone is forever "arriving": the lone request still runs once its budget is spent.
        batcher = DynamicBatcher(recorder, max_batch_size=32, max_latency_s=0.05, pending_arrivals=lambda: 1)
        batcher.start()
        started = time.monotonic()
        await asyncio.wait_for(batcher.submit(rows_of(1)), timeout=120)
        waited = time.monotonic() - started
        await batcher.close()
        return waited

    assert run(main()) >= 0.05  # a lower bound only: a slow machine waits longer, never shorter
    assert recorder.batches == [1]


def test_an_empty_request_is_answered_and_does_not_break_timing():
    """A request of zero rows (shape [0, 3]) used to raise ZeroDivisionError in the batcher."""
    clock = FakeClock()
    recorder = Recorder(cost=0.0001, clock=clock)

    async def main():
        batcher = DynamicBatcher(recorder, max_batch_size=32, inline_max_s=0.001, clock=clock)
        batcher.start()
        empty = await batcher.submit(rows_of(0))
        after = [await batcher.submit(rows_of(1, fill=i)) for i in range(3)]
        await batcher.close()
        return empty, after

    (tag, out), after = run(main())
    assert tag == "v1" and out["y"].shape == (0, 1)
    assert [float(o["y"][0, 0]) for _, o in after] == [0.0, 3.0, 6.0]
    assert recorder.batches == [0, 1, 1, 1]


def test_a_failing_request_does_not_fail_its_batch_mates():
    def predict(inputs):
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return "v", {"y": inputs["x"] * 2}

    async def main():
        batcher = DynamicBatcher(predict, max_batch_size=8, max_latency_s=0.05, pending_arrivals=lambda: 1)
        batcher.start()
        out = await asyncio.gather(
            batcher.submit(rows_of(1, fill=1)),
            batcher.submit(rows_of(1, fill=-1)),
            batcher.submit(rows_of(1, fill=2)),
            return_exceptions=True,
        )
        await batcher.close()
        return out

    good1, bad, good2 = run(main())
    assert isinstance(bad, ValueError)
    np.testing.assert_array_equal(good1[1]["y"], np.full((1, 3), 2.0))
    np.testing.assert_array_equal(good2[1]["y"], np.full((1, 3), 4.0))


def test_close_finishes_queued_work_then_refuses_more():
    recorder = Recorder(delay=0.01)

    async def main():
        batcher = DynamicBatcher(recorder, max_batch_size=2, max_latency_s=0.0)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(rows_of(1))) for _ in range(6)]
        await asyncio.sleep(0)
        await batcher.close()
        assert all(t.done() and not t.exception() for t in tasks)
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.submit(rows_of(1))

    run(main())
    assert sum(recorder.batches) == 6


def test_invalid_max_batch_size():
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=0)


def test_quick_lone_requests_skip_the_thread_hop_slow_or_large_ones_do_not():
    def recorder(cost: float) -> Recorder:
        return Recorder(cost=cost, clock=FakeClock())

    quick, slow = recorder(0.0001), recorder(0.005)

    async def lone_requests(predict: Recorder, n_rows):
        batcher = DynamicBatcher(predict, max_batch_size=32, inline_max_s=0.001, clock=predict.clock)
        batcher.start()
        answers = [await batcher.submit(rows_of(n, fill=i)) for i, n in enumerate(n_rows)]
        await batcher.close()
        return answers

    answers = run(lone_requests(quick, [1] * 5))
    # The first pass is measured on the worker thread; once known to be quick, the event loop
    # (this thread) runs lone requests itself, with the same answers.
    assert quick.threads == {"aidc-infer_0", threading.current_thread().name}
    assert [float(out["y"][0, 0]) for _, out in answers] == [0.0, 3.0, 6.0, 9.0, 12.0]

    run(lone_requests(slow, [1] * 3))
    assert slow.threads == {"aidc-infer_0"}  # 5 ms would stall every other connection

    big = recorder(0.0001)
    run(lone_requests(big, [1, 1, 100_000]))  # a huge request is estimated per row: worker
    assert big.batches == [1, 1, 100_000]
    assert big.ran_on == ["aidc-infer_0", threading.current_thread().name, "aidc-infer_0"]


def test_a_new_model_version_is_timed_on_the_worker_before_it_may_run_inline():
    clock = FakeClock()
    swapped = Recorder(cost=0.0001, clock=clock)

    async def around_a_swap():
        batcher = DynamicBatcher(swapped, max_batch_size=32, inline_max_s=0.001, clock=clock)
        batcher.start()
        await batcher.submit(rows_of(1))
        await batcher.submit(rows_of(1))  # known quick: inline
        batcher.forget_timing()  # what the server does after a hot swap
        await batcher.submit(rows_of(1))
        await batcher.close()

    run(around_a_swap())
    here = threading.current_thread().name
    assert swapped.ran_on == ["aidc-infer_0", here, "aidc-infer_0"]
