"""The Unix sockets a daemon serves (control, NBD): private from the start, removed when it stops.

Creating and removing the socket file touches the file system: done in a worker thread, so a slow disk
holds up that socket alone, not the event loop every guest request waits on.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import trio

from p2pvbd.base.home import PRIVATE_SOCKET_MODE


async def unix_listener(path: Path, backlog: int) -> trio.SocketListener:
    """A listener on ``path`` (replacing a stale socket there), 0600 whatever the umask: its 0700 directory
    covers the instant before the chmod."""
    await remove_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(os.fspath(path))
    await trio.to_thread.run_sync(os.chmod, path, PRIVATE_SOCKET_MODE)
    sock.listen(backlog)
    return trio.SocketListener(sock)


async def remove_socket(path: Path) -> None:
    """Remove ``path`` if it is there. Shielded: it runs in the ``finally`` of a cancelled server, where an
    await would otherwise be cancelled before it removed anything."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(partial(path.unlink, missing_ok=True))
