"""ReplicaStore and VersionMap: I/O semantics, replication rules and crash consistency."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from p2pvbd import replica_store as rs
from p2pvbd.replica_store import (
    BlockRecord,
    HashMismatch,
    OutOfRange,
    ReplicaStore,
    StaleVersion,
    StoreBusy,
)
from p2pvbd.store import store_files
from p2pvbd.store.map_tree import MapTree, records_of
from p2pvbd.store.store_journal import REC_SIZE, records_end
from p2pvbd.store.version_map import NO_HASH, VersionMap, block_hash, zero_hash

ROOT = Path(__file__).resolve().parent.parent
BS = 4096
# 16 blocks, the last one partial (1536 bytes): exercises the tail everywhere.
SIZE = 15 * BS + 1536


def make(tmp_path: Path, size: int = SIZE, bs: int = BS, name: str = "d", **kw: object) -> ReplicaStore:
    return ReplicaStore.create(tmp_path / name, name, size, bs, **kw)  # type: ignore[arg-type]


def assert_consistent(store: ReplicaStore) -> None:
    """Metadata never claims a hash the data does not have; never-written blocks read as zeros."""
    vm = store.version_map()
    for i in range(vm.n_blocks):
        data = store.read(i * vm.block_size, vm.block_length(i))
        if vm.versions[i] == 0:
            assert data == bytes(len(data)), f"block {i} at version 0 holds data"
        else:
            assert vm.hashes[i].tobytes() == block_hash(data), f"block {i} hash does not match its data"
    assert store.verify() == []


def payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


# ---- creation and validation -----------------------------------------------------------------------
@pytest.mark.parametrize("bs", [0, 512, 2048, 4095, 6144, 8 * 1024 * 1024, 65537])
def test_block_size_rejected(tmp_path: Path, bs: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        make(tmp_path, bs=bs)


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "sp ace", "x" * 65, "é"])
def test_bad_names_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid disk name"):
        ReplicaStore.create(tmp_path / "d", name, SIZE)


@pytest.mark.parametrize("size", [0, -512, 1000, 513])
def test_bad_sizes_rejected(tmp_path: Path, size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        make(tmp_path, size=size)


def test_create_twice_open_missing_and_busy(tmp_path: Path) -> None:
    with make(tmp_path) as s:
        with pytest.raises(FileExistsError):
            make(tmp_path)
        with pytest.raises(StoreBusy):
            ReplicaStore.open(tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        ReplicaStore.open(tmp_path / "nothing")
    assert s.name == "d" and s.size == SIZE and s.block_size == BS and s.n_blocks == 16
    with pytest.raises(ValueError, match="closed"):
        s.read(0, 1)


# ---- guest I/O ------------------------------------------------------------------------------------
def test_round_trips_against_model(tmp_path: Path) -> None:
    rng = random.Random(1)
    model = bytearray(SIZE)
    with make(tmp_path) as s:
        last_version = 0
        for k in range(200):
            off = rng.randrange(SIZE)
            length = rng.randint(1, min(3 * BS, SIZE - off))
            res = s.write(off, payload(k, length))
            model[off:off + length] = payload(k, length)
            assert res.version > last_version and (res.first_block, res.last_block) == (
                off // BS, (off + length - 1) // BS)
            last_version = res.version
            if k % 50 == 0:
                s.flush()
        s.write(SIZE - 100, b"\xff" * 100)  # the partial last block
        model[-100:] = b"\xff" * 100
        assert s.read(0, SIZE) == model
        assert s.read(SIZE - 1, 1) == b"\xff" and s.read(SIZE, 0) == b""
        assert s.counter == last_version + 1
        assert_consistent(s)
        for off, length in [(SIZE, 1), (SIZE - 1, 2), (-1, 1), (0, -1), (0, SIZE + 1)]:
            with pytest.raises(OutOfRange):
                s.read(off, length)
        with pytest.raises(OutOfRange):
            s.write(SIZE - 1, b"ab")
        with pytest.raises(OutOfRange):
            s.trim(0, SIZE + 512)
        assert s.write(5, b"").version == 0  # touches no block, takes no version
    with ReplicaStore.open(tmp_path / "d") as s:
        assert s.read(0, SIZE) == model
        assert s.counter == last_version + 1  # clean close: no gap


def test_versions_per_request(tmp_path: Path) -> None:
    with make(tmp_path) as s:
        r1 = s.write(BS - 10, b"x" * (2 * BS + 20))  # blocks 0..3, one version
        r2 = s.write_zeroes(2 * BS, BS)
        vm = s.version_map()
        assert (r1.first_block, r1.last_block, r2.version) == (0, 3, r1.version + 1)
        assert vm.versions.tolist()[:5] == [r1.version, r1.version, r2.version, r1.version, 0]


def holes(path: Path) -> list[tuple[int, int]]:
    """Allocated extents of a file."""
    out, off, size = [], 0, path.stat().st_size
    with open(path, "rb") as f:
        while off < size:
            try:
                start = os.lseek(f.fileno(), off, os.SEEK_DATA)
            except OSError:
                break
            off = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out.append((start, off))
    return out


def test_zeroes_and_trim_make_holes(tmp_path: Path) -> None:
    with make(tmp_path) as s:
        s.write(0, payload(1, SIZE))
        s.flush()
        data_path = tmp_path / "d" / rs.DATA_FILE
        before = data_path.stat().st_blocks
        r = s.trim(2 * BS, 4 * BS)
        s.write_zeroes(10 * BS + 100, 100)  # inside one block: an ordinary write of zeros
        s.write_zeroes(15 * BS, 1536)  # the whole partial last block
        s.flush()
        assert data_path.stat().st_blocks < before
        extents = holes(data_path)
        assert not any(a < 6 * BS and b > 2 * BS for a, b in extents), extents
        vm = s.version_map()
        for i in range(2, 6):
            assert vm.versions[i] == r.version and vm.hashes[i].tobytes() == zero_hash(BS)
            assert s.read_block(i) == BlockRecord(i, r.version, zero_hash(BS), None)
        assert vm.hashes[15].tobytes() == zero_hash(1536) and s.read_block(15).data is None
        assert s.read(2 * BS, 4 * BS) == bytes(4 * BS)
        assert s.read(10 * BS + 100, 100) == bytes(100) and s.read_block(10).data is not None
        assert vm.zero_mask().tolist() == [i in (2, 3, 4, 5, 15) for i in range(16)]
        assert s.allocation(BS, 6 * BS) == [(BS, 0), (4 * BS, 3), (BS, 0)]
        assert s.allocation(15 * BS + 1, 1000) == [(1000, 3)]
        assert_consistent(s)


def test_written_zeros_settle_to_zero_blocks(tmp_path: Path) -> None:
    with make(tmp_path) as s:
        s.write(0, payload(2, 2 * BS))
        s.write(0, bytes(BS))
        assert s.allocation(0, 2 * BS) == [(2 * BS, 0)]  # dirty: not known to be zero yet
        rec = s.read_block(0)
        assert rec.data is None and rec.hash == zero_hash(BS) and rec.version == s.counter
        assert s.allocation(0, 2 * BS) == [(BS, 3), (BS, 0)]
        assert s.read_block(1).data == payload(2, 2 * BS)[BS:]


def test_flush_in_a_thread_while_writing(tmp_path: Path) -> None:
    """The daemon's pattern: flush() in a worker thread while the loop keeps writing and reading."""
    model = bytearray(SIZE)
    with make(tmp_path) as s:
        stop = threading.Event()

        def flusher() -> None:
            while not stop.is_set():
                s.flush()
                s.version_map()

        t = threading.Thread(target=flusher)
        t.start()
        rng = random.Random(3)
        try:
            for k in range(3000):
                off = rng.randrange(SIZE)
                length = rng.randint(1, min(2 * BS, SIZE - off))
                if k % 10 == 9:
                    s.write_zeroes(off, length)
                    model[off:off + length] = bytes(length)
                else:
                    s.write(off, payload(k, length))
                    model[off:off + length] = payload(k, length)
                assert s.read(off, length) == model[off:off + length]
        finally:
            stop.set()
            t.join()
        assert s.read(0, SIZE) == model
        assert_consistent(s)
        s.abandon()
    with ReplicaStore.open(tmp_path / "d") as s:
        assert s.read(0, SIZE) == model
        assert_consistent(s)


