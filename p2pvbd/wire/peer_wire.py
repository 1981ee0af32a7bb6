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
from typing import Any, NamedTuple

import msgpack

from p2pvbd.base.msgpack_bounds import MAX_FRAME_DEPTH as MAX_FRAME_DEPTH
from p2pvbd.base.msgpack_bounds import FrameError as FrameError
from p2pvbd.base.msgpack_bounds import FrameLimits as FrameLimits
from p2pvbd.base.msgpack_bounds import unpack_bounded as unpack_bounded

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
# What one frame may decode to. A msgpack byte can become a 64-byte dict or list (the nested-maps bomb: 7 MiB
# grew a daemon by 500 MB and held its event loop 1.3 s), so a frame's elements and containers are counted as
# they are decoded, not only its bytes. The longest list any op sends is a deed chain (deeds.MAX_CHAIN_LINKS,
# 16384 bins); 2x that. Version maps travel as bin (wire/map_wire.py), never as one element per block.
MAX_FRAME_ELEMENTS = 1 << 15
# Lists and maps in one frame: a get_blocks reply or put_blocks request is one list per block entry
# (MAX_BLOCK_ENTRIES, 2008) plus the envelope's few; 2x that, rounded up.
MAX_FRAME_CONTAINERS = 4096
# No single list or map can hold more than a frame's whole element budget.
MAX_ARRAY_LEN = MAX_FRAME_ELEMENTS
MAX_MAP_LEN = MAX_FRAME_ELEMENTS // 2
# Most requests are a name and a few numbers; only ops that carry block or VM data may send bigger frames
# (OpSpec.max_frame). Frames up to this size are also cheap enough to decode on the event loop (well under
# a millisecond); bigger ones are decoded in a worker thread by the transport.
SMALL_FRAME_BYTES = 64 * 1024
# Enough of a frame's head to read its id and op (an op name is a short identifier).
PEEK_BYTES = 256
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
    """An op's request body: required fields and their msgpack types. Extra fields are allowed (newer peers).
    ``max_frame``: the largest request frame of this op (bigger ones end the connection before decoding)."""

    fields: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    doc: str = ""
    max_frame: int = SMALL_FRAME_BYTES





# A member's frames (after TLS proved its certificate): a block reply at most.
PEER_LIMITS = FrameLimits(frame_bytes=MAX_FRAME_BYTES, str_len=MAX_STR_LEN, bin_len=MAX_FRAME_BYTES,
                          array_len=MAX_ARRAY_LEN, map_len=MAX_MAP_LEN, containers=MAX_FRAME_CONTAINERS,
                          elements=MAX_FRAME_ELEMENTS, depth=MAX_FRAME_DEPTH)
# Anyone's frames, on the join port: a join is a hello, join_ca and join, each a flat map of a few names and a
# PEM (a CSR or certificate is under 1 KiB), and their replies; an error message is at most 2000 characters.
# 16 KiB is 8x the largest, and decodes to well under 100 KB whatever it holds.
JOIN_LIMITS = FrameLimits(frame_bytes=16 * 1024, str_len=4096, bin_len=8 * 1024, array_len=16, map_len=16,
                          containers=16, elements=64, depth=4)


