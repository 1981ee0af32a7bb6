"""Tests for the sans-IO NBD server codec: golden wire layouts, chunking invariance, limits, fuzzing."""

from __future__ import annotations

import struct
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pvbd.wire import nbd_codec as nbd
from p2pvbd.wire.nbd_codec import (
    ClientFlags,
    HandshakeParser,
    InfoRequest,
    MetaContextRequest,
    NeedData,
    OptionPayloadError,
    OptionRequest,
    OptionTooBigError,
    ProtocolError,
    Request,
    RequestParser,
)

# Magic numbers written out independently of the module, straight from doc/proto.md.
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
REQ_MAGIC = bytes.fromhex("25609513")
SIMPLE_MAGIC = bytes.fromhex("67446698")
STRUCT_MAGIC = bytes.fromhex("668e33ef")
COOKIE = 0x0102030405060708
COOKIE_B = bytes.fromhex("0102030405060708")


# --- helpers playing the client ----------------------------------------------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def info_payload(name: str, infos: list[int]) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_payload(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def req(typ: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = COOKIE, data: bytes = b"") -> bytes:
    return REQ_MAGIC + struct.pack(">HHQQI", flags, typ, cookie, offset, length) + data


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut `data` at the given positions (taken modulo its length), like a TCP stream might."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def handshake_events(chunks: list[bytes]) -> tuple[list[object], bytes]:
    p = HandshakeParser()
    events: list[object] = []
    for i, chunk in enumerate(chunks):
        p.feed(chunk)
        while (ev := p.next_event()) is not NeedData:
            events.append(ev)
            if isinstance(ev, OptionRequest) and ev.option == nbd.NBD_OPT_EXPORT_NAME:
                return events, p.leftover() + b"".join(chunks[i + 1 :])
    return events, p.leftover()


def parse_requests(chunks: list[bytes] | list[memoryview], parser: RequestParser | None = None) -> list[Request]:
    p = parser or RequestParser()
    out = []
    for chunk in [b"", *chunks]:
        p.feed(chunk)
        while (r := p.next_request()) is not None:
            out.append(r)
    return out


# --- golden layouts ----------------------------------------------------------------------------------


def test_server_greeting() -> None:
    assert nbd.server_greeting() == NBDMAGIC + IHAVEOPT + b"\x00\x03"


def test_option_replies() -> None:
    assert nbd.option_reply(nbd.NBD_OPT_ABORT, nbd.NBD_REP_ACK) == OPT_REPLY_MAGIC + bytes.fromhex(
        "00000002 00000001 00000000"
    )
    assert nbd.option_reply(8, 1, b"xy") == OPT_REPLY_MAGIC + struct.pack(">III", 8, 1, 2) + b"xy"
    assert nbd.info_export(7, 1 << 40, 0x14D) == OPT_REPLY_MAGIC + bytes.fromhex(
        "00000007 00000003 0000000c 0000 0000010000000000 014d"
    )
    assert nbd.info_block_size(6, 1, 4096, 1 << 25) == OPT_REPLY_MAGIC + bytes.fromhex(
        "00000006 00000003 0000000e 0003 00000001 00001000 02000000"
    )
    assert nbd.info_name(7, "disk") == OPT_REPLY_MAGIC + bytes.fromhex("00000007 00000003 00000006 0001") + b"disk"
    assert nbd.rep_server(3, "vm1") == OPT_REPLY_MAGIC + bytes.fromhex("00000003 00000002 00000007 00000003") + b"vm1"
    assert nbd.rep_server(3, "a", "hi") == OPT_REPLY_MAGIC + struct.pack(">IIII", 3, 2, 7, 1) + b"ahi"
    assert (
        nbd.rep_meta_context(10, 1, "base:allocation")
        == OPT_REPLY_MAGIC + bytes.fromhex("0000000a 00000004 00000013 00000001") + b"base:allocation"
    )
    assert (
        nbd.option_error(5, nbd.NBD_REP_ERR_POLICY, "no TLS")
        == OPT_REPLY_MAGIC + bytes.fromhex("00000005 80000002 00000006") + b"no TLS"
    )
    assert nbd.option_error(0x1234, nbd.NBD_REP_ERR_UNSUP) == OPT_REPLY_MAGIC + bytes.fromhex(
        "00001234 80000001 00000000"
    )
    with pytest.raises(ValueError):
        nbd.option_error(1, nbd.NBD_REP_ACK)


