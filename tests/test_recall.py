"""Recall: a bounded query answers fresh when it can, else with its last result, and runs to its end."""

from __future__ import annotations

import trio

from p2pvbd.swarm.recall import Recall


async def test_a_slow_or_failing_query_is_answered_from_its_last_result() -> None:
    async with trio.open_nursery() as nursery:
        recall = Recall(lambda: nursery)
        release = trio.Event()

        async def slow(value: int) -> int:
            await release.wait()
            return value

        async def fails() -> int:
            raise OSError("host down")

        # nothing known yet: the first answer is waited for, past the deadline
        async def let_go() -> None:
            await trio.sleep(0.05)
            release.set()
        nursery.start_soon(let_go)
        first = await recall.get("k", lambda: slow(1), trio.current_time())
        assert (first.value, first.fresh, first.error) == (1, True, None)

        release = trio.Event()
        late = await recall.get("k", lambda: slow(2), trio.current_time() + 0.01)
        assert (late.value, late.fresh) == (1, False)  # the last result stands in
        release.set()  # the query goes on in the background and is remembered
        await trio.testing.wait_all_tasks_blocked()
        assert recall.last("k") == 2

        down = await recall.get("k", fails, trio.current_time() + 1)
        assert (down.value, down.fresh) == (2, False) and isinstance(down.error, OSError)
        never = await recall.get("other", fails, trio.current_time() + 1)
        assert never.value is None and isinstance(never.error, OSError)
