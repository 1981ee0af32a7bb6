"""Bring this host's replica of a disk to the owner's current versions: find what differs, then pull it.

What differs is found at the cost of what changed, never of the disk's size:

* a replica that synced before, against the same owner in the same opening of its store, asks the
  owner's **change feed** for the blocks whose version is above the generation it reached then (an idle
  warm replica: one small request, answered from the owner's per-leaf newest versions);
* an empty replica asks the feed from version 0: the blocks the owner ever wrote;
* any other replica (after a restart, a new owner, a partial copy) **descends** both map trees under
  the nodes whose digests differ.

Then each other holder is asked for its versions of just those blocks, the planner splits them among
all peers, and the fetcher pulls them in parallel (fetcher.py). Success is reported only once what was
fetched is durable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import trio

from p2pvbd.migration.fetcher import Fetcher, PeerProgress, SyncError, SyncProgress
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.store.map_tree import same_records
from p2pvbd.store.version_map import BlockEntries
from p2pvbd.swarm import maps
from p2pvbd.swarm.peer_transport import PeerError

if TYPE_CHECKING:
    from p2pvbd.swarm.deeds import Chain
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

# Local dedup scans this replica's whole map (a few hundred ms at 1 TiB); it pays off only when the
# blocks to pull are at least this fraction of the disk (at 1 TiB: 1 GiB, which takes 10 s even at
# 1 Gbit/s). Smaller pulls fetch duplicates instead.
DEDUP_MIN_FRACTION = 1 / 1024
# A sync of a disk the index does not know yet waits this long for its owner record: a new disk is
# published at once and reaches every host within a second or two, a lost record within 15 s (the
# publish interval); beyond that the name is wrong.
INDEX_WAIT_SECONDS = 20.0
INDEX_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Synced:
    """This replica holds every block the owner had at or below ``generation`` (that opening of its store)."""

    owner: str
    epoch: int
    boot: str
    generation: int


# A rate measured on less than this says more about the request's latency than about the path's speed:
# one request's worth (sync_planner.MAX_REQUEST_BYTES).
MIN_RATE_SAMPLE_BYTES = 1 << 20


class PullState:
    """Per disk: what the last successful pull reached, and one pull at a time."""

    def __init__(self) -> None:
        self.synced: dict[str, Synced] = {}
        self._locks: dict[str, trio.Lock] = {}
        # Each peer's delivery rate in the last pull it served much of (bytes/s, over whatever path it is
        # reached by: direct, reversed or relayed): the next pull's planner starts from it, `peers` shows it.
        self.rates: dict[str, float] = {}

    def measured(self, progress: SyncProgress, seconds: float) -> None:
        """Remember the rates ``progress``'s peers delivered at over a pull that took ``seconds``."""
        for name, peer in progress.peers.items():
            if peer.bytes >= MIN_RATE_SAMPLE_BYTES and seconds > 0 and not peer.dropped:
                self.rates[name] = peer.bytes / seconds

    def lock(self, disk: str) -> trio.Lock:
        return self._locks.setdefault(disk, trio.Lock())

    def synced_owner(self, disk: str) -> str | None:
        last = self.synced.get(disk)
        return last.owner if last is not None else None

    def forget(self, disk: str) -> None:
        self.synced.pop(disk, None)


async def sync_disk(swarm: Swarm, pulls: PullState, disk: str, progress: SyncProgress,
                    sources: list[str] | None = None, background: bool = False) -> None:
    """Make this host's replica of ``disk`` equal to the owner's current versions.

    Creates the replica (a standby export) when this host has none. ``sources`` limits the peers
    blocks may come from; by default every host holding a replica, the owner included. A
    ``background`` sync (a replication policy's) is paced by the owner to the policy's rate and, when
    it continues an earlier pull, asks nothing of the index: the owner's answer says if it moved on.
    """
    async with pulls.lock(disk):
        await _sync(swarm, pulls, disk, progress, sources, background)


