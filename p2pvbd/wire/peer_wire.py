"""The peer protocol's wire format, sans IO: length-prefixed msgpack frames and request/reply envelopes.

Kept free of sockets so the decoder can be fuzzed directly and reused by any transport. Every frame is
``4-byte big-endian length`` + one msgpack map. Requests are ``{"id", "op", "body"}``; replies are
``{"id", "ok": True, "body"}`` or ``{"id", "ok": False, "error": {"code", "message"}}``. Ids let many
requests share one connection and their replies come back in any order. The one request without a reply
is ``cancel``: the client no longer waits for the request it names, so the server stops working on it and
sends nothing (a peer that does not know ``cancel`` answers ``unknown_op``, which the client drops).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

# Bumped on incompatible changes; checked by the transport's built-in ``hello``.
PROTOCOL_VERSION = 3

HEADER = struct.Struct(">I")
# The largest payload a message carries: one replica block (the replica store's biggest block size).
MAX_BLOCK_BYTES = 4 * 1024 * 1024
# One block plus its envelope, hashes and version metadata; 2x leaves room for batching several smaller
# blocks in one get_blocks reply while capping what a peer can make us buffer per frame.
MAX_FRAME_BYTES = 2 * MAX_BLOCK_BYTES
# Kept free in a frame for its envelope (id, op, field names) around the bytes it carries.
FRAME_ENVELOPE_BYTES = 64 * 1024
# The block entries of one get_blocks reply, all counted: each entry's bytes and its data's.
BLOCKS_REPLY_BUDGET = MAX_FRAME_BYTES - FRAME_ENVELOPE_BYTES
# One block entry [index, version, hash, data, encoding] besides its data, msgpacked: array header 1,
# two uint64 9 each, a 16-byte bin 18, the data's bin header 5, the encoding 1 (43), rounded up.
BLOCK_ENTRY_BYTES = 48
# The replica store's smallest block (store/version_map.MIN_BLOCK_SIZE; repeated so the wire stays numpy-free).
MIN_BLOCK_BYTES = 4 * 1024
# Block entries one get_blocks or put_blocks body may name: what one reply carries at the smallest block
# size (2008); a request for more could never be answered in one reply. The fetcher asks for 1 MiB of
# blocks at a time and the mirror ships 1 MiB per put_blocks: 256 entries at most.
MAX_BLOCK_ENTRIES = BLOCKS_REPLY_BUDGET // (MIN_BLOCK_BYTES + BLOCK_ENTRY_BYTES)
# Guest bytes in one guest_io request or reply: forwarders split larger guest requests (the NBD export
# takes up to 32 MiB) at this size, which fits a frame and, a multiple of every block size, splits no block.
MAX_GUEST_IO_BYTES = MAX_BLOCK_BYTES
# Names, op names, error messages: nothing legitimate is longer; a huge str is an attack or a bug.
MAX_STR_LEN = 64 * 1024
# A version map is one entry per block: 2**20 entries covers a 4 TiB disk at 4 MiB blocks.
MAX_ARRAY_LEN = 1 << 20
# Maps are envelopes and small bodies; per-block data travels as arrays or bin.
MAX_MAP_LEN = 1 << 16
# Request ids are msgpack unsigned 64-bit ints (the envelope's "id").
MAX_REQUEST_ID = (1 << 64) - 1
# Error codes are short identifiers; messages are human text, truncated on encode.
MAX_ERROR_CODE_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 2000

# Error codes every side understands.
ERR_BAD_REQUEST = "bad_request"
ERR_UNKNOWN_OP = "unknown_op"
ERR_INTERNAL = "internal"
ERR_PROTOCOL = "protocol"  # version mismatch in hello
ERR_TIMEOUT = "timeout"  # raised locally, never sent
ERR_CONNECTION = "connection"  # raised locally, never sent


class FrameError(Exception):
    """The byte stream is not our protocol; the connection cannot continue."""


class PeerError(Exception):
    """A request failed: ``code`` is machine-readable, ``message`` is for humans.

    Raised by handlers to send an error reply, and raised to callers when a reply is an error.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class OpSpec:
    """An op's request body: required fields and their msgpack types. Extra fields are allowed (newer peers)."""

    fields: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    doc: str = ""