def test_export_name_reply() -> None:
    head = bytes.fromhex("0000000040000000 0003")
    assert nbd.export_name_reply(1 << 30, 3, no_zeroes=True) == head
    assert nbd.export_name_reply(1 << 30, 3, no_zeroes=False) == head + bytes(124)


def test_constants_match_spec() -> None:
    assert (nbd.NBD_OPT_EXPORT_NAME, nbd.NBD_OPT_ABORT, nbd.NBD_OPT_LIST, nbd.NBD_OPT_STARTTLS) == (1, 2, 3, 5)
    assert (nbd.NBD_OPT_INFO, nbd.NBD_OPT_GO, nbd.NBD_OPT_STRUCTURED_REPLY) == (6, 7, 8)
    assert (nbd.NBD_OPT_LIST_META_CONTEXT, nbd.NBD_OPT_SET_META_CONTEXT) == (9, 10)
    assert (nbd.NBD_REP_ERR_UNSUP, nbd.NBD_REP_ERR_INVALID, nbd.NBD_REP_ERR_TOO_BIG) == (
        2**31 + 1,
        2**31 + 3,
        2**31 + 9,
    )
    cmds = [nbd.NBD_CMD_READ, nbd.NBD_CMD_WRITE, nbd.NBD_CMD_DISC, nbd.NBD_CMD_FLUSH, nbd.NBD_CMD_TRIM]
    assert cmds == [0, 1, 2, 3, 4]
    assert (nbd.NBD_CMD_WRITE_ZEROES, nbd.NBD_CMD_BLOCK_STATUS) == (6, 7)
    assert (nbd.NBD_CMD_FLAG_FUA, nbd.NBD_CMD_FLAG_NO_HOLE, nbd.NBD_CMD_FLAG_REQ_ONE) == (1, 2, 8)
    assert (nbd.NBD_FLAG_SEND_FLUSH, nbd.NBD_FLAG_SEND_FUA, nbd.NBD_FLAG_SEND_TRIM) == (4, 8, 32)
    assert nbd.NBD_FLAG_SEND_WRITE_ZEROES == 64
    # What the export offers since it follows qemu-nbd: read-only standbys, CACHE and fast zeroes.
    assert (nbd.NBD_FLAG_READ_ONLY, nbd.NBD_FLAG_SEND_CACHE, nbd.NBD_FLAG_SEND_FAST_ZERO) == (2, 1024, 2048)
    assert (nbd.NBD_CMD_CACHE, nbd.NBD_CMD_FLAG_FAST_ZERO, nbd.NBD_REP_META_CONTEXT) == (5, 16, 4)
    errs = [nbd.NBD_EPERM, nbd.NBD_EIO, nbd.NBD_ENOMEM, nbd.NBD_EINVAL, nbd.NBD_ENOSPC]
    assert [*errs, nbd.NBD_EOVERFLOW, nbd.NBD_ENOTSUP, nbd.NBD_ESHUTDOWN] == [1, 5, 12, 22, 28, 75, 95, 108]
    assert (nbd.NBD_STATE_HOLE, nbd.NBD_STATE_ZERO) == (1, 2)
    assert nbd.MAX_PAYLOAD == 2**25