# The peer port's ops. Handlers receive bodies already checked against these.
OPS: dict[str, OpSpec] = {
    "hello": OpSpec({"protocol": int}, "version check; answered by the transport itself"),
    # Version maps, compared through their summaries (swarm/maps.py, wire/map_wire.py).
    "map_summary": OpSpec({"disk": str}, "geometry, owner, epoch, generation and root digest of a disk's map"),
    "map_nodes": OpSpec({"disk": str, "level": int, "parents": bytes}, "digests of the children of some nodes"),
    "map_entries": OpSpec({"disk": str, "blocks": dict}, "(version, hash) records of some blocks",
                          MAX_FRAME_BYTES),
    "map_changes": OpSpec({"disk": str, "since": int, "start_leaf": int},
                          "the change feed: blocks whose version is above since, one page"),
    "get_blocks": OpSpec({"disk": str, "blocks": list}, "block contents by [index, version] pairs"),
    "cancel": OpSpec({"id": int}, "stop the request with that id and send no reply to either; answered by "
                                  "the transport itself"),
    # Live migration, source -> destination (see migrate.py / migration/target.py).
    "deeds": OpSpec({"disk": str}, "the chain of signed deeds proving who owns a disk (deeds.py)"),
    "migrate_prepare": OpSpec({"disk": str, "epoch": int, "size": int, "block_size": int, "mode": str,
                               "deeds": list},
                              "a migration of disk is coming: become its incoming replica (deeds: the "
                              "caller's proof that it owns disk at epoch)", MAX_FRAME_BYTES),
    "migrate_pull": OpSpec({"disk": str}, "start the bulk multi-peer pull; answers a job id"),
    "migrate_job": OpSpec({"disk": str, "job": int}, "progress of a bulk pull"),
    "put_blocks": OpSpec({"disk": str, "blocks": list}, "mirrored blocks [index, version, hash, data, enc]",
                         MAX_FRAME_BYTES),
    "migrate_commit": OpSpec({"disk": str, "epoch": int, "map_digest": bytes, "counter": int, "deed": bytes},
                             "take ownership if this host's map has the frozen source's root digest (deed: "
                             "the source's signed hand-over to this host)"),
    "migrate_status": OpSpec({"disk": str, "epoch": int}, "was that epoch committed? (else it never will be)"),
    "migrate_abort": OpSpec({"disk": str}, "the migration is off: back to a standby replica"),
    "guest_io": OpSpec({"disk": str, "op": str}, "I/O of a guest still connected to the old owner", MAX_FRAME_BYTES),
    # Moving a whole VM, source -> destination (vm/move.py), once each of its disks' migrations is prepared.
    "vm_incoming": OpSpec({"vm": dict}, "start the VM's QEMU here, waiting for its migration stream",
                          MAX_FRAME_BYTES),
    "vm_ram": OpSpec({"vm": str, "seq": int, "data": bytes}, "the next piece of QEMU's migration stream, in order",
                     MAX_FRAME_BYTES),
    "vm_check": OpSpec({"vm": str}, "the incoming QEMU's run state (inmigrate while it waits)"),
    "vm_finish": OpSpec({"vm": str}, "answer once the arrived VM runs here"),
    "vm_abort": OpSpec({"vm": str}, "the move is off: quit the incoming QEMU"),
    "vm_ram_held": OpSpec({"vm": str}, "the disks are ready: stop pulling from warm hosts, say which pages are held"),
    # The host running a VM -> hosts keeping its memory warm (vm/warm.py).
    "vm_warm": OpSpec({"vm": str, "size": int, "offsets": bytes, "data": bytes},
                      "pages of the VM's memory that changed since the last ones sent (zstd)", MAX_FRAME_BYTES),
    "vm_warm_drop": OpSpec({"vm": str}, "stop keeping the VM's memory: delete the copy"),
    "vm_warm_grant": OpSpec({"vm": str, "host": str}, "the owner lets that host read the copy for a move there"),
    # A move's destination -> the hosts keeping the VM's memory warm (vm/warm_pull.py).
    "vm_warm_index": OpSpec({"vm": str, "first": int, "count": int}, "digests of the pages of the copy kept here"),
    "vm_warm_read": OpSpec({"vm": str, "offsets": bytes}, "those pages of the copy kept here (zstd)"),
    # Destination -> the host running a VM: `migrate VM --to HOST` run on HOST itself.
    "revocations": OpSpec({"serial": int, "names": list, "sig": bytes},
                          "the swarm's newest revocation list, signed by its CA (kept if newer and valid)"),
    "vm_move": OpSpec({"vm": str, "to": str, "mode": str, "max_downtime_ms": float}, "move that VM to the caller"),
    # Relayed links between members that cannot connect to each other (swarm/relay.py).
    "relay_open": OpSpec({"to": str}, "carry a pipe from the caller to that host; answers the pipe's id"),
    "relay_accept": OpSpec({"from": str, "id": int}, "the relay asks: serve that host's TLS session on this pipe"),
    "relay_send": OpSpec({"id": int, "seq": int, "data": bytes},
                         "an end's chunk number seq for the other end (empty: it closed)", MAX_FRAME_BYTES),
    "relay_deliver": OpSpec({"id": int, "seq": int, "data": bytes},
                            "the other end's chunk number seq (empty: it closed)", MAX_FRAME_BYTES),
    # Hole punching between members talking through a relay (swarm/punch.py).
    "punch": OpSpec({"at": str}, "dial the caller at that public ip:port; answers where this host dials from"),
    "vm_move_status": OpSpec({"vm": str, "to": str}, "progress of that move"),
    "vm_where": OpSpec({"vm": str}, "whether that VM runs on this host (`vm list` elsewhere says where it runs)"),
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





def decode_payload(payload: bytes | memoryview, limits: FrameLimits = PEER_LIMITS) -> dict[str, Any]:
    """One frame's payload decoded within ``limits`` and checked as an envelope; FrameError otherwise.

    Keeps no state between calls, so it may run in a worker thread."""
    return validate_envelope(unpack_bounded(payload, limits))





def peek_op(head: bytes) -> str | None:
    """The op of a request frame from its first bytes, read before its body (this protocol's encoder writes
    id, op, body in that order); None for a reply. FrameError if neither can be told, msgpack.OutOfData if
    ``head`` ends before it can be."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=PEEK_BYTES, max_str_len=PEEK_BYTES, max_bin_len=0,
                                max_array_len=0, max_map_len=0, max_ext_len=0)
    unpacker.feed(head[:PEEK_BYTES])
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "op":
                op = unpacker.unpack()
                if isinstance(op, str):
                    return op
                break
            if key in ("ok", "error"):
                return None
            if key != "id":
                break
            unpacker.skip()
    except msgpack.OutOfData:
        raise
    except Exception as e:  # not msgpack
        raise FrameError(f"a large frame whose op cannot be read first: {type(e).__name__}") from None
    raise FrameError("a large frame must name its op before its body")


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, then drain ``next_frame`` until it returns None.

    ``limits`` bound every frame; with ``ops``, a request frame above SMALL_FRAME_BYTES must be of an op
    whose ``max_frame`` allows its size, which is checked from its first bytes before it is buffered whole.
    The transport splits ``next_frame`` in two: ``pending`` (the size of the next whole frame, checked) and
    ``decode_pending`` (which it runs in a worker thread for big frames). After a FrameError the stream is
    out of sync for good, so the decoder keeps raising it.
    """

    def __init__(self, limits: FrameLimits = PEER_LIMITS, ops: Mapping[str, OpSpec] | None = OPS) -> None:
        self._buf = bytearray()
        self.limits = limits
        self._ops = ops
        self._error: FrameError | None = None
        self._checked = -1  # the length of the frame at the buffer's head, once its op was checked

    def feed(self, data: bytes) -> None:
        if self._error:
            raise self._error
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> dict[str, Any] | None:
        return None if self.pending() is None else self.decode_pending()

    def pending(self) -> int | None:
        """The payload size of the next frame once it is buffered whole (None until then)."""
        if self._error:
            raise self._error
        try:
            return self._pending()
        except FrameError as e:
            self._fail(e)
            raise

    def decode_pending(self) -> dict[str, Any]:
        """Decode the frame ``pending`` reported and drop it from the buffer. Touches only this decoder, so it
        may run in a worker thread while nothing is fed."""
        if self._error:
            raise self._error
        (length,) = HEADER.unpack_from(self._buf)
        end = HEADER.size + length
        try:
            # msgpack reads the frame in place: no copy of a multi-MiB reply before it is decoded. The views
            # must be released before the buffer shrinks (a bytearray with live exports cannot be resized).
            with memoryview(self._buf) as whole, whole[HEADER.size:end] as payload:
                frame = decode_payload(payload, self.limits)
        except FrameError as e:
            self._fail(e)
            raise
        del self._buf[:end]  # O(1): CPython drops a bytearray's head by moving its start
        self._checked = -1
        return frame

    def _fail(self, e: FrameError) -> None:
        self._error = e
        self._buf.clear()

    def _pending(self) -> int | None:
        if len(self._buf) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf)
        if length > self.limits.frame_bytes:
            raise FrameError(f"frame length {length} exceeds the {self.limits.frame_bytes}-byte limit")
        if length > SMALL_FRAME_BYTES and self._ops is not None and self._checked != length:
            head = bytes(self._buf[HEADER.size:HEADER.size + PEEK_BYTES])
            try:
                op = peek_op(head)
            except msgpack.OutOfData:
                if len(head) < PEEK_BYTES:
                    return None  # more of the head is on its way
                raise FrameError("a large frame whose op cannot be read from its head") from None
            if op is not None:
                spec = self._ops.get(op)
                if spec is None or length > spec.max_frame:
                    limit = 0 if spec is None else spec.max_frame
                    raise FrameError(f"a {op!r} request of {length} bytes exceeds its {limit}-byte limit")
            self._checked = length
        if len(self._buf) < HEADER.size + length:
            return None
        return length


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


