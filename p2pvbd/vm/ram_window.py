"""The pieces of a VM's memory stream in flight from source to destination: admitted to the link in
the stream's order, while the bytes on it stay within a budget (vm/converge.py's StreamPace sets it).

A piece of pages the destination holds is a few bytes a page, one it lacks is its pages: counting pieces
alone either starves the link while references are hashed, or queues seconds of pages ahead of the
guest's pause. Pieces enter in order so that a later, smaller piece never takes the budget an earlier one
waits for (the destination feeds its QEMU in order, so that would wait forever).
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class WireWindow:
    def __init__(self) -> None:
        self.next_seq = 0
        self.in_flight = 0  # bytes admitted and not yet taken by the destination
        self._changed = trio.Event()

    async def enter(self, seq: int, size: int, budget: Callable[[], int]) -> None:
        """Wait until piece ``seq`` of ``size`` bytes is next and fits the budget (one piece always does)."""
        while seq != self.next_seq or (self.in_flight and self.in_flight + size > budget()):
            await self._changed.wait()
        self.next_seq += 1
        self.in_flight += size
        self._notify()

    def resize(self, old: int, new: int) -> None:
        """A piece admitted at ``old`` bytes goes again at ``new`` (the destination lacked pages)."""
        self.in_flight += new - old

    def leave(self, size: int) -> None:
        self.in_flight -= size
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