def test_transmission_replies() -> None:
    assert nbd.simple_reply(COOKIE) == SIMPLE_MAGIC + bytes(4) + COOKIE_B
    assert nbd.simple_reply(COOKIE, nbd.NBD_EIO) == SIMPLE_MAGIC + b"\x00\x00\x00\x05" + COOKIE_B
    assert (
        nbd.structured_chunk(COOKIE, 1, 0x1234, b"abc")
        == STRUCT_MAGIC + bytes.fromhex("0001 1234") + COOKIE_B + b"\x00\x00\x00\x03abc"
    )
    assert nbd.none_chunk(COOKIE) == STRUCT_MAGIC + bytes.fromhex("0001 0000") + COOKIE_B + bytes(4)
    assert nbd.offset_data_header(COOKIE, 0x10000, 4096, done=True) == STRUCT_MAGIC + bytes.fromhex(
        "0001 0001"
    ) + COOKIE_B + bytes.fromhex("00001008 0000000000010000")
    assert nbd.offset_data_header(COOKIE, 0, 1, done=False)[4:6] == b"\x00\x00"
    assert nbd.offset_hole_chunk(COOKIE, 512, 1 << 20, done=False) == STRUCT_MAGIC + bytes.fromhex(
        "0000 0002"
    ) + COOKIE_B + bytes.fromhex("0000000c 0000000000000200 00100000")
    assert (
        nbd.error_chunk(COOKIE, nbd.NBD_EINVAL, "bad")
        == STRUCT_MAGIC + bytes.fromhex("0001 8001") + COOKIE_B + bytes.fromhex("00000009 00000016 0003") + b"bad"
    )
    assert nbd.error_chunk(COOKIE, nbd.NBD_EIO, done=False) == STRUCT_MAGIC + bytes.fromhex(
        "0000 8001"
    ) + COOKIE_B + bytes.fromhex("00000006 00000005 0000")
    assert nbd.error_offset_chunk(COOKIE, nbd.NBD_EIO, 4096, "x") == STRUCT_MAGIC + bytes.fromhex(
        "0001 8002"
    ) + COOKIE_B + bytes.fromhex("0000000f 00000005 0001") + b"x" + bytes.fromhex("0000000000001000")
    extents = [(4096, 0), (8192, nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO)]
    assert nbd.block_status_chunk(COOKIE, 7, extents) == STRUCT_MAGIC + bytes.fromhex(
        "0001 0005"
    ) + COOKIE_B + bytes.fromhex("00000014 00000007 00001000 00000000 00002000 00000003")


def test_builders_reject_invalid_values() -> None:
    with pytest.raises(ValueError):
        nbd.offset_data_header(COOKIE, 0, 0, done=True)
    with pytest.raises(ValueError):
        nbd.offset_hole_chunk(COOKIE, 0, 0, done=True)
    with pytest.raises(ValueError):
        nbd.error_chunk(COOKIE, 0)
    with pytest.raises(ValueError):
        nbd.block_status_chunk(COOKIE, 1, [])
    with pytest.raises(ValueError):
        nbd.block_status_chunk(COOKIE, 1, [(512, 0), (0, 0)])
    with pytest.raises(ValueError):
        nbd.error_chunk(COOKIE, nbd.NBD_EIO, "x" * 5000)


# --- handshake ---------------------------------------------------------------------------------------

HANDSHAKE = (
    struct.pack(">I", nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES)
    + opt(nbd.NBD_OPT_STRUCTURED_REPLY)
    + opt(nbd.NBD_OPT_LIST)
    + opt(0xDEAD, b"unknown option payload")
    + opt(nbd.NBD_OPT_SET_META_CONTEXT, meta_payload("disk", ["base:allocation"]))
    + opt(nbd.NBD_OPT_GO, info_payload("disk", [nbd.NBD_INFO_BLOCK_SIZE]))
    + opt(nbd.NBD_OPT_EXPORT_NAME, b"disk")
)
TRAILER = req(nbd.NBD_CMD_READ, 0, 4096)  # a client pipelining its first request after the handshake
EXPECTED_EVENTS = [
    ClientFlags(3),
    OptionRequest(nbd.NBD_OPT_STRUCTURED_REPLY, b""),
    OptionRequest(nbd.NBD_OPT_LIST, b""),
    OptionRequest(0xDEAD, b"unknown option payload"),
    OptionRequest(nbd.NBD_OPT_SET_META_CONTEXT, meta_payload("disk", ["base:allocation"])),
    OptionRequest(nbd.NBD_OPT_GO, info_payload("disk", [nbd.NBD_INFO_BLOCK_SIZE])),
    OptionRequest(nbd.NBD_OPT_EXPORT_NAME, b"disk"),
]


