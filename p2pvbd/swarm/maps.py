"""Version maps between hosts, at the cost of what differs: summaries, the tree descent, the change feed.

A host never sends or copies a whole version map. It serves four peer ops over its store's MapTree:

* ``map_summary``: geometry, owner, epoch, generation (the version counter), root digest;
* ``map_nodes``: the digests of the children of some nodes (a descent step);
* ``map_entries``: the (version, hash) records of some blocks;
* ``map_changes``: the change feed, every block whose version is above ``since``, page by page.

:func:`diff` compares two maps, local or remote, by descending both trees only under differing nodes:
a nearly current replica of a 1 TiB disk costs a few round trips and kilobytes. Store calls run in
worker threads, so the event loop never waits for a digest or a settle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import trio

from p2pvbd.replica_store import MAX_BLOCKS, OutOfRange, ReplicaStore
from p2pvbd.store.map_tree import LEAF_BLOCKS, canonical, children, differing, leaf_blocks, level_sizes, same_records
from p2pvbd.store.map_tree import RECORD_DTYPE as RECORD_DTYPE
from p2pvbd.store.map_tree import same_root as same_root
from p2pvbd.store.version_map import blocks_for, check_block_size
from p2pvbd.wire import map_wire
from p2pvbd.wire.peer_wire import FrameError, PeerError

if TYPE_CHECKING:
    from p2pvbd.swarm.peer_transport import PeerConnection

# A summary, node or entry request waits this long: they are small, a lost peer is what takes longer.
MAP_TIMEOUT = 30.0

Blocks = npt.NDArray[np.int64]
Records = npt.NDArray[Any]


@dataclass(frozen=True)
class MapSummary:
    """What comparing with a host's map starts from."""

    size: int
    block_size: int
    owner: str
    epoch: int
    generation: int  # the host's version counter when the summary was taken
    boot: str  # the store's current opening: a change feed is only continued within one
    held_blocks: int
    root: bytes
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a migration in progress, for status

    @property
    def n_blocks(self) -> int:
        return blocks_for(self.size, self.block_size)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> MapSummary:
        """A peer's summary; PeerError unless every field is there, typed and within a store's limits."""
        try:
            size, bs = body["size"], body["block_size"]
            if not (isinstance(size, int) and isinstance(bs, int) and size > 0
                    and blocks_for(size, check_block_size(bs)) <= MAX_BLOCKS):
                raise ValueError(f"no store has {size} bytes in {bs}-byte blocks")
            return cls(size, bs, str(body["owner"]), int(body["epoch"]), int(body["generation"]), str(body["boot"]),
                       int(body["held_blocks"]), map_wire.check_root(body["root"]),
                       {k: v for k, v in body.items() if k == "migration"})
        except (KeyError, TypeError, ValueError, FrameError) as e:
            raise PeerError("bad_reply", f"malformed map summary: {e}") from e


@dataclass
class Changes:
    """A change-feed answer: blocks changed in (since, generation], with their records."""

    summary: MapSummary
    blocks: Blocks
    records: Records


class MapSource(Protocol):
    """One host's map of one disk, asked piece by piece."""

    name: str
    received: int

    async def summary(self) -> MapSummary: ...
    async def nodes(self, level: int, parents: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]: ...
    async def entries(self, blocks: Blocks) -> Records: ...
    async def changes(self, since: int) -> Changes: ...