# The peer port's ops. Handlers receive bodies already checked against these.
OPS: dict[str, OpSpec] = {
    "hello": OpSpec({"protocol": int}, "version check; answered by the transport itself"),
    # Version maps, compared through their summaries (swarm/maps.py, wire/map_wire.py).
    "map_summary": OpSpec({"disk": str}, "geometry, owner, epoch, generation and root digest of a disk's map"),
    "map_nodes": OpSpec({"disk": str, "level": int, "parents": bytes}, "digests of the children of some nodes"),
    "map_entries": OpSpec({"disk": str, "blocks": dict}, "(version, hash) records of some blocks"),
    "map_changes": OpSpec({"disk": str, "since": int, "start_leaf": int},
                          "the change feed: blocks whose version is above since, one page"),
    "get_blocks": OpSpec({"disk": str, "blocks": list}, "block contents by [index, version] pairs"),
    "cancel": OpSpec({"id": int}, "stop the request with that id and send no reply to either; answered by "
                                  "the transport itself"),
    # Live migration, source -> destination (see migrate.py / migrate_target.py).
    "deeds": OpSpec({"disk": str}, "the chain of signed deeds proving who owns a disk (deeds.py)"),
    "migrate_prepare": OpSpec({"disk": str, "epoch": int, "size": int, "block_size": int, "mode": str,
                               "deeds": list},
                              "a migration of disk is coming: become its incoming replica (deeds: the "
                              "caller's proof that it owns disk at epoch)"),
    "migrate_pull": OpSpec({"disk": str}, "start the bulk multi-peer pull; answers a job id"),
    "migrate_job": OpSpec({"disk": str, "job": int}, "progress of a bulk pull"),
    "put_blocks": OpSpec({"disk": str, "blocks": list}, "mirrored blocks [index, version, hash, data, enc]"),
    "migrate_commit": OpSpec({"disk": str, "epoch": int, "map_digest": bytes, "counter": int, "deed": bytes},
                             "take ownership if this host's map has the frozen source's root digest (deed: "
                             "the source's signed hand-over to this host)"),
    "migrate_status": OpSpec({"disk": str, "epoch": int}, "was that epoch committed? (else it never will be)"),
    "migrate_abort": OpSpec({"disk": str}, "the migration is off: back to a standby replica"),
    "guest_io": OpSpec({"disk": str, "op": str}, "I/O of a guest still connected to the old owner"),
    # Moving a whole VM, source -> destination (vm/move.py), once each of its disks' migrations is prepared.
    "vm_incoming": OpSpec({"vm": dict}, "start the VM's QEMU here, waiting for its migration stream"),
    "vm_ram": OpSpec({"vm": str, "seq": int, "data": bytes}, "the next piece of QEMU's migration stream, in order"),
    "vm_check": OpSpec({"vm": str}, "the incoming QEMU's run state (inmigrate while it waits)"),
    "vm_finish": OpSpec({"vm": str}, "answer once the arrived VM runs here"),
    "vm_abort": OpSpec({"vm": str}, "the move is off: quit the incoming QEMU"),
    # Destination -> the host running a VM: `migrate VM --to HOST` run on HOST itself.
    "revocations": OpSpec({"serial": int, "names": list, "sig": bytes},
                          "the swarm's newest revocation list, signed by its CA (kept if newer and valid)"),
    "vm_move": OpSpec({"vm": str, "to": str, "mode": str, "max_downtime_ms": float}, "move that VM to the caller"),
    # Relayed links between members that cannot connect to each other (swarm/relay.py).
    "relay_open": OpSpec({"to": str}, "carry a pipe from the caller to that host; answers the pipe's id"),
    "relay_accept": OpSpec({"from": str, "id": int}, "the relay asks: serve that host's TLS session on this pipe"),
    "relay_send": OpSpec({"id": int, "seq": int, "data": bytes},
                         "an end's chunk number seq for the other end (empty: it closed)"),
    "relay_deliver": OpSpec({"id": int, "seq": int, "data": bytes},
                            "the other end's chunk number seq (empty: it closed)"),
    # Hole punching between members talking through a relay (swarm/punch.py).
    "punch": OpSpec({"at": str}, "dial the caller at that public ip:port; answers where this host dials from"),
    "vm_move_status": OpSpec({"vm": str, "to": str}, "progress of that move"),
    # libvirt migrations of adopted domains (libvirt/service.py): destination -> source, but hello and state.
    "libvirt_hello": OpSpec({}, "how this host's libvirt is reached (URI, NBD socket, migration address)"),
    "libvirt_state": OpSpec({"domain": str}, "that domain's state in this host's libvirt"),
    "libvirt_move": OpSpec({"domain": str, "disks": list},
                           "libvirt migrates that domain to the caller: migrate these disks of it there, held "
                           "converged until libvirt_go"),
    "libvirt_move_status": OpSpec({"domain": str}, "whether that domain's disks converged, or why they failed"),
    "libvirt_go": OpSpec({"domain": str}, "the caller's QEMU runs the domain: switch its disks over"),
    "libvirt_cancel": OpSpec({"domain": str}, "the caller's QEMU of that domain is gone: keep its disks here"),
}
# The join port's ops (a joiner has no certificate yet, so these must never share the peer port's table).
JOIN_OPS: dict[str, OpSpec] = {
    "hello": OPS["hello"],
    "cancel": OPS["cancel"],
    "join_ca": OpSpec({}, "the swarm CA certificate, for the joiner to pin against its token"),
    "join": OpSpec({"invite_id": str, "name": str, "csr": bytes, "proof": bytes}, "sign the joiner's key"),
}


