"""Pieces of QEMU's migration stream as they cross between daemons: each RAM page the destination already
holds travels as a reference (its BLAKE2b-256 digest), the rest compressed, or as it is when compressing
does not shrink it (random or encrypted memory).

A piece on the wire (``vm_ram``): ``data``, the stream's bytes with the referenced pages taken out
(zstd-packed if ``zstd``), and ``refs``, for each page taken out: where it goes in ``data`` unpacked (be32),
where the destination finds it (u8: REF_HELD, a page it holds, found by digest; REF_DISK, then u8 disk
number in the VM's definition and be64 byte offset: its replica of that disk), and the page's digest.
The destination checks every page it puts back against its digest; one it cannot find, or that does not
match, it names in its answer (``missing``), and the source sends the piece again with those pages in it.
``digest``, the BLAKE2b-256 of the piece's stream bytes, checks the rebuilt piece as a whole before its
QEMU gets it: whatever goes wrong in reading, packing or rebuilding fails the move, never the guest.

The source reads the stream with :class:`p2pvbd.wire.qemu_stream.QemuStreamReader`, whose state runs
across pieces: :meth:`RamSender.read` is called once per piece, in order; :meth:`RamSender.pack` as
often as the destination asks again. Both hash and compress: run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zstandard

from p2pvbd.vm.ram_image import DIGEST_BYTES, PREFIX_BYTES, ImageWriter, page_digest
from p2pvbd.wire.qemu_stream import MAX_HELD, PAGE_SIZE, Event, Page, QemuStreamReader, ZeroPage

# One piece rebuilds to at most this much of QEMU's stream: large enough that a request's round trip is
# small next to its transfer on a 100 Mbit/s link (1 MiB ≈ 84 ms), small next to the peer frame limit.
RAM_CHUNK_BYTES = 1024 * 1024
# The source reads this much of QEMU's stream per piece: the reader may add up to MAX_HELD bytes of an
# item it held back from the piece before.
RAM_READ_BYTES = RAM_CHUNK_BYTES - MAX_HELD
# The lowest zstd level packs ~1 GB/s on one core, more than any link a person's machines share.
RAM_ZSTD_LEVEL = 1
PAGE_BYTES = PAGE_SIZE
REF_HELD = 0
REF_DISK = 1
_REF = struct.Struct(">IB")
_DISK = struct.Struct(">BQ")
# A piece names at most one reference per page it rebuilds to.
MAX_REFS = RAM_CHUNK_BYTES // PAGE_SIZE
# Where a reference was found, as `migrate --json` counts pages sent by reference.
SOURCE_PREVIOUS = "previous"  # the image this VM left at the destination when it last ran there
SOURCE_DISK = "disk"  # the destination's replica of the VM's disks (the guest's page cache)


class RamPieceError(Exception):
    """A piece the destination cannot take: a source that does not follow this format."""


@dataclass
class RamStats:
    """What crossed for a VM's memory: QEMU's stream, the bytes sent for it, its pages, and the pages sent
    by reference per place the destination found them."""
    stream_bytes: int = 0
    wire_bytes: int = 0
    pages: int = 0
    by_ref: dict[str, int] = field(default_factory=dict)


@dataclass
class ReadPiece:
    """One piece of the stream, read: its events, each page's digest, and the digest of its bytes."""
    events: list[Event]
    digests: list[bytes | None]
    size: int
    whole: bytes


class RamSender:
    """The source's side. ``held``: per source name, the digest prefixes the destination said it holds;
    ``disk_pages``: digest -> (disk number, byte offset) of pages this host's disks hold, which the
    destination's replicas hold too; ``image``: records the pages for this host's own image."""

    def __init__(self, held: dict[str, frozenset[bytes]] | None = None,
                 disk_pages: dict[bytes, tuple[int, int]] | None = None, image: ImageWriter | None = None) -> None:
        self.reader = QemuStreamReader()
        self.held = held or {}
        self.disk_pages = disk_pages or {}
        self.image = image

    def read(self, data: bytes, eof: bool) -> ReadPiece:
        events = self.reader.feed(data) + (self.reader.close() if eof else [])
        digests: list[bytes | None] = []
        blocks = self.reader.blocks
        for e in events:
            if isinstance(e, Page):
                digest = page_digest(e.raw)
                if self.image is not None:
                    self.image.page(blocks, e.block, e.offset, e.raw, digest)
                digests.append(digest)
            else:
                if isinstance(e, ZeroPage) and self.image is not None:
                    self.image.zero(blocks, e.block, e.offset)
                digests.append(None)
        return ReadPiece(events, digests, len(data), stream_digest(b"".join(e.raw for e in events)))

    def pack(self, piece: ReadPiece, exclude: frozenset[bytes] = frozenset(),
             not_held: frozenset[bytes] = frozenset()) -> tuple[dict[str, Any], RamStats]:
        """The piece's vm_ram fields, every page the destination holds by reference, except ``exclude``
        (sent in full) and, for ``not_held``, only by a reference into its disks."""
        literal = bytearray()
        refs = bytearray()
        stats = RamStats(stream_bytes=piece.size)
        for event, digest in zip(piece.events, piece.digests, strict=True):
            if digest is None:
                literal += event.raw
                continue
            stats.pages += 1
            source = None if digest in exclude else self._where(digest, digest in not_held)
            if source is None:
                literal += event.raw
                continue
            refs += _REF.pack(len(literal), REF_DISK if source == SOURCE_DISK else REF_HELD)
            if source == SOURCE_DISK:
                refs += _DISK.pack(*self.disk_pages[digest])
            refs += digest
            stats.by_ref[source] = stats.by_ref.get(source, 0) + 1
        data = bytes(literal)
        packed = zstandard.ZstdCompressor(level=RAM_ZSTD_LEVEL).compress(data) if data else b""
        use_zstd = len(packed) < len(data)
        body = {"data": packed if use_zstd else data, "zstd": use_zstd, "refs": bytes(refs), "digest": piece.whole}
        stats.wire_bytes = len(body["data"]) + len(refs)
        return body, stats

    def _where(self, digest: bytes, not_held: bool = False) -> str | None:
        prefix = digest[:PREFIX_BYTES]
        for source, prefixes in self.held.items():
            if prefix in prefixes and not not_held:
                return source
        if digest in self.disk_pages:
            return SOURCE_DISK
        return None


