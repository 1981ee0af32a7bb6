"""Relayed links: two members that cannot connect to each other (both behind NAT) talk through a third
that both reach, as Syncthing's relays and Tailscale's DERP do, and the relay can neither read nor act.

A relay only carries bytes. The two ends run the ordinary peer protocol over them, inside their own TLS
1.3 session with their own certificates (``peer_transport.open_peer_over`` / ``serve_link``), so the
relay sees ciphertext, cannot alter a byte unnoticed, and cannot speak for either end. Ops:

* ``relay_open {to}`` (end A -> relay R): R asks ``to`` (B) over its own link to accept; answers an id.
* ``relay_accept {from, id}`` (R -> B): B opens its end and serves A's TLS session on it.
* ``relay_send {id, seq, data}`` (an end -> R) and ``relay_deliver {id, seq, data}`` (R -> the other
  end): one chunk each, acknowledged only once delivered, so a slow end slows the sender; up to
  WINDOW_CHUNKS travel at once (R passes them on concurrently; the receiving end puts them back in
  ``seq`` order); empty ``data`` ends the pipe.

R carries at most MAX_PIPES pipes, MAX_PIPES_PER_HOST of them with any one member at an end (a stolen
machine cannot take the relay from the rest), paced by one token bucket at its owner's ``relay_rate``
(config.toml) that members share fairly: each sender waits on the bucket with one chunk at a time, so
a member with many chunks in flight takes its turn with the others instead of queueing them all ahead.
An end takes at most MAX_ENDS_PER_RELAY pipes from any one relay (the caller of ``relay_accept``, by its
certificate; the body's ``from`` is only checked later, in the relayed TLS handshake), so a member
posing as a relay cannot fill the ends every other relay needs. A pipe whose ends vanished silently is
dropped once it has carried nothing for PIPE_IDLE_SECONDS and its room is needed; an end still there
finds out at its next chunk and reconnects.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from p2pvbd.base.home import NAME_RE, HomeError
from p2pvbd.base.pacing import TokenBucket
from p2pvbd.base.units import parse_size
from p2pvbd.swarm.access import PeerOp, member
from p2pvbd.swarm.peer_transport import PeerConnection, PeerError

if TYPE_CHECKING:
    from p2pvbd.base.home import Config
    from p2pvbd.swarm.revoked import RevocationBook


class RelayHost(Protocol):
    """What relaying needs of the node: its name and settings, links to hosts, and serving a relayed session."""

    name: str
    config: Config
    revoked: RevocationBook

    async def connect(self, peer: str, *, relay: bool = True) -> PeerConnection: ...

    def serve_relayed(self, stream: Any, source: str, relay: str, on_end: Callable[[], object]) -> None: ...

log = logging.getLogger(__name__)

# One relay_send carries at most this: a TLS record is 16 KiB, so a chunk holds 16 of them and one
# request's framing is noise; small enough that a chunk crosses a DSL uplink (1 Mbit/s) in 2 s.
CHUNK_BYTES = 256 * 1024
# Chunks queued at an end before its reader takes them (back-pressure beyond that: the relay's
# relay_deliver waits, and with it the sender's relay_send).
QUEUED_CHUNKS = 16
# Chunks in flight at once per direction: a chunk's round trip crosses two links twice, so one at a time
# carries a chunk per round trip (a third of a 100 Mbit/s link: bench/paths.py); 8 x 256 KiB keeps
# 2 MiB in flight, a 100 Mbit/s link's worth for 160 ms. Within a relay's per-link request bound (16).
WINDOW_CHUNKS = 8
# Chunks that may arrive ahead of the next one in order (the window of the sender, with room).
MAX_EARLY_CHUNKS = 2 * WINDOW_CHUNKS
# Pipes one relay carries: each is a pair of one person's machines, with headroom.
MAX_PIPES = 64
# Pipes with one member at an end: one per other machine it cannot reach directly (a person has a
# handful), with room for a reconnect while the old pipe is not yet known dead.
MAX_PIPES_PER_HOST = 8
# Relayed ends one host holds for any one relay (the caller of relay_accept, by its certificate): half of
# the room, so a member posing as a relay leaves the other half to the rest. An honest relay carries at
# most MAX_PIPES_PER_HOST pipes from each member: this is four members' worth to one host.
MAX_ENDS_PER_RELAY = MAX_PIPES // 2
# A pipe that carried nothing this long may be dropped for a new one: a link's liveness hello
# (swarm/node.QUIET_LINK_SECONDS) crosses it whenever it is used after 5 s of quiet, so a pipe silent
# for a minute is one nobody used for a minute (or whose ends are gone).
PIPE_IDLE_SECONDS = 60.0
# A chunk's round trip through the relay, both links; a slow DSL link with a full chunk takes seconds.
CHUNK_TIMEOUT = 60.0
# The relay's upload for others, bytes/s, unless its owner sets ``relay_rate`` in config.toml ("12M":
# 12 MiB/s, about a 100 Mbit/s link; "0": relay nothing).
DEFAULT_RELAY_RATE = "12M"


class RelayStream(trio.abc.Stream):
    """One end of a relayed pipe, as a byte stream for TLS: sends go to the relay as ``relay_send``
    requests over ``link``; what the relay delivers is read here."""

    def __init__(self, link: PeerConnection, pipe: int) -> None:
        self.link, self.pipe = link, pipe
        self._in, self._out = trio.open_memory_channel[bytes](QUEUED_CHUNKS)
        self._pending = b""
        self._send_lock = trio.Lock()
        self._closed = False
        self._next_send = 0  # seq of the next chunk sent
        self._next_in = 0  # seq of the next chunk to hand to the reader
        self._early: dict[int, bytes] = {}  # chunks that arrived before one sent earlier
        self._in_order = trio.Lock()
        self._queue_out, self._queue_in = trio.open_memory_channel[tuple[int, bytes]](WINDOW_CHUNKS)
        self._broken = ""

    async def deliver(self, seq: int, data: bytes) -> None:
        """A chunk the relay brought, put back in order (empty data: the other end closed)."""
        if not self._next_in <= seq < self._next_in + MAX_EARLY_CHUNKS or seq in self._early:
            raise PeerError("bad_request", f"chunk {seq} is outside the window at {self._next_in}")
        self._early[seq] = data
        async with self._in_order:
            while (chunk := self._early.pop(self._next_in, None)) is not None:
                self._next_in += 1
                if not chunk:
                    self._in.close()
                    return
                try:
                    await self._in.send(chunk)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return  # this end closed: nobody reads it

    async def pump(self) -> None:
        """Send what ``send_all`` queued, up to WINDOW_CHUNKS chunks in flight, until the stream closes:
        run by whoever holds the link (a write returns once queued, so consecutive small writes, one per
        reply, still fill the window). A chunk the relay refuses breaks the stream."""
        window = trio.Semaphore(WINDOW_CHUNKS)

        async def one(seq: int, chunk: bytes) -> None:
            try:
                await self.link.request("relay_send", {"id": self.pipe, "seq": seq, "data": chunk},
                                        timeout=CHUNK_TIMEOUT)
            except PeerError as e:
                self._broken = f"relay: {e.message}"
                self._in.close()
                self._queue_out.close()
            finally:
                window.release()

        async with trio.open_nursery() as nursery:
            async for seq, chunk in self._queue_in:
                await window.acquire()
                nursery.start_soon(one, seq, chunk)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("relayed stream closed")
        async with self._send_lock:
            view = memoryview(data)
            for at in range(0, len(view), CHUNK_BYTES):
                try:
                    await self._queue_out.send((self._next_send, bytes(view[at:at + CHUNK_BYTES])))
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    raise trio.BrokenResourceError(self._broken or "relayed stream closed") from None
                self._next_send += 1

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                self._pending = await self._out.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
        n = len(self._pending) if max_bytes is None else max_bytes
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.close()
        self._queue_out.close()
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            try:
                await self.link.request("relay_send", {"id": self.pipe, "seq": self._next_send, "data": b""},
                                        timeout=1.0)
            except PeerError:
                pass


@dataclass
class _Pipe:
    a: str  # the end that opened it
    b: str
    used: float  # monotonic time of its last chunk

    def idle(self, now: float) -> bool:
        return now - self.used > PIPE_IDLE_SECONDS


class Relays:
    """This host as a relay for others, and as an end of relayed links."""

    def __init__(self, swarm: RelayHost) -> None:
        self.swarm = swarm
        self.pipes: dict[int, _Pipe] = {}
        self.ends: dict[tuple[str, int], RelayStream] = {}
        self._ids = itertools.count(1)
        setting = str(swarm.config.extra.get("relay_rate", DEFAULT_RELAY_RATE))
        try:
            self.rate = float(parse_size(setting))
        except ValueError as e:
            raise HomeError(f"relay_rate in config.toml: {e} (bytes per second, e.g. 12M)") from None
        self._bucket: TokenBucket | None = None  # made on first use: it reads trio's clock
        self._turns: dict[str, trio.Lock] = {}  # per sending member: one chunk of its at a time on the bucket

    @property
    def bucket(self) -> TokenBucket:
        if self._bucket is None:
            self._bucket = TokenBucket(self.rate if self.rate > 0 else math.inf)
        return self._bucket

    def ops(self) -> list[PeerOp]:
        return [PeerOp("relay_open", member, self._open), PeerOp("relay_accept", member, self._accept),
                PeerOp("relay_send", member, self._send), PeerOp("relay_deliver", member, self._deliver)]

    # ---- as the relay ---------------------------------------------------------------------------------
    async def _open(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        to = body["to"]
        if not (isinstance(to, str) and NAME_RE.fullmatch(to)) or to in (peer, self.swarm.name):
            raise PeerError("bad_request", "relay_open names another host")
        if self.rate <= 0:
            raise PeerError("no_relay", f"{self.swarm.name} relays nothing (relay_rate = 0)")
        self._room_for(peer)
        link = await self.swarm.connect(to, relay=False)
        pipe = next(self._ids)
        self.pipes[pipe] = _Pipe(peer, to, time.monotonic())
        try:
            await link.request("relay_accept", {"from": peer, "id": pipe}, timeout=CHUNK_TIMEOUT)
        except PeerError:
            del self.pipes[pipe]
            raise
        log.info("relaying %s <-> %s (pipe %d)", peer, to, pipe)
        return {"id": pipe}

    def _room_for(self, peer: str) -> None:
        """Make room for a pipe of ``peer``'s, dropping idle pipes if full; PeerError busy if none is."""
        now = time.monotonic()
        def held() -> int:
            return sum(peer in (p.a, p.b) for p in self.pipes.values())
        if len(self.pipes) < MAX_PIPES and held() < MAX_PIPES_PER_HOST:
            return
        for pipe_id, p in list(self.pipes.items()):
            if p.idle(now):
                log.info("dropping relayed pipe %d (%s <-> %s): idle", pipe_id, p.a, p.b)
                del self.pipes[pipe_id]
        if len(self.pipes) >= MAX_PIPES:
            raise PeerError("busy", f"{self.swarm.name} relays {MAX_PIPES} pipes already")
        if held() >= MAX_PIPES_PER_HOST:
            raise PeerError("busy", f"{self.swarm.name} relays {MAX_PIPES_PER_HOST} pipes of {peer}'s already")

    async def _send(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        pipe_id, data, seq = body["id"], body["data"], body["seq"]
        pipe = self.pipes.get(pipe_id) if isinstance(pipe_id, int) else None
        if pipe is None or peer not in (pipe.a, pipe.b) or not isinstance(data, bytes) or len(data) > CHUNK_BYTES:
            raise PeerError("no_pipe", f"{self.swarm.name} relays no such pipe for {peer}")
        other = pipe.b if peer == pipe.a else pipe.a
        pipe.used = time.monotonic()
        await self._pace(peer, len(data))
        try:
            link = await self.swarm.connect(other, relay=False)
            await link.request("relay_deliver", {"id": pipe_id, "seq": seq, "data": data}, timeout=CHUNK_TIMEOUT)
        except PeerError:
            self.pipes.pop(pipe_id, None)
            raise
        if not data:
            self.pipes.pop(pipe_id, None)
        return {}

    async def _pace(self, peer: str, n: int) -> None:
        """Take ``n`` bytes of ``peer``'s from the relay's bucket, one chunk per member at a time: the
        bucket's debt holds at most a chunk per sending member, so each waits a round of the others'
        chunks, never another member's whole backlog."""
        turn = self._turns.setdefault(peer, trio.Lock())
        try:
            async with turn:
                await self.bucket.take(n)
        finally:
            stats = turn.statistics()
            if not stats.locked and not stats.tasks_waiting and self._turns.get(peer) is turn:
                del self._turns[peer]

    # ---- as an end ------------------------------------------------------------------------------------
    async def _accept(self, relay: str, body: dict[str, Any]) -> dict[str, Any]:
        """B's side: serve the TLS session of ``from`` that ``relay`` carries (its certificate, checked in
        the handshake, must name ``from``: the relay cannot introduce anyone else)."""
        source, pipe = body["from"], body["id"]
        if not (isinstance(source, str) and NAME_RE.fullmatch(source) and isinstance(pipe, int)):
            raise PeerError("bad_request", "relay_accept names a host and a pipe id")
        if self.swarm.revoked.revokes(source):
            raise PeerError("revoked", f"{source} was revoked from this swarm")
        # Any member may ask this (as a relay would): each end costs a task until its handshake times out,
        # so they are bounded like a relay's pipes, per relay (the caller, named by its certificate) as a
        # relay bounds them per member, and one pipe id of a relay names one end.
        if (relay, pipe) in self.ends:
            raise PeerError("busy", f"{self.swarm.name} holds that relayed end of {relay}'s already")
        if sum(r == relay for r, _ in self.ends) >= MAX_ENDS_PER_RELAY:
            raise PeerError("busy", f"{self.swarm.name} holds {MAX_ENDS_PER_RELAY} relayed ends of {relay}'s already")
        if len(self.ends) >= MAX_PIPES:
            raise PeerError("busy", f"{self.swarm.name} holds {len(self.ends)} relayed ends already")
        stream = RelayStream(await self.swarm.connect(relay, relay=False), pipe)
        self.ends[(relay, pipe)] = stream
        self.swarm.serve_relayed(stream, source, relay, lambda: self.ends.pop((relay, pipe), None))
        return {}

    async def _deliver(self, relay: str, body: dict[str, Any]) -> dict[str, Any]:
        stream = self.ends.get((relay, body["id"]))
        if stream is None:
            raise PeerError("no_pipe", f"{self.swarm.name} holds no end of that pipe from {relay}")
        await stream.deliver(body["seq"], body["data"])
        return {}

    async def open_end(self, relay: str, to: str) -> RelayStream:
        """A's side: a pipe to ``to`` through ``relay``."""
        link = await self.swarm.connect(relay, relay=False)
        reply = await link.request("relay_open", {"to": to}, timeout=CHUNK_TIMEOUT)
        pipe = reply.get("id")
        if not isinstance(pipe, int):
            raise PeerError("bad_reply", f"{relay} answered relay_open without a pipe id")
        stream = self.ends[(relay, pipe)] = RelayStream(link, pipe)
        return stream

    def forget(self, relay: str, pipe: int) -> None:
        self.ends.pop((relay, pipe), None)
