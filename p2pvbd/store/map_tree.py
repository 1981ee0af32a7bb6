"""Summaries of a version map that make every comparison cost what changed, not what the disk holds.

A disk's version map has one 24-byte record (u64 version, 16-byte hash) per block: 384 MiB for 1 TiB of
64 KiB blocks. Two hosts never exchange or copy it whole. Instead each keeps a :class:`MapTree` over its
own records, in the spirit of ZFS block pointers, which carry the transaction group of their birth:

* a **Merkle tree**: a leaf digests the records of LEAF_BLOCKS blocks, each node above digests FANOUT
  children, and the root digests the top level. Equal roots mean equal maps; where roots differ, a
  descent that compares children only under differing nodes finds the differing blocks in
  O(changed leaves x depth) digests (:func:`children`, :func:`differing`);
* the **newest version per leaf** (its "birth time"): "which blocks changed since version V" scans one
  u64 per leaf and then only the leaves born after V (:meth:`MapTree.leaves_since`).

Writes only mark their leaves stale and raise the leaf's newest version; digests are recomputed on
demand for the stale leaves alone and their ancestors. Pure: numpy and hashlib, no I/O, no clocks, no
locks (the replica store decides who may call what when).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from p2pvbd.store.version_map import HASH_SIZE

# Blocks per leaf: a changed block costs re-hashing 64 x 24 B = 1.5 KiB, and a 1 TiB disk of 64 KiB
# blocks has 256 Ki leaves (4 MiB of digests, 2 MiB of newest versions).
LEAF_BLOCKS = 64
# Children per node: a descent step asks 64 digests (1 KiB) per differing node, and a 1 TiB disk is
# three levels above its leaves.
FANOUT = 64
# Digests of leaves and nodes: 128 bits, as strong as the per-block hashes they summarise.
NODE_DIGEST_SIZE = 16
# The root, compared at a switchover instead of the whole map: 256 bits.
ROOT_DIGEST_SIZE = 32
# Reported for a node or root whose leaves changed since they were last digested: it never compares equal
# (see differing), so a descent always looks below it instead of trusting an outdated digest.
STALE_DIGEST = b"\xff" * NODE_DIGEST_SIZE
STALE_ROOT = b"\xff" * ROOT_DIGEST_SIZE
# Leaves canonicalised and hashed from one buffer at a time: 6 MiB of records, so digesting a whole
# 1 TiB map never holds more than that beyond the map itself.
HASH_CHUNK_LEAVES = 4096
# One block's record as hashed into a leaf: the replica store's meta.bin layout.
RECORD_DTYPE = np.dtype([("version", "<u8"), ("hash", np.uint8, (HASH_SIZE,))])
_ROOT_HEAD = struct.Struct("<4sQQQ")
_ROOT_MAGIC = b"P2MT"

Records = npt.NDArray[np.void]
Digests = npt.NDArray[np.uint8]
Indexes = npt.NDArray[np.int64]


def n_leaves(n_blocks: int) -> int:
    return -(-n_blocks // LEAF_BLOCKS)


def level_sizes(n_blocks: int) -> list[int]:
    """Nodes per level, leaves first, up to the first level of at most FANOUT nodes (the root's children)."""
    sizes = [n_leaves(n_blocks)]
    while sizes[-1] > FANOUT:
        sizes.append(-(-sizes[-1] // FANOUT))
    return sizes


def leaf_blocks(leaves: Indexes, n_blocks: int) -> Indexes:
    """Every block index of ``leaves`` (sorted leaves give sorted blocks)."""
    leaves = np.asarray(leaves, np.int64)
    blocks = (leaves[:, None] * LEAF_BLOCKS + np.arange(LEAF_BLOCKS, dtype=np.int64)).ravel()
    return blocks[blocks < n_blocks]


def children(parents: Indexes, size: int) -> Indexes:
    """Indexes, at a level of ``size`` nodes, of the children of ``parents`` one level up, in order.

    The root is parent 0 of the top level. Both sides of a comparison derive the same layout from the
    disk's block count, so children travel as bare digests in this order.
    """
    parents = np.asarray(parents, np.int64)
    kids = (parents[:, None] * FANOUT + np.arange(FANOUT, dtype=np.int64)).ravel()
    return kids[kids < size]


def canonical(records: Records) -> Records:
    """Records as hashed: a never-written block (version 0) has no hash, whatever its field holds."""
    if not records.size or records["version"].all():
        return records
    out = records.copy()
    out["hash"][out["version"] == 0] = 0
    return out


def same_records(a: Records, b: Records) -> npt.NDArray[np.bool_]:
    """Per block: do two hosts hold the same version with the same content?"""
    a, b = canonical(a), canonical(b)
    ha, hb = a["hash"].view(np.uint64).reshape(-1, 2), b["hash"].view(np.uint64).reshape(-1, 2)
    return (a["version"] == b["version"]) & (ha[:, 0] == hb[:, 0]) & (ha[:, 1] == hb[:, 1])


def differing(mine: Digests, theirs: Digests) -> npt.NDArray[np.bool_]:
    """Per node: do the two digests differ, or is either outdated (STALE_DIGEST)? In :func:`children` order."""
    if mine.shape != theirs.shape:
        raise ValueError(f"digest arrays of shapes {mine.shape} and {theirs.shape} do not line up")
    a = np.ascontiguousarray(mine).view(np.uint64).reshape(-1, 2)
    b = np.ascontiguousarray(theirs).view(np.uint64).reshape(-1, 2)
    stale = np.uint64(0xFFFFFFFFFFFFFFFF)
    return ((a[:, 0] != b[:, 0]) | (a[:, 1] != b[:, 1]) | ((a[:, 0] == stale) & (a[:, 1] == stale))
            | ((b[:, 0] == stale) & (b[:, 1] == stale)))


def same_root(a: bytes, b: bytes) -> bool:
    """Equal maps: equal roots, neither of them outdated."""
    return a == b and a != STALE_ROOT


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=NODE_DIGEST_SIZE).digest()


def records_of(versions: npt.NDArray[np.uint64], hashes: npt.NDArray[np.uint8]) -> Records:
    """Separate version and hash arrays as one record array (a copy), e.g. from a VersionMap."""
    out = np.empty(versions.shape[0], RECORD_DTYPE)
    out["version"], out["hash"] = versions, hashes
    return out


class MapTree:
    """The Merkle tree and per-leaf newest versions over one disk's records.

    ``records`` is a callable returning the live record array (the store's meta), read only when
    digests are computed. Nothing is cached from it but digests and newest versions.
    """

    def __init__(self, n_blocks: int, block_size: int, size: int) -> None:
        self.n_blocks, self.block_size, self.size = n_blocks, block_size, size
        self.sizes = level_sizes(n_blocks)
        self.digests: list[Digests] = [np.zeros((k, NODE_DIGEST_SIZE), np.uint8) for k in self.sizes]
        self.leaf_newest = np.zeros(self.sizes[0], np.uint64)
        self.stale = np.zeros(self.sizes[0], np.bool_)  # leaves whose digest lags their records
        self._empty_leaf = _digest(np.zeros(LEAF_BLOCKS, RECORD_DTYPE).tobytes())
        tail = n_blocks - (self.sizes[0] - 1) * LEAF_BLOCKS
        self._empty_tail = _digest(np.zeros(tail, RECORD_DTYPE).tobytes())

    # ---- building and maintaining ----------------------------------------------------------------
    @classmethod
    def build(cls, records: Records, block_size: int, size: int) -> MapTree:
        """The tree of a whole map. Leaves that were never written share one digest and are not hashed,
        so a sparse disk costs what it holds; a full 1 TiB map hashes its 384 MiB once (~0.5 s)."""
        tree = cls(records.shape[0], block_size, size)
        tree.reset_empty()
        versions = records["version"]
        newest = tree.leaf_newest
        full = (tree.n_blocks // LEAF_BLOCKS) * LEAF_BLOCKS
        if full:
            newest[:full // LEAF_BLOCKS] = versions[:full].reshape(-1, LEAF_BLOCKS).max(axis=1)
        if full < tree.n_blocks:
            newest[-1] = versions[full:].max()
        written = np.flatnonzero(newest)
        tree.set_leaves(written, tree.hash_leaves(records, written))
        return tree

    def reset_empty(self) -> None:
        """The tree of a disk nobody has written: every leaf the empty digest, every node computed."""
        leaves = self.digests[0]
        leaves[:] = np.frombuffer(self._empty_leaf, np.uint8)
        leaves[-1] = np.frombuffer(self._empty_tail, np.uint8)
        self.leaf_newest[:] = 0
        self.stale[:] = False
        self._recompute_parents(np.arange(self.sizes[0], dtype=np.int64))

    def touch(self, first_block: int, last_block: int, version: int) -> None:
        """Blocks first..last changed, the newest of them now at ``version``: their leaves are stale."""
        a, b = first_block // LEAF_BLOCKS, last_block // LEAF_BLOCKS + 1
        self.stale[a:b] = True
        if b - a == 1:
            if version > self.leaf_newest[a]:
                self.leaf_newest[a] = version
        else:
            np.maximum(self.leaf_newest[a:b], np.uint64(version), out=self.leaf_newest[a:b])

    def stale_leaves(self) -> Indexes:
        return np.flatnonzero(self.stale).astype(np.int64)

    def hash_leaves(self, records: Records, leaves: Indexes) -> list[bytes]:
        """Digests of ``leaves`` (sorted) from ``records`` (the caller decides whether they may change
        meanwhile). Neighbouring leaves are canonicalised together, HASH_CHUNK_LEAVES at a time, and each
        is hashed from a slice of that buffer: about a microsecond of Python per leaf."""
        out: list[bytes] = []
        n, width = self.n_blocks, LEAF_BLOCKS * RECORD_DTYPE.itemsize
        leaves = np.asarray(leaves, np.int64)
        if not leaves.size:
            return out
        cut = np.flatnonzero((np.diff(leaves) != 1) | (np.arange(1, leaves.size) % HASH_CHUNK_LEAVES == 0)) + 1
        for run in np.split(leaves, cut):
            lo, hi = int(run[0]) * LEAF_BLOCKS, min((int(run[-1]) + 1) * LEAF_BLOCKS, n)
            buf = memoryview(np.ascontiguousarray(canonical(records[lo:hi])).view(np.uint8))
            out.extend(_digest(buf[k:k + width]) for k in range(0, len(buf), width))
        return out

    def newest_of(self, records: Records, leaves: Indexes) -> npt.NDArray[np.uint64]:
        """Exact newest version of each of ``leaves``."""
        leaves = np.asarray(leaves, np.int64)
        blocks = leaf_blocks(leaves, self.n_blocks)
        versions = records["version"][blocks]
        starts = np.r_[0, np.cumsum(np.minimum(LEAF_BLOCKS, self.n_blocks - leaves * LEAF_BLOCKS))[:-1]]
        return np.maximum.reduceat(versions, starts).astype(np.uint64) if leaves.size else np.zeros(0, np.uint64)

    def set_leaves(self, leaves: Indexes, digests: list[bytes],
                   newest: npt.NDArray[np.uint64] | None = None, propagate: bool = True) -> None:
        """Store fresh digests (and, when known, exact newest versions) of ``leaves``; with ``propagate``
        also their ancestors' (else the caller calls :meth:`propagate` before anyone reads nodes)."""
        leaves = np.asarray(leaves, np.int64)
        if not leaves.size:
            return
        self.digests[0][leaves] = np.frombuffer(b"".join(digests), np.uint8).reshape(-1, NODE_DIGEST_SIZE)
        if newest is not None:
            self.leaf_newest[leaves] = newest
        self.stale[leaves] = False
        if propagate:
            self._recompute_parents(leaves)

    def propagate(self, leaves: Indexes) -> None:
        """Recompute the ancestors of ``leaves`` from their children."""
        if np.asarray(leaves).size:
            self._recompute_parents(np.asarray(leaves, np.int64))

    def _recompute_parents(self, changed: Indexes) -> None:
        for level in range(1, len(self.sizes)):
            parents = np.unique(changed // FANOUT)
            below = self.digests[level - 1]
            mine = self.digests[level]
            for p in parents.tolist():
                mine[p] = np.frombuffer(_digest(below[p * FANOUT:(p + 1) * FANOUT].tobytes()), np.uint8)
            changed = parents

    # ---- questions ---------------------------------------------------------------------------------
    def root(self) -> bytes:
        """The 256-bit digest of the whole map; STALE_ROOT while some leaf is stale."""
        if self.stale.any():
            return STALE_ROOT
        h = hashlib.blake2b(_ROOT_HEAD.pack(_ROOT_MAGIC, self.block_size, self.size, self.n_blocks),
                            digest_size=ROOT_DIGEST_SIZE)
        h.update(self.digests[-1].tobytes())
        return h.digest()

    @property
    def top(self) -> int:
        """The level whose nodes are the root's children."""
        return len(self.sizes) - 1

    def nodes(self, level: int, parents: Indexes) -> Digests:
        """Digests of the children of ``parents`` (nodes of ``level`` + 1; the root is parent 0 of the top),
        STALE_DIGEST for a node with a stale leaf below it."""
        if not 0 <= level <= self.top:
            raise ValueError(f"level {level} outside 0..{self.top}")
        parents = np.asarray(parents, np.int64)
        bound = 1 if level == self.top else self.sizes[level + 1]
        if parents.size and (parents.min() < 0 or parents.max() >= bound):
            raise ValueError(f"parent index outside 0..{bound - 1}")
        kids = children(parents, self.sizes[level])
        out = self.digests[level][kids]
        if self.stale.any():
            out[self._stale_at(level)[kids]] = np.frombuffer(STALE_DIGEST, np.uint8)
        return out

    def _stale_at(self, level: int) -> npt.NDArray[np.bool_]:
        """Per node of ``level``: is some leaf below it stale? One pass over the leaves' flags."""
        span = FANOUT ** level
        flags = self.stale
        if pad := (-flags.size) % span:
            flags = np.concatenate([flags, np.zeros(pad, np.bool_)])
        return flags.reshape(-1, span).any(axis=1)

    def leaves_since(self, since: int, start_leaf: int = 0) -> Indexes:
        """Leaves from ``start_leaf`` on holding a block of version above ``since`` (a superset: exact
        for leaves refreshed since their last change, an upper bound for the others)."""
        return np.flatnonzero(self.leaf_newest[start_leaf:] > np.uint64(since)).astype(np.int64) + start_leaf

    def newest(self) -> int:
        return int(self.leaf_newest.max(initial=0))


def descend(top: int, sizes: list[int], compare: Callable[[int, Indexes], npt.NDArray[np.bool_]]) -> Indexes:
    """Leaves where two trees differ, given ``compare(level, parents)`` -> differs? per child of parents.

    The synchronous form of the descent, for two trees in one process (tests, local comparisons); the
    peer-to-peer form asks the same questions over the wire (map_exchange.diff_blocks).
    """
    parents = np.zeros(1, np.int64)
    for level in range(top, -1, -1):
        kids = children(parents, sizes[level])
        parents = kids[compare(level, parents)]
        if not parents.size:
            break
    return parents