def test_a_write_settled_during_a_flush_is_synced_by_the_next(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose records land while a flush syncs the data is not covered by that flush: the next flush
    must sync again even when nothing was appended since (here its block was settled meanwhile, by a peer
    delivering the same version), or the guest is told a write is durable that a power cut loses."""
    syncs: list[int] = []
    real_fdatasync = os.fdatasync
    with make(tmp_path) as s:
        s.write(0, payload(1, BS))
        data = payload(2, BS)

        data_file = (tmp_path / "d" / rs.DATA_FILE).stat().st_ino

        def fdatasync(fd: int) -> None:
            if os.fstat(fd).st_ino == data_file:  # data syncs only (the journal's are fdatasync too)
                syncs.append(fd)
                if len(syncs) == 1:  # inside the first flush's data sync, after it chose what it covers
                    v = s.write(BS, data).version
                    s.put_block(1, v, data, block_hash(data))  # same version and content: settles block 1
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        s.flush()
        assert len(syncs) == 1
        s.flush()  # the write to block 1 was acknowledged before this flush: it must reach the disk now
        assert len(syncs) == 2, "a flush vouched for a write no data sync covered"
        s.flush()  # and once synced, an idle flush costs nothing
        assert len(syncs) == 2


def test_a_flush_leaves_hashes_pending_and_a_crash_keeps_them(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush hashes nothing (a 4 KiB write would cost a whole block's hash at every flush); the flushed
    blocks keep their versions through a crash, hashed by replay, and a map comparison still hashes them."""
    hashed: list[int] = []
    monkeypatch.setattr(rs, "block_hash", lambda d: hashed.append(len(d)) or block_hash(d))
    s = make(tmp_path)
    for k in range(4):
        s.write(k * BS + 100, payload(k, 10))
    s.flush()
    s.upkeep()  # the daemon's periodic upkeep does not hash either
    assert hashed == [], "a flush hashed blocks nobody asked a hash of"
    versions = s.live_map().versions[:4].copy()
    tree_matches_map(s)  # a full refresh hashes what it needs
    assert len(hashed) == 4
    s.write(BS, b"x")
    s.flush()
    s.abandon()  # a crash with block 1's hash pending
    with ReplicaStore.open(tmp_path / "d") as s:
        v = s.live_map().versions
        assert v[0] == versions[0] and v[2:4].tolist() == versions[2:4].tolist()
        assert v[1] > versions[1] and v[1] < rs.UNCLEAN_COUNTER_GAP, "a flushed write got a fresh version"
        assert s.read(BS, 1) == b"x"
        assert_consistent(s)


def test_a_clean_close_with_pending_hashes_reopens_clean(tmp_path: Path) -> None:
    """Closing hashes the pending blocks into meta.bin, not into the new journal: a journal left with
    records makes the next open take the close for a crash (and jump the version counter)."""
    s = make(tmp_path)
    s.write(0, payload(1, 10))
    counter = s.counter
    s.close()
    with ReplicaStore.open(tmp_path / "d") as s:
        assert s.counter == counter, "a clean close was reopened as a crash"
        assert_consistent(s)


def test_a_flush_hashes_what_exceeds_the_pending_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay re-hashes pending blocks, so a flush keeps them within HASH_PENDING_BYTES: over it, it hashes
    them down to half the bound."""
    monkeypatch.setattr(rs, "HASH_PENDING_BYTES", 4 * BS)
    hashed: list[int] = []
    monkeypatch.setattr(rs, "block_hash", lambda d: hashed.append(len(d)) or block_hash(d))
    with make(tmp_path) as s:
        for k in range(4):
            s.write(k * BS, payload(k, 10))
        s.flush()
        assert hashed == []  # at the bound: nothing to hash
        for k in range(4, 10):
            s.write(k * BS, payload(k, 10))
        s.flush()
        assert len(hashed) == 8  # 10 pending, down to 2
        s.flush()
        assert len(hashed) == 8
        assert_consistent(s)


# ---- replication ----------------------------------------------------------------------------------
def test_put_block_rules(tmp_path: Path) -> None:
    with make(tmp_path) as s:
        data = payload(3, BS)
        with pytest.raises(HashMismatch):
            s.put_block(1, 5, data, block_hash(b"other"))
        with pytest.raises(ValueError, match="bytes"):
            s.put_block(1, 5, data[:-1], block_hash(data[:-1]))
        with pytest.raises(OutOfRange):
            s.put_block(16, 5, data, block_hash(data))
        assert s.put_block(1, 5, data, block_hash(data)) is True
        assert s.counter == 5 and s.read(BS, BS) == data
        assert s.put_block(1, 5, data, block_hash(data)) is False
        with pytest.raises(StaleVersion):
            s.put_block(1, 4, data, block_hash(data))
        assert s.put_block(1, 9, None, zero_hash(BS)) is True
        assert s.read(BS, BS) == bytes(BS) and s.read_block(1) == BlockRecord(1, 9, zero_hash(BS), None)
        with pytest.raises(HashMismatch):
            s.put_block(2, 3, None, block_hash(data))
        assert s.put_block(2, 0, None, NO_HASH) is False  # both never written
        tail = payload(4, 1536)
        assert s.put_block(15, 7, tail, block_hash(tail)) is True
        assert s.write(0, b"a").version == 10  # the counter never reuses a replicated version
        assert_consistent(s)
    with ReplicaStore.open(tmp_path / "d") as s:
        assert s.version_map().versions.tolist()[:3] == [10, 9, 0]


def test_put_block_verified_skips_the_second_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, zeros = payload(5, BS), bytes(BS)
    digest = block_hash(data)

    def no_hashing(_: bytes) -> bytes:
        raise AssertionError("hashed again")

    with make(tmp_path) as s:
        monkeypatch.setattr(rs, "block_hash", no_hashing)
        assert s.put_block(3, 6, data, digest, verified=True) is True
        # Zero data is stored as a hole and still checked against the zero hash, verified or not.
        with pytest.raises(HashMismatch):
            s.put_block(4, 6, zeros, digest, verified=True)
        assert s.put_block(4, 6, zeros, zero_hash(BS), verified=True) is True
        monkeypatch.undo()
        assert s.read(3 * BS, BS) == data and s.read_block(3).hash == digest
        assert s.verify() == []


def test_coverage_and_replication_between_stores(tmp_path: Path) -> None:
    with make(tmp_path, name="a") as a, make(tmp_path, name="b") as b:
        a.write(0, payload(5, 3 * BS))
        a.trim(5 * BS, 2 * BS)
        a.write(SIZE - 10, b"z" * 10)
        owner = a.version_map()
        cov = b.version_map().coverage(owner)
        assert (cov.current_blocks, cov.total_blocks) == (10, 16) and cov.fraction == 10 / 16
        stale = b.version_map().stale_against(owner)
        assert stale.tolist() == [0, 1, 2, 5, 6, 15]
        for i in stale.tolist():
            r = a.read_block(i)
            assert b.put_block(r.index, r.version, r.data, r.hash)
        assert b.version_map().coverage(owner).fraction == 1.0 and b.read(0, SIZE) == a.read(0, SIZE)
        a.write(BS, b"new")
        assert b.version_map().stale_against(a.version_map()).tolist() == [1]


def test_version_map_bytes() -> None:
    vm = VersionMap.empty(SIZE, BS)
    vm.versions[3] = 2**63 + 5
    vm.hashes[3] = np.frombuffer(block_hash(b"x"), np.uint8)
    back = VersionMap.from_bytes(vm.to_bytes())
    assert back.coverage(vm).fraction == 1.0 and back.versions[3] == 2**63 + 5
    raw = vm.to_bytes()
    for bad in (raw[:-1], raw + b"\0", b"XXXX" + raw[4:], raw[:10], b""):
        with pytest.raises(ValueError):
            VersionMap.from_bytes(bad)
    with pytest.raises(ValueError):
        vm.coverage(VersionMap.empty(SIZE + 512, BS))
    big = VersionMap.empty(1 << 40)  # 16 Mi blocks
    other = VersionMap.from_bytes(big.to_bytes())
    assert not other.versions.flags.writeable  # a view of the immutable bytes, not a 384 MiB copy
    assert big.coverage(other).fraction == 1.0 and not big.stale_against(other).size


# ---- persistence and crashes ----------------------------------------------------------------------
def test_owner_and_counter_persist(tmp_path: Path) -> None:
    s = make(tmp_path, owner="office-pc", epoch=3)
    s.write(0, b"x")
    s.set_owner("laptop", 4)
    with pytest.raises(ValueError):
        s.set_owner("bad name", 5)
    counter = s.counter
    s.abandon()  # a crash: set_owner must already be durable, the counter must jump
    with ReplicaStore.open(tmp_path / "d") as s:
        assert (s.owner, s.epoch) == ("laptop", 4)
        assert s.counter >= counter + rs.UNCLEAN_COUNTER_GAP
        assert s.write(0, b"y").version > counter + rs.UNCLEAN_COUNTER_GAP


def test_hand_overs_persist_with_the_owner_bounded(tmp_path: Path) -> None:
    """The hosts a disk came from are written with the commit's owner and epoch, newest last, a bounded list."""
    s = make(tmp_path, owner="office-pc", epoch=1)
    assert s.handed_from == ()
    s.set_owner("car-pc", 2, handed_from="office-pc")
    s.set_owner("home-pc", 3)  # handed on: the record of where it came from stays
    with pytest.raises(ValueError):
        s.set_owner("car-pc", 4, handed_from="bad name")
    s.abandon()  # a crash right after the commit: already durable
    with ReplicaStore.open(tmp_path / "d") as s:
        assert (s.owner, s.epoch, s.handed_from) == ("home-pc", 3, ("office-pc",))
        for k in range(rs.MAX_HANDED_FROM + 2):
            s.set_owner("car-pc", 4 + k, handed_from=f"h{k}")
        s.set_owner("car-pc", 99, handed_from="h5")  # again: moves to the end, once
        assert len(s.handed_from) == rs.MAX_HANDED_FROM and s.handed_from[-1] == "h5"
        assert s.handed_from.count("h5") == 1 and "office-pc" not in s.handed_from
        kept = s.handed_from
    with ReplicaStore.open(tmp_path / "d") as s:
        assert s.handed_from == kept


def test_dropping_an_open_store_is_a_crash(tmp_path: Path) -> None:
    s = make(tmp_path)
    s.write(0, b"abc")
    del s
    gc.collect()
    with ReplicaStore.open(tmp_path / "d") as s:
        assert s.read(0, 3) == b"abc"
        assert_consistent(s)


def test_checkpoint_bounds_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rs, "JOURNAL_CHECKPOINT_BYTES", 10 * REC_SIZE)
    with make(tmp_path) as s:
        for k in range(20):
            s.write(k * 100, payload(k, 100))
        s.flush()
        assert (tmp_path / "d" / rs.JOURNAL_FILE).stat().st_size == 0
        s.write(0, b"q", fua=True)
        assert (tmp_path / "d" / rs.JOURNAL_FILE).stat().st_size > 0
        s.abandon()
    with ReplicaStore.open(tmp_path / "d") as s:
        assert s.read(0, 1) == b"q"
        assert_consistent(s)


