"""The store's activity log: data that reached the disk before its intent record did is found again.

A power cut can leave a block's new data on disk while the journal record naming the write is lost (a
flush's data sync, or the kernel's writeback, ran before the journal's sync). These tests build that disk
state directly: they write, then cut the journal back to what was durable before the write's own record.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from p2pvbd import replica_store as rs
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.store import store_journal as sj
from p2pvbd.store.store_files import JOURNAL_FILE
from p2pvbd.store.version_map import block_hash

BS = 64 * 1024
AREA_BLOCKS = rs.ACTIVE_AREA_BYTES // BS


def journal_size(store: ReplicaStore) -> int:
    """Bytes of records in the active journal (its file goes on with zeros written ahead)."""
    return sj.records_end((store.directory / JOURNAL_FILE).read_bytes(), 1 << 40)


def cut_journal(store: ReplicaStore, size: int) -> Path:
    """A power cut that kept the data and the journal's first ``size`` bytes; returns the store's directory."""
    directory = store.directory
    store.abandon()
    os.truncate(directory / JOURNAL_FILE, size)
    return directory


def kinds(store_dir: Path) -> list[int]:
    data = (store_dir / JOURNAL_FILE).read_bytes()
    return [r[1] for r in sj.parse_journal(data, 1 << 40)]


def test_guest_data_without_its_record_becomes_a_new_version(tmp_path: Path) -> None:
    s = ReplicaStore.create(tmp_path / "d", "d", 8 * BS, BS)
    s.write(3 * BS, b"A" * BS)
    s.flush()
    old = s.read_block(3).version
    durable = journal_size(s)  # the area is active already: the next write appends only its DIRTY record
    s.write(3 * BS, b"B" * BS)
    assert journal_size(s) == durable + sj.REC_SIZE
    directory = cut_journal(s, durable)
    s = ReplicaStore.open(directory)
    rec = s.read_block(3)
    assert s.verify() == []
    assert s.read(3 * BS, BS) == b"B" * BS
    assert rec.version > old and rec.hash == block_hash(b"B" * BS)
    s.close()


def test_the_first_write_into_an_area_makes_it_active_before_its_data(tmp_path: Path) -> None:
    s = ReplicaStore.create(tmp_path / "d", "d", 4 * AREA_BLOCKS * BS, BS)
    before = journal_size(s)
    s.write(AREA_BLOCKS * BS + 5, b"x" * 100)  # inside area 1
    assert s.active_areas == 1
    directory = cut_journal(s, before + sj.REC_SIZE)  # only the ACTIVE record was synced
    assert kinds(directory) == [sj.ACTIVE]
    s = ReplicaStore.open(directory)
    assert s.verify() == []
    assert s.read(AREA_BLOCKS * BS + 5, 100) == b"x" * 100
    assert s.read_block(AREA_BLOCKS).version > 0
    assert s.read_block(0).version == 0  # the other areas were not touched, nor re-checked into versions
    s.close()


def test_a_peer_block_without_its_record_is_fetched_again(tmp_path: Path) -> None:
    s = ReplicaStore.create(tmp_path / "d", "d", 8 * BS, BS)
    data = os.urandom(BS)
    assert s.put_block(1, 7, data, block_hash(data))
    s.flush()
    durable = journal_size(s)
    newer = os.urandom(BS)
    assert s.put_block(1, 9, newer, block_hash(newer))
    directory = cut_journal(s, durable)
    s = ReplicaStore.open(directory)
    assert s.verify() == []
    rec = s.read_block(1)
    # Its version 7 content is gone, and a local version would claim content no owner gave: missing.
    assert rec.version == 0 and s.read(BS, BS) == bytes(BS)
    s.close()


def test_zeroes_without_their_record_are_found(tmp_path: Path) -> None:
    s = ReplicaStore.create(tmp_path / "d", "d", 8 * BS, BS)
    s.write(0, os.urandom(4 * BS))
    s.flush()
    durable = journal_size(s)
    s.write_zeroes(BS, 2 * BS)
    directory = cut_journal(s, durable)
    s = ReplicaStore.open(directory)
    assert s.verify() == []
    assert s.read(BS, 2 * BS) == bytes(2 * BS)
    s.close()


def test_active_areas_stay_bounded_and_retire_in_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rs, "MAX_ACTIVE_AREAS", 40)  # the real bound is thousands of areas: a slow test
    n_areas = rs.MAX_ACTIVE_AREAS + rs.RETIRE_BATCH + 3
    s = ReplicaStore.create(tmp_path / "d", "d", n_areas * AREA_BLOCKS * BS, BS)
    for area in range(n_areas):
        s.write(area * AREA_BLOCKS * BS, b"w" * 512)
        assert s.active_areas <= rs.MAX_ACTIVE_AREAS
    assert kinds(s.directory).count(sj.RETIRE) >= rs.RETIRE_BATCH
    checked: list[int] = []
    directory = s.directory
    s.abandon()
    hash_data = ReplicaStore._read_and_hash

    def counting(store: ReplicaStore, i: int) -> tuple[bytes, bool]:
        checked.append(i)
        return hash_data(store, i)

    ReplicaStore._read_and_hash = counting  # type: ignore[method-assign]
    try:
        s = ReplicaStore.open(directory)
    finally:
        ReplicaStore._read_and_hash = hash_data  # type: ignore[method-assign]
    # The unclean open re-checked the still active areas and the written blocks, not the whole disk.
    assert len(set(checked)) <= rs.MAX_ACTIVE_AREAS * AREA_BLOCKS + n_areas
    assert s.verify() == []
    assert [s.read(a * AREA_BLOCKS * BS, 512) for a in range(n_areas)] == [b"w" * 512] * n_areas
    s.close()


def test_the_data_held_in_active_areas_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an unclean open re-reads is the data in the active areas, so that is bounded, not their number:
    writes filling areas retire the oldest once they hold more than ACTIVE_DATA_BYTES, and the next open
    re-reads no more than that (plus the areas a write needed room for)."""
    monkeypatch.setattr(rs, "ACTIVE_DATA_BYTES", 3 * AREA_BLOCKS * BS)
    monkeypatch.setattr(rs, "RETIRE_BATCH", 1)
    n_areas = 8
    s = ReplicaStore.create(tmp_path / "d", "d", n_areas * AREA_BLOCKS * BS, BS)
    for area in range(n_areas):
        s.write(area * AREA_BLOCKS * BS, os.urandom(AREA_BLOCKS * BS))  # fills the area
        assert s.active_areas <= 3
        s.version_map()  # hashed and flushed: only an active area's blocks are left to check
        s.flush()
    assert kinds(s.directory).count(sj.RETIRE) >= n_areas - 3
    checked: set[int] = set()
    directory = s.directory
    s.abandon()
    hash_data = ReplicaStore._read_and_hash

    def counting(store: ReplicaStore, i: int) -> tuple[bytes, bool]:
        checked.add(i)
        return hash_data(store, i)

    monkeypatch.setattr(ReplicaStore, "_read_and_hash", counting)
    s = ReplicaStore.open(directory)
    assert checked and len(checked) <= 3 * AREA_BLOCKS
    assert min(checked) >= (n_areas - 3) * AREA_BLOCKS, "a retired area was re-read"
    assert s.verify() == []
    s.close()