def _type_ok(value: Any, expected: type | tuple[type, ...]) -> bool:
    # bool is an int in Python but not on the wire: never let True pass as a count or an index.
    if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,)):
        return False
    return isinstance(value, expected)


def validate_body(op: str, body: dict[str, Any], ops: Mapping[str, OpSpec] = OPS) -> None:
    """Raise PeerError (unknown_op / bad_request) unless ``body`` fits ``op``'s schema."""
    spec = ops.get(op)
    if spec is None:
        raise PeerError(ERR_UNKNOWN_OP, f"unknown op {op!r}")
    for name, expected in spec.fields.items():
        if name not in body:
            raise PeerError(ERR_BAD_REQUEST, f"{op}: missing field {name!r}")
        if not _type_ok(body[name], expected):
            raise PeerError(ERR_BAD_REQUEST, f"{op}: field {name!r} has the wrong type")


def _pack(obj: dict[str, Any]) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return HEADER.pack(len(payload)) + payload


def _check_id(request_id: Any) -> None:
    if isinstance(request_id, bool) or not isinstance(request_id, int) or not 0 <= request_id <= MAX_REQUEST_ID:
        raise FrameError("request id must be an integer in 0..2**64-1")


def encode_request(request_id: int, op: str, body: dict[str, Any]) -> bytes:
    _check_id(request_id)
    return _pack({"id": request_id, "op": op, "body": body})


def encode_reply(request_id: int, body: dict[str, Any]) -> bytes:
    _check_id(request_id)
    return _pack({"id": request_id, "ok": True, "body": body})


def encode_error(request_id: int, code: str, message: str) -> bytes:
    _check_id(request_id)
    error = {"code": code[:MAX_ERROR_CODE_CHARS], "message": message[:MAX_ERROR_MESSAGE_CHARS]}
    return _pack({"id": request_id, "ok": False, "error": error})


def is_request(envelope: dict[str, Any]) -> bool:
    return "op" in envelope


