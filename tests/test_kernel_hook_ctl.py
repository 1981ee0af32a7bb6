"""The hook controller's powers: write events, freeze/thaw, standby and incoming modes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pvbd import kernel_hook_ctl as khc
from p2pvbd.kernel_hook_ctl import ExportMode, HookController, HookError, WriteEvent
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.wire.nbd_codec import NBD_EPERM

KiB = 1024


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplicaStore]:
    s = ReplicaStore.create(tmp_path / "vm1", "vm1", 1 << 20, 64 * KiB, owner="office-pc", epoch=1)
    yield s
    s.close()


@pytest.fixture
def ctl(store: ReplicaStore) -> HookController:
    c = HookController()
    c.add_export(store, ExportMode.PRIMARY)
    return c


async def test_every_applied_write_is_published(ctl: HookController) -> None:
    with ctl.subscribe("vm1") as sub, ctl.subscribe("other") as unrelated:
        await ctl.write("vm1", 60 * KiB, b"x" * 8 * KiB)  # spans blocks 0 and 1
        await ctl.write_zeroes("vm1", 128 * KiB, 64 * KiB)
        await ctl.trim("vm1", 256 * KiB, 4 * KiB)
        events = [sub.receive.receive_nowait() for _ in range(3)]
        with pytest.raises(trio.WouldBlock):
            unrelated.receive.receive_nowait()
    assert [(e.first_block, e.last_block) for e in events] == [(0, 1), (2, 2), (4, 4)]
    assert all(isinstance(e, WriteEvent) and e.disk == "vm1" for e in events)
    assert events[0].version < events[1].version < events[2].version
    assert ctl.get("vm1").store.read(60 * KiB, 8 * KiB) == b"x" * 8 * KiB  # type: ignore[union-attr]


async def test_a_slow_subscriber_is_told_it_missed_events(ctl: HookController, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(khc, "SUBSCRIBER_BUFFER", 2)
    with ctl.subscribe() as sub:
        for i in range(3):
            await ctl.write("vm1", i * 64 * KiB, b"y")
        assert sub.overflowed


async def test_freeze_holds_new_requests_until_thaw(ctl: HookController, nursery: trio.Nursery) -> None:
    await ctl.freeze("vm1")
    done: list[str] = []

    both = trio.Event()

    async def guest_write() -> None:
        await ctl.write("vm1", 0, b"held")
        done.append("write")
        if len(done) == 2:
            both.set()

    async def guest_read() -> None:
        await ctl.read("vm1", 0, 4)
        done.append("read")
        if len(done) == 2:
            both.set()

    nursery.start_soon(guest_write)
    nursery.start_soon(guest_read)
    await trio.testing.wait_all_tasks_blocked()
    assert done == []  # both held while frozen
    ctl.thaw("vm1")
    with trio.fail_after(10):  # a hang guard: the write's first area is made active in a worker thread
        await both.wait()
    assert sorted(done) == ["read", "write"]
    assert await ctl.read("vm1", 0, 4) == b"held"


async def test_freeze_drains_requests_in_flight_and_flushes(ctl: HookController, nursery: trio.Nursery,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    exp = ctl.get("vm1")
    assert exp is not None
    flushed: list[int] = []
    real_flush = exp.store.flush
    monkeypatch.setattr(exp.store, "flush", lambda: (flushed.append(exp.inflight), real_flush())[1])
    release = trio.Event()

    async def slow_hook(res: object) -> None:
        await release.wait()

    exp.after_write = slow_hook  # a write that has been applied but not yet acknowledged
    nursery.start_soon(ctl.write, "vm1", 0, b"in flight")
    await trio.testing.wait_all_tasks_blocked()
    assert exp.inflight == 1
    frozen = trio.Event()

    async def freeze() -> None:
        await ctl.freeze("vm1")
        frozen.set()

    nursery.start_soon(freeze)
    await trio.testing.wait_all_tasks_blocked()
    assert not frozen.is_set()  # waiting for the write in flight
    release.set()
    await frozen.wait()
    assert flushed == [0]  # flushed once, after the drain
    ctl.thaw("vm1")


async def test_freeze_that_cannot_drain_in_time_thaws_and_says_so(ctl: HookController, nursery: trio.Nursery
                                                                  ) -> None:
    exp = ctl.get("vm1")
    assert exp is not None
    never = trio.Event()

    async def stuck(res: object) -> None:
        await never.wait()

    exp.after_write = stuck
    nursery.start_soon(ctl.write, "vm1", 0, b"stuck")
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.TooSlowError), trio.fail_after(0.05):
        await ctl.freeze("vm1")
    assert not exp.frozen
    never.set()


async def test_a_forgotten_freeze_thaws_by_itself(ctl: HookController, monkeypatch: pytest.MonkeyPatch,
                                                  autojump_clock: trio.testing.MockClock) -> None:
    monkeypatch.setattr(khc, "MAX_FREEZE_SECONDS", 3.0)
    await ctl.write("vm1", 0, b"first")  # its area active now: the write below has no thread work the clock skips
    await ctl.freeze("vm1")
    with trio.fail_after(10):
        await ctl.write("vm1", 0, b"eventually")
    assert trio.current_time() >= 3.0


async def test_standby_refuses_writes_but_serves_reads(ctl: HookController) -> None:
    await ctl.write("vm1", 0, b"before")
    ctl.set_mode("vm1", ExportMode.STANDBY)
    with pytest.raises(HookError) as e:
        await ctl.write("vm1", 0, b"after")
    assert e.value.errno == NBD_EPERM
    with pytest.raises(HookError):
        await ctl.trim("vm1", 0, 4096)
    assert await ctl.read("vm1", 0, 6) == b"before"


async def test_incoming_holds_writes_until_ownership_arrives(ctl: HookController, nursery: trio.Nursery) -> None:
    ctl.set_mode("vm1", ExportMode.INCOMING)
    done = trio.Event()

    async def guest_write() -> None:
        await ctl.write("vm1", 0, b"after switchover")
        done.set()

    nursery.start_soon(guest_write)
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set()
    assert await ctl.read("vm1", 0, 5) == bytes(5)  # reads are served meanwhile
    ctl.set_mode("vm1", ExportMode.PRIMARY)
    await done.wait()
    assert await ctl.read("vm1", 0, 16) == b"after switchover"


async def test_incoming_write_fails_with_eperm_once_the_source_falls_silent(
        ctl: HookController, autojump_clock: trio.testing.MockClock) -> None:
    ctl.set_mode("vm1", ExportMode.INCOMING)
    with pytest.raises(HookError) as e:
        await ctl.write("vm1", 0, b"too early")
    assert e.value.errno == NBD_EPERM and "not been heard from" in str(e.value)
    assert trio.current_time() >= khc.INCOMING_SILENCE_SECONDS


async def test_incoming_write_waits_as_long_as_the_source_is_heard(
        ctl: HookController, autojump_clock: trio.testing.MockClock) -> None:
    ctl.set_mode("vm1", ExportMode.INCOMING)
    written = trio.Event()

    async def guest_write() -> None:
        await ctl.write("vm1", 0, b"held for long")
        written.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest_write)
        for _ in range(5):  # a migration alive for 5 times the silence allowed
            await trio.sleep(khc.INCOMING_SILENCE_SECONDS * 0.9)
            ctl.heard_from_source("vm1")
        assert not written.is_set()
        ctl.set_mode("vm1", ExportMode.PRIMARY)
    assert written.is_set() and await ctl.read("vm1", 0, 13) == b"held for long"


class OwnerReads:
    """The migration source as an incoming export sees it: reads only, or gone (``fail``)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.fail, self.calls = data, False, 0

    async def read(self, offset: int, length: int) -> bytes:
        self.calls += 1
        if self.fail:
            raise HookError(khc.NBD_EIO, "the owner is unreachable")
        return self.data[offset:offset + length]

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        raise AssertionError("an incoming export never forwards writes")

    write_zeroes = trim = write  # type: ignore[assignment]

    async def flush(self) -> None:
        raise AssertionError("an incoming export never forwards flushes")