class BlockEntry(NamedTuple):
    """One block of a get_blocks reply or a put_blocks request, on the wire as the list [index, version,
    hash, payload, encoding]. No hash and no payload: the sender does not hold the version asked (a
    replica says which it holds); no payload: a zero block."""

    index: int
    version: int
    hash: bytes | None = None
    payload: bytes | None = None
    encoding: int = ENC_RAW


def pack_entry(index: int, version: int, hash: bytes | None = None, data: bytes | None = None,
               compressor: Any = None) -> BlockEntry:
    """The entry for a block: ``data`` (None for a zero block) compressed with ``compressor`` (a
    zstandard.ZstdCompressor, one per thread) when that saves bytes."""
    if data is None:
        return BlockEntry(index, version, hash)
    encoding, payload = pack_block(data, compressor)
    return BlockEntry(index, version, hash, payload, encoding)


def unpack_entry(item: Any) -> BlockEntry:
    """A received entry, typed; FrameError unless it is one (its payload is decoded by ``unpack_block``).
    A tuple is one too: what a sender in this process made, before msgpack turned it into a list."""
    if not (isinstance(item, list | tuple) and len(item) == 5
            and isinstance(item[0], int) and isinstance(item[1], int)):
        raise FrameError("a block entry is [index, version, hash, payload, encoding]")
    entry = BlockEntry(*item)
    if not (isinstance(entry.hash, bytes) or (entry.hash is None and entry.payload is None)) \
            or not (entry.payload is None or isinstance(entry.payload, bytes)):
        raise FrameError(f"block {entry.index}: a hash is bytes, a payload bytes or nothing")
    return entry


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
