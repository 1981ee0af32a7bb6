"""MapTree: digests that change with the map, descents that find exactly the differing blocks, change feeds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvbd.store.map_tree import (
    FANOUT,
    LEAF_BLOCKS,
    RECORD_DTYPE,
    STALE_DIGEST,
    STALE_ROOT,
    MapTree,
    children,
    descend,
    differing,
    leaf_blocks,
    level_sizes,
    same_records,
    same_root,
)
from p2pvbd.swarm.maps import MapSummary
from p2pvbd.swarm.peer_transport import PeerError

BS = 4096


def random_records(n: int, rng: np.random.Generator, written: float) -> np.ndarray:
    rec = np.zeros(n, RECORD_DTYPE)
    w = rng.random(n) < written
    rec["version"][w] = rng.integers(1, 1 << 40, int(w.sum()), dtype=np.uint64)
    rec["hash"][w] = rng.integers(0, 256, (int(w.sum()), 16), dtype=np.uint8)
    return rec


def tree_of(rec: np.ndarray) -> MapTree:
    return MapTree.build(rec, BS, rec.size * BS)


def diff_by_descent(a: MapTree, b: MapTree, ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    leaves = descend(a.top, a.sizes, lambda level, parents: differing(a.nodes(level, parents), b.nodes(level, parents)))
    blocks = leaf_blocks(leaves, ra.size)
    return blocks[~same_records(ra[blocks], rb[blocks])]


def test_levels_cover_any_size() -> None:
    assert level_sizes(1) == [1]
    assert level_sizes(64 * 64) == [64]
    assert level_sizes(64 * 64 + 1) == [65, 2]
    assert level_sizes(1 << 24) == [1 << 18, 1 << 12, 64]  # a 1 TiB disk of 64 KiB blocks
    assert children(np.array([0]), 65).tolist() == list(range(64))
    assert children(np.array([1]), 65).tolist() == [64]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 64 * 64 * 3), seed=st.integers(0, 2**32 - 1), changes=st.integers(0, 40))
def test_descent_finds_exactly_the_differing_blocks(n: int, seed: int, changes: int) -> None:
    rng = np.random.default_rng(seed)
    a = random_records(n, rng, 0.3)
    b = a.copy()
    idx = rng.integers(0, n, changes)
    for i in idx.tolist():
        if rng.random() < 0.5:
            b["version"][i] += np.uint64(1)
        else:
            b["hash"][i, rng.integers(16)] ^= 1
    truth = np.flatnonzero(~same_records(a, b))
    ta, tb = tree_of(a), tree_of(b)
    assert same_root(ta.root(), tb.root()) == (truth.size == 0)
    assert diff_by_descent(ta, tb, a, b).tolist() == truth.tolist()


def test_a_version_0_block_has_no_hash_whatever_its_field_holds() -> None:
    a = np.zeros(100, RECORD_DTYPE)
    b = a.copy()
    b["hash"][7] = 9  # garbage in the hash field of a never-written block
    assert tree_of(a).root() == tree_of(b).root()
    assert same_records(a, b).all()


def test_touch_marks_stale_and_refresh_matches_a_fresh_build() -> None:
    rng = np.random.default_rng(3)
    n = 64 * 64 * 2 + 5
    rec = random_records(n, rng, 0.2)
    tree = tree_of(rec)
    before = tree.root()
    rec["version"][100] = 1 << 50
    tree.touch(100, 100, 1 << 50)
    assert tree.root() == STALE_ROOT and not same_root(tree.root(), tree.root())
    top = tree.nodes(tree.top, np.zeros(1, np.int64))
    assert (top[0] == np.frombuffer(STALE_DIGEST, np.uint8)).all()  # block 100 is below top node 0
    leaves = tree.stale_leaves()
    assert leaves.tolist() == [100 // LEAF_BLOCKS]
    tree.set_leaves(leaves, tree.hash_leaves(rec, leaves), tree.newest_of(rec, leaves))
    assert tree.root() == tree_of(rec).root() != before
    assert all((tree.digests[k] == tree_of(rec).digests[k]).all() for k in range(len(tree.sizes)))


def test_a_stale_node_differs_even_from_an_identical_stale_node() -> None:
    rec = np.zeros(64 * 5, RECORD_DTYPE)
    a, b = tree_of(rec), tree_of(rec)
    a.touch(0, 0, 1)
    b.touch(0, 0, 1)
    assert differing(a.nodes(0, np.zeros(1, np.int64)), b.nodes(0, np.zeros(1, np.int64))).tolist() == [
        True, False, False, False, False]


def test_leaves_since_skips_leaves_born_before() -> None:
    rec = np.zeros(64 * FANOUT * 2, RECORD_DTYPE)
    rec["version"][[3, 700, 5000]] = [10, 20, 30]
    tree = tree_of(rec)
    assert tree.leaves_since(0).tolist() == [0, 700 // 64, 5000 // 64]
    assert tree.leaves_since(15).tolist() == [700 // 64, 5000 // 64]
    assert tree.leaves_since(30).size == 0
    assert tree.leaves_since(0, start_leaf=700 // 64 + 1).tolist() == [5000 // 64]
    tree.touch(64, 64, 40)  # raised eagerly, before any digest
    assert tree.leaves_since(35).tolist() == [1]


def test_empty_tree_equals_a_built_empty_map() -> None:
    n = 64 * 64 * 3 + 17
    fresh = MapTree(n, BS, n * BS)
    fresh.reset_empty()
    assert fresh.root() == tree_of(np.zeros(n, RECORD_DTYPE)).root()


def test_nodes_rejects_out_of_range_questions() -> None:
    tree = tree_of(np.zeros(64 * 64 * 2, RECORD_DTYPE))
    with pytest.raises(ValueError):
        tree.nodes(tree.top + 1, np.zeros(1, np.int64))
    with pytest.raises(ValueError):
        tree.nodes(0, np.array([5]))
    with pytest.raises(ValueError):
        tree.nodes(tree.top, np.array([1]))


@pytest.mark.parametrize("change", [
    {"size": 0}, {"size": 1 << 62}, {"block_size": 3000}, {"root": b"short"}, {"root": None}, {"epoch": "x"},
    {"generation": None}, {"held_blocks": []},
])
def test_a_malformed_map_summary_is_a_clear_peer_error(change: dict[str, object]) -> None:
    good = {"size": 1 << 30, "block_size": 65536, "owner": "office-pc", "epoch": 1, "generation": 5, "boot": "ab",
            "held_blocks": 3, "root": bytes(32)}
    assert MapSummary.from_body(good).n_blocks == 16384
    with pytest.raises(PeerError, match="malformed map summary"):
        MapSummary.from_body(good | change)
