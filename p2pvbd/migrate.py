"""Live migration of a disk's ownership: bulk pull, mirrored writes, a fenced switchover.

Source side (the owner): tell the destination a migration is coming, let it pull every stale block
from all holders at once while the guest runs on, ship the blocks the guest wrote meanwhile (mirror),
then freeze the export, ship the last dirty blocks and ask the destination to commit. The destination
commits only when its map's root digest (store/map_tree.py) equals the frozen source's, and persists
the new owner and epoch before it answers. Guest connections that were open at the source are then forwarded to the new
owner; new ones get standby behaviour.

Fencing: before asking for the commit, the source records a pending marker. If it cannot learn the
commit's outcome (partition, crash), it keeps the export fenced (reads only, writes held) until the
destination tells it, so a partition never yields two writers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import trio
import zstandard

from p2pvbd.kernel_hook_ctl import Export, ExportMode
from p2pvbd.migration import failpoints
from p2pvbd.migration.handover import (
    REQUEST_TIMEOUT,
    hand_over,
    pending_path,
    read_pending,
    record_hand_over,
    write_pending,
)
from p2pvbd.replica_store import ReplicaStore, WriteResult
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.map_wire import unpack_blocks
from p2pvbd.wire.peer_wire import BLOCK_ZSTD_LEVEL, BlockEntry, FrameError, pack_entry

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm
    from p2pvbd.swarm.peer_transport import PeerConnection

log = logging.getLogger(__name__)

# The guest's stall at switchover is the time to ship what is still dirty; the default meets the
# original prototype's "sub-second at 100 Mbit/s" with a wide margin.
DEFAULT_MAX_DOWNTIME_MS = 50
# Share of the downtime budget left to shipping the last dirty blocks; the rest is the commit's round
# trip and the destination's fsyncs (measured at 5-20 ms each on a busy 2-core host).
FINAL_SHIP_SHARE = 0.5
# Extra mirror rounds before the freeze while each still shrinks the dirty set (a guest writing at a steady
# rate converges within 2-3; more never helped in the downtime benchmark).
MAX_TIGHTEN_ROUNDS = 5
# Guest bytes of one put_blocks request (its payload is that or less, compressed). 1 MiB is 84 ms at
# 100 Mbit/s: a sync-mode write queued behind a batch on the same connection waits at most that long
# (4 MiB batches made it 330 ms); counting guest bytes also bounds the CPU a batch costs either side.
SHIP_BATCH_BYTES = 1024 * 1024
# Batches in flight at once: one round trip of the link stays filled (one at a time got 70-87 % of a
# 100 Mbit/s link in the migration benchmark). Order does not matter: the destination never goes back
# to an older version of a block.
SHIP_WINDOW = 3
# While the guest's writes wait for their own shipment (sync mode), the backlog goes in batches of this
# many guest bytes, so a write queued behind the batches on the wire waits for ~16 ms of them at 100 Mbit/s
# (three of 64 KiB) instead of ~250 ms (three of 1 MiB): a guest writing one request at a time got
# 0.4 MiB/s through a backlogged mirror with 1 MiB batches.
CONTENDED_BATCH_BYTES = 64 * 1024
# The backlog counts as contended this long after the guest's last shipment: one write at a time leaves
# gaps of a round trip between shipments, which must not switch back to large batches.
CONTENDED_SECONDS = 1.0
# A backlog batch yields to guest-write shipments at most this long, so a guest that always has a write
# in flight cannot starve the migration: at least one 1 MiB batch per this, like DRBD's c-min-rate.
BACKLOG_MAX_YIELD_SECONDS = 0.5
# An async mirror round ships at most this many seconds' worth of dirty blocks, so that "the dirty set
# did not shrink in NO_PROGRESS_ROUNDS rounds" is noticed within seconds even with a large dirty set.
MIRROR_ROUND_SECONDS = 1.0
# A converged disk held for its VM's switchover ships what the guest wrote this often: the pause then
# finds at most this long's worth of writes to ship.
HOLD_ROUND_SECONDS = 0.2
# Draining requests in flight and flushing, at freeze: longer means a broken disk, not a busy guest.
FREEZE_TIMEOUT = 10.0
# Rounds of mirroring in which the dirty set did not shrink before the guest is paced to the link.
NO_PROGRESS_ROUNDS = 3
# The guest is paced to this fraction of the measured shipping rate, so the dirty set shrinks with the
# other half of the link.
THROTTLE_FRACTION = 0.5
# Commit attempts that find blocks still missing at the destination before giving up.
MAX_COMMIT_ROUNDS = 5
# How long a source waits for an ambiguous commit's outcome before fencing and retrying in the background.
RESOLVE_SECONDS = 10.0
# Long operations on the destination (the bulk pull) are polled this often.
POLL_SECONDS = 0.1
# The commit is a digest comparison and a flush of the last few blocks at the destination: a few ms.
# Past this, the link is presumed lost and the outcome is asked for (migrate_status) instead.
COMMIT_TIMEOUT = 10.0


class MigrationError(Exception):
    """The migration did not happen; the source still owns the disk."""


@dataclass
class MigrationProgress:
    disk: str
    source: str
    dest: str
    mode: str
    phase: str = "prepare"
    total_bytes: int = 0
    done_bytes: int = 0
    bytes_on_wire: int = 0
    map_bytes: int = 0  # version-map data the destination's bulk pull received to find what differs
    bytes_from: dict[str, int] = field(default_factory=dict)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-peer bytes and rate of the bulk pull
    mirror_lag_blocks: int = 0
    mirrored_bytes: int = 0
    downtime_ms: float | None = None
    switchover_ms: dict[str, float] = field(default_factory=dict)  # where the guest's stall went, step by step
    switchover_blocks: int = 0  # dirty blocks shipped inside the freeze
    epoch: int | None = None
    throttled: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        return {"disk": self.disk, "from": self.source, "to": self.dest, "mode": self.mode, "phase": self.phase,
                "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
                "bytes_on_wire": self.bytes_on_wire + self.mirrored_bytes, "map_bytes": self.map_bytes,
                "bytes_from": self.bytes_from,
                "mirror_lag_blocks": self.mirror_lag_blocks, "downtime_ms": self.downtime_ms,
                "switchover_ms": self.switchover_ms, "switchover_blocks": self.switchover_blocks,
                "epoch": self.epoch, "throttled": self.throttled, "duration_s": round(end - self.started, 3),
                "error": self.error, "peers": self.peers}


class Shipper:
    """Pushes current blocks of a disk to the destination (put_blocks), measuring the rate it gets.

    Calls may overlap (mirror rounds and sync-mode writes): the destination keeps the newest version
    of each block whatever order batches arrive in. Shipments a guest write waits for (``urgent``) go
    first, as DRBD's resync yields to application writes: they do not queue for the window, no
    backlog batch starts while one is on its way, and while the guest's writes ship the backlog goes in
    small batches, so a guest write waits behind at most a few small backlog batches already sent.
    """

    def __init__(self, conn: PeerConnection, exp: Export, progress: MigrationProgress) -> None:
        self.conn, self.exp, self.progress = conn, exp, progress
        # Guest bytes (before compression) per second, unknown until a batch has gone out: the unit of
        # the dirty set and of the guest's pacing, so a compressible guest is not paced for nothing.
        self.rate = math.inf
        self._window = trio.Semaphore(SHIP_WINDOW)
        self._batch_blocks = max(1, SHIP_BATCH_BYTES // exp.store.block_size)
        self._contended_blocks = max(1, CONTENDED_BATCH_BYTES // exp.store.block_size)
        self._urgent = 0  # guest-write shipments on their way
        self._urgent_done = trio.Event()
        self._last_urgent = -math.inf  # trio time of the last guest-write shipment's start or end

    @property
    def rate_known(self) -> bool:
        return not math.isinf(self.rate)

    async def ship(self, blocks: npt.NDArray[np.int64], urgent: bool = False) -> None:
        """Send the current version of ``blocks`` (sorted, unique); ``urgent``: a guest write waits for it."""
        blocks = np.asarray(blocks, np.int64)
        if urgent:
            self._urgent += 1
            self._last_urgent = trio.current_time()
            try:
                await self._ship(blocks, urgent=True)
            finally:
                self._last_urgent = trio.current_time()
                self._urgent -= 1
                if not self._urgent:
                    self._urgent_done.set()
                    self._urgent_done = trio.Event()
            return
        await self._ship(blocks)

    async def _ship(self, blocks: npt.NDArray[np.int64], urgent: bool = False) -> None:
        t0, shipped = trio.current_time(), 0  # guest bytes, before compression
        try:
            async with trio.open_nursery() as nursery:
                k = 0
                while k < blocks.size:
                    step = self._batch_blocks
                    if not urgent:
                        if self._urgent:  # the backlog waits for the guest's writes, up to a point
                            with trio.move_on_after(BACKLOG_MAX_YIELD_SECONDS):
                                await self._urgent_done.wait()
                        await self._window.acquire()
                        if trio.current_time() - self._last_urgent < CONTENDED_SECONDS:
                            step = self._contended_blocks  # small batches: a guest write waits behind little
                    try:
                        batch, size, raw = await trio.to_thread.run_sync(self._pack, blocks[k:k + step])
                    except BaseException:
                        if not urgent:
                            self._window.release()
                        raise
                    k += step
                    shipped += raw
                    nursery.start_soon(self._send, batch, size, not urgent)
        except BaseExceptionGroup as eg:
            peer_errors, _ = eg.split(PeerError)
            if peer_errors is None:
                raise
            raise peer_errors.exceptions[0] from eg  # callers handle a failed shipment as one PeerError
        elapsed = trio.current_time() - t0
        if shipped >= SHIP_BATCH_BYTES and elapsed > 0:  # small shipments measure the round trip, not the link
            sample = shipped / elapsed
            self.rate = sample if not self.rate_known else 0.5 * self.rate + 0.5 * sample
        elif not self.rate_known and shipped and elapsed > 0:
            self.rate = shipped / elapsed  # a first, pessimistic estimate

    async def flush(self) -> None:
        """Ask the destination to make every block it holds durable."""
        await self.conn.request("put_blocks", {"disk": self.exp.name, "blocks": [], "flush": True},
                                timeout=REQUEST_TIMEOUT)

    def _pack(self, blocks: npt.NDArray[np.int64]) -> tuple[list[BlockEntry], int, int]:
        """One put_blocks batch: each block read and compressed, in a worker thread (a batch of
        compressible blocks is milliseconds of CPU the event loop must not spend). Returns the batch, its
        payload bytes and its guest bytes."""
        store, compressor = self.exp.store, zstandard.ZstdCompressor(level=BLOCK_ZSTD_LEVEL)
        batch: list[BlockEntry] = []
        size = raw = 0
        for index in blocks.tolist():
            rec = store.read_block(index)
            batch.append(entry := pack_entry(index, rec.version, rec.hash, rec.data, compressor))
            if rec.data is not None:
                size, raw = size + len(entry.payload or b""), raw + len(rec.data)
        return batch, size, raw

    async def _send(self, batch: list[BlockEntry], size: int, windowed: bool) -> None:
        try:
            await self.conn.request("put_blocks", {"disk": self.exp.name, "blocks": batch}, timeout=REQUEST_TIMEOUT)
        finally:
            if windowed:
                self._window.release()
        self.progress.mirrored_bytes += size


class SwitchGate:
    """Holds the disk migrations of one VM at the switchover, so that all of them switch over inside the
    VM's pause: each says when its destination export exists and when it has converged, then keeps
    mirroring until ``go``."""

    def __init__(self, disks: int) -> None:
        self._unprepared = self._unconverged = self._uncommitted = disks
        self.prepared, self.converged, self.go, self.committed = trio.Event(), trio.Event(), trio.Event(), trio.Event()
        if disks == 0:  # a VM whose disks are all at its destination already: only its memory moves
            for event in (self.prepared, self.converged, self.committed):
                event.set()

    def _count(self, name: str, event: trio.Event) -> None:
        left = getattr(self, name) - 1
        setattr(self, name, left)
        if left == 0:
            event.set()

    def mark_prepared(self) -> None:
        self._count("_unprepared", self.prepared)

    def mark_converged(self) -> None:
        self._count("_unconverged", self.converged)

    def mark_committed(self) -> None:
        self._count("_uncommitted", self.committed)


async def migrate_disk(swarm: Swarm, disk: str, dest: str, mode: str, max_downtime_ms: float,
                       progress: MigrationProgress, gate: SwitchGate | None = None) -> None:
    """Move ownership of ``disk`` from this host to ``dest`` while the guest keeps running (with a
    ``gate``, one of a VM's disks: the switchover waits for the gate)."""
    ctl = swarm.ctl
    exp = ctl.get(disk)
    if exp is None:
        raise MigrationError(f"host {swarm.name} holds no disk named {disk!r}")
    store = exp.store
    pending = read_pending(store.directory)
    if pending is not None:
        raise MigrationError(f"the migration of {disk} to {pending['dest']} is unresolved; writes stay fenced "
                             f"until {pending['dest']} answers")
    if store.owner != swarm.name or exp.mode is not ExportMode.PRIMARY:
        raise MigrationError(f"host {swarm.name} does not own {disk} (its owner is {store.owner or 'unknown'})")
    if dest == swarm.name:
        raise MigrationError(f"{disk} is already on {dest}")
    try:
        conn = await swarm.connect(dest)
        chain = await trio.to_thread.run_sync(swarm.ownership.local, store)
        assert chain is not None  # owned here: ownership.local starts a chain if there is none
        await conn.request("migrate_prepare", {"disk": disk, "epoch": store.epoch, "size": store.size,
                                               "block_size": store.block_size, "mode": mode,
                                               "deeds": chain.raws()})
    except PeerError as e:
        raise MigrationError(f"cannot start the migration on {dest}: {e.message}") from e
    shipper = Shipper(conn, exp, progress)
    committed = False
    try:
        if gate is not None:
            gate.mark_prepared()
        dirty = DirtyBlocks(store, since=store.counter)  # what the guest writes from here on
        await _bulk(conn, disk, progress)
        progress.phase = "mirror"
        await _mirror(exp, shipper, dirty, mode, max_downtime_ms, progress)
        if gate is not None:
            progress.phase = "ready"
            gate.mark_converged()
            await _hold(exp, shipper, dirty, gate)
        committed = await _switchover(swarm, conn, exp, shipper, dirty, progress)
        if gate is not None:
            gate.mark_committed()
    finally:
        exp.after_write = None
        if not committed:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await conn.request("migrate_abort", {"disk": disk}, timeout=5)
                except PeerError:
                    pass


class DirtyBlocks:
    """Blocks the guest wrote that the destination may not have yet, found through the store's change
    feed (no per-write bookkeeping) and kept as a sorted numpy array: what a mirror round ships costs what
    was written, never the disk's size."""

    def __init__(self, store: ReplicaStore, since: int) -> None:
        self.store, self.since = store, since
        self.blocks = np.zeros(0, np.int64)
        self.upto: int | None = None  # sync mode: writes after this version are shipped by the write itself

    def collect(self) -> None:
        """Add the blocks written since the last collect (up to ``upto``)."""
        if self.upto is not None and self.since >= self.upto:
            return
        new, counter = self.store.changed_blocks(self.since, self.upto)
        self.since = counter if self.upto is None else min(counter, self.upto)
        if new.size:
            self.blocks = np.union1d(self.blocks, new)

    def take(self, limit: int | None = None) -> npt.NDArray[np.int64]:
        """Remove and return the first ``limit`` blocks (all of them by default)."""
        out = self.blocks if limit is None else self.blocks[:limit]
        self.blocks = self.blocks[out.size:]
        return out

    def add(self, blocks: npt.NDArray[np.int64]) -> None:
        self.blocks = np.union1d(self.blocks, blocks)

    def discard(self, blocks: npt.NDArray[np.int64]) -> None:
        if self.blocks.size:
            self.blocks = np.setdiff1d(self.blocks, blocks, assume_unique=True)

    def __len__(self) -> int:
        return int(self.blocks.size)


async def _bulk(conn: PeerConnection, disk: str, progress: MigrationProgress) -> None:
    """The destination pulls every missing or stale block from all holders at once."""
    progress.phase = "bulk"
    job = (await conn.request("migrate_pull", {"disk": disk}))["job"]
    await failpoints.pause("migrate.bulk")
    while True:
        res = await conn.request("migrate_job", {"disk": disk, "job": job})
        progress.total_bytes, progress.done_bytes = res["total_bytes"], res["done_bytes"]
        progress.bytes_on_wire, progress.bytes_from = res["bytes_on_wire"], dict(res["bytes_from"])
        progress.map_bytes = int(res.get("map_bytes", 0))
        progress.peers = dict(res["peers"])
        if res["done"]:
            if res["error"]:
                raise MigrationError(f"the bulk copy to {progress.dest} failed: {res['error']}")
            return
        await trio.sleep(POLL_SECONDS)


async def _mirror(exp: Export, shipper: Shipper, dirty: DirtyBlocks, mode: str, max_downtime_ms: float,
                  progress: MigrationProgress) -> None:
    """Ship what the guest writes until the rest fits in the downtime budget.

    Sync mode makes every write wait for its own shipment from the start of this phase, so the guest
    is paced by the link and only what was dirtied during the bulk copy is left to the rounds here.
    The first time the rest fits, the destination is asked to make everything it holds durable and to
    digest it (the bulk pull left it in the page cache), so that costs nothing at switchover. Each round
    digests what it shipped here too, so the freeze finds both trees nearly up to date.
    """
    bs = exp.store.block_size
    budget_s = max_downtime_ms / 1000 * FINAL_SHIP_SHARE
    history: list[int] = []
    dest_flushed = False
    if mode == "sync":
        exp.after_write = _sync_hook(shipper, dirty)
        dirty.upto = exp.store.counter  # read after the hook is set: later writes ship themselves
    await failpoints.pause("migrate.mirror")

    def fits() -> bool:
        return not len(dirty) or (shipper.rate_known and len(dirty) * bs <= shipper.rate * budget_s)

    while True:
        dirty.collect()
        progress.mirror_lag_blocks = len(dirty)
        if fits():
            if not dest_flushed:
                await shipper.flush()
                dest_flushed = True
                continue
            await _tighten(shipper, dirty)
            dirty.collect()
            if fits():
                await trio.to_thread.run_sync(exp.store.refresh_tree)
                return
        history.append(len(dirty))
        if (mode == "async" and exp.after_write is None and len(history) > NO_PROGRESS_ROUNDS
                and history[-1] >= history[-1 - NO_PROGRESS_ROUNDS]):
            exp.after_write = _throttle_hook(shipper, bs)  # the guest outruns the link: pace it
            progress.throttled = True
        await shipper.ship(_take_round(dirty, shipper, bs))
        await trio.to_thread.run_sync(exp.store.refresh_tree)


async def _hold(exp: Export, shipper: Shipper, dirty: DirtyBlocks, gate: SwitchGate) -> None:
    """Converged: keep shipping what the guest writes, round by round, until the gate opens (the VM's
    memory is being copied meanwhile, and the guest still writes)."""
    while not gate.go.is_set():
        with trio.move_on_after(HOLD_ROUND_SECONDS):
            await gate.go.wait()
        dirty.collect()
        if len(dirty) and not gate.go.is_set():
            await shipper.ship(_take_round(dirty, shipper, exp.store.block_size))
            await trio.to_thread.run_sync(exp.store.refresh_tree)


def _take_round(dirty: DirtyBlocks, shipper: Shipper, block_size: int) -> npt.NDArray[np.int64]:
    """Remove and return one round's worth of dirty blocks (all of them while the rate is unknown)."""
    if not shipper.rate_known:
        return dirty.take()
    return dirty.take(max(1, int(max(shipper.rate * MIRROR_ROUND_SECONDS, SHIP_BATCH_BYTES) // block_size)))


async def _tighten(shipper: Shipper, dirty: DirtyBlocks) -> None:
    """Already within budget: ship rounds while they still shrink the dirty set, so the freeze finds
    only what the guest wrote during the last, shortest round."""
    for _ in range(MAX_TIGHTEN_ROUNDS):
        if len(dirty) <= 1:
            return
        before = len(dirty)
        await shipper.ship(dirty.take())
        dirty.collect()
        if len(dirty) >= before:
            return


def _sync_hook(shipper: Shipper, dirty: DirtyBlocks) -> Any:
    """Ship each write's blocks before it is acknowledged (sync mode).

    A shipped block leaves the dirty set: every write ships the block's current version (at least its
    own) before its acknowledgement, so nothing acknowledged is left behind. If the destination fails,
    the write is still acknowledged: it is applied here, and this host is still the owner. The block
    goes back to the dirty set, and the migration fails on its next shipment.
    """
    async def ship_before_ack(res: WriteResult) -> None:
        blocks = np.arange(res.first_block, res.last_block + 1, dtype=np.int64)
        try:
            await shipper.ship(blocks, urgent=True)
            dirty.discard(blocks)
        except PeerError as e:
            log.warning("sync mirror to %s failed (%s); the guest goes on, the migration will fail",
                        shipper.progress.dest, e.message)
            shipper.exp.after_write = None
            dirty.upto = None  # every later write is the rounds' to ship again
            dirty.add(blocks)
    return ship_before_ack


def _throttle_hook(shipper: Shipper, block_size: int) -> Any:
    from p2pvbd.base.pacing import TokenBucket

    bucket = TokenBucket(max(shipper.rate * THROTTLE_FRACTION, block_size))

    async def pace(res: WriteResult) -> None:
        await bucket.take((res.last_block - res.first_block + 1) * block_size)
    return pace


async def _switchover(swarm: Swarm, conn: PeerConnection, exp: Export, shipper: Shipper, dirty: DirtyBlocks,
                      progress: MigrationProgress) -> bool:
    """Freeze, ship the rest, commit at the destination, hand ownership over; True once committed.

    The guest's stall runs from the freeze to the thaw. Everything that can happen before it does:
    the pending marker is written first, and the destination flushed and digested its data during the
    mirror. Inside, both sides digest only the leaves written since, and the destination compares roots.
    """
    ctl, store, disk, dest = swarm.ctl, exp.store, exp.name, progress.dest
    progress.phase = "switchover"
    epoch = store.epoch + 1
    # before the commit can exist, a restart must find it (an fsync: off the event loop)
    await trio.to_thread.run_sync(write_pending, store.directory, dest, epoch)
    chain = await trio.to_thread.run_sync(swarm.ownership.local, store)
    assert chain is not None  # owned here
    deed = swarm.ownership.hand_link(chain, dest, epoch)  # signed before the pause, sent with the commit
    steps = progress.switchover_ms
    t0 = clock = trio.current_time()

    def step(name: str) -> None:
        nonlocal clock
        now = trio.current_time()
        steps[name] = round((now - clock) * 1000, 2)
        clock = now

    with trio.fail_after(FREEZE_TIMEOUT):
        await ctl.freeze(disk, flush=False)  # the destination makes the data durable
    # Fenced from here on: even if the freeze watchdog thaws the export, no write is taken before the
    # commit's outcome is known.
    ctl.set_mode(disk, ExportMode.INCOMING)
    exp.after_write = None
    outcome: bool | None = False
    try:
        await failpoints.pause("migrate.switchover")  # inside the try: a cancelled pause still thaws
        step("freeze")
        dirty.collect()  # in sync mode, writes after `upto` were shipped before their acknowledgement
        n_dirty = len(dirty)
        await shipper.ship(dirty.take())
        digest = await trio.to_thread.run_sync(_root, store)  # digests only the leaves written since the mirror's
        step("ship")
        progress.switchover_blocks = n_dirty
        outcome = None  # from the moment the commit is sent, only the destination knows
        outcome = await _commit(conn, disk, epoch, digest, store.counter, deed, shipper)
        step("commit")
        if outcome is None:
            outcome = await _resolve(swarm, disk, dest, epoch)
        if not outcome:
            raise MigrationError(f"{dest} did not take {disk} over; this host still owns it")
        hand_over(swarm, exp, dest)
        progress.epoch = epoch
    finally:
        if outcome is False:  # never committed: the source owns the disk, as before
            pending_path(store.directory).unlink(missing_ok=True)
            ctl.set_mode(disk, ExportMode.PRIMARY)
        elif outcome is None:  # unknown (cancelled, or the destination unreachable): fenced until it answers
            swarm.migration_target.resolve_later(disk, dest, epoch)
        ctl.thaw(disk)
        progress.downtime_ms = round((trio.current_time() - t0) * 1000, 2)
    await record_hand_over(swarm, exp, dest, epoch)
    return True


def _root(store: ReplicaStore) -> bytes:
    """The root digest of the (frozen) store's map, after digesting what changed since the last refresh."""
    store.refresh_tree()
    return store.map_summary()["root"]


async def _commit(conn: PeerConnection, disk: str, epoch: int, digest: bytes, counter: int, deed: bytes,
                  shipper: Shipper) -> bool | None:
    """True when committed, False when refused; None when the outcome is unknown (link lost).

    ``counter`` (this host's version counter) goes with the disk: the new owner never hands out a version
    this host already gave out. ``deed`` is the signed hand-over that proves the new owner's ownership."""
    try:
        for _ in range(MAX_COMMIT_ROUNDS):
            reply = await conn.request("migrate_commit", {"disk": disk, "epoch": epoch, "map_digest": digest,
                                                          "counter": counter, "deed": deed}, timeout=COMMIT_TIMEOUT)
            if reply["committed"]:
                return True
            missing = reply.get("missing")
            if not isinstance(missing, dict):
                return False
            try:
                blocks = unpack_blocks(missing, shipper.exp.store.n_blocks)
            except FrameError as e:
                raise PeerError("bad_reply", f"commit answer: {e}") from e
            if not blocks.size:
                return False
            await shipper.ship(blocks)
        return False
    except PeerError as e:
        log.warning("commit of %s: %s; resolving the outcome", disk, e.message)
        return None


async def _resolve(swarm: Swarm, disk: str, dest: str, epoch: int) -> bool:
    """Ask ``dest`` whether it committed ``epoch``, for a while; None if it cannot be told (still fenced)."""
    with trio.move_on_after(RESOLVE_SECONDS):
        while True:
            try:
                conn = await swarm.connect(dest)
                reply = await conn.request("migrate_status", {"disk": disk, "epoch": epoch}, timeout=5)
                return bool(reply["committed"])
            except PeerError:
                await trio.sleep(1.0)
    raise MigrationError(f"cannot tell whether {dest} took {disk} over; writes stay fenced until it answers")
