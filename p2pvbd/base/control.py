"""The control socket: how the thin CLI talks to the daemon of its home.

Length-prefixed msgpack over a Unix socket in the home directory. A request is
``{"op": str, "args": {...}}``; a reply is ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "one-line message"}``. Unix-socket permissions are the access control:
only the home's owner can reach it.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from p2pvbd.base.msgpack_bounds import MAX_FRAME_DEPTH, FrameLimits, unpack_bounded
from p2pvbd.base.sockets import remove_socket, unix_listener

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
# Status of every disk in a large swarm stays far below this; anything bigger is a bug or an attack.
MAX_CONTROL_FRAME = 16 * 1024 * 1024
# A command's request is an op and a few arguments (names, sizes, paths, a VM definition): 1 MiB is far more.
MAX_CONTROL_REQUEST = 1024 * 1024
# What a request may decode to (peer_wire.FrameLimits): a VM definition is the largest, a few dozen values.
CONTROL_LIMITS = FrameLimits(frame_bytes=MAX_CONTROL_REQUEST, str_len=MAX_CONTROL_REQUEST,
                             bin_len=MAX_CONTROL_REQUEST, array_len=4096, map_len=1024, containers=4096,
                             elements=16384, depth=MAX_FRAME_DEPTH)
# How many commands (each a short-lived CLI process) may be served at once.
MAX_CONTROL_CLIENTS = 64
# Bound on sending one reply, which is shielded from cancellation so `stop` gets its answer.
REPLY_SEND_SECONDS = 2.0

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """A command failed in the daemon; the message is meant for the user."""


class DaemonNotRunning(ControlError):
    pass


def _unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=True)


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_CONTROL_FRAME:
        raise ControlError(f"reply too large ({len(body)} bytes)")
    return _LEN.pack(len(body)) + body


async def _recv_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def _serve_one(stream: trio.SocketStream, handler: Handler, limiter: trio.CapacityLimiter) -> None:
    async with stream, limiter:
        while True:
            head = await _recv_exactly(stream, _LEN.size)
            if head is None:
                return
            (n,) = _LEN.unpack(head)
            if n > MAX_CONTROL_REQUEST:
                return
            body = await _recv_exactly(stream, n)
            if body is None:
                return
            try:
                req = unpack_bounded(body, CONTROL_LIMITS)
                op, args = req["op"], req.get("args") or {}
                if not isinstance(op, str) or not isinstance(args, dict):
                    raise ValueError("bad request shape")
            except Exception:
                await stream.send_all(_frame({"ok": False, "error": "malformed control request"}))
                return
            try:
                reply = {"ok": True, "result": await handler(op, args)}
            except ControlError as e:
                reply = {"ok": False, "error": str(e)}
            except Exception as e:
                log.exception("control op %s failed", op)
                reply = {"ok": False, "error": f"internal error in {op}: {e.__class__.__name__}: {e}"}
            # A reply is sent even while the daemon shuts down (`p2pvbd stop` waits for it).
            with trio.CancelScope(shield=True), trio.move_on_after(REPLY_SEND_SECONDS):
                await stream.send_all(_frame(reply))


async def serve_control(path: Path, handler: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket at ``path`` until cancelled."""
    listener = await unix_listener(path, MAX_CONTROL_CLIENTS)
    limiter = trio.CapacityLimiter(MAX_CONTROL_CLIENTS)

    async def one(stream: trio.SocketStream) -> None:
        try:
            await _serve_one(stream, handler, limiter)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(one, [listener], handler_nursery=nursery)
    finally:
        await remove_socket(path)


def call(control_socket: Path, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
    """Blocking client used by the CLI; raises DaemonNotRunning or ControlError with a user-facing message."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(control_socket))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonNotRunning(
                f"no daemon is running for home {control_socket.parent} (start it with 'p2pvbd daemon')"
            ) from e
        s.sendall(_frame({"op": op, "args": args or {}}))
        head = _recv_exactly_blocking(s, _LEN.size)
        (n,) = _LEN.unpack(head)
        if n > MAX_CONTROL_FRAME:
            raise ControlError("daemon sent an oversized reply")
        reply = _unpack(_recv_exactly_blocking(s, n))
    except TimeoutError as e:
        raise ControlError(f"the daemon did not answer {op!r} in time") from e
    finally:
        s.close()
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")


def _recv_exactly_blocking(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ControlError("the daemon closed the connection (did it stop?)")
        buf += chunk
    return bytes(buf)
