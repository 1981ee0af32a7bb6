"""A sans-IO reader of QEMU's migration stream: fed bytes in any pieces, it tells the RAM pages in them
from everything else, so a relay can send a page the other side already holds as a reference.

Format (QEMU 7.2, migration/savevm.c and migration/ram.c; scripts/analyze-migration.py reads it too):

    be32 "QEVM"  be32 3                                   file header
    0x07  be32 len  machine-name                          configuration section
    0x01 (START) | 0x04 (FULL)  be32 section-id  u8 len  idstr  be32 instance  be32 version  body
    0x02 (PART)  | 0x03 (END)   be32 section-id  body
    0x7e  be32 section-id                                 section footer
    0x00                                                  end of the device state (a JSON description follows)

A body of the "ram" section is a run of records, each a be64 page offset OR'ed with flags:
MEM_SIZE (the RAM's size, then each block: u8 len, idstr, be64 length), ZERO (u8 fill byte), PAGE
(4096 bytes), EOS (the body ends). ZERO and PAGE name their block (u8 len, idstr) unless CONTINUE says
it is the previous record's.

Every byte fed comes out again, in order: reassembling the ``raw`` of the events gives the input back.
Anything this reader does not know (another section before the devices' state, compressed or XBZRLE
pages, a configuration subsection) makes it pass the rest through verbatim: it never guesses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"QEVM"
VERSION = 3
# x86's target page: what the RAM section's records carry (TARGET_PAGE_SIZE).
PAGE_SIZE = 4096

SECTION_EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SECTION_CONFIGURATION = 0x07
SECTION_FOOTER = 0x7E

FLAG_ZERO = 0x02
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20
FLAG_MASK = PAGE_SIZE - 1
# The longest item this reader waits to see whole: a MEM_SIZE list of a few dozen blocks, or a page with
# its header and block name. Longer than this, it gives up and passes bytes through (a relay reading
# pieces of its stream may hold this much back until the rest of an item arrives).
MAX_HELD = 64 * 1024

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class Literal:
    """Bytes of the stream that go through as they are."""
    raw: bytes


@dataclass(frozen=True, slots=True)
class Page:
    """The 4096 bytes of a RAM page (its record's header came just before, in a Literal)."""
    block: str
    offset: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class ZeroPage:
    """A page QEMU sent as all zero; its record is in the Literal before this (``raw`` is empty)."""
    block: str
    offset: int
    raw: bytes = b""


Event = Literal | Page | ZeroPage


class _Incomplete(Exception):
    """The buffer ends inside the next item: wait for more bytes."""


class _Unknown(Exception):
    """Something this reader does not understand: pass everything from here through."""


class QemuStreamReader:
    """Feed it QEMU's outgoing migration stream; it returns events whose ``raw`` bytes, joined, are the
    stream. ``blocks`` maps each RAM block to its length once the stream said it."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "header"
        self._ram_section: int | None = None
        self._block: str | None = None
        self.blocks: dict[str, int] = {}
        self.verbatim = False  # gave up understanding: everything passes through
        self.why_verbatim = ""

    def feed(self, data: bytes) -> list[Event]:
        """The events that ``data`` completes; bytes of an unfinished item wait for the next call."""
        if self.verbatim:
            return [Literal(bytes(data))] if data else []
        self._buf += data
        out: list[Event] = []
        literal = bytearray()
        pos = 0
        buf = self._buf
        try:
            while pos < len(buf):
                pos = self._item(buf, pos, literal, out)
        except _Incomplete:
            if len(buf) - pos > MAX_HELD:
                self._give_up(f"an item longer than {MAX_HELD} bytes at state {self._state}")
        except _Unknown as e:
            self._give_up(str(e))
        if self.verbatim:
            literal += buf[pos:]
            pos = len(buf)
        if literal:
            out.append(Literal(bytes(literal)))
        del buf[:pos]
        return out

    def close(self) -> list[Event]:
        """The stream ended: whatever is still held goes out as it is."""
        rest, self._buf = bytes(self._buf), bytearray()
        return [Literal(rest)] if rest else []

    def _give_up(self, why: str) -> None:
        self.verbatim, self.why_verbatim = True, why

    def _item(self, buf: bytearray, pos: int, literal: bytearray, out: list[Event]) -> int:
        """Read one item at ``pos``: its bytes go to ``literal`` (a page's to ``out``, after the literal
        so far); returns where the next item starts."""
        if self._state == "header":
            end = _need(buf, pos, 8)
            if buf[pos:pos + 4] != MAGIC or _BE32.unpack_from(buf, pos + 4)[0] != VERSION:
                raise _Unknown("not a version 3 QEMU migration stream")
            self._state = "section"
            literal += buf[pos:end]
            return end
        if self._state == "ram":
            return self._ram_record(buf, pos, literal, out)
        kind = buf[pos]
        if kind == SECTION_CONFIGURATION:
            end = _need(buf, pos, 5)
            end = _need(buf, end, _BE32.unpack_from(buf, pos + 1)[0])
        elif kind in (SECTION_START, SECTION_FULL):
            end = _need(buf, pos, 6)
            section = _BE32.unpack_from(buf, pos + 1)[0]
            name_end = _need(buf, end, buf[pos + 5])
            end = _need(buf, name_end, 8)
            if bytes(buf[pos + 6:name_end]) != b"ram":
                raise _Unknown("a section other than RAM")  # the devices' state: its length is nowhere
            self._ram_section, self._state = section, "ram"
        elif kind in (SECTION_PART, SECTION_END):
            end = _need(buf, pos, 5)
            if _BE32.unpack_from(buf, pos + 1)[0] != self._ram_section:
                raise _Unknown("a part of a section other than RAM")
            self._state = "ram"
        elif kind == SECTION_FOOTER:
            end = _need(buf, pos, 5)
        elif kind == SECTION_EOF:
            raise _Unknown("the end of the device state")
        else:
            raise _Unknown(f"section type {kind:#x}")
        literal += buf[pos:end]
        return end

    def _ram_record(self, buf: bytearray, pos: int, literal: bytearray, out: list[Event]) -> int:
        end = _need(buf, pos, 8)
        value = _BE64.unpack_from(buf, pos)[0]
        flags, addr = value & FLAG_MASK, value & ~FLAG_MASK
        if flags == FLAG_EOS and addr == 0:
            self._state = "section"
            literal += buf[pos:end]
            return end
        if flags == FLAG_MEM_SIZE:
            end, blocks = _mem_size(buf, end, addr)
            self.blocks.update(blocks)
            literal += buf[pos:end]
            return end
        kind = flags & ~FLAG_CONTINUE
        if kind not in (FLAG_ZERO, FLAG_PAGE):
            raise _Unknown(f"RAM record flags {flags:#x}")
        if flags & FLAG_CONTINUE:
            if self._block is None:
                raise _Unknown("a RAM record continuing no block")
            block = self._block
        else:
            name_end = _need(buf, end + 1, buf[_need(buf, end, 1) - 1])
            block = bytes(buf[end + 1:name_end]).decode("latin-1")
            end = name_end
        size = self.blocks.get(block)
        if size is None or addr + PAGE_SIZE > size:
            raise _Unknown(f"a page outside RAM block {block!r}")
        if kind == FLAG_ZERO:
            end = _need(buf, end, 1)
            if buf[end - 1] != 0:
                raise _Unknown("a page filled with a byte other than zero")
            self._block = block
            literal += buf[pos:end]
            out.append(Literal(bytes(literal)))
            literal.clear()
            out.append(ZeroPage(block, addr))
            return end
        data_end = _need(buf, end, PAGE_SIZE)
        self._block = block
        literal += buf[pos:end]
        out.append(Literal(bytes(literal)))
        literal.clear()
        out.append(Page(block, addr, bytes(buf[end:data_end])))
        return data_end


def _need(buf: bytearray, pos: int, n: int) -> int:
    """Where ``n`` bytes from ``pos`` end; _Incomplete if the buffer has not got them yet."""
    end = pos + n
    if end > len(buf):
        raise _Incomplete
    return end


def _mem_size(buf: bytearray, pos: int, total: int) -> tuple[int, dict[str, int]]:
    """The block list of a MEM_SIZE record: names and lengths adding up to ``total``."""
    blocks: dict[str, int] = {}
    seen = 0
    while seen < total:
        name_end = _need(buf, pos + 1, buf[_need(buf, pos, 1) - 1])
        end = _need(buf, name_end, 8)
        length = _BE64.unpack_from(buf, name_end)[0]
        blocks[bytes(buf[pos + 1:name_end]).decode("latin-1")] = length
        seen += length
        pos = end
    if seen != total:
        raise _Unknown("RAM blocks that do not add up to the RAM's size")
    return pos, blocks


def reassemble(events: list[Event]) -> bytes:
    """The stream bytes that ``events`` stand for."""
    return b"".join(e.raw for e in events)
