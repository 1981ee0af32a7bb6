"""Which block comes from where when a replica catches up with the owner: the pure planning core.

A replica pulls exactly the blocks it lacks, at the owner's versions, from every peer holding them, in
parallel. ``plan_sync`` splits the work so all peers are predicted to finish together (the max-flow
split itself is in ``sync_split``); ``SyncScheduler`` hands it out request by request and moves work
away from peers that fail, stall, lie or turn out slower than estimated. Sans-IO like h11: the fetcher
feeds in events and the time; nothing here sleeps, reads a clock or touches a socket.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from p2pvbd.plan.sync_split import BINCOUNT_PEERS as _BINCOUNT_PEERS
from p2pvbd.plan.sync_split import discretise as _discretise
from p2pvbd.plan.sync_split import fluid_balance as _fluid_balance
from p2pvbd.plan.sync_split import holder_groups as _holder_groups
from p2pvbd.store.version_map import BlockEntries, VersionMap
from p2pvbd.wire.peer_wire import MAX_FRAME_BYTES

# Block data per get_blocks request. Every request in flight is work that cannot move to another peer,
# and near the end of a sync a duplicate or a dead peer's request costs its whole size: 4 MiB is 0.7 s of
# a 50 Mbit/s link, which measured (docs/BENCHMARKS.md, multi-peer pull) as 0.1-0.2 of extra bytes and
# tail time with 3-4 peers; 1 MiB brings both to the noise while a request still costs a round trip and
# a ~100-byte envelope per MiB. A disk with larger blocks asks one block at a time (request_bytes_for).
MAX_REQUEST_BYTES = 1 << 20
# A get_blocks reply must fit one 8 MiB peer frame: half a frame of block data leaves the rest for the
# envelope, per-block hashes and zstd's worst case on incompressible data (and it is the largest block).
_REPLY_DATA_LIMIT = MAX_FRAME_BYTES // 2
# Requests in flight per peer: 4 x 1 MiB keep a 1 Gbit/s link busy across a 30 ms round trip (a LAN or
# a home uplink with any round trip), while little work sits where it cannot be stolen.
DEFAULT_INFLIGHT = 4
# Holder sets are bitmasks over the peers in one uint64.
MAX_PEERS = 64
# Floor of a rate estimate (an unmeasured peer may say 0): it still serves blocks only it holds while
# shared ones go to faster peers. 64 KiB/s is one default-sized block per second.
MIN_RATE = 64 * 1024.0
# Weight of a new throughput sample: RFC 6298 smooths RTTs by 1/8 over many small packets; requests are
# few and large, so 1/4 follows a changed link within a handful of them.
RATE_EWMA_ALPHA = 0.25
# A failed request halves the peer's rate (TCP's multiplicative decrease) so thieves drain its queue
# sooner; the EWMA restores it if the next request is fast.
FAILURE_RATE_FACTOR = 0.5
# Extra copies of a late request in the endgame. BitTorrent asks every peer; two extra copies beat one
# slow or dead duplicate while wasting at most twice the last requests' bytes.
ENDGAME_COPIES = 2
# An outstanding request is duplicated only once it is late by this many times its own expected service
# time (its bytes at its peer's rate). Rates are estimates (the first one a guess), so a request just past
# its predicted end is usually on its way; one service time late it is worth a copy.
ENDGAME_MARGIN = 1.0
# Bad blocks tolerated from a peer: one may be a bit flip or a write racing our request; three make a
# liar (or a dying disk), and cost us at most three blocks.
MAX_LIES = 3
# Dedup prefilter: a bitmap with >= 4 slots per wanted hash (~22% false positives), 2**20..2**26 slots
# (1..64 MB): a few stale blocks filter a 16 Mi-block disk of candidate sources down to ~0.1%.
_DEDUP_BITMAP_BITS = (20, 26)
# Blocks of the target's map scanned per step of dedup: its hashes are gathered that many at a time
# (16 MiB), never copied whole (256 MiB at 1 TiB).
_DEDUP_SCAN_CHUNK = 1 << 20
# Buckets of the helpers' rate that order a peer's queue: 4 per doubling from MIN_RATE span 2**32x.
_HELP_LEVELS, _HELP_LEVELS_PER_DOUBLING = 128, 4
# Queued work is re-split when some rate moved by this factor since the last split: a peer 2x off its
# estimate crosses it within ~3 requests, while one noisy sample moves the EWMA by a quarter of its error;
REPLAN_DRIFT = 1.3
# and not before 1/32 of the blocks then left are done: a re-split costs O(queued blocks), so all of them
# together cost about 32 passes over the disk's map.
REPLAN_SPACING = 32
# Positions scanned per numpy step in the scheduler, doubling from the first: 64 Ki take ~50 us, so a
# 16 Mi-block disk is 256 steps, while the usual next block, a few positions on, costs a 256-wide step.
_FIRST_WINDOW, SCAN_WINDOW = 256, 1 << 16

Array = npt.NDArray


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A candidate source: its version map, estimated throughput (bytes/s) and requests allowed in flight."""

    name: str
    versions: Array[np.uint64]
    rate: float
    max_inflight: int = DEFAULT_INFLIGHT
    hashes: Array[np.uint8] | None = None  # when given, a held block must also have the owner's hash

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate >= 0) or self.max_inflight < 1:
            raise ValueError(f"peer {self.name}: rate {self.rate} must be finite and >= 0, max_inflight "
                             f"{self.max_inflight} at least 1")


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Contiguous blocks [start, start+count), all held by ``peer`` at the owner's versions."""

    peer: str
    start: int
    count: int

    @property
    def blocks(self) -> range:
        return range(self.start, self.start + self.count)


