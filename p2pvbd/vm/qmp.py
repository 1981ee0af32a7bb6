"""A QMP client over trio: QEMU's JSON machine protocol on its Unix socket.

One connection per QEMU, owned by the VM runner. Each command carries an id that QEMU echoes in its
reply, so a command whose caller was cancelled leaves no reply for the next one to take. Events arrive
interleaved with replies and are kept, newest last, so a caller can wait for one (``MIGRATION`` status
changes, ``RESUME``, ``SHUTDOWN``) without missing it between two commands.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

# A QMP line is a small JSON object; query-migrate's is the largest we read (< 2 KiB). A line longer
# than this is not QEMU talking: the connection is dropped instead of buffering it.
MAX_LINE_BYTES = 1024 * 1024
# Events kept for waiters: a migration emits a few dozen; the oldest are dropped beyond this.
MAX_EVENTS = 256
# QEMU answers a command within milliseconds; `quit` and `migrate_cancel` included. A stuck QEMU is
# killed by its runner instead of waiting on it.
COMMAND_TIMEOUT = 30.0


class QmpError(Exception):
    """QEMU refused a command, or its QMP connection is gone."""


class Qmp:
    """One QMP connection. A reader task (started by :meth:`open` in the caller's nursery) sorts what QEMU
    sends into replies, handed to the command with their id, and events, kept for :meth:`wait_event`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self._next_id = 0
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self.closed: str | None = None

    @classmethod
    async def open(cls, nursery: trio.Nursery, path: Path) -> Qmp:
        """Connect, negotiate capabilities, and leave the reader running in ``nursery``."""
        stream = await trio.open_unix_socket(str(path))
        qmp = cls(stream)
        try:
            greeting = await qmp._read_message()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting!r}")
        except BaseException:
            await stream.aclose()
            raise
        nursery.start_soon(qmp._read_all)
        await qmp.command("qmp_capabilities")
        return qmp

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def command(self, name: str, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value; QmpError with QEMU's own message if refused."""
        self._next_id += 1
        msg: dict[str, Any] = {"execute": name, "id": self._next_id}
        if arguments:
            msg["arguments"] = arguments
        if self.closed:
            raise QmpError(f"{name}: {self.closed}")
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[self._next_id] = send
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                async with self._send_lock:
                    await self._stream.send_all(json.dumps(msg).encode() + b"\n")
                reply = await receive.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel) as e:
            raise QmpError(f"{name}: {self.closed or 'the QMP connection is gone'}") from e
        finally:
            self._waiting.pop(msg["id"], None)
        if "error" in reply:
            raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    async def wait_event(self, accept: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first kept or later event for which ``accept(event)`` is true (taken from the kept ones)."""
        while True:
            for i, ev in enumerate(self.events):
                if accept(ev):
                    del self.events[i]
                    return ev
            if self.closed:
                raise QmpError(self.closed)
            await self._changed.wait()

    async def _read_all(self) -> None:
        try:
            while True:
                msg = await self._read_message()
                if "event" in msg:
                    self.events.append(msg)
                    del self.events[:-MAX_EVENTS]
                elif (waiter := self._waiting.pop(msg.get("id"), None)) is not None:  # type: ignore[arg-type]
                    waiter.send_nowait(msg)  # a reply nobody waits for any more (cancelled) is dropped
                self._changed.set()
                self._changed = trio.Event()
        except QmpError as e:
            self.closed = str(e)
        finally:
            self.closed = self.closed or "the QMP connection is closed"
            for waiter in self._waiting.values():
                waiter.close()
            self._waiting.clear()
            self._changed.set()

    async def _read_message(self) -> dict[str, Any]:
        while (nl := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_LINE_BYTES:
                raise QmpError("QMP line too long")
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise QmpError("QEMU's QMP connection is gone") from e
            if not chunk:
                raise QmpError("QEMU closed its QMP connection")
            self._buf += chunk
        line = bytes(self._buf[:nl])
        del self._buf[:nl + 1]
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QmpError(f"QMP sent something that is not JSON: {line[:80]!r}") from e
        if not isinstance(msg, dict):
            raise QmpError(f"QMP sent a non-object: {line[:80]!r}")
        return msg
