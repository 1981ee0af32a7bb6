"""Answers that cannot wait for a slow source: a query bounded in time, else what it said last time.

`status` asks the index and every holder of a disk. A host that just went down costs a lookup the
index's RPC timeout (5 s) per silent node, and a peer request its own timeout; a person asking for the
status should not wait for either when an earlier answer is known. ``Recall.get`` starts the query in
the background (the node's nursery, so it runs to its end and its result, or the index learning that a
node is silent, is kept for the next time), waits for it until a deadline and, past it, answers with
the last result it had for the same key. With no earlier result it waits for this one: the first
answer has to come from somewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """A query's result (``fresh``: from this run; else the last one before it), or why there is none."""

    value: Any = None  # None: no result at all (this run failed, and none is remembered)
    fresh: bool = False
    error: BaseException | None = None  # this run's failure (also when a remembered value stands in)


@dataclass
class _Run:
    done: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None


class Recall:
    """The last result of each query, by key, and the query for it under way (one at a time per key).

    Keys are a disk and a host, or an index key: as many as the swarm has hosts and disks."""

    def __init__(self, nursery: Callable[[], trio.Nursery | None]) -> None:
        self._nursery = nursery
        self._last: dict[Hashable, Any] = {}
        self._running: dict[Hashable, _Run] = {}

    def last(self, key: Hashable) -> Any:
        return self._last.get(key)

    async def get(self, key: Hashable, query: Callable[[], Awaitable[Any]], deadline: float) -> Answer:
        """The result of ``query`` if it ends before ``deadline`` (trio time), else the last one for ``key``
        (``fresh`` False), else, with none, this one whenever it ends. A failure is an Answer's error; with
        a remembered value, that value comes with it."""
        run = self._running.get(key)
        if run is None:
            run = self._running[key] = _Run()
            nursery = self._nursery()
            if nursery is None:  # the node is not running: nothing to outlive this call
                await self._run(key, run, query)
            else:
                nursery.start_soon(self._run, key, run, query)
        with trio.move_on_after(max(0.0, deadline - trio.current_time())):
            await run.done.wait()
        if not run.done.is_set():
            if key in self._last:
                return Answer(self._last[key], fresh=False)
            await run.done.wait()
        if run.error is not None:
            return Answer(self._last.get(key), fresh=False, error=run.error)
        return Answer(run.value, fresh=True)

    async def _run(self, key: Hashable, run: _Run, query: Callable[[], Awaitable[Any]]) -> None:
        try:
            run.value = await query()
            self._last[key] = run.value
        except Exception as e:  # the caller's to judge (a host down is an answer too)
            run.error = e
        finally:
            if self._running.get(key) is run:
                del self._running[key]
            run.done.set()