def test_handshake_whole() -> None:
    events, rest = handshake_events([HANDSHAKE + TRAILER])
    assert events == EXPECTED_EVENTS
    assert events[0].no_zeroes  # type: ignore[attr-defined]
    assert rest == TRAILER
    assert parse_requests([], RequestParser(rest)) == [Request(0, nbd.NBD_CMD_READ, COOKIE, 0, 4096)]


def test_handshake_every_byte_boundary() -> None:
    data = HANDSHAKE + TRAILER
    for cut in range(len(data) + 1):
        assert handshake_events([data[:cut], data[cut:]]) == (EXPECTED_EVENTS, TRAILER)
    assert handshake_events([data[i : i + 1] for i in range(len(data))]) == (EXPECTED_EVENTS, TRAILER)


@given(st.lists(st.integers(min_value=0), max_size=40))
def test_handshake_arbitrary_chunking(cuts: list[int]) -> None:
    assert handshake_events(split(HANDSHAKE + TRAILER, cuts)) == (EXPECTED_EVENTS, TRAILER)


@pytest.mark.parametrize("flags", [0, nbd.NBD_FLAG_C_NO_ZEROES, 1 | 4, 1 | (1 << 31)])
def test_bad_client_flags(flags: int) -> None:
    p = HandshakeParser()
    p.feed(struct.pack(">I", flags))
    with pytest.raises(ProtocolError):
        p.next_event()
    with pytest.raises(ProtocolError):  # stays broken
        p.next_event()


def test_bad_option_magic() -> None:
    p = HandshakeParser()
    p.feed(struct.pack(">I", 1) + b"IHAVEOPX" + bytes(8))
    assert p.next_event() == ClientFlags(1)
    with pytest.raises(ProtocolError):
        p.next_event()


def test_oversized_option_rejected_on_header() -> None:
    p = HandshakeParser()
    p.feed(struct.pack(">I", 1) + IHAVEOPT + struct.pack(">II", nbd.NBD_OPT_GO, nbd.MAX_OPTION_LENGTH + 1))
    assert p.next_event() == ClientFlags(1)
    with pytest.raises(ProtocolError):  # without waiting for the payload
        p.next_event()


def test_option_at_max_length_accepted() -> None:
    p = HandshakeParser()
    p.feed(struct.pack(">I", 1) + opt(0x77, bytes(nbd.MAX_OPTION_LENGTH)))
    assert p.next_event() == ClientFlags(1)
    assert p.next_event() == OptionRequest(0x77, bytes(nbd.MAX_OPTION_LENGTH))
    assert p.next_event() is NeedData


# --- option payloads ---------------------------------------------------------------------------------


def test_parse_info_request() -> None:
    assert nbd.parse_info_request(info_payload("", [])) == InfoRequest("", [])
    assert nbd.parse_info_request(info_payload("dïsk", [0, 1, 3])) == InfoRequest("dïsk", [0, 1, 3])


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x05abc",  # name runs past the payload
        b"\x00\x00\x00\x00",  # missing count
        b"\x00\x00\x00\x00\x00\x02\x00\x01",  # count 2, one entry
        info_payload("a", [1]) + b"\x00",  # trailing byte
        b"\x00\x00\x00\x02\xff\xfe\x00\x00",  # not UTF-8
        b"\x00\x00\x00\x02a\x00\x00\x00",  # NUL in string
        struct.pack(">I", 4097) + b"a" * 4097 + b"\x00\x00",  # longer than the 4096-byte string limit
    ],
)
def test_parse_info_request_malformed(payload: bytes) -> None:
    with pytest.raises(OptionPayloadError) as exc:
        nbd.parse_info_request(payload)
    assert exc.value.reply_type == nbd.NBD_REP_ERR_INVALID


