"""Pieces of a VM's memory stream by reference (vm/ram_refs.py) and the image a host keeps of a VM's
memory (vm/ram_image.py): the destination rebuilds QEMU's exact bytes, never takes a page whose content
does not match its digest, and refuses pieces that break the format."""

from __future__ import annotations

import os
import struct
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvbd.vm.ram_image import PREFIX_BYTES, ImageWriter, RamImage, page_digest, split_prefixes
from p2pvbd.vm.ram_refs import (
    REF_DISK,
    SOURCE_DISK,
    SOURCE_PREVIOUS,
    RamPieceError,
    RamSender,
    missing_digests,
    rebuild,
)
from p2pvbd.wire.qemu_stream import PAGE_SIZE
from tests.test_qemu_stream import make_stream

PAGES = [bytes([i]) * PAGE_SIZE for i in range(1, 9)]


def send_all(sender: RamSender, stream: bytes, cuts: list[int], find: dict[bytes, bytes]) -> tuple[bytes, int]:
    """Relay ``stream`` in pieces; the destination finds pages in ``find`` (digest -> page). Returns the
    rebuilt stream and the number of pages it missed."""
    out, missed = bytearray(), 0
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    pieces = [stream[a:b] for a, b in pairwise(bounds)] + [b""]
    for i, data in enumerate(pieces):
        piece = sender.read(data, eof=i == len(pieces) - 1)
        exclude: frozenset[bytes] = frozenset()
        not_held: frozenset[bytes] = frozenset()
        while True:
            body, _ = sender.pack(piece, exclude, not_held)
            rebuilt, missing = rebuild(body, lambda kind, digest, disk, offset: find.get(digest))
            if not missing:
                break
            assert not set(missing) & exclude
            missed += len(missing)
            exclude |= missing_digests(b"".join(missing)) & not_held
            not_held |= missing_digests(b"".join(missing))
        out += rebuilt
    return bytes(out), missed


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["pc.ram", "pc.rom"]), st.integers(0, 3),
                                   st.one_of(st.none(), st.sampled_from(PAGES))), max_size=8), min_size=1, max_size=3),
       st.sets(st.integers(0, len(PAGES) - 1)), st.sets(st.integers(0, len(PAGES) - 1)),
       st.lists(st.integers(0, 1 << 16), max_size=6))
def test_the_destination_rebuilds_the_exact_stream(parts: list, announced: set[int], kept: set[int],
                                                   cuts: list[int]) -> None:
    """Pages the destination announced go by reference; those it announced but no longer holds (not
    ``kept``) are missed and sent in full: the bytes QEMU gets are the bytes QEMU sent."""
    stream = make_stream(parts)
    held = frozenset(page_digest(PAGES[i])[:PREFIX_BYTES] for i in announced)
    find = {page_digest(PAGES[i]): PAGES[i] for i in kept}
    rebuilt, missed = send_all(RamSender({SOURCE_PREVIOUS: held}), stream, cuts, find)
    assert rebuilt == stream
    sent = {d for records in parts for _, _, d in records if d is not None}
    assert (missed > 0) == any(PAGES.index(p) in announced - kept for p in sent)


def test_pages_found_on_a_disk_go_by_reference_and_are_counted() -> None:
    stream = make_stream([[("pc.ram", 0, PAGES[0]), ("pc.ram", 1, PAGES[1]), ("pc.ram", 2, PAGES[2])]])
    sender = RamSender({SOURCE_PREVIOUS: frozenset({page_digest(PAGES[0])[:PREFIX_BYTES]})},
                       disk_pages={page_digest(PAGES[1]): (0, 8192)})
    body, stats = sender.pack(sender.read(stream, eof=True))
    assert stats.pages == 3 and stats.by_ref == {SOURCE_PREVIOUS: 1, SOURCE_DISK: 1}
    asked = []

    def find(kind: int, digest: bytes, disk: int, offset: int) -> bytes | None:
        asked.append((kind, disk, offset))
        return {page_digest(p): p for p in PAGES}[digest]

    assert rebuild(body, find) == (stream, [])
    assert (REF_DISK, 0, 8192) in asked
    assert stats.wire_bytes < len(stream) - 2 * PAGE_SIZE


