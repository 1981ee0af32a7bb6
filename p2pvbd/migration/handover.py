"""A disk's hand-over from its old owner to its new one, on both sides of a migration.

The pending marker (a source records it before asking for the commit, and resolves it before it takes
writes again after a restart), the switch of the old owner's export to standby with its open guest
connections forwarded (``hand_over``), the durable record of it (``record_hand_over``), and the
forwarder that carries those connections' guest I/O to the new owner (``PeerForwarder``). The source's
orchestrator (migrate.py) and the destination (migration/target.py) both use them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pvbd.base.files import atomic_write
from p2pvbd.kernel_hook_ctl import Export, ExportMode, HookError
from p2pvbd.swarm.peer_transport import ERR_CONNECTION, ERR_TIMEOUT, PeerError
from p2pvbd.wire.nbd_codec import NBD_EIO
from p2pvbd.wire.peer_wire import MAX_GUEST_IO_BYTES

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

# A request to a peer (a batch of shipped blocks, a forwarded guest I/O) fails after this.
REQUEST_TIMEOUT = 60.0
# Forwarded guest I/O waits this long for an unreachable owner: the reconnect delay the daemon gives QEMU
# (vm/definition.py), time for a daemon to restart after a crash.
FORWARD_PATIENCE_SECONDS = 120.0
FORWARD_RETRY_SECONDS = 1.0
UNREACHABLE_CODES = frozenset({ERR_CONNECTION, ERR_TIMEOUT, "unreachable"})
# The pending marker, in the store's directory: present while a commit's outcome is unknown to the source.
PENDING_FILE = "migration.json"


def pending_path(store_dir: Path) -> Path:
    return store_dir / PENDING_FILE


def write_pending(store_dir: Path, dest: str, epoch: int) -> None:
    atomic_write(pending_path(store_dir), json.dumps({"dest": dest, "epoch": epoch}).encode())


def read_pending(store_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(pending_path(store_dir).read_text())
    except FileNotFoundError:
        return None


def hand_over(swarm: Swarm, exp: Export, dest: str) -> None:
    """This host is no longer the owner: forward its open guest connections, standby for new ones.

    Takes effect at once, in memory; :func:`record_hand_over` makes it durable after the guest is
    released. A crash in between is safe: the pending marker makes the restarted host ask ``dest``.
    """
    exp.forward = PeerForwarder(swarm, dest, exp.name)
    exp.forwarded_clients = frozenset(exp.clients)
    swarm.ctl.set_mode(exp.name, ExportMode.STANDBY)


async def record_hand_over(swarm: Swarm, exp: Export, dest: str, epoch: int) -> None:
    """This host handed ``exp``'s disk to ``dest`` at ``epoch``: the signed hand-over, then the new owner."""
    await trio.to_thread.run_sync(swarm.ownership.handed, exp.store, dest, epoch)
    pending_path(exp.store.directory).unlink(missing_ok=True)
    swarm.request_publish()


class PeerForwarder:
    """Guest I/O of an old owner's open connections, carried out by the new owner (and an incoming
    replica's reads, by its source). Requests larger than a peer request carries are split."""

    def __init__(self, swarm: Swarm, dest: str, disk: str) -> None:
        self.swarm, self.dest, self.disk = swarm, dest, disk
        # Per owner, its run that acknowledged the first write not yet flushed: a flush that same owner
        # answers from another run (it restarted: a crash or a power cut) cannot vouch for those writes.
        self._unflushed: dict[str, str] = {}

    async def _io(self, op: str, **body: Any) -> dict[str, Any]:
        reply = await self.relay({"disk": self.disk, "op": op, **body})
        owner, run = reply.get("owner"), reply.get("run")
        if op in ("write", "write_zeroes", "trim") and not body.get("fua") and isinstance(owner, str) \
                and isinstance(run, str):
            self._unflushed.setdefault(owner, run)
        return reply

    async def relay(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a guest_io request on to the new owner; HookError (EIO) if it fails. While the owner cannot
        be reached (its daemon restarting, its link down) the request waits and is sent again, for as long
        as QEMU itself waits for a restarting daemon: a guest's I/O is held, not failed. Resending is safe:
        the guest has no answer yet, so nothing it does depends on the first attempt."""
        deadline = trio.current_time() + FORWARD_PATIENCE_SECONDS
        while True:
            try:
                conn = await self.swarm.connect(self.dest)
                return await conn.request("guest_io", body, timeout=REQUEST_TIMEOUT)
            except PeerError as e:
                if e.code not in UNREACHABLE_CODES or trio.current_time() + FORWARD_RETRY_SECONDS > deadline:
                    raise HookError(NBD_EIO, f"forwarding to the new owner {self.dest} failed: {e.message}") from e
                log.info("guest I/O on %s waits for its owner %s: %s", self.disk, self.dest, e.message)
            await trio.sleep(FORWARD_RETRY_SECONDS)

    async def read(self, offset: int, length: int) -> bytes:
        parts = []
        for at in range(offset, offset + length, MAX_GUEST_IO_BYTES):
            n = min(MAX_GUEST_IO_BYTES, offset + length - at)
            parts.append(bytes((await self._io("read", offset=at, length=n))["data"]))
        return b"".join(parts)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        if len(data) <= MAX_GUEST_IO_BYTES:
            await self._io("write", offset=offset, data=data, fua=fua)
            return
        for k in range(0, len(data), MAX_GUEST_IO_BYTES):
            await self._io("write", offset=offset + k, data=data[k:k + MAX_GUEST_IO_BYTES], fua=fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        await self._io("write_zeroes", offset=offset, length=length, fua=fua)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._io("trim", offset=offset, length=length, fua=fua)

    async def flush(self) -> None:
        """Make every write acknowledged so far durable at the owner; EIO if the owner that answers
        restarted since it acknowledged some of them: they may be gone, and the guest must know (as
        after an NBD server's disconnect). A flush covers writes acknowledged before it was sent."""
        pending, self._unflushed = self._unflushed, {}
        try:
            reply = await self._io("flush")
        except BaseException:
            self._unflushed = self._unflushed | pending  # the older run stays, for the next flush to see
            raise
        owner, run = reply.get("owner"), reply.get("run")
        if isinstance(owner, str) and pending.get(owner, run) != run:
            log.warning("%s restarted after acknowledging writes to %s that were not yet flushed: the guest's "
                        "flush fails, they may be lost", owner, self.disk)
            raise HookError(NBD_EIO, f"the owner {owner} of {self.disk} restarted before writes it had "
                                     "acknowledged were flushed: they may be lost")
