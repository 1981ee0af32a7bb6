"""Per-block versions and content hashes of one virtual disk, as plain numpy arrays.

A replica compares its map with the owner's to learn which blocks it lacks; maps of 1 TiB disks
(16 Mi blocks) travel between hosts, so everything here is vectorised and the wire form is raw arrays.
Pure: no I/O, no clocks.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

# BLAKE2b truncated to 128 bits: collisions need ~2**64 blocks, far beyond any disk, and 16 bytes keep
# a block's metadata record at 24 bytes.
HASH_SIZE = 16
# Hash field of a never-written block (version 0): it has no content hash, it reads as zeros.
NO_HASH = bytes(HASH_SIZE)
# 4 KiB is the smallest page/sector size guests use; smaller blocks only multiply metadata.
MIN_BLOCK_SIZE = 4 * 1024
# Above 4 MiB a 4 KiB guest write would make a replica re-fetch megabytes.
MAX_BLOCK_SIZE = 4 * 1024 * 1024
# 64 KiB: 1 TiB is 16 Mi blocks (384 MiB of metadata) while small writes stay cheap to re-send.
DEFAULT_BLOCK_SIZE = 64 * 1024

_MAGIC = b"P2VM"
_FORMAT = 1
# magic, format, hash size, block size, disk size, block count, padding to 32 so the versions that
# follow (u64 LE) are 8-byte aligned; then the hashes.
_HEADER = struct.Struct("<4sHHIQQ4x")


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` or raise ValueError saying what is allowed."""
    if (
        not isinstance(block_size, int)
        or block_size < MIN_BLOCK_SIZE
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"invalid block size {block_size!r}: must be a power of two from {MIN_BLOCK_SIZE} "
            f"(4 KiB) to {MAX_BLOCK_SIZE} (4 MiB) bytes"
        )
    return block_size