def test_parse_meta_context_request() -> None:
    assert nbd.parse_meta_context_request(meta_payload("disk", [])) == MetaContextRequest("disk", [])
    got = nbd.parse_meta_context_request(meta_payload("", ["base:allocation", "qemu:dirty-bitmap:x"]))
    assert got == MetaContextRequest("", ["base:allocation", "qemu:dirty-bitmap:x"])


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x00\x00",  # missing count
        b"\x00\x00\x00\x00\x00\x00\x00\x01",  # one query promised, none sent
        b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09base:",  # query runs past
        meta_payload("d", ["base:allocation"]) + b"!",  # trailing
        b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x01\x80",  # not UTF-8
    ],
)
def test_parse_meta_context_malformed(payload: bytes) -> None:
    with pytest.raises(OptionPayloadError):
        nbd.parse_meta_context_request(payload)


def test_too_many_meta_queries() -> None:
    with pytest.raises(OptionTooBigError) as exc:
        nbd.parse_meta_context_request(meta_payload("d", ["base:"] * (nbd.MAX_META_QUERIES + 1)))
    assert exc.value.reply_type == nbd.NBD_REP_ERR_TOO_BIG
    assert isinstance(exc.value, ValueError)


def test_parse_export_name() -> None:
    assert nbd.parse_export_name(b"vm/disk0") == "vm/disk0"
    with pytest.raises(OptionPayloadError):
        nbd.parse_export_name(b"\xc3")


# --- requests ----------------------------------------------------------------------------------------

WRITE_DATA = bytes(range(256)) * 400  # 100 KiB, big enough to span many chunks
PIPELINE = [
    Request(0, nbd.NBD_CMD_READ, 1, 0, 4096),
    Request(nbd.NBD_CMD_FLAG_FUA, nbd.NBD_CMD_WRITE, 2, 8192, len(WRITE_DATA), WRITE_DATA),
    Request(0, nbd.NBD_CMD_WRITE, 3, 0, 0, b""),
    Request(0, nbd.NBD_CMD_FLUSH, 4, 0, 0),
    Request(0, nbd.NBD_CMD_TRIM, 5, 1 << 30, 1 << 30, oversized=True),  # legal for TRIM; server decides
    Request(nbd.NBD_CMD_FLAG_NO_HOLE | nbd.NBD_CMD_FLAG_FUA, nbd.NBD_CMD_WRITE_ZEROES, 6, 512, 65536),
    Request(0, nbd.NBD_CMD_WRITE, 7, 4096, 5, b"hello"),
    Request(nbd.NBD_CMD_FLAG_REQ_ONE, nbd.NBD_CMD_BLOCK_STATUS, 8, 0, 1 << 20),
    Request(0, nbd.NBD_CMD_READ, 2**64 - 1, 2**64 - 512, 512),
    Request(0, nbd.NBD_CMD_DISC, 9, 0, 0),
]


def encode(r: Request) -> bytes:
    return req(r.type, r.offset, r.length, r.flags, r.cookie, r.data or b"")


PIPELINE_BYTES = b"".join(map(encode, PIPELINE))


def test_requests_pipelined_whole() -> None:
    assert parse_requests([PIPELINE_BYTES]) == PIPELINE


