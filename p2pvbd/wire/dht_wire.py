"""What a DHT datagram may carry: the requests a node answers, the replies it accepts, records paged to fit.

Split out of ``dht`` so the schema every datagram is checked against (after its MAC, before anything acts
on it) reads apart from the kademlia and asyncio machinery. Pure: no sockets are used but for parsing
address literals, no asyncio, no trio. Whatever fails these checks is dropped and counted by ``dht``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from kademlia.node import Node

from p2pvbd.base.home import is_ip, is_name
from p2pvbd.wire.dht_records import BINDING_BYTES, MAX_NAME_BYTES, MAX_RECORDS_PER_KEY
from p2pvbd.wire.peer_wire import FrameError, FrameLimits, unpack_bounded

MAX_NODES_IN_REPLY = 64  # bounds the work a reply causes; peers send ksize (the paper's k = 20)
_NODE_ID_DOMAIN = b"p2pvbd-node/1\0"
_DATAGRAM_DOMAIN = b"p2pvbd-datagram/1\0"
# A sender block: a name, a 32-byte key, the CA's binding and a 64-byte signature, with msgpack framing.
MAX_SENDER_BYTES = MAX_NAME_BYTES + 32 + BINDING_BYTES + 64 + 16
_SENDER_LEN_BYTES = 2  # the block's length, big-endian, before it


def node_id_for(name: str) -> bytes:
    """A host's DHT node id: derived from its name, so a member has exactly one (the name its
    certificate and key binding carry) and cannot fill routing tables with made-up identities."""
    return hashlib.sha1(_NODE_ID_DOMAIN + name.encode()).digest()


@dataclass(frozen=True)
class Sender:
    """Who signed a datagram: its name, key, the CA's binding of the two, and its signature of the body."""

    name: str
    pubkey: bytes
    binding: bytes
    sig: bytes

    @property
    def node_id(self) -> bytes:
        return node_id_for(self.name)

    def signed(self, body: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.pubkey).verify(self.sig, _DATAGRAM_DOMAIN + body)
        except (InvalidSignature, ValueError):
            return False
        return True


def sign_datagram(body: bytes, name: str, key: Ed25519PrivateKey, pubkey: bytes, binding: bytes) -> bytes:
    """``body`` (rpcudp's framing) behind a sender block signed by ``name``'s key; the MAC goes around both."""
    block = msgpack.packb([name, pubkey, binding, key.sign(_DATAGRAM_DOMAIN + body)])
    return len(block).to_bytes(_SENDER_LEN_BYTES, "big") + block + body


def open_datagram(data: bytes) -> tuple[Sender, bytes] | None:
    """The sender block (parsed, not verified) and the body, or None if the datagram has no valid block."""
    n = int.from_bytes(data[:_SENDER_LEN_BYTES], "big")
    if len(data) < _SENDER_LEN_BYTES + n or n > MAX_SENDER_BYTES:
        return None
    try:
        block = msgpack.unpackb(data[_SENDER_LEN_BYTES:_SENDER_LEN_BYTES + n], max_str_len=MAX_NAME_BYTES,
                                max_bin_len=BINDING_BYTES, max_array_len=4, max_map_len=0, max_ext_len=0)
    except Exception:  # garbage raises many types
        return None
    if not (isinstance(block, list) and len(block) == 4 and is_name(block[0])
            and all(isinstance(x, bytes) for x in block[1:]) and len(block[1]) == 32 and len(block[3]) == 64
            and len(block[2]) in (0, BINDING_BYTES)):
        return None
    return Sender(*block), data[_SENDER_LEN_BYTES + n:]


# What an RPC (a request or a reply, at most dht.MAX_RPC_BYTES) may decode to: the largest is a find_value
# reply, {value: up to 64 records, more, nodes: up to 64 [id, ip, port]}; strings are RPC names and IP literals.
RPC_LIMITS = FrameLimits(frame_bytes=8192, str_len=64, bin_len=8192, array_len=max(MAX_NODES_IN_REPLY,
                         MAX_RECORDS_PER_KEY), map_len=4, containers=2 * MAX_NODES_IN_REPLY,
                         elements=8 * MAX_NODES_IN_REPLY, depth=4)


def decode_rpc(data: bytes) -> object | None:
    """An RPC's msgpack value within RPC_LIMITS, or None."""
    if len(data) > RPC_LIMITS.frame_bytes:
        return None
    try:
        return unpack_bounded(data, RPC_LIMITS)
    except FrameError:
        return None


def is_node_id(x: object) -> bool:
    return isinstance(x, bytes) and len(x) == 20


def _is_raws(x: object) -> bool:
    return isinstance(x, list) and 0 < len(x) <= MAX_RECORDS_PER_KEY and all(isinstance(r, bytes) for r in x)


# Accepted argument lists per RPC (after the sender address that rpcudp prepends); the rest is dropped.
_REQUESTS: dict[str, tuple[tuple[Callable[[object], bool], ...], ...]] = {
    "ping": ((is_node_id,),),
    "store": ((is_node_id, is_node_id, _is_raws),),
    "find_node": ((is_node_id, is_node_id),),
    "find_value": ((is_node_id, is_node_id),
                   (is_node_id, is_node_id, lambda x: type(x) is int and 0 <= x < MAX_RECORDS_PER_KEY)),
}


def is_request(msg: object) -> bool:
    """[name, args] with args matching one of _REQUESTS[name]."""
    if not (isinstance(msg, list) and len(msg) == 2 and isinstance(msg[0], str) and isinstance(msg[1], list)):
        return False
    return any(len(sig) == len(msg[1]) and all(ok(a) for ok, a in zip(sig, msg[1], strict=True))
               for sig in _REQUESTS.get(msg[0], ()))


def parse_node_list(x: object) -> list[Node] | None:
    """A validated peer list from a reply, or None."""
    if not isinstance(x, list) or len(x) > MAX_NODES_IN_REPLY:
        return None
    ok = all(isinstance(t, list) and len(t) == 3 and is_node_id(t[0]) and isinstance(t[1], str) and is_ip(t[1])
             and type(t[2]) is int and 0 < t[2] < 65536 for t in x)
    return [Node(*t) for t in x] if ok else None  # type: ignore[misc]


def parse_value_reply(x: object) -> tuple[list[Node], list[bytes], bool] | None:
    """find_value's reply: a bare peer list (kademlia's shape) or {value, more, nodes}; None if neither."""
    if isinstance(x, list):
        nodes = parse_node_list(x)
        return None if nodes is None else (nodes, [], False)
    if not (isinstance(x, dict) and x.keys() == {"value", "more", "nodes"} and isinstance(x["more"], bool)
            and isinstance(x["value"], list) and len(x["value"]) <= MAX_RECORDS_PER_KEY
            and all(isinstance(r, bytes) for r in x["value"])):
        return None
    nodes = parse_node_list(x["nodes"])
    return None if nodes is None else (nodes, x["value"], x["more"])


def split_pages(raws: list[bytes], budget: int) -> list[list[bytes]]:
    """Split records into runs whose msgpack encoding fits `budget` bytes (bin header: <= 5 bytes)."""
    out: list[list[bytes]] = []
    used = budget
    for raw in raws:
        if used + len(raw) + 5 > budget:
            out.append([])
            used = 0
        out[-1].append(raw)
        used += len(raw) + 5
    return out
