"""What a DHT datagram may carry: the requests a node answers, the replies it accepts, records paged to fit.

Split out of ``dht`` so the schema every datagram is checked against (after its MAC, before anything acts
on it) reads apart from the kademlia and asyncio machinery. Pure: no sockets are used but for parsing
address literals, no asyncio, no trio. Whatever fails these checks is dropped and counted by ``dht``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from kademlia.node import Node

from p2pvbd.dht_records import MAX_RECORDS_PER_KEY

MAX_NODES_IN_REPLY = 64  # bounds the work a reply causes; peers send ksize (the paper's k = 20)


def is_ip_literal(text: str) -> bool:
    """A literal address (sendto would resolve a name, blocking the loop); inet_pton is 10x ipaddress."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):
            pass
    return False


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
    ok = all(isinstance(t, list) and len(t) == 3 and is_node_id(t[0]) and isinstance(t[1], str) and is_ip_literal(t[1])
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