def test_requests_byte_by_byte() -> None:
    small = b"".join(encode(r) for r in PIPELINE if r.length < 1000 or r.type != nbd.NBD_CMD_WRITE)
    expected = [r for r in PIPELINE if r.length < 1000 or r.type != nbd.NBD_CMD_WRITE]
    assert parse_requests([small[i : i + 1] for i in range(len(small))]) == expected


@given(st.lists(st.integers(min_value=0), max_size=60), st.sampled_from([bytes, bytearray, memoryview]))
def test_requests_arbitrary_chunking(cuts: list[int], kind: type) -> None:
    chunks = [kind(c) for c in split(PIPELINE_BYTES, cuts)]
    got = parse_requests(chunks)
    assert got == PIPELINE
    assert all(type(r.data) is bytes for r in got if r.data is not None)


def test_write_payload_not_aliased_to_caller_buffer() -> None:
    buf = bytearray(req(nbd.NBD_CMD_WRITE, 0, 4) + b"abcd")
    p = RequestParser()
    p.feed(buf[:28])
    assert p.next_request() is None
    p.feed(buf[28:])
    r = p.next_request()
    buf[28:] = b"zzzz"
    assert r is not None and r.data == b"abcd"


def test_bad_request_magic() -> None:
    p = RequestParser()
    p.feed(req(nbd.NBD_CMD_READ, 0, 512) + b"\x25\x60\x95\x14" + bytes(24))
    assert p.next_request() == Request(0, nbd.NBD_CMD_READ, COOKIE, 0, 512)
    with pytest.raises(ProtocolError):
        p.next_request()
    with pytest.raises(ProtocolError):
        p.next_request()


def test_oversized_read_yielded_with_flag() -> None:
    p = RequestParser()
    p.feed(req(nbd.NBD_CMD_READ, 0, nbd.MAX_PAYLOAD + 1) + req(nbd.NBD_CMD_READ, 0, nbd.MAX_PAYLOAD))
    assert p.next_request() == Request(0, nbd.NBD_CMD_READ, COOKIE, 0, nbd.MAX_PAYLOAD + 1, None, True)
    assert p.next_request() == Request(0, nbd.NBD_CMD_READ, COOKIE, 0, nbd.MAX_PAYLOAD, None, False)


def test_write_of_exactly_max_payload_is_buffered() -> None:
    data = b"\x5a" * nbd.MAX_PAYLOAD
    pieces = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    got = parse_requests([req(nbd.NBD_CMD_WRITE, 0, len(data)), *pieces])
    assert len(got) == 1 and not got[0].oversized and got[0].data == data


