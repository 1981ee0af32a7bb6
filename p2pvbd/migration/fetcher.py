"""Multi-peer pull: fetch the blocks a replica lacks from many peers at once (migration/pull.py decides
which blocks those are, by comparing maps).

The pure planner decides which block comes from whom; this module executes that plan over peer
links: a few pipelined get_blocks requests per peer, every block checked against the owner's hash
before it enters the store, bad blocks counted against their sender and fetched elsewhere. Requests made
useless by another peer's answer (endgame duplicates) are cancelled, and the sync ends as soon as every
block is in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import trio
import zstandard

from p2pvbd.migration import failpoints
from p2pvbd.replica_store import HashMismatch, ReplicaStore, StaleVersion
from p2pvbd.store.store_journal import PEER_BLOCKS
from p2pvbd.store.version_map import BlockEntries, VersionMap, block_hash
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.sync_planner import FetchRequest, PeerInfo, SyncScheduler, plan_sync, request_bytes_for
from p2pvbd.wire.peer_wire import BlockEntry, FrameError, unpack_block, unpack_entry

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

# First guess of a peer's rate before any block arrived: the planner re-balances within a request or
# two, so the guess only shapes the first few requests. 10 MB/s is a modest LAN.
INITIAL_RATE = 10e6
# get_blocks requests in flight per peer (of sync_planner.MAX_REQUEST_BYTES each): enough to keep a link
# busy across one round trip, few enough that work stays stealable near the end.
INFLIGHT_PER_PEER = 4
# One request waits this long for its reply before its blocks go back to the pool (a stalled peer).
REQUEST_TIMEOUT = 30.0
# Requests to one peer failing in a row (timeouts, protocol errors) before it is dropped from the sync.
MAX_CONSECUTIVE_FAILURES = 3
# An idle worker re-asks the scheduler at least this often (work may be stolen or freed meanwhile).
IDLE_POLL = 0.05


class SyncError(Exception):
    """The sync cannot complete; the message says why."""


@dataclass
class PeerProgress:
    bytes: int = 0
    blocks: int = 0
    bad_blocks: int = 0
    dropped: bool = False
    error: str = ""

    def as_dict(self, elapsed: float) -> dict[str, Any]:
        return {"bytes": self.bytes, "blocks": self.blocks, "bad_blocks": self.bad_blocks,
                "rate": self.bytes / elapsed if elapsed > 0 else 0.0, "dropped": self.dropped,
                "error": self.error}


@dataclass
class SyncProgress:
    """Live state of one sync, read by `p2pvbd sync`'s progress bar and by `status`."""

    disk: str
    phase: str = "planning"
    total_bytes: int = 0
    done_bytes: int = 0
    blocks_fetched: int = 0
    zero_blocks: int = 0
    local_copies: int = 0
    bytes_on_wire: int = 0
    map_bytes: int = 0  # version-map data received to find what differs (summaries, digests, records)
    peers: dict[str, PeerProgress] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str = ""
    started_at: float = field(default_factory=time.time)  # wall clock, for `jobs` and logs

    def as_dict(self) -> dict[str, Any]:
        elapsed = (self.finished or time.monotonic()) - self.started
        return {"disk": self.disk, "phase": self.phase, "total_bytes": self.total_bytes,
                "started_at": self.started_at,
                "finished_at": self.started_at + elapsed if self.finished is not None else None,
                "done_bytes": self.done_bytes, "blocks_fetched": self.blocks_fetched,
                "zero_blocks": self.zero_blocks, "local_copies": self.local_copies,
                "bytes_on_wire": self.bytes_on_wire, "map_bytes": self.map_bytes, "duration_s": round(elapsed, 3),
                "bytes_from": {p: v.bytes for p, v in self.peers.items()},
                "peers": {p: v.as_dict(elapsed) for p, v in self.peers.items()}, "error": self.error}