OPS_PER_CHILD = 400


def gen_ops(seed: int) -> list[tuple[str, int, int, int]]:
    """The crash child's deterministic request sequence: (kind, offset, length, payload seed)."""
    rng = random.Random(seed)
    ops = []
    for k in range(OPS_PER_CHILD):
        off = rng.randrange(SIZE)
        length = rng.randint(1, min(3 * BS, SIZE - off))
        ops.append((rng.choice(["write"] * 6 + ["fua", "zeroes", "trim"]), off, length, seed * 100_003 + k))
    return ops


def apply_op(model: np.ndarray, op: tuple[str, int, int, int]) -> None:
    kind, off, length, pseed = op
    model[off:off + length] = np.frombuffer(payload(pseed, length), np.uint8) if kind in ("write", "fua") else 0


def _child_main() -> None:  # run in the crash child: python -c "from tests.test_replica_store import _child_main"
    directory, seed = Path(sys.argv[1]), int(sys.argv[2])
    s = ReplicaStore.open(directory)
    batched = seed % 2 == 1  # odd seeds send runs of plain writes through write_many, as the NBD server does
    held: list[tuple[int, bytes]] = []

    def release() -> None:
        assert all(isinstance(r, rs.WriteResult) for r in s.write_many(held))
        held.clear()

    for k, (kind, off, length, pseed) in enumerate(gen_ops(seed)):
        if batched and kind == "write":
            held.append((off, payload(pseed, length)))
        else:
            release()
            if kind == "fua":
                s.write(off, payload(pseed, length), fua=True)
            elif kind == "write":
                s.write(off, payload(pseed, length))
            else:
                getattr(s, "write_zeroes" if kind == "zeroes" else "trim")(off, length)
        if kind == "fua" or k % 7 == 6:
            release()
            if kind != "fua":
                s.flush()
            print("acked", k + 1, flush=True)
    print("done", flush=True)
    time.sleep(60)