def test_sparse_writes_over_many_areas_make_each_active_once(tmp_path: Path) -> None:
    """A few blocks in each of more areas than the old fixed bound (320) weigh little: written round and round,
    each area is made active (a journal sync) once, not at every pass."""
    n_areas = 400
    s = ReplicaStore.create(tmp_path / "d", "d", n_areas * AREA_BLOCKS * BS, BS)
    for rnd in range(2):
        for area in range(n_areas):
            s.write(area * AREA_BLOCKS * BS + rnd * BS, b"s" * 4096)
    assert s.active_areas == n_areas
    assert kinds(s.directory).count(sj.ACTIVE) == n_areas and sj.RETIRE not in kinds(s.directory)
    s.close()


def test_a_large_zeroing_syncs_its_own_record_instead(tmp_path: Path) -> None:
    n_areas = rs.MAX_AREAS_PER_ACTIVATION + 2
    s = ReplicaStore.create(tmp_path / "d", "d", n_areas * AREA_BLOCKS * BS, BS)
    s.write_zeroes(0, n_areas * AREA_BLOCKS * BS)
    assert s.active_areas == 0
    assert kinds(s.directory)[-1] == sj.ZERO
    s.close()


def test_a_rotation_starts_an_empty_active_set(tmp_path: Path) -> None:
    s = ReplicaStore.create(tmp_path / "d", "d", 8 * BS, BS)
    s.write(0, b"a" * BS)
    assert s.active_areas == 1
    with s._flush_lock:
        s._checkpoint(clean=False)
    assert s.active_areas == 0 and sj.ACTIVE not in kinds(s.directory)
    s.write(0, b"b" * BS)
    assert kinds(s.directory)[-2:] == [sj.ACTIVE, sj.DIRTY]
    s.close()


