"""RecentExtents: the newest extents guests touched, newest first, within its capacity."""

from __future__ import annotations

from p2pvbd.store.recent_extents import EXTENT_BYTES, RecentExtents


def test_newest_first_spans_counted_and_capacity_kept() -> None:
    r = RecentExtents(capacity=4 * EXTENT_BYTES)
    r.touch(0, 1)
    r.touch(3 * EXTENT_BYTES - 1, 2)  # spans extents 2 and 3
    r.touch(5 * EXTENT_BYTES + 7, 4096)
    r.touch(10, 0)  # nothing touched
    assert r.newest(10 * EXTENT_BYTES) == [5 * EXTENT_BYTES, 3 * EXTENT_BYTES, 2 * EXTENT_BYTES, 0]
    r.touch(2 * EXTENT_BYTES, 1)  # touched again: newest now
    r.touch(9 * EXTENT_BYTES, 1)  # a fifth extent: the oldest (0) goes
    assert r.newest(10 * EXTENT_BYTES) == [9 * EXTENT_BYTES, 2 * EXTENT_BYTES, 5 * EXTENT_BYTES, 3 * EXTENT_BYTES]
    assert r.newest(2 * EXTENT_BYTES) == [9 * EXTENT_BYTES, 2 * EXTENT_BYTES]
    assert len(r) == 4