def validate_envelope(obj: Any) -> dict[str, Any]:
    """Return ``obj`` if it is a well-formed request or reply envelope, else raise FrameError.

    Exact key sets: anything unexpected at this level means the peer speaks something else.
    """
    if not isinstance(obj, dict):
        raise FrameError("frame is not a map")
    _check_id(obj.get("id"))
    keys = set(obj)
    if keys == {"id", "op", "body"}:
        if not isinstance(obj["op"], str) or not isinstance(obj["body"], dict):
            raise FrameError("request needs a string op and a map body")
    elif keys == {"id", "ok", "body"}:
        if obj["ok"] is not True or not isinstance(obj["body"], dict):
            raise FrameError("a success reply needs ok=true and a map body")
    elif keys == {"id", "ok", "error"}:
        err = obj["error"]
        if (obj["ok"] is not False or not isinstance(err, dict) or set(err) != {"code", "message"}
                or not isinstance(err["code"], str) or not isinstance(err["message"], str)):
            raise FrameError("an error reply needs ok=false and error={code, message}")
    else:
        raise FrameError(f"not a request or reply envelope (keys {sorted(map(str, keys))})")
    return obj


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, then drain ``next_frame`` until it returns None.

    After a FrameError the stream is out of sync for good, so the decoder keeps raising it.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> None:
        if self._error:
            raise self._error
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> dict[str, Any] | None:
        if self._error:
            raise self._error
        try:
            return self._next()
        except FrameError as e:
            self._error = e
            self._buf.clear()
            raise

    def _next(self) -> dict[str, Any] | None:
        if len(self._buf) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf)
        if length > self._max:
            raise FrameError(f"frame length {length} exceeds the {self._max}-byte limit")
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        # msgpack reads the frame in place: no copy of a multi-MiB reply before it is decoded. The views
        # must be released before the buffer shrinks (a bytearray with live exports cannot be resized).
        with memoryview(self._buf) as whole, whole[HEADER.size:end] as payload:
            obj = self._decode(payload)
        del self._buf[:end]  # O(1): CPython drops a bytearray's head by moving its start
        return validate_envelope(obj)

    def _decode(self, payload: memoryview) -> Any:
        try:
            return msgpack.unpackb(
                payload, raw=False, strict_map_key=True, max_str_len=MAX_STR_LEN, max_bin_len=self._max,
                max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN,
                max_ext_len=0,  # no ext types in this protocol
            )
        except msgpack.ExtraData:
            raise FrameError("trailing bytes after the frame's message") from None
        except Exception as e:
            # msgpack raises a zoo of types (OutOfData, FormatError, StackError, ValueError on limits,
            # UnicodeDecodeError, TypeError on unhashable keys...); all mean the same thing here.
            raise FrameError(f"undecodable frame: {type(e).__name__}: {e}") from e


# ---- block payloads --------------------------------------------------------------------------------
# How a block's bytes travel in a get_blocks reply: raw, or zstd when that saves bytes. Zero blocks
# travel as None (a marker), never as data.
ENC_RAW = 0
ENC_ZSTD = 1
# zstd level 1: ~500 MB/s per core, fast enough to never be the bottleneck of a 1 Gbit/s link, and
# most of the gain on compressible disk data (text, sparse file systems).
BLOCK_ZSTD_LEVEL = 1
# Compress only when it saves at least 1/8 of the block: random or already compressed data would only
# cost the receiver a decompression for nothing.
MIN_SAVING_FRACTION = 1 / 8


def pack_block(data: bytes, compressor: Any) -> tuple[int, bytes]:
    """(encoding, payload) for one block's data; ``compressor`` is a zstandard.ZstdCompressor."""
    packed = compressor.compress(data)
    if len(packed) <= len(data) * (1 - MIN_SAVING_FRACTION):
        return ENC_ZSTD, packed
    return ENC_RAW, data


def unpack_block(encoding: Any, payload: Any, length: int, decompressor: Any) -> bytes:
    """The block's bytes; FrameError unless they decode to exactly ``length`` bytes."""
    if not isinstance(payload, bytes):
        raise FrameError("block payload must be bytes")
    if encoding == ENC_RAW:
        data = payload
    elif encoding == ENC_ZSTD:
        try:
            data = decompressor.decompress(payload, max_output_size=length)
        except Exception as e:  # zstandard.ZstdError and friends: the peer sent garbage
            raise FrameError(f"undecodable block: {e}") from e
    else:
        raise FrameError(f"unknown block encoding {encoding!r}")
    if len(data) != length:
        raise FrameError(f"block of {len(data)} bytes, expected {length}")
    return data