class RequestList(Sequence[FetchRequest]):
    """One peer's planned requests as arrays: a 1 TiB full sync is 256 Ki requests and a scattered one
    millions, so FetchRequest objects are only made when read."""

    def __init__(self, peer: str, starts: Array[np.int64], counts: Array[np.int64]) -> None:
        self.peer, self.starts, self.counts = peer, starts, counts

    def __len__(self) -> int:
        return int(self.starts.size)

    def __getitem__(self, i: int) -> FetchRequest:  # type: ignore[override]  # no slices
        return FetchRequest(self.peer, int(self.starts[i]), int(self.counts[i]))

    def __iter__(self) -> Iterator[FetchRequest]:
        return (FetchRequest(self.peer, s, c) for s, c in zip(self.starts.tolist(), self.counts.tolist(),
                                                               strict=True))


@dataclass(eq=False)
class Plan:
    """The static split of one sync: each stale block of the target is in exactly one of the first four."""

    local_copies: list[tuple[int, int]]  # (target block, source block): the content is already on this disk
    zero_blocks: Array[np.intp]  # record as zero: nothing to read or send
    assignments: dict[str, RequestList]
    unavailable: Array[np.intp]  # held at the owner's version by no peer
    needed_bytes: int  # bytes the assignments transfer
    predicted_makespan: float  # seconds: the slowest peer's assigned bytes / its rate
    fluid_makespan: float = 0.0  # lower bound: the makespan if blocks could be split among peers at will
    peer_names: tuple[str, ...] = ()  # bit i of holder_masks is peer_names[i]
    fetch_blocks: Array[np.intp] = field(default_factory=lambda: np.empty(0, np.intp))  # sorted, all assigned
    holder_masks: Array[np.unsignedinteger] = field(default_factory=lambda: np.empty(0, np.uint8))
    fetch_peers: Array[np.unsignedinteger] = field(default_factory=lambda: np.empty(0, np.uint8))  # index


def _words(hashes: Array[np.uint8]) -> Array[np.uint64]:
    return np.ascontiguousarray(hashes).view(np.uint64)


def _same(a: Array[np.uint64], b: Array[np.uint64]) -> Array[np.bool_]:
    return (a[:, 0] == b[:, 0]) & (a[:, 1] == b[:, 1])


def request_bytes_for(block_size: int) -> int:
    """Block data per request for a disk of ``block_size`` blocks: MAX_REQUEST_BYTES, at least one block."""
    if block_size > _REPLY_DATA_LIMIT:
        raise ValueError(f"{block_size}-byte blocks do not fit a get_blocks reply ({_REPLY_DATA_LIMIT} bytes)")
    return max(MAX_REQUEST_BYTES, block_size)