def blocks_for(size: int, block_size: int) -> int:
    """Number of blocks covering ``size`` bytes; the last one may be partial."""
    return -(-size // block_size)


def block_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The content hash of one block's real bytes."""
    return hashlib.blake2b(data, digest_size=HASH_SIZE).digest()


@lru_cache(maxsize=64)
def zero_hash(length: int) -> bytes:
    """Hash of ``length`` zero bytes; cached because every trim and zero check needs it."""
    if not 0 < length <= MAX_BLOCK_SIZE:
        raise ValueError(f"block length {length} out of range")
    return block_hash(bytes(length))


@dataclass(frozen=True, slots=True)
class Coverage:
    """How much of a reference map (normally the owner's) a replica holds at the same version."""

    current_blocks: int
    total_blocks: int
    fraction: float


@dataclass
class VersionMap:
    """``versions[i]`` (0 = never written) and ``hashes[i]`` (NO_HASH when version 0) of block i."""

    block_size: int
    size: int
    versions: npt.NDArray[np.uint64]
    hashes: npt.NDArray[np.uint8]

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        if self.size <= 0:
            raise ValueError(f"disk size must be positive, not {self.size}")
        n = blocks_for(self.size, self.block_size)
        if self.versions.dtype != np.uint64 or self.versions.shape != (n,):
            raise ValueError(f"versions must be uint64 of shape ({n},), not {self.versions.dtype} "
                             f"{self.versions.shape}")
        if self.hashes.dtype != np.uint8 or self.hashes.shape != (n, HASH_SIZE):
            raise ValueError(f"hashes must be uint8 of shape ({n}, {HASH_SIZE}), not {self.hashes.dtype} "
                             f"{self.hashes.shape}")

    @classmethod
    def empty(cls, size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> VersionMap:
        """A disk nobody has written yet."""
        n = blocks_for(size, check_block_size(block_size))
        return cls(block_size, size, np.zeros(n, np.uint64), np.zeros((n, HASH_SIZE), np.uint8))

    @property
    def n_blocks(self) -> int:
        return int(self.versions.shape[0])

    def block_length(self, index: int) -> int:
        """Bytes in block ``index``: block_size except for a partial last block."""
        return min(self.block_size, self.size - index * self.block_size)

    def copy(self) -> VersionMap:
        return VersionMap(self.block_size, self.size, self.versions.copy(), self.hashes.copy())

    def zero_mask(self, start: int = 0, stop: int | None = None) -> npt.NDArray[np.bool_]:
        """For blocks [start, stop): is the content all zeros (never written, trimmed, written with zeros)?"""
        stop = self.n_blocks if stop is None else stop
        words, zero = _words(self.hashes[start:stop]), np.frombuffer(zero_hash(self.block_size), np.uint64)
        mask = (self.versions[start:stop] == 0) | ((words[:, 0] == zero[0]) & (words[:, 1] == zero[1]))
        last = self.n_blocks - 1
        if stop > last >= start and (tail := self.block_length(last)) != self.block_size:
            # the partial last block hashes fewer zeros
            mask[-1] = self.versions[last] == 0 or self.hashes[last].tobytes() == zero_hash(tail)
        return mask

    def _same_geometry(self, other: VersionMap) -> None:
        if (self.block_size, self.size) != (other.block_size, other.size):
            raise ValueError(
                f"maps of different disks: {self.size} bytes in {self.block_size}-byte blocks vs "
                f"{other.size} bytes in {other.block_size}-byte blocks"
            )

    def current_mask(self, other: VersionMap) -> npt.NDArray[np.bool_]:
        """True where this map holds exactly ``other``'s version and content of the block."""
        self._same_geometry(other)
        mine, theirs = _words(self.hashes), _words(other.hashes)
        same_hash = (mine[:, 0] == theirs[:, 0]) & (mine[:, 1] == theirs[:, 1])
        return (self.versions == other.versions) & ((self.versions == 0) | same_hash)

    def coverage(self, other: VersionMap) -> Coverage:
        n = self.n_blocks
        current = int(np.count_nonzero(self.current_mask(other)))
        return Coverage(current, n, current / n)

    def stale_against(self, owner: VersionMap) -> npt.NDArray[np.intp]:
        """Indexes of blocks to fetch from ``owner``: version or content differs."""
        return np.flatnonzero(~self.current_mask(owner))

    def to_bytes(self) -> bytes:
        """Header, then the versions (u64 little-endian), then the hashes: 24 bytes per block."""
        n, h = self.n_blocks, _HEADER.size
        out = np.empty(h + n * (8 + HASH_SIZE), np.uint8)  # one buffer: fresh pages are the main cost
        out[:h] = np.frombuffer(_HEADER.pack(_MAGIC, _FORMAT, HASH_SIZE, self.block_size, self.size, n), np.uint8)
        out[h:h + 8 * n].view("<u8")[:] = self.versions
        out[h + 8 * n:].reshape(n, HASH_SIZE)[:] = self.hashes
        return out.tobytes()

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> VersionMap:
        """Inverse of to_bytes; any inconsistency (a peer's bug or attack) raises ValueError.

        From immutable ``bytes`` the arrays are read-only views (no copy of a 384 MiB map);
        from a mutable buffer they are copies.
        """
        mv = memoryview(buf).cast("B")
        if len(mv) < _HEADER.size:
            raise ValueError(f"version map too short: {len(mv)} bytes")
        magic, fmt, hash_size, block_size, size, n = _HEADER.unpack_from(mv)
        if magic != _MAGIC or fmt != _FORMAT or hash_size != HASH_SIZE:
            raise ValueError(f"not a version map of format {_FORMAT} (magic {magic!r}, format {fmt}, hash {hash_size})")
        check_block_size(block_size)
        if size <= 0 or n != blocks_for(size, block_size):
            raise ValueError(f"version map header says {n} blocks for {size} bytes in {block_size}-byte blocks")
        expected = _HEADER.size + n * (8 + HASH_SIZE)
        if len(mv) != expected:
            raise ValueError(f"version map length {len(mv)} != {expected} for {n} blocks")
        body = mv[_HEADER.size:] if isinstance(buf, bytes) else bytearray(mv[_HEADER.size:])
        versions = np.frombuffer(body, "<u8", count=n).astype(np.uint64, copy=False)
        hashes = np.frombuffer(body, np.uint8, offset=8 * n).reshape(n, HASH_SIZE)
        return cls(block_size, size, versions, hashes)


def runs(idx: npt.NDArray[np.intp], gap: int = 1) -> list[tuple[int, int]]:
    """[start, end) ranges covering sorted block indexes, merging neighbours at most ``gap`` apart."""
    if not idx.size:
        return []
    cut = np.flatnonzero(np.diff(idx) > gap)
    return list(zip(idx[np.r_[0, cut + 1]].tolist(), (idx[np.r_[cut, idx.size - 1]] + 1).tolist(), strict=True))


def _words(hashes: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """(n, 16) uint8 hashes as (n, 2) uint64, so comparisons take two vector ops instead of 16."""
    return np.ascontiguousarray(hashes).view(np.uint64)


@dataclass
class BlockEntries:
    """Versions and hashes of some blocks of a disk, by sorted block index: the sparse form of a map.

    What a sync works on: the blocks where a replica differs from the owner, never the whole map."""

    block_size: int
    size: int
    blocks: npt.NDArray[np.int64]
    versions: npt.NDArray[np.uint64]
    hashes: npt.NDArray[np.uint8]

    @classmethod
    def from_records(cls, block_size: int, size: int, blocks: npt.NDArray[np.int64],
                     records: npt.NDArray[np.void]) -> BlockEntries:
        return cls(block_size, size, np.asarray(blocks, np.int64), records["version"].astype(np.uint64),
                   np.ascontiguousarray(records["hash"]))

    @classmethod
    def from_map(cls, vmap: VersionMap, blocks: npt.NDArray[np.int64]) -> BlockEntries:
        blocks = np.asarray(blocks, np.int64)
        return cls(vmap.block_size, vmap.size, blocks, vmap.versions[blocks], vmap.hashes[blocks])

    @property
    def n_blocks(self) -> int:
        return blocks_for(self.size, self.block_size)

    def __len__(self) -> int:
        return int(self.blocks.size)

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def position(self, index: int) -> int:
        """Where block ``index`` is among the entries; KeyError if it is not one of them."""
        pos = int(np.searchsorted(self.blocks, index))
        if pos == self.blocks.size or self.blocks[pos] != index:
            raise KeyError(index)
        return pos

    def zero_mask(self) -> npt.NDArray[np.bool_]:
        """Per entry: is the block's content all zeros (never written, trimmed, written with zeros)?"""
        words, zero = _words(self.hashes), np.frombuffer(zero_hash(self.block_size), np.uint64)
        mask = (self.versions == 0) | ((words[:, 0] == zero[0]) & (words[:, 1] == zero[1]))
        last = self.n_blocks - 1
        if self.blocks.size and self.blocks[-1] == last and (tail := self.block_length(last)) != self.block_size:
            mask[-1] = self.versions[-1] == 0 or self.hashes[-1].tobytes() == zero_hash(tail)
        return mask