async def test_incoming_reads_come_from_the_owner_until_ownership_arrives(ctl: HookController) -> None:
    """The local replica may be stale during an incoming migration: reads go to the owner; once this
    host owns the disk they are local again, also for a read whose forwarding failed at that moment."""
    await ctl.write("vm1", 0, b"stale" * 10)
    owner = OwnerReads(b"fresh" * 10)
    ctl.set_mode("vm1", ExportMode.INCOMING)
    exp = ctl.get("vm1")
    assert exp is not None
    exp.read_through = owner
    assert await ctl.read("vm1", 0, 10) == b"freshfresh"
    owner.fail = True
    with pytest.raises(HookError):
        await ctl.read("vm1", 0, 10)  # still incoming: no stale answer
    owner.fail = False

    async def commit_then_refuse(offset: int, length: int) -> bytes:
        ctl.set_mode("vm1", ExportMode.PRIMARY)  # the commit lands while the read is on its way
        raise HookError(khc.NBD_EIO, "no longer the owner")
    owner.read = commit_then_refuse  # type: ignore[method-assign]
    assert await ctl.read("vm1", 0, 10) == b"stalestale"  # this host is the owner now: its data is current
    assert await ctl.read("vm1", 0, 10) == b"stalestale"
    assert owner.calls == 2


