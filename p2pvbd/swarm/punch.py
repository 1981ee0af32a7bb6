"""Hole punching: two members behind NAT, talking through a relay, open a direct TCP link through both
NATs, as libp2p's DCUtR and BitTorrent's BEP 55 do; the relayed link stays the fallback.

A holds a relayed link to B through R (swarm/relay.py), which carries the coordination:

1. A picks a local port and connects from it to R; R's hello reply says where the connection came from:
   A's NAT's public address and port for it (``PeerConnection.observed``).
2. A asks B ``punch {at}`` with that address over the relayed link. B does the same from a port of its
   own and answers its observed address, then dials A's from that port.
3. A dials B's from its port. Each SYN leaves its own NAT before the other's arrives, or is dropped by
   the other NAT and sent again; once both NATs have seen their side go out, the SYNs pass and the TCP
   simultaneous open joins them into one connection (RFC 9293, 3.5).
4. A runs TLS as the client, B as the server, with their own certificates: the punched link
   authenticates both ends as any other does. A uses it from then on; the relayed link is closed after
   RELAYED_GRACE_SECONDS, when requests started on it have finished.

This works where each NAT keeps the public port it gave a local port for every destination (endpoint
independent mapping, as most home routers and Linux's masquerade do) and drops unsolicited packets
rather than answering them with a reset. Where it fails (a NAT that picks a new port per destination), A
stays relayed and tries again only after PUNCH_RETRY_SECONDS.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

import trio

from p2pvbd.base.home import HomeError, format_hostport, parse_hostport
from p2pvbd.swarm import trust
from p2pvbd.swarm.access import PeerOp, member
from p2pvbd.swarm.peer_transport import (
    CONNECT_TIMEOUT,
    PeerConnection,
    PeerError,
    open_peer_over,
    serve_link,
    watch_liveness,
)

if TYPE_CHECKING:
    import ssl


class PunchHost(Protocol):
    """What hole punching needs of the node: who this host is, its links, and serving a punched link."""

    name: str
    identity: trust.HostIdentity
    client_ssl: ssl.SSLContext

    @property
    def nursery(self) -> trio.Nursery | None: ...

    async def direct_addresses(self, peer: str) -> list[str]: ...

    def relayed_by(self, peer: str) -> str: ...

    def adopt_link(self, peer: str, conn: PeerConnection) -> None: ...

    async def handle_peer(self, peer: str, op: str, body: dict[str, Any]) -> dict[str, Any]: ...

log = logging.getLogger(__name__)

# How long each end dials the other: Linux sends a SYN again after 1 s and 3 s (tcp_syn_retries), so
# a SYN dropped because the other NAT had not yet seen its side go out is retried twice in this time.
PUNCH_SECONDS = 8.0
# After a punch failed, A stays relayed this long before trying again: a NAT that defeats punching
# once will again (it picks a new port per destination), and each try costs both ends a TLS handshake
# with the relay and a few seconds of dialing.
PUNCH_RETRY_SECONDS = 300.0
# Punches this host answers at once: each holds a port and a dialing task for PUNCH_SECONDS; one
# person's machines punch to each other rarely (once per link).
MAX_PUNCHES = 4
# How long the relayed link stays open once a punched one replaced it: the longest a request started on
# it waits for its reply (peer_transport.DEFAULT_REQUEST_TIMEOUT).
RELAYED_GRACE_SECONDS = 60.0


def pick_port() -> int:
    """A free local TCP port, to connect from twice (to the relay, then to the peer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# The timeout bounds the connect alone and ends as a PeerError, the socket closed, as a refusal does.
async def dial_from(local_port: int, host: str, port: int, timeout: float) -> trio.SocketStream:  # noqa: ASYNC109
    """A TCP connection to ``host:port`` from ``local_port``. SO_REUSEADDR and SO_REUSEPORT let the same
    port connect out again while its previous connection lingers in TIME_WAIT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind(("", local_port))
        with trio.fail_after(timeout):
            await sock.connect((host, port))
    except (OSError, trio.TooSlowError) as e:
        sock.close()
        raise PeerError("unreachable", f"cannot reach {format_hostport(host, port)} from port {local_port}: "
                                       f"{str(e) or 'timed out'}") from None
    stream = trio.SocketStream(sock)
    watch_liveness(stream)
    return stream


def public_address(text: object) -> tuple[str, int]:
    """An observed "ip:port" a peer may ask this host to dial: a literal unicast address, so a punch
    can make this host connect to nothing but what a NAT could have shown."""
    if not isinstance(text, str):
        raise PeerError("bad_request", "a punch names an address \"ip:port\"")
    try:
        host, port = parse_hostport(text)
        ip = ipaddress.ip_address(host)
    except (ValueError, HomeError):
        raise PeerError("bad_request", f"{text[:64]!r} is not an \"ip:port\" address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # [::ffff:127.0.0.1] is 127.0.0.1 to the kernel: judged, and dialled, as such
    if not 0 < port < 65536 or not unicast(ip):
        raise PeerError("bad_request", f"{text[:64]!r} is not an address a NAT shows")
    return str(ip), port


def unicast(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address a NAT can show for a peer: not this host's own (loopback, unspecified), not a group
    (multicast, broadcast), not link-local, reserved or site-local, and no IPv6 form that embeds an IPv4
    address that is not one (6to4, Teredo: their relays would carry it there)."""
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local or ip.ipv4_mapped is not None:
            return False
        embedded = [ip.sixtofour] if ip.sixtofour is not None else list(ip.teredo or ())
        return all(unicast(e) for e in embedded)
    return True


class Puncher:
    """Upgrades this host's relayed links to punched ones, and answers the other end's punches."""

    def __init__(self, swarm: PunchHost) -> None:
        self.swarm = swarm
        self._failed: dict[str, float] = {}  # peer -> monotonic time of its last failed punch
        self._trying: set[str] = set()
        self._answering = 0

    def ops(self) -> list[PeerOp]:
        return [PeerOp("punch", member, self._answer)]

    def due(self, peer: str) -> bool:
        """Whether a relayed link to ``peer`` should try to become a punched one now."""
        failed = self._failed.get(peer)
        return peer not in self._trying and (failed is None or time.monotonic() > failed + PUNCH_RETRY_SECONDS)

    async def observe(self, relay: str, local_port: int) -> str:
        """Where ``relay`` sees a connection from ``local_port`` come from ("ip:port")."""
        errors = []
        for address in await self.swarm.direct_addresses(relay):
            host, port = parse_hostport(address)
            try:
                stream = await dial_from(local_port, host, port, CONNECT_TIMEOUT)
                async with open_peer_over(stream, address, self.swarm.client_ssl,
                                          handler=self.swarm.handle_peer) as conn:
                    if conn.peer_name != relay or not conn.observed:
                        raise PeerError("bad_reply", f"{address} did not say where this host is seen from")
                    return conn.observed
            except PeerError as e:
                errors.append(e.message)
        raise PeerError("unreachable", f"{relay} could not be asked where this host is seen from: "
                                       + ("; ".join(errors) or "no address known"))

    # ---- A: the end that holds the relayed link ------------------------------------------------------
    async def upgrade(self, peer: str, relayed: PeerConnection) -> None:
        """Try once to replace ``relayed`` (a link to ``peer``) by a punched one; log why not if not."""
        self._trying.add(peer)
        try:
            port = pick_port()
            mine = await self.observe(relayed.via, port)
            reply = await relayed.request("punch", {"at": mine}, timeout=PUNCH_SECONDS + CONNECT_TIMEOUT)
            host, their_port = public_address(reply.get("at"))
            stream = await dial_from(port, host, their_port, PUNCH_SECONDS)
            assert self.swarm.nursery is not None
            await self.swarm.nursery.start(self._hold, peer, stream, format_hostport(host, their_port))
        except PeerError as e:
            self._failed[peer] = time.monotonic()
            log.info("staying relayed to %s through %s: punching through NAT failed (%s)", peer, relayed.via,
                     e.message)
            return
        finally:
            self._trying.discard(peer)
        self._failed.pop(peer, None)
        log.info("punched a direct link to %s through NAT; the link through %s closes", peer, relayed.via)

    async def _hold(self, peer: str, stream: trio.SocketStream, address: str, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """A's side of the punched link: TLS client; it becomes this host's link to ``peer``."""
        started = False
        try:
            async with open_peer_over(stream, address, self.swarm.client_ssl, connect_timeout=CONNECT_TIMEOUT,
                                      handler=self.swarm.handle_peer) as conn:
                if conn.peer_name != peer:
                    raise PeerError("wrong_host", f"the punched link to {address} reached {conn.peer_name!r}, "
                                                  f"not {peer!r}")
                conn.kind = "punched"
                self.swarm.adopt_link(peer, conn)
                task_status.started()
                started = True
                await conn.lost.wait()
        except PeerError as e:
            if not started:
                raise
            log.info("punched link to %s ended: %s", peer, e.message)

    # ---- B: the end asked to punch -------------------------------------------------------------------
    async def _answer(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """Dial ``at`` from a port of this host's, after answering where that port is seen from. Only
        for a peer this host talks to through a relay: nobody else has a reason to ask."""
        host, port = public_address(body.get("at"))
        via = self.swarm.relayed_by(peer)
        if not via:
            raise PeerError("bad_request", f"{self.swarm.name} is not linked to {peer} through a relay")
        if self._answering >= MAX_PUNCHES:
            raise PeerError("busy", f"{self.swarm.name} is punching {MAX_PUNCHES} links already")
        self._answering += 1
        try:
            local = pick_port()
            mine = await self.observe(via, local)
        except BaseException:
            self._answering -= 1
            raise
        assert self.swarm.nursery is not None
        self.swarm.nursery.start_soon(self._dial_back, peer, local, host, port)
        return {"at": mine}

    async def _dial_back(self, peer: str, local: int, host: str, port: int) -> None:
        """B's side of the punched link: TLS server, for ``peer``'s certificate only."""
        try:
            stream = await dial_from(local, host, port, PUNCH_SECONDS)
        except PeerError as e:
            log.info("punching through NAT to %s failed: %s", peer, e.message)
            return
        finally:
            self._answering -= 1

        def on_link(conn: PeerConnection) -> None:
            if conn.peer_name != peer:
                raise PeerError("wrong_host", f"the punched link to {peer} reached {conn.peer_name!r}")
            conn.kind = "punched"
            self.swarm.adopt_link(peer, conn)
            log.info("punched a direct link to %s through NAT", peer)

        try:
            await serve_link(stream, (host, port), trust.server_ssl_context(self.swarm.identity),
                             self.swarm.handle_peer, on_link=on_link)
        except* PeerError as eg:
            log.info("punched link to %s refused: %s", peer, eg.exceptions[0])