class Fetcher:
    """One sync of one disk: executes the plan for the blocks where this replica differs from the owner.

    ``owner`` holds the owner's versions and hashes of those blocks, ``target`` this replica's; each
    peer's versions of the same blocks are in ``peer_versions``. ``dedup`` (this replica's whole map, or
    None) lets the planner copy content this replica already holds elsewhere."""

    def __init__(self, swarm: Swarm, store: ReplicaStore, owner_name: str, owner: BlockEntries, target: BlockEntries,
                 peer_versions: dict[str, npt.NDArray[np.uint64]], progress: SyncProgress, background: bool = False,
                 dedup: VersionMap | None = None, rates: Mapping[str, float] | None = None) -> None:
        self.swarm, self.store, self.owner_map, self.target, self.progress = swarm, store, owner, target, progress
        self.owner = owner_name
        # What each peer delivered in earlier pulls, over its current path: the plan starts from it.
        self.rates = rates or {}
        self._failures: dict[str, int] = {}
        self.background = background
        self.peer_versions = peer_versions
        self.dedup = dedup
        self._wake = trio.Event()
        # Cancel scopes of the requests in flight, so one made useless by another peer's answer is dropped.
        self._inflight: dict[FetchRequest, trio.CancelScope] = {}

    async def run(self) -> None:
        rates = self.rates
        infos = [PeerInfo(name, v, rates.get(name, INITIAL_RATE), INFLIGHT_PER_PEER)
                 for name, v in self.peer_versions.items()]
        request_bytes = request_bytes_for(self.owner_map.block_size)
        plan = await trio.to_thread.run_sync(partial(plan_sync, self.target, self.owner_map, infos,
                                                     max_request_bytes=request_bytes, dedup=self.dedup))
        self.progress.total_bytes = plan.needed_bytes
        await trio.to_thread.run_sync(self._apply_without_transfer, plan.zero_blocks, plan.local_copies)
        if len(plan.unavailable):
            raise SyncError(f"{len(plan.unavailable)} block(s) of {self.store.name} are held at the owner's "
                            "version by no reachable peer")
        self.scheduler = SyncScheduler(plan, infos, self.owner_map.block_length, now=time.monotonic(),
                                       max_request_bytes=request_bytes)
        for name in self.peer_versions:
            self.progress.peers.setdefault(name, PeerProgress())
        self.progress.phase = "pulling"
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for info in infos:
                for _ in range(info.max_inflight):
                    nursery.start_soon(self._worker, info.name)
        if not self.scheduler.done:
            raise SyncError(f"{self.scheduler.remaining_blocks} block(s) could not be fetched from any peer")
        self.progress.phase = "done"

    def _apply_without_transfer(self, zero_blocks: Any, local_copies: list[tuple[int, int]]) -> None:
        """Zero blocks are recorded, duplicates copied locally: neither costs a byte on the wire. In a worker
        thread: a trimmed region can be thousands of blocks."""
        owner, bs = self.owner_map, self.store.block_size
        changed = 0
        for idx in np.asarray(zero_blocks, dtype=np.int64).tolist():
            pos = owner.position(idx)
            try:
                self.store.put_block(idx, int(owner.versions[pos]), None, owner.hashes[pos].tobytes())
            except StaleVersion:
                pass  # a newer version is already here
            self.progress.zero_blocks += 1
        for dst, src in local_copies:
            pos = owner.position(dst)
            data = self.store.read(src * bs, owner.block_length(src))
            try:
                self.store.put_block(dst, int(owner.versions[pos]), data, owner.hashes[pos].tobytes())
            except StaleVersion:
                pass
            except HashMismatch:
                changed += 1  # the source block changed since it was planned
            self.progress.local_copies += 1
        if changed:
            raise SyncError(f"{changed} block(s) of {self.store.name} changed here while being copied; sync again")

    async def _worker(self, peer: str) -> None:
        prog = self.progress.peers[peer]
        first = True
        while not self.scheduler.done and not prog.dropped:
            req = self.scheduler.next_request(peer, time.monotonic())
            if req is None:
                if not any(self.scheduler.outstanding(p) for p in self.progress.peers) and not self.scheduler.done:
                    return  # stuck: no peer left holds what remains; run() reports it
                with trio.move_on_after(IDLE_POLL):
                    await self._wake.wait()
                continue
            try:
                with trio.CancelScope() as scope:
                    self._inflight[req] = scope
                    with trio.fail_after(REQUEST_TIMEOUT):
                        await self._fetch(peer, req)
                if not scope.cancelled_caught:  # else another peer's answer made it useless: no verdict
                    self._failures[peer] = 0
                    if first:
                        first = False
                        await failpoints.pause("sync.pull")
            except (PeerError, trio.TooSlowError, FrameError) as e:
                message = getattr(e, "message", None) or str(e) or "timed out"
                log.info("sync of %s: request to %s failed: %s", self.store.name, peer, message)
                self.scheduler.failed(peer, req, time.monotonic())
                self._failures[peer] = failures = self._failures.get(peer, 0) + 1
                # a link that broke is reconnected by the next request: only a peer that cannot be reached
                # or lacks the disk is given up at once (MAX_CONSECUTIVE_FAILURES bounds the rest)
                fatal = isinstance(e, PeerError) and e.code in ("unreachable", "no_disk")
                if (fatal or failures >= MAX_CONSECUTIVE_FAILURES) and not prog.dropped:
                    prog.error, prog.dropped = message, True
                    self.scheduler.drop_peer(peer)
            finally:
                if self._inflight.get(req) is scope:
                    del self._inflight[req]
            self._kick()
            if self.scheduler.done:
                # Every block is in: what is still in flight are duplicates; stop them rather than wait.
                self._nursery.cancel_scope.cancel()

    def _kick(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    async def _fetch(self, peer: str, req: FetchRequest) -> None:
        conn = await self.swarm.connect(peer)
        base = self.owner_map.position(req.start) - req.start  # a request is a run of consecutive entries
        versions, hashes = self.owner_map.versions, self.owner_map.hashes
        wanted = [[i, int(versions[base + i])] for i in range(req.start, req.start + req.count)]
        reply = await conn.request("get_blocks", {"disk": self.store.name, "blocks": wanted,
                                                  "background": self.background}, timeout=REQUEST_TIMEOUT)
        items = [unpack_entry(item) for item in reply.get("blocks", [])]
        # Decompressing and hashing a MiB costs milliseconds of CPU: in a thread (zstd and hashlib release
        # the GIL), the event loop keeps reading the other peers' replies meanwhile.
        decoded = await trio.to_thread.run_sync(self._decode, items)
        # The first peer blocks into an area of the activity log sync the journal: in a worker thread, as the
        # guest write path does, so that put_block below, on the event loop, syncs nothing.
        bs = self.store.block_size
        span = req.start * bs, min(req.count * bs, self.store.size - req.start * bs)
        if self.store.needs_activation(*span, PEER_BLOCKS):
            await trio.to_thread.run_sync(self.store.activate, *span, PEER_BLOCKS)
        good: list[int] = []
        bad: list[int] = []
        nbytes = 0
        prog = self.progress.peers[peer]
        for (index, version, digest, payload, _), (data, actual) in zip(items, decoded, strict=True):
            if not req.start <= index < req.start + req.count or index in good or index in bad:
                raise FrameError(f"{peer} answered for block {index}, which was not asked")
            expected = hashes[base + index].tobytes()
            if version != int(versions[base + index]):
                if not (peer == self.owner and version > int(versions[base + index]) and digest):
                    bad.append(index)  # does not hold that version after all: not a lie, just stale
                    continue
                expected = digest  # the owner wrote it again meanwhile: its newer version is the one to hold
            nbytes += len(payload or b"")
            if digest != expected or (data is not None and actual != expected):
                bad.append(index)
                prog.bad_blocks += 1
                if self.scheduler.report_bad(peer):
                    prog.dropped, prog.error = True, "sent blocks that do not match the owner's hashes"
                    log.warning("sync of %s: dropping %s, it sent corrupt blocks", self.store.name, peer)
                continue
            if self.scheduler.is_complete(index):
                good.append(index)  # a good copy, but an endgame duplicate was first
                continue
            try:
                self.store.put_block(index, version, data, expected, verified=data is not None)
            except StaleVersion:
                good.append(index)  # a newer version is already here (the owner's, meanwhile)
                continue
            except HashMismatch as e:
                log.warning("sync of %s: block %d not stored: %s", self.store.name, index, e)
                bad.append(index)
                continue
            good.append(index)
            length = self.owner_map.block_length(index)
            prog.blocks += 1
            prog.bytes += len(payload or b"")
            self.progress.blocks_fetched += 1
            self.progress.done_bytes += length
        self.progress.bytes_on_wire += nbytes
        if not good and not bad:
            raise FrameError(f"{peer} answered none of the blocks asked")
        for useless in self.scheduler.completed(peer, req, good, bad, nbytes, time.monotonic()):
            if (scope := self._inflight.get(useless)) is not None:
                scope.cancel()  # its blocks are all in: the peer is told to stop, its reply is dropped

    def _decode(self, items: list[BlockEntry]) -> list[tuple[bytes | None, bytes]]:
        """Each item's block data (None: a zero block) and its hash; b"" for both when it does not decode.

        Runs in a worker thread, hence a decompressor of its own (one is not safe across threads).
        """
        decompressor = zstandard.ZstdDecompressor()
        out: list[tuple[bytes | None, bytes]] = []
        for index, _, _, payload, encoding in items:
            if payload is None:
                out.append((None, b""))
                continue
            try:
                data = unpack_block(encoding, payload, self.owner_map.block_length(index), decompressor)
            except FrameError:
                out.append((b"", b""))
                continue
            out.append((data, block_hash(data)))
        return out
