"""The swarm's index: a Kademlia DHT saying which host is where, owns what and holds what.

This is p2pvbd's only asyncio module: kademlia 2.2.3 (on rpcudp) is asyncio, so :class:`DhtNode` hosts it
on a trio-asyncio loop and offers trio coroutines. kademlia's gaps are closed by subclassing, never by
patching site-packages:

* keys are multi-valued: one signed record per publisher; a store merges (newest ``ts`` per publisher
  wins) and a lookup unions what every one of the k closest nodes holds;
* every datagram carries a truncated HMAC keyed from the swarm secret, so outsiders cannot talk to the
  DHT; datagrams failing the MAC or the schema are dropped and counted, never raised in the loop;
* every datagram is also signed by its sender, with the CA's binding of its name to its key
  (``dht_wire.sign_datagram``): a revoked host is not heard even though it knows the secret, and a node's
  id is its name's (``node_id_for``), checked on every request and on every reply to a request sent to
  that id, so a member cannot fill routing tables with made-up identities;
* every record is Ed25519-signed by its publisher and verified on store and on read, and its payload
  checked against its kind's schema (``dht_schema``): a malformed record is dropped and logged once per
  publisher, key and reason, so nothing a lookup returns can surprise a consumer;
* no pickle (bootstrap state is JSON); nobody answering keeps the record locally for a retry instead of
  kademlia's ValueError; republish and refresh run in a trio task that stops with the node.

A MAC does not stop an outsider replaying a captured datagram; harmless, because every RPC is
idempotent and a replayed record loses to the newer one or expires.

The pure parts live beside it: records, their checks and the per-node store in ``dht_records``, the
schema of their payloads in ``dht_schema``, the schema datagrams are checked against in ``dht_wire``.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import trio
import trio_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kademlia.crawling import SpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from p2pvbd.base.home import format_hostport, is_ip, is_name, parse_hostport
from p2pvbd.wire.dht_records import (
    DEFAULT_TTL,
    LOGGED_DROPS,
    MAC_BYTES,
    MAX_RECORDS_PER_KEY,
    FirstSeen,
    Record,
    RecordError,
    RecordStore,
    check_record,
    derive_mac_key,
    key_digest,
    newest_per_publisher,
    parse_record,
    seal,
    sign_record,
    unseal,
)
from p2pvbd.wire.dht_schema import KINDS
from p2pvbd.wire.dht_wire import (
    RPC_LIMITS,
    Sender,
    decode_rpc,
    is_node_id,
    is_request,
    node_id_for,
    open_datagram,
    parse_node_list,
    parse_value_reply,
    sign_datagram,
    split_pages,
)

log = logging.getLogger(__name__)

RPC_HEADER_BYTES = 21  # rpcudp framing: 1 type byte (0 request, 1 response) + 20-byte message id
MAX_RPC_BYTES = 8192  # rpcudp refuses request bodies above 8 KiB; we hold responses to it too
MAX_DATAGRAM_BYTES = MAC_BYTES + RPC_HEADER_BYTES + MAX_RPC_BYTES
assert RPC_LIMITS.frame_bytes == MAX_RPC_BYTES
RPC_TIMEOUT = 5.0  # rpcudp's default wait_timeout
# A node that did not answer is not asked again for this long, unless it speaks to us first: a host behind
# a NAT that filters us (it never sent us anything) is learnt of from others over and over, and every
# lookup would otherwise wait RPC_TIMEOUT on it. A minute: a restarted host speaks to us sooner.
SILENT_SECONDS = 60.0
MAX_SILENT_NODES = 4096  # ids remembered as silent: far more than a swarm has
REPUBLISH_FRACTION = 0.5  # republish our records halfway through their TTL: one lost round is survivable
REFRESH_INTERVAL = 3600.0  # paper §2.3 tRefresh (kademlia's refresh_table default)
REPLICATE_INTERVAL = 3600.0  # paper §2.5 tReplicate (kademlia's iter_older_than(3600))
RETRY_INTERVAL = 30.0  # retry publishes that reached nobody, and bootstrap while the table is empty
VERIFY_CACHE_SIZE = 4096  # verified records remembered: Ed25519 verify costs ~50 us and lookups repeat
PAGE_SLACK = 128  # bytes of a request/reply left for msgpack framing, method name and ids

# Whether a record's publisher name, signing key and CA binding go together (and the publisher is not revoked).
Trust = Callable[[str, bytes, bytes], bool]

STAT_KEYS = ("bad_mac", "malformed", "bad_sender", "wrong_node_id",
             "bad_signature", "bad_payload", "expired", "future_ts", "wrong_key",
             "untrusted", "key_full", "publisher_quota", "rpc_errors")


class DhtStopped(RuntimeError):
    """The node's run() has ended (or ended under this call)."""