def matches_some_later_state(data: np.ndarray, ops: list, acked: int) -> bool:
    """data equals the model after some j >= acked requests, the (j+1)-th possibly half applied."""
    model = np.zeros(SIZE, np.uint8)
    for op in ops[:acked]:
        apply_op(model, op)
    for j in range(acked, len(ops) + 1):
        diff = np.flatnonzero(data != model)
        if not diff.size:
            return True
        if j == len(ops):
            return False
        nxt = model.copy()
        apply_op(nxt, ops[j])
        _, off, length, _ = ops[j]
        if diff.min() >= off and diff.max() < off + length and (data[diff] == nxt[diff]).all():
            return True
        model = nxt
    return False


@pytest.mark.parametrize("seed", range(8))
def test_kill_9_keeps_flushed_writes(tmp_path: Path, seed: int) -> None:
    make(tmp_path).close()
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tests.test_replica_store import _child_main; _child_main()",
         str(tmp_path / "d"), str(seed)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked, want = 0, rng.randint(1, OPS_PER_CHILD - 20)
    for line in proc.stdout:
        if line.startswith("acked"):
            acked = int(line.split()[1])
        if acked >= want or line.startswith("done"):
            break
    time.sleep(rng.random() * 0.004)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for line in proc.stdout.read().splitlines():  # acks the child printed before it died count too
        parts = line.split()
        if len(parts) == 2 and parts[0] == "acked" and parts[1].isdigit():  # not a line cut by the kill
            acked = int(parts[1])
    assert acked > 0
    with ReplicaStore.open(tmp_path / "d") as s:
        data = np.frombuffer(s.read(0, SIZE), np.uint8)
        assert matches_some_later_state(data, gen_ops(seed), acked)
        assert_consistent(s)
        assert s.counter > rs.UNCLEAN_COUNTER_GAP