def test_oversized_write_discarded_without_buffering() -> None:
    size = 40 * 1024 * 1024
    piece = b"\xaa" * (1 << 20)
    first = req(nbd.NBD_CMD_WRITE, 0, size, cookie=42) + piece[:-28]
    tail = req(nbd.NBD_CMD_READ, 0, 4096, cookie=43)
    p = RequestParser()
    got: list[Request] = []
    tracemalloc.start()
    try:
        got += parse_requests([first], p)
        for _ in range(size // len(piece) - 1):
            got += parse_requests([piece], p)
            assert p.buffered == 0
            assert sys.getsizeof(p._buf) < 2 << 20
        got += parse_requests([piece[:28] + tail], p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # one 1 MiB piece may be copied into the buffer, never the 40 MiB
    assert got == [
        Request(0, nbd.NBD_CMD_WRITE, 42, 0, size, None, True),
        Request(0, nbd.NBD_CMD_READ, 43, 0, 4096),
    ]


OVERSIZED = nbd.MAX_PAYLOAD + 3
OVERSIZED_STREAM = memoryview(
    req(nbd.NBD_CMD_WRITE, 0, OVERSIZED, cookie=1) + bytes(OVERSIZED) + req(nbd.NBD_CMD_FLUSH, cookie=2)
)


@given(st.lists(st.integers(min_value=0), max_size=30))
@settings(max_examples=50)
def test_oversized_write_chunking(cuts: list[int]) -> None:
    size = OVERSIZED
    got = parse_requests(split(OVERSIZED_STREAM, cuts))  # type: ignore[arg-type]  # memoryview: no copies
    assert got == [Request(0, nbd.NBD_CMD_WRITE, 1, 0, size, None, True), Request(0, nbd.NBD_CMD_FLUSH, 2, 0, 0)]


def test_buffer_compacts() -> None:
    p = RequestParser()
    one = req(nbd.NBD_CMD_READ, 0, 4096)
    p.feed(one[:14])
    assert p.next_request() is None
    for _ in range(50000):  # each feed completes one request and starts the next: never drained
        p.feed(one[14:] + one[:14])
        assert p.next_request() is not None
        assert p.next_request() is None
        assert p.buffered == 14
    assert isinstance(p._buf, bytearray)
    assert len(p._buf) < nbd._COMPACT_AT + 2 * len(one)  # 1.4 MB went through, the buffer stayed small
    p.feed(one[14:])
    assert p.next_request() == Request(0, nbd.NBD_CMD_READ, COOKIE, 0, 4096)


def test_write_payload_straddling_feeds() -> None:
    w = req(nbd.NBD_CMD_WRITE, 0, 10, cookie=5, data=b"0123456789")
    for first, second in [(w[:20], w[20:]), (w[:30], w[30:]), (w[:33], w[33:] + w), (w[:38], w[38:])]:
        got = parse_requests([first, bytearray(second)])
        assert got[0] == Request(0, nbd.NBD_CMD_WRITE, 5, 0, 10, b"0123456789")
        assert all(type(r.data) is bytes for r in got)


def test_repeated_pipelined_batches_leave_nothing_buffered() -> None:
    batch = b"".join(req(nbd.NBD_CMD_READ, i * 4096, 4096, cookie=i) for i in range(32))
    p = RequestParser()
    for _ in range(100):
        p.feed(batch)
        cookies = []
        while (r := p.next_request()) is not None:
            cookies.append(r.cookie)
        assert cookies == list(range(32))
        assert p.buffered == 0


# --- fuzzing -----------------------------------------------------------------------------------------

fragments = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda o, d: opt(o, d), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.builds(lambda o, n: IHAVEOPT + struct.pack(">II", o, n), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)


@given(st.integers(0, 2**32 - 1), st.lists(fragments, max_size=8), st.lists(st.integers(min_value=0), max_size=10))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_handshake(flags: int, frags: list[bytes], cuts: list[int]) -> None:
    stream = struct.pack(">I", flags if flags % 3 else flags & 3) + b"".join(frags)
    p = HandshakeParser()
    try:
        for chunk in split(stream, cuts):
            p.feed(chunk)
            while (ev := p.next_event()) is not NeedData:
                if isinstance(ev, OptionRequest):
                    for parse in (nbd.parse_info_request, nbd.parse_meta_context_request, nbd.parse_export_name):
                        try:
                            parse(ev.data)
                        except OptionPayloadError:
                            pass
    except ProtocolError:
        pass


@given(st.binary(max_size=200))
def test_fuzz_option_payload_parsers(data: bytes) -> None:
    for parse in (nbd.parse_info_request, nbd.parse_meta_context_request, nbd.parse_export_name):
        try:
            parse(data)
        except OptionPayloadError:
            pass


request_fragments = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda t, f, n, d: req(t, 0, n, f, data=d),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 300),
        st.binary(max_size=300),
    ),
    st.builds(lambda t, n: req(t, 0, n), st.sampled_from([0, 1, 4]), st.integers(0, 2**32 - 1)),
)


@given(st.lists(request_fragments, max_size=10), st.lists(st.integers(min_value=0), max_size=10))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_requests(frags: list[bytes], cuts: list[int]) -> None:
    p = RequestParser()
    try:
        for r in parse_requests(split(b"".join(frags), cuts), p):
            assert r.data is None or len(r.data) == r.length
            assert r.oversized == (r.length > nbd.MAX_PAYLOAD)
    except ProtocolError:
        pass