@dataclass
class LookupTrace:
    """What one crawl cost: for the hop-count bench and for explaining slow lookups."""

    rounds: int = 0  # crawler iterations: <= alpha parallel RPCs each, the last to the rest of the k closest
    contacted: int = 0  # find RPCs sent (extra pages of a large value not counted)
    responded: int = 0
    hops: int = 0  # sequential RPCs on the shortest discovery path to a value holder (else the closest node)


class _RoutingTable(RoutingTable):
    """kademlia's TableTraverser stops when it runs out of buckets on the right even with buckets left
    on the left, so a key high in the id space could get no start peers at all (2% of lookups failed
    at 1000 nodes). Here: the k nearest of all contacts."""

    def find_neighbors(self, node: Node, k: int | None = None, exclude: Node | None = None) -> list[Node]:
        self.buckets[self.get_bucket_for(node)].touch_last_updated()  # as the traverser did, for §2.3 refresh
        nodes = (n for b in self.buckets for n in b.nodes.values()
                 if n.id != node.id and (exclude is None or not n.same_home_as(exclude)))
        return heapq.nsmallest(k or self.ksize, nodes, key=node.distance_to)


class _SwarmProtocol(KademliaProtocol):
    """KademliaProtocol with MACs, schema checks, signed multi-valued records and paged values.
    Both of rpcudp's send paths are replaced (to seal, and to use C msgpack: pure-Python umsgpack was
    a third of a lookup's CPU); the wire format inside the MAC is still rpcudp's."""

    def __init__(self, source_node: Node, storage: RecordStore, ksize: int, mac_key: bytes,
                 stats: dict[str, int], trust: Trust | None, me: _Me) -> None:
        super().__init__(source_node, storage, ksize)
        self.router = _RoutingTable(self, ksize, source_node)
        self._mac_key, self.stats, self._trust, self._me = mac_key, stats, trust, me
        self._expect: dict[bytes, bytes] = {}  # request id -> the node id whose signature must answer it
        # Nodes that did not answer, until when they are not asked again (SILENT_SECONDS), by id
        self._silent: OrderedDict[bytes, float] = OrderedDict()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._verified: OrderedDict[bytes, Record] = OrderedDict()
        self._drops_logged = FirstSeen(LOGGED_DROPS)

    def _seal(self, body: bytes) -> bytes:
        me = self._me
        return seal(self._mac_key, sign_datagram(body, me.name, me.key, me.pubkey, me.binding))

    def _sender(self, signed: bytes) -> tuple[Sender, bytes] | None:
        """The verified sender and the body of a MAC'd datagram, or None (counted): every datagram is
        signed by a member whose key the CA bound to its name (when ``trust`` is set), not revoked."""
        opened = open_datagram(signed)
        if opened is None:
            self.stats["malformed"] += 1
            return None
        sender, body = opened
        if (self._trust is not None and not self._trust(sender.name, sender.pubkey, sender.binding)) \
                or not sender.signed(body):
            self.stats["bad_sender"] += 1
            return None
        return sender, body

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Authenticate, parse, answer: synchronously, and never raising into the event loop."""
        signed = unseal(self._mac_key, data) if len(data) <= MAX_DATAGRAM_BYTES else None
        if signed is None:
            self.stats["bad_mac" if len(data) <= MAX_DATAGRAM_BYTES else "malformed"] += 1
            return
        if (opened := self._sender(signed)) is None:
            return
        sender, body = opened
        self._silent.pop(sender.node_id, None)  # it speaks: ask it again
        msg = decode_rpc(body[RPC_HEADER_BYTES:])
        if msg is None:
            self.stats["malformed"] += 1
            return
        msg_id = body[1:RPC_HEADER_BYTES]
        try:
            if body[:1] == b"\x01" and len(msg_id) == 20:
                self._accept_response(msg_id, msg, addr, sender.node_id)
            elif body[:1] == b"\x00" and len(msg_id) == 20 and is_request(msg):
                if msg[1][0] != sender.node_id:  # a node speaks under the one id its name gives it
                    self.stats["wrong_node_id"] += 1
                    return
                response = getattr(self, f"rpc_{msg[0]}")(addr, *msg[1])  # kademlia's handlers are all sync
                self.transport.sendto(self._seal(b"\x01" + msg_id + msgpack.packb(response)), addr)
            else:
                self.stats["malformed"] += 1
        except Exception:
            log.exception("DHT datagram from %s failed", addr)
            self.stats["rpc_errors"] += 1

    def request(self, address: tuple[str, int], name: str, *args: Any,
                expect: bytes | None = None) -> asyncio.Future[tuple[bool, Any]]:
        """rpcudp's remote-call closure: a future of (answered, reply). With ``expect``, only a reply
        signed by the node with that id counts (another's is no reply)."""
        data = msgpack.packb([name, args])
        if len(data) > MAX_RPC_BYTES:
            raise ValueError(f"{name} request of {len(data)} bytes exceeds {MAX_RPC_BYTES}")
        msg_id = os.urandom(20)
        self.transport.sendto(self._seal(b"\x00" + msg_id + data), address)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._outstanding[msg_id] = (future, loop.call_later(self._wait_timeout, self._timeout, msg_id))
        if expect is not None:
            self._expect[msg_id] = expect
        return future

    def _accept_response(self, msg_id: bytes, data: Any, address: Any, signer: bytes) -> None:
        # rpcudp's raises InvalidStateError when the waiter was cancelled (by a cancelled lookup).
        future, timer = self._outstanding.pop(msg_id, (None, None))
        expected = self._expect.pop(msg_id, None)
        if future is not None and timer is not None:
            timer.cancel()
            if expected is not None and expected != signer:
                self.stats["wrong_node_id"] += 1
                if not future.done():
                    future.set_result((False, None))
            elif not future.done():
                future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        self._expect.pop(msg_id, None)
        future, _ = self._outstanding.pop(msg_id, (None, None))
        if future is not None and not future.done():
            future.set_result((False, None))

    def shutdown(self) -> None:
        """Cancel our tasks and every pending RPC (which also ends kademlia's untracked bucket pings)."""
        for task in list(self._tasks):
            task.cancel()
        for future, timer in self._outstanding.values():
            timer.cancel()
            future.cancel()
        self._outstanding.clear()
        self._expect.clear()

    def trusts(self, rec: Record) -> bool:
        return self._trust is None or self._trust(rec.publisher, rec.pubkey, rec.binding)

    def check_records(self, raws: list[bytes], dkey: bytes | None) -> list[tuple[bytes, Record]]:
        """The records passing every check; each failure is counted under its reason. Every record a
        node stores or a lookup returns comes through here."""
        now, good = time.time(), []
        for raw in raws:
            try:
                if (rec := self._verified.get(raw)) is None:
                    rec = self._verified[raw] = parse_record(raw)
                    if len(self._verified) > VERIFY_CACHE_SIZE:
                        self._verified.popitem(last=False)
                check_record(rec, dkey, now)
                if not self.trusts(rec):
                    raise RecordError("untrusted", rec.publisher)
                good.append((raw, rec))
            except RecordError as exc:
                self.stats[exc.reason] += 1
                if exc.origin is not None and self._drops_logged.first((*exc.origin, exc.detail)):
                    publisher, kind, key = exc.origin
                    log.warning("dropped a malformed %s record for %r signed by %r: %s (logged once)", kind, key,
                                publisher, exc.detail)
                else:
                    log.debug("dropped DHT record: %s", exc)
        return good

    def _welcome(self, sender: Any, nodeid: bytes) -> Node:
        node = Node(nodeid, sender[0], sender[1])
        if nodeid != self.source_node.id:
            self.welcome_if_new(node)
        return node

    def rpc_ping(self, sender: Any, nodeid: bytes) -> bytes:
        self._welcome(sender, nodeid)
        return self.source_node.id

    def rpc_store(self, sender: Any, nodeid: bytes, dkey: bytes, raws: list[bytes]) -> bool:
        self._welcome(sender, nodeid)
        good = self.check_records(raws, dkey)
        if good and (refused := self.storage.merge(dkey, good)) is not None:
            self.stats[refused] += 1
            return False
        return len(good) == len(raws)

    def rpc_find_node(self, sender: Any, nodeid: bytes, key: bytes) -> list[tuple[Any, ...]]:
        source = self._welcome(sender, nodeid)
        return [tuple(n) for n in self.router.find_neighbors(Node(key), exclude=source)]

    def rpc_find_value(self, sender: Any, nodeid: bytes, key: bytes, skip: int = 0) -> Any:
        """Our records from `skip` on, as many as fit 8 KiB, *and* peers (so the crawl keeps converging)."""
        nodes = self.rpc_find_node(sender, nodeid, key)
        if not (raws := self.storage.get(key)):
            return nodes
        page = (split_pages(raws[skip:], MAX_RPC_BYTES - PAGE_SLACK - len(msgpack.packb(nodes))) or [[]])[0]
        return {"value": page, "more": skip + len(page) < len(raws), "nodes": nodes}

    async def _rpc(self, node: Node, name: str, check: Callable[[Any], object], *args: Any) -> tuple[bool, Any]:
        """One request; a reply failing `check` counts as no reply (and kademlia drops the peer). A node
        that did not answer lately is not asked (SILENT_SECONDS): a lookup would wait RPC_TIMEOUT on it."""
        if self._silent.get(node.id, -math.inf) > time.monotonic():
            return False, None
        ok, reply = await self.request((node.ip, node.port), name, self.source_node.id, *args, expect=node.id)
        if not ok:
            self._silent[node.id] = time.monotonic() + SILENT_SECONDS
            self._silent.move_to_end(node.id)
            while len(self._silent) > MAX_SILENT_NODES:
                self._silent.popitem(last=False)
        if ok and (reply := check(reply)) is None:
            self.stats["malformed"] += 1
            ok = False
        return self.handle_call_response((ok, reply if ok else None), node)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        return await self._rpc(node_to_ask, "ping", lambda r: r if is_node_id(r) else None)

    async def call_store(self, node_to_ask: Node, key: bytes, value: list[bytes]) -> tuple[bool, Any]:
        return await self._rpc(node_to_ask, "store", lambda r: r if isinstance(r, bool) else None, key, value)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._rpc(node_to_ask, "find_node", parse_node_list, node_to_find.id)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        """(True, (peers, records)) with every page of the records fetched, or (False, None)."""
        nodes, raws, more = [], [], True
        while more and len(raws) < MAX_RECORDS_PER_KEY:
            args = (node_to_find.id, len(raws)) if raws else (node_to_find.id,)
            ok, reply = await self._rpc(node_to_ask, "find_value", parse_value_reply, *args)
            if not ok:
                return (True, (nodes, raws)) if raws else (False, None)
            nodes, raws, more = nodes or reply[0], raws + reply[1], reply[2] and bool(reply[1])
        return True, (nodes, raws)

    async def store_raws(self, node: Node, dkey: bytes, raws: list[bytes]) -> bool:
        for chunk in split_pages(raws, MAX_RPC_BYTES - PAGE_SLACK):
            ok, accepted = await self.call_store(node, dkey, chunk)
            if not (ok and accepted):
                return False
        return True

    def welcome_if_new(self, node: Node) -> None:
        """kademlia's §2.5 hand-over, fixed: it hashed the already-hashed key, and sent whole values."""
        if not self.router.is_new_node(node):
            return
        for dkey, raws in self.storage:
            keynode = Node(dkey)
            neighbors = self.router.find_neighbors(keynode)
            if not neighbors or (node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                                 and self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)):
                task = asyncio.ensure_future(self.store_raws(node, dkey, raws))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self.router.add_contact(node)