# The destination finds a page: (kind, digest, disk number, offset) -> the page, or None. It must return
# only a page whose digest it checked.
Finder = Callable[[int, bytes, int, int], bytes | None]


def rebuild(body: dict[str, Any], find: Finder) -> tuple[bytes, list[bytes]]:
    """The destination's side: the piece's stream bytes, and the digests of pages it could not find
    (when there are any, the bytes are empty and the source must send those pages)."""
    data, refs = body.get("data", b""), body.get("refs", b"")
    if not isinstance(data, bytes) or not isinstance(refs, bytes) or len(data) > RAM_CHUNK_BYTES:
        raise RamPieceError("vm_ram needs at most 1 MiB of data and refs as bytes")
    if body.get("zstd") is True and data:
        try:  # bounded: a piece never unpacks to more than one chunk
            if not 0 <= zstandard.frame_content_size(data) <= RAM_CHUNK_BYTES:
                raise RamPieceError("a packed piece must say its size, at most 1 MiB")
            data = zstandard.ZstdDecompressor().decompress(data)
        except zstandard.ZstdError as e:
            raise RamPieceError(f"vm_ram: {e}") from None
    entries = _parse_refs(refs, len(data))
    if len(data) + len(entries) * PAGE_SIZE > RAM_CHUNK_BYTES:
        raise RamPieceError("a piece rebuilds to more than 1 MiB")
    if not entries:
        if "digest" in body and stream_digest(data) != body["digest"]:
            raise RamPieceError("vm_ram: a piece rebuilt to other bytes than its source read")
        return data, []
    out = bytearray()
    missing: list[bytes] = []
    at = 0
    for position, kind, disk, offset, digest in entries:
        out += data[at:position]
        at = position
        page = find(kind, digest, disk, offset)
        if page is None:
            missing.append(digest)
        else:
            out += page
    if missing:
        return b"", missing
    out += data[at:]
    rebuilt = bytes(out)
    if "digest" in body and stream_digest(rebuilt) != body["digest"]:
        raise RamPieceError("vm_ram: a piece rebuilt to other bytes than its source read")
    return rebuilt, []


def _parse_refs(refs: bytes, literal_size: int) -> list[tuple[int, int, int, int, bytes]]:
    entries = []
    at, last = 0, 0
    while at < len(refs):
        if len(entries) >= MAX_REFS or at + _REF.size > len(refs):
            raise RamPieceError("vm_ram: too many or truncated references")
        position, kind = _REF.unpack_from(refs, at)
        at += _REF.size
        disk = offset = 0
        if kind == REF_DISK:
            if at + _DISK.size > len(refs):
                raise RamPieceError("vm_ram: a truncated disk reference")
            disk, offset = _DISK.unpack_from(refs, at)
            at += _DISK.size
        elif kind != REF_HELD:
            raise RamPieceError(f"vm_ram: unknown reference kind {kind}")
        if at + DIGEST_BYTES > len(refs) or not last <= position <= literal_size:
            raise RamPieceError("vm_ram: a reference out of order or out of the piece")
        entries.append((position, kind, disk, offset, refs[at:at + DIGEST_BYTES]))
        at += DIGEST_BYTES
        last = position
    return entries


def stream_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def missing_digests(blob: bytes) -> frozenset[bytes]:
    """The ``missing`` answer of a destination, as digests."""
    return frozenset(blob[i:i + DIGEST_BYTES] for i in range(0, len(blob) - len(blob) % DIGEST_BYTES,
                                                            DIGEST_BYTES))
