"""The reconcile work queue: a burst costs one pass per object, in order, never two at once."""

from __future__ import annotations

import asyncio

from aidc_operator.workqueue import WorkQueue


def run(coro):
    return asyncio.run(coro)


def test_adds_are_deduplicated_and_served_in_first_added_order() -> None:
    async def main() -> list[str]:
        q: WorkQueue[str] = WorkQueue()
        for k in ["a", "b", "a", "c", "b", "a"]:
            q.add(k)
        assert len(q) == 3
        out = []
        for _ in range(3):
            key, _waited = await q.get()
            out.append(key)
            q.done(key)
        return out

    assert run(main()) == ["a", "b", "c"]


def test_a_key_being_processed_is_not_handed_out_again_until_done() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        key, _ = await q.get()
        q.add("a")  # changed while its pass runs
        assert len(q) == 0  # not given to a second worker
        q.done(key)
        assert len(q) == 1  # runs again, once, after
        again, _ = await q.get()
        assert again == "a"

    run(main())


def test_the_latest_schedule_wins_and_forgotten_keys_never_come_back() -> None:
    now = [0.0]

    async def main() -> None:
        q: WorkQueue[str] = WorkQueue(clock=lambda: now[0])
        q.schedule("a", 1.0)
        q.schedule("a", 300.0)  # the newer pass knows better
        q.schedule("b", 5.0)
        q.schedule("gone", 2.0)
        q.forget("gone")
        now[0] = 10.0
        assert q.pop_due() == 290.0
        assert len(q) == 1
        key, _ = await q.get()
        assert key == "b"
        now[0] = 301.0
        assert q.pop_due() is None
        key, _ = await q.get()
        assert key == "a"

    run(main())


def test_memory_is_bounded_by_distinct_keys_not_by_events() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        for _ in range(50):
            for k in range(1000):
                q.add(k)
                q.schedule(k, 60.0)
        assert len(q) == 1000
        assert len(q._due) == 1000
        assert len(q._heap) <= 2 * 1000 + 64

    run(main())
