"""The fetcher against in-process fake peers: a sync ends once every block is in, and cancels the rest."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from p2pvbd.migration import fetcher as fetcher_mod
from p2pvbd.migration.fetcher import Fetcher, SyncProgress
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.store.version_map import BlockEntries
from p2pvbd.wire.peer_wire import ENC_RAW

MiB, BS = 1 << 20, 64 * 1024


class FakePeer:
    """Serves get_blocks from ``source``; a stalled one never answers, and counts the requests given up."""

    def __init__(self, source: ReplicaStore, stalled: bool = False) -> None:
        self.source, self.stalled = source, stalled
        self.requests = self.cancelled = 0

    async def request(self, op: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
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
            blocks.append([index, rec.version, rec.hash, rec.data, ENC_RAW])
        return {"blocks": blocks}


class FakeSwarm:
    def __init__(self, peers: dict[str, FakePeer]) -> None:
        self.peers = peers

    async def connect(self, name: str) -> FakePeer:
        return self.peers[name]


async def test_a_stalled_peer_is_duplicated_then_cancelled_not_waited_for(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A stalled request would be waited for an hour: the sync ends only because it is duplicated and cancelled.
    monkeypatch.setattr(fetcher_mod, "REQUEST_TIMEOUT", 3600.0)
    size = 8 * MiB
    with ReplicaStore.create(tmp_path / "owner", "vm1", size, BS) as owner, \
            ReplicaStore.create(tmp_path / "target", "vm1", size, BS) as target:
        owner.write(0, random.Random(1).randbytes(size))
        owner_map = owner.version_map()
        blocks = np.arange(owner_map.n_blocks)
        wanted = BlockEntries.from_map(owner_map, blocks)
        mine = BlockEntries.from_map(target.version_map(), blocks)
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
