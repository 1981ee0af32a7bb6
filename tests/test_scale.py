"""Real disk sizes: a sparse 100 GiB disk (1 TiB among the heavy cases) synced, kept warm, reported and
migrated under a writing, verifying guest whose blocks are spread over the whole disk.

Correctness is checked as everywhere (the new owner holds exactly what the guest was promised, coverage,
verify). That the work follows what changed and not the disk's size is checked by what crossed the
wire to find the differences (``map_bytes``): a small fraction of the whole map's 24 bytes per block.
Speed itself belongs to bench/scale.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.daemons import Host, run, write_refused
from tests.guest_model import apply_to_image
from tests.helpers import coverage, qemu_io, sync, visible, wait_until
from tests.test_migrate import Guest

GiB = 1 << 30
BLOCK = 64 * 1024
# Blocks the guest touches, spread evenly over the disk: every region of the map tree has some.
GUEST_BLOCKS = 2048
# 24 bytes of (version, hash) per block: what comparing whole maps would move.
RECORD_BYTES = 24
# Warm replication pulls what changed within its check interval; this bounds a broken test.
WARM_SECONDS = 120.0

SIZES = [pytest.param(100 * GiB, id="100GiB"), pytest.param(1 << 40, id="1TiB", marks=pytest.mark.heavy)]


def spread_guest(uri: str, tmp: Path, stride: int, seed: int, ops: int = 0) -> Guest:
    """The verifying guest, writing mixed operations to GUEST_BLOCKS blocks spread over the disk."""
    return Guest(uri, tmp, seed, "--blocks", str(GUEST_BLOCKS), "--stride", str(stride), "--mix",
                 "--pause", "0.001", *(("--ops", str(ops)) if ops else ()))


def finished(guest: Guest) -> dict[str, object]:
    report = guest.finish(timeout=300)
    assert report["errors"] == [] and report["reads_ok"], report
    return report


@pytest.mark.parametrize("size", SIZES)
def test_a_big_sparse_disk_syncs_stays_warm_and_moves(three_hosts: list[Host], tmp_path: Path, size: int) -> None:
    office, home, car = three_hosts
    n_blocks = size // BLOCK
    stride = n_blocks // GUEST_BLOCKS
    whole_map = n_blocks * RECORD_BYTES
    office.cli("disk", "create", "vm1", "--size", str(size))
    model = tmp_path / "model.raw"
    with open(model, "wb") as f:
        f.truncate(size)  # sparse, like the disk

    # Data all over the disk.
    ops = finished(spread_guest(office.uri("vm1"), tmp_path, stride, seed=1, ops=3000))["ops"]
    apply_to_image(model, ops, BLOCK, stride)  # type: ignore[arg-type]

    # home-pc pulls a first replica: only what was written travels, the map exchange is the feed of it.
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    first = sync(home, "vm1")
    assert first["error"] == "" and first["blocks_fetched"] + first["zero_blocks"] <= GUEST_BLOCKS
    assert first["map_bytes"] < GUEST_BLOCKS * 64, first  # the feed: tens of bytes per written block
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), home.uri("vm1"))

    # A few rewritten blocks make home-pc's replica nearly current: a sync finds and moves just those.
    changed = [7, GUEST_BLOCKS // 2, GUEST_BLOCKS - 3]
    qemu_io(office.uri("vm1"), *(f"write -P 0x5a {b * stride * BLOCK} 64k" for b in changed), "flush")
    for b in changed:
        with open(model, "r+b") as f:
            f.seek(b * stride * BLOCK)
            f.write(b"\x5a" * BLOCK)
    again = sync(home, "vm1")
    assert again["error"] == "" and again["blocks_fetched"] == len(changed), again
    assert again["map_bytes"] < whole_map / 1000, again
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), home.uri("vm1"))

    # car-pc is kept warm; later writes reach it without anyone asking.
    office.cli("replicate", "vm1", "--on", "car-pc")
    wait_until(lambda: coverage(office, "vm1").get("car-pc") == 1.0, "car-pc's warm replica", WARM_SECONDS)
    qemu_io(office.uri("vm1"), f"write -P 0x6b {(GUEST_BLOCKS - 1) * stride * BLOCK} 64k", "flush")
    with open(model, "r+b") as f:
        f.seek((GUEST_BLOCKS - 1) * stride * BLOCK)
        f.write(b"\x6b" * BLOCK)
    wait_until(lambda: coverage(car, "vm1").get("car-pc") == 1.0, "car-pc to pull the new write", WARM_SECONDS)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), car.uri("vm1"))

    # Every host reports the same status; home-pc is one block behind.
    views = [h.json("status", "vm1")["disks"][0] for h in three_hosts]
    for view in views:
        assert view["size"] == size and view["owner"] == "office-pc"
        cov = {r["host"]: (r["current_blocks"], r["total_blocks"]) for r in view["replicas"]}
        assert cov == {"office-pc": (n_blocks, n_blocks), "home-pc": (n_blocks - 1, n_blocks),
                       "car-pc": (n_blocks, n_blocks)}, view

    # The disk moves to car-pc while a guest writes all over it; car-pc ends with exactly what was promised.
    guest = spread_guest(office.uri("vm1"), tmp_path, stride, seed=2)
    summary = json.loads(office.cli("migrate", "vm1", "--to", "car-pc", "--json", timeout=900).stdout)
    assert summary["error"] == "" and summary["to"] == "car-pc" and summary["epoch"] == 2, summary
    assert summary["map_bytes"] < whole_map / 100, summary
    ops = finished(guest)["ops"]
    apply_to_image(model, ops, BLOCK, stride)  # type: ignore[arg-type]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), car.uri("vm1"))
    assert coverage(car, "vm1")["car-pc"] == 1.0
    assert car.json("verify", "vm1")["ok"]
    refused = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", office.uri("vm1"), check=False)
    assert write_refused(refused), refused.stdout + refused.stderr
