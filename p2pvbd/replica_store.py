"""The crash-safe local replica of one virtual disk: a sparse data file plus per-block versions and hashes.

``data.raw`` holds the bytes (trimmed blocks are holes); ``meta.bin`` one 24-byte record (u64 version,
16-byte hash) per block as of the last checkpoint, loaded whole with numpy so opening never reads
data; ``journal.log`` a redo log of 48-byte CRC-checked records since then (plus ``journal.<n>.log``
while a checkpoint runs); ``state.bin`` identity, owner, counter and clean flag, in two slots written in
turn.
A :class:`MapTree` over the records answers "are two maps equal", "where do they differ" and "what
changed since version V" at a cost that follows what changed, never the disk's size.

Crash rule: an intent record (DIRTY, ZERO, PUT) is appended *before* its data is written, so after
``kill -9`` the page cache holds the intent whenever it holds the data. SYNC(L), appended after an
fdatasync of the data, vouches that the records before journal offset L have their data durable;
replay trusts those and re-checks the rest against the data. Writes never hash (NBD hot path):
blocks go dirty and are "settled" (read, hashed, SETTLE record) when a hash is needed: a peer asks for
them, a map is compared or published, a checkpoint, or more than HASH_PENDING_BYTES wait. A flush does
not hash: a dirty block's DIRTY record before a SYNC is trusted, and replay hashes the block's data
again keeping its version, so a pending hash survives a crash.

Power loss breaks "the page cache holds the intent": data can reach the disk (a flush's data sync, the
kernel's writeback) before its intent record does. An activity log, after DRBD's, covers that: before
any data is written into an area (ACTIVE_AREA_BYTES), a durable ACTIVE record names the area; an
unclean open re-checks every block of the areas still active. Only the first write into an area costs a
journal fsync; the least recently written areas are retired (RETIRE, no sync needed: it follows their
writes' records in the journal, so it is durable only if they are), keeping the data the active areas
hold within ACTIVE_DATA_BYTES (what an unclean open re-reads) and their number within MAX_ACTIVE_AREAS.

Locks: ``_lock`` guards the metadata and is held only for work proportional to a request (the event loop
takes it for guest and peer I/O). Hashing many blocks, digesting the tree, data syncs and checkpoints run
outside it: under ``_flush_lock`` (one flush, checkpoint, refresh or close at a time; the files stay open
meanwhile) and, for the tree's digests, ``_tree_lock``.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pvbd.base.home import NAME_RE
from p2pvbd.store import store_files, store_journal
from p2pvbd.store.map_tree import LEAF_BLOCKS, MapTree, canonical, leaf_blocks
from p2pvbd.store.store_files import (
    DATA_FILE,
    JOURNAL_FILE,
    META_DTYPE,
    META_FILE,
    pread_all,
    punch_hole,
    pwrite_all,
)
from p2pvbd.store.store_journal import (
    ACTIVE,
    DIRTY,
    GUEST_WRITES,
    PEER_BLOCKS,
    PUT,
    RETIRE,
    SETTLE,
    SYNC,
    ZERO,
    journal_record,
)
from p2pvbd.store.version_map import (
    DEFAULT_BLOCK_SIZE,
    NO_HASH,
    VersionMap,
    block_hash,
    blocks_for,
    check_block_size,
    runs,
    zero_hash,
)

# Disk sizes are whole 512-byte sectors: what every hypervisor and NBD client expects.
SECTOR = 512
# Metadata lives in RAM at 24 bytes a block: 256 Mi blocks is 6 GiB (16 TiB at 64 KiB blocks).
MAX_BLOCKS = 1 << 28
# After an unclean shutdown the counter jumps this far, so a version that may have reached a peer
# before the crash is never reused for other content. 2**32 crashes still fit in a u64.
UNCLEAN_COUNTER_GAP = 2**32
# Journal size that makes flush() checkpoint: bounds replay (~700k 4 KiB writes at two records each).
JOURNAL_CHECKPOINT_BYTES = 64 * 1024 * 1024
# A checkpoint copies and writes the changed records this many leaves at a time (6 MiB at 64 blocks a
# leaf): its memory stays bounded even when every record of a 1 TiB disk changed.
CHECKPOINT_CHUNK_LEAVES = 4096
# Lock-free passes of digesting stale leaves before a refresh gives up on those a writer keeps touching
# (they stay marked stale, which a comparison treats as "differs": correct, only less precise).
REFRESH_ROUNDS = 3
# Written data whose hash a flush may leave pending (dirty blocks). Hashing is what costs a guest write
# most (BLAKE2b of the whole 64 KiB block, for a 4 KiB write too), and a block written again before
# anyone needs its hash is hashed once instead of once per flush. The cost is at an unclean open: replay
# re-reads and hashes every pending block (about 3 s per GiB here, as for the activity log's areas, which
# often hold the same blocks). 2 GiB keeps that within the activity log's own bound (5 GiB, ~15 s).
HASH_PENDING_BYTES = 2 * 1024**3
# Passes of lock-free hashing before the blocks rewritten meanwhile are hashed under the lock: each
# pass only sees blocks written during the previous one, so few are left for the locked pass.
PREHASH_ROUNDS = 3
# Activity log: the unit a durable ACTIVE record names. Larger areas mean fewer journal syncs for
# sequential writes.
ACTIVE_AREA_BYTES = 16 * 1024 * 1024
# What an unclean open re-reads is the data held in the active areas (a read and a hash per block,
# ~15 s for 5 GiB here; holes are skipped without reading), so that is what is bounded: blocks holding
# data in an area when it becomes active, plus those its writes fill, are its weight, and the least
# recently written areas retire once the weights pass this. DRBD's default activity log covers 4.8 GiB
# (1237 extents of 4 MiB), counted in extents because it resyncs them whole. A working set holding more
# data than this costs one journal sync (shared by the writes in flight) per new area.
ACTIVE_DATA_BYTES = 5 * 1024**3
# Areas active at once whatever their weight: each costs a 48-byte ACTIVE record and, at an unclean
# open, a walk over its holes (SEEK_DATA). 8192 areas are 128 GiB: writes spread over a sparse disk
# of that size make each area active once, not once per write.
MAX_ACTIVE_AREAS = 8192
# The active journal is grown by writing this many zero bytes past its records (then one sync), and
# records are written over those zeros: a journal sync then flushes data only, with no file-system
# journal commit for a new file size (about 0.1 ms against 2 ms on ext4 here). Replay stops at the
# first record that fails its CRC, as zeros do. 1 MiB holds ~21,800 records.
JOURNAL_GROWTH_BYTES = 1024 * 1024
# Areas retired together once MAX_ACTIVE_AREAS or ACTIVE_DATA_BYTES is exceeded (room for this many
# more areas, or full areas' weight): their RETIRE records share the sync of the activation that needed
# the room, so a writer spreading over the disk pays one sync per new area, not two.
RETIRE_BATCH = 16
# A write spanning more areas than this (a large zeroing) syncs its own intent record instead of
# activating them all: one sync either way, and the active set stays small.
MAX_AREAS_PER_ACTIVATION = 4
# NBD base:allocation flags (nbd_codec.NBD_STATE_*; repeated so the store stays protocol-free).
STATE_HOLE, STATE_ZERO = 1, 2
# Hosts the disk was handed to this host from, newest last (whose forwarded guest I/O this host serves).
# A person's machines are a handful; 16 names of at most 64 characters take ~1.1 KiB of the 4 KiB
# state slot, and a guest connection open at a host 16 hand-overs back has long been closed.
MAX_HANDED_FROM = 16


class OutOfRange(ValueError):
    """A request beyond the end of the disk (or with a negative offset or length)."""


class HashMismatch(ValueError):
    """Replicated data does not match the hash it came with."""


class StaleVersion(ValueError):
    """A replicated block older than the one held: versions never go backwards."""


class StoreBusy(RuntimeError):
    """Another ReplicaStore, in this process or another, has the store open."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Blocks a write request touched and the version they now have (version 0: touched none)."""

    first_block: int
    last_block: int
    version: int


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """One block as served to peers; ``data`` is None for a zero block (hash NO_HASH at version 0)."""

    index: int
    version: int
    hash: bytes
    data: bytes | None


