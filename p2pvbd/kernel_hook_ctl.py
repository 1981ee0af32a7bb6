"""The write-interception hook's controller: the single place where guest writes enter a store.

Every NBD command for an export passes through :class:`HookController`, which enforces the export's
mode (primary, standby, incoming), holds requests while the export is frozen, counts requests in flight
so a freeze can drain them, and publishes a :class:`WriteEvent` for every write it applies. Migration
builds on exactly these four powers; nothing else writes guest data.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from p2pvbd.replica_store import OutOfRange, ReplicaStore, WriteResult
from p2pvbd.store.recent_extents import RecentExtents
from p2pvbd.wire.nbd_codec import NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM, NBD_ESHUTDOWN

log = logging.getLogger(__name__)

# A freeze is the switchover's stall: the guest sees it as latency, so it must end even if the
# orchestrator that asked for it dies. 30 s is far beyond any sane switchover, yet short enough
# that a guest's own I/O timeout (Linux: 30 s per request by default) is rarely hit.
MAX_FREEZE_SECONDS = 30.0
# Writes to an export waiting for an incoming migration are held while the migration is alive: they fail
# with EPERM once its source has not been heard from for this long. The source is heard at every block
# shipment, job poll and stream piece, and at the destination's check of it every 5 s
# (migration/target.py SOURCE_CHECK_SECONDS): silence this long means a source gone, not a slow one.
INCOMING_SILENCE_SECONDS = 30.0
# Write events buffered per subscriber before it is marked as having overflowed (then it must
# resynchronise from the version map). 64 Ki events is a few MiB of memory.
SUBSCRIBER_BUFFER = 65536
# Host errors that mean "out of space": NBD's spec asks EDQUOT and EFBIG to be reported as NBD_ENOSPC too.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class ExportMode(enum.Enum):
    PRIMARY = "primary"  # this host owns the disk: reads and writes
    STANDBY = "standby"  # replica of a disk owned elsewhere: reads, EPERM on writes
    INCOMING = "incoming"  # migration target: reads, writes held until ownership arrives


class HookError(Exception):
    """A request failed; ``errno`` is the NBD error the client receives."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class Forwarder(Protocol):
    """Where an old owner sends the I/O of guest connections that predate the switchover."""

    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes, fua: bool) -> None: ...
    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None: ...
    async def trim(self, offset: int, length: int, fua: bool) -> None: ...
    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WriteEvent:
    """Blocks ``first_block..last_block`` of ``disk`` now hold ``version``."""

    disk: str
    first_block: int
    last_block: int
    version: int


@dataclass
class WriteSubscription:
    """A subscriber's stream of write events. ``overflowed`` means events were dropped."""

    receive: trio.MemoryReceiveChannel[WriteEvent]
    _send: trio.MemorySendChannel[WriteEvent]
    disk: str | None
    overflowed: bool = False