def _replay(journals: list[bytes], n: int = 8) -> np.ndarray:
    versions = np.zeros(n, np.uint64)
    hashes = np.zeros((n, 16), np.uint8)
    verdicts, _ = sj.replay(journals, versions, hashes, np.zeros(n, np.bool_), BS, BS)
    return verdicts


def test_a_retire_vouches_only_for_its_own_journal() -> None:
    active = sj.journal_record(sj.ACTIVE, 0, 4, sj.GUEST_WRITES)
    retire = sj.journal_record(sj.RETIRE, 0, 4)
    assert _replay([active + retire]).tolist() == [0] * 8
    # The older journal's tail may be lost: an area it names stays active whatever the newer one says.
    assert _replay([active, active + retire]).tolist() == [sj.CHECK_GUEST_AREA] * 4 + [0] * 4
    peer = sj.journal_record(sj.ACTIVE, 2, 4, sj.PEER_BLOCKS)
    assert _replay([active + peer]).tolist() == [sj.CHECK_GUEST_AREA] * 4 + [sj.CHECK_PEER_AREA] * 2 + [0] * 2


def test_activating_ahead_of_a_write_moves_its_sync_out_of_the_write(tmp_path: Path) -> None:
    """The export activates a new area from a worker thread before the write, which then syncs nothing."""
    s = ReplicaStore.create(tmp_path / "d", "d", 4 * AREA_BLOCKS * BS, BS)
    offset = 2 * AREA_BLOCKS * BS + 7
    assert s.needs_activation(offset, 100)
    s.activate(offset, 100)
    assert not s.needs_activation(offset, 100) and s.active_areas == 1
    durable = journal_size(s)  # the ACTIVE record, synced by activate()
    synced: list[int] = []
    real_fsync = os.fsync
    try:
        os.fsync = lambda fd: synced.append(fd)  # type: ignore[assignment]
        s.write(offset, b"y" * 100)
    finally:
        os.fsync = real_fsync  # type: ignore[assignment]
    assert synced == [] and kinds(s.directory)[-1] == sj.DIRTY
    directory = cut_journal(s, durable)  # the write's own record lost, its data on disk
    s = ReplicaStore.open(directory)
    assert s.verify() == [] and s.read(offset, 100) == b"y" * 100
    s.close()