class _Crawl(SpiderCrawl):
    """One crawler for nodes and values: visits all k closest (never stops at the first value), unions
    the records found, and fills a LookupTrace."""

    def __init__(self, protocol: _SwarmProtocol, node: Node, peers: list[Node], ksize: int, alpha: int,
                 values: bool, trace: LookupTrace | None) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self.values, self.trace = values, trace or LookupTrace()
        self.depth = {p.id: 0 for p in peers}  # RPCs on the path by which we learnt of each node
        self.raws: list[bytes] = []
        self.value_hops = 0
        self.closest: list[Node] = []

    async def find(self) -> list[Node]:
        return await self._find(self.protocol.call_find_value if self.values else self.protocol.call_find_node)

    async def _nodes_found(self, responses: dict[bytes, tuple[bool, Any]]) -> list[Node]:
        t = self.trace
        t.rounds, t.contacted = t.rounds + 1, t.contacted + len(responses)
        for peer_id, (ok, body) in responses.items():
            if not ok:
                continue
            t.responded += 1
            hop = self.depth.get(peer_id, 0) + 1
            nodes, raws = body if self.values else (body, [])
            if raws:
                self.raws += raws
                self.value_hops = min(hop, self.value_hops or hop)
            for n in nodes:
                self.depth[n.id] = min(hop, self.depth.get(n.id, hop))
            self.nearest.push(nodes)
        self.nearest.remove([peer_id for peer_id, (ok, _) in responses.items() if not ok])
        if not self.nearest.have_contacted_all():
            return await self.find()
        self.closest = list(self.nearest)
        t.hops = self.value_hops or (self.depth.get(self.closest[0].id, 0) + 1 if self.closest else 0)
        return self.closest


