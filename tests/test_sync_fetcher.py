"""The fetcher against in-process fake peers: a sync ends once every block is in, and cancels the rest."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import zstandard

from p2pvbd.migration import fetcher as fetcher_mod
from p2pvbd.migration.fetcher import Fetcher, SyncProgress
from p2pvbd.migration.pull import PullState
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.store.version_map import BlockEntries, VersionMap
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.peer_wire import BLOCK_ZSTD_LEVEL, pack_entry

MiB, BS = 1 << 20, 64 * 1024
ZSTD = zstandard.ZstdCompressor(level=BLOCK_ZSTD_LEVEL)


class FakePeer:
    """Serves get_blocks from ``source``; a stalled one never answers, and counts the requests given up."""

    def __init__(self, source: ReplicaStore, stalled: bool = False) -> None:
        self.source, self.stalled = source, stalled
        self.requests = self.cancelled = 0

    async def request(self, op: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 -- PeerConnection.request
        assert op == "get_blocks"
        self.requests += 1
        if self.stalled:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        await trio.sleep(0.01)
        blocks = []
        for index, version in body["blocks"]:
            rec = self.source.read_block(index)
            assert rec.version == version and rec.data is not None
            blocks.append(pack_entry(index, rec.version, rec.hash, rec.data, ZSTD))
        return {"blocks": blocks}


class FakeSwarm:
    def __init__(self, peers: dict[str, FakePeer]) -> None:
        self.peers = peers
        self.pulls = PullState()  # rates measured in earlier pulls: none

    async def connect(self, name: str) -> FakePeer:
        return self.peers[name]


def entries(owner: ReplicaStore, target: ReplicaStore, written_only: bool = False
            ) -> tuple[VersionMap, BlockEntries, BlockEntries]:
    """The owner's map, and the owner's and the target's entries for every block (or every written one)."""
    owner_map = owner.version_map()
    blocks = np.flatnonzero(owner_map.versions) if written_only else np.arange(owner_map.n_blocks)
    return owner_map, BlockEntries.from_map(owner_map, blocks), BlockEntries.from_map(target.version_map(), blocks)


