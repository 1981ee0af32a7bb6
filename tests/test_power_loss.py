"""Durability against power loss, not only kill -9: the store, the NBD export, sync and migration with their
files on lazyfs (tests/lazyfs.py), which forgets every write not yet fsynced when the power is cut.

Each test first shows the instrument works (unsynced data is really gone), so a missing fsync in p2pvbd
makes these tests fail where the kill -9 tests, which the page cache rescues, would pass.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from p2pvbd.migration import failpoints
from p2pvbd.replica_store import ReplicaStore
from tests import test_replica_store as store_tests
from tests.daemons import BIN, run
from tests.helpers import coverage, sync, visible, wait_until
from tests.power import LazyMount, PowerHost, require_lazyfs
from tests.test_migrate_faults import GUEST_HEAD, POLL_SECONDS, LoggingGuest, pattern, settled, source_phase
from tests.test_nbd_clients import qemu_io, verify_ok

pytestmark = pytest.mark.usefixtures("lazyfs_available")

MiB = 1 << 20
BLOCK = 64 * 1024
GUEST_BLOCKS = 128  # an 8 MiB disk: a migration's phases last long enough to strike in
PHASES = ("bulk", "mirror", "switchover")
# Each phase of a migration pauses this long at its start (failpoints): several polls of `jobs` fit in it.
PHASE_HOLD_SECONDS = 1.0
SETTLE_SECONDS = 180.0  # a bound on a broken run (see test_migrate_faults), not a speed expectation
MIGRATE_SECONDS = 300.0


@pytest.fixture(scope="module")
def lazyfs_available() -> None:
    require_lazyfs()


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[LazyMount]:
    m = LazyMount(tmp_path / "backing", tmp_path / "mnt")
    yield m
    m.close()


# --- the instrument ------------------------------------------------------------------------------------


def test_a_power_cut_loses_exactly_what_was_not_synced(lazy: LazyMount) -> None:
    synced, unsynced, renamed = lazy.mountpoint / "synced", lazy.mountpoint / "unsynced", lazy.mountpoint / "renamed"
    fd = os.open(synced, os.O_CREAT | os.O_RDWR)
    os.pwrite(fd, b"a" * 10_000, 0)
    os.fsync(fd)
    os.pwrite(fd, b"b" * 5_000, 8_000)  # straddles the end: the file grows, in memory only
    assert os.pread(fd, 20_000, 0) == b"a" * 8_000 + b"b" * 5_000  # reads see unsynced data
    os.close(fd)
    unsynced.write_bytes(b"never synced")
    tmp = lazy.mountpoint / "renamed.tmp"
    tmp.write_bytes(b"renamed before its data was synced")
    tmp.rename(renamed)

    lazy.cut()
    assert synced.read_bytes() == b"a" * 10_000
    assert unsynced.read_bytes() == b""  # the name is metadata: it stays; the data was never synced
    assert renamed.read_bytes() == b""


# --- the store ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_power_cut_keeps_the_stores_flushed_writes(lazy: LazyMount, seed: int) -> None:
    """The store crash test of test_replica_store (writes, zeroes, trims, FUA and flushes from a child
    process), with a power cut instead of kill -9: every request acknowledged by a flush or FUA is there."""
    directory = lazy.mountpoint / "d"
    store_tests.make(lazy.mountpoint).close()
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(store_tests.ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tests.test_replica_store import _child_main; _child_main()",
         str(directory), str(seed)], cwd=store_tests.ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked, want = 0, rng.randint(20, store_tests.OPS_PER_CHILD - 20)
    for line in proc.stdout:
        if line.startswith("acked"):
            acked = int(line.split()[1])
        if acked >= want or line.startswith("done"):
            break
    lazy.cut([proc])
    for line in proc.stdout.read().splitlines():  # acks printed before the cut count too
        parts = line.split()
        if len(parts) == 2 and parts[0] == "acked" and parts[1].isdigit():
            acked = int(parts[1])
    assert acked >= want
    with ReplicaStore.open(directory) as s:
        data = np.frombuffer(s.read(0, store_tests.SIZE), np.uint8)
        assert store_tests.matches_some_later_state(data, store_tests.gen_ops(seed), acked)
        store_tests.assert_consistent(s)


def test_power_cut_after_a_checkpoint_keeps_every_block(lazy: LazyMount) -> None:
    """A checkpoint rotates the journal and rewrites the metadata: cut right after it, nothing flushed is lost
    and the store opens consistent (the new journal and meta.bin must be synced before the old ones go)."""
    s = ReplicaStore.create(lazy.mountpoint / "d", "d", 4 * MiB, BLOCK, owner="office-pc", epoch=1)
    blocks = {b: bytes([b + 1]) * BLOCK for b in range(0, 64, 3)}
    for b, data in blocks.items():
        s.write(b * BLOCK, data)
    s.flush()
    s.maintain()  # the periodic checkpoint
    s.write(BLOCK, b"\x77" * BLOCK, fua=True)
    lazy.cut()
    s.abandon()
    with ReplicaStore.open(lazy.mountpoint / "d") as s2:
        for b, data in blocks.items():
            assert s2.read(b * BLOCK, BLOCK) == data, b
        assert s2.read(BLOCK, BLOCK) == b"\x77" * BLOCK
        assert s2.verify() == []


def test_power_cut_after_a_checkpoint_that_raced_a_write(lazy: LazyMount) -> None:
    """A write landing while a checkpoint runs puts its intent record in the new journal and its data in the
    data file, which the checkpoint's data sync makes durable: the record must be durable as well, or after
    a power cut the data matches no record (verify finds a mismatch)."""
    s = ReplicaStore.create(lazy.mountpoint / "d", "d", 4 * MiB, BLOCK, owner="office-pc", epoch=1)
    s.write(0, b"\x11" * BLOCK)
    s.write(5 * BLOCK, b"\x22" * BLOCK)
    s.flush()
    settle = s._settle_blocks

    def racing(blocks: np.ndarray) -> None:
        s.write(5 * BLOCK, b"\x33" * BLOCK)  # the guest, after the journal was rotated
        settle(blocks)

    s._settle_blocks = racing  # type: ignore[method-assign]
    s.maintain()
    s._settle_blocks = settle  # type: ignore[method-assign]
    lazy.cut()
    s.abandon()
    with ReplicaStore.open(lazy.mountpoint / "d") as s2:
        assert s2.read(0, BLOCK) == b"\x11" * BLOCK
        assert s2.read(5 * BLOCK, BLOCK) in (b"\x22" * BLOCK, b"\x33" * BLOCK)
        assert s2.verify() == []


# --- the daemon -----------------------------------------------------------------------------------------


@pytest.fixture
def power_hosts(tmp_path: Path) -> Iterator[list[PowerHost]]:
    """office-pc, home-pc and car-pc with their homes on lazyfs; a migration's every phase lasts long enough
    to strike in (failpoints)."""
    hosts: list[PowerHost] = []
    env = {failpoints.ENV: ",".join(f"migrate.{phase}={PHASE_HOLD_SECONDS}" for phase in PHASES)}
    try:
        office = PowerHost(tmp_path, "office-pc", env=env)
        hosts.append(office)
        office.start()
        for name in ("home-pc", "car-pc"):
            h = PowerHost(tmp_path, name, join=office.cli("invite").stdout.strip(), env=env)
            hosts.append(h)
            h.start()
        yield hosts
    finally:
        for h in hosts:
            h.close()


def test_power_cut_keeps_flushed_and_fua_nbd_writes(power_hosts: list[PowerHost]) -> None:
    office = power_hosts[0]
    office.cli("disk", "create", "vm1", "--size", "64M", "--block-size", "64K")
    uri = office.uri("vm1")
    qemu_io(uri, "write -P 0x5a 0 4M", "write -z 1M 64k", "flush")
    # qemu-io's -f is Force Unit Access: durable when acknowledged, with no flush.
    qemu_io(uri, "write -f -P 0xa5 8M 1M", "write -f -P 0x96 12M+4097 100k", "write -f -z 8M+128k 128k")
    office.power_cut()
    qemu_io(uri, "read -P 0x5a 0 1M", "read -P 0x00 1M 64k", "read -P 0x5a 1M+64k 3M-64k",
            "read -P 0xa5 8M 128k", "read -P 0x00 8M+128k 128k", "read -P 0xa5 8M+256k 768k",
            "read -P 0x96 12M+4097 100k")
    verify_ok(office, "vm1")


# A guest that logs each write before it issues it ("W block seq"), once acknowledged ("A block seq fua"),
# and each acknowledged flush ("S seq": every write acknowledged before it is durable).
DURABLE_GUEST = GUEST_HEAD + r'''
log.write("READY\n")
seq = 0
try:
    while not os.path.exists(stop):
        block = rng.randrange(blocks)
        seq += 1
        fua = seq % 5 == 0
        head = struct.pack(">QQ", block, seq)
        log.write(f"W {block} {seq}\n")
        h.pwrite((head * (BS // len(head) + 1))[:BS], block * BS, nbd.CMD_FLAG_FUA if fua else 0)
        log.write(f"A {block} {seq} {int(fua)}\n")
        if seq % 8 == 0:
            h.flush()
            log.write(f"S {seq}\n")
        time.sleep(0.003)
except nbd.Error as e:
    log.write(f"E {seq} {e}\n")
    sys.exit(0)
log.write("STOPPED\n")
'''


class DurableGuest(LoggingGuest):
    """A libnbd guest whose log tells which of its writes the export promised to keep."""

    def __init__(self, uri: str, tmp: Path, seed: int) -> None:
        super().__init__(uri, tmp, seed, script=DURABLE_GUEST, blocks=GUEST_BLOCKS)

    def allowed(self, base: bytes) -> dict[int, list[bytes]]:
        """Per block, what may be there after a power cut: its last durable write or any write after it
        (acknowledged or not); with no durable write, also what was there before."""
        issued: dict[int, list[int]] = {}
        durable: dict[int, int] = {}
        acked: list[tuple[int, int]] = []
        for ln in self.lines():
            kind, *rest = ln.split(" ")
            if kind == "W" and len(rest) == 2:
                issued.setdefault(int(rest[0]), []).append(int(rest[1]))
            elif kind == "A" and len(rest) == 3:
                acked.append((int(rest[0]), int(rest[1])))
                if rest[2] == "1":
                    durable[int(rest[0])] = int(rest[1])
            elif kind == "S" and len(rest) == 1:
                upto = int(rest[0])
                for b, s in acked:
                    if s <= upto:
                        durable[b] = max(durable.get(b, 0), s)
        out = {}
        for b in range(GUEST_BLOCKS):
            floor = durable.get(b, 0)
            ok = [pattern(b, s) for s in issued.get(b, []) if s >= floor]
            if floor == 0:
                ok.append(base[b * BLOCK:(b + 1) * BLOCK])
            out[b] = ok
        return out

    def durable_blocks(self) -> int:
        return sum(1 for ln in self.lines() if ln.startswith("S ") or ln.endswith(" 1"))


def lost_writes(owner: PowerHost, disk: str, guest: DurableGuest, base: bytes, image: Path) -> list[int]:
    """The blocks at ``owner`` that hold neither a durable write nor anything written after one."""
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", owner.uri(disk), str(image))
    data = image.read_bytes()
    allowed = guest.allowed(base)
    return [b for b in range(GUEST_BLOCKS) if data[b * BLOCK:(b + 1) * BLOCK] not in allowed[b]]


def import_disk(host: PowerHost, disk: str, tmp_path: Path, seed: int) -> bytes:
    base = random.Random(seed).randbytes(GUEST_BLOCKS * BLOCK)
    (tmp_path / "base.raw").write_bytes(base)
    host.cli("disk", "import", disk, str(tmp_path / "base.raw"))
    return base


def test_power_cut_under_a_guest_keeps_every_durable_write(power_hosts: list[PowerHost], tmp_path: Path) -> None:
    office = power_hosts[0]
    base = import_disk(office, "vm1", tmp_path, seed=1)
    guest = DurableGuest(office.uri("vm1"), tmp_path, seed=1)
    wait_until(lambda: guest.durable_blocks() >= 40 or guest.proc.poll() is not None, "the guest to write")
    office.power_cut()
    assert guest.finish(), "the guest hung in a write"
    assert any(ln.startswith("E ") for ln in guest.lines()), "the guest's connection outlived the power cut"
    assert lost_writes(office, "vm1", guest, base, tmp_path / "after.raw") == []
    verify_ok(office, "vm1")


def test_sync_returns_only_what_is_durable(power_hosts: list[PowerHost], tmp_path: Path) -> None:
    """A replica's `sync` answers once what it fetched is durable: cut the power right after it."""
    office, home, _ = power_hosts
    import_disk(office, "vm1", tmp_path, seed=2)
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    report = sync(home, "vm1")
    assert report["error"] == "" and report["blocks_fetched"] == GUEST_BLOCKS, report
    home.power_cut()
    assert coverage(home, "vm1")["home-pc"] == 1.0
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "base.raw"), home.uri("vm1"))
    verify_ok(home, "vm1")


