"""The swarm service: this host's DHT node, peer server and join server, and swarm-wide questions.

It publishes what this host knows (where it listens, which disks it holds and owns), answers peers'
requests for map summaries and blocks, and answers ``status`` and ``peers`` for the whole swarm by
combining DHT records with map summaries compared peer to peer (swarm/maps.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio
import zstandard

from p2pvbd import dht
from p2pvbd.base.home import Config, Home, HomeError, format_hostport, is_ip, parse_hostport
from p2pvbd.kernel_hook_ctl import HookController
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.store.map_tree import STALE_ROOT
from p2pvbd.swarm import access, invites, maps, trust
from p2pvbd.swarm.access import PeerOp
from p2pvbd.swarm.address_book import PEERS_FILE, AddressBook
from p2pvbd.swarm.deeds import DeedChecker
from p2pvbd.swarm.dial_backoff import MAX_DIAL_ADDRESSES, DialBackoff
from p2pvbd.swarm.ops import IncomingMigrations, OutgoingMigration, ServiceHooks
from p2pvbd.swarm.ownership import Ownership
from p2pvbd.swarm.peer_transport import (
    JOIN_CONNECTION_SECONDS,
    JOIN_PORT_OFFSET,
    PeerConnection,
    PeerError,
    open_peer,
    open_peer_over,
    serve_join,
    serve_link,
    serve_peers,
)
from p2pvbd.swarm.proven import ProvenOwners
from p2pvbd.swarm.punch import RELAYED_GRACE_SECONDS, Puncher
from p2pvbd.swarm.recall import Recall
from p2pvbd.swarm.relay import Relays
from p2pvbd.swarm.revoked import REVOKED_FILE, RevocationBook
from p2pvbd.swarm.status import StatusView
from p2pvbd.wire.dht_records import holders_payload, host_payload, owner_payload
from p2pvbd.wire.dht_schema import (
    MAX_HOST_ADDRESSES,
    MAX_LINKS_LISTED,
    MAX_SEEN_AS,
    PayloadError,
    check_payload,
    is_address,
)
from p2pvbd.wire.peer_wire import (
    BLOCK_ENTRY_BYTES,
    BLOCK_ZSTD_LEVEL,
    BLOCKS_REPLY_BUDGET,
    MAX_BLOCK_ENTRIES,
    BlockEntry,
    pack_entry,
)
from p2pvbd.wire.revocation import REVOKED_KEY, Revocations

log = logging.getLogger(__name__)

# Key of the swarm's catalog of disks: every host lists the disks it holds under it.
CATALOG_KEY = "disks"
# Records of hosts that stopped publishing vanish after this; live hosts republish well before.
RECORD_TTL = 600.0
# Holders records carry a block count that changes with every write; republish them this often.
PUBLISH_INTERVAL = 15.0
# Coverage results remembered: a few per disk and replica is all status needs.
COVERAGE_CACHE_ENTRIES = 256
# A status or peers query must answer even when a host is down: its requests give up after this.
QUERY_TIMEOUT = 5.0
# A connection silent this long is asked a hello before it is handed out again (peer_transport's
# keepalives notice a dead link within ~25 s; a request should not wait that out), and declared dead
# if the answer takes longer than LIVENESS_TIMEOUT: a round trip is under a second even on mobile links.
QUIET_LINK_SECONDS = 5.0
# After a peer could not be connected to, it is not tried again for this long (its own link to this host,
# or a relay, is used): a connect to an unreachable private address can take QUERY_TIMEOUT, which no
# request should wait each time. A host that became reachable is connected to directly within a minute.
DIRECT_RETRY_SECONDS = 60.0
# Links held open to peers (_keep_links): one person's machines, with headroom (as MAX_POLICY_HOSTS).
MAX_STANDING_LINKS = 64
# Links one peer opened to this host that are kept: its standing link, a replacement after it changed
# network, a short one asking where it is seen from (swarm/punch.py), with room.
MAX_INBOUND_PER_PEER = 4
LIVENESS_TIMEOUT = 3.0
# How often the join port checks whether invites are outstanding (an invite made here opens it at once).
JOIN_POLL_SECONDS = 2.0
# `invite` waits this long for the join port to open (milliseconds, unless the port is taken).
JOIN_OPEN_SECONDS = 10.0
# Pushing a revocation list to one host: finding its address may wait out the index's RPC timeout (5 s)
# on a few hosts that are down, before the connection and the request themselves.
REVOCATION_PUSH_SECONDS = 30.0
WILDCARDS = ("0.0.0.0", "::", "")
# get_blocks replies read and compressed at once, each in a worker thread: two keep a core busy with zstd
# while the other reads the disk, and leave the event loop its own on the two-core hosts this runs on.
BLOCK_READERS = 2


async def advertised_addresses(listen: str) -> list[str]:
    """Where peers can reach us: the listen address, or every non-loopback address for a wildcard; only
    distinct, well-formed ones, as many as a host record holds (its schema refuses the record otherwise)."""
    host, port = parse_hostport(listen)
    if host not in WILDCARDS:
        addrs = [host]
    else:
        try:
            out = (await trio.run_process(["ip", "-j", "addr", "show"], capture_stdout=True,
                                          capture_stderr=True, stdin=subprocess.DEVNULL)).stdout
            addrs = [a["local"] for ifc in json.loads(out) for a in ifc.get("addr_info", [])
                     if a.get("scope") == "global"]
        except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
            addrs = []
    usable = [a for a in dict.fromkeys(format_hostport(str(h), port) for h in addrs) if is_address(a)]
    return usable[:MAX_HOST_ADDRESSES] or [format_hostport("127.0.0.1", port)]


def _ip_of(address: str) -> str:
    """The IP address of an "ip:port" ('' if it is not one)."""
    try:
        host = parse_hostport(address)[0]
    except (ValueError, HomeError):
        return ""
    return host if is_ip(host, scoped=True) else ""


@dataclass
class PeerInfo:
    name: str
    addresses: list[str]
    cert: str
    last_seen: float
    reachable: bool | None = None
    error: str = ""
    # "outbound": over a link this host opened; "inbound": over one the peer opened (it is behind NAT);
    # "punched": a direct link through both NATs; "relayed via HOST": through a member both reach
    path: str = ""
    reach: str = "unknown"  # as its host record says: "direct", "nat" or "unknown"
    seen_as: list[str] = field(default_factory=list)  # behind NAT: the public addresses peers saw


class Swarm:
    """One host's membership in its swarm; run() owns the DHT node and the peer and join servers."""

    def __init__(self, home: Home, config: Config, identity: trust.HostIdentity, ctl: HookController) -> None:
        self.home, self.config, self.identity, self.ctl = home, config, identity, ctl
        self.name = config.name
        # This daemon's run: a host that answers with another one restarted, and lost what it had
        # acknowledged but not yet made durable (migration/handover.PeerForwarder).
        self.run_id = secrets.token_hex(8)
        ca_public = identity.ca_cert.public_key()
        self.revoked = RevocationBook(identity.trust_dir / REVOKED_FILE, ca_public)  # type: ignore[arg-type]
        self.dht = dht.DhtNode(host_name=self.name, signing_key=identity.key, swarm_secret=identity.swarm_secret,
                               trust=trust.RecordTrust(ca_public, self.revoked.revokes),  # type: ignore[arg-type]
                               binding=identity.binding)
        # Who owns each disk, as proven by its chain of deeds (deeds.py), not by index records.
        self.ownership = Ownership(identity, DeedChecker(ca_public, self.revoked.revokes))  # type: ignore[arg-type]
        self.proven = ProvenOwners(self)  # the owner each disk's deeds prove, with the claims they refute
        self.client_ssl = trust.client_ssl_context(identity)
        self._conns: dict[str, PeerConnection] = {}  # links this host opened, by peer
        # Links peers opened to this host, by peer: requests go back over them to a peer this host cannot
        # connect to (one behind NAT keeps a link open to every host it reaches: _keep_links).
        # Oldest first: a short connection (a peer asking where it is seen from: swarm/punch.py) does not
        # take the place of the standing link.
        self._inbound: dict[str, list[PeerConnection]] = {}
        self._relay_holds: dict[PeerConnection, trio.CancelScope] = {}  # relayed links, to close when replaced
        self._direct_failed: dict[str, float] = {}  # peer -> monotonic time of the last failed connect
        self.dials = DialBackoff()  # per (peer, address): when a failed address is dialled again
        self._seeking: set[str] = set()  # peers a relayed link to which is being replaced (_better_path)
        self.book = AddressBook(home.path / PEERS_FILE)  # where peers were last found: a restart starts there
        self._last_contact: dict[str, float] = {}  # peer -> wall-clock time of its last request to us
        self._connecting: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._publish_now = trio.Event()
        self._invited, self._join_open = trio.Event(), trio.Event()
        self.join_error = ""  # why the join port could not open, if it could not
        # Coverage of a replica against the owner, by (disk, host, its root, the owner's root): status
        # repeated while nothing changes costs two summaries per replica.
        self._coverage_cache: OrderedDict[tuple[str, str, bytes, bytes], int] = OrderedDict()
        # `status` within a second when a host or the index is slow: their last answers stand in.
        self.status_view = StatusView(self, Recall(lambda: self._nursery))
        self._block_readers = trio.CapacityLimiter(BLOCK_READERS)
        self.record_ttl = RECORD_TTL
        # What the services the daemon composes onto this node (daemon.attach_services) tell it: pacing,
        # policies, pull rates (swarm/ops.py). The node dispatches their peer ops but imports none of them.
        self.hooks = ServiceHooks()
        self.migration_target: IncomingMigrations
        self.relays = Relays(self)
        self.puncher = Puncher(self)
        # Every op this host serves, with who may call it (swarm/access.py): checked before its handler runs.
        # The daemon registers them all (daemon.attach_services): the node's own and its services'.
        self.peer_ops: dict[str, PeerOp] = {}
        self.refusals = access.Refusals()
        # Migrations this host runs as their source, by disk: shown by `status` on every host.
        self.migrations: dict[str, OutgoingMigration] = {}

    # ---- lifecycle -----------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_hostport(self.config.listen)
        bootstrap = list(dict.fromkeys([parse_hostport(b) for b in self.config.bootstrap] + self.book.bootstrap()))
        log.info("joining the index through %s", ", ".join(format_hostport(h, p) for h, p in bootstrap) or "nobody")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.dht.run, host, port, bootstrap)
            peer_listeners = await trio.open_tcp_listeners(port, host=host or None)
            await nursery.start(partial(serve_peers, peer_listeners, trust.server_ssl_context(self.identity),
                                        self.handle_peer, on_link=self._inbound_link))
            if self.identity.can_invite:
                nursery.start_soon(self._join_port, host, port + JOIN_PORT_OFFSET)
            nursery.start_soon(self._publish_loop)
            task_status.started()

    def request_publish(self) -> None:
        """Publish this host's records now (after a disk was created, imported or changed owner)."""
        self._publish_now.set()

    async def _publish_loop(self) -> None:
        while True:
            try:
                await self.publish()
                self.book.neighbours = [format_hostport(h, p) for h, p in self.dht.neighbours()] or self.book.neighbours
                await trio.to_thread.run_sync(self.book.save_if_changed)
            except Exception:
                log.exception("publishing this host's records failed")
            assert self._nursery is not None
            self._nursery.start_soon(self._keep_links)
            with trio.move_on_after(PUBLISH_INTERVAL):
                await self._publish_now.wait()
            self._publish_now = trio.Event()

    async def _keep_links(self) -> None:
        """Hold a link open to every peer this host can reach (the first MAX_STANDING_LINKS by name): a
        peer that cannot connect to this host (it is behind NAT) reaches it back over them. A link already
        open costs a hello at most (``connect``), which also keeps a NAT's mapping of it alive."""
        try:
            records = await self.dht.lookup("catalog", CATALOG_KEY)
        except Exception as e:  # the index is not up yet: next round
            log.debug("no standing links this round: %s", e)
            return
        names = sorted({str(r.payload["host"]) for r in records} - {self.name})[:MAX_STANDING_LINKS]

        async def keep(peer: str) -> None:
            with contextlib.suppress(PeerError), trio.move_on_after(QUERY_TIMEOUT * 2):
                await self.connect(peer, relay=False)

        async with trio.open_nursery() as nursery:
            for peer in names:
                nursery.start_soon(keep, peer)

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where this node's links live (None before ``run``)."""
        return self._nursery

    def _inbound_link(self, conn: PeerConnection) -> None:
        """A peer connected to this host: keep its link for requests back to it (see ``connect``)."""
        if conn.peer_name and not self.revoked.revokes(conn.peer_name):
            kept = [c for c in self._inbound.get(conn.peer_name, []) if not c.lost.is_set()]
            if len(kept) >= MAX_INBOUND_PER_PEER:  # the oldest stays (the standing link): the next one goes
                del kept[1]
            self._inbound[conn.peer_name] = [*kept, conn]

    async def _inbound_live(self, peer: str, *, direct_only: bool = False) -> PeerConnection | None:
        """The oldest link ``peer`` opened to this host that still works, a direct one before a relayed
        one: its standing link, not a short one opened since (a dead one is found out and passed over by
        ``_live``)."""
        for conn in sorted(self._inbound.get(peer, []), key=lambda c: bool(c.via)):  # stable: oldest first
            if direct_only and conn.via:
                break
            if (live := await self._live(conn)) is not None:
                return live
        return None

    def _link(self, peer: str) -> PeerConnection | None:
        """A link with ``peer`` not known dead, this host's own first (no liveness check)."""
        own = self._conns.get(peer)
        if own is not None and not own.lost.is_set():
            return own
        return next((c for c in reversed(self._inbound.get(peer, [])) if not c.lost.is_set()), None)

    def adopt_link(self, peer: str, conn: PeerConnection) -> None:
        """``conn`` (a punched or new direct link) is the one to use with ``peer`` from now on; a relayed
        link it replaces closes after RELAYED_GRACE_SECONDS, once requests started on it had their time."""
        old = self._conns.get(peer)
        self._conns[peer] = conn
        self._direct_failed.pop(peer, None)
        if old is not None:
            self._retire_relayed(old)

    def _retire_relayed(self, conn: PeerConnection) -> None:
        """Close ``conn``, if it is a relayed link this host holds, once RELAYED_GRACE_SECONDS have passed:
        a better path replaced it, and requests already started on it finish there."""
        if conn.via and (scope := self._relay_holds.get(conn)) is not None and scope.deadline == math.inf:
            scope.deadline = trio.current_time() + RELAYED_GRACE_SECONDS
            log.info("the link to %s through %s closes in %.0f s: a better path replaced it", conn.peer_name,
                     conn.via, RELAYED_GRACE_SECONDS)

    def relayed_by(self, peer: str) -> str:
        """The relay of this host's link with ``peer``, if that link is relayed ('' if not, or none)."""
        conn = self._link(peer)
        return conn.via if conn is not None else ""

    async def direct_addresses(self, peer: str) -> list[str]:
        """Where to connect to ``peer``: the address of this host's open link to it first."""
        own = self._conns.get(peer)
        first = [own.address] if own is not None and own.kind == "outbound" and not own.via else []
        return list(dict.fromkeys(first + await self._addresses(peer)))

    async def publish(self) -> None:
        await self._learn_revocations()
        if self.revoked.current.serial:  # every host that knows the list carries it on
            await self.dht.publish("revoked", REVOKED_KEY, self.revoked.current.as_payload(), RECORD_TTL)
        await self.dht.publish("host", self.name, host_payload(
            await advertised_addresses(self.config.listen), self.identity.cert_fingerprint, **self.reach()),
            RECORD_TTL)
        disks = self.ctl.names()
        await self.dht.publish("catalog", CATALOG_KEY, {"host": self.name, "disks": disks}, RECORD_TTL)
        for exp in self.ctl.exports():
            store = exp.store
            if store.owner == self.name:
                await self.dht.publish("owner", store.name, owner_payload(self.name, store.epoch), RECORD_TTL)
            # the owner's replica is the reference; another's best guess without a comparison is all of it
            # when its last pull from its owner completed (as of then), else what it holds
            current = store.n_blocks if self.name == store.owner or self.hooks.synced_owner(store.name) == store.owner \
                else store.held_blocks
            await self.dht.publish("holders", store.name, holders_payload(self.name, current, store.counter),
                                   RECORD_TTL)

    # ---- the join port --------------------------------------------------------------------------
    def _invites_outstanding(self, unknown: bool) -> bool:
        """Whether an invite can still be used; ``unknown`` when the invites cannot be read just now (out of
        descriptors, say): a periodic check must never end the daemon."""
        try:
            return invites.outstanding_invites(self.home.path, time.time()) > 0
        except (OSError, trust.TrustError) as e:
            log.warning("cannot read this host's invites (trying again in %.0f s): %s", JOIN_POLL_SECONDS, e)
            return unknown

    async def _join_port(self, host: str, port: int) -> None:
        """The founder's join port listens only while an invite is outstanding (and a connection's
        lifetime after, so a join under way finishes): the rest of the time nobody without a certificate
        reaches this host at all."""
        while True:
            while not await trio.to_thread.run_sync(self._invites_outstanding, False):
                with trio.move_on_after(JOIN_POLL_SECONDS):
                    await self._invited.wait()
                self._invited = trio.Event()
            try:
                listeners = await trio.open_tcp_listeners(port, host=host or None)
            except OSError as e:
                self.join_error = f"cannot listen for joins on port {port}: {e.strerror or e}"
                log.error("%s", self.join_error)
                await trio.sleep(JOIN_POLL_SECONDS)
                continue
            self.join_error = ""
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve_join, listeners, self.identity))
                log.info("join port %d open: an invite is outstanding", port)
                self._join_open.set()
                quiet_since = math.inf
                while trio.current_time() - quiet_since < JOIN_CONNECTION_SECONDS:
                    await trio.sleep(JOIN_POLL_SECONDS)
                    busy = await trio.to_thread.run_sync(self._invites_outstanding, True)
                    quiet_since = math.inf if busy else min(quiet_since, trio.current_time())
                self._join_open = trio.Event()
                nursery.cancel_scope.cancel()
            log.info("join port %d closed: no invite is outstanding", port)

    async def open_join_port(self) -> None:
        """After an invite is made: return once the join port listens (the token may be used at once)."""
        self._invited.set()
        with trio.move_on_after(JOIN_OPEN_SECONDS):
            await self._join_open.wait()
            return
        raise PeerError("join_port", self.join_error or "the join port did not open")

    # ---- revocation ----------------------------------------------------------------------------
    async def _learn_revocations(self) -> None:
        for rec in await self.dht.lookup("revoked", REVOKED_KEY):
            self.adopt_revocations(Revocations.from_payload(rec.payload))

    def adopt_revocations(self, rev: Revocations) -> bool:
        """Keep a newer list the CA signed; close this host's links to the hosts it revokes."""
        if not self.revoked.adopt(rev):
            return False
        for name in rev.names:
            conn = self._conns.pop(name, None)
            if conn is not None:
                conn.lost.set()
        self.request_publish()
        return True

    async def revoke(self, host: str) -> dict[str, Any]:
        """`p2pvbd revoke HOST` on the founder: sign a list naming ``host`` too and push it to every host
        reachable now (the index carries it to the others)."""
        if self.identity.ca_key is None:
            raise PeerError("not_founder", f"{self.name} does not hold the swarm's CA key: run this on the host "
                                           "that created the swarm")
        if host == self.name:
            raise PeerError("bad_request", "a host cannot revoke itself")
        rev = self.revoked.current
        if not rev.revokes(host) and host not in await trio.to_thread.run_sync(invites.taken_names, self.identity):
            # a list names few hosts (MAX_REVOKED_HOSTS): a name no certificate was issued for would waste one
            raise PeerError("bad_request", f"{host} is not a member of this swarm: no certificate was issued to it")
        if not rev.revokes(host):
            rev = rev.with_host(self.identity.ca_key, host)
            self.adopt_revocations(rev)
        told: list[str] = []

        async def tell(peer: str) -> None:
            try:
                with trio.fail_after(REVOCATION_PUSH_SECONDS):
                    await (await self.connect(peer)).request("revocations", rev.as_payload(), timeout=QUERY_TIMEOUT)
                told.append(peer)
            except (PeerError, trio.TooSlowError) as e:
                log.info("revocation list not pushed to %s (%s); the index will carry it",
                         peer, getattr(e, "message", "timed out"))

        names = {str(r.payload.get("host", r.publisher)) for r in await self.dht.lookup("catalog", CATALOG_KEY)}
        async with trio.open_nursery() as nursery:
            for peer in sorted(names - {self.name} - set(rev.names)):
                nursery.start_soon(tell, peer)
        return {"revoked": list(rev.names), "serial": rev.serial, "told": sorted(told)}

    async def _serve_revocations(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = check_payload("revoked", REVOKED_KEY, peer, body)
        except PayloadError as e:
            raise PeerError("bad_request", f"not a revocation list: {e}") from None
        return {"kept": self.adopt_revocations(Revocations.from_payload(payload))}

    async def _serve_deeds(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """The chain of deeds this host holds for a disk (members may read it, as they read maps)."""
        exp = self.ctl.get(body["disk"])
        if exp is None:
            raise PeerError("no_disk", f"{self.name} holds no replica of {body['disk']}")
        chain = await trio.to_thread.run_sync(self.ownership.local, exp.store)
        if chain is None:
            raise PeerError("no_deeds", f"{self.name} holds no proof of who owns {body['disk']}")
        return {"links": chain.raws()}

    # ---- connections ---------------------------------------------------------------------------
    async def connect(self, peer: str, *, relay: bool = True) -> PeerConnection:
        """A live connection to ``peer`` (found by name in the DHT), shared by all callers: a link this host
        opened; else a new one; else, for a peer this host cannot connect to (behind NAT), the link the
        peer opened to this host. After a failed attempt the peer's own link is used for a while without
        trying again (DIRECT_RETRY_SECONDS), so each request does not wait on an unreachable address; else,
        with ``relay``, a link through a member both can reach (swarm/relay.py)."""
        if self.revoked.revokes(peer):
            raise PeerError("revoked", f"host {peer} was revoked from this swarm")
        while True:
            if (conn := await self._live(self._conns.get(peer))) is not None:
                if not conn.via:
                    return conn
                if (back := await self._inbound_live(peer, direct_only=True)) is not None:
                    self._retire_relayed(conn)  # the peer reached this host since: no need for a relay
                    return back
                self._better_path_later(peer, conn)
                return conn
            recently_failed = not self._direct_due(peer)
            if recently_failed and (conn := await self._inbound_live(peer)) is not None:
                return conn
            pending = self._connecting.get(peer)
            if pending is None:
                break
            await pending.wait()
        self._connecting[peer] = done = trio.Event()
        try:
            if recently_failed:
                error = PeerError("unreachable", f"host {peer} could not be connected to in the last "
                                                 f"{DIRECT_RETRY_SECONDS:.0f} s")
            else:
                try:
                    conn = await self._connect_direct(peer)
                except PeerError as e:
                    self._direct_failed[peer], error = time.monotonic(), e
                else:
                    self._direct_failed.pop(peer, None)
                    self._conns[peer] = conn
                    return conn
            if (back := await self._inbound_live(peer)) is not None:
                return back
            if not relay:
                raise error
            conn = self._conns[peer] = await self._connect_relayed(peer, error)
            self._better_path_later(peer, conn)
            return conn
        finally:
            del self._connecting[peer]
            done.set()

    def _better_path_later(self, peer: str, relayed: PeerConnection) -> None:
        """Look, in the background, for a path to ``peer`` that needs no relay: either host may have
        changed network since the relayed link was opened."""
        if self._nursery is not None and peer not in self._seeking and (self._direct_due(peer)
                                                                         or self.puncher.due(peer)):
            self._seeking.add(peer)
            self._nursery.start_soon(self._better_path, peer, relayed)

    def _direct_due(self, peer: str) -> bool:
        return time.monotonic() >= self._direct_failed.get(peer, -math.inf) + DIRECT_RETRY_SECONDS

    async def _better_path(self, peer: str, relayed: PeerConnection) -> None:
        """Replace the relayed link ``relayed`` by a direct one if ``peer`` can be connected to now (at
        most every DIRECT_RETRY_SECONDS: an unreachable address can cost QUERY_TIMEOUT), else by a
        punched one (swarm/punch.py, at most every PUNCH_RETRY_SECONDS)."""
        try:
            if self._direct_due(peer):
                try:
                    conn = await self._connect_direct(peer)
                except PeerError:
                    self._direct_failed[peer] = time.monotonic()
                else:
                    if self._conns.get(peer) is relayed:
                        self.adopt_link(peer, conn)
                        log.info("reached %s directly; the link through %s closes", peer, relayed.via)
                    else:  # replaced meanwhile (punched): the new link is not needed
                        conn.lost.set()
                    return
            if self.puncher.due(peer):
                await self.puncher.upgrade(peer, relayed)
        finally:
            self._seeking.discard(peer)

    async def _connect_relayed(self, peer: str, direct: PeerError) -> PeerConnection:
        """A link to ``peer`` through one of the members this host holds a link to, the first that
        carries it (those ``peer``'s host record names as linked to it first); ``direct``'s error if
        none does."""
        assert self._nursery is not None
        theirs = set((await self._host_record(peer)).get("links", []))
        candidates = []
        for name in set(self._conns) | set(self._inbound):
            link = self._link(name)
            if name != peer and link is not None and not link.via:
                candidates.append(name)
        errors = [direct.message]
        for relay in sorted(candidates, key=lambda name: (name not in theirs, name)):
            try:
                conn = await self._nursery.start(self._hold_relayed, peer, relay)
            except PeerError as e:
                errors.append(f"through {relay}: {e.message}")
                continue
            log.info("reaching %s through %s", peer, relay)
            return conn
        raise PeerError("unreachable", "; ".join(errors))

    async def _hold_relayed(self, peer: str, relay: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one link to ``peer`` through ``relay`` open until it breaks (as ``_hold``)."""
        started = False
        try:
            stream = await self.relays.open_end(relay, peer)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream.pump)
                    async with open_peer_over(stream, f"{peer} via {relay}", self.client_ssl,
                                              connect_timeout=QUERY_TIMEOUT * 2, handler=self.handle_peer) as conn:
                        if conn.peer_name != peer:
                            raise PeerError("wrong_host", f"{relay} connected this host to {conn.peer_name!r}, "
                                                          f"not {peer!r}")
                        conn.via = relay
                        with trio.CancelScope() as hold:
                            self._relay_holds[conn] = hold
                            try:
                                task_status.started(conn)
                                started = True
                                await conn.lost.wait()
                            finally:
                                del self._relay_holds[conn]
                    nursery.cancel_scope.cancel()
            finally:
                self.relays.forget(relay, stream.pipe)
        except PeerError as e:
            if not started:
                raise
            log.info("relayed link to %s ended: %s", peer, e.message)

    def serve_relayed(self, stream: Any, source: str, relay: str, on_end: Callable[[], object]) -> None:
        """Serve ``source``'s TLS session that ``relay`` carries on ``stream`` (the other end of
        ``_hold_relayed``), in the background; its link carries this host's requests back too."""
        def on_link(conn: PeerConnection) -> None:
            conn.via = relay
            self._inbound_link(conn)

        async def serve() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream.pump)
                    await serve_link(stream, f"{source} via {relay}", trust.server_ssl_context(self.identity),
                                     self.handle_peer, on_link=on_link)
                    nursery.cancel_scope.cancel()
            finally:
                on_end()

        assert self._nursery is not None
        self._nursery.start_soon(serve)

    async def _live(self, conn: PeerConnection | None) -> PeerConnection | None:
        """``conn`` if it still works. One quiet for a while may have died (the peer changed network)
        before the kernel noticed: a quick hello tells, and a dead one is ended."""
        if conn is None or conn.lost.is_set():
            return None
        if time.time() - conn.last_received < QUIET_LINK_SECONDS or await conn.alive(LIVENESS_TIMEOUT):
            return conn
        log.info("connection to %s at %s is dead; connecting anew", conn.peer_name, conn.address)
        return None

    async def _connect_direct(self, peer: str) -> PeerConnection:
        """A new link to ``peer`` at the first of its advertised addresses that answers, of those not
        backing off after failing (swarm/dial_backoff.py: a record may name any address)."""
        assert self._nursery is not None
        errors = []
        addresses = await self._addresses(peer)
        now = time.monotonic()
        due = [a for a in addresses if self.dials.due(peer, a, now)][:MAX_DIAL_ADDRESSES]
        for address in due:
            host, port = parse_hostport(address)
            try:
                conn = await self._nursery.start(self._hold, peer, host, port)
            except PeerError as e:
                self.dials.failed(peer, address, time.monotonic(), wrong_host=e.code == "wrong_host")
                errors.append(f"{address}: {e.message}")
            else:
                self.dials.reached(peer, address)
                return conn
        if addresses and not due:
            wait = self.dials.next_due(peer, addresses) - now
            errors.append(f"its addresses failed lately; the next is dialled in {wait:.0f} s")
        raise PeerError("unreachable", f"host {peer} is unreachable" + (f" ({'; '.join(errors)})"
                                                                        if errors else " (no address known)"))

    async def _hold(self, peer: str, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one connection open until it breaks; failures before it is handed out go to the caller."""
        started = False
        try:
            async with open_peer(host, port, self.client_ssl, connect_timeout=QUERY_TIMEOUT,
                                 handler=self.handle_peer) as conn:
                if conn.peer_name != peer:
                    raise PeerError("wrong_host", f"{host}:{port} is {conn.peer_name!r}, not {peer!r}")
                task_status.started(conn)
                started = True
                await conn.lost.wait()
        except PeerError as e:
            if not started:
                raise
            log.info("connection to %s ended: %s", peer, e.message)

    def reach(self) -> dict[str, Any]:
        """How this host can be reached, for its host record: "nat" (with the addresses they saw instead)
        if peers it connected to saw another address than its own; else "direct" if they saw its own or
        peers connected to it; "unknown" before either; and the members it holds a direct link to, which
        can relay to it."""
        told = [(_ip_of(c.observed), _ip_of(c.local)) for c in self._conns.values() if not c.lost.is_set()]
        told = [(seen_at, mine) for seen_at, mine in told if seen_at and mine]
        seen = {seen_at for seen_at, mine in told if seen_at != mine}
        linked = sorted(name for name in set(self._conns) | set(self._inbound)
                        if (link := self._link(name)) is not None and not link.via)
        reached = any(c.kind == "inbound" and not c.via and not c.lost.is_set()
                      for links in self._inbound.values() for c in links)
        return {"reach": "nat" if seen else "direct" if told or reached else "unknown",
                "seen_as": sorted(seen)[:MAX_SEEN_AS], "links": linked[:MAX_LINKS_LISTED]}

    async def _host_record(self, peer: str) -> dict[str, Any]:
        """``peer``'s newest host record's payload; {} if the index has none."""
        mine = [r for r in await self.dht.lookup("host", peer) if r.publisher == peer]
        return max(mine, key=lambda r: r.ts).payload if mine else {}

    async def _addresses(self, peer: str) -> list[str]:
        """Where ``peer`` listens: its newest host record, else where it was last found."""
        record = await self._host_record(peer)
        if not record:
            return list(self.book.hosts.get(peer, []))
        addresses = [str(a) for a in record.get("addresses", [])]
        self.book.learn(peer, addresses)
        return addresses

    # ---- serving peers -------------------------------------------------------------------------
    async def handle_peer(self, peer: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        """Serve one request of ``peer`` (its certificate's name): bounds and rule first, then the handler."""
        if self.revoked.revokes(peer):
            raise self.refusals.refuse(peer, op, body, access.ERR_FORBIDDEN, f"{peer} was revoked from this swarm")
        self._last_contact[peer] = time.time()
        spec = self.peer_ops.get(op)
        if spec is None:
            raise PeerError("unknown_op", f"no handler for {op!r}")
        if (too_many := access.check_lists(op, spec, body)) is not None:
            raise self.refusals.refuse(peer, op, body, access.ERR_TOO_LARGE, too_many)
        if (why := await spec.rule(self, peer, body)) is not None:
            raise self.refusals.refuse(peer, op, body, access.ERR_FORBIDDEN, why)
        return await spec.handler(peer, body)

    def ops(self) -> list[PeerOp]:
        """The node's own peer ops: maps, blocks, revocations, deeds, relaying and punching."""
        member = access.member
        return [PeerOp("map_summary", member, self._serve_summary), PeerOp("map_nodes", member, self._serve_nodes),
                PeerOp("map_entries", member, self._serve_entries), PeerOp("map_changes", member, self._serve_changes),
                PeerOp("get_blocks", member, self._get_blocks, {"blocks": MAX_BLOCK_ENTRIES}),
                PeerOp("revocations", member, self._serve_revocations), PeerOp("deeds", member, self._serve_deeds),
                *self.relays.ops(), *self.puncher.ops()]

    def register_ops(self, ops: Iterable[PeerOp]) -> None:
        """Serve ``ops``; an op registered twice is a wiring mistake, refused at start-up."""
        for op in ops:
            if op.name in self.peer_ops:
                raise ValueError(f"peer op {op.name!r} registered twice")
            self.peer_ops[op.name] = op

    async def _serve_summary(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return await maps.serve_summary(self._store(body["disk"])) | {"migration": self._migration(body["disk"])}

    async def _serve_nodes(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return await maps.serve_nodes(self._store(body["disk"]), body)

    async def _serve_entries(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return await maps.serve_entries(self._store(body["disk"]), body)

    async def _serve_changes(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return await maps.serve_changes(self._store(body["disk"]), body)

    async def _get_blocks(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        # Reading, hashing and compressing up to a frame of blocks is milliseconds of disk and CPU: in a
        # worker thread (zstd and hashlib release the GIL), so guest requests are served meanwhile.
        store = self._store(body["disk"])
        reply, nbytes = await trio.to_thread.run_sync(self._serve_blocks, store, body["blocks"],
                                                      limiter=self._block_readers)
        if body.get("background") is True:  # a warm-replica pull: paced to the policy's rate
            await self.hooks.pace_background(body["disk"], nbytes)
        return reply

    def _store(self, disk: str) -> ReplicaStore:
        exp = self.ctl.get(disk)
        if exp is None:
            raise PeerError("no_disk", f"host {self.name} holds no replica of {disk!r}")
        return exp.store

    def _migration(self, disk: str) -> dict[str, Any] | None:
        """The migration of ``disk`` this host runs as its source, while it runs."""
        migration = self.migrations.get(disk)
        return migration.as_dict() if migration is not None and migration.finished is None else None

    def _serve_blocks(self, store: ReplicaStore, wanted: list[Any]) -> tuple[dict[str, Any], int]:
        """As many of ``wanted`` as fit one reply, in order; every entry counts against the reply's budget,
        a block's data too (``handle_peer`` already bounded how many there are). Runs in a worker thread,
        with a compressor of its own (one is not safe to share between threads)."""
        compressor = zstandard.ZstdCompressor(level=BLOCK_ZSTD_LEVEL)
        out: list[BlockEntry] = []
        budget = BLOCKS_REPLY_BUDGET
        for item in wanted:
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, int) for x in item)):
                raise PeerError("bad_request", "blocks must be [index, version] pairs")
            index, version = item
            if not 0 <= index < store.n_blocks:
                raise PeerError("bad_request", f"block {index} is outside {store.name}")
            if budget < BLOCK_ENTRY_BYTES + store.block_size:
                break  # the caller asks again for the rest
            budget -= BLOCK_ENTRY_BYTES
            rec = store.read_block(index)
            # Not that version here (any more): a replica says so; the owner sends what it has now.
            if rec.version != version and store.owner != self.name:
                out.append(pack_entry(index, rec.version))
                continue
            out.append(entry := pack_entry(index, rec.version, rec.hash, rec.data, compressor))
            budget -= len(entry.payload or b"")
        return {"blocks": out}, BLOCKS_REPLY_BUDGET - budget

    # ---- swarm-wide queries --------------------------------------------------------------------
    async def map_of(self, host: str, disk: str) -> maps.MapSource:
        """``host``'s map of ``disk``, to compare through summaries (this host's own store when it is us)."""
        if host == self.name:
            return maps.LocalMap(host, self._store(disk))
        return maps.RemoteMap(host, await self.connect(host), disk)

    async def summary_of(self, host: str, disk: str) -> maps.MapSummary:
        source = await self.map_of(host, disk)
        summary = await source.summary()
        if host == self.name:
            summary = replace(summary, extra={"migration": self._migration(disk)})
        return summary

    async def known_hosts(self) -> set[str]:
        """Every member this host knows of, to refuse a mistyped name at once: itself, the hosts in the
        index's catalog and in its address book, and on the founder every name its CA issued; none revoked."""
        names = {self.name, *self.book.hosts}
        names.update(str(r.payload.get("host", r.publisher)) for r in await self.dht.lookup("catalog", CATALOG_KEY))
        if self.identity.can_invite:
            names.update(await trio.to_thread.run_sync(invites.taken_names, self.identity))
        return {n for n in names if not self.revoked.revokes(n)}

    async def known_disks(self) -> list[str]:
        names = set(self.ctl.names())
        for rec in await self.dht.lookup("catalog", CATALOG_KEY):
            names.update(str(d) for d in rec.payload.get("disks", []))
        return sorted(names)

    async def owner_of(self, disk: str) -> tuple[str, int]:
        """(owning host, epoch) as the disk's chain of deeds proves it (swarm/proven.py): an owner record in
        the index is only a claim."""
        proven = await self.proven.of(disk)
        return proven.owner, proven.epoch

    async def holder_records(self, disk: str) -> list[Any]:
        """The index's holders records of ``disk``, but those of hosts that deleted their replica."""
        return [r for r in await self.dht.lookup("holders", disk) if not r.payload.get("gone")]

    async def withdraw(self, disk: str) -> None:
        """`disk delete`: this host no longer holds ``disk``. Its holders record is replaced by one saying so
        (records are newest-per-publisher, so the old one is overwritten, not left to expire) and its catalog
        is republished without it."""
        self.dht.stop_publishing("owner", disk)  # a deleted owned disk: the deeds say who owns it, not this
        await self.dht.publish("holders", disk, holders_payload(self.name, 0, 0, gone=True), RECORD_TTL)
        self.request_publish()

    async def holders_of(self, disk: str) -> list[str]:
        hosts = {str(r.payload["host"]) for r in await self.holder_records(disk)}
        if self.ctl.get(disk) is not None:
            hosts.add(self.name)
        return sorted(hosts)

    async def current_blocks(self, disk: str, holder: maps.MapSource, mine: maps.MapSummary,
                              owner: maps.MapSource, ref: maps.MapSummary) -> int:
        """Blocks of ``holder`` at the owner's version and content; remembered per pair of roots."""
        key = (disk, holder.name, mine.root, ref.root)
        if maps.same_root(mine.root, ref.root):
            return ref.n_blocks
        if key in self._coverage_cache:
            self._coverage_cache.move_to_end(key)
            return self._coverage_cache[key]
        differ = await maps.diff(holder, owner, ref.n_blocks, (mine.root, ref.root))
        value = ref.n_blocks - int(differ.blocks.size)
        if STALE_ROOT not in (mine.root, ref.root):
            self._coverage_cache[key] = value
            while len(self._coverage_cache) > COVERAGE_CACHE_ENTRIES:
                self._coverage_cache.popitem(last=False)
        return value

    def has_live_link(self, peer: str) -> bool:
        """Whether a link with ``peer`` is open and was heard from lately, told without a request: a standing
        link is probed every PUBLISH_INTERVAL (_keep_links), so one silent for two of them is in doubt."""
        links = [c for c in [self._conns.get(peer), *self._inbound.get(peer, [])] if c is not None]
        return any(not c.lost.is_set() and time.time() - c.last_received < 2 * PUBLISH_INTERVAL for c in links)

    def a_peer_in_doubt(self) -> bool:
        """Whether a peer this host had a link with has none alive now: it went down or away, and the
        index may stall a lookup on it (a silent node costs the DHT's RPC timeout)."""
        return any(not self.has_live_link(peer) for peer in {*self._conns, *self._inbound}
                   if not self.revoked.revokes(peer))

    def known_coverage(self, disk: str, host: str, mine: bytes, ref: bytes) -> int | None:
        """The coverage measured here of ``host``'s replica with root ``mine`` against the owner's root ``ref``."""
        return self._coverage_cache.get((disk, host, mine, ref))

    async def status(self, disk: str | None = None) -> dict[str, Any]:
        """Every disk's (or ``disk``'s) owner and replicas, within about a second (swarm/status.py)."""
        return await self.status_view.status(disk)

    async def peers(self) -> list[dict[str, Any]]:
        names = {str(r.payload.get("host", r.publisher)) for r in await self.dht.lookup("catalog", CATALOG_KEY)}
        names.discard(self.name)
        infos: dict[str, PeerInfo] = {}

        async def probe(name: str) -> None:
            records = [r for r in await self.dht.lookup("host", name) if r.publisher == name]
            if not records:
                infos[name] = PeerInfo(name, [], "", 0.0, False, "no host record")
                return
            rec = max(records, key=lambda r: r.ts)
            info = PeerInfo(name, [str(a) for a in rec.payload.get("addresses", [])], str(rec.payload.get("cert")),
                            0.0, reach=rec.payload["reach"], seen_as=rec.payload["seen_as"])
            self.book.learn(name, info.addresses)
            try:
                with trio.fail_after(QUERY_TIMEOUT * 2):  # a direct attempt, then a relayed one
                    conn = await self.connect(name)
                info.reachable, info.path = True, conn.path
            except (PeerError, trio.TooSlowError) as e:
                info.reachable, info.error = False, getattr(e, "message", "timed out")
            infos[name] = info

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(probe, name)
        now = time.time()
        for info in infos.values():
            info.last_seen = self.last_heard_from(info.name)
        return [{"name": i.name, "addresses": i.addresses, "cert_fingerprint": i.cert,
                 "last_seen": i.last_seen or None,
                 "last_seen_ago_s": round(now - i.last_seen, 1) if i.last_seen else None,
                 "reach": i.reach, "seen_as": i.seen_as,
                 "reachable": i.reachable, "path": i.path, "pull_rate": self.hooks.pull_rate(i.name),
                 "error": i.error}
                for i in sorted(infos.values(), key=lambda i: i.name)]

    def last_heard_from(self, peer: str) -> float:
        """When ``peer`` last sent this host anything (a reply or a request); 0.0 if never."""
        conn = self._conns.get(peer)
        return max(conn.last_received if conn is not None else 0.0, self._last_contact.get(peer, 0.0))