def test_concurrent_activations_share_one_journal_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes in flight into new areas wait on one sync between them (a group commit), not one each."""
    s = ReplicaStore.create(tmp_path / "d", "d", 8 * AREA_BLOCKS * BS, BS)
    s.write(0, b"x")  # area 0 active and the journal grown, before the syncs counted here
    s.flush()
    journal = (tmp_path / "d" / JOURNAL_FILE).stat().st_ino
    real_fdatasync = os.fdatasync
    syncs: list[int] = []
    first_sync, release = threading.Event(), threading.Event()

    def fdatasync(fd: int) -> None:
        if os.fstat(fd).st_ino == journal:
            syncs.append(fd)
            if len(syncs) == 1:  # the first activation's sync is slow: the others queue up behind it
                first_sync.set()
                release.wait()
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    threads = [threading.Thread(target=s.activate, args=(a * AREA_BLOCKS * BS, 1)) for a in range(1, 7)]
    threads[0].start()
    first_sync.wait()
    for t in threads[1:]:
        t.start()
    while kinds(tmp_path / "d").count(sj.ACTIVE) < 7:  # every activation has appended its record
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join()
    assert s.active_areas == 7 and not any(s.needs_activation(a * AREA_BLOCKS * BS, 1) for a in range(7))
    assert len(syncs) == 2, "the activations queued behind a sync did not share the next one"
    s.close()


def test_journal_records_overwrite_zeros_written_ahead(tmp_path: Path) -> None:
    """Activations sync data only: the journal's size stays put while records go in (no file-system commit)."""
    s = ReplicaStore.create(tmp_path / "d", "d", 8 * AREA_BLOCKS * BS, BS)
    s.write(0, b"x")
    size = (tmp_path / "d" / JOURNAL_FILE).stat().st_size
    for a in range(1, 8):
        s.write(a * AREA_BLOCKS * BS, b"y")
    s.flush()
    assert (tmp_path / "d" / JOURNAL_FILE).stat().st_size == size == rs.JOURNAL_GROWTH_BYTES
    assert kinds(tmp_path / "d").count(sj.ACTIVE) == 8
    directory = cut_journal(s, size)  # a power cut with every record durable
    s = ReplicaStore.open(directory)
    assert s.read(7 * AREA_BLOCKS * BS, 1) == b"y" and s.verify() == []
    s.close()


def test_guest_writes_never_sync_to_grow_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes run on the event loop: one that finds the journal's zeros used up writes more without a sync
    (the next journal sync, in a worker thread, carries the new size), and a flush grows the journal ahead by
    twice what it took since the last one, so a busy guest rarely finds it full."""
    s = ReplicaStore.create(tmp_path / "d", "d", 8 * AREA_BLOCKS * BS, BS)
    s.write(0, b"x")
    s.flush()
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: syncs.append(fd) or real(fd))
    n = 2 * rs.JOURNAL_GROWTH_BYTES // sj.REC_SIZE  # records for twice the zeros written ahead
    for k in range(n):
        s.write(k % 64 * BS, b"w")  # an active area: one DIRTY record each
    assert syncs == [], "a guest write synced the journal to grow it"
    s.flush()
    used = journal_size(s)
    assert (tmp_path / "d" / JOURNAL_FILE).stat().st_size - used >= 2 * (n - 1) * sj.REC_SIZE
    directory = cut_journal(s, used)  # every record durable (the flush synced the journal)
    s = ReplicaStore.open(directory)
    assert s.read(0, 1) == b"w" and s.verify() == []
    s.close()


@pytest.mark.parametrize("zeroed", [False, True])
def test_an_unclean_open_reads_only_what_active_areas_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           zeroed: bool) -> None:
    """The holes of an active area that were never written, or are zero blocks, read as zeros: the open after
    a crash checks the blocks written there, not the whole area."""
    s = ReplicaStore.create(tmp_path / "d", "d", 4 * AREA_BLOCKS * BS, BS)
    if zeroed:  # every block a zero block (version > 0), as after a whole-disk zeroing
        s.write_zeroes(0, s.size)
        s.flush()
    for a in range(3):
        s.write(a * AREA_BLOCKS * BS + 5 * BS, b"z" * BS)
    s.flush()
    s.write(AREA_BLOCKS * BS + 9 * BS, b"w" * 100)  # not flushed: replay checks it too
    directory = cut_journal(s, journal_size(s))
    read: list[int] = []
    real = ReplicaStore._read_and_hash

    def counting(store: ReplicaStore, i: int) -> tuple[bytes, bool]:
        read.append(i)
        return real(store, i)

    monkeypatch.setattr(ReplicaStore, "_read_and_hash", counting)
    s = ReplicaStore.open(directory)
    assert len(read) <= 3 + 1 + 3, sorted(read)  # the written blocks (and a checkpoint's settling of them)
    assert s.read(AREA_BLOCKS * BS + 9 * BS, 100) == b"w" * 100
    monkeypatch.undo()
    assert s.verify() == []
    s.close()