def test_torn_journal_prefixes(tmp_path: Path) -> None:
    """Every kill -9 state: journal cut at any byte, data as written after the last whole record or before it."""
    s = make(tmp_path)
    base = tmp_path / "base"
    shutil.copytree(tmp_path / "d", base)  # meta.bin/state.json as of open; the journal grows from here
    journal_path = tmp_path / "d" / rs.JOURNAL_FILE
    snaps = [(0, bytes(SIZE))]  # (journal length, data) after each request
    rng = random.Random(7)
    for k in range(80):
        off = rng.randrange(SIZE)
        length = rng.randint(1, min(3 * BS, SIZE - off))
        r = rng.random()
        if k == 0:
            s.write(0, payload(0, SIZE))
        elif r < 0.5:
            s.write(off, payload(k, length))
        elif r < 0.7:
            s.write_zeroes(off, length)
        elif r < 0.8:
            s.write(off, bytes(length))
        elif r < 0.9:
            s.flush()
        else:
            s.read_block(rng.randrange(16))  # settles a block: a SETTLE record
        snaps.append((records_end(journal_path.read_bytes(), 1 << 40), s.read(0, SIZE)))
    journal = journal_path.read_bytes()
    journal = journal[:records_end(journal, 1 << 40)]  # without the zeros written ahead of the records
    s.abandon()
    cuts = sorted({rng.randrange(len(journal) + 1) for _ in range(60)} | {jlen for jlen, _ in snaps})
    for t in cuts:
        k = max(i for i, (jlen, _) in enumerate(snaps) if jlen <= t)
        datas = [snaps[k][1]]
        if t == snaps[k][0] and k and snaps[k - 1][0] < t:  # request k's records whole, its data not yet written
            datas.append(snaps[k - 1][1])
        for data in datas:
            d = tmp_path / "cut"
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(base, d)
            (d / rs.DATA_FILE).write_bytes(data)
            (d / rs.JOURNAL_FILE).write_bytes(journal[:t])
            with ReplicaStore.open(d) as c:
                assert_consistent(c)
                if data is datas[0]:
                    assert c.read(0, SIZE) == data


