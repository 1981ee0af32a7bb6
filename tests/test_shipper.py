"""The mirror's shipper gives a guest's write priority over the backlog (sync mode), without starving it.

The link is a stand-in that records when each request started and takes a fixed virtual time per
request; packing runs inline instead of in a worker thread, so the virtual clock alone decides the
order. What is checked is when the shipper starts each request, which does not depend on a real socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from p2pvbd import migrate
from p2pvbd.kernel_hook_ctl import ExportMode, HookController
from p2pvbd.migrate import MigrationProgress, Shipper
from p2pvbd.replica_store import ReplicaStore

BS = 64 * 1024
BATCH_BLOCKS = migrate.SHIP_BATCH_BYTES // BS
SEND_SECONDS = 0.1  # one put_blocks on the stand-in link


class RecordingLink:
    def __init__(self) -> None:
        self.sent: list[tuple[int, ...]] = []
        self.started: dict[tuple[int, ...], float] = {}

    async def request(self, op: str, body: dict[str, Any], timeout: float = 0) -> dict[str, Any]:  # noqa: ASYNC109 -- PeerConnection.request
        blocks = tuple(entry[0] for entry in body["blocks"])
        self.started.setdefault(blocks, trio.current_time())
        await trio.sleep(SEND_SECONDS)
        self.sent.append(blocks)
        return {}


@pytest.fixture
def shipper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Shipper, RecordingLink]]:
    async def inline(fn: Any, *args: Any) -> Any:
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    store = ReplicaStore.create(tmp_path / "vm1", "vm1", 64 * BATCH_BLOCKS * BS, BS, owner="office-pc", epoch=1)
    store.write(0, b"x" * store.size)
    ctl = HookController()
    exp = ctl.add_export(store, ExportMode.PRIMARY)
    link = RecordingLink()
    yield Shipper(link, exp, MigrationProgress("vm1", "office-pc", "car-pc", "sync")), link  # type: ignore[arg-type]
    store.close()


async def test_a_guest_write_overtakes_the_backlog(shipper: tuple[Shipper, RecordingLink],
                                                   autojump_clock: trio.testing.MockClock) -> None:
    ship, link = shipper
    backlog = np.arange(BATCH_BLOCKS, 20 * BATCH_BLOCKS, dtype=np.int64)
    guest_block = np.array([3], np.int64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ship.ship, backlog)
        await trio.sleep(SEND_SECONDS * 2.5)  # the backlog is under way, its window full
        asked = trio.current_time()
        await ship.ship(guest_block, urgent=True)
    # The guest's block went at once, not after a window slot came free.
    assert link.started[(3,)] == asked
    assert sum(len(b) for b in link.sent) == backlog.size + 1  # and the backlog went out whole


async def test_a_busy_guest_does_not_starve_the_backlog(shipper: tuple[Shipper, RecordingLink],
                                                        autojump_clock: trio.testing.MockClock) -> None:
    ship, link = shipper
    backlog = np.arange(BATCH_BLOCKS, 5 * BATCH_BLOCKS, dtype=np.int64)
    done = trio.Event()

    async def writer(offset: float) -> None:  # two of them, overlapping: a write is always on its way
        await trio.sleep(offset)
        while not done.is_set():
            await ship.ship(np.array([1], np.int64), urgent=True)

    with trio.fail_after(1000 * SEND_SECONDS):  # virtual time: the backlog must not wait for ever
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, 0)
            nursery.start_soon(writer, SEND_SECONDS / 2)
            await trio.sleep(SEND_SECONDS)
            await ship.ship(backlog)
            done.set()
    assert sum(len(b) for b in link.sent if b != (1,)) == backlog.size


async def test_the_backlog_ships_small_batches_while_the_guest_writes(shipper: tuple[Shipper, RecordingLink],
                                                                      autojump_clock: trio.testing.MockClock) -> None:
    ship, link = shipper
    small = migrate.CONTENDED_BATCH_BYTES // BS
    await ship.ship(np.array([1], np.int64), urgent=True)
    await ship.ship(np.arange(BATCH_BLOCKS, BATCH_BLOCKS + 6 * small, dtype=np.int64))
    assert [len(b) for b in link.sent[1:]] == [small] * 6  # a guest write queued now waits behind little
    link.sent.clear()
    await trio.sleep(migrate.CONTENDED_SECONDS)  # the guest stopped writing: full batches again
    await ship.ship(np.arange(4 * BATCH_BLOCKS, 6 * BATCH_BLOCKS, dtype=np.int64))
    assert [len(b) for b in link.sent] == [BATCH_BLOCKS] * 2