def plan_sync(target: VersionMap | BlockEntries, owner: VersionMap | BlockEntries, peers: list[PeerInfo], *,
              max_request_bytes: int = MAX_REQUEST_BYTES, dedup: VersionMap | None = None) -> Plan:
    """Assign every block where ``target`` differs from ``owner`` to a zero record, a local copy or a peer.

    Sparse form (what a sync uses): ``target`` and ``owner`` are BlockEntries of the same blocks (those a
    map comparison found differing; every other block is taken to be current) and each peer's versions
    (and hashes) are given for those blocks, in that order. ``dedup``, the target's whole map, lets
    blocks whose content already sits elsewhere on the target be copied locally; it costs one pass over
    it, so callers give it only when the transfer saved is worth that.

    Full form (tests, tools): whole VersionMaps and peer maps; the differing blocks are found here and
    ``target`` itself serves for dedup.
    """
    if isinstance(owner, VersionMap):
        if not isinstance(target, VersionMap):
            raise ValueError("target and owner must both be VersionMaps or both BlockEntries")
        n = owner.n_blocks
        if (target.block_size, target.size) != (owner.block_size, owner.size):
            raise ValueError(f"target map ({target.size} bytes, {target.block_size}-byte blocks) is of another disk")
        if bad := [p.name for p in peers
                   if p.versions.shape != (n,) or (p.hashes is not None and p.hashes.shape != owner.hashes.shape)]:
            raise ValueError(f"maps of peers {bad} do not cover the owner's {n} blocks")
        blocks = np.flatnonzero(~target.current_mask(owner))
        peers = [replace(p, versions=p.versions[blocks], hashes=None if p.hashes is None else p.hashes[blocks])
                 for p in peers]
        return plan_sync(BlockEntries.from_map(target, blocks), BlockEntries.from_map(owner, blocks), peers,
                         max_request_bytes=max_request_bytes, dedup=target)
    if not isinstance(target, BlockEntries) or not np.array_equal(target.blocks, owner.blocks):
        raise ValueError("target and owner entries must be of the same blocks")
    n, bs, names, k = owner.n_blocks, owner.block_size, tuple(p.name for p in peers), len(owner)
    if (target.block_size, target.size) != (bs, owner.size) or (
            dedup is not None and (dedup.block_size, dedup.size) != (bs, owner.size)):
        raise ValueError(f"target map ({target.size} bytes, {target.block_size}-byte blocks) is of another disk")
    if len(set(names)) != len(names) or len(names) > MAX_PEERS:
        raise ValueError(f"peers must have distinct names, at most {MAX_PEERS}: {names}")
    if bad := [p.name for p in peers if p.versions.shape != (k,) or (p.hashes is not None and p.hashes.shape
                                                                      != owner.hashes.shape)]:
        raise ValueError(f"versions of peers {bad} are not given for the {k} planned blocks")
    if max_request_bytes < bs:
        raise ValueError(f"max_request_bytes {max_request_bytes} is below one {bs}-byte block")
    tv, ov, ow = target.versions, owner.versions, _words(owner.hashes)
    stable = _same(_words(target.hashes), ow) & (tv != 0)  # content already the owner's
    needed = (tv != ov) | ((tv != 0) & ~stable)
    zero = needed & owner.zero_mask()
    local, fetch = _local_copies(dedup, owner, needed & ~zero, stable)

    kind = np.min_scalar_type((1 << len(peers)) - 1) if peers else np.dtype(np.uint8)
    pos = np.flatnonzero(fetch)
    ov, ow = ov[pos], ow[pos]
    masks, has = np.zeros(pos.size, kind), np.empty(pos.size, bool)
    for bit, p in enumerate(peers):
        np.equal(p.versions[pos], ov, out=has)
        if p.hashes is not None:
            has &= _same(_words(p.hashes[pos]), ow)
        masks |= has.view(np.uint8).astype(kind, copy=False) << kind.type(bit)
    idx = owner.blocks[pos]
    unavailable = np.empty(0, np.int64)
    if not (held := masks != 0).all():
        unavailable, idx, masks = idx[~held], idx[held], masks[held]

    rates = np.array([max(p.rate, MIN_RATE) for p in peers], float)
    gmasks, inverse, counts = _holder_groups(masks, len(peers))
    gbytes, tail = counts * float(bs), bs - owner.block_length(n - 1)
    if idx.size and idx[-1] == n - 1:
        gbytes[inverse[-1]] -= tail
    fluid, flows = _fluid_balance(gmasks, gbytes, rates)
    who, per_peer = _discretise(flows, counts, inverse)
    order, bounds = np.argsort(who, kind="stable"), np.r_[0, np.cumsum(per_peer)]
    assignments, loads = {}, np.zeros(len(peers))
    for p, name in enumerate(names):
        mine = idx[order[bounds[p]:bounds[p + 1]]]
        assignments[name] = _requests(name, mine, max_request_bytes // bs)
        loads[p] = mine.size * bs - (tail if mine.size and mine[-1] == n - 1 else 0)
    return Plan(local, owner.blocks[zero], assignments, unavailable, int(loads.sum()),
                float((loads / rates).max(initial=0.0)), fluid, names, idx, masks, who)


def _local_copies(dedup: VersionMap | None, owner: BlockEntries, want: Array[np.bool_], stable: Array[np.bool_]
                  ) -> tuple[list[tuple[int, int]], Array[np.bool_]]:
    """Blocks of ``want`` (per entry) whose content already sits in the target, and what is left to fetch.

    A block already holding its own new content is its own source: (i, i) just records the version.
    Other sources are blocks of the whole target map ``dedup`` whose content survives this sync: written
    blocks that are current (not among the entries) or stable (their hash already the owner's), so copies
    may run in any order; a stale block with the wanted hash is overwritten by this sync, so it is no
    source. Keys are the first 64 hash bits and the other 64 are checked, so a key collision costs a
    fetch, never a wrong copy.
    """
    blocks = owner.blocks
    dst = src = blocks[want & stable]
    want = want & ~stable
    q = np.flatnonzero(want)
    if dedup is not None and q.size:
        ow = _words(owner.hashes)
        # Random binary searches into big arrays are the slow part: a bitmap of wanted keys first drops
        # most candidates (a whole disk of them in an incremental sync), then only the rest is sorted. The
        # target's map is scanned a chunk at a time, so no copy of its hashes is ever made.
        qk, mask = ow[q, 0], np.uint64((1 << int(np.clip(math.ceil(math.log2(4 * q.size)), *_DEDUP_BITMAP_BITS))) - 1)
        seen = np.zeros(int(mask) + 1, bool)
        seen[qk & mask] = True
        found: list[tuple[Array[np.intp], Array[np.uint64]]] = []
        for a in range(0, dedup.n_blocks, _DEDUP_SCAN_CHUNK):
            c = np.flatnonzero(dedup.versions[a:a + _DEDUP_SCAN_CHUNK] != 0) + a
            w = _words(dedup.hashes[c])
            hit = seen[w[:, 0] & mask]
            found.append((c[hit], w[hit]))
        cand = np.concatenate([c for c, _ in found])
        tw = np.concatenate([w for _, w in found]).reshape(-1, 2)
        alive = ~np.isin(cand, blocks[~stable], assume_unique=True)  # overwritten by this sync: no source
        cand, tw = cand[alive], tw[alive]
        order = np.argsort(tw[:, 0])
        cand, tw = cand[order], tw[order]
        ck, qs = tw[:, 0], np.sort(qk)
        keep = qs[np.minimum(np.searchsorted(qs, ck), qs.size - 1)] == ck
        keep[1:] &= ck[1:] != ck[:-1]  # one source per content
        cand, tw = cand[keep], tw[keep]
        if cand.size:
            j = np.minimum(np.searchsorted(tw[:, 0], qk), cand.size - 1)
            ok = (tw[j, 0] == qk) & (tw[j, 1] == ow[q, 1])
            dst, src = np.r_[dst, blocks[q[ok]]], np.r_[src, cand[j][ok]]
            want[q[ok]] = False
    order = np.argsort(dst, kind="stable")
    return list(zip(dst[order].tolist(), src[order].tolist(), strict=True)), want


def _requests(peer: str, blocks: Array[np.intp], max_blocks: int) -> RequestList:
    """Sorted blocks as requests: contiguous runs cut to at most ``max_blocks``."""
    if not blocks.size:
        return RequestList(peer, np.empty(0, np.int64), np.empty(0, np.int64))
    cut = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts, lens = blocks[np.r_[0, cut]], np.diff(np.r_[0, cut, blocks.size])
    pieces = -(-lens // max_blocks)
    begin = np.repeat(starts, pieces) + max_blocks * (np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces,
                                                                                          pieces))
    return RequestList(peer, begin, np.minimum(max_blocks, np.repeat(starts + lens, pieces) - begin))


@dataclass
class PeerStats:
    """What one peer delivered during a sync."""

    bytes: int = 0  # on the wire
    blocks: int = 0  # first good copies accepted from it
    lies: int = 0
    rate: float = 0.0  # current estimate, bytes/s
    requests: int = 0
    failures: int = 0
    dropped: bool = False


@dataclass(slots=True)
class _Flight:
    req: FetchRequest
    lo: int  # positions in plan.fetch_blocks
    hi: int
    nbytes: int
    issued: float
    eta: float


class SyncScheduler:
    """Hands a Plan out request by request. Pull-based: a fast peer simply asks again sooner.

    next_request serves a peer from its own queue, then from the pool of returned blocks, then steals
    the tail of the queue predicted to finish last, then duplicates late outstanding requests (endgame).
    When measured rates drift from those the queues were split by, or a peer is dropped, all queued work
    is split again the way plan_sync splits it. A block is in one place at a time: a queue (a peer's or
    the pool), in flight (at most 1 + ENDGAME_COPIES copies) or done. It is only asked of live peers
    holding the owner's exact version and completed once, by the first good answer.
    """

    def __init__(self, plan: Plan, peers: list[PeerInfo], block_length: Callable[[int], int] | int, *,
                 now: float, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self._names, self._blocks, m = plan.peer_names, plan.fetch_blocks, plan.fetch_blocks.size
        self._index = {name: i for i, name in enumerate(self._names)}
        if unknown := [p.name for p in peers if p.name not in self._index]:
            raise ValueError(f"peers {unknown} are not in the plan")
        npeers = len(self._names)
        self._length = (lambda _: block_length) if isinstance(block_length, int) else block_length
        self._unit = max(self._length(int(self._blocks[0])), self._length(int(self._blocks[-1]))) if m else 1
        self._max_blocks = max(1, max_request_bytes // self._unit)
        self._pool, self._flying, self._done_at = npeers, npeers + 1, npeers + 2  # codes in _where
        self._where = plan.fetch_peers.astype(np.int16)  # a peer's index: queued there
        self._holders, self._copies = plan.holder_masks.copy(), np.zeros(m, np.int16)
        self._alive, self._limit, self._rate = np.zeros(npeers, bool), np.ones(npeers, int), np.full(npeers, MIN_RATE)
        for p in peers:
            i = self._index[p.name]
            self._alive[i], self._rate[i], self._limit[i] = True, max(p.rate, MIN_RATE), p.max_inflight
        self._busy, self._last = np.full(npeers, now), np.full(npeers, now)
        self._flights: list[dict[tuple[int, int], _Flight]] = [{} for _ in range(npeers)]
        self._stats = [PeerStats() for _ in range(npeers)]
        self.remaining_blocks = m
        self._rebalance(split=not self._alive.all())  # peers planned for but not given to us: split their work

    @property
    def done(self) -> bool:
        return self.remaining_blocks == 0

    def outstanding(self, peer: str) -> int:
        return len(self._flights[self._index[peer]])

    def is_complete(self, block: int) -> bool:
        """True once a good copy of ``block`` was accepted (or if it was never to be fetched)."""
        pos = int(np.searchsorted(self._blocks, block))
        return pos == self._blocks.size or self._blocks[pos] != block or self._where[pos] == self._done_at

    @property
    def stuck(self) -> Array[np.intp]:
        """Blocks nobody can deliver any more (every holder dropped or sent them bad): fail, do not wait."""
        alive = self._holders.dtype.type(sum(1 << p for p in np.flatnonzero(self._alive).tolist()))
        left = (self._where != self._done_at) & (self._copies == 0)
        return self._blocks[left & ((self._holders & alive) == 0)]

    @property
    def stats(self) -> dict[str, PeerStats]:
        return {n: replace(s, rate=float(r)) for n, s, r in zip(self._names, self._stats, self._rate, strict=True)}

    def next_request(self, peer: str, now: float) -> FetchRequest | None:
        """Work for a free slot of ``peer``, or None when giving it any would not finish sooner."""
        p = self._index[peer]
        if not self._alive[p] or len(self._flights[p]) >= self._limit[p] or self.done:
            return None
        bit, where, holders = self._holders.dtype.type(1 << p), self._where, self._holders

        def held_in(code: int) -> Callable[[int, int], Array[np.bool_]]:
            return lambda a, b: (where[a:b] == code) & ((holders[a:b] & bit) != 0)

        if self._queued[p]:
            i = self._cursor[p] = self._find(lambda a, b: where[self._order[a:b]] == p, self._cursor[p], where.size)
            return self._issue(p, *self._run(int(self._order[i]), lambda a, b: where[a:b] == p), now)
        if self._queued[self._pool] and (pos := self._find(held_in(self._pool), 0, where.size)) is not None:
            return self._issue(p, *self._run(pos, held_in(self._pool)), now)
        start = max(self._busy[p], now)
        victims = [v for v in np.flatnonzero(self._alive & (self._queued[:-3] > 0)).tolist() if v != p]
        for v in sorted(victims, key=lambda v: -self._finish(v, now)):
            pos = self._find(held_in(v), 0, self._tail[v][p], reverse=True)
            self._tail[v][p] = 0 if pos is None else pos + 1
            if pos is not None:
                lo, hi = self._run(pos, held_in(v), reverse=True)
                if start + self._nbytes(lo, hi) / self._rate[p] >= self._finish(v, now):
                    break  # the victim itself delivers sooner; lesser victims sooner still
                return self._issue(p, lo, hi, now)
        return self._endgame(p, bit, start, now)

    def completed(self, peer: str, req: FetchRequest, good_blocks: list[int], bad_blocks: list[int], nbytes: int,
                  now: float) -> list[FetchRequest]:
        """A reply: accept first good copies, pool bad and missing blocks; returns now useless requests.

        ``good_blocks`` must match the owner's hashes, so they count even from a peer dropped meanwhile.
        ``bad_blocks`` are never asked of this peer again; count lies with report_bad.
        """
        p, lo = self._index[peer], int(np.searchsorted(self._blocks, req.start))
        hi = lo + req.count
        if hi > self._blocks.size or self._blocks[hi - 1] - req.start != req.count - 1:
            raise ValueError(f"{req} was not planned")
        good, bad = self._mask(req, good_blocks), self._mask(req, bad_blocks)
        f, st = self._flights[p].pop((req.start, req.count), None), self._stats[p]
        st.bytes += nbytes
        if f is not None:
            service = now - max(f.issued, self._last[p])  # the link served this one since the previous reply
            if service > 0 and (got := np.count_nonzero(good | bad)):  # in block bytes, as predictions are
                self._rate[p] = max(MIN_RATE, self._rate[p] + RATE_EWMA_ALPHA * (got * self._unit / service
                                                                                 - self._rate[p]))
            self._last[p], st.requests = now, st.requests + 1
        first = good & (self._where[lo:hi] != self._done_at)
        self._release(lo, hi, first, self._done_at)
        self.remaining_blocks -= (k := int(first.sum()))
        st.blocks += k
        self._holders[lo:hi][bad] &= ~self._holders.dtype.type(1 << p)
        if f is not None:
            self._land(p, f, now)
        if self._drifted():
            self._rebalance()
        cancel = []  # copies of what just got done, now useless
        for u, flights in enumerate(self._flights if k else ()):
            for g in [g for g in flights.values()
                      if g.lo < hi and lo < g.hi and (self._where[g.lo:g.hi] == self._done_at).all()]:
                del flights[g.req.start, g.req.count]
                self._land(u, g, now)
                cancel.append(g.req)
        return cancel

    def failed(self, peer: str, req: FetchRequest, now: float) -> None:
        """The request timed out or errored: its blocks go back to the pool and the peer's rate halves."""
        p = self._index[peer]
        if (f := self._flights[p].pop((req.start, req.count), None)) is not None:
            self._rate[p] = max(MIN_RATE, self._rate[p] * FAILURE_RATE_FACTOR)
            self._stats[p].failures += 1
            self._land(p, f, now)
            if self._drifted():
                self._rebalance()

    def drop_peer(self, peer: str) -> None:
        """A dead peer or a liar: all its queued and in-flight work goes back; it gets nothing more."""
        p = self._index[peer]
        if self._alive[p]:
            self._alive[p], self._stats[p].dropped = False, True
            for f in self._flights[p].values():
                self._land(p, f, self._busy[p])
            self._flights[p].clear()
            self._rebalance()

    def report_bad(self, peer: str) -> bool:
        """Count a bad block from ``peer``; True when it is dropped (it reached MAX_LIES)."""
        p = self._index[peer]
        self._stats[p].lies += 1
        if self._stats[p].lies >= MAX_LIES:
            self.drop_peer(peer)
        return not self._alive[p]

    def _rebalance(self, split: bool = True) -> None:
        """Re-split all queued work (the peers' queues and the pool) by the current rates, as plan_sync
        does, then order each queue hardest-to-help first: by the summed rate of the block's other live
        holders, so what only this peer (or only slow ones) can serve is done early by it, while blocks
        fast peers also hold wait at the end, where those can steal them."""
        npeers, m = len(self._names), self._where.size
        alive = self._holders.dtype.type(sum(1 << p for p in np.flatnonzero(self._alive).tolist()))
        if split and (pos := np.flatnonzero(self._where <= self._pool)).size:
            self._where[pos] = self._pool  # what no live peer holds stays there: stuck
            masks = self._holders[pos] & alive
            pos, masks = pos[masks != 0], masks[masks != 0]
            gmasks, inverse, counts = _holder_groups(masks, npeers)
            self._where[pos] = _discretise(_fluid_balance(gmasks, counts * 1.0, self._rate)[1], counts, inverse)[0]
        self._queued = np.bincount(self._where, minlength=npeers + 3).astype(np.int64)
        live = np.where(self._alive, self._rate, 0.0)
        sets, inv = ((np.arange(1 << npeers, dtype=np.uint64), self._holders) if npeers <= _BINCOUNT_PEERS
                     else np.unique(self._holders.astype(np.uint64), return_inverse=True))
        helpers = ((sets[:, None] >> np.arange(npeers, dtype=np.uint64)) & np.uint64(1)) @ live
        helpers = np.maximum(helpers[:, None] - np.r_[live, 0.0, 0.0, 0.0], MIN_RATE)  # [set, queue]: others
        level = np.minimum(np.log2(helpers / MIN_RATE) * _HELP_LEVELS_PER_DOUBLING, _HELP_LEVELS - 1)
        key = self._where * np.int16(_HELP_LEVELS) + level.astype(np.int16)[inv, self._where]
        self._order = np.argsort(key, kind="stable")  # small ints: a radix sort
        self._cursor = np.r_[0, np.cumsum(self._queued[:npeers])].tolist()
        self._tail = [[m] * npeers for _ in range(npeers)]  # [victim][thief]: nothing to steal at or above
        self._balanced_rate, self._balanced_left = self._rate.copy(), self.remaining_blocks

    def _drifted(self) -> bool:
        """Rates moved by REPLAN_DRIFT since the last split, and enough was done since to pay for a new one."""
        drift = np.abs(np.log(self._rate / self._balanced_rate)).max(initial=0.0) > math.log(REPLAN_DRIFT)
        return drift and self._balanced_left - self.remaining_blocks >= self._balanced_left / REPLAN_SPACING

    def _find(self, cond: Callable[[int, int], Array[np.bool_]], start: int, stop: int,
              reverse: bool = False) -> int | None:
        """First (last if ``reverse``) index in [start, stop) where ``cond`` holds, in doubling windows:
        the next block is usually close, but a scan may have to cross the whole disk."""
        width = _FIRST_WINDOW
        while start < stop:
            a, b = (max(start, stop - width), stop) if reverse else (start, min(stop, start + width))
            if (hit := np.flatnonzero(cond(a, b))).size:
                return a + int(hit[-1] if reverse else hit[0])
            start, stop, width = (start, a, width) if reverse else (b, stop, width)
            width = min(2 * width, SCAN_WINDOW)
        return None

    def _run(self, pos: int, cond: Callable[[int, int], Array[np.bool_]], reverse: bool = False) -> tuple[int, int]:
        """The longest request from ``pos`` (ending there if ``reverse``) of contiguous blocks meeting cond."""
        k = self._max_blocks
        a, b = (max(0, pos - k + 1), pos + 1) if reverse else (pos, min(self._blocks.size, pos + k))
        bad = np.flatnonzero(~cond(a, b) | (self._blocks[a:b] - self._blocks[pos] != np.arange(a - pos, b - pos)))
        if reverse:
            return (a + int(bad[-1]) + 1 if bad.size else a), b
        return a, (a + int(bad[0]) if bad.size else b)

    def _issue(self, p: int, lo: int, hi: int, now: float, duplicate: bool = False) -> FetchRequest:
        if not duplicate:
            self._release(lo, hi, np.ones(hi - lo, bool), self._flying)
        self._copies[lo:hi] += 1
        req, nbytes = FetchRequest(self._names[p], int(self._blocks[lo]), hi - lo), self._nbytes(lo, hi)
        if not self._flights[p]:
            self._last[p] = now  # an idle link starts serving at issue, not at its last reply
        self._busy[p] = max(self._busy[p], now) + nbytes / self._rate[p]
        self._flights[p][req.start, req.count] = _Flight(req, lo, hi, nbytes, now, float(self._busy[p]))
        return req

    def _endgame(self, p: int, bit: np.unsignedinteger, start: float, now: float) -> FetchRequest | None:
        """Duplicate the most overdue outstanding request (late by ENDGAME_MARGIN), else the one due last,
        if ``p`` would beat it."""
        best, best_key = None, (-1, 0.0)
        for u, flights in enumerate(self._flights):
            for f in flights.values() if u != p else ():
                ok = ((self._where[f.lo:f.hi] == self._flying) & ((self._holders[f.lo:f.hi] & bit) != 0)
                      & (self._copies[f.lo:f.hi] <= ENDGAME_COPIES))
                for g in self._flights[p].values():  # never twice to the same peer
                    ok[max(g.lo, f.lo) - f.lo:max(0, min(g.hi, f.hi) - f.lo)] = False
                if not ok.any():
                    continue
                a = int(np.argmax(ok))
                b = a + int(np.argmin(np.r_[ok[a:], False]))
                overdue = f.eta + ENDGAME_MARGIN * f.nbytes / self._rate[u] <= now
                key = (1, -f.eta) if overdue else (0, f.eta)
                beats = start + self._nbytes(f.lo + a, f.lo + b) / self._rate[p] < f.eta
                if key > best_key and (overdue or beats):
                    best, best_key = (f.lo + a, f.lo + b), key
        return None if best is None else self._issue(p, *best, now, duplicate=True)

    def _finish(self, v: int, now: float) -> float:
        """When ``v`` is predicted to empty its queue; a peer already late is assumed to stay that late."""
        late = now - self._busy[v] if self._flights[v] and self._busy[v] < now else 0.0
        return max(self._busy[v], now) + late + self._queued[v] * self._unit / self._rate[v]

    def _land(self, p: int, f: _Flight, now: float) -> None:
        """``f`` left the air: blocks it alone carried that are not done go back to the pool."""
        self._copies[f.lo:f.hi] -= 1
        self._release(f.lo, f.hi, (self._where[f.lo:f.hi] == self._flying) & (self._copies[f.lo:f.hi] == 0))
        self._busy[p] = now + sum(g.nbytes for g in self._flights[p].values()) / self._rate[p]

    def _release(self, lo: int, hi: int, mask: Array[np.bool_], to: int | None = None) -> None:
        """Move the blocks of [lo, hi) selected by ``mask`` to the pool (or ``to``), keeping the counts."""
        where, to = self._where[lo:hi], self._pool if to is None else to
        if k := int(np.count_nonzero(mask)):
            self._queued -= np.bincount(where[mask], minlength=self._queued.size)
            where[mask] = to
            self._queued[to] += k

    def _nbytes(self, lo: int, hi: int) -> int:
        return (hi - lo - 1) * self._unit + self._length(int(self._blocks[hi - 1]))

    def _mask(self, req: FetchRequest, blocks: list[int]) -> Array[np.bool_]:
        """Which blocks of ``req`` are in ``blocks`` (others are ignored: a reply cannot add any)."""
        out, b = np.zeros(req.count, bool), np.asarray(blocks, np.intp) - req.start
        out[b[(b >= 0) & (b < req.count)]] = True
        return out
