"""The disk extents guests touched most recently, per disk: bounded by a constant, never by the disk's size.

The hook controller records every guest read and write here; a VM move reads the newest extents to find
which of the VM's memory pages are disk content (vm/disk_pages.py). Pure bookkeeping: no I/O.
"""

from __future__ import annotations

from collections import OrderedDict

# What one record stands for: a guest's read-ahead is 128 KiB, a file system's extent larger.
EXTENT_BYTES = 64 * 1024
# At most this much of each disk is remembered as recently touched: twice the memory of a 4 GiB
# desktop guest (its page cache cannot hold more), 65536 records (~6 MiB) per disk.
MAX_RECENT_BYTES = 8 << 30


class RecentExtents:
    """The extents of one disk that guests read or wrote, newest last, at most ``capacity`` bytes of them."""

    def __init__(self, capacity: int = MAX_RECENT_BYTES) -> None:
        self._extents: OrderedDict[int, None] = OrderedDict()
        self._max = max(1, capacity // EXTENT_BYTES)

    def touch(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        extents = self._extents
        first, last = offset // EXTENT_BYTES, (offset + length - 1) // EXTENT_BYTES
        if first == last:  # the usual case, once per guest request: no range to build
            extents[first] = None
            extents.move_to_end(first)
        else:
            for e in range(first, last + 1):
                extents[e] = None
                extents.move_to_end(e)
        while len(extents) > self._max:
            extents.popitem(last=False)

    def newest(self, limit_bytes: int) -> list[int]:
        """Byte offsets of the newest extents, up to ``limit_bytes`` of them."""
        n = max(0, limit_bytes // EXTENT_BYTES)
        out = []
        for e in reversed(self._extents):
            if len(out) >= n:
                break
            out.append(e * EXTENT_BYTES)
        return out

    def __len__(self) -> int:
        return len(self._extents)