async def _sync(swarm: Swarm, pulls: PullState, disk: str, progress: SyncProgress, sources: list[str] | None,
                background: bool) -> None:
    last = pulls.synced.get(disk)
    exp = swarm.ctl.get(disk)
    if background and last is not None and exp is not None:
        owner, epoch = last.owner, last.epoch
    else:
        owner, epoch = await swarm.owner_of(disk)
        # a disk created a moment ago on another host reaches the index within a second or two
        with trio.move_on_after(0 if background else INDEX_WAIT_SECONDS):
            while not owner:
                await trio.sleep(INDEX_POLL_SECONDS)
                owner, epoch = await swarm.owner_of(disk)
    if not owner:
        raise SyncError(f"no disk named {disk!r} in the swarm (the index has no owner for it)")
    if owner == swarm.name:
        raise SyncError(f"this host owns {disk}: its replica is the reference every other replica syncs to")
    chain = await _proven_owner(swarm, disk, exp.store if exp is not None else None, owner, epoch)
    if chain is not None:
        epoch = chain.epoch
    candidates = await _candidates(swarm, disk, owner, sources) if sources else None  # a bad --from fails first
    progress.phase = "maps"
    owner_map = await swarm.map_of(owner, disk)
    store = await _replica(swarm, disk, owner, epoch, owner_map, chain)
    summary, target, wanted = await _differing(swarm, store, disk, owner_map, last)
    progress.map_bytes += owner_map.received
    if summary.owner != owner:
        pulls.forget(disk)
        raise SyncError(f"{owner} no longer owns {disk} (it says {summary.owner or 'nobody'}); the next sync "
                        "asks the index")
    if len(wanted):
        candidates = candidates or await _candidates(swarm, disk, owner, sources)
        peer_versions = await _peer_versions(swarm, disk, owner, wanted, candidates, progress)
        dedup = store.live_map() if len(wanted) >= store.n_blocks * DEDUP_MIN_FRACTION else None
        pulling = time.monotonic()
        await Fetcher(swarm, store, owner, wanted, target, peer_versions, progress, background, dedup,
                      rates=pulls.rates).run()
        pulls.measured(progress, time.monotonic() - pulling)
        await trio.to_thread.run_sync(store.flush)  # reported done only once durable
        swarm.request_publish()
    progress.phase = "done"
    pulls.synced[disk] = Synced(owner, max(epoch, summary.epoch), summary.boot, summary.generation)


async def _proven_owner(swarm: Swarm, disk: str, recorded: ReplicaStore | None, owner: str, epoch: int
                        ) -> Chain | None:
    """The owner's chain of deeds when it is not the owner this replica records (None when it is): a
    replica follows a new owner only through a chain that contains the hand-over it holds (an owner
    record in the index is any member's claim)."""
    if recorded is not None and (recorded.owner, recorded.epoch) == (owner, epoch):
        return None
    try:
        return await swarm.ownership.prove(swarm, owner, disk, recorded)
    except PeerError as e:
        here = f" (this replica's owner is {recorded.owner} at epoch {recorded.epoch})" if recorded is not None else ""
        raise SyncError(f"cannot follow {owner} as the owner of {disk}: {e.message}{here}") from None


async def _replica(swarm: Swarm, disk: str, owner: str, epoch: int, owner_map: maps.MapSource, chain: Chain | None
                   ) -> ReplicaStore:
    """This host's replica of ``disk``, created (off the event loop) as a standby when there is none,
    recording the owner ``chain`` proves (if any: the chain first, then the owner)."""
    from p2pvbd.kernel_hook_ctl import ExportMode

    exp = swarm.ctl.get(disk)
    if exp is None:
        head = await owner_map.summary()
        store = await trio.to_thread.run_sync(ReplicaStore.create, swarm.home.disk_dir(disk), disk, head.size,
                                              head.block_size, owner, epoch)
        if swarm.ctl.get(disk) is not None:  # created meanwhile (a migration's prepare): use that one
            await trio.to_thread.run_sync(store.abandon)
            raise SyncError(f"a replica of {disk} appeared here during the sync; sync again")
        if chain is not None:
            await trio.to_thread.run_sync(swarm.ownership.adopt, store, chain)
        swarm.ctl.add_export(store, ExportMode.STANDBY)
        swarm.request_publish()
        return store
    store = exp.store
    if chain is not None and chain.epoch >= store.epoch:
        await trio.to_thread.run_sync(swarm.ownership.adopt, store, chain)
    return store


