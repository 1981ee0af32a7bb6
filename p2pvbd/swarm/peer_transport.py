"""Peer connections over mutual TLS with trio: many concurrent requests per connection, in both roles.

The client side multiplexes requests by id over one TLS stream (a reader task routes each reply to its
waiter), so a migration can keep dozens of block fetches in flight without a connection each. The
server side authenticates in the TLS handshake (OpenSSL rejects certificates not from the swarm CA before
we read a byte), then runs each request as its own task, bounded per connection so a busy peer gets
TCP back-pressure instead of unbounded memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2pvbd.base import admission
from p2pvbd.base.home import HomeError, format_hostport, parse_hostport
from p2pvbd.swarm import invites, trust
from p2pvbd.wire.dht_records import FirstSeen
from p2pvbd.wire.peer_wire import (
    ERR_CONNECTION,
    ERR_INTERNAL,
    ERR_PROTOCOL,
    ERR_TIMEOUT,
    JOIN_LIMITS,
    JOIN_OPS,
    OPS,
    PEER_LIMITS,
    PROTOCOL_VERSION,
    SMALL_FRAME_BYTES,
    FrameDecoder,
    FrameError,
    FrameLimits,
    OpSpec,
    PeerError,
    encode_error,
    encode_reply,
    encode_request,
    is_request,
    validate_body,
)

__all__ = ["Handler", "PeerConnection", "PeerError", "join_handler", "join_swarm", "open_peer", "open_peer_over",
           "serve_join", "serve_link", "serve_peers"]

log = logging.getLogger(__name__)

# TCP + TLS + hello: milliseconds on a LAN, about a second on a bad mobile link; 10 s means "unreachable".
CONNECT_TIMEOUT = 10.0
# A client that stalls the handshake must not hold a server task forever (a trickle/slowloris attempt).
HANDSHAKE_TIMEOUT = 10.0
# A 4 MiB block over a slow (~1 MB/s) WAN link takes a few seconds; 60 s is "the peer is stuck".
DEFAULT_REQUEST_TIMEOUT = 60.0
# Per-connection in-flight requests on the server: 16 x 8 MiB max reply = 128 MiB worst case, while
# 16 x 4 MiB blocks in flight is enough to fill a 10 Gbit/s LAN link at ~1 ms RTT.
MAX_CONCURRENT_REQUESTS = 16
# Read size: large enough that a 4 MiB block arrives in a few dozen reads, small enough to be cheap.
RECV_BYTES = 256 * 1024
# Invites are served on the port after the peer port: a joiner has no certificate yet, and the peer
# port must stay strict (no certificate, no connection). Tokens carry peer addresses.
JOIN_PORT_OFFSET = 1
# Anyone can reach the join port: a join is two small requests, one machine joining at a time is the
# norm, so a few connections of at most 30 s each (handshake included) are plenty; two from one address
# (a joiner retrying), so a stranger holding some cannot keep a joiner from elsewhere out (admission.py).
JOIN_MAX_CONNECTIONS = 4
JOIN_MAX_PER_SOURCE = 2
JOIN_CONNECTION_SECONDS = 30.0
# A dead link (a host that changed network, a cut cable) is noticed by the kernel, both ways: an idle
# connection sends TCP keepalive probes after 10 s and every 5 s, and gives up after 3 unanswered; data
# left unacknowledged for 30 s ends it too (TCP_USER_TIMEOUT, RFC 5482), so a request on a link that died
# fails in well under its own timeout (DEFAULT_REQUEST_TIMEOUT) and the connection is made anew. A busy
# but slow peer still acknowledges what it receives, so slowness alone ends nothing.
KEEPALIVE_IDLE_SECONDS = 10
KEEPALIVE_INTERVAL_SECONDS = 5
KEEPALIVE_PROBES = 3
UNACKED_DATA_SECONDS = 30
# Closing politely (TLS close_notify) must not hang on a dead peer.
CLOSE_TIMEOUT = 1.0
# A cancel frame is ~30 bytes; if the link cannot take it within this long the connection is stuck anyway
# (and is marked broken), like CLOSE_TIMEOUT: long enough for a busy link, short enough not to hold a caller.
CANCEL_SEND_TIMEOUT = 1.0
# The address a hello reply reports: "[IPv6]:port" at most (47 characters), with room.
MAX_OBSERVED_CHARS = 64

Handler = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]
# Refused handshakes already logged, by (address, reason): bounded memory, least recent forgotten.
_refused_logged = FirstSeen()


def _tls_reason(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return cause.reason or str(cause)
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def watch_liveness(tcp: trio.SocketStream) -> None:
    """Have the kernel end ``tcp`` once the peer goes silent (see KEEPALIVE_IDLE_SECONDS)."""
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_SECONDS)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_SECONDS)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKED_DATA_SECONDS * 1000)
    except OSError as e:  # not a TCP socket (a test's socketpair): nothing to watch
        log.debug("no TCP keepalive on this stream: %s", e)


async def _close(stream: trio.abc.AsyncResource) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT) as scope:
        scope.shield = True
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


# ---- client --------------------------------------------------------------------------------------


class PeerConnection:
    """One TLS connection to a peer. Use through ``open_peer``; ``request`` may be called from many tasks."""

    def __init__(self, stream: trio.SSLStream[Any], address: str) -> None:
        self.stream = stream
        self.address = address
        # Serves the requests the peer sends on this link, if this end serves any (a link carries requests
        # both ways: a host behind NAT is reached over the link it opened); set by whoever owns the link.
        self.responder: _Responder | None = None
        self.via = ""  # the relay carrying this link, if one does (swarm/relay.py)
        # How the link came to be: "outbound" (this host connected), "inbound" (the peer did), "punched"
        # (both at once, through their NATs: swarm/punch.py); with ``via``, relayed.
        self.kind = "outbound"
        # This end's address as the peer saw it (its hello reply): behind NAT, the NAT's public one; and
        # as this end's socket has it (TCP links this host opened).
        self.observed = ""
        self.local = ""
        # The peer's host name from its verified certificate; '' on a join connection (unverified).
        self.peer_name = trust.peer_name(stream)
        self.peer_cert_der: bytes = stream.getpeercert(binary_form=True) or b""
        self._next_id = 0
        self._pending: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._send_lock = trio.Lock()
        self._broken: PeerError | None = None
        # Set once the connection can serve no more requests, so a pool knows to drop it.
        self.lost = trio.Event()
        # Wall-clock time of the last bytes from the peer: when this host last heard from it.
        self.last_received = 0.0
        # What a frame from this peer may hold (JOIN_LIMITS on a joiner's link to the join port), and the ops
        # it may ask.
        self.limits = PEER_LIMITS
        self.ops: Mapping[str, OpSpec] = OPS

    # The timeout is the request's own: it also cuts a send the caller's cancellation cannot (a frame is sent
    # whole, shielded), and ends as a PeerError like any other failure of the peer.
    async def request(self, op: str, body: dict[str, Any],
                      timeout: float = DEFAULT_REQUEST_TIMEOUT) -> dict[str, Any]:  # noqa: ASYNC109
        """Send a request and wait for its reply body; PeerError for error replies, timeouts, dead links.

        Cancelling the caller is safe: a frame is always sent whole, the peer is told to drop the request
        (``cancel``), and a reply that still arrives is discarded by the reader.
        """
        if self._broken:
            raise self._dead()
        self._next_id += 1
        request_id = self._next_id
        frame = encode_request(request_id, op, body)
        event, slot = trio.Event(), []
        self._pending[request_id] = (event, slot)
        sent, deadline = False, trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                await self._send_whole(frame, deadline)
                sent = True
                await event.wait()
        except trio.TooSlowError:
            raise PeerError(ERR_TIMEOUT, f"{op} to {self.address} got no reply within {timeout:g} s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise self._dead() if self._broken else PeerError(ERR_CONNECTION, str(e)) from e
        finally:
            self._pending.pop(request_id, None)
            if sent and not slot and not self._broken:  # timed out or cancelled while the peer works on it
                await self._cancel_remote(request_id)
        if not slot:
            raise self._dead()
        reply = slot[0]
        if reply["ok"]:
            return reply["body"]
        raise PeerError(reply["error"]["code"], reply["error"]["message"])

    async def _send_whole(self, frame: bytes, deadline: float) -> None:
        """Send one frame, never half of it: the caller's cancellation stops the wait for the lock, not
        ``send_all``. Only ``deadline`` (the request's own timeout: a peer reading nothing for that long
        is dead) or a failure cuts a send, and then the connection is marked broken.
        """
        async with self._send_lock:
            if self._broken:
                raise self._dead()
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                try:
                    await self.stream.send_all(frame)
                except BaseException as e:
                    self._fail(PeerError(ERR_CONNECTION, f"connection to {self.address} lost: {_tls_reason(e)}"))
                    raise
            if scope.cancelled_caught:
                self._fail(PeerError(ERR_CONNECTION, f"connection to {self.address} lost: sending stalled"))
                raise trio.TooSlowError

    async def _cancel_remote(self, request_id: int) -> None:
        """Best effort: tell the peer to stop serving ``request_id`` (saves its upload for a reply nobody reads)."""
        self._next_id += 1
        frame = encode_request(self._next_id, "cancel", {"id": request_id})
        deadline = trio.current_time() + CANCEL_SEND_TIMEOUT
        with trio.CancelScope(shield=True, deadline=deadline):
            try:
                await self._send_whole(frame, deadline)
            except (PeerError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the connection is gone or marked broken: nothing left to cancel

    async def alive(self, timeout: float) -> bool:  # noqa: ASYNC109 -- passed on to request(): see there
        """Whether the peer answers a ``hello`` within ``timeout``; a connection that does not is ended
        (so a pool makes a new one, to wherever the peer is now). While a frame is being sent the link is
        in use, and the kernel's own timeout (UNACKED_DATA_SECONDS) judges it: a hello queued behind a
        large frame on a slow uplink would misjudge it."""
        if self._send_lock.locked():
            return True
        try:
            await self.request("hello", {"protocol": PROTOCOL_VERSION}, timeout=timeout)
        except PeerError as e:
            self._fail(PeerError(ERR_CONNECTION, f"{self.address} stopped answering ({e.message})"))
            return False
        return True

    @property
    def path(self) -> str:
        """How this link reaches the peer, as ``peers`` shows it."""
        return f"relayed via {self.via}" if self.via else self.kind

    def _dead(self) -> PeerError:
        # A fresh exception per caller: one shared instance would pile up every task's traceback.
        assert self._broken is not None
        return PeerError(self._broken.code, self._broken.message)

    def _fail(self, error: PeerError) -> None:
        if self._broken is None:
            self._broken = error
        self.lost.set()
        for event, _ in self._pending.values():
            event.set()

    def deliver(self, frame: dict[str, Any]) -> None:
        """Hand a reply to the request waiting for it (none if its caller timed out and left)."""
        waiter = self._pending.get(frame["id"])
        if waiter is not None:
            waiter[1].append(frame)
            waiter[0].set()

    async def _read_replies(self) -> None:
        decoder = FrameDecoder(self.limits, self.ops)
        try:
            while True:
                data = await self.stream.receive_some(RECV_BYTES)
                if not data:
                    raise PeerError(ERR_CONNECTION, f"{self.address} closed the connection")
                self.last_received = time.time()
                decoder.feed(data)
                while (frame := await _next_frame(decoder)) is not None:
                    if is_request(frame):
                        if self.responder is None:
                            raise FrameError("the peer sent a request on a link that serves none")
                        await self.responder.take(frame)
                    else:
                        self.deliver(frame)
        except PeerError as e:
            self._fail(e)
        except FrameError as e:
            self._fail(PeerError(ERR_CONNECTION, f"{self.address} broke the protocol: {e}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._fail(PeerError(ERR_CONNECTION, f"connection to {self.address} lost: {_tls_reason(e)}"))


@asynccontextmanager
async def open_peer(host: str, port: int, ssl_context: ssl.SSLContext, *,
                    connect_timeout: float = CONNECT_TIMEOUT, handler: Handler | None = None,
                    ops: Mapping[str, OpSpec] = OPS, limits: FrameLimits = PEER_LIMITS
                    ) -> AsyncIterator[PeerConnection]:
    """Connect, complete TLS and a ``hello`` round trip, then yield the connection; closed on exit.
    With ``handler``, requests the peer sends on this link are served too (as ``serve_peers`` serves them).

    The hello is what makes a wrong swarm fail here: in TLS 1.3 the client finishes its handshake before
    the server has judged the client certificate, so only a reply proves the server accepted us.
    """
    address = f"{host}:{port}"
    try:
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as e:
        raise PeerError(ERR_CONNECTION, f"cannot connect to {address}: {e or 'timed out'}") from e
    watch_liveness(tcp)
    async with open_peer_over(tcp, address, ssl_context, connect_timeout=connect_timeout, handler=handler,
                              ops=ops, limits=limits) as conn:
        yield conn


@asynccontextmanager
async def open_peer_over(transport: trio.abc.Stream, address: str, ssl_context: ssl.SSLContext, *,
                         connect_timeout: float = CONNECT_TIMEOUT, handler: Handler | None = None,
                         ops: Mapping[str, OpSpec] = OPS, limits: FrameLimits = PEER_LIMITS
                         ) -> AsyncIterator[PeerConnection]:
    """``open_peer`` over a byte stream already connected to the peer (a TCP connection, or a relayed
    one: the TLS inside is end to end, so whatever carries the bytes reads and alters nothing)."""
    stream = trio.SSLStream(transport, ssl_context, server_side=False)
    try:
        try:
            with trio.fail_after(connect_timeout):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as e:
            raise PeerError(ERR_CONNECTION, f"TLS handshake with {address} failed: {_tls_reason(e)} "
                                            "(is it a host of another swarm?)") from e
        conn = PeerConnection(stream, address)
        conn.limits, conn.ops = limits, ops
        if isinstance(transport, trio.SocketStream):
            with contextlib.suppress(OSError):
                conn.local = format_hostport(*transport.socket.getsockname()[:2])
        try:
            async with trio.open_nursery() as nursery:
                if handler is not None:
                    conn.responder = _Responder(conn, handler, ops, MAX_CONCURRENT_REQUESTS, nursery)
                nursery.start_soon(conn._read_replies)
                try:
                    reply = await conn.request("hello", {"protocol": PROTOCOL_VERSION}, timeout=connect_timeout)
                except PeerError as e:
                    if e.code == ERR_CONNECTION:
                        raise PeerError(ERR_CONNECTION, f"refused after the TLS handshake ({e.message}): "
                                                        "is this host a member of its swarm?") from e
                    raise
                if reply.get("protocol") != PROTOCOL_VERSION:
                    raise PeerError(ERR_PROTOCOL, f"{address} speaks protocol {reply.get('protocol')!r}")
                observed = reply.get("observed")
                if isinstance(observed, str) and len(observed) <= MAX_OBSERVED_CHARS:
                    conn.observed = observed
                try:
                    yield conn
                finally:
                    # Wake any task still waiting on this connection (from outside the block) at once.
                    conn._fail(PeerError(ERR_CONNECTION, f"connection to {address} was closed"))
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            # The reader never raises, so a group here holds just the caller's own exception: give it back
            # unwrapped, so `except PeerError` around `async with open_peer(...)` works as written.
            if len(eg.exceptions) == 1 and not isinstance(eg.exceptions[0], BaseExceptionGroup):
                raise eg.exceptions[0] from eg.exceptions[0].__cause__
            raise
    finally:
        await _close(stream)


# ---- server --------------------------------------------------------------------------------------


async def _answer(handler: Handler, conn: PeerConnection, frame: dict[str, Any], ops: Mapping[str, OpSpec]) -> bytes:
    """The reply frame for one request (an error reply if it fails). A hello on a link the peer opened
    also tells it where its bytes came from (as libp2p's identify and STUN do): behind NAT, that is the
    NAT's public address and port, which the peer needs to be reached through it (swarm/punch.py)."""
    request_id, op, body, name = frame["id"], frame["op"], frame["body"], conn.peer_name
    try:
        validate_body(op, body, ops)
        if op == "hello":
            if body["protocol"] != PROTOCOL_VERSION:
                raise PeerError(ERR_PROTOCOL, f"this host speaks protocol {PROTOCOL_VERSION}, not {body['protocol']}")
            result: dict[str, Any] = {"protocol": PROTOCOL_VERSION}
            if conn.kind == "inbound" and not conn.via:
                result["observed"] = conn.address
        else:
            result = await handler(name, op, body)
            if not isinstance(result, dict):
                raise TypeError(f"handler for {op} returned {type(result).__name__}, not a dict")
        return encode_reply(request_id, result)
    except PeerError as e:
        return encode_error(request_id, e.code, e.message)
    except Exception:
        log.exception("handler for %s from %r failed", op, name)
        return encode_error(request_id, ERR_INTERNAL, f"internal error handling {op}")


async def _next_frame(decoder: FrameDecoder) -> dict[str, Any] | None:
    """The next whole frame, or None. One above SMALL_FRAME_BYTES (only a member's: JOIN_LIMITS keep an
    outsider's small) is decoded in a worker thread, so guests' I/O goes on meanwhile."""
    size = decoder.pending()
    if size is None:
        return None
    if size <= SMALL_FRAME_BYTES:
        return decoder.decode_pending()
    return await trio.to_thread.run_sync(decoder.decode_pending)


async def serve_link(transport: trio.abc.Stream, remote: Any, ssl_context: ssl.SSLContext, handler: Handler, *,
                     ops: Mapping[str, OpSpec] = OPS, max_concurrent: int = MAX_CONCURRENT_REQUESTS,
                     handshake_timeout: float = HANDSHAKE_TIMEOUT, limits: FrameLimits = PEER_LIMITS,
                     on_link: Callable[[PeerConnection], None] | None = None,
                     authenticated: Callable[[], None] | None = None) -> None:
    """Serve one peer over ``transport`` (a TCP connection, or a relayed stream): TLS server side, then
    its requests until it leaves; ``remote`` names where it came from in logs. ``authenticated`` is called
    once the handshake is done (the peer's certificate, if asked for, verified)."""
    stream = trio.SSLStream(transport, ssl_context, server_side=True)
    try:
        with trio.fail_after(handshake_timeout):
            await stream.do_handshake()
        name = trust.peer_name(stream)
    except (trio.BrokenResourceError, trio.TooSlowError, trust.TrustError) as e:
        reason = _tls_reason(e)
        host = remote[0] if isinstance(remote, tuple) else remote
        if _refused_logged.first((host, reason)):  # a stranger retrying in a loop is one line, not a flood
            log.info("refused connection from %s: %s (logged once per address and reason)", remote, reason)
        await trio.aclose_forcefully(stream)
        return
    log.debug("peer %r connected from %s", name, remote)
    if authenticated is not None:
        authenticated()
    # The same link carries this host's requests to the peer (``on_link``): a peer behind NAT is
    # reached over the connection it opened.
    conn = PeerConnection(stream, format_hostport(*remote[:2]) if isinstance(remote, tuple) else str(remote))
    conn.kind = "inbound"
    decoder = FrameDecoder(limits, ops)
    try:
        async with trio.open_nursery() as nursery:
            conn.responder = responder = _Responder(conn, handler, ops, max_concurrent, nursery)
            if on_link is not None:
                on_link(conn)
            while True:
                data = await stream.receive_some(RECV_BYTES)
                if not data:
                    break
                conn.last_received = time.time()
                decoder.feed(data)
                while (frame := await _next_frame(decoder)) is not None:
                    if is_request(frame):
                        await responder.take(frame)
                    else:
                        conn.deliver(frame)
            nursery.cancel_scope.cancel()
    except* FrameError as eg:
        log.info("dropping %r (%s): %s", name, remote, eg.exceptions[0])
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("peer %r (%s) disconnected", name, remote)
    finally:
        conn._fail(PeerError(ERR_CONNECTION, f"{name} ({remote}) disconnected"))
        await _close(stream)


class _Responder:
    """Serves the requests arriving on one link, at either end: each as its own task, at most
    ``max_concurrent`` at once (the reader waits meanwhile: TCP back-pressure instead of unbounded
    memory), replies sent whole under the link's send lock; a ``cancel`` frame stops a request until its
    reply starts going out (a reply is never cut: that would break the framing)."""

    def __init__(self, conn: PeerConnection, handler: Handler, ops: Mapping[str, OpSpec], max_concurrent: int,
                 nursery: trio.Nursery) -> None:
        self.conn, self.handler, self.ops, self.nursery = conn, handler, ops, nursery
        self.limit = trio.Semaphore(max_concurrent)
        self.running: dict[int, trio.CancelScope] = {}

    async def take(self, frame: dict[str, Any]) -> None:
        if frame["op"] == "cancel" and "cancel" in self.ops:
            target = frame["body"].get("id")  # one-way: no reply, whatever it names
            if isinstance(target, int) and target in self.running:
                self.running[target].cancel()
            return
        await self.limit.acquire()  # back-pressure: stop reading while the peer has too much in flight
        scope = self.running.setdefault(frame["id"], trio.CancelScope())  # before it starts: cancellable at once
        self.nursery.start_soon(self._run_one, frame, scope)

    async def _run_one(self, frame: dict[str, Any], scope: trio.CancelScope) -> None:
        request_id, sending, lock = frame["id"], False, self.conn._send_lock
        try:
            with scope:
                out = await _answer(self.handler, self.conn, frame, self.ops)
                await lock.acquire()  # replies queue here behind each other: cancellable while they wait
                sending = True
            if sending:
                try:
                    await self.conn.stream.send_all(out)
                finally:
                    lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.nursery.cancel_scope.cancel()  # the peer is gone: stop its other requests too
        finally:
            if self.running.get(request_id) is scope:
                del self.running[request_id]
            self.limit.release()


async def serve_peers(listeners: Sequence[trio.SocketListener], ssl_context: ssl.SSLContext, handler: Handler, *,
                      ops: Mapping[str, OpSpec] = OPS, max_concurrent: int = MAX_CONCURRENT_REQUESTS,
                      handshake_timeout: float = HANDSHAKE_TIMEOUT, gate: admission.Gate | None = None,
                      gate_whole_connection: bool = False, limits: FrameLimits = PEER_LIMITS,
                      lifetime: float = math.inf, on_link: Callable[[PeerConnection], None] | None = None,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve peer requests on ``listeners`` (from ``trio.open_tcp_listeners``) until cancelled.

    ``handler(peer_name, op, body)`` sees only ops in ``ops`` with bodies that passed their schema;
    ``hello`` is answered here. Reports the first listener's port via ``task_status.started``. A
    connection is admitted by ``gate`` (admission.py; by default the peer port's bounds and descriptor
    reserve) and counts there until its TLS handshake is done, or, with ``gate_whole_connection``, until it
    ends. Each lasts at most ``lifetime`` s. ``on_link(conn)`` gets each authenticated connection, over which
    requests can go back to its peer.
    """
    port = listeners[0].socket.getsockname()[1]
    gate = gate or admission.Gate(descriptors=admission.Descriptors())

    async def on_connection(tcp: trio.SocketStream) -> None:
        try:
            remote: Any = tcp.socket.getpeername()
        except OSError:
            remote = ("?", 0)
        scope = trio.CancelScope()
        try:
            ticket = gate.admit(remote[0], scope.cancel)
        except admission.Refused as e:
            if _refused_logged.first((remote[0], "gate")):
                log.warning("refused a connection on port %d from %s: %s (logged once per address)", port,
                            remote[0], e)
            await trio.aclose_forcefully(tcp)
            return
        watch_liveness(tcp)
        try:
            with scope, trio.move_on_after(lifetime):
                await serve_link(tcp, remote, ssl_context, handler, ops=ops, max_concurrent=max_concurrent,
                                 handshake_timeout=gate.handshake_timeout(handshake_timeout), limits=limits,
                                 on_link=on_link,
                                 authenticated=None if gate_whole_connection else partial(gate.release, ticket))
        except Exception:
            log.exception("peer connection task failed")  # one broken connection never stops the server
        finally:
            gate.release(ticket)
            await trio.aclose_forcefully(tcp)

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, on_connection, list(listeners), handler_nursery=nursery))
        task_status.started(port)


# ---- join ----------------------------------------------------------------------------------------


def join_handler(identity: trust.HostIdentity, clock: Callable[[], float] = time.time) -> Handler:
    """The handler for the inviter's join port (serve with ``join_server_ssl_context`` and ``ops=JOIN_OPS``)."""

    async def handle(_peer: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        if op == "join_ca":
            return {"ca": identity.ca_pem}
        try:
            # In a thread: it takes the invites flock, which the CLI may briefly hold.
            result = await trio.to_thread.run_sync(invites.accept_join, identity, body, clock())
        except invites.InviteError as e:
            raise PeerError("invite", str(e)) from e
        log.info("host %r joined the swarm", body["name"])
        return result

    return handle


async def serve_join(listeners: Sequence[trio.SocketListener], identity: trust.HostIdentity, *,
                     clock: Callable[[], float] = time.time,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """The inviter's join listener: no client certificates, only the join ops, few connections, briefly."""
    gate = admission.Gate(JOIN_MAX_CONNECTIONS, JOIN_MAX_PER_SOURCE, admission.Descriptors())
    await serve_peers(listeners, trust.join_server_ssl_context(identity), join_handler(identity, clock),
                      ops=JOIN_OPS, gate=gate, gate_whole_connection=True, limits=JOIN_LIMITS,
                      lifetime=JOIN_CONNECTION_SECONDS, task_status=task_status)


async def join_swarm(home: Path, token: str, name: str, *,
                     connect_timeout: float = CONNECT_TIMEOUT) -> trust.HostIdentity:
    """The joiner's side: try the token's addresses in turn, pin the inviter to the token, get a cert.

    The secret proof is sent only after the server's TLS certificate is shown to be signed by the CA the
    token names, so a machine impersonating the inviter learns neither the proof nor the swarm secret.
    """
    invite = invites.parse_invite(token)
    if trust.has_identity(home):
        raise trust.TrustError(f"{trust.trust_dir(home)} already holds a host identity; refusing to overwrite it")
    key = trust.new_host_key()
    request = invites.make_join_request(invite, key, name)
    failures = []
    for address in invite.addresses:
        try:
            host, port = parse_hostport(address)
            async with open_peer(host, port + JOIN_PORT_OFFSET, trust.join_client_ssl_context(),
                                 connect_timeout=connect_timeout, ops=JOIN_OPS, limits=JOIN_LIMITS) as conn:
                ca = invites.check_ca((await conn.request("join_ca", {}, connect_timeout))["ca"], invite.ca_fingerprint)
                trust.verify_host_cert(conn.peer_cert_der, ca)
                reply = await conn.request("join", request, connect_timeout)
        except (PeerError, HomeError, KeyError, TypeError) as e:
            if isinstance(e, PeerError) and e.code == "invite":
                raise invites.InviteError(e.message) from e
            failures.append(f"{address}: {e}")
            continue
        except trust.TrustError as e:
            failures.append(f"{address}: {e}")
            continue
        return invites.finish_join(home, invite, key, name, reply)
    raise trust.TrustError("could not join through any address in the invite:\n  " + "\n  ".join(failures))