# --- migration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["office-pc", "car-pc"])
@pytest.mark.parametrize("moment", [*PHASES, "committed"])
def test_power_cut_during_a_migration_keeps_one_owner_and_every_durable_write(
        power_hosts: list[PowerHost], tmp_path: Path, victim: str, moment: str) -> None:
    office, home, car = power_hosts
    hosts = {h.name: h for h in power_hosts}
    disk = "vm1"
    base = import_disk(office, disk, tmp_path, seed=3)
    wait_until(lambda: visible(home, disk), "home-pc to see the disk")
    sync(home, disk)
    wait_until(lambda: visible(car, disk, holders=2), "car-pc to see both holders")
    guest = DurableGuest(office.uri(disk), tmp_path, seed=3)
    wait_until(lambda: guest.durable_blocks() >= 5 or guest.proc.poll() is not None, "the guest to write")
    migrate = subprocess.Popen([BIN, "migrate", disk, "--to", "car-pc", "--json", "--home", str(office.home)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: str | None = None
    if moment == "committed":
        migrate.wait(timeout=MIGRATE_SECONDS)
        assert migrate.returncode == 0, migrate.communicate()
    else:
        seen = wait_until(lambda: (source_phase(office, disk) == moment and moment) or migrate.poll() is not None,
                          f"the migration to reach {moment}", poll=POLL_SECONDS)
    hosts[victim].power_cut()
    out, err = migrate.communicate(timeout=MIGRATE_SECONDS)
    what = f"power cut of {victim} at {moment} (seen {seen!r}); migrate exited {migrate.returncode}: {out!r} {err!r}"
    assert seen in (None, moment), what

    agreed = wait_until(lambda: settled(power_hosts, disk), f"the hosts to agree on the owner ({what})",
                        timeout=SETTLE_SECONDS)
    owner, epoch = agreed
    assert (owner, epoch) in (("office-pc", 1), ("car-pc", 2)), what
    if moment == "committed":
        assert (owner, epoch) == ("car-pc", 2), what
    assert guest.finish(), "the guest hung in a write"
    assert lost_writes(hosts[owner], disk, guest, base, tmp_path / "owner.raw") == [], what
    for h in power_hosts:
        verify_ok(h, disk)  # data that beat its record to the disk was re-checked