def _refuse(why: str) -> Callable[..., NoReturn]:
    def method(*_: Any, **__: Any) -> NoReturn:
        raise NotImplementedError(why)
    return method


class _SwarmServer(Server):
    """kademlia's Server minus pickle and its call_later loops, with multi-valued set/get."""

    protocol: _SwarmProtocol
    save_state = save_state_regularly = _refuse("kademlia's state file is a pickle (unsafe): use save_bootstrap")
    load_state = staticmethod(save_state)
    get = set = _refuse("keys are multi-valued: use lookup_digest / set_digest with signed records")

    def __init__(self, ksize: int, alpha: int, mac_key: bytes, stats: dict[str, int],
                 trust: Trust | None, me: _Me) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id_for(me.name), storage=RecordStore())
        self._protocol_args = (mac_key, stats, trust, me)

    def _create_protocol(self) -> _SwarmProtocol:
        return _SwarmProtocol(self.node, self.storage, self.ksize, *self._protocol_args)

    async def listen(self, port: int, interface: str = "0.0.0.0") -> int:
        """Bind; return the bound port. No refresh loop: the trio side owns timing."""
        self.transport, self.protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            self._create_protocol, local_addr=(interface, port))
        return self.transport.get_extra_info("sockname")[1]

    def stop(self) -> None:
        super().stop()
        if self.protocol is not None:
            self.protocol.shutdown()

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        """The node at ``addr`` (its id is checked against its signature by the crawl that follows)."""
        ok, nodeid = await self.protocol.request(addr, "ping", self.node.id)
        return Node(nodeid, addr[0], addr[1]) if ok and is_node_id(nodeid) and nodeid != self.node.id else None

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        seeds = [n for n in await asyncio.gather(*map(self.bootstrap_node, addrs)) if n is not None]
        return (await self.crawl(self.node, seeds, values=False)).closest

    async def crawl(self, target: Node, peers: list[Node] | None = None, *, values: bool,
                    trace: LookupTrace | None = None) -> _Crawl:
        """One crawl, or none without peers (where kademlia's set() raised ValueError)."""
        peers = self.protocol.router.find_neighbors(target) if peers is None else peers
        crawler = _Crawl(self.protocol, target, peers, self.ksize, self.alpha, values, trace)
        if peers:
            await crawler.find()
        return crawler

    async def set_digest(self, dkey: bytes, value: list[bytes]) -> int:
        """Store records on the k closest nodes found; how many acknowledged (0: nobody)."""
        nodes = (await self.crawl(Node(dkey), values=False)).closest
        return sum(await asyncio.gather(*(self.protocol.store_raws(n, dkey, value) for n in nodes)))

    async def lookup_digest(self, dkey: bytes, trace: LookupTrace | None = None) -> list[tuple[bytes, Record]]:
        """Union of our copy and every record the k closest nodes return, newest per publisher."""
        crawler = await self.crawl(Node(dkey), values=True, trace=trace)
        # our copies were trusted when stored; their publisher may have been revoked since
        local = [(raw, rec) for raw, rec in self.storage.records(dkey) if self.protocol.trusts(rec)]
        return newest_per_publisher([*local, *self.protocol.check_records(crawler.raws, dkey)])

    async def _refresh_table(self) -> None:
        """§2.3 refresh of idle buckets, then §2.5 replication of records nobody stored here for an hour."""
        await asyncio.gather(*(self.crawl(Node(i), values=False) for i in self.protocol.get_refresh_ids()))
        for dkey, raws in self.storage.iter_older_than(REPLICATE_INTERVAL):
            await self.set_digest(dkey, raws)