def test_write_many_torn_anywhere_replays_consistently(tmp_path: Path) -> None:
    """A batch's records all precede its data: after a crash the journal holds any prefix of them and the
    data any prefix of the batch's data writes (at most what the records announce), and replay must make
    the metadata match the data, with the data untouched."""
    s = make(tmp_path)
    s.write(0, payload(1, SIZE))
    s.flush()
    s.close()
    s = ReplicaStore.open(tmp_path / "d")
    s.activate(0, SIZE)  # the area's ACTIVE record: the batch's records come after it
    journal_path = tmp_path / "d" / rs.JOURNAL_FILE
    before = records_end(journal_path.read_bytes(), 1 << 40)
    writes = [(BS + 100, payload(2, 3 * BS)), (2 * BS, payload(3, 10)), (0, payload(4, SIZE)), (5 * BS, b"")]
    data = bytearray(s.read(0, SIZE))
    states = [bytes(data)]  # the data after each write of the batch
    for off, buf in writes:
        data[off:off + len(buf)] = buf
        states.append(bytes(data))
    results = s.write_many(writes)
    assert [type(r) for r in results] == [rs.WriteResult] * 4 and results[3].version == 0
    assert [r.version for r in results[:3]] == sorted({r.version for r in results[:3]})  # in order, increasing
    assert s.read(0, SIZE) == states[-1]
    journal = journal_path.read_bytes()
    end = records_end(journal, 1 << 40)
    assert end - before == 3 * REC_SIZE  # one DIRTY record per write that wrote something
    s.abandon()
    for t in range(before, end + 1, REC_SIZE):
        landed = (t - before) // REC_SIZE  # writes whose records made it: their data may have landed
        for k in range(landed + 1):
            d = tmp_path / "cut"
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(tmp_path / "d", d)
            (d / rs.DATA_FILE).write_bytes(states[k])
            (d / rs.JOURNAL_FILE).write_bytes(journal[:t])
            with ReplicaStore.open(d) as c:
                assert c.read(0, SIZE) == states[k]
                assert_consistent(c)


def test_write_many_reports_each_writes_error_and_applies_the_rest(tmp_path: Path) -> None:
    with make(tmp_path) as s:
        results = s.write_many([(0, b"a"), (SIZE - 1, b"bc"), (SIZE - 1, b"z")])
        assert isinstance(results[0], rs.WriteResult) and isinstance(results[2], rs.WriteResult)
        assert isinstance(results[1], rs.OutOfRange)
        assert s.read(0, 1) == b"a" and s.read(SIZE - 1, 1) == b"z"
        assert_consistent(s)


