"""The host's NBD server: the guest-facing side of the write-interception hook.

Speaks the protocol through the pure codec in :mod:`p2pvbd.wire.nbd_codec` and applies every command
through :class:`~p2pvbd.kernel_hook_ctl.HookController`. One task per connection reads and parses
requests; cheap commands are applied inline and their replies batched into one send (a list of buffers
handed to one sendmsg(), so READ data is never copied in Python; receives and sends that need no waiting
bypass trio's scheduler, with a checkpoint every few receives), while commands
that wait for the disk (FLUSH, FUA writes, writes into an area the activity log must first make active)
or for a gate (frozen or incoming exports) run as their own tasks, so their replies may overtake or be
overtaken by others (out-of-order replies, as the spec allows). A FLUSH covers every write answered before
it arrived: those were applied to the store, whose flush syncs everything applied before it.

The Unix socket speaks plain NBD (only its owner may connect). The TCP listener is in the spec's FORCEDTLS mode:
nothing but STARTTLS gets an answer before a TLS handshake in which the client presents a certificate of this
host's NBD CA (see :mod:`p2pvbd.nbd.tls`); the handshake then continues inside TLS.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2pvbd.base.home import HomeError, format_hostport
from p2pvbd.base.sockets import remove_socket, unix_listener
from p2pvbd.kernel_hook_ctl import ExportMode, HookController, HookError
from p2pvbd.wire import nbd_codec as nbd

log = logging.getLogger(__name__)

# One receive covers a pipelined burst of 4 KiB requests or a quarter of a 1 MiB write.
RECV_BYTES = 256 * 1024
# READ data batched before a send: the client consumes one reply while the next is read from the store.
SEND_BATCH_BYTES = 1024 * 1024
# Send buffer of Unix-socket connections (the kernel caps it at net.core.wmem_max): one sendmsg() then
# takes a 1 MiB READ reply instead of ~200 KiB per writable wakeup. TCP sockets keep the kernel's
# autotuning, which setting SO_SNDBUF would switch off.
UNIX_SNDBUF = 4 * 1024 * 1024
# Buffers per sendmsg() call (Linux's IOV_MAX).
IOV_MAX = 1024
# Receives and sends that complete at once skip trio's scheduler (each trip through it costs an
# epoll_wait() and Python bookkeeping, five times per 1 MiB WRITE); every this-many receives one goes
# through trio anyway, so the other tasks and cancellation get their turn.
FAST_RECEIVES_PER_CHECKPOINT = 16
# Plain WRITEs received together that go to the store as one batch (one journal append for all): a
# 256 KiB receive holds at most 63 4 KiB writes; a cap keeps the store's lock held briefly either way.
WRITE_BATCH = 64
# Requests one connection may have running as separate tasks (FLUSH, FUA, held writes, writes waiting for
# an area's activation) before the reader stops reading: backpressure instead of unbounded memory. Linux's
# nbd driver queues 128.
MAX_TASKS_PER_CONNECTION = 128
# How many connections wait in the kernel's accept queue.
LISTEN_BACKLOG = 128
# Time a TCP client has from connecting to a finished TLS handshake (a few round trips: milliseconds on a LAN).
# Until then nothing says who it is, so a client that stalls, or never starts TLS, gives its slot back after this.
TLS_SETUP_SECONDS = 10.0
# TCP connections served at once; more are closed on arrival. qemu opens one per drive, nbdcopy up to 4 per
# side, Linux's nbd driver one per queue: 64 leaves room for all of them, and bounds what unauthenticated
# clients can hold (each for TLS_SETUP_SECONDS at most).
MAX_TCP_CONNECTIONS = 64
# Sending TLS's close_notify at the end waits at most this long for a client that stopped reading.
TLS_CLOSE_SECONDS = 1.0
# Advertised block size constraints (NBD_INFO_BLOCK_SIZE): any byte granularity works, 4 KiB is
# what the store handles best, and the maximum is the request cap.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
# The only metadata context we serve; its id is what BLOCK_STATUS replies carry.
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
BASE_NAMESPACE = "base:"  # the query naming the whole base namespace (proto.md, "The base: metadata namespace")

# What a writable export offers (proto.md, "Transmission flags"): the same set as qemu-nbd without DF.
# FAST_ZERO: zeroing whole blocks is metadata and a hole punch; any other zeroing is refused with ENOTSUP
# when asked to be fast. CACHE: accepted and checked, with no effect (the spec allows that).
# CAN_MULTI_CONN promises that a FLUSH on one connection covers the writes answered on every other: all
# connections to an export apply their writes to the same ReplicaStore (one per disk, HookController),
# a write is answered only after its record is appended and its data written to the shared data file, and
# the store's flush fdatasyncs that file and then vouches (SYNC) for every record appended before it began,
# whichever connection appended it. Connections forwarded after a switchover flush at the new owner,
# where their writes went.
TRANSMISSION_FLAGS = (
    nbd.NBD_FLAG_HAS_FLAGS
    | nbd.NBD_FLAG_SEND_FLUSH
    | nbd.NBD_FLAG_SEND_FUA
    | nbd.NBD_FLAG_SEND_TRIM
    | nbd.NBD_FLAG_SEND_WRITE_ZEROES
    | nbd.NBD_FLAG_CAN_MULTI_CONN
    | nbd.NBD_FLAG_SEND_CACHE
    | nbd.NBD_FLAG_SEND_FAST_ZERO
)
# What an export that refuses writes (a standby replica) offers: READ_ONLY and no write command but FLUSH,
# as qemu-nbd -r does. The spec ties FAST_ZERO to WRITE_ZEROES: one goes with the other.
READ_ONLY_FLAGS = (TRANSMISSION_FLAGS | nbd.NBD_FLAG_READ_ONLY) & ~(
    nbd.NBD_FLAG_SEND_TRIM | nbd.NBD_FLAG_SEND_WRITE_ZEROES | nbd.NBD_FLAG_SEND_FAST_ZERO)

# Command flags each command accepts (proto.md, "Command flags"); anything else is EINVAL ("Error values":
# SHOULD for a flag "not explicitly documented as applicable to the given request"). FUA "is valid for
# all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST accept all
# commands with this bit set": we always offer SEND_FUA. A CACHE the server advertises MUST reject the
# flags it does not know. FAST_ZERO counts only on a connection that was offered SEND_FAST_ZERO.
_ALLOWED_FLAGS = {
    nbd.NBD_CMD_READ: nbd.NBD_CMD_FLAG_FUA,
    nbd.NBD_CMD_WRITE: nbd.NBD_CMD_FLAG_FUA,
    nbd.NBD_CMD_FLUSH: nbd.NBD_CMD_FLAG_FUA,
    nbd.NBD_CMD_TRIM: nbd.NBD_CMD_FLAG_FUA,
    nbd.NBD_CMD_CACHE: nbd.NBD_CMD_FLAG_FUA,
    nbd.NBD_CMD_WRITE_ZEROES: nbd.NBD_CMD_FLAG_FUA | nbd.NBD_CMD_FLAG_NO_HOLE | nbd.NBD_CMD_FLAG_FAST_ZERO,
    nbd.NBD_CMD_BLOCK_STATUS: nbd.NBD_CMD_FLAG_FUA | nbd.NBD_CMD_FLAG_REQ_ONE,
}
# Commands that write: a READ_ONLY connection answers them EPERM, and only their FUA waits for the disk.
_WRITES = frozenset({nbd.NBD_CMD_WRITE, nbd.NBD_CMD_WRITE_ZEROES, nbd.NBD_CMD_TRIM})


def export_flags(mode: ExportMode) -> int:
    """Transmission flags for an export in ``mode``: a standby replica refuses writes, so it says read-only;
    an incoming export holds writes until ownership arrives, so it does not."""
    return READ_ONLY_FLAGS if mode is ExportMode.STANDBY else TRANSMISSION_FLAGS


def allowed_flags(command: int, transmission_flags: int) -> int:
    """The command flags ``command`` accepts on a connection that was offered ``transmission_flags``."""
    allowed = _ALLOWED_FLAGS.get(command, 0)
    if not transmission_flags & nbd.NBD_FLAG_SEND_FAST_ZERO:
        allowed &= ~nbd.NBD_CMD_FLAG_FAST_ZERO  # spec: "SHOULD fail with NBD_EINVAL" when not offered
    return allowed


# A whole reply: one buffer, or a READ's header and data (sent together, never copied into one).
_Reply = bytes | tuple[bytes, bytes]


def _advance(views: list[bytes | memoryview], i: int, sent: int) -> int:
    """Drop ``sent`` bytes from ``views[i:]``; return the index of the first buffer not sent whole."""
    while i < len(views) and sent >= len(views[i]):
        sent -= len(views[i])
        i += 1
    if sent:  # a partial send: resume inside this buffer
        views[i] = memoryview(views[i])[sent:]
    return i


async def _sendmsg_all(sock: trio.socket.SocketType, views: list[bytes | memoryview], i: int = 0) -> None:
    """Send every byte of ``views[i:]``, in order, with as few sendmsg() calls as the kernel allows."""
    n = len(views)
    while i < n:
        i = _advance(views, i, await sock.sendmsg(views[i:i + IOV_MAX] if i or n > IOV_MAX else views))


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """What trio's SocketStream raises for the same socket error."""
    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class _Disconnect(Exception):
    """End the connection cleanly (ABORT, EXPORT_NAME of an unknown export, a failed TLS handshake)."""