@dataclass(frozen=True)
class _Me:
    """What this node signs its datagrams with."""

    name: str
    key: Ed25519PrivateKey
    pubkey: bytes
    binding: bytes


@dataclass
class _Own:
    payload: dict[str, Any]
    ttl: float
    due: float = 0.0  # wall-clock time of the next republish
    pending: bool = True  # the last attempt reached nobody


class DhtNode:
    """A swarm member's DHT node, driven from trio; asyncio stays inside run()."""

    def __init__(self, *, host_name: str, signing_key: Ed25519PrivateKey, swarm_secret: bytes, ksize: int = 20,
                 alpha: int = 3, trust: Trust | None = None, binding: bytes = b"") -> None:
        """`trust(publisher, pubkey, binding)`, if given, refuses records not signed by that publisher's
        key, as the CA's ``binding`` in the record says: without it any swarm member can publish under any
        name (the MAC only keeps outsiders out). ``binding`` is this host's, carried in its records."""
        if not is_name(host_name):
            raise ValueError(f"bad host name {host_name!r}")
        self.host_name, self.ksize, self.alpha = host_name, ksize, alpha
        self._signing_key, self._mac_key, self._trust = signing_key, derive_mac_key(swarm_secret), trust
        self._binding = binding
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        # Tunables, read when run() starts (tests shorten them).
        self.retry_interval, self.refresh_interval, self.rpc_timeout = RETRY_INTERVAL, REFRESH_INTERVAL, RPC_TIMEOUT
        self._server: _SwarmServer | None = None
        self._loop: Any = None
        self._ready = trio.Event()
        self._own: dict[tuple[str, str], _Own] = {}
        self._seeds: list[tuple[str, int]] = []
        self._last_ts = 0.0

    async def run(self, listen_host: str, port: int, bootstrap: list[tuple[str, int]], *,
                  task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: `task_status.started(bound_port)` once listening, then join via
        `bootstrap` and maintain. Uses the enclosing trio-asyncio loop if any (many nodes in one
        process), else owns one."""
        if self._ready.is_set():
            raise RuntimeError("a DhtNode runs once")
        if (loop := trio_asyncio.current_loop.get()) is None:
            async with trio_asyncio.open_loop() as loop:
                await self._serve(loop, listen_host, port, bootstrap, task_status)
        else:
            await self._serve(loop, listen_host, port, bootstrap, task_status)

    async def _serve(self, loop: Any, host: str, port: int, seeds: list[tuple[str, int]], task_status: Any) -> None:
        me = _Me(self.host_name, self._signing_key, self._signing_key.public_key().public_bytes_raw(), self._binding)
        server = _SwarmServer(self.ksize, self.alpha, self._mac_key, self.stats, self._trust, me)
        try:
            bound = await trio_asyncio.aio_as_trio(server.listen, loop=loop)(port, host)
            server.protocol._wait_timeout = self.rpc_timeout
            self._server, self._loop, self._seeds = server, loop, list(seeds)
            self._ready.set()
            task_status.started(bound)
            if seeds:
                await self.bootstrap(seeds)
            await self._maintain()
        finally:
            server.stop()
            self._server = self._loop = None
            self._ready.set()

    async def _aio(self, method: str, *args: Any) -> Any:
        """Run a _SwarmServer coroutine method on our asyncio loop."""
        await self._ready.wait()
        if self._server is None:
            raise DhtStopped("DHT node is not running")
        try:
            return await trio_asyncio.aio_as_trio(getattr(self._server, method), loop=self._loop)(*args)
        except asyncio.CancelledError as exc:  # our shutdown cancelled the RPC under us
            raise DhtStopped("DHT node stopped") from exc

    async def _maintain(self) -> None:
        """Rejoin while alone, retry unreached publishes, republish before TTLs end, refresh hourly."""
        next_refresh = trio.current_time() + self.refresh_interval
        while True:
            await trio.sleep(self.retry_interval)
            try:
                if self._seeds and not self.neighbours():
                    await self.bootstrap(self._seeds)
                await self._republish()
                if trio.current_time() >= next_refresh:
                    next_refresh = trio.current_time() + self.refresh_interval
                    await self._aio("_refresh_table")
            except DhtStopped:
                return
            except Exception:
                log.exception("DHT maintenance failed; retrying in %.0fs", self.retry_interval)

    async def _republish(self) -> None:
        now = time.time()
        for (kind, key), own in list(self._own.items()):
            if own.pending or own.due <= now:
                await self._send_own(kind, key, own)

    async def _send_own(self, kind: str, key: str, own: _Own) -> int:
        if self._own.get((kind, key)) is not own:
            return 0  # publish() replaced it while a republish round was under way
        self._last_ts = ts = max(time.time(), self._last_ts + 1e-6)  # strictly newer than our previous one
        raw = sign_record(self._signing_key, self.host_name, kind, key, own.payload, own.ttl, ts, self._binding)
        if self._server is None:
            raise DhtStopped("DHT node is not running")
        self._server.storage.merge(key_digest(kind, key), [(raw, parse_record(raw))])  # for hand-over, lookups
        acks = await self._aio("set_digest", key_digest(kind, key), [raw])
        own.pending, own.due = acks == 0, ts + own.ttl * REPUBLISH_FRACTION
        return acks

    async def publish(self, kind: str, key: str, payload: dict[str, Any], ttl: float = DEFAULT_TTL) -> int:
        """Sign and store on the k closest nodes, and keep republishing it. Returns how many nodes
        acknowledged: 0 means only we hold it for now; it is retried every retry_interval."""
        sign_record(self._signing_key, self.host_name, kind, key, payload, ttl,
                    binding=self._binding)  # ValueError now, not later
        self._own[(kind, key)] = own = _Own(payload, float(ttl))
        await self._ready.wait()
        return await self._send_own(kind, key, own)

    def stop_publishing(self, kind: str, key: str) -> None:
        """Stop republishing our record of ``kind`` under ``key``: it expires from the index within its TTL."""
        self._own.pop((kind, key), None)

    async def lookup(self, kind: str, key: str, *, trace: LookupTrace | None = None) -> list[Record]:
        """Verified, unexpired records, newest per publisher; with no neighbours, the ones we hold."""
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        return [rec for _, rec in await self._aio("lookup_digest", key_digest(kind, key), trace)]

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> None:
        """Join via these peers (names resolved by trio, not in the loop), then place pending records."""
        resolved = []
        for host, port in addrs:
            try:
                infos = [] if is_ip(host) else await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                resolved.append((infos[0][4][0] if infos else host, port))
            except OSError as exc:
                log.warning("cannot resolve DHT peer %s: %s", host, exc)
        await self._aio("bootstrap", resolved)
        if any(own.pending for own in self._own.values()) and self.neighbours():
            await self._republish()

    def neighbours(self) -> list[tuple[str, int]]:
        """Up to k peers nearest to us: what save_bootstrap writes."""
        return [] if self._server is None else [(ip, port) for ip, port in self._server.bootstrappable_neighbors()]

    def save_bootstrap(self, path: str | os.PathLike[str]) -> int:
        """Write neighbours as a JSON list of "host:port" (never pickle); with none, keep the old file."""
        if peers := [format_hostport(h, p) for h, p in self.neighbours()]:
            tmp = Path(f"{path}.tmp")
            tmp.write_text(json.dumps(peers))
            tmp.replace(path)
        return len(peers)

    @staticmethod
    def load_bootstrap(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
        """Peers written by save_bootstrap; [] if there is no file; entries that do not parse are skipped."""
        try:
            entries = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return []
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of host:port")
        out = []
        for e in entries:
            try:
                out.append(parse_hostport(e, default_port=None))
            except (ValueError, AttributeError):
                log.warning("%s: ignoring bad bootstrap entry %r", path, e)
        return out
