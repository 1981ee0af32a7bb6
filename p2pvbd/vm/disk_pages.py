"""Which of a VM's memory pages are disk content: the guest's page cache holds what it recently read and
wrote, and a move's destination holds a replica of the disks, current once they converged.

The hook controller records, per disk, the extents guests touched most recently (:class:`RecentExtents`,
bounded by a constant, never by the disk's size). When a VM moves, :func:`index_pages` reads the newest
of them, up to twice the VM's memory, from this host's disks and maps each 4 KiB page's digest to where
it lies, so the relay can send such a page as a reference to the destination's replica. A page that
changed meanwhile on either side only fails the destination's digest check: it is then sent in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from p2pvbd.store.recent_extents import EXTENT_BYTES as EXTENT_BYTES
from p2pvbd.store.recent_extents import MAX_RECENT_BYTES as MAX_RECENT_BYTES
from p2pvbd.store.recent_extents import RecentExtents as RecentExtents
from p2pvbd.vm.ram_image import page_digest
from p2pvbd.wire.qemu_stream import PAGE_SIZE

_ZERO = bytes(PAGE_SIZE)


class Readable(Protocol):
    @property
    def size(self) -> int: ...
    def read(self, offset: int, length: int) -> bytes: ...


def index_pages(disks: Sequence[tuple[Readable, list[int]] | None]) -> dict[bytes, tuple[int, int]]:
    """digest -> (disk number, byte offset) of the non-zero pages in the given extents of each disk (None:
    a disk not here). Blocking reads and hashing: a worker thread's."""
    pages: dict[bytes, tuple[int, int]] = {}
    for number, entry in enumerate(disks):
        if entry is None:
            continue
        store, extents = entry
        for start in extents:
            length = min(EXTENT_BYTES, store.size - start)
            if length < PAGE_SIZE:
                continue
            data = store.read(start, length - length % PAGE_SIZE)
            for at in range(0, len(data), PAGE_SIZE):
                page = data[at:at + PAGE_SIZE]
                if page != _ZERO:  # QEMU sends a zero page as a flag: no reference needed
                    pages.setdefault(page_digest(page), (number, start + at))
    return pages