# --- TLS modes (proto.md, "TLS support") -----------------------------------------------------------------


def _reply_type(reply: bytes) -> int:
    magic, _, rtype, _ = struct.unpack_from(">QIII", reply)
    assert magic == nbd.NBD_OPTION_REPLY_MAGIC
    return rtype


def test_tls_reply_types_match_spec() -> None:
    assert (nbd.NBD_REP_ERR_POLICY, nbd.NBD_REP_ERR_TLS_REQD) == (2**31 + 2, 2**31 + 5)


def test_notls_answers_starttls_with_policy_and_serves_everything_else() -> None:
    step, reply = nbd.tls_step(nbd.NBD_OPT_STARTTLS, b"", forced=False, active=False)
    assert step is nbd.TlsStep.REPLY and _reply_type(reply) == nbd.NBD_REP_ERR_POLICY
    for opt in (nbd.NBD_OPT_EXPORT_NAME, nbd.NBD_OPT_GO, nbd.NBD_OPT_LIST, 0x4242):
        assert nbd.tls_step(opt, b"", forced=False, active=False) == (nbd.TlsStep.SERVE, b"")


def test_forcedtls_before_tls() -> None:
    """FORCEDTLS: STARTTLS is ACKed (INVALID with data), ABORT passes, EXPORT_NAME ends the session (it cannot
    be refused), and every other option, INFO and GO and unknown ones included, gets NBD_REP_ERR_TLS_REQD."""
    step, reply = nbd.tls_step(nbd.NBD_OPT_STARTTLS, b"", forced=True, active=False)
    assert step is nbd.TlsStep.START and reply == nbd.option_reply(nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ACK)
    step, reply = nbd.tls_step(nbd.NBD_OPT_STARTTLS, b"x", forced=True, active=False)
    assert step is nbd.TlsStep.REPLY and _reply_type(reply) == nbd.NBD_REP_ERR_INVALID
    assert nbd.tls_step(nbd.NBD_OPT_ABORT, b"", forced=True, active=False) == (nbd.TlsStep.SERVE, b"")
    assert nbd.tls_step(nbd.NBD_OPT_EXPORT_NAME, b"vm1", forced=True, active=False) == (nbd.TlsStep.HANG_UP, b"")
    for opt in (nbd.NBD_OPT_LIST, nbd.NBD_OPT_INFO, nbd.NBD_OPT_GO, nbd.NBD_OPT_STRUCTURED_REPLY,
                nbd.NBD_OPT_LIST_META_CONTEXT, nbd.NBD_OPT_SET_META_CONTEXT, nbd.NBD_OPT_EXTENDED_HEADERS, 0x4242):
        step, reply = nbd.tls_step(opt, b"", forced=True, active=False)
        assert step is nbd.TlsStep.REPLY and _reply_type(reply) == nbd.NBD_REP_ERR_TLS_REQD, opt
        assert struct.unpack_from(">I", reply, 8)[0] == opt  # the reply names the option it answers


def test_forcedtls_once_tls_runs() -> None:
    """A second STARTTLS gets NBD_REP_ERR_INVALID; TLS_REQD is never sent once TLS runs."""
    step, reply = nbd.tls_step(nbd.NBD_OPT_STARTTLS, b"", forced=True, active=True)
    assert step is nbd.TlsStep.REPLY and _reply_type(reply) == nbd.NBD_REP_ERR_INVALID
    for opt in (nbd.NBD_OPT_EXPORT_NAME, nbd.NBD_OPT_GO, nbd.NBD_OPT_INFO, nbd.NBD_OPT_LIST, 0x4242):
        assert nbd.tls_step(opt, b"", forced=True, active=True) == (nbd.TlsStep.SERVE, b"")
