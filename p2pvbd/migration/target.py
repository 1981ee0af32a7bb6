"""The destination's side of a live migration, and the fencing a restarted source must respect.

Every op is registered with who may call it (swarm/access.py), checked against the peer's name from its
TLS certificate before the handler runs: only the disk's current owner may prepare a migration, only the
host that prepared it may push blocks, pull, commit or abort, and only a host that handed the disk here
may send its guests' I/O. A commit is granted only when this host's map has the frozen source's root
digest, and it is made durable (data flushed, owner, epoch, the source's counter and the hand-over
persisted) before the answer leaves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
import zstandard

from p2pvbd.kernel_hook_ctl import Export, ExportMode, HookError
from p2pvbd.migration import failpoints
from p2pvbd.migration.fetcher import SyncError, SyncProgress
from p2pvbd.migration.handover import PeerForwarder, hand_over, pending_path, read_pending, record_hand_over
from p2pvbd.migration.jobs import run_job
from p2pvbd.migration.pull import PullState, sync_disk
from p2pvbd.replica_store import HashMismatch, ReplicaStore, StaleVersion
from p2pvbd.store.map_tree import same_root
from p2pvbd.store.version_map import block_hash
from p2pvbd.swarm import access, maps
from p2pvbd.swarm.access import PeerOp
from p2pvbd.swarm.deeds import HAND, MAX_CHAIN_LINKS, Chain, DeedError
from p2pvbd.swarm.ownership import ERR_UNPROVEN, save_links
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.map_wire import MAX_ENTRY_BLOCKS, pack_blocks
from p2pvbd.wire.nbd_codec import NBD_EPERM
from p2pvbd.wire.peer_wire import (
    MAX_BLOCK_ENTRIES,
    MAX_GUEST_IO_BYTES,
    BlockEntry,
    FrameError,
    unpack_block,
    unpack_entry,
)

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

# A claimed disk's version counter jumps this far: more versions than a lost owner hands out between a
# replica's syncs (2**40 writes), and 2**23 claims still fit in a u64.
CLAIM_COUNTER_GAP = 2**40

# Blocks named in one "still missing" answer to a commit; the source ships them and asks again.
MAX_MISSING_REPLY = MAX_ENTRY_BLOCKS
# A restarted source asks the destination of its unfinished migration this often until it answers.
RESOLVE_RETRY_SECONDS = 2.0
# An incoming migration asks its source this often whether it still runs it: a source that restarted
# before its switchover, or whose abort was lost in a partition, never says it stopped. Each answer that
# it still does keeps writes held here waiting (kernel_hook_ctl.INCOMING_SILENCE_SECONDS); one small
# request per interval costs the source what a `status` does.
SOURCE_CHECK_SECONDS = 5.0
# Guest I/O relayed along a chain of hand-overs: a disk that moved office -> car -> home -> office has
# 3 hops; more means two hosts point at each other and the request must fail, not loop.
MAX_FORWARD_HOPS = 4
# The integer fields of each guest_io op (a write also carries its data).
GUEST_IO_FIELDS: dict[str, tuple[str, ...]] = {"read": ("offset", "length"), "write": ("offset",),
                                                "write_zeroes": ("offset", "length"), "trim": ("offset", "length"),
                                                "flush": ()}


@dataclass
class Incoming:
    source: str
    epoch: int
    chain: Chain  # the source's proof that it owns the disk at epoch, which its commit's hand-over extends
    job: int | None = None


class MigrationTarget:
    """Peer ops of the destination; registered with the swarm's peer server."""

    def __init__(self, swarm: Swarm, pulls: PullState) -> None:
        self.swarm, self.pulls = swarm, pulls
        self.incoming: dict[str, Incoming] = {}
        self.jobs: dict[int, SyncProgress] = {}
        self._nursery: trio.Nursery | None = None
        # commit, status and abort of one disk never interleave: "not committed" must stay true once said
        self._outcome_locks: dict[str, trio.Lock] = {}
        # Disks whose switchover outcome this host, their source, is asking for, and of which host.
        self.resolving: dict[str, str] = {}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for exp in self.swarm.ctl.exports():
                pending = read_pending(exp.store.directory)
                if pending is not None:
                    self.resolve_later(exp.name, pending["dest"], int(pending["epoch"]))
            task_status.started()
            await trio.sleep_forever()

    def ops(self) -> list[PeerOp]:
        """The migration ops and who may call each (swarm/access.py)."""
        return [PeerOp("migrate_prepare", access.current_owner, self.prepare, {"deeds": MAX_CHAIN_LINKS}),
                PeerOp("migrate_pull", access.migration_source, self.pull),
                PeerOp("migrate_job", access.migration_source, self.job),
                PeerOp("put_blocks", access.migration_source, self.put_blocks, {"blocks": MAX_BLOCK_ENTRIES}),
                PeerOp("migrate_commit", access.migration_source, self.commit),
                PeerOp("migrate_status", access.migration_party, self.status),
                PeerOp("migrate_abort", access.migration_source, self.abort),
                PeerOp("guest_io", access.handed_over, self.guest_io)]

    def _from_source(self, peer: str, disk: str) -> Incoming:
        inc = self.incoming.get(disk)
        if inc is None or inc.source != peer:
            raise PeerError("no_migration", f"no migration of {disk} from {peer} is under way here")
        self.swarm.ctl.heard_from_source(disk)
        return inc

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """Become the incoming replica of the caller's disk (``access.current_owner`` checked its deeds). A
        new replica takes its size and block size from the owner's own map summary, never from the
        request, so it is no bigger than a store the owner really has."""
        disk, epoch = body["disk"], int(body["epoch"])
        ctl, ownership = self.swarm.ctl, self.swarm.ownership
        exp = ctl.get(disk)
        try:  # checked by the rule: again here for the chain itself (its signatures are remembered)
            chain = await trio.to_thread.run_sync(ownership.check_offer, body["deeds"], disk,
                                                  exp.store if exp is not None else None)
        except DeedError as e:
            raise PeerError(ERR_UNPROVEN, f"{peer} does not prove it owns {disk}: {e}") from None
        if (chain.owner, chain.epoch) != (peer, epoch):
            raise PeerError(ERR_UNPROVEN, f"{peer}'s deeds for {disk} end at {chain.owner}, epoch {chain.epoch}")
        if exp is None:
            head = await access.caller_summary(self.swarm, peer, disk)  # within a store's limits (MapSummary)
            if (head.owner, head.epoch) != (peer, epoch):
                raise PeerError("stale", f"{peer}'s own map of {disk} names {head.owner} at epoch {head.epoch}")
            try:
                store = await trio.to_thread.run_sync(ReplicaStore.create, self.swarm.home.disk_dir(disk), disk,
                                                      head.size, head.block_size, peer, epoch)
            except ValueError as e:
                raise PeerError("bad_request", f"cannot hold {disk}: {e}") from e
            if (exp := ctl.get(disk)) is not None:  # a sync created one meanwhile
                await trio.to_thread.run_sync(store.abandon)
                raise PeerError("busy", f"a replica of {disk} appeared here meanwhile; try again")
            await trio.to_thread.run_sync(ownership.adopt, store, chain)
            exp = ctl.add_export(store, ExportMode.INCOMING)
        elif exp.store.owner == self.swarm.name or exp.store.epoch > epoch:
            raise PeerError("stale", f"{peer} is not the current owner of {disk} (here: {exp.store.owner or 'unknown'}"
                                     f" at epoch {exp.store.epoch})")  # it changed while the rule was checked
        elif (exp.store.size, exp.store.block_size) != (int(body["size"]), int(body["block_size"])):
            raise PeerError("geometry", f"this host's replica of {disk} has another size or block size")
        else:
            await trio.to_thread.run_sync(ownership.adopt, exp.store, chain)
            ctl.set_mode(disk, ExportMode.INCOMING)
        inc = self.incoming[disk] = Incoming(peer, epoch, chain)
        exp.read_through = PeerForwarder(self.swarm, peer, disk)
        self.swarm.request_publish()
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_source, disk, inc)
        return {"host": self.swarm.name}

    async def _watch_source(self, disk: str, inc: Incoming) -> None:
        """End ``inc`` once its source says it no longer migrates ``disk`` here (its map summary names the
        migration it runs). An unreachable source may still be migrating: only its answer ends ``inc``."""
        while True:
            await trio.sleep(SOURCE_CHECK_SECONDS)
            if self.incoming.get(disk) is not inc:
                return  # committed, aborted or prepared again
            try:
                conn = await self.swarm.connect(inc.source)
                reply = await conn.request("map_summary", {"disk": disk}, timeout=SOURCE_CHECK_SECONDS)
            except PeerError:
                continue
            running = reply.get("migration")
            if isinstance(running, dict) and running.get("to") == self.swarm.name:
                self.swarm.ctl.heard_from_source(disk)
                continue
            async with self._outcome_lock(disk):
                if self.incoming.get(disk) is inc:
                    log.info("%s: %s no longer migrates it here; dropping the incoming migration", disk, inc.source)
                    self._abort(inc.source, disk)
            return

    async def pull(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:

        inc = self._from_source(peer, body["disk"])
        job = max(self.jobs, default=0) + 1
        progress = self.jobs[job] = SyncProgress(body["disk"])
        inc.job = job
        assert self._nursery is not None
        self._nursery.start_soon(self._pull, body["disk"], progress)
        return {"job": job}

    async def _pull(self, disk: str, progress: SyncProgress) -> None:
        await run_job(f"the pull of incoming {disk}", progress,
                      partial(sync_disk, self.swarm, self.pulls, disk, progress),
                      (SyncError, PeerError, OSError, ValueError))

    async def job(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        inc = self._from_source(peer, body["disk"])
        progress = self.jobs.get(int(body["job"]))
        if progress is None or inc.job != body["job"]:
            raise PeerError("no_job", f"no job {body['job']} of the migration of {body['disk']} here")
        return progress.as_dict() | {"done": progress.finished is not None}

    async def put_blocks(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        disk = body["disk"]
        self._from_source(peer, disk)
        store = self._store(disk)
        try:
            items = [unpack_entry(item) for item in body["blocks"]]
        except FrameError as e:
            raise PeerError("bad_request", str(e)) from None
        for item in items:
            if item.hash is None:
                raise PeerError("bad_request", f"block {item.index}: a mirrored block carries its hash")
            if not 0 <= item.index < store.n_blocks:
                raise PeerError("bad_request", f"block {item.index} is outside {disk}")
        stored = await trio.to_thread.run_sync(_store_blocks, store, items) if items else 0
        if body.get("flush"):
            await trio.to_thread.run_sync(store.maintain)  # durable and digested before the switchover
        return {"stored": stored}

    def _outcome_lock(self, disk: str) -> trio.Lock:
        return self._outcome_locks.setdefault(disk, trio.Lock())

    async def commit(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """Take the disk over if this replica's map equals the frozen source's (its root digest): then
        durably (data flushed, owner, epoch and the source's counter persisted) before answering.
        Otherwise answer the blocks that differ, found by a descent of both trees (cost: the difference)."""
        disk, epoch = body["disk"], int(body["epoch"])
        digest, counter = body.get("map_digest"), body.get("counter", 0)
        if not isinstance(digest, bytes) or not isinstance(counter, int) or counter < 0:
            raise PeerError("bad_request", "a commit carries the source's map digest and its version counter")
        start = time.perf_counter()
        async with self._outcome_lock(disk):
            store = self._store(disk)
            if store.owner == self.swarm.name and store.epoch == epoch:
                return {"committed": True}  # a retried commit
            inc = self._from_source(peer, disk)
            if epoch != inc.epoch + 1:
                raise PeerError("stale", f"commit for epoch {epoch}, expected {inc.epoch + 1}")
            chain = self._handed_chain(inc, body.get("deed"), epoch)
            attempt = partial(_commit_if_equal, store, digest, self.swarm.name, epoch, counter, peer, chain)
            if not await trio.to_thread.run_sync(attempt):
                source = maps.RemoteMap(peer, await self.swarm.connect(peer), disk)
                differ = await maps.diff(maps.LocalMap(self.swarm.name, store), source, store.n_blocks)
                if differ.blocks.size:
                    return {"committed": False, "missing": pack_blocks(differ.blocks[:MAX_MISSING_REPLY])}
                # The descent found no difference: digest again (leaves shipped meanwhile were stale), and
                # still commit only if the root is the one the frozen source sent.
                if not await trio.to_thread.run_sync(attempt):
                    return {"committed": False}
            self._end_incoming(disk, ExportMode.PRIMARY)
            log.info("took %s over from %s at epoch %d (commit %.1f ms)", disk, peer, epoch,
                     (time.perf_counter() - start) * 1000)
            await failpoints.pause("migrate.commit_answer")  # a test hook, nothing normally
            return {"committed": True}

    def _handed_chain(self, inc: Incoming, deed: object, epoch: int) -> Chain:
        """The source's chain with its hand-over of the disk to this host at ``epoch`` (``deed``), which
        becomes this host's proof of owning it; PeerError if the deed is not that hand-over."""
        try:
            chain = self.swarm.ownership.checker.extend(inc.chain, deed, HAND)
        except DeedError as e:
            raise PeerError(ERR_UNPROVEN, f"the commit's hand-over is not valid: {e}") from None
        if (chain.owner, chain.epoch) != (self.swarm.name, epoch):
            raise PeerError(ERR_UNPROVEN, f"the commit's hand-over gives the disk to {chain.owner} at epoch "
                                          f"{chain.epoch}, not to {self.swarm.name} at epoch {epoch}")
        return chain

    async def status(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """Did this host commit ``epoch``? If not, it never will: the incoming migration is dropped."""
        disk, epoch = body["disk"], int(body["epoch"])
        async with self._outcome_lock(disk):
            exp = self.swarm.ctl.get(disk)
            committed = exp is not None and exp.store.owner == self.swarm.name and exp.store.epoch >= epoch
            if not committed:
                self._abort(peer, disk)
            return {"committed": committed}

    async def abort(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._outcome_lock(body["disk"]):
            self._abort(peer, body["disk"])
        return {}

    def _abort(self, peer: str, disk: str) -> None:
        inc = self.incoming.get(disk)
        if inc is not None and inc.source == peer:
            exp = self.swarm.ctl.get(disk)
            self._end_incoming(disk, ExportMode.STANDBY if exp is not None and exp.store.owner != self.swarm.name
                               else None)

    def _end_incoming(self, disk: str, mode: ExportMode | None) -> None:
        self.incoming.pop(disk, None)
        exp = self.swarm.ctl.get(disk)
        if exp is not None:
            exp.read_through = None
            if mode is ExportMode.PRIMARY:  # owner again (a migration back): nothing to forward any more
                exp.forward, exp.forwarded_clients, exp.forward_pids = None, frozenset(), frozenset()
            if mode is not None:
                self.swarm.ctl.set_mode(disk, mode)
        self.swarm.request_publish()

    async def guest_io(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """I/O of a guest still connected to an old owner, applied here if this host owns the disk.

        Ownership may have moved on since (a migration back, or further): then this host relays the
        request to the owner it handed over to, so the guest never sees an error however often it moves.
        """
        disk, hops = body["disk"], body.get("hops", 0)
        if not isinstance(hops, int) or isinstance(hops, bool) or not 0 <= hops <= MAX_FORWARD_HOPS:
            raise PeerError("bad_request", f"hops must be 0..{MAX_FORWARD_HOPS}")
        _check_guest_io(body)
        for _ in range(2):
            exp = self.swarm.ctl.get(disk)
            if exp is None:
                raise PeerError("no_disk", f"no disk {disk!r} here")
            if not self._owns(exp):
                if isinstance(exp.forward, PeerForwarder) and hops < MAX_FORWARD_HOPS:
                    try:
                        return await exp.forward.relay(body | {"hops": hops + 1})
                    except HookError as e:
                        raise PeerError("io", str(e)) from e
                raise PeerError("not_owner", f"{self.swarm.name} does not own {disk}")
            try:
                return await self._apply_guest_io(disk, body)
            except HookError as e:
                if e.errno == NBD_EPERM and not self._owns(exp):
                    continue  # handed over while the request was held: relay it
                raise PeerError("io", str(e)) from e
        raise PeerError("not_owner", f"{self.swarm.name} does not own {disk}")

    def _owns(self, exp: Export) -> bool:
        """Owner of the disk, and not in the instant between handing it over and recording that."""
        return exp.store.owner == self.swarm.name and exp.mode is not ExportMode.STANDBY

    async def _apply_guest_io(self, disk: str, body: dict[str, Any]) -> dict[str, Any]:
        op, ctl = body["op"], self.swarm.ctl
        if op == "read":
            return {"data": await ctl.read(disk, int(body["offset"]), int(body["length"]))}
        if op == "write":
            await ctl.write(disk, int(body["offset"]), bytes(body["data"]), bool(body.get("fua")))
        elif op == "write_zeroes":
            await ctl.write_zeroes(disk, int(body["offset"]), int(body["length"]), bool(body.get("fua")))
        elif op == "trim":
            await ctl.trim(disk, int(body["offset"]), int(body["length"]), bool(body.get("fua")))
        elif op == "flush":
            await ctl.flush(disk)
        else:
            raise PeerError("bad_request", f"unknown guest op {op!r}")
        # who acknowledged it: a forwarder learns from a new run that writes not yet flushed may be lost
        return {"owner": self.swarm.name, "run": self.swarm.run_id}

    def _store(self, disk: str) -> ReplicaStore:
        exp = self.swarm.ctl.get(disk)
        if exp is None:
            raise PeerError("no_disk", f"no disk {disk!r} here")
        return exp.store

    def resolve_later(self, disk: str, dest: str, epoch: int) -> None:
        """Keep ``disk`` fenced and ask ``dest`` in the background whether it committed ``epoch``."""
        self.swarm.ctl.set_mode(disk, ExportMode.INCOMING)  # reads only, writes held
        if disk not in self.resolving and self._nursery is not None:
            self.resolving[disk] = dest
            self._nursery.start_soon(self._resolve_pending, disk, dest, epoch)

    async def _resolve_pending(self, disk: str, dest: str, epoch: int) -> None:
        """A switchover whose outcome this source does not know: stay fenced until ``dest`` tells it."""
        try:
            await self._ask_outcome(disk, dest, epoch)
        finally:
            self.resolving.pop(disk, None)

    async def _ask_outcome(self, disk: str, dest: str, epoch: int) -> None:
        exp = self.swarm.ctl.get(disk)
        assert exp is not None
        while True:
            try:
                conn = await self.swarm.connect(dest)
                reply = await conn.request("migrate_status", {"disk": disk, "epoch": epoch}, timeout=10)
                break
            except PeerError as e:
                log.info("%s stays fenced: cannot reach %s (%s)", disk, dest, e.message)
                await trio.sleep(RESOLVE_RETRY_SECONDS)
        if reply["committed"]:
            hand_over(self.swarm, exp, dest)
            await record_hand_over(self.swarm, exp, dest, epoch)
            log.info("%s: %s had taken it over; this host is a standby now", disk, dest)
        else:
            pending_path(exp.store.directory).unlink(missing_ok=True)
            self.swarm.ctl.set_mode(disk, ExportMode.PRIMARY)
            log.info("%s: the migration to %s never committed; this host owns it again", disk, dest)

    async def claim(self, disk: str) -> dict[str, Any]:
        """`p2pvbd disk claim DISK`: take over a disk whose owner the founder revoked (a stolen machine),
        from this host's replica. Its counter jumps past any version the lost owner may have handed out
        since this replica last heard from it, so no version means two contents."""
        exp = self.swarm.ctl.get(disk)
        if exp is None:
            raise PeerError("no_disk", f"{self.swarm.name} holds no replica of {disk}: claim it on a host that does")
        store = exp.store
        if store.owner == self.swarm.name:
            raise PeerError("bad_request", f"{self.swarm.name} owns {disk} already")
        records = await self.swarm.dht.lookup("owner", disk)  # the revoked owner's records are dropped on read
        newer = max([(int(r.payload["epoch"]), str(r.payload["host"])) for r in records
                     if r.publisher != self.swarm.name and int(r.payload["epoch"]) > store.epoch], default=None)
        lost = store.owner
        if newer is not None or not self.swarm.revoked.revokes(lost):
            owner = newer[1] if newer is not None else lost
            raise PeerError("bad_request", f"{disk} is owned by {owner}, which is not revoked: move it with "
                                           f"'p2pvbd migrate' there, or revoke {owner} on the swarm's founder")
        epoch = store.epoch + 1
        pending_path(store.directory).unlink(missing_ok=True)
        counter = store.counter + CLAIM_COUNTER_GAP
        await trio.to_thread.run_sync(self.swarm.ownership.claimed, store, epoch, counter)
        exp.forward, exp.forwarded_clients, exp.forward_pids = None, frozenset(), frozenset()
        self.swarm.ctl.set_mode(disk, ExportMode.PRIMARY)
        self.swarm.request_publish()
        log.warning("claimed %s from the revoked host %s at epoch %d", disk, lost, epoch)
        return {"disk": disk, "owner": self.swarm.name, "epoch": epoch, "held_blocks": store.held_blocks,
                "total_blocks": store.n_blocks}


def _commit_if_equal(store: ReplicaStore, digest: bytes, owner: str, epoch: int, counter: int, source: str,
                     chain: Chain) -> bool:
    """Take ownership if this replica's map has root ``digest``, durably: data first, then the deeds
    proving it, then owner, epoch, counter and the host it came from (whose guests' I/O is then taken
    here). One thread hop for the whole commit; the tree digests only what the last shipments changed."""
    store.refresh_tree()
    if not same_root(store.map_summary()["root"], digest):
        return False
    store.flush()
    save_links(store.directory, chain)
    store.set_owner(owner, epoch, counter, handed_from=source)
    return True


def _check_guest_io(body: dict[str, Any]) -> None:
    """A guest_io body's fields, typed and bounded before anything is read or written."""
    op = body["op"]
    fields = GUEST_IO_FIELDS.get(op)
    if fields is None:
        raise PeerError("bad_request", f"unknown guest op {op!r}")
    for name in fields:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PeerError("bad_request", f"guest_io {op}: {name} must be a non-negative integer")
    if op == "write" and not isinstance(body.get("data"), bytes):
        raise PeerError("bad_request", "guest_io write: data must be bytes")
    size = len(body["data"]) if op == "write" else body["length"] if op == "read" else 0
    if size > MAX_GUEST_IO_BYTES:
        raise PeerError(access.ERR_TOO_LARGE, f"guest_io moves at most {MAX_GUEST_IO_BYTES} bytes per request")


def _store_blocks(store: ReplicaStore, items: list[BlockEntry]) -> int:
    """Decode, check and store mirrored blocks, in a worker thread (decompressing and hashing a batch is
    milliseconds of CPU the event loop must not spend). Returns how many changed the replica."""
    decompressor = zstandard.ZstdDecompressor()
    stored = 0
    for index, version, digest, payload, encoding in items:
        assert digest is not None  # put_blocks refused entries without one
        try:
            data = None if payload is None else unpack_block(encoding, payload, _length(store, index), decompressor)
            if data is not None and block_hash(data) != digest:
                raise HashMismatch("payload does not match its hash")
            stored += store.put_block(index, version, data, digest, verified=data is not None)
        except StaleVersion:
            continue  # a newer version of this block already arrived
        except (HashMismatch, FrameError) as e:
            raise PeerError("bad_block", f"block {index}: {e}") from e
    return stored


def _length(store: ReplicaStore, index: int) -> int:
    return min(store.block_size, store.size - index * store.block_size)