class StoreMachine(RuleBasedStateMachine):
    """The store against a bytearray; crashes lose nothing because the page cache survives them."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="p2pvbd-store-"))
        self.store = ReplicaStore.create(self.tmp / "d", "d", SIZE, BS)
        self.model = bytearray(SIZE)
        self.versions = np.zeros(16, np.uint64)  # lower bounds learnt from WriteResults

    def _note(self, res: rs.WriteResult) -> None:
        if res.version:
            assert res.version > self.versions.max()
            self.versions[res.first_block:res.last_block + 1] = res.version

    @rule(data=st.data(), zeros=st.booleans())
    def write(self, data: st.DataObject, zeros: bool) -> None:
        off = data.draw(st.integers(0, SIZE - 1))
        length = data.draw(st.integers(0, min(3 * BS, SIZE - off)))
        buf = bytes(length) if zeros else payload(data.draw(st.integers(0, 1000)), length)
        self._note(self.store.write(off, buf, fua=data.draw(st.booleans())))
        self.model[off:off + length] = buf

    @rule(data=st.data())
    def write_many(self, data: st.DataObject) -> None:
        writes = []
        for _ in range(data.draw(st.integers(1, 5))):
            off = data.draw(st.integers(0, SIZE - 1))
            length = data.draw(st.integers(0, min(3 * BS, SIZE - off)))
            writes.append((off, payload(data.draw(st.integers(0, 1000)), length)))
        for (off, buf), res in zip(writes, self.store.write_many(writes), strict=True):
            assert isinstance(res, rs.WriteResult)
            self._note(res)
            self.model[off:off + len(buf)] = buf

    @rule(data=st.data(), trim=st.booleans())
    def zero(self, data: st.DataObject, trim: bool) -> None:
        off = data.draw(st.integers(0, SIZE - 1))
        length = data.draw(st.integers(1, SIZE - off))
        self._note((self.store.trim if trim else self.store.write_zeroes)(off, length))
        self.model[off:off + length] = bytes(length)

    @rule()
    def flush(self) -> None:
        self.store.flush()

    @rule(index=st.integers(0, 15))
    def serve_block(self, index: int) -> None:
        rec = self.store.read_block(index)
        want = bytes(self.model[index * BS:(index + 1) * BS])
        assert (bytes(len(want)) if rec.data is None else rec.data) == want
        assert rec.hash == (NO_HASH if rec.version == 0 else block_hash(want))

    @rule(how=st.sampled_from(["close", "abandon", "drop"]))
    def reopen(self, how: str) -> None:
        counter = self.store.counter
        if how == "close":
            self.store.close()
        elif how == "abandon":
            self.store.abandon()
        else:
            del self.store
            gc.collect()
        self.store = ReplicaStore.open(self.tmp / "d")
        vm = self.store.version_map()
        assert (vm.versions >= self.versions).all()
        self.versions = vm.versions.copy()
        assert self.store.counter >= counter + (0 if how == "close" else rs.UNCLEAN_COUNTER_GAP)
        for i in range(16):
            data = bytes(self.model[i * BS:(i + 1) * BS])
            assert (vm.versions[i] == 0 and not any(data)) or vm.hashes[i].tobytes() == block_hash(data)

    @rule(since=st.integers(0, 40))
    def summaries_match_the_map(self, since: int) -> None:
        vm = self.store.version_map()  # settles every block
        self.store.refresh_tree()
        built = MapTree.build(records_of(vm.versions, vm.hashes), BS, SIZE)
        assert self.store.map_summary()["root"] == built.root()
        for level in range(built.top + 1):
            parents = np.arange(1 if level == built.top else built.sizes[level + 1])
            assert (self.store.map_nodes(level, parents) == built.nodes(level, parents)).all()
        fed, start = [], 0
        while True:
            _, blocks, records, start = self.store.changes_since(since, start, max_blocks=64)
            assert (records["version"] > since).all()
            fed += blocks.tolist()
            if start is None:
                break
        assert fed == np.flatnonzero(vm.versions > since).tolist()
        assert self.store.changed_blocks(since)[0].tolist() == fed
        assert self.store.held_blocks == int(np.count_nonzero(vm.versions))

    @invariant()
    def reads_match_model(self) -> None:
        assert self.store.read(0, SIZE) == self.model

    @rule()
    def verify(self) -> None:
        assert self.store.verify() == []

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_store_state_machine = StoreMachine.TestCase


# ---- the map tree of a store ----------------------------------------------------------------------
def tree_matches_map(store: ReplicaStore) -> None:
    vm = store.version_map()
    store.refresh_tree()
    built = MapTree.build(records_of(vm.versions, vm.hashes), vm.block_size, vm.size)
    assert store.map_summary()["root"] == built.root()
    assert store.held_blocks == int(np.count_nonzero(vm.versions))


def test_store_tree_follows_writes_puts_trims_and_crashes(tmp_path: Path) -> None:
    size = (64 * 64 * 2 + 300) * BS  # three levels of leaves and nodes, a partial last leaf
    rng = random.Random(5)
    s = make(tmp_path, size=size)
    with make(tmp_path, size=size, name="peer") as peer:
        for k in range(300):
            off = rng.randrange(size - 3 * BS)
            r = rng.random()
            if r < 0.5:
                s.write(off, payload(k, rng.randint(1, 3 * BS)))
            elif r < 0.6:
                s.trim(off, rng.randint(1, 40 * BS))
            elif r < 0.8:
                peer.write(off, payload(k, BS))
                rec = peer.read_block(off // BS)
                if rec.version > int(s.version_map().versions[off // BS]):
                    s.put_block(rec.index, rec.version, rec.data, rec.hash)
            elif r < 0.9:
                s.read_block(rng.randrange(size // BS))
            else:
                s.flush()
            if k % 60 == 59:
                tree_matches_map(s)
    tree_matches_map(s)
    root = s.map_summary()["root"]
    s.abandon()  # a crash: the journal is replayed and the tree rebuilt from the metadata
    with ReplicaStore.open(tmp_path / "d") as s:
        tree_matches_map(s)
        assert s.map_summary()["root"] == root


def test_refresh_and_checkpoint_run_while_a_writer_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither blocks the writer; nothing either writes is lost; the tree ends equal to the map."""
    monkeypatch.setattr(rs, "JOURNAL_CHECKPOINT_BYTES", 64 * REC_SIZE)  # checkpoint on most flushes
    size = 64 * 64 * 4 * BS
    s = make(tmp_path, size=size)
    model = bytearray(size)
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(9)
        k = 0
        while not stop.is_set():
            off = rng.randrange(size // BS) * BS
            data = payload(k, BS)
            s.write(off, data)
            model[off:off + BS] = data
            k += 1
            time.sleep(0.0002)  # a guest's pace, not a loop that holds the GIL for good

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(10):
            s.refresh_tree()
            s.flush()
    finally:
        stop.set()
        t.join()
    assert s.read(0, size) == model
    tree_matches_map(s)
    assert not list(tmp_path.joinpath("d").glob("journal.*.log"))  # rotated journals are gone
    s.abandon()
    with ReplicaStore.open(tmp_path / "d") as s:
        assert s.read(0, size) == model
        assert_consistent(s)


@pytest.mark.parametrize("writes", [1, 2])
def test_a_torn_state_slot_leaves_the_previous_state(tmp_path: Path, writes: int) -> None:
    s = make(tmp_path, owner="office-pc", epoch=1)
    for epoch, owner in list(enumerate(["car-pc", "home-pc"], start=2))[:writes]:
        s.set_owner(owner, epoch)
    s.abandon()
    before = [("office-pc", 1), ("car-pc", 2)][writes - 1]
    path = tmp_path / "d" / store_files.STATE_FILE
    raw = bytearray(path.read_bytes())
    _, seq = store_files.read_state(tmp_path / "d")
    at = (seq % 2) * store_files.STATE_SLOT_BYTES + 40  # inside the newest slot's JSON
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    state, older = store_files.read_state(tmp_path / "d")
    assert (state["owner"], state["epoch"], older) == (*before, seq - 1)
    raw[((seq - 1) % 2) * store_files.STATE_SLOT_BYTES + 40] ^= 0xFF  # both slots torn: refused, not guessed
    path.write_bytes(bytes(raw))
    with pytest.raises(store_files.StoreCorrupt):
        ReplicaStore.open(tmp_path / "d")


def test_a_first_format_state_json_is_read_and_moved(tmp_path: Path) -> None:
    with make(tmp_path, owner="office-pc", epoch=4) as s:
        s.write(0, b"abc")
    d = tmp_path / "d"
    state, _ = store_files.read_state(d)
    (d / store_files.STATE_FILE).unlink()
    (d / store_files.LEGACY_STATE_FILE).write_text(json.dumps(state))
    with ReplicaStore.open(d) as s:
        assert (s.owner, s.epoch) == ("office-pc", 4) and s.read(0, 3) == b"abc"
    assert not (d / store_files.LEGACY_STATE_FILE).exists() and (d / store_files.STATE_FILE).exists()


@pytest.mark.parametrize("query", ["map_entries", "changes_since"])
def test_a_block_rewritten_while_its_record_is_read_is_never_paired_with_the_old_hash(tmp_path: Path,
                                                                                      query: str) -> None:
    """Records are hashed outside the lock first; a guest write landing in between must not yield the new
    version with the old content's hash: no peer could deliver that pair, and the block would be lost to a
    pull (every holder's copy looks wrong)."""
    s = make(tmp_path)
    s.write(0, b"a" * BS)  # dirty: its hash is due
    settle = s._settle_blocks

    def racing(blocks: np.ndarray) -> None:
        settle(blocks)
        s.write(0, b"b" * BS)  # the guest, between the hashing and the read of the records

    s._settle_blocks = racing  # type: ignore[method-assign]
    if query == "map_entries":
        records = s.map_entries(np.array([0]))
    else:
        _, blocks, records, _ = s.changes_since(0)
        assert blocks.tolist()[0] == 0
    s._settle_blocks = settle  # type: ignore[method-assign]
    version, digest = int(records["version"][0]), records["hash"][0].tobytes()
    assert version == s.counter == 2
    assert digest == block_hash(b"b" * BS) == s.read_block(0).hash
    s.close()