def test_incompressible_pages_cross_as_they_are() -> None:
    stream = make_stream([[("pc.ram", i % 4, os.urandom(PAGE_SIZE)) for i in range(200)]])
    sender = RamSender()
    body, stats = sender.pack(sender.read(stream, eof=True))
    assert body["zstd"] is False and len(body["data"]) == len(stream) == stats.wire_bytes
    assert rebuild(body, lambda *a: None) == (stream, [])


@pytest.mark.parametrize(("refs", "why"), [
    (struct.pack(">IB", 5, 0) + bytes(32) + struct.pack(">IB", 1, 0) + bytes(32), "out of order"),
    (struct.pack(">IB", 0, 9) + bytes(32), "unknown reference kind"),
    (struct.pack(">IB", 0, 0) + bytes(20), "out of the piece"),
    (struct.pack(">IB", 99, 0) + bytes(32), "out of the piece"),
    ((struct.pack(">IB", 0, 0) + bytes(32)) * 300, "too many"),
])
def test_a_malformed_piece_is_refused(refs: bytes, why: str) -> None:
    with pytest.raises(RamPieceError, match=why):
        rebuild({"data": b"x" * 10, "zstd": False, "refs": refs}, lambda *a: PAGES[0])


def test_a_kept_image_gives_only_pages_whose_content_matches(tmp_path: Path) -> None:
    blocks = {"pc.ram": 16 * PAGE_SIZE, "pc.rom": 2 * PAGE_SIZE}
    writer = ImageWriter(tmp_path)
    for i in range(4):
        writer.page(blocks, "pc.ram", i * PAGE_SIZE, PAGES[0], page_digest(PAGES[0]))  # overwritten below
        writer.page(blocks, "pc.ram", i * PAGE_SIZE, PAGES[i], page_digest(PAGES[i]))
    writer.page(blocks, "pc.rom", PAGE_SIZE, PAGES[5], page_digest(PAGES[5]))
    writer.zero(blocks, "pc.ram", 3 * PAGE_SIZE)  # the last copy of a page wins: it is zero now
    writer.page(blocks, "pc.ram", 99 * PAGE_SIZE, PAGES[6], page_digest(PAGES[6]))  # outside its block
    assert RamImage.open(tmp_path) is None  # nothing until the move succeeded
    writer.commit()
    for name in ("ram.img", "ram.idx", "ram.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    image = RamImage.open(tmp_path)
    assert image is not None and len(image) == 4
    assert [image.get(page_digest(PAGES[i])) for i in (0, 1, 2, 5)] == [PAGES[0], PAGES[1], PAGES[2], PAGES[5]]
    assert image.get(page_digest(PAGES[3])) is None and image.get(page_digest(PAGES[6])) is None
    assert split_prefixes(image.prefixes(10)) == {page_digest(PAGES[i])[:PREFIX_BYTES] for i in (0, 1, 2, 5)}
    with (tmp_path / "ram.img").open("r+b") as f:  # damage: page 1's content changes under its digest
        f.seek(PAGE_SIZE + 7)
        f.write(b"!")
    assert image.get(page_digest(PAGES[1])) is None and image.get(page_digest(PAGES[2])) == PAGES[2]
    image.close()


def test_a_piece_that_rebuilds_to_other_bytes_is_refused() -> None:
    """The piece's digest checks the rebuilt bytes as a whole: a finder that returns a wrong page (or any
    slip in packing) fails the move instead of reaching QEMU."""
    stream = make_stream([[("pc.ram", 0, PAGES[0]), ("pc.ram", 1, PAGES[1])]])
    sender = RamSender({SOURCE_PREVIOUS: frozenset({page_digest(PAGES[0])[:PREFIX_BYTES]})})
    body, _ = sender.pack(sender.read(stream, eof=True))
    assert rebuild(body, lambda *a: PAGES[0]) == (stream, [])
    with pytest.raises(RamPieceError, match="other bytes"):
        rebuild(body, lambda *a: PAGES[2])
    plain, _ = RamSender().pack(RamSender().read(stream, eof=True))
    with pytest.raises(RamPieceError, match="other bytes"):
        rebuild(plain | {"data": plain["data"][:-1] + b"?", "zstd": False}, lambda *a: None)
