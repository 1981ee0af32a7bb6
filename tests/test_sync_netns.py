"""Multi-peer pull over real, shaped links: four hosts in network namespaces."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import BIN, Host, run
from tests.helpers import MiB, coverage, qemu_io, sync, visible, wait_until
from tests.netns import Network, require_root

pytestmark = pytest.mark.root

# Every peer's upload: slow enough that a sync of a few MiB takes a couple of seconds (a kill lands
# mid-sync), fast enough that the suite stays quick.
UPLOAD = "40mbit"


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[Host]]:
    """office-pc (owner), home-pc and laptop (peers), car-pc (the empty target), each in a namespace."""
    require_root()
    with Network() as net:
        made: list[Host] = []
        try:
            for name in ("office-pc", "home-pc", "laptop", "car-pc"):
                ns = net.add_host(name, upload=None if name == "car-pc" else UPLOAD)
                token = made[0].cli("invite").stdout.strip() if made else None
                h = Host(tmp_path / name, name, join=token, prefix=ns.exec_prefix(), address=ns.address)
                made.append(h.start())
            yield made
        finally:
            for h in made:
                if h.alive():
                    h.stop()


def test_target_pulls_from_every_peer_and_ends_identical(hosts: list[Host], tmp_path: Path) -> None:
    office, home, laptop, car = hosts
    office.cli("disk", "create", "vm1", "--size", "32M")
    uri = office.uri("vm1")
    qemu_io(uri, "write -P 0x11 0 8M", "flush")  # R1
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    sync(home, "vm1")  # home-pc: R1
    qemu_io(uri, "write -P 0x22 8M 8M", "flush")  # R2
    wait_until(lambda: visible(laptop, "vm1", holders=2), "laptop to see vm1")
    sync(laptop, "vm1", "--from", "office-pc")  # laptop: R1 and R2
    qemu_io(uri, "write -P 0x33 0 2M", "write -P 0x44 16M 4M", "write -z 24M 4M", "flush")  # R1 partly, R3, zeroes
    cov = coverage(office, "vm1")
    assert 0 < cov["home-pc"] < cov["laptop"] < 1  # different, partial and partly stale replicas

    wait_until(lambda: visible(car, "vm1", holders=3), "car-pc to see all three holders")
    res = sync(car, "vm1")
    assert res["error"] == ""
    assert sum(1 for b in res["bytes_from"].values() if b > 0) >= 2, res["bytes_from"]
    assert res["zero_blocks"] == 64  # the zeroed 4 MiB cost nothing
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", office.uri("vm1"), car.uri("vm1"))
    assert car.json("verify", "vm1")["ok"]
    assert coverage(office, "vm1")["car-pc"] == 1.0


def test_peer_killed_mid_sync_over_slow_links(hosts: list[Host], tmp_path: Path) -> None:
    office, home, laptop, car = hosts
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(24 * MiB))
    office.cli("disk", "import", "vm1", str(image))
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    for peer in (home, laptop):
        sync(peer, "vm1", "--from", "office-pc")
    wait_until(lambda: visible(car, "vm1", holders=3), "car-pc to see all three holders")
    proc = subprocess.Popen([*car.prefix, BIN, "sync", "vm1", "--json", "--home", str(car.home)],
                            stdout=subprocess.PIPE, text=True)
    wait_until(lambda: any(j["done_bytes"] > 2 * MiB for j in car.json("jobs")), "the sync to be under way",
               poll=0.02)
    laptop.kill9()
    killed_at = time.time()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    job = next(j for j in car.json("jobs") if j["kind"] == "sync")
    assert job["finished_at"] > killed_at, "the kill landed after the sync had ended: it tested nothing"
    run("qemu-img", "compare", "-f", "raw", image.as_posix(), car.uri("vm1"))
    assert car.json("verify", "vm1")["ok"]