async def _differing(swarm: Swarm, store: ReplicaStore, disk: str, owner_map: maps.MapSource, last: Synced | None
                     ) -> tuple[maps.MapSummary, BlockEntries, BlockEntries]:
    """The owner's summary, and this replica's and the owner's entries of the blocks where they differ."""
    bs, size = store.block_size, store.size
    if last is not None and last.owner == owner_map.name:
        changes = await owner_map.changes(last.generation)
        summary = changes.summary
        if summary.boot == last.boot:
            return summary, *await _versus(store, changes.blocks, changes.records)
    if store.held_blocks == 0:
        changes = await owner_map.changes(0)
        summary = changes.summary
        _check_geometry(store, summary)
        return summary, *await _versus(store, changes.blocks, changes.records)
    summary = await owner_map.summary()
    _check_geometry(store, summary)
    mine = await maps.LocalMap(swarm.name, store).summary()
    d = await maps.diff(maps.LocalMap(swarm.name, store), owner_map, store.n_blocks, (mine.root, summary.root))
    return (summary, BlockEntries.from_records(bs, size, d.blocks, d.a),
            BlockEntries.from_records(bs, size, d.blocks, d.b))


async def _versus(store: ReplicaStore, blocks: npt.NDArray[np.int64], owner_records: npt.NDArray[np.void]
                  ) -> tuple[BlockEntries, BlockEntries]:
    """Of the owner's changed ``blocks``, those this replica does not hold as the owner does."""
    mine = await trio.to_thread.run_sync(store.map_entries, blocks)
    differ = ~same_records(mine, owner_records)
    bs, size, blocks = store.block_size, store.size, blocks[differ]
    return (BlockEntries.from_records(bs, size, blocks, mine[differ]),
            BlockEntries.from_records(bs, size, blocks, owner_records[differ]))


def _check_geometry(store: ReplicaStore, summary: maps.MapSummary) -> None:
    if (store.size, store.block_size) != (summary.size, summary.block_size):
        raise SyncError(f"this host's replica of {store.name} has another geometry than the owner's")


async def _candidates(swarm: Swarm, disk: str, owner: str, sources: list[str] | None) -> list[str]:
    """The hosts blocks may come from: every holder and the owner, or those of ``sources``."""
    candidates = [h for h in await swarm.holders_of(disk) if h != swarm.name]
    if owner not in candidates:
        candidates.append(owner)
    if sources:
        unknown = sorted(set(sources) - set(candidates))
        if unknown:
            raise SyncError(f"{', '.join(unknown)} hold(s) no replica of {disk}")
        candidates = [h for h in candidates if h in sources]
    return candidates


async def _peer_versions(swarm: Swarm, disk: str, owner: str, wanted: BlockEntries, candidates: list[str],
                         progress: SyncProgress) -> dict[str, npt.NDArray[np.uint64]]:
    """Each candidate source's versions of the wanted blocks (the owner's are the wanted ones)."""
    out: dict[str, npt.NDArray[np.uint64]] = {owner: wanted.versions} if owner in candidates else {}

    async def ask(host: str) -> None:
        try:
            source = await swarm.map_of(host, disk)
            records = await source.entries(wanted.blocks)
            progress.map_bytes += source.received
            out[host] = records["version"].astype(np.uint64)
        except (PeerError, trio.TooSlowError) as e:
            progress.peers[host] = PeerProgress(dropped=True, error=getattr(e, "message", "timed out"))

    async with trio.open_nursery() as nursery:
        for host in candidates:
            if host not in out:
                nursery.start_soon(ask, host)
    return out