async def test_writes_into_new_areas_share_one_activation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest writes that arrive together, each into an area not yet active, wait on one journal sync."""
    from p2pvbd import replica_store as rs

    area = rs.ACTIVE_AREA_BYTES
    store = ReplicaStore.create(tmp_path / "big", "big", 8 * area, 64 * KiB, owner="office-pc", epoch=1)
    c = HookController()
    c.add_export(store, ExportMode.PRIMARY)
    await c.write("big", 0, b"first")  # the journal grown and area 0 active before the syncs counted here
    journal = (tmp_path / "big" / "journal.log").stat().st_ino
    real_fdatasync, syncs = os.fdatasync, []

    def fdatasync(fd: int) -> None:
        if os.fstat(fd).st_ino == journal:
            syncs.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    async with trio.open_nursery() as nursery:
        for a in range(1, 8):
            nursery.start_soon(c.write, "big", a * area, b"x" * 4096)
    assert store.active_areas == 8 and [store.read(a * area, 1) for a in range(1, 8)] == [b"x"] * 7
    assert len(syncs) == 1, "each write synced the journal for its own area"
    store.close()


async def test_a_burst_of_writes_is_applied_in_order_published_and_failed_one_by_one(
        ctl: HookController, store: ReplicaStore) -> None:
    store.activate(0, store.size)  # what the NBD server leaves to write_many: writes into active areas
    with ctl.subscribe("vm1") as sub:
        errors = await ctl.write_many("vm1", [(0, b"a" * 100), (50, b"b" * 10), (store.size - 1, b"cd"),
                                              (64 * KiB, b"e")])
        events = [sub.receive.receive_nowait() for _ in range(3)]
    assert errors[0] is None and errors[1] is None and errors[3] is None
    assert isinstance(errors[2], HookError) and errors[2].errno == khc.NBD_ENOSPC
    assert [(e.first_block, e.last_block) for e in events] == [(0, 0), (0, 0), (1, 1)]
    assert events[0].version < events[1].version < events[2].version
    assert store.read(0, 100) == b"a" * 50 + b"b" * 10 + b"a" * 40 and store.read(64 * KiB, 1) == b"e"
    assert ctl.get("vm1").recent.newest(1 << 20) == [64 * KiB, 0]  # type: ignore[union-attr]


async def test_a_burst_of_writes_to_a_standby_fails_each_with_eperm(ctl: HookController) -> None:
    ctl.set_mode("vm1", ExportMode.STANDBY)
    errors = await ctl.write_many("vm1", [(0, b"x"), (1, b"y")])
    assert [e.errno if e else None for e in errors] == [NBD_EPERM, NBD_EPERM]
    assert ctl.get("vm1").store.read(0, 2) == bytes(2)  # type: ignore[union-attr]


async def test_a_burst_of_writes_to_a_frozen_export_waits_for_the_thaw(ctl: HookController, nursery: trio.Nursery
                                                                       ) -> None:
    await ctl.freeze("vm1")
    done = trio.Event()

    async def burst() -> None:
        assert await ctl.write_many("vm1", [(0, b"p"), (1, b"q")]) == [None, None]
        done.set()

    nursery.start_soon(burst)
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set() and ctl.get("vm1").store.read(0, 2) == bytes(2)  # type: ignore[union-attr]
    ctl.thaw("vm1")
    await done.wait()
    assert ctl.get("vm1").store.read(0, 2) == b"pq"  # type: ignore[union-attr]
