"""Framing and envelopes of the peer protocol, including a fuzzed decoder."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvbd.wire import peer_wire as w
from p2pvbd.wire.peer_wire import FrameDecoder, FrameError, PeerError


def frame_of(obj: Any) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def decode_all(data: bytes) -> list[dict[str, Any]]:
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


def test_round_trip_and_byte_at_a_time() -> None:
    data = (w.encode_request(1, "get_blocks", {"disk": "d", "blocks": [1, 2]})
            + w.encode_reply(1, {"data": b"\0" * 1000})
            + w.encode_error(2, "not_found", "no such disk"))
    expected = [
        {"id": 1, "op": "get_blocks", "body": {"disk": "d", "blocks": [1, 2]}},
        {"id": 1, "ok": True, "body": {"data": b"\0" * 1000}},
        {"id": 2, "ok": False, "error": {"code": "not_found", "message": "no such disk"}},
    ]
    assert decode_all(data) == expected
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        dec.feed(data[i:i + 1])
        while (f := dec.next_frame()) is not None:
            got.append(f)
    assert got == expected and dec.buffered == 0


def test_largest_block_fits() -> None:
    frame = w.encode_reply(7, {"blocks": [b"x" * w.MAX_BLOCK_BYTES]})
    assert decode_all(frame)[0]["body"]["blocks"][0] == b"x" * w.MAX_BLOCK_BYTES


def test_oversized_length_prefix_is_refused_before_buffering() -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", w.MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameError, match="exceeds"):
        dec.next_frame()
    # The stream is out of sync for good.
    with pytest.raises(FrameError):
        dec.feed(w.encode_reply(1, {}))
    with pytest.raises(FrameError):
        dec.next_frame()


def test_encode_refuses_oversized_frames() -> None:
    with pytest.raises(FrameError):
        w.encode_reply(1, {"x": b"x" * (w.MAX_FRAME_BYTES + 1)})
    with pytest.raises(FrameError):
        w.encode_request(-1, "hello", {})
    with pytest.raises(FrameError):
        w.encode_reply(True, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("obj", [  # put_blocks: an op whose frames may be large, so the decoder reads them
    {"id": 1, "op": "put_blocks", "body": {"s": "a" * (w.MAX_STR_LEN + 1)}},
    {"id": 1, "op": "put_blocks", "body": {"a": [0] * (w.MAX_ARRAY_LEN + 1)}},
    {"id": 1, "op": "put_blocks", "body": {str(i): 0 for i in range(w.MAX_MAP_LEN + 1)}},
    {"id": 1, "op": "x", "body": {"e": msgpack.ExtType(5, b"abc")}},
    {"id": 1, "op": "x", "body": {1: 2}},  # non-string map key
])
def test_decoder_limits(obj: Any) -> None:
    with pytest.raises(FrameError, match="undecodable"):
        decode_all(frame_of(obj))


@pytest.mark.parametrize("obj", [
    [1, 2], "x", None, {}, {"id": 1}, {"id": "1", "op": "x", "body": {}}, {"id": True, "op": "x", "body": {}},
    {"id": -1, "op": "x", "body": {}}, {"id": 1, "op": 5, "body": {}}, {"id": 1, "op": "x", "body": []},
    {"id": 1, "op": "x", "body": {}, "extra": 1}, {"id": 1, "ok": 1, "body": {}}, {"id": 1, "ok": True, "body": 3},
    {"id": 1, "ok": True, "error": {"code": "a", "message": "b"}}, {"id": 1, "ok": False, "error": "boom"},
    {"id": 1, "ok": False, "error": {"code": "a"}}, {"id": 1, "ok": False, "error": {"code": 1, "message": "b"}},
])
def test_bad_envelopes(obj: Any) -> None:
    with pytest.raises(FrameError):
        decode_all(frame_of(obj))


def test_trailing_bytes_and_bad_utf8_and_deep_nesting() -> None:
    payload = msgpack.packb({"id": 1, "op": "x", "body": {}}) + b"\xc0"
    with pytest.raises(FrameError, match="trailing"):
        decode_all(struct.pack(">I", len(payload)) + payload)
    bad_utf8 = b"\x83\xa2id\x01\xa2op\xa2\xff\xfe\xa4body\x80"
    with pytest.raises(FrameError):
        decode_all(struct.pack(">I", len(bad_utf8)) + bad_utf8)
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(FrameError):
        decode_all(struct.pack(">I", len(deep)) + deep)
    with pytest.raises(FrameError):
        decode_all(struct.pack(">I", 0))


def test_validate_body() -> None:
    w.validate_body("get_blocks", {"disk": "d", "blocks": [], "future_field": 1})
    w.validate_body("hello", {"protocol": 1})
    with pytest.raises(PeerError) as e:
        w.validate_body("nope", {})
    assert e.value.code == w.ERR_UNKNOWN_OP
    for body in ({}, {"disk": 3, "blocks": []}, {"disk": "d"}):
        with pytest.raises(PeerError) as e:
            w.validate_body("get_blocks", body)
        assert e.value.code == w.ERR_BAD_REQUEST
    with pytest.raises(PeerError):
        w.validate_body("hello", {"protocol": True})
    with pytest.raises(PeerError):
        w.validate_body("join", {"invite_id": "x", "name": "n", "csr": b"", "proof": b""})  # join is not a peer op
    w.validate_body("join", {"invite_id": "x", "name": "n", "csr": b"", "proof": b""}, w.JOIN_OPS)


def test_error_message_truncated() -> None:
    (f,) = decode_all(w.encode_error(3, "c" * 500, "m" * 10_000))
    assert len(f["error"]["code"]) == w.MAX_ERROR_CODE_CHARS
    assert len(f["error"]["message"]) == w.MAX_ERROR_MESSAGE_CHARS


# ---- fuzz ----------------------------------------------------------------------------------------


def drain(data: bytes, chunks: list[int]) -> None:
    """Feed ``data`` in the given chunk sizes; only FrameError may escape."""
    dec = FrameDecoder()
    pos = 0
    try:
        for n in [*chunks, len(data)]:
            dec.feed(data[pos:pos + n])
            pos += n
            while dec.next_frame() is not None:
                pass
    except FrameError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(1, 64), max_size=10))
def test_fuzz_random_bytes(data: bytes, chunks: list[int]) -> None:
    drain(data, chunks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500))
def test_fuzz_random_payload_with_valid_length(payload: bytes) -> None:
    drain(struct.pack(">I", len(payload)) + payload, [])


@settings(max_examples=300, deadline=None)
@given(msgpack_values, st.data())
def test_fuzz_truncated_and_mutated_frames(obj: Any, data: st.DataObject) -> None:
    frame = frame_of({"id": 1, "op": "x", "body": {"v": obj}})
    cut = data.draw(st.integers(0, len(frame)))
    drain(frame[:cut], [])
    pos = data.draw(st.integers(0, len(frame) - 1))
    flipped = bytearray(frame)
    flipped[pos] ^= data.draw(st.integers(1, 255))
    drain(bytes(flipped), data.draw(st.lists(st.integers(1, 16), max_size=5)))


@settings(max_examples=200, deadline=None)
@given(msgpack_values)
def test_fuzz_any_value_as_envelope(obj: Any) -> None:
    drain(frame_of(obj), [])
    drain(frame_of({"id": 1, "op": "get_blocks", "body": {"disk": obj, "blocks": obj}}), [])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.text(max_size=30),
       st.dictionaries(st.text(max_size=5), msgpack_values, max_size=4))
def test_fuzz_valid_requests_round_trip(request_id: int, op: str, body: dict[str, Any]) -> None:
    (f,) = decode_all(w.encode_request(request_id, op, body))
    assert f["id"] == request_id and f["op"] == op
    assert f["body"].keys() == body.keys()


def test_block_entries_have_one_shape() -> None:
    """What pack_entry makes crosses msgpack and comes back equal; anything else is a FrameError."""
    compressor = zstandard.ZstdCompressor(level=w.BLOCK_ZSTD_LEVEL)
    entries = [w.pack_entry(1, 2), w.pack_entry(3, 4, b"h" * 32),
               w.pack_entry(5, 6, b"h" * 32, b"a" * 4096, compressor)]
    assert entries[2].encoding == w.ENC_ZSTD and len(entries[2].payload or b"") < 4096
    assert [w.unpack_entry(e) for e in msgpack.unpackb(msgpack.packb(entries))] == entries
    for bad in ([1, 2, 3], (1, 2, None, b"x", 0), [1, "2", b"h", None, 0], [1, 2, "h", None, 0],
                [1, 2, b"h", "data", 0], {"index": 1}):
        with pytest.raises(FrameError):
            w.unpack_entry(bad)