class _ActivationBatch:
    """Spans of guest writes waiting for their areas' activation, and the moment it is done."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.done = trio.Event()


class Activator:
    """Activates the areas of a store's guest writes in batches: the writes that arrive while one batch's
    journal sync runs wait together for the next, which one worker thread carries out with one sync. A
    thread per write would cost the event loop two thread hand-offs per write, and the syncs would share
    less (see ReplicaStore.activate_spans)."""

    def __init__(self, store: ReplicaStore) -> None:
        self._store = store
        self._next = _ActivationBatch()
        self._running = False

    async def activate(self, offset: int, length: int) -> None:
        """Return once the span's areas are active, or an attempt failed: the write then activates them
        itself, and meets the error there if it persists."""
        batch = self._next
        batch.spans.append((offset, length))
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run)
        await batch.done.wait()

    async def _run(self) -> None:
        try:
            while self._next.spans:
                batch, self._next = self._next, _ActivationBatch()
                try:
                    await trio.to_thread.run_sync(self._store.activate_spans, batch.spans)
                except Exception as e:  # a full or failing disk, a closed store: each write meets it itself
                    log.debug("activating areas of %s failed: %s", self._store.name, e)
                finally:
                    batch.done.set()
        finally:
            self._running = False


@dataclass
class Export:
    """One disk as seen by guests, with its gate state."""

    store: ReplicaStore
    mode: ExportMode
    frozen: bool = False
    inflight: int = 0
    _thawed: trio.Event = field(default_factory=trio.Event)
    _mode_changed: trio.Event = field(default_factory=trio.Event)
    _drained: trio.Event | None = None
    _freeze_generation: int = 0
    # Awaited after a write is applied and before it is acknowledged: where migration makes a write
    # synchronous with its mirror, or paces a guest that writes faster than the mirror can ship.
    after_write: Callable[[WriteResult], Awaitable[None]] | None = None
    # Guest connections now open (ids from HookController.connect).
    clients: set[int] = field(default_factory=set)
    # After a switchover: the connections open at that moment have their I/O carried out by the new
    # owner through ``forward``, so a guest whose memory is still migrating never sees an error.
    forward: Forwarder | None = None
    forwarded_clients: frozenset[int] = frozenset()
    # Processes whose new connections are forwarded too: a VM's QEMU that outlived its daemon after the
    # disk was handed over reconnects to the restarted daemon as a new client, and must reach the owner.
    forward_pids: frozenset[int] = frozenset()
    # While an incoming migration is under way: reads are served by the current owner, because
    # this replica may still hold stale blocks (a hypervisor may start the incoming VM early).
    read_through: Forwarder | None = None
    # When the incoming migration's source was last heard from (trio time): held writes wait while recent.
    incoming_heard: float = 0.0
    # What guests read and wrote lately: their page cache, which a VM's move sends by reference.
    recent: RecentExtents = field(default_factory=RecentExtents)
    # Called when a write is held by incoming mode: a libvirt destination learns that its new QEMU runs the
    # guest (libvirt/service.py).
    on_held_write: Callable[[], None] | None = None
    activator: Activator | None = None

    def __post_init__(self) -> None:
        if self.activator is None:
            self.activator = Activator(self.store)

    @property
    def name(self) -> str:
        return self.store.name


class HookController:
    """Owns the exports; every guest request is admitted, applied and published here."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}
        self._subs: list[WriteSubscription] = []
        self._next_client = 0

    # ---- exports -------------------------------------------------------------------------------
    def add_export(self, store: ReplicaStore, mode: ExportMode) -> Export:
        if store.name in self._exports:
            raise ValueError(f"export {store.name!r} already exists")
        exp = Export(store=store, mode=mode)
        exp._thawed.set()
        self._exports[store.name] = exp
        return exp

    def remove_export(self, name: str) -> ReplicaStore:
        return self._exports.pop(name).store

    def get(self, name: str) -> Export | None:
        return self._exports.get(name)

    def names(self) -> list[str]:
        return sorted(self._exports)

    def exports(self) -> list[Export]:
        return [self._exports[n] for n in sorted(self._exports)]

    def set_mode(self, name: str, mode: ExportMode) -> None:
        exp = self._require(name)
        exp.mode = mode
        if mode is ExportMode.INCOMING:
            exp.incoming_heard = trio.current_time()
        exp._mode_changed.set()
        exp._mode_changed = trio.Event()

    def heard_from_source(self, name: str) -> None:
        """The incoming migration of ``name`` is alive: writes held there keep waiting."""
        exp = self._exports.get(name)
        if exp is not None:
            exp.incoming_heard = trio.current_time()

    def _require(self, name: str) -> Export:
        exp = self._exports.get(name)
        if exp is None:
            raise HookError(NBD_ESHUTDOWN, f"export {name!r} is gone")
        return exp

    # ---- write events --------------------------------------------------------------------------
    @contextmanager
    def subscribe(self, disk: str | None = None) -> Iterator[WriteSubscription]:
        """Receive a WriteEvent for every write applied from now on (to ``disk``, or to any)."""
        send, receive = trio.open_memory_channel[WriteEvent](SUBSCRIBER_BUFFER)
        sub = WriteSubscription(receive=receive, _send=send, disk=disk)
        self._subs.append(sub)
        try:
            yield sub
        finally:
            self._subs.remove(sub)
            send.close()

    def _publish(self, disk: str, res: WriteResult) -> None:
        if not self._subs or res.version == 0:
            return
        ev = WriteEvent(disk, res.first_block, res.last_block, res.version)
        for sub in self._subs:
            if sub.disk is None or sub.disk == disk:
                try:
                    sub._send.send_nowait(ev)
                except trio.WouldBlock:
                    sub.overflowed = True

    # ---- guest connections ---------------------------------------------------------------------
    def forwards(self, name: str, pid: int | None) -> bool:
        """Whether a new connection from process ``pid`` has its I/O carried out by the disk's owner."""
        exp = self._exports.get(name)
        return exp is not None and exp.forward is not None and pid is not None and pid in exp.forward_pids

    def connect(self, name: str, pid: int | None = None) -> int:
        """Register a guest connection to ``name`` (from process ``pid``, on the Unix socket); its id goes
        with each of its requests."""
        self._next_client += 1
        exp = self._require(name)
        exp.clients.add(self._next_client)
        if self.forwards(name, pid):
            exp.forwarded_clients |= {self._next_client}
        return self._next_client

    def disconnect(self, name: str, client: int) -> None:
        exp = self._exports.get(name)
        if exp is not None:
            exp.clients.discard(client)

    # ---- admission -----------------------------------------------------------------------------
    async def _admit(self, name: str, is_write: bool, client: int = 0) -> Export | None:
        """The export, counted in flight; None when the request is to be forwarded to the new owner."""
        exp = self._require(name)
        while True:
            if exp.frozen:
                await exp._thawed.wait()
                exp = self._require(name)
                continue
            if exp.forward is not None and client in exp.forwarded_clients:
                return None
            if is_write and exp.mode is not ExportMode.PRIMARY:
                if exp.mode is ExportMode.STANDBY:
                    raise HookError(NBD_EPERM, f"{name} is a standby replica; its owner takes writes")
                if exp.on_held_write is not None:
                    exp.on_held_write()
                with trio.move_on_at(exp.incoming_heard + INCOMING_SILENCE_SECONDS):
                    await exp._mode_changed.wait()
                    exp = self._require(name)
                    continue
                if trio.current_time() < exp.incoming_heard + INCOMING_SILENCE_SECONDS:
                    continue  # heard from the source meanwhile
                raise HookError(NBD_EPERM, f"{name}: its incoming migration has not been heard from for "
                                           f"{INCOMING_SILENCE_SECONDS:.0f} s; ownership did not arrive")
            exp.inflight += 1
            return exp

    def _done(self, exp: Export) -> None:
        exp.inflight -= 1
        if exp.inflight == 0 and exp._drained is not None:
            exp._drained.set()

    # ---- guest commands ------------------------------------------------------------------------
    async def read(self, name: str, offset: int, length: int, client: int = 0) -> bytes:
        exp = await self._admit(name, is_write=False, client=client)
        if exp is None:
            return await self._forwarder(name).read(offset, length)
        if exp.mode is ExportMode.INCOMING and exp.read_through is not None:
            self._done(exp)
            return await self._read_through(exp, offset, length)
        try:
            data = exp.store.read(offset, length)
            exp.recent.touch(offset, length)
            return data
        except OutOfRange as e:
            raise HookError(NBD_EINVAL, str(e)) from e
        except OSError as e:
            raise HookError(NBD_EIO, f"read failed: {e}") from e
        finally:
            self._done(exp)

    async def write(self, name: str, offset: int, data: bytes, fua: bool = False, client: int = 0) -> None:
        if not await self._apply(name, fua, client, lambda s: s.write(offset, data), (offset, len(data))):
            await self._forwarder(name).write(offset, data, fua)
        elif (exp := self._exports.get(name)) is not None:
            exp.recent.touch(offset, len(data))

    async def write_many(self, name: str, writes: list[tuple[int, bytes]], client: int = 0) -> list[HookError | None]:
        """Apply a burst of plain writes (no FUA) in order; each one's error or None. On a primary export
        with nothing to run after each write they go to the store together (ReplicaStore.write_many: one
        journal append; a write into an area not yet active syncs the journal there, so callers leave such
        writes to write(), which shares that sync with others); otherwise one by one as write()."""
        exp = self._exports.get(name)
        if (exp is None or exp.frozen or exp.mode is not ExportMode.PRIMARY or exp.forward is not None
                or exp.after_write is not None):
            return [await self._write_or_error(name, offset, data, client) for offset, data in writes]
        exp.inflight += 1  # what _admit does for a primary export that is not frozen
        try:
            results = exp.store.write_many(writes)
        finally:
            self._done(exp)
        out: list[HookError | None] = []
        for (offset, data), res in zip(writes, results, strict=True):
            if isinstance(res, WriteResult):
                self._publish(name, res)
                exp.recent.touch(offset, len(data))
                out.append(None)
            else:
                out.append(_write_error(res))
        return out

    async def _write_or_error(self, name: str, offset: int, data: bytes, client: int) -> HookError | None:
        try:
            await self.write(name, offset, data, client=client)
        except HookError as e:
            return e
        return None

    async def write_zeroes(self, name: str, offset: int, length: int, fua: bool = False, client: int = 0, *,
                           no_hole: bool = False, fast: bool = False) -> None:
        """Zero a range. ``no_hole``: keep it allocated (NBD_CMD_FLAG_NO_HOLE). ``fast``: fail at once with
        NBD_ENOTSUP, changing nothing, unless the zeroing beats writing zeros (NBD_CMD_FLAG_FAST_ZERO)."""
        if fast and not self.zeroes_are_fast(name, offset, length):
            raise HookError(NBD_ENOTSUP, "zeroing a part of a block is no faster than writing zeros there")
        if not await self._apply(name, fua, client, lambda s: s.write_zeroes(offset, length, allocate=no_hole),
                                 (offset, length)):
            # The peer op carries no NO_HOLE: the new owner zeroes the range, possibly as holes.
            await self._forwarder(name).write_zeroes(offset, length, fua)

    def zeroes_are_fast(self, name: str, offset: int, length: int) -> bool:
        """Whether zeroing the range touches whole blocks only (or nothing): those become zero blocks by
        metadata and a hole punch (plus an allocation), whatever their size; a partial block is a write of zeros."""
        store = self._require(name).store
        bs, end = store.block_size, offset + length
        return length == 0 or (offset % bs == 0 and (end % bs == 0 or end == store.size))

    async def trim(self, name: str, offset: int, length: int, fua: bool = False, client: int = 0) -> None:
        if not await self._apply(name, fua, client, lambda s: s.trim(offset, length), (offset, length)):
            await self._forwarder(name).trim(offset, length, fua)

    async def _read_through(self, exp: Export, offset: int, length: int) -> bytes:
        """A read at a migration target, answered by the owner; served here once ownership has arrived."""
        assert exp.read_through is not None
        try:
            return await exp.read_through.read(offset, length)
        except HookError:
            if exp.mode is not ExportMode.PRIMARY:
                raise
        return await self.read(exp.name, offset, length)

    def _forwarder(self, name: str) -> Forwarder:
        fwd = self._require(name).forward
        assert fwd is not None
        return fwd

    async def _apply(self, name: str, fua: bool, client: int, op: Callable[[ReplicaStore], WriteResult],
                     span: tuple[int, int]) -> bool:
        """Apply a write to ``span`` (offset, length) locally; False when it must be forwarded instead."""
        exp = await self._admit(name, is_write=True, client=client)
        if exp is None:
            return False
        try:
            try:
                if exp.store.needs_activation(*span):  # the journal sync of a new area: off the event loop
                    assert exp.activator is not None
                    await exp.activator.activate(*span)
                res = op(exp.store)
            except (OutOfRange, OSError) as e:
                raise _write_error(e) from e
            self._publish(name, res)
            if exp.after_write is not None:
                await exp.after_write(res)
            if fua:
                await self._sync(exp)
        finally:
            self._done(exp)
        return True

    async def flush(self, name: str, client: int = 0) -> None:
        exp = await self._admit(name, is_write=False, client=client)
        if exp is None:
            return await self._forwarder(name).flush()
        try:
            await self._sync(exp)
        finally:
            self._done(exp)

    async def _sync(self, exp: Export) -> None:
        try:
            await trio.to_thread.run_sync(exp.store.flush)
        except OSError as e:
            raise HookError(NBD_EIO, f"flush failed: {e}") from e

    def allocation(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents (length, NBD state flags) for BLOCK_STATUS; reads never wait."""
        exp = self._require(name)
        try:
            return exp.store.allocation(offset, length)
        except OutOfRange as e:
            raise HookError(NBD_EINVAL, str(e)) from e

    # ---- freeze / thaw -------------------------------------------------------------------------
    async def freeze(self, name: str, flush: bool = True) -> None:
        """Hold new requests, wait for those in flight, flush. Thaws by itself after MAX_FREEZE_SECONDS.

        ``flush=False`` skips the flush, for a caller that makes the data durable elsewhere (a switchover:
        the destination flushes what it commits). A freeze cancelled while it drains or flushes (the
        caller's ``trio.fail_after``, say) thaws before it returns.
        """
        exp = self._require(name)
        if exp.frozen:
            raise HookError(NBD_EINVAL, f"{name} is already frozen")
        exp.frozen = True
        exp._thawed = trio.Event()
        exp._freeze_generation += 1
        gen = exp._freeze_generation
        trio.lowlevel.spawn_system_task(self._freeze_watchdog, name, gen)
        try:
            if exp.inflight:
                exp._drained = trio.Event()
                await exp._drained.wait()
            exp._drained = None
            if flush:
                await self._sync(exp)
        except BaseException:
            exp._drained = None
            self.thaw(name)
            raise

    def thaw(self, name: str) -> None:
        exp = self._exports.get(name)
        if exp is None or not exp.frozen:
            return
        exp.frozen = False
        exp._thawed.set()

    async def _freeze_watchdog(self, name: str, gen: int) -> None:
        await trio.sleep(MAX_FREEZE_SECONDS)
        exp = self._exports.get(name)
        if exp is not None and exp.frozen and exp._freeze_generation == gen:
            log.warning("%s stayed frozen for %.0f s; thawing it so the guest can go on", name, MAX_FREEZE_SECONDS)
            self.thaw(name)

    async def flush_all(self) -> None:
        """Periodic upkeep of every store, replicas too (their journals checkpoint like the owner's): flush,
        then digest what changed and is hashed, in a worker thread (hashes wait until needed:
        ReplicaStore.upkeep). A frozen export is left to its switchover."""
        for exp in self.exports():
            if not exp.frozen:
                await trio.to_thread.run_sync(exp.store.upkeep)


def _write_error(e: OutOfRange | OSError) -> HookError:
    """The NBD error a failed store write answers."""
    if isinstance(e, OutOfRange):
        return HookError(NBD_ENOSPC, str(e))
    return HookError(NBD_ENOSPC if e.errno in _NO_SPACE_ERRNOS else NBD_EIO, f"write failed: {e}")