async def test_a_stalled_peer_is_duplicated_then_cancelled_not_waited_for(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A stalled request would be waited for an hour: the sync ends only because it is duplicated and cancelled.
    monkeypatch.setattr(fetcher_mod, "REQUEST_TIMEOUT", 3600.0)
    size = 8 * MiB
    with ReplicaStore.create(tmp_path / "owner", "vm1", size, BS) as owner, \
            ReplicaStore.create(tmp_path / "target", "vm1", size, BS) as target:
        owner.write(0, random.Random(1).randbytes(size))
        owner_map, wanted, mine = entries(owner, target)
        fast, stalled = FakePeer(owner), FakePeer(owner, stalled=True)
        progress = SyncProgress("vm1")
        fetcher = Fetcher(FakeSwarm({"owner": fast, "stalled": stalled}), target, "owner", wanted,  # type: ignore[arg-type]
                          mine, {"owner": wanted.versions, "stalled": wanted.versions}, progress)
        with trio.fail_after(600):  # bounds a broken test; a working one ends in about a second
            await fetcher.run()
        assert progress.phase == "done" and progress.blocks_fetched == size // BS
        assert stalled.requests > 0 and stalled.cancelled == stalled.requests  # none left hanging
        assert not progress.peers["stalled"].dropped  # a peer whose work was taken over is not at fault
        assert target.version_map().versions.tolist() == owner_map.versions.tolist()
        assert target.read(0, size) == owner.read(0, size)


async def test_the_journal_is_synced_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first peer block into an area of the activity log syncs the journal: in a worker thread, never on
    the event loop, which every guest request of this host waits on meanwhile."""
    size = 8 * MiB
    with ReplicaStore.create(tmp_path / "owner", "vm1", size, BS) as owner, \
            ReplicaStore.create(tmp_path / "target", "vm1", size, BS) as target:
        owner.write(0, random.Random(2).randbytes(size))
        _, wanted, mine = entries(owner, target)
        synced_on: list[bool] = []  # per sync (the journal's are fdatasyncs of records written in place)
        real_fsync, real_fdatasync = os.fsync, os.fdatasync

        def fsync(fd: int) -> None:
            synced_on.append(threading.current_thread() is threading.main_thread())
            real_fsync(fd)

        def fdatasync(fd: int) -> None:
            synced_on.append(threading.current_thread() is threading.main_thread())
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        fetcher = Fetcher(FakeSwarm({"owner": FakePeer(owner)}), target, "owner", wanted,  # type: ignore[arg-type]
                          mine, {"owner": wanted.versions}, SyncProgress("vm1"))
        with trio.fail_after(600):  # bounds a broken test
            await fetcher.run()
        assert target.read(0, size) == owner.read(0, size)
        assert synced_on and not any(synced_on), synced_on


class ServingPeer:
    """Answers get_blocks as a daemon does: the owner sends what it holds now, a replica says which version
    it holds when it lacks the one asked for."""

    def __init__(self, source: ReplicaStore, owner: bool, rng: random.Random) -> None:
        self.source, self.owner, self.rng = source, owner, rng

    async def request(self, op: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 -- PeerConnection.request
        await trio.sleep(self.rng.random() * 0.004)
        blocks = []
        for index, version in body["blocks"]:
            rec = self.source.read_block(index)
            if rec.version != version and not self.owner:
                blocks.append(pack_entry(index, rec.version))
            else:
                blocks.append(pack_entry(index, rec.version, rec.hash, rec.data, ZSTD))
        return {"blocks": blocks}


@pytest.mark.parametrize("seed", range(12))
async def test_a_pull_ends_while_the_owner_rewrites_and_a_helper_is_stale(tmp_path: Path, seed: int) -> None:
    """Every block the owner had when the pull was planned arrives, at that version or a newer one,
    however the owner's writes and a helper's stale blocks interleave with the requests."""
    rng = random.Random(seed)
    n = 256
    size = n * BS
    owner = ReplicaStore.create(tmp_path / "owner", "vm1", size, BS, owner="owner", epoch=1)
    helper = ReplicaStore.create(tmp_path / "helper", "vm1", size, BS)
    target = ReplicaStore.create(tmp_path / "target", "vm1", size, BS)
    try:
        for b in rng.sample(range(n), n // 2):
            owner.write(b * BS, rng.randbytes(BS) if rng.random() < 0.8 else bytes(BS))
        for b in range(n):  # the helper copies the owner, then the owner moves on for some blocks
            rec = owner.read_block(b)
            if rec.version:
                helper.put_block(b, rec.version, rec.data, rec.hash)
        for b in rng.sample(range(n), n // 8):
            owner.write(b * BS, rng.randbytes(BS))
        _, wanted, mine = entries(owner, target, written_only=True)
        blocks = wanted.blocks
        helper_versions = helper.version_map().versions[blocks]
        peers = {"owner": ServingPeer(owner, True, rng), "helper": ServingPeer(helper, False, rng)}
        progress = SyncProgress("vm1")
        fetcher = Fetcher(FakeSwarm(peers), target, "owner", wanted, mine,  # type: ignore[arg-type]
                          {"owner": wanted.versions, "helper": helper_versions}, progress)

        async def rewrite() -> None:
            for _ in range(40):
                await trio.sleep(rng.random() * 0.003)
                b = int(rng.choice(blocks))
                owner.write(b * BS + rng.randrange(BS // 2), rng.randbytes(BS // 4))

        with trio.fail_after(120):  # bounds a broken test
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rewrite)
                await fetcher.run()
        got = target.version_map()
        assert progress.phase == "done"
        assert (got.versions[blocks] >= wanted.versions).all()
        assert target.verify() == []
    finally:
        for s in (owner, helper, target):
            s.close()


class FlakyPeer(ServingPeer):
    """Its link breaks once (as a connection reset does), then it serves again over a new one."""

    def __init__(self, source: ReplicaStore, rng: random.Random) -> None:
        super().__init__(source, True, rng)
        self.broke = False

    async def request(self, op: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 -- PeerConnection.request
        if not self.broke:
            self.broke = True
            raise PeerError("connection", "connection to owner lost: reset")
        return await super().request(op, body, timeout)


async def test_a_link_that_breaks_once_does_not_drop_the_only_holder(tmp_path: Path) -> None:
    size = 64 * BS
    with ReplicaStore.create(tmp_path / "owner", "vm1", size, BS) as owner, \
            ReplicaStore.create(tmp_path / "target", "vm1", size, BS) as target:
        owner.write(0, random.Random(2).randbytes(size))
        _, wanted, mine = entries(owner, target)
        peer = FlakyPeer(owner, random.Random(3))
        progress = SyncProgress("vm1")
        fetcher = Fetcher(FakeSwarm({"owner": peer}), target, "owner", wanted, mine,  # type: ignore[arg-type]
                          {"owner": wanted.versions}, progress)
        with trio.fail_after(120):
            await fetcher.run()
        assert peer.broke and progress.phase == "done" and not progress.peers["owner"].dropped
        assert target.read(0, size) == owner.read(0, size)