class LocalMap:
    """This host's own replica."""

    received = 0  # nothing crosses a link

    def __init__(self, name: str, store: ReplicaStore) -> None:
        self.name, self.store = name, store

    async def summary(self) -> MapSummary:
        await trio.to_thread.run_sync(self.store.refresh_tree)
        return MapSummary.from_body(await trio.to_thread.run_sync(self.store.map_summary))

    async def nodes(self, level: int, parents: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        return await trio.to_thread.run_sync(self.store.map_nodes, level, parents)

    async def entries(self, blocks: Blocks) -> Records:
        return await trio.to_thread.run_sync(self.store.map_entries, blocks)

    async def changes(self, since: int) -> Changes:
        summary = await self.summary()
        pages: list[tuple[Blocks, Records]] = []
        start: int | None = 0
        while start is not None:
            gen, blocks, records, start = await trio.to_thread.run_sync(
                self.store.changes_since, since, start, map_wire.MAX_ENTRY_BLOCKS)
            pages.append((blocks, records))
            if len(pages) == 1:
                summary = replace(summary, generation=min(gen, summary.generation))
        return Changes(summary, *_concat(pages))


class RemoteMap:
    """Another host's replica, over the peer link."""

    def __init__(self, name: str, conn: PeerConnection, disk: str) -> None:
        self.name, self.conn, self.disk = name, conn, disk
        self._summary: MapSummary | None = None
        self.received = 0  # bytes of map data (digests, records, block lists) this source sent

    async def _ask(self, op: str, **body: Any) -> dict[str, Any]:
        reply = await self.conn.request(op, {"disk": self.disk, **body}, timeout=MAP_TIMEOUT)
        self.received += sum(len(v) for v in reply.values() if isinstance(v, bytes))
        self.received += sum(len(v.get("deltas", b"")) for v in reply.values() if isinstance(v, dict))
        return reply

    async def summary(self) -> MapSummary:
        self._summary = MapSummary.from_body(await self._ask("map_summary"))
        return self._summary

    async def _n_blocks(self) -> int:
        return (self._summary or await self.summary()).n_blocks

    async def nodes(self, level: int, parents: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        sizes = level_sizes(await self._n_blocks())
        out = []
        for k in range(0, max(parents.size, 1), map_wire.MAX_NODE_PARENTS):
            part = parents[k:k + map_wire.MAX_NODE_PARENTS]
            reply = await self._ask("map_nodes", level=level, parents=map_wire.pack_parents(part))
            out.append(_checked(map_wire.unpack_digests, reply.get("digests"), children(part, sizes[level]).size))
        return np.concatenate(out)

    async def entries(self, blocks: Blocks) -> Records:
        out = []
        for k in range(0, max(blocks.size, 1), map_wire.MAX_ENTRY_BLOCKS):
            part = blocks[k:k + map_wire.MAX_ENTRY_BLOCKS]
            reply = await self._ask("map_entries", blocks=map_wire.pack_blocks(part))
            out.append(_checked(map_wire.unpack_records, reply.get("records"), part.size))
        return np.concatenate(out) if out else np.zeros(0, RECORD_DTYPE)

    async def changes(self, since: int) -> Changes:
        pages: list[tuple[Blocks, Records]] = []
        start: int | None = 0
        first: MapSummary | None = None
        while start is not None:
            reply = await self._ask("map_changes", since=since, start_leaf=start)
            summary = MapSummary.from_body(reply)
            if first is None:
                first = self._summary = summary
            n = first.n_blocks
            blocks = _checked(map_wire.unpack_blocks, reply.get("blocks"), n)
            pages.append((blocks, _checked(map_wire.unpack_records, reply.get("records"), blocks.size)))
            nxt = reply.get("next")
            if nxt is not None and (not isinstance(nxt, int) or nxt <= start or nxt * LEAF_BLOCKS >= n):
                raise PeerError("bad_reply", f"{self.name} sent a change-feed cursor that does not advance")
            start = nxt
        assert first is not None
        return Changes(first, *_concat(pages))


def _checked(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except FrameError as e:
        raise PeerError("bad_reply", str(e)) from e


def _concat(pages: list[tuple[Blocks, Records]]) -> tuple[Blocks, Records]:
    blocks = np.concatenate([b for b, _ in pages]) if pages else np.zeros(0, np.int64)
    records = np.concatenate([r for _, r in pages]) if pages else np.zeros(0, RECORD_DTYPE)
    return blocks, records


@dataclass
class Diff:
    """Blocks where two maps differ (sorted), with each side's record of them."""

    blocks: Blocks
    a: Records
    b: Records


async def diff(a: MapSource, b: MapSource, n_blocks: int, roots: tuple[bytes, bytes] | None = None) -> Diff:
    """Where maps ``a`` and ``b`` of one disk differ: a descent of both trees under differing nodes only.

    ``roots`` (from summaries the caller already has) skip the descent when they say the maps are equal.
    Costs O(differing leaves x tree depth) digests and the records of the differing leaves; on a live map
    the answer is as of the moment each part was asked (a leaf being rewritten counts as differing)."""
    empty = Diff(np.zeros(0, np.int64), np.zeros(0, RECORD_DTYPE), np.zeros(0, RECORD_DTYPE))
    if roots is not None and same_root(*roots):
        return empty
    sizes = level_sizes(n_blocks)
    parents = np.zeros(1, np.int64)
    for level in range(len(sizes) - 1, -1, -1):
        da, db = await _both(a.nodes, b.nodes, level, parents)
        kids = children(parents, sizes[level])
        parents = kids[differing(da, db)]
        if not parents.size:
            return empty
    blocks = leaf_blocks(parents, n_blocks)
    ra, rb = await _both(a.entries, b.entries, blocks)
    differ = ~same_records(ra, rb)
    return Diff(blocks[differ], ra[differ], rb[differ])


async def _both(fa: Any, fb: Any, *args: Any) -> tuple[Any, Any]:
    """fa(*args) and fb(*args) concurrently: a descent step costs one round trip, not two."""
    out: list[Any] = [None, None]

    async def run(i: int, fn: Any) -> None:
        out[i] = await fn(*args)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 0, fa)
        nursery.start_soon(run, 1, fb)
    return out[0], out[1]


# ---- serving ---------------------------------------------------------------------------------------
async def serve_summary(store: ReplicaStore) -> dict[str, Any]:
    await trio.to_thread.run_sync(store.refresh_tree)
    return await trio.to_thread.run_sync(store.map_summary)


async def serve_nodes(store: ReplicaStore, body: dict[str, Any]) -> dict[str, Any]:
    sizes = level_sizes(store.n_blocks)
    level = body["level"]
    if not 0 <= level < len(sizes):
        raise PeerError("bad_request", f"level {level} outside 0..{len(sizes) - 1}")
    bound = 1 if level == len(sizes) - 1 else sizes[level + 1]
    parents = _request(map_wire.unpack_parents, body["parents"], bound)
    digests = await trio.to_thread.run_sync(store.map_nodes, level, parents)
    return {"digests": digests.tobytes()}


async def serve_entries(store: ReplicaStore, body: dict[str, Any]) -> dict[str, Any]:
    blocks = _request(map_wire.unpack_blocks, body["blocks"], store.n_blocks)
    try:
        records = await trio.to_thread.run_sync(store.map_entries, blocks)
    except OutOfRange as e:
        raise PeerError("bad_request", str(e)) from e
    return {"records": map_wire.pack_records(records)}


async def serve_changes(store: ReplicaStore, body: dict[str, Any]) -> dict[str, Any]:
    since, start = body["since"], body["start_leaf"]
    if since < 0 or not 0 <= start < -(-store.n_blocks // LEAF_BLOCKS):
        raise PeerError("bad_request", "since and start_leaf must be a version and a leaf of the disk")
    head = await (serve_summary(store) if start == 0 else trio.to_thread.run_sync(store.map_summary))
    gen, blocks, records, nxt = await trio.to_thread.run_sync(store.changes_since, since, start,
                                                              map_wire.MAX_ENTRY_BLOCKS)
    return head | {"generation": min(gen, head["generation"]), "blocks": map_wire.pack_blocks(blocks),
                   "records": map_wire.pack_records(canonical(records)), "next": nxt}


def _request(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except FrameError as e:
        raise PeerError("bad_request", str(e)) from e