def _check_owner(owner: str, epoch: int) -> None:
    if not isinstance(owner, str) or (owner and not NAME_RE.fullmatch(owner)):
        raise ValueError(f"invalid owner host name {owner!r}")
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, not {epoch!r}")


class ReplicaStore:
    """One disk's replica. Thread-safe; see the module docstring for what each lock guards."""

    def __init__(self, directory: Path, state: dict[str, Any], fds: list[int], meta: npt.NDArray[Any]) -> None:
        self._dir = directory
        self._name, self._size, self._bs = state["name"], state["size"], state["block_size"]
        self._owner, self._epoch, self._counter = state["owner"], state["epoch"], state["counter"]
        self._handed_from: tuple[str, ...] = tuple(state.get("handed_from", ()))
        self._changes = 0
        self._n = blocks_for(self._size, self._bs)
        self._tail = self._size - (self._n - 1) * self._bs
        self._zeros, self._tail_zeros = bytes(self._bs), bytes(self._tail)
        self._meta = meta
        self._versions: npt.NDArray[np.uint64] = meta["version"]
        self._hashes: npt.NDArray[np.uint8] = meta["hash"]
        self._dirty: set[int] = set()  # written blocks whose hash is not known yet
        self._max_pending = max(1, HASH_PENDING_BYTES // self._bs)  # dirty blocks a flush leaves unhashed
        self._area_blocks = max(1, ACTIVE_AREA_BYTES // self._bs)
        # Active areas, least recently written first -> what was written there (GUEST_WRITES | PEER_BLOCKS).
        # Each has a durable ACTIVE record in the active journal; the set starts empty with every journal.
        self._active: dict[int, int] = {}
        self._weights: dict[int, int] = {}  # active area -> blocks holding data there (see ACTIVE_DATA_BYTES)
        self._weight = 0  # their sum
        self._max_weight = max(1, ACTIVE_DATA_BYTES // self._bs)
        # Blocks partly zeroed with allocate=True (NBD's NO_HOLE): settling them keeps them allocated even if
        # they turn out to be all zeros. Entries go when the block is settled; a stale one only spares a hole.
        self._keep_allocated: set[int] = set()
        self._tree = MapTree(self._n, self._bs, self._size)
        self._changed_leaves = np.zeros(self._tree.sizes[0], np.bool_)  # records that differ from meta.bin
        self._held = 0  # blocks at a version above 0
        # Names this opening of the store: a change feed's "since V" is only meaningful within one (an
        # unclean restart may have lost versions a peer had already seen).
        self._boot = os.urandom(8).hex()
        self._fds = fds
        self._data_fd, self._jfd = fds
        self._jlen = self._synced_jlen = 0
        self._flushed_jlen = 0  # the journal's length at the last flush: how fast it grows
        self._jcap = os.fstat(self._jfd).st_size  # bytes of the active journal written (records, then zeros)
        self._jdurable = 0  # a sync made the active journal durable up to here
        # Areas whose ACTIVE record is in the journal but perhaps not durable yet -> the record's end offset.
        self._activating: dict[int, tuple[int, int]] = {}  # area -> (end of its ACTIVE record, bits)
        self._jseq = 1
        self._held_records: list[bytes] | None = None  # records of a write_many batch not yet in the journal
        self._lock = threading.Lock()
        self._flush_lock = threading.RLock()  # re-entered: a checkpoint settles blocks, which takes it too
        self._tree_lock = threading.Lock()
        self._state_lock = threading.Lock()  # state writes in the order their snapshots were taken
        self._jsync_lock = threading.Lock()  # one activation sync at a time: the others wait and share the next
        self._state_seq = 1  # sequence number of the last state written (0: a first-format state.json)
        self._closed = False
        self._finalizer = weakref.finalize(self, store_files.close_fds, fds)  # dropped without close() = crashed

    # ---- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, name: str, size: int, block_size: int = DEFAULT_BLOCK_SIZE,
               owner: str = "", epoch: int = 0) -> ReplicaStore:
        """A new, empty store. Nothing of the disk's size is read or hashed: the metadata starts as
        untouched zero pages and the tree as the empty one."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"invalid disk name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        check_block_size(block_size)
        if not isinstance(size, int) or size <= 0 or size % SECTOR:
            raise ValueError(f"disk size must be a positive multiple of {SECTOR} bytes, not {size!r}")
        if (n := blocks_for(size, block_size)) > MAX_BLOCKS:
            raise ValueError(f"{size} bytes is {n} blocks of {block_size}; at most {MAX_BLOCKS} (use larger blocks)")
        _check_owner(owner, epoch)
        directory = Path(directory)
        # not clean from the start: it is open, and a crash before close() must make the counter jump
        state = {"name": name, "size": size, "block_size": block_size, "owner": owner, "epoch": epoch,
                 "counter": 0, "clean": False}
        store_files.create_store_files(directory, state)
        fds = _open_files(directory)
        store = cls(directory, state, fds, _zeroed_records(n))
        store._tree.reset_empty()
        return store

    @classmethod
    def open(cls, directory: Path) -> ReplicaStore:
        """Load meta.bin, replay the journals, checkpoint. Reads data.raw only for journaled blocks."""
        directory = Path(directory)
        state, seq = store_files.read_state(directory)
        fds = _open_files(directory)
        try:
            meta = store_files.load_meta(directory / META_FILE, state["size"], state["block_size"])
            rotated = store_files.rotated_journals(directory)
            journals = [p.read_bytes() for _, p in rotated] + [(directory / JOURNAL_FILE).read_bytes()]
        except BaseException:
            store_files.close_fds(fds)
            raise
        store = cls(directory, state, fds, meta)
        store._state_seq = seq
        store._jseq = max((n for n, _ in rotated), default=0) + 1
        try:
            store._recover(journals, clean=state["clean"])
            store._checkpoint(clean=False)
        except BaseException:
            store.abandon()
            raise
        return store

    def close(self) -> None:
        """Clean shutdown: checkpoint and mark clean, so the next open replays nothing."""
        with self._flush_lock:
            if self._closed:
                return
            try:
                self._checkpoint(clean=True)
            finally:
                with self._lock:
                    self._closed = True
                    self._finalizer()

    def abandon(self) -> None:
        """Close the files without a checkpoint, as a crash would (tests, fatal errors)."""
        with self._flush_lock, self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> ReplicaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- properties ----------------------------------------------------------------------------
    @property
    def name(self) -> str: return self._name
    @property
    def size(self) -> int: return self._size
    @property
    def block_size(self) -> int: return self._bs
    @property
    def n_blocks(self) -> int: return self._n
    @property
    def owner(self) -> str: return self._owner
    @property
    def epoch(self) -> int: return self._epoch
    @property
    def counter(self) -> int: return self._counter  # the last version handed out
    @property
    def handed_from(self) -> tuple[str, ...]: return self._handed_from  # hosts that handed the disk here, newest last
    @property
    def changes(self) -> int: return self._changes  # bumped by every mutation: cheap cache invalidation
    @property
    def held_blocks(self) -> int: return self._held  # blocks this replica holds some version of
    @property
    def boot(self) -> str: return self._boot
    @property
    def directory(self) -> Path: return self._dir

    def set_owner(self, owner: str, epoch: int, counter: int = 0, handed_from: str = "") -> None:
        """Record a new owner and epoch durably; ``counter`` raises the version counter too (the previous
        owner's, handed over with the disk, so no version it gave out is ever given out again).
        ``handed_from`` names the host that handed the disk over, in the same write: that host's open
        guest connections are forwarded here, after a restart of this host too."""
        _check_owner(owner, epoch)
        if handed_from and not NAME_RE.fullmatch(handed_from):
            raise ValueError(f"invalid host name {handed_from!r}")
        with self._state_lock:
            with self._lock:
                self._check_open()
                self._owner, self._epoch = owner, epoch
                self._counter = max(self._counter, counter)
                if handed_from:
                    kept = tuple(h for h in self._handed_from if h != handed_from)
                    self._handed_from = (*kept, handed_from)[-MAX_HANDED_FROM:]
                state = self._state(clean=False)
            self._write_state(state)

    # ---- guest I/O -----------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._check_range(offset, length)
            return pread_all(self._data_fd, length, offset) if length else b""

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> WriteResult:
        length = len(data)
        with self._lock:
            self._check_range(offset, length)
            if not length:
                return WriteResult(offset // self._bs, offset // self._bs - 1, 0)
            first, last = offset // self._bs, (offset + length - 1) // self._bs
            self._counter = v = self._counter + 1
            self._log_intent(first, last, GUEST_WRITES, journal_record(DIRTY, first, last - first + 1, v))
            self._set_versions(first, last, v)
            if first == last:
                self._dirty.add(first)
            else:
                self._dirty.update(range(first, last + 1))
            pwrite_all(self._data_fd, data, offset)
        if fua:
            self.flush()
        return WriteResult(first, last, v)

    def write_many(self, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]
                   ) -> list[WriteResult | OutOfRange | OSError]:
        """Apply writes as write() would one after the other (no FUA), with one journal append for all their
        records: a burst of small guest writes costs one journal pwrite instead of one each, which was as
        much as the data's own. Every record precedes every data write of the batch, so the crash rule
        (intent before data) holds for each; a crash leaves records whose data did not land, as it can
        between any write's record and data. Returns each write's result or error, in order."""
        results: list[WriteResult | OutOfRange | OSError] = []
        landing: list[tuple[int, int, bytes | bytearray | memoryview]] = []  # (result index, offset, data)
        bs = self._bs
        with self._lock:
            self._check_open()
            self._held_records = []
            try:
                for offset, data in writes:
                    length = len(data)
                    try:
                        self._check_range(offset, length)
                        if not length:
                            results.append(WriteResult(offset // bs, offset // bs - 1, 0))
                            continue
                        first, last = offset // bs, (offset + length - 1) // bs
                        self._counter = v = self._counter + 1
                        self._log_intent(first, last, GUEST_WRITES, journal_record(DIRTY, first, last - first + 1, v))
                    except (OutOfRange, OSError) as e:  # a failed activation sync fails this write only...
                        results.append(e)
                        if self._held_records is None:  # ...unless the held records did not reach the journal
                            for i, _, _ in landing:
                                results[i] = e
                            landing, self._held_records = [], []
                        continue
                    self._set_versions(first, last, v)
                    if first == last:
                        self._dirty.add(first)
                    else:
                        self._dirty.update(range(first, last + 1))
                    landing.append((len(results), offset, data))
                    results.append(WriteResult(first, last, v))
            finally:
                try:
                    self._release_records()
                except OSError as e:  # no record, no data: none of the batch's writes may land
                    for i, _, _ in landing:
                        results[i] = e
                    landing = []
            for i, offset, data in landing:
                try:
                    pwrite_all(self._data_fd, data, offset)
                except OSError as e:
                    results[i] = e
        return results

    def write_zeroes(self, offset: int, length: int, fua: bool = False, allocate: bool = False) -> WriteResult:
        """Whole blocks become zero blocks (hole, known hash); partial edge blocks are ordinary writes.

        ``allocate`` keeps the range provisioned in the data file (NBD's NO_HOLE: later writes there must not
        fail for lack of space): whole blocks are punched, then allocated again, and the partial ones are not
        punched when settled. The metadata is the same either way: a zero block is a zero block."""
        bs = self._bs
        with self._lock:
            self._check_range(offset, length)
            if not length:
                return WriteResult(offset // bs, offset // bs - 1, 0)
            end = offset + length
            first, last, a = offset // bs, (end - 1) // bs, -(-offset // bs)
            b = max(a, self._n if end == self._size else end // bs)  # [a, b): blocks covered whole
            partial = sorted({i for i in (first, last) if not a <= i < b})
            self._counter = v = self._counter + 1
            self._log_intent(first, last, GUEST_WRITES, b"".join([journal_record(DIRTY, i, 1, v) for i in partial]
                                                                 + [journal_record(ZERO, a, b - a, v)] * (b > a)))
            self._set_versions(first, last, v)
            self._dirty.update(partial)
            if allocate:
                self._keep_allocated.update(partial)
            store_journal.set_zero_hashes(self._hashes, a, b, bs, self._tail)
            if self._dirty and b > a:
                self._dirty = {i for i in self._dirty if not a <= i < b}
            try:
                for i in partial:
                    lo, hi = max(offset, i * bs), min(end, (i + 1) * bs)
                    pwrite_all(self._data_fd, self._zeros[:hi - lo], lo)
                punch_hole(self._data_fd, a * bs, min(b * bs, self._size) - a * bs)
                if allocate and b > a:  # punched first: allocating alone would keep the old data
                    os.posix_fallocate(self._data_fd, a * bs, min(b * bs, self._size) - a * bs)
            except BaseException:
                self._dirty.update(range(a, b))  # content unknown now: settling will find out
                raise
        if fua:
            self.flush()
        return WriteResult(first, last, v)

    def trim(self, offset: int, length: int, fua: bool = False) -> WriteResult:
        """Discard; always zeroes, so replicas stay byte-identical."""
        return self.write_zeroes(offset, length, fua)

    def flush(self) -> None:
        """Durability point for every write before it. The data sync runs without the state lock.

        Dirty blocks stay dirty (their hash pending) unless more than HASH_PENDING_BYTES of them wait: then
        the excess is hashed first, down to half the bound, so flushes hash in batches. A dirty block's
        DIRTY record before ``covered`` becomes trusted by the SYNC below, and replay re-hashes such blocks
        keeping their version."""
        with self._flush_lock:
            with self._lock:
                self._check_open()
                excess = len(self._dirty) - self._max_pending
                among = set(itertools.islice(self._dirty, excess + self._max_pending // 2)) if excess > 0 else None
            if among:
                known = self._prehash(rounds=1, among=among)
            with self._lock:
                self._check_open()
                if among:
                    self._settle(among & self._dirty, known, only_known=True)
                covered = self._jlen
                if covered == self._synced_jlen:
                    return
            os.fdatasync(self._data_fd)
            with self._lock:
                # Records appended while the data synced describe writes that sync may have missed: the
                # journal's end counts as synced only when there were none, so the next flush syncs them.
                quiet = self._jlen == covered
                self._append(journal_record(SYNC, covered, 0))
                self._synced_jlen = self._jlen if quiet else covered
                # Grow here, in a worker thread, rather than in a guest write on the event loop: room for twice
                # what the journal took since the last flush (a busy guest's records until the next one).
                room = max(JOURNAL_GROWTH_BYTES // 2, 2 * (self._jlen - self._flushed_jlen))
                if self._jcap - self._jlen < room:
                    self._grow_journal(self._jlen + room)
                self._flushed_jlen = end = self._jlen
            os.fdatasync(self._jfd)
            with self._lock:
                self._jdurable = max(self._jdurable, end)
            if self._jlen >= JOURNAL_CHECKPOINT_BYTES:
                self._checkpoint(clean=False)

    def maintain(self) -> None:
        """Flush, then hash and digest everything that changed: before a switchover, so that it finds the
        tree up to date."""
        self.flush()
        self.refresh_tree()

    def upkeep(self) -> None:
        """Periodic upkeep (the daemon's, every few seconds): flush (which bounds the pending hashes), then
        digest the changed leaves whose hashes are known. Pending hashes wait until something needs them:
        a map comparison or publication refreshes the tree in full (refresh_tree), a peer's request settles
        its blocks."""
        self.flush()
        self.refresh_tree(settle=False)

    def allocation(self, offset: int, length: int) -> list[tuple[int, int]]:
        """NBD base:allocation extents (length, flags) from metadata alone: zero blocks are holes."""
        with self._lock:
            self._check_range(offset, length)
            if not length:
                return []
            end = offset + length
            first, last = offset // self._bs, (end - 1) // self._bs
            zero = self._zero_blocks(first, last + 1)
            for i in self._dirty:
                if first <= i <= last:
                    zero[i - first] = False
        starts = [0, *(np.flatnonzero(np.diff(zero.view(np.int8))) + 1).tolist()]  # runs of equal state
        edges = [max(offset, (first + s) * self._bs) for s in starts] + [end]
        return [(hi - lo, STATE_HOLE | STATE_ZERO if zero[s] else 0)
                for s, lo, hi in zip(starts, edges[:-1], edges[1:], strict=True)]

    # ---- the map and its summaries ---------------------------------------------------------------
    def version_map(self) -> VersionMap:
        """A copy of the whole map: for tests and tools only (384 MiB at 1 TiB); services use the tree."""
        with self._flush_lock:
            known = self._prehash()
            with self._lock:
                self._check_open()
                self._settle(self._dirty, known)
                return VersionMap(self._bs, self._size, self._versions.copy(), self._hashes.copy())

    def live_map(self) -> VersionMap:
        """The metadata arrays themselves, not a copy, for readers that tolerate them changing underneath
        and re-check what they use (the planner's local dedup: a copy is verified against its hash)."""
        return VersionMap(self._bs, self._size, self._versions, self._hashes)

    def refresh_tree(self, settle: bool = True) -> None:
        """Digest the leaves changed since the last refresh, and their ancestors, while guest I/O goes on.

        Costs what changed since then. A leaf rewritten while it is digested stays stale (a comparison
        then looks into it); once writes stop, one refresh leaves nothing stale. Without ``settle``, leaves
        holding blocks whose hash is pending are left stale rather than hashed."""
        with self._flush_lock:
            known = self._prehash(rounds=1) if settle else {}
            with self._tree_lock:
                tree = self._tree
                for _ in range(REFRESH_ROUNDS):
                    with self._lock:
                        self._check_open()
                        self._settle(self._dirty, known, only_known=True)
                        leaves = tree.stale_leaves()
                        if self._dirty:  # unknown hashes: those leaves cannot be digested yet
                            busy = np.fromiter((i // LEAF_BLOCKS for i in self._dirty), np.int64)
                            leaves = leaves[~np.isin(leaves, busy)]
                        if not leaves.size:
                            break
                        tree.stale[leaves] = False  # a writer marks them again; then their digests are dropped
                    digests = tree.hash_leaves(self._meta, leaves)
                    newest = tree.newest_of(self._meta, leaves)
                    with self._lock:
                        ok = ~tree.stale[leaves]
                        tree.set_leaves(leaves[ok], [d for d, k in zip(digests, ok, strict=True) if k],
                                        newest[ok], propagate=False)
                        tree.stale[leaves[~ok]] = True
                    tree.propagate(leaves[ok])
                    known = self._prehash(rounds=1) if settle else {}

    def map_summary(self) -> dict[str, Any]:
        """What a peer needs to compare maps with this one: geometry, owner, generation, root digest."""
        with self._tree_lock, self._lock:
            self._check_open()
            return {"size": self._size, "block_size": self._bs, "owner": self._owner, "epoch": self._epoch,
                    "generation": self._counter, "boot": self._boot, "held_blocks": self._held,
                    "root": self._tree.root()}

    def map_nodes(self, level: int, parents: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        """Digests of the children of ``parents`` at ``level`` (see MapTree.nodes); ValueError if out of range."""
        with self._tree_lock, self._lock:
            self._check_open()
            return self._tree.nodes(level, parents)

    def map_entries(self, blocks: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        """The (version, hash) records of ``blocks`` (sorted, in range), hashes of written blocks settled."""
        blocks = np.asarray(blocks, np.int64)
        if blocks.size and (blocks[0] < 0 or blocks[-1] >= self._n or (np.diff(blocks) <= 0).any()):
            raise OutOfRange(f"block list must be sorted, unique and inside disk {self._name!r}")
        return self._settled_records(blocks)

    def _settled_records(self, blocks: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        """The records of ``blocks`` with every hash settled. Hashing runs outside the lock first; a block
        rewritten in between is dirty again (a new version beside the old content's hash, a pair no peer
        could ever deliver), so the few such blocks are hashed again under the lock."""
        self._settle_blocks(blocks)
        with self._lock:
            self._check_open()
            late = self._dirty_among(blocks)
            if late:
                self._settle(late)
            return canonical(self._meta[blocks])

    def changes_since(self, since: int, start_leaf: int = 0, max_blocks: int = 1 << 17
                      ) -> tuple[int, npt.NDArray[np.int64], npt.NDArray[Any], int | None]:
        """The change feed: blocks from leaf ``start_leaf`` on whose version is above ``since``.

        Returns (generation, blocks, their records, next leaf or None when done). Every block changed in
        (since, generation] is in the answer, or in the pages from the next leaf on. Costs one scan of the
        per-leaf newest versions (8 bytes a leaf) plus the changed leaves, never the whole map."""
        with self._lock:
            self._check_open()
            generation = self._counter
            leaves = self._tree.leaves_since(since, start_leaf)
            per_page = max(1, max_blocks // LEAF_BLOCKS)
            nxt = int(leaves[per_page]) if leaves.size > per_page else None
            blocks = leaf_blocks(leaves[:per_page], self._n)
            blocks = blocks[self._versions[blocks] > np.uint64(since)]
        return generation, blocks, self._settled_records(blocks), nxt

    def changed_blocks(self, since: int, upto: int | None = None) -> tuple[npt.NDArray[np.int64], int]:
        """Blocks whose version is in (since, upto] (upto: now), and the counter at the time of the answer."""
        with self._lock:
            self._check_open()
            leaves = self._tree.leaves_since(since)
            blocks = leaf_blocks(leaves, self._n)
            v = self._versions[blocks]
            keep = v > np.uint64(since)
            if upto is not None:
                keep &= v <= np.uint64(upto)
            return blocks[keep], self._counter

    # ---- replication ---------------------------------------------------------------------------
    def read_block(self, index: int) -> BlockRecord:
        self._check_index(index)
        with self._lock:
            self._check_open()
            if index in self._dirty:
                self._settle([index])
            version, digest, length = int(self._versions[index]), self._hashes[index].tobytes(), self._block_len(index)
            if version == 0 or digest == zero_hash(length):
                return BlockRecord(index, version, digest, None)
            return BlockRecord(index, version, digest, pread_all(self._data_fd, length, index * self._bs))

    def put_block(self, index: int, version: int, data: bytes | None, hash: bytes, *, verified: bool = False) -> bool:
        """Apply a block from a peer; False if already held. Hashing happens outside the lock.

        The same version with another hash is applied too: the sender (the owner) is authoritative.
        ``verified`` says the caller has just hashed ``data`` to ``hash`` itself (the fetcher does, off the
        event loop), so it is not hashed a second time.
        """
        self._check_index(index)
        length = self._block_len(index)
        if data is not None and len(data) != length:
            raise ValueError(f"block {index} has {length} bytes, got {len(data)}")
        if data is not None and data == self._zeros_for(length):
            data = None
        if version == 0:  # never written: no hash, zero data
            if data is not None or hash not in (NO_HASH, zero_hash(length)):
                raise HashMismatch(f"block {index} at version 0 must be zero data without a hash")
        elif ((data is None or not verified)
              and (actual := zero_hash(length) if data is None else block_hash(data)) != hash):
            raise HashMismatch(f"block {index} version {version}: data hashes to {actual.hex()}, not {hash.hex()}")
        with self._lock:
            self._check_open()
            if version < (current := int(self._versions[index])):
                raise StaleVersion(f"block {index}: have version {current}, refusing older {version}")
            self._counter = max(self._counter, version)  # a later owner must never reuse this version
            if version == current:
                if index in self._dirty:
                    self._settle([index])
                if version == 0 or self._hashes[index].tobytes() == hash:
                    return False
            self._log_intent(index, index, PEER_BLOCKS, journal_record(PUT, index, 1, version, hash))
            self._set_versions(index, index, version)
            self._hashes[index] = np.frombuffer(hash, np.uint8)
            self._dirty.discard(index)
            try:
                if data is None:
                    punch_hole(self._data_fd, index * self._bs, length)
                else:
                    pwrite_all(self._data_fd, data, index * self._bs)
            except BaseException:
                self._dirty.add(index)
                raise
        return True

    def verify(self) -> list[int]:
        """Blocks whose data does not match their metadata (version-0 blocks must read as zeros)."""
        with self._flush_lock:
            known = self._prehash()
            with self._lock:
                self._check_open()
                self._settle(self._dirty, known)
        # whole-disk scans, outside the lock: each block found is checked again under it
        has_data = store_files.allocated_blocks(self._data_fd, self._size, self._bs)
        todo = np.flatnonzero(has_data | ((self._versions > 0) & ~self._zero_blocks(0, self._n))).tolist()
        bad = []
        for i in todo:
            with self._lock:  # block by block, so guest I/O goes on meanwhile
                self._check_open()
                if i in self._dirty:
                    self._settle([i])
                length = self._block_len(i)
                expected = self._hashes[i].tobytes() if self._versions[i] else zero_hash(length)
                if self._read_and_hash(i)[0] != expected:
                    bad.append(i)
        return bad

    # ---- internals (self._lock held) -----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"disk store {self._name!r} is closed")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OutOfRange(f"range {offset}+{length} is outside disk {self._name!r} of {self._size} bytes")

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._n:
            raise OutOfRange(f"block {index} is outside disk {self._name!r} of {self._n} blocks")

    def _block_len(self, index: int) -> int:
        return self._tail if index == self._n - 1 else self._bs

    def _zeros_for(self, length: int) -> bytes:
        return self._zeros if length == self._bs else self._tail_zeros

    def _zero_blocks(self, a: int, b: int) -> npt.NDArray[np.bool_]:
        """Which of blocks [a, b) are zero blocks per metadata (dirty ones not excluded)."""
        return VersionMap(self._bs, self._size, self._versions, self._hashes).zero_mask(a, b)

    def _set_versions(self, first: int, last: int, version: int) -> None:
        """Blocks first..last now hold ``version`` (> 0): the one place versions change after opening."""
        if first == last:
            new = int(self._versions[first] == 0)
            self._versions[first] = version
        else:
            new = int(np.count_nonzero(self._versions[first:last + 1] == 0))
            self._versions[first:last + 1] = version
        self._held += new
        if new and (area := last // self._area_blocks) in self._weights:  # blocks of a write spanning areas
            self._weights[area] += new  # all count in its last: only the sum is bounded
            self._weight += new
            if self._weight > self._max_weight:  # RETIREs follow every record of their areas' writes: no sync
                self._append(b"".join(self._retire_excess(keep=range(first // self._area_blocks, area + 1))))
        self._changes += 1
        self._tree.touch(first, last, version)
        self._changed_leaves[first // LEAF_BLOCKS:last // LEAF_BLOCKS + 1] = True

    def _append(self, buf: bytes) -> None:
        if buf and self._held_records is not None:  # inside write_many: one pwrite for the batch
            self._held_records.append(buf)
        elif buf:
            if self._jlen + len(buf) > self._jcap:  # no sync here (the event loop): the next journal sync,
                self._grow_journal(self._jlen + len(buf), sync=False)  # in a worker, carries the new size
            if os.pwrite(self._jfd, buf, self._jlen) != len(buf):
                raise OSError(errno.EIO, f"short write to the journal of {self._name!r}")
            self._jlen += len(buf)

    def _release_records(self) -> None:
        """Append the records write_many held back, in their order, and stop holding them."""
        held, self._held_records = self._held_records, None
        if held:
            self._append(b"".join(held))

    def _grow_journal(self, needed: int, sync: bool = True) -> None:
        """Write zeros past the journal's records up to the next JOURNAL_GROWTH_BYTES boundary beyond
        ``needed`` and (with ``sync``) make the new size durable: records then overwrite allocated blocks."""
        cap = (needed // JOURNAL_GROWTH_BYTES + 1) * JOURNAL_GROWTH_BYTES
        pwrite_all(self._jfd, bytes(cap - self._jcap), self._jcap)
        if sync:
            os.fdatasync(self._jfd)
        self._jcap = cap

    def _log_intent(self, first: int, last: int, written: int, records: bytes) -> None:
        """Append the intent records of a write to blocks first..last, which comes next: see the module
        docstring. Their areas become active first (durably); a write spanning many areas syncs its own
        records instead."""
        ab = self._area_blocks
        areas = range(first // ab, last // ab + 1)
        if len(areas) > MAX_AREAS_PER_ACTIVATION:
            self._append(records)
            self._sync_journal_locked()
            return
        recs = []
        for area in areas:
            had = self._active.pop(area, 0)
            self._active[area] = had | written  # re-inserted: most recently written last
            self._activating.pop(area, None)  # active now: a pending activation must not mark it again
            if had | written != had:
                recs.append(self._area_record(ACTIVE, area, had | written))
            if not had:
                self._weigh(area)
        if recs:
            self._append(b"".join(self._retire_excess(keep=areas) + recs))
            self._sync_journal_locked()
        self._append(records)

    def _sync_journal_locked(self) -> None:
        """Make the whole active journal durable now (with self._lock held)."""
        if self._held_records is not None:  # write_many's records so far go first, and it holds the rest
            self._release_records()
            self._held_records = []
        os.fdatasync(self._jfd)
        self._jdurable = self._jlen

    def _area_record(self, kind: int, area: int, written: int = 0) -> bytes:
        ab = self._area_blocks
        return journal_record(kind, area * ab, min(ab, self._n - area * ab), written)

    def _weigh(self, area: int) -> None:
        """Count the blocks holding data in an area becoming active (version above 0: zero blocks too,
        which costs a check at most)."""
        ab = self._area_blocks
        w = int(np.count_nonzero(self._versions[area * ab:(area + 1) * ab]))
        self._weight += w - self._weights.get(area, 0)
        self._weights[area] = w

    def _retire_excess(self, keep: Iterable[int] = ()) -> list[bytes]:
        """RETIRE records for the oldest areas once more than MAX_ACTIVE_AREAS are active or their weight
        passes ACTIVE_DATA_BYTES, down to RETIRE_BATCH areas (or full areas' weight) below either bound.
        The areas in ``keep``, whose writes come next, stay."""
        if len(self._active) <= MAX_ACTIVE_AREAS and self._weight <= self._max_weight:
            return []
        keep = set(keep)
        count_goal = MAX_ACTIVE_AREAS - RETIRE_BATCH
        weight_goal = self._max_weight - RETIRE_BATCH * self._area_blocks
        retired = []
        for area in list(self._active):
            if len(self._active) <= count_goal and self._weight <= weight_goal:
                break
            if area in keep:
                continue
            del self._active[area]
            self._weight -= self._weights.pop(area, 0)
            self._activating.pop(area, None)  # its RETIRE follows that ACTIVE: the write must activate again
            retired.append(area)
        return [self._area_record(RETIRE, area) for area in retired]

    def needs_activation(self, offset: int, length: int, written: int = GUEST_WRITES) -> bool:
        """Whether a write there would first sync the journal (a new area): a guest write, or a peer's blocks
        (``written=PEER_BLOCKS``). Read without the lock: a stale answer only moves that sync back into the
        write."""
        if length <= 0 or offset < 0 or offset + length > self._size:
            return False
        ab = self._area_blocks * self._bs
        first, last = offset // ab, (offset + length - 1) // ab
        if first == last:  # the usual case, once per guest write: no generator
            return not self._active.get(first, 0) & written
        return last - first < MAX_AREAS_PER_ACTIVATION and any(
            not self._active.get(a, 0) & written for a in range(first, last + 1))

    def activate(self, offset: int, length: int, written: int = GUEST_WRITES) -> None:
        """Make the areas of a coming write active (a guest's, or ``written=PEER_BLOCKS`` a peer's blocks): see
        activate_spans."""
        self.activate_spans([(offset, length)], written)

    def activate_spans(self, spans: Iterable[tuple[int, int]], written: int = GUEST_WRITES) -> None:
        """Make the areas of coming writes (offset, length) active, syncing the journal here (a worker
        thread) rather than inside the writes, which the event loop runs. Activations share syncs (a group
        commit): each appends its ACTIVE records, then one thread at a time syncs everything appended so
        far, and a thread whose records an earlier sync covered returns without one. An area counts as
        active only once its record is durable, and only in the journal it went to."""
        spans = [sp for sp in spans if self.needs_activation(*sp, written)]
        if not spans:
            return
        ab = self._area_blocks * self._bs
        with self._lock:
            self._check_open()
            areas = sorted({a for offset, length in spans for a in range(offset // ab, (offset + length - 1) // ab + 1)
                            if not self._active.get(a, 0) & written})
            if not areas:
                return
            # others' records for these bits are on their way; an area activating for other bits gets a
            # record naming both
            new = [a for a in areas if not self._activating.get(a, (0, 0))[1] & written]
            bits = {a: self._active.get(a, 0) | self._activating.get(a, (0, 0))[1] | written for a in new}
            self._append(b"".join(self._area_record(ACTIVE, a, bits[a]) for a in new))
            self._activating.update((a, (self._jlen, bits[a])) for a in new)
            need, seq = max(self._activating[a][0] for a in areas), self._jseq
        with self._jsync_lock:
            with self._lock:
                if self._jseq != seq or self._closed:
                    return  # rotated: a write activates its area again in the new journal
                if self._jdurable < need:
                    end, fd = self._jlen, os.dup(self._jfd)  # a checkpoint may rotate (and close) it meanwhile
                else:
                    fd = -1  # an earlier sync covered these records
            if fd >= 0:
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        with self._lock:
            if self._jseq != seq or self._closed:
                return
            if fd >= 0:
                self._jdurable = max(self._jdurable, end)
            # Only the first thread to see a record durable marks its area: a later one could find the area
            # retired meanwhile (its RETIRE after this record), and must not make it active again.
            done = [a for a in areas if a in self._activating and self._activating[a][0] <= self._jdurable]
            for a in done:
                _, bits_done = self._activating.pop(a)
                had = self._active.pop(a, 0)
                self._active[a] = had | bits_done
                if not had:
                    self._weigh(a)
            self._append(b"".join(self._retire_excess(keep=done)))

    @property
    def active_areas(self) -> int:
        """Areas an unclean open would re-check (tests, benchmarks)."""
        return len(self._active)

    def _read_and_hash(self, i: int) -> tuple[bytes, bool]:
        """(hash, is_zero) of block i as it is on disk."""
        data = pread_all(self._data_fd, self._block_len(i), i * self._bs)
        if data == self._zeros_for(len(data)):
            return zero_hash(len(data)), True
        return block_hash(data), False

    def _prehash(self, rounds: int = PREHASH_ROUNDS, among: set[int] | None = None
                 ) -> dict[int, tuple[int, bytes, bool]]:
        """Hash the dirty blocks (those of ``among`` only, if given) *without* the state lock: at ~0.2 ms per
        64 KiB block, thousands of them would stall guest I/O. Results are keyed by the version read; a
        block rewritten meanwhile has a new version, so _settle ignores its (possibly torn) result and a
        later round hashes it again. Call with _flush_lock held: the files then stay open."""
        known: dict[int, tuple[int, bytes, bool]] = {}
        for _ in range(rounds):
            with self._lock:
                self._check_open()
                dirty = self._dirty if among is None else self._dirty & among
                todo = [(i, int(self._versions[i])) for i in sorted(dirty)]
            todo = [(i, v) for i, v in todo if known.get(i, (-1,))[0] != v]
            if not todo:
                break
            known.update({i: (v, *self._read_and_hash(i)) for i, v in todo})
        return known

    def _settle_blocks(self, blocks: npt.NDArray[np.int64], journal: bool = True) -> None:
        """Settle the dirty ones among ``blocks``, hashing them outside the state lock (call without it)."""
        with self._lock:
            among = self._dirty_among(blocks)
        if not among:
            return
        with self._flush_lock:
            known = self._prehash(among=among)
            with self._lock:
                self._check_open()
                self._settle(among & self._dirty, known, journal=journal)

    def _dirty_among(self, blocks: npt.NDArray[np.int64]) -> set[int]:
        if not self._dirty or not blocks.size:
            return set()
        dirty = np.fromiter(self._dirty, np.int64, len(self._dirty))
        return set(dirty[np.isin(dirty, blocks)].tolist())

    def _settle(self, indexes: Iterable[int], known: dict[int, tuple[int, bytes, bool]] | None = None,
                only_known: bool = False, journal: bool = True) -> None:
        """Hash dirty blocks (or take still-valid _prehash results; with ``only_known`` nothing else)
        and journal the hashes (a checkpoint does not: it writes them to meta.bin, and until it has, replay
        hashes the blocks again from their DIRTY records); all-zero blocks become holes (unless kept
        allocated), which leaves their content unchanged."""
        order, recs = [], []
        for i in sorted(indexes):
            pre = (known or {}).get(i)
            if pre and pre[0] == self._versions[i]:
                digest, is_zero = pre[1], pre[2]
            elif only_known:
                continue
            else:
                digest, is_zero = self._read_and_hash(i)
            order.append(i)
            if is_zero and i not in self._keep_allocated:
                punch_hole(self._data_fd, i * self._bs, self._block_len(i))
            self._hashes[i] = np.frombuffer(digest, np.uint8)
            self._tree.touch(i, i, 0)  # the leaf's digest covers hashes too
            self._changed_leaves[i // LEAF_BLOCKS] = True
            if journal:
                recs.append(journal_record(SETTLE, i, 1, int(self._versions[i]), digest))
        self._append(b"".join(recs))
        self._dirty.difference_update(order)
        if self._keep_allocated:
            self._keep_allocated.difference_update(order)

    def _recover(self, journals: list[bytes], clean: bool) -> None:
        """Redo the journals over meta.bin: trust what a SYNC vouches for, re-check the rest against the data.
        Runs before anyone else can see the store: no lock needed."""
        changed = np.zeros(self._n, np.bool_)
        verdicts, newest = store_journal.replay(journals, self._versions, self._hashes, changed, self._bs, self._tail)
        self._skip_area_holes(verdicts)
        self._counter = max(self._counter, newest) + (UNCLEAN_COUNTER_GAP if not clean or any(journals) else 0)
        for a, b in runs(np.flatnonzero(verdicts == store_journal.REDO_ZERO)):  # a ZERO's content is known: redo it
            punch_hole(self._data_fd, a * self._bs, min(b * self._bs, self._size) - a * self._bs)
        self._counter, missing = store_journal.check_against_data(verdicts, self._versions, self._hashes, self._counter,
                                                                  self._read_and_hash)
        for i in missing:  # a replicated block whose data did not land: to be fetched again
            punch_hole(self._data_fd, i * self._bs, self._block_len(i))
        touched = np.flatnonzero(changed)
        self._hashes[touched[self._versions[touched] == 0]] = 0  # never written (or lost): no hash
        pad = (-self._n) % LEAF_BLOCKS
        self._changed_leaves = np.concatenate([changed, np.zeros(pad, np.bool_)]).reshape(-1, LEAF_BLOCKS).any(axis=1)
        self._held = int(np.count_nonzero(self._versions))
        self._tree = MapTree.build(self._meta, self._bs, self._size)

    def _skip_area_holes(self, verdicts: npt.NDArray[np.uint8]) -> None:
        """Blocks of still active areas that are holes in the data and, per metadata, never written or zero
        blocks: reading them would only confirm that, so they need no check. A sparse disk's active areas are
        mostly such holes, so a crash costs a read of what was written there, not of whole areas."""
        area = (verdicts == store_journal.CHECK_GUEST_AREA) | (verdicts == store_journal.CHECK_PEER_AREA)
        zero = np.frombuffer(zero_hash(self._bs), np.uint8)
        for a, b in runs(np.flatnonzero(area)):
            b = min(b, self._n - 1)  # the last block, possibly shorter, is always checked
            if b <= a:
                continue
            hole = ~store_files.allocated_in(self._data_fd, a * self._bs, b * self._bs, self._bs)
            known_zero = (self._versions[a:b] == 0) | (self._hashes[a:b] == zero).all(axis=1)
            verdicts[a:b][hole & known_zero & area[a:b]] = 0

    def _checkpoint(self, clean: bool) -> None:
        """Fold every change into meta.bin and state.bin and drop the journals, while guest I/O goes on.

        Call with _flush_lock held. The active journal is rotated away first, so records appended
        meanwhile survive. Then, chunk by chunk, the changed records are copied under the lock (dirty
        ones settled first), the data is synced, and the copies are written to meta.bin: a record never
        reaches meta.bin before the data it describes is durable. The state is written last; only then
        are the rotated journals deleted. Replay of journals that meta.bin already reflects is harmless."""
        with self._lock:
            self._check_open()
            seq = self._rotate_journal()
            leaves = np.flatnonzero(self._changed_leaves)
            self._changed_leaves[leaves] = False  # changes from now on mark their leaves again
        try:
            # The rename and the new journal reach the disk before any flush relies on the new file (flushes
            # wait for _flush_lock, which the caller holds); the state's in-place write would not carry them.
            store_files.fsync_dir(self._dir)
            for start in range(0, leaves.size, CHECKPOINT_CHUNK_LEAVES):
                chunk = leaves[start:start + CHECKPOINT_CHUNK_LEAVES]
                blocks = leaf_blocks(chunk, self._n)
                # No SETTLE records: a clean close would leave them in the new journal, and the next open
                # would take that journal for a crash's.
                self._settle_blocks(blocks, journal=False)
                with self._lock:
                    self._check_open()
                    self._settle(self._dirty_among(blocks), journal=False)  # written since: a few, if any
                    pieces = [(a * LEAF_BLOCKS, self._meta[a * LEAF_BLOCKS:min(b * LEAF_BLOCKS, self._n)].copy())
                              for a, b in runs(chunk)]
                os.fdatasync(self._data_fd)
                store_files.write_meta_runs(self._dir / META_FILE, pieces)
            with self._state_lock:
                with self._lock:
                    state = self._state(clean)
                self._write_state(state)
        except BaseException:
            with self._lock:
                self._changed_leaves[leaves] = True  # the next checkpoint writes them again
            raise
        for s, path in store_files.rotated_journals(self._dir):
            if s <= seq:
                path.unlink(missing_ok=True)

    def _rotate_journal(self) -> int:
        """Rename the active journal to journal.<seq>.log and append to a new, empty one from now on."""
        seq, self._jseq = self._jseq, self._jseq + 1
        active = self._dir / JOURNAL_FILE
        os.rename(active, self._dir / f"journal.{seq}.log")
        fd = os.open(active, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(self._fds[1])
        self._fds[1] = self._jfd = fd
        self._jlen = self._synced_jlen = self._jcap = self._jdurable = self._flushed_jlen = 0
        self._activating.clear()
        # Writes from now on activate their areas in the new journal. Those before the rotation are covered
        # by the old journal's ACTIVE records until the checkpoint has made them durable and deletes it.
        self._active.clear()
        self._weights.clear()
        self._weight = 0
        return seq

    def _write_state(self, state: dict[str, Any]) -> None:
        """Make ``state`` durable (call with _state_lock held): one slot rewritten in place."""
        if self._state_seq == 0:  # a first-format store: its state moves to state.bin
            store_files.create_state(self._dir, state)
            (self._dir / store_files.LEGACY_STATE_FILE).unlink(missing_ok=True)
            self._state_seq = 1
            return
        store_files.write_state(self._dir, state, self._state_seq + 1)
        self._state_seq += 1  # only once written: a failed write is retried into the same slot

    def _state(self, clean: bool) -> dict[str, Any]:
        return {"name": self._name, "size": self._size, "block_size": self._bs, "owner": self._owner,
                "epoch": self._epoch, "counter": self._counter, "clean": clean,
                "handed_from": list(self._handed_from)}


def _zeroed_records(n: int) -> npt.NDArray[Any]:
    """``n`` version-0 records in a private anonymous mapping: a page is allocated only once a record on it
    is written (reading one maps the kernel's zero page), so a new replica's memory follows what it
    holds. (numpy asks for transparent huge pages on big arrays, so a write anywhere would allocate 2 MiB;
    a shared mapping would allocate every page merely read.)"""
    mapping = mmap.mmap(-1, max(1, n * META_DTYPE.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mapping, META_DTYPE, count=n)


def _open_files(directory: Path) -> list[int]:
    """data.raw locked against a second opener, and the active journal for appending."""
    fds = [os.open(directory / DATA_FILE, os.O_RDWR | os.O_CLOEXEC)]
    try:
        try:
            fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusy(f"disk store {directory} is already open") from None
        fds.append(os.open(directory / JOURNAL_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except BaseException:
        store_files.close_fds(fds)
        raise
    return fds
