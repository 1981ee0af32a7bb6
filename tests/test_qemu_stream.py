"""The reader of QEMU's migration stream: whatever it is fed, in whatever pieces, its events give the
same bytes back; in a well-formed stream it finds every page; and it reads a stream QEMU really wrote."""

from __future__ import annotations

import struct
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvbd.vm.definition import TCG_RAM_PAD
from p2pvbd.wire.qemu_stream import (
    FLAG_CONTINUE,
    FLAG_EOS,
    FLAG_MEM_SIZE,
    FLAG_PAGE,
    FLAG_ZERO,
    PAGE_SIZE,
    Event,
    Page,
    QemuStreamReader,
    ZeroPage,
    reassemble,
)

BLOCKS = {"pc.ram": 64 * PAGE_SIZE, "pc.rom": 4 * PAGE_SIZE}


def _name(block: str) -> bytes:
    return bytes([len(block)]) + block.encode()


def make_stream(parts: list[list[tuple[str, int, bytes | None]]]) -> bytes:
    """A stream as QEMU writes it: header, configuration, the RAM section's start, one part per list of
    (block, page number, data or None for a zero page), its end, then device state and the end marker."""
    out = bytearray(b"QEVM" + struct.pack(">I", 3))
    out += b"\x07" + struct.pack(">I", 13) + b"pc-i440fx-7.2"
    out += b"\x01" + struct.pack(">I", 2) + _name("ram") + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", sum(BLOCKS.values()) | FLAG_MEM_SIZE)
    for block, size in BLOCKS.items():
        out += _name(block) + struct.pack(">Q", size)
    out += struct.pack(">Q", FLAG_EOS) + b"\x7e" + struct.pack(">I", 2)
    for i, records in enumerate(parts):
        out += (b"\x03" if i == len(parts) - 1 else b"\x02") + struct.pack(">I", 2)
        previous = None
        for block, page, data in records:
            flags = FLAG_PAGE if data is not None else FLAG_ZERO
            same = block == previous
            out += struct.pack(">Q", page * PAGE_SIZE | flags | (FLAG_CONTINUE if same else 0))
            out += b"" if same else _name(block)
            out += data if data is not None else b"\x00"
            previous = block
        out += struct.pack(">Q", FLAG_EOS) + b"\x7e" + struct.pack(">I", 2)
    out += b"\x04" + struct.pack(">I", 3) + _name("timer") + struct.pack(">II", 0, 2) + b"device state"
    out += b"\x00" + b'{"page_size": 4096}'
    return bytes(out)


def read_all(stream: bytes, cuts: list[int]) -> tuple[list[Event], QemuStreamReader]:
    reader = QemuStreamReader()
    events: list[Event] = []
    start = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        events += reader.feed(stream[start:cut])
        start = max(start, cut)
    events += reader.feed(stream[start:])
    return events + reader.close(), reader


records = st.lists(st.tuples(st.sampled_from(sorted(BLOCKS)), st.integers(0, 3),
                             st.one_of(st.none(), st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE))),
                   max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(records, min_size=1, max_size=4), st.lists(st.integers(0, 1 << 20), max_size=12))
def test_a_well_formed_stream_gives_its_pages_and_its_bytes(
        parts: list[list[tuple[str, int, bytes | None]]], cuts: list[int]) -> None:
    stream = make_stream(parts)
    events, reader = read_all(stream, cuts)
    assert reassemble(events) == stream
    sent = [(b, p * PAGE_SIZE, d) for records in parts for b, p, d in records]
    assert [(e.block, e.offset, e.raw) for e in events if isinstance(e, Page)] == \
        [(b, o, d) for b, o, d in sent if d is not None]
    assert [(e.block, e.offset) for e in events if isinstance(e, ZeroPage)] == [(b, o) for b, o, d in sent if d is None]
    assert reader.blocks == BLOCKS and reader.verbatim  # it stops understanding at the devices' state


@settings(max_examples=300, deadline=None)
@given(st.lists(records, min_size=1, max_size=3), st.integers(0, 1 << 20), st.binary(max_size=40),
       st.lists(st.integers(0, 1 << 20), max_size=8))
def test_any_damage_passes_through_unchanged(parts: list[list[tuple[str, int, bytes | None]]], at: int,
                                             junk: bytes, cuts: list[int]) -> None:
    """Bytes the reader does not expect anywhere in the stream: what comes out is still what went in."""
    stream = make_stream(parts)
    at %= len(stream) + 1
    damaged = stream[:at] + junk + stream[at:]
    events, _ = read_all(damaged, cuts)
    assert reassemble(events) == damaged


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=5))
def test_arbitrary_bytes_pass_through(data: bytes, cuts: list[int]) -> None:
    events, _ = read_all(data, cuts)
    assert reassemble(events) == data


def test_a_stream_qemu_wrote(tmp_path: Path, guest_files: tuple[Path, Path]) -> None:
    """A small TCG guest's whole migration stream (`migrate exec:cat > FILE`): every byte comes back, and
    the reader counts as many pages and zero pages as QEMU says it sent."""
    from tests.vm_guest import QemuGuest, qemu_nbd

    kernel, initrd = guest_files
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    nbd = qemu_nbd(image, tmp_path / "nbd.sock", "d")
    guest = QemuGuest(tmp_path / "g", kernel, initrd, tmp_path / "nbd.sock", "d", workload="idle", memory_mb=128)
    try:
        guest.start()
        guest.wait_for(guest.ready, "the guest to boot")
        qmp = guest.qmp()
        qmp.execute("migrate", uri=f"exec:cat > {tmp_path / 'stream.bin'}")
        while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed"):
            time.sleep(0.1)
        assert info["status"] == "completed", info
    finally:
        guest.kill()
        nbd.kill()
    stream = (tmp_path / "stream.bin").read_bytes()
    events, reader = read_all(stream, list(range(0, len(stream), 65521)))
    assert reassemble(events) == stream
    assert reader.blocks["pc.ram"] == (128 << 20) + TCG_RAM_PAD  # the guest runs as p2pvbd runs one
    pages = [e for e in events if isinstance(e, Page)]
    zeros = [e for e in events if isinstance(e, ZeroPage)]
    assert len(pages) == info["ram"]["normal"] and len(zeros) == info["ram"]["duplicate"], info["ram"]
    assert "other than RAM" in reader.why_verbatim  # only at the devices' state, after the RAM's end