class NbdListenError(HomeError):
    """The NBD TCP address cannot be listened on (in use, not an address of this machine)."""


@dataclass(frozen=True)
class TcpEndpoint:
    """Where NBD is served over TCP, and the TLS (with client certificates) every client there goes through."""

    host: str
    port: int
    ssl_context: ssl.SSLContext


class NbdConnection:
    """One client, from greeting to disconnect. With ``tls`` set, TLS is forced before any other option."""

    def __init__(self, stream: trio.abc.Stream, ctl: HookController, tls: ssl.SSLContext | None = None,
                 peer: str = "") -> None:
        self.stream = stream
        self.ctl = ctl
        self.tls = tls
        self.tls_active = False
        self.peer = peer or "on the Unix socket"
        self._setup: trio.CancelScope | None = None  # bounds the time before TLS runs
        self.structured = False
        self.meta_export: str | None = None  # export for which base:allocation was negotiated
        self.transmission_flags = TRANSMISSION_FLAGS  # as sent at GO / EXPORT_NAME: they bind this connection
        self.client = 0  # this connection's id at the controller, once in transmission
        self.pid: int | None = None  # the client's process, on the Unix socket (SO_PEERCRED)
        self.send_lock = trio.Lock()
        self.tasks = trio.Semaphore(MAX_TASKS_PER_CONNECTION)
        # Replies go out with sendmsg() on the socket itself when there is one (scatter-gather).
        self._sock: trio.socket.SocketType | None = None
        self._fd = -1  # the socket's descriptor, for receives and sends that need no waiting
        self._fast_receives = 0
        self._gathered: list[bytes] = []  # replies of tasks waiting for one send (_send_gathered)
        self._gathering = False
        if isinstance(stream, trio.SocketStream) and hasattr(stream.socket, "sendmsg"):
            self._sock = stream.socket
            self._fd = stream.socket.fileno()
            if stream.socket.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
                with contextlib.suppress(OSError):
                    cred = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    self.pid = struct.unpack("3i", cred)[0]

    async def run(self) -> None:
        chosen: tuple[str, bytes] | None = None
        deadline = trio.current_time() + TLS_SETUP_SECONDS if self.tls is not None else math.inf
        with trio.CancelScope(deadline=deadline) as self._setup:
            await self.stream.send_all(nbd.server_greeting())
            try:
                chosen = await self._handshake()
            except _Disconnect:
                return
        if chosen is None:
            log.warning("NBD client %s did not complete TLS within %.0f s; closed", self.peer, TLS_SETUP_SECONDS)
            return
        await self._transmission(*chosen)

    # ---- handshake -----------------------------------------------------------------------------
    async def _handshake(self) -> tuple[str, bytes]:
        parser = nbd.HandshakeParser()
        no_zeroes = False
        while True:
            ev = parser.next_event()
            if ev is nbd.NeedData:
                data = await self.stream.receive_some(RECV_BYTES)
                if not data:
                    raise _Disconnect
                parser.feed(data)
                continue
            if isinstance(ev, nbd.ClientFlags):
                no_zeroes = bool(ev.flags & nbd.NBD_FLAG_C_NO_ZEROES)
                continue
            assert isinstance(ev, nbd.OptionRequest)
            step, reply = nbd.tls_step(ev.option, ev.data, forced=self.tls is not None, active=self.tls_active)
            if step is nbd.TlsStep.HANG_UP:
                log.info("NBD client %s asked for an export before TLS; closed", self.peer)
                raise _Disconnect
            if step is nbd.TlsStep.START and parser.leftover():
                # Bytes sent before the handshake must not count as sent inside TLS (a man in the middle could
                # inject them): the client had to wait for the ACK.
                raise nbd.ProtocolError("plaintext sent after NBD_OPT_STARTTLS")
            if step is not nbd.TlsStep.SERVE:
                await self.stream.send_all(reply)
                if step is nbd.TlsStep.START:
                    await self._start_tls()
                continue
            chosen = await self._option(ev, no_zeroes)
            if chosen is not None:
                return chosen, parser.leftover()

    async def _start_tls(self) -> None:
        """The TLS handshake after STARTTLS's ACK, on the same connection; option haggling goes on inside it."""
        assert self.tls is not None and self._setup is not None
        stream = trio.SSLStream(self.stream, self.tls, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            log.warning("NBD client %s refused: TLS handshake failed: %s", self.peer, e.__cause__ or e)
            raise _Disconnect from e
        self.stream = stream
        self._sock, self._fd = None, -1  # every byte now goes through TLS, never straight to the socket
        self.tls_active = True
        # The spec: after STARTTLS "the server MUST NOT preserve any negotiation state" from before.
        self.structured, self.meta_export = False, None
        self._setup.deadline = math.inf  # authenticated: no more hurry than on the Unix socket
        log.info("NBD client %r connected over TLS from %s", _client_name(stream), self.peer)

    async def _option(self, ev: nbd.OptionRequest, no_zeroes: bool) -> str | None:
        opt, send = ev.option, self.stream.send_all
        if opt == nbd.NBD_OPT_EXPORT_NAME:
            try:
                exp = self._lookup(nbd.parse_export_name(ev.data))
            except nbd.OptionPayloadError:
                exp = None
            if exp is None:
                raise _Disconnect  # the spec's only answer to an unknown EXPORT_NAME
            self.transmission_flags = self._flags(exp)
            await send(nbd.export_name_reply(exp.store.size, self.transmission_flags, no_zeroes))
            return exp.name
        if opt == nbd.NBD_OPT_ABORT:
            await send(nbd.option_reply(opt, nbd.NBD_REP_ACK))
            raise _Disconnect
        if opt == nbd.NBD_OPT_LIST:
            if ev.data:
                await send(nbd.option_error(opt, nbd.NBD_REP_ERR_INVALID, "LIST takes no data"))
                return None
            await send(b"".join(nbd.rep_server(opt, n) for n in self.ctl.names()) + nbd.option_reply(
                opt, nbd.NBD_REP_ACK))
            return None
        if opt == nbd.NBD_OPT_STRUCTURED_REPLY:
            if ev.data:
                await send(nbd.option_error(opt, nbd.NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data"))
                return None
            self.structured = True
            await send(nbd.option_reply(opt, nbd.NBD_REP_ACK))
            return None
        if opt in (nbd.NBD_OPT_INFO, nbd.NBD_OPT_GO):
            return await self._info_or_go(ev)
        if opt in (nbd.NBD_OPT_SET_META_CONTEXT, nbd.NBD_OPT_LIST_META_CONTEXT):
            await self._meta_context(ev)
            return None
        await send(nbd.option_error(opt, nbd.NBD_REP_ERR_UNSUP, f"option {opt} is not supported"))
        return None

    def _flags(self, exp: Any) -> int:
        """A forwarded client writes through the owner, so a standby export is not read-only to it."""
        return TRANSMISSION_FLAGS if self.ctl.forwards(exp.name, self.pid) else export_flags(exp.mode)

    def _lookup(self, name: str) -> Any:
        exp = self.ctl.get(name)
        if exp is None and name == "" and len(self.ctl.names()) == 1:
            exp = self.ctl.get(self.ctl.names()[0])  # the default export, when unambiguous
        return exp

    async def _info_or_go(self, ev: nbd.OptionRequest) -> str | None:
        opt = ev.option
        try:
            req = nbd.parse_info_request(ev.data)
        except nbd.OptionPayloadError as e:
            await self.stream.send_all(nbd.option_error(opt, nbd.NBD_REP_ERR_INVALID, str(e)))
            return None
        exp = self._lookup(req.name)
        if exp is None:
            await self.stream.send_all(nbd.option_error(opt, nbd.NBD_REP_ERR_UNKNOWN, f"no export {req.name!r}"))
            return None
        flags = self._flags(exp)
        out = [nbd.info_export(opt, exp.store.size, flags)]
        if nbd.NBD_INFO_NAME in req.info_types:
            out.append(nbd.info_name(opt, exp.name))
        # Always sent: it tells clients (qemu, nbdcopy) the best request sizes.
        out.append(nbd.info_block_size(opt, MIN_BLOCK, PREFERRED_BLOCK, nbd.MAX_PAYLOAD))
        out.append(nbd.option_reply(opt, nbd.NBD_REP_ACK))
        await self.stream.send_all(b"".join(out))
        if opt == nbd.NBD_OPT_GO:
            self.transmission_flags = flags
            if self.meta_export is not None and self.meta_export != exp.name:
                self.meta_export = None
            return exp.name
        return None

    async def _meta_context(self, ev: nbd.OptionRequest) -> None:
        opt = ev.option
        if opt == nbd.NBD_OPT_SET_META_CONTEXT:
            # SET "replaces all previously-set metadata contexts (including when this command fails)": nothing
            # stays selected unless this one succeeds and selects.
            self.meta_export = None
        try:
            req = nbd.parse_meta_context_request(ev.data)
        except nbd.OptionPayloadError as e:
            await self.stream.send_all(nbd.option_error(opt, e.reply_type, str(e)))
            return
        if opt == nbd.NBD_OPT_SET_META_CONTEXT and not self.structured:
            await self.stream.send_all(
                nbd.option_error(opt, nbd.NBD_REP_ERR_INVALID, "negotiate structured replies first"))
            return
        exp = self._lookup(req.export_name)
        if exp is None:
            await self.stream.send_all(
                nbd.option_error(opt, nbd.NBD_REP_ERR_UNKNOWN, f"no export {req.export_name!r}"))
            return
        out = []
        if opt == nbd.NBD_OPT_LIST_META_CONTEXT:
            # No query lists every context; "base:" MUST work as a wildcard for the base namespace. The ID
            # in LIST replies "is reserved and SHOULD be set to zero".
            if not req.queries or any(q in (BASE_ALLOCATION, BASE_NAMESPACE) for q in req.queries):
                out.append(nbd.rep_meta_context(opt, 0, BASE_ALLOCATION))
        elif BASE_ALLOCATION in req.queries:  # the bare "base:" MUST be ignored by SET: it selects nothing
            out.append(nbd.rep_meta_context(opt, BASE_ALLOCATION_ID, BASE_ALLOCATION))
            self.meta_export = exp.name
        out.append(nbd.option_reply(opt, nbd.NBD_REP_ACK))
        await self.stream.send_all(b"".join(out))

    # ---- transmission --------------------------------------------------------------------------
    async def _transmission(self, export: str, leftover: bytes) -> None:
        parser = nbd.RequestParser()
        size = self.ctl.get(export).store.size  # type: ignore[union-attr]
        if leftover:
            parser.feed(leftover)
        self.client = self.ctl.connect(export, self.pid)
        try:
            await self._serve_requests(export, size, parser)
        finally:
            self.ctl.disconnect(export, self.client)

    async def _serve_requests(self, export: str, size: int, parser: nbd.RequestParser) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                out: list[bytes] = []  # whole replies, in the order they were produced
                batched = 0  # READ bytes in out
                writes: list[nbd.Request] = []  # plain writes received together, applied together
                disconnect = False
                while (req := parser.next_request()) is not None:
                    if self._plain_write(export, size, req):
                        writes.append(req)
                        if len(writes) >= WRITE_BATCH:
                            out += await self._write_batch(export, writes)
                            writes = []
                        continue
                    if writes:  # applied before what follows them (a READ sees them, a FLUSH covers them)
                        out += await self._write_batch(export, writes)
                        writes = []
                    if req.type == nbd.NBD_CMD_DISC:
                        disconnect = True
                        break
                    if self._needs_task(export, req):
                        if out:
                            await self._send(out)
                            out, batched = [], 0
                        await self.tasks.acquire()
                        nursery.start_soon(self._run_task, export, size, req)
                        continue
                    reply = await self._execute(export, size, req)
                    if isinstance(reply, tuple):
                        out += reply
                        batched += req.length
                        if batched >= SEND_BATCH_BYTES:
                            await self._send(out)
                            out, batched = [], 0
                    else:
                        out.append(reply)
                if writes:
                    out += await self._write_batch(export, writes)
                if out:
                    await self._send(out)
                if disconnect:
                    break
                data = await self._receive()
                if not data:
                    # Gone without NBD_CMD_DISC: nobody will read the replies, and a request still held
                    # (a frozen or fenced export) must not be applied later on behalf of a client
                    # that no longer exists.
                    nursery.cancel_scope.cancel()
                    break
                parser.feed(data)
        # After NBD_CMD_DISC the nursery waited for requests in flight: every accepted one was answered.

    def _plain_write(self, export: str, size: int, req: nbd.Request) -> bool:
        """Whether ``req`` is a WRITE that can join a batch: no flags, valid, and nothing to wait for."""
        return (req.type == nbd.NBD_CMD_WRITE and not req.flags and req.data is not None
                and req.offset + req.length <= size and not self.transmission_flags & nbd.NBD_FLAG_READ_ONLY
                and not self._needs_task(export, req))

    async def _write_batch(self, export: str, writes: list[nbd.Request]) -> list[bytes]:
        """Apply plain writes received together in one store call; their replies, in order."""
        errors = await self.ctl.write_many(export, [(w.offset, w.data or b"") for w in writes], client=self.client)
        return [nbd.simple_reply(w.cookie) if e is None else self._error(w, e.errno, str(e))
                for w, e in zip(writes, errors, strict=True)]

    def _needs_task(self, export: str, req: nbd.Request) -> bool:
        if req.type == nbd.NBD_CMD_FLUSH or (req.flags & nbd.NBD_CMD_FLAG_FUA and req.type in _WRITES):
            return True
        exp = self.ctl.get(export)
        if exp is None or exp.frozen or exp.forward is not None or exp.read_through is not None:
            return True  # may wait, or cross the peer link: never hold up the connection's other requests
        # A write into an area the store's activity log has not made active waits for a journal sync: such
        # writes run side by side, so the requests in flight share syncs (ReplicaStore.activate).
        return req.type in _WRITES and (exp.mode is ExportMode.INCOMING or exp.after_write is not None
                                        or exp.store.needs_activation(req.offset, req.length))

    async def _run_task(self, export: str, size: int, req: nbd.Request) -> None:
        try:
            reply = await self._execute(export, size, req)
            await self._send_gathered(list(reply) if isinstance(reply, tuple) else [reply])
        finally:
            self.tasks.release()

    async def _send_gathered(self, bufs: list[bytes]) -> None:
        """Send a task's reply together with those of the tasks finishing in the same scheduler round (the
        writes one activation released): one sendmsg() for all of them instead of one each."""
        self._gathered += bufs
        if self._gathering:
            return  # the task gathering now sends it
        self._gathering = True
        try:
            await trio.lowlevel.checkpoint()
        finally:
            bufs, self._gathered, self._gathering = self._gathered, [], False
        await self._send(bufs)

    async def _receive(self) -> bytes:
        """The next bytes from the client (b"" at EOF): straight from the socket when some are waiting."""
        if self._fd >= 0 and self._fast_receives < FAST_RECEIVES_PER_CHECKPOINT:
            try:
                data = os.read(self._fd, RECV_BYTES)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _stream_error(exc) from exc
            else:
                self._fast_receives += 1
                return data
        self._fast_receives = 0
        return await self.stream.receive_some(RECV_BYTES)

    async def _send(self, bufs: list[bytes]) -> None:
        """Send whole replies; the lock keeps replies of different tasks from interleaving on the wire."""
        if self._sock is None:
            async with self.send_lock:
                await self.stream.send_all(bufs[0] if len(bufs) == 1 else b"".join(bufs))
            return
        views: list[bytes | memoryview] = list(bufs)
        if self.send_lock.locked():
            await self.send_lock.acquire()
            i = 0
        else:  # nobody else is sending: write what the socket takes now, without a trip through trio
            self.send_lock.acquire_nowait()
            try:
                i = _advance(views, 0, os.writev(self._fd, views[:IOV_MAX]))
            except BlockingIOError:
                i = 0
            except BaseException as exc:
                self.send_lock.release()
                if isinstance(exc, OSError):
                    raise _stream_error(exc) from exc
                raise
        try:
            await _sendmsg_all(self._sock, views, i)
        except OSError as exc:
            raise _stream_error(exc) from exc
        finally:
            self.send_lock.release()

    async def _execute(self, export: str, size: int, req: nbd.Request) -> _Reply:
        """Apply one request; return its whole reply."""
        try:
            return await self._dispatch(export, size, req)
        except HookError as e:
            return self._error(req, e.errno, str(e))

    def _error(self, req: nbd.Request, errno: int, message: str) -> bytes:
        if self.structured and req.type in (nbd.NBD_CMD_READ, nbd.NBD_CMD_BLOCK_STATUS):
            return nbd.error_chunk(req.cookie, errno, message)
        return nbd.simple_reply(req.cookie, errno)

    async def _dispatch(self, export: str, size: int, req: nbd.Request) -> _Reply:
        t, off, n, ctl = req.type, req.offset, req.length, self.ctl
        fua = bool(req.flags & nbd.NBD_CMD_FLAG_FUA)
        if req.flags & ~allowed_flags(t, self.transmission_flags):
            return self._error(req, nbd.NBD_EINVAL, "command flag not supported for this command")
        if t in _WRITES and self.transmission_flags & nbd.NBD_FLAG_READ_ONLY:
            # The spec: with READ_ONLY sent "the server MUST error subsequent write operations", even if the
            # export has become writable since; EPERM is the error it names for a read-only export.
            return self._error(req, nbd.NBD_EPERM, "this connection was opened read-only")
        if req.oversized and t in (nbd.NBD_CMD_READ, nbd.NBD_CMD_WRITE):
            # No payload larger than the cap is ever buffered; the spec asks EINVAL for both
            # (EOVERFLOW is for structured reads the server could not split).
            return self._error(req, nbd.NBD_EINVAL, "request longer than 32 MiB")
        if t == nbd.NBD_CMD_READ:
            if off + n > size:
                return self._error(req, nbd.NBD_EINVAL, "read past the end of the disk")
            if n == 0:  # legal but pointless: answer without data rather than an empty data chunk
                return nbd.none_chunk(req.cookie) if self.structured else nbd.simple_reply(req.cookie)
            data = await ctl.read(export, off, n, client=self.client)
            if self.structured:  # header and data stay separate buffers: no copy of the data
                return nbd.offset_data_header(req.cookie, off, n, done=True), data
            return nbd.simple_reply(req.cookie), data
        if t in (nbd.NBD_CMD_WRITE, nbd.NBD_CMD_WRITE_ZEROES, nbd.NBD_CMD_TRIM):
            if off + n > size:  # the spec: ENOSPC for writes and zeroes, EINVAL for a trim
                return self._error(req, nbd.NBD_EINVAL if t == nbd.NBD_CMD_TRIM else nbd.NBD_ENOSPC,
                                   "past the end of the disk")
            if t == nbd.NBD_CMD_WRITE:
                assert req.data is not None
                await ctl.write(export, off, req.data, fua, client=self.client)
            elif t == nbd.NBD_CMD_WRITE_ZEROES:
                await ctl.write_zeroes(export, off, n, fua, client=self.client,
                                       no_hole=bool(req.flags & nbd.NBD_CMD_FLAG_NO_HOLE),
                                       fast=bool(req.flags & nbd.NBD_CMD_FLAG_FAST_ZERO))
            else:
                await ctl.trim(export, off, n, fua, client=self.client)
            return nbd.simple_reply(req.cookie)
        if t == nbd.NBD_CMD_FLUSH:
            await ctl.flush(export, client=self.client)
            return nbd.simple_reply(req.cookie)
        if t == nbd.NBD_CMD_CACHE:  # a hint with no effect here; its range is checked like a READ's
            if off + n > size:
                return self._error(req, nbd.NBD_EINVAL, "cache request past the end of the disk")
            return nbd.simple_reply(req.cookie)
        if t == nbd.NBD_CMD_BLOCK_STATUS:
            if self.meta_export != export or not self.structured:
                return self._error(req, nbd.NBD_EINVAL, "no metadata context negotiated")
            if n == 0 or off + n > size:
                return self._error(req, nbd.NBD_EINVAL, "block status range outside the disk")
            extents = ctl.allocation(export, off, n)
            if req.flags & nbd.NBD_CMD_FLAG_REQ_ONE:
                extents = extents[:1]
            return nbd.block_status_chunk(req.cookie, BASE_ALLOCATION_ID, extents, done=True)
        return self._error(req, nbd.NBD_EINVAL, f"unknown command {t}")


_QUIET_ERRORS = (nbd.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _client_name(stream: trio.SSLStream[Any]) -> str:
    """The common name of a verified client certificate."""
    for rdn in (stream.getpeercert() or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


async def _handle(stream: trio.abc.Stream, ctl: HookController, tls: ssl.SSLContext | None = None,
                  peer: str = "") -> None:
    """Serve one client; whatever it does, only its own connection ends."""
    conn = NbdConnection(stream, ctl, tls, peer)
    try:
        async with stream:
            try:
                await conn.run()
            finally:
                if conn.stream is not stream:  # end TLS with close_notify, unless the client stopped reading
                    with trio.move_on_after(TLS_CLOSE_SECONDS), contextlib.suppress(*_QUIET_ERRORS):
                        await conn.stream.aclose()
    except Exception as exc:
        leaves = _leaves(exc)
        if all(isinstance(e, _QUIET_ERRORS) for e in leaves):
            log.info("NBD client disconnected: %s", "; ".join(str(e) or type(e).__name__ for e in leaves))
        else:
            log.exception("NBD connection failed; closed it")


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "(gone)"
    return format_hostport(host, port)


async def _tcp_listeners(tcp: TcpEndpoint) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(tcp.port, host=tcp.host, backlog=LISTEN_BACKLOG)
    except OSError as e:
        raise NbdListenError(f"cannot serve NBD on {tcp.host}:{tcp.port}: {e.strerror or e}") from e


async def serve_nbd(
    ctl: HookController,
    unix_path: Path,
    tcp: TcpEndpoint | None = None,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every export of ``ctl`` on a Unix socket (and over TLS on a TCP address) until cancelled."""
    tcp_listeners = await _tcp_listeners(tcp) if tcp is not None else []
    unix_listeners = [await unix_listener(unix_path, LISTEN_BACKLOG)]
    open_tcp = 0

    async def handle_tcp(stream: trio.SocketStream) -> None:
        nonlocal open_tcp
        assert tcp is not None
        peer = _peer(stream)
        if open_tcp >= MAX_TCP_CONNECTIONS:
            log.warning("NBD client %s refused: %d TCP connections are open already", peer, open_tcp)
            await trio.aclose_forcefully(stream)
            return
        open_tcp += 1
        try:
            await _handle(stream, ctl, tcp.ssl_context, peer)
        finally:
            open_tcp -= 1

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, partial(_handle, ctl=ctl), unix_listeners)
            if tcp_listeners:
                nursery.start_soon(trio.serve_listeners, handle_tcp, tcp_listeners)
            task_status.started()
    finally:
        await remove_socket(unix_path)
