"""The memory a VM had when it left this host, kept so that its next arrival here costs only what changed.

The relay of a move out sees every page QEMU sends; the last copy of each page in the stream is the
memory the guest had when it stopped here. :class:`ImageWriter` lays those pages out in ``ram.img`` (a
sparse file, the RAM blocks one after another) with an index ``ram.idx`` holding each page's BLAKE2b
digest (all zero: no page kept). When the VM comes back, :class:`RamImage` finds a page by its digest and
returns it only if its content still has that digest: a damaged or stale image costs bytes, never a
wrong page. The files are as secret as the guest's disks: 0600 in HOME/vms/NAME, written nowhere else.

Everything here is blocking file I/O and hashing: call it from a worker thread, never the event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from p2pvbd.wire.qemu_stream import PAGE_SIZE

# BLAKE2b-256 names a page: collisions out of reach of any guest, and hashes ~1 GB/s on one core.
DIGEST_BYTES = 32
# The destination tells the source which pages it holds by this many leading bytes of their digests: a
# 1 GiB guest's 262144 pages take 1 MiB, and a prefix shared by chance only costs a page sent again.
PREFIX_BYTES = 4
IMAGE, INDEX, LAYOUT = "ram.img", "ram.idx", "ram.json"
_EMPTY = bytes(DIGEST_BYTES)


def page_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def _layout(blocks: dict[str, int]) -> dict[str, int]:
    """Where each RAM block starts in the image: one after another, page aligned."""
    starts, at = {}, 0
    for name, length in blocks.items():
        starts[name] = at
        at += -(-length // PAGE_SIZE) * PAGE_SIZE
    return starts


def _open_private(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)


class ImageWriter:
    """Records the pages of an outgoing stream in new files beside the current image; ``commit`` puts
    them in its place once the move succeeded, ``discard`` drops them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._starts: dict[str, int] = {}
        self._blocks: dict[str, int] = {}
        self._index = bytearray()

    def _start(self, blocks: dict[str, int]) -> None:
        self._blocks = dict(blocks)
        self._starts = _layout(blocks)
        total = sum(-(-n // PAGE_SIZE) for n in blocks.values())
        self._index = bytearray(total * DIGEST_BYTES)
        self._fd = _open_private(self.directory / (IMAGE + ".new"))

    def _slot(self, blocks: dict[str, int], block: str, offset: int) -> int | None:
        if self._fd is None and blocks:
            self._start(blocks)
        start = self._starts.get(block)
        if start is None or offset + PAGE_SIZE > -(-self._blocks[block] // PAGE_SIZE) * PAGE_SIZE:
            return None
        return (start + offset) // PAGE_SIZE

    def page(self, blocks: dict[str, int], block: str, offset: int, data: bytes, digest: bytes) -> None:
        """The page at ``offset`` of ``block`` holds ``data`` now (``blocks``: the stream's RAM blocks)."""
        slot = self._slot(blocks, block, offset)
        if slot is None or self._fd is None:
            return
        os.pwrite(self._fd, data, slot * PAGE_SIZE)
        self._index[slot * DIGEST_BYTES:(slot + 1) * DIGEST_BYTES] = digest

    def zero(self, blocks: dict[str, int], block: str, offset: int) -> None:
        """The page is all zero now: QEMU sends that as a flag, so the image needs no copy of it."""
        slot = self._slot(blocks, block, offset)
        if slot is not None:
            self._index[slot * DIGEST_BYTES:(slot + 1) * DIGEST_BYTES] = _EMPTY

    def commit(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        fd = _open_private(self.directory / (INDEX + ".new"))
        try:
            os.write(fd, self._index)
        finally:
            os.close(fd)
        fd = _open_private(self.directory / (LAYOUT + ".new"))
        try:
            os.write(fd, json.dumps({"blocks": self._blocks}).encode())
        finally:
            os.close(fd)
        for name in (IMAGE, INDEX, LAYOUT):  # the index last: an image without its index is never read
            os.replace(self.directory / (name + ".new"), self.directory / name)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for name in (IMAGE, INDEX, LAYOUT):
            (self.directory / (name + ".new")).unlink(missing_ok=True)


def delete_image(directory: Path) -> None:
    for name in (IMAGE, INDEX, LAYOUT):
        (directory / name).unlink(missing_ok=True)


class RamImage:
    """A kept image, read by digest: ``get`` returns a page only if its content has the digest asked for."""

    def __init__(self, directory: Path) -> None:
        self._fd = os.open(directory / IMAGE, os.O_RDONLY)
        try:
            index = (directory / INDEX).read_bytes()
        except OSError:
            os.close(self._fd)
            raise
        self._slots: dict[bytes, int] = {}
        for slot in range(len(index) // DIGEST_BYTES):
            digest = index[slot * DIGEST_BYTES:(slot + 1) * DIGEST_BYTES]
            if digest != _EMPTY:
                self._slots.setdefault(digest, slot)

    @classmethod
    def open(cls, directory: Path) -> RamImage | None:
        """The image kept in ``directory``, or None if there is none (or it cannot be read)."""
        try:
            return cls(directory)
        except OSError:
            return None

    def __len__(self) -> int:
        return len(self._slots)

    def prefixes(self, limit: int) -> bytes:
        """The leading PREFIX_BYTES of up to ``limit`` of the digests held, sorted, concatenated."""
        return b"".join(sorted({d[:PREFIX_BYTES] for d in self._slots})[:limit])

    def get(self, digest: bytes) -> bytes | None:
        slot = self._slots.get(digest)
        if slot is None:
            return None
        data = os.pread(self._fd, PAGE_SIZE, slot * PAGE_SIZE)
        if len(data) != PAGE_SIZE or page_digest(data) != digest:
            return None  # damaged or overwritten since: the source sends the page instead
        return data

    def close(self) -> None:
        os.close(self._fd)


def split_prefixes(blob: bytes) -> frozenset[bytes]:
    """The prefix set a destination announced (PREFIX_BYTES each)."""
    return frozenset(blob[i:i + PREFIX_BYTES] for i in range(0, len(blob) - len(blob) % PREFIX_BYTES, PREFIX_BYTES))

