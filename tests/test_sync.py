"""Multi-peer pull between real daemons: exact results, bytes from several peers, faults survived."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from p2pvbd.migration.replication import CHECK_INTERVAL
from tests.daemons import BIN, Host, run
from tests.helpers import MiB, coverage, qemu_io, sync, visible, wait_until


def test_sync_makes_an_identical_replica_from_several_peers(three_hosts: list[Host], tmp_path: Path) -> None:
    office, home, car = three_hosts
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(24 * MiB) + bytes(8 * MiB))  # random data, then a zero tail
    office.cli("disk", "import", "vm1", str(image))
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")

    first = sync(home, "vm1")
    assert first["error"] == "" and set(first["bytes_from"]) == {"office-pc"}
    assert first["blocks_fetched"] == 24 * 16 and first["zero_blocks"] == 0
    # Random data does not compress: what crossed the wire is the data, within framing.
    assert 24 * MiB <= first["bytes_on_wire"] <= 1.02 * 24 * MiB
    assert coverage(office, "vm1")["home-pc"] == 1.0

    # New writes on the owner; then car-pc, with nothing, pulls from both.
    qemu_io(office.uri("vm1"), "write -P 0x61 0 2M", "write -z 4M 1M", "flush")
    wait_until(lambda: visible(car, "vm1", holders=2), "car-pc to see both holders of vm1")
    res = sync(car, "vm1")
    assert res["error"] == ""
    assert res["bytes_from"].get("home-pc", 0) > 0 and res["bytes_from"].get("office-pc", 0) > 0, res
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", office.uri("vm1"), car.uri("vm1"))
    assert car.json("verify", "vm1")["ok"]
    assert coverage(office, "vm1")["car-pc"] == 1.0

    # home-pc is stale now: only the changed blocks move, and the zeroed ones cost nothing.
    again = sync(home, "vm1")
    assert again["blocks_fetched"] == 32 and again["zero_blocks"] == 16, again
    assert again["bytes_on_wire"] <= 2 * MiB + 64 * 1024
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", office.uri("vm1"), home.uri("vm1"))

    # Nothing left to do: nothing moves.
    idle = sync(home, "vm1")
    assert idle["blocks_fetched"] == 0 and idle["bytes_on_wire"] == 0


def test_sync_errors_are_clear(three_hosts: list[Host]) -> None:
    office, home, _ = three_hosts
    office.cli("disk", "create", "vm1", "--size", "1M")
    res = office.cli("sync", "vm1", check=False)
    assert res.returncode == 1 and "owns vm1" in res.stderr and "Traceback" not in res.stderr
    res = home.cli("sync", "nope", check=False)
    assert res.returncode == 1 and "no disk named 'nope'" in res.stderr
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    res = home.cli("sync", "vm1", "--from", "car-pc", check=False)
    assert res.returncode == 1 and "car-pc" in res.stderr


def test_zero_and_current_blocks_cost_no_transfer(three_hosts: list[Host]) -> None:
    office, home, _ = three_hosts
    office.cli("disk", "create", "vm1", "--size", "16M")
    qemu_io(office.uri("vm1"), "write -z 0 8M", "write -P 0x42 8M 1M", "flush")
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    res = sync(home, "vm1")
    assert res["zero_blocks"] == 128 and res["blocks_fetched"] == 16  # the 0x42 MiB compresses
    assert res["bytes_on_wire"] < 64 * 1024
    assert sync(home, "vm1")["bytes_on_wire"] == 0
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", office.uri("vm1"), home.uri("vm1"))


def test_sync_survives_a_peer_killed_midway(three_hosts: list[Host], tmp_path: Path) -> None:
    office, home, car = three_hosts
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(96 * MiB))
    office.cli("disk", "import", "vm1", str(image))
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    sync(home, "vm1")
    wait_until(lambda: visible(car, "vm1", holders=2), "car-pc to see both holders")
    proc = subprocess.Popen([BIN, "sync", "vm1", "--json", "--home", str(car.home)], stdout=subprocess.PIPE,
                            text=True)
    wait_until(lambda: any(j["done_bytes"] > 0 for j in car.json("jobs")), "the sync to start moving data",
               poll=0.01)
    home.kill9()
    killed_at = time.time()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    res = json.loads(out)
    assert res["bytes_from"]["office-pc"] > 0
    job = next(j for j in car.json("jobs") if j["kind"] == "sync")
    assert job["finished_at"] > killed_at, "the kill landed after the sync had ended: it tested nothing"
    run("qemu-img", "compare", "-f", "raw", image.as_posix(), car.uri("vm1"))
    assert car.json("verify", "vm1")["ok"]


def test_replicate_keeps_a_replica_warm_until_turned_off(three_hosts: list[Host]) -> None:
    office, home, car = three_hosts
    office.cli("disk", "create", "vm1", "--size", "8M")
    wait_until(lambda: visible(car, "vm1"), "car-pc to see vm1")
    res = car.cli("replicate", "vm1", "--on", "home-pc", check=False)  # only the owner sets a disk's policy
    assert res.returncode != 0 and "run this on office-pc" in res.stderr and "Traceback" not in res.stderr, res.stderr
    policy = json.loads(office.cli("replicate", "vm1", "--on", "home-pc", "--rate", "100mbit", "--json").stdout)
    assert policy["hosts"] == ["home-pc"] and policy["rate"] == 12.5e6

    def warm() -> bool:
        d = office.json("status", "vm1")["disks"][0]
        cov = {r["host"]: r for r in d["replicas"]}
        return d["replicate"] is not None and "home-pc" in cov and cov["home-pc"]["lag_blocks"] == 0

    qemu_io(office.uri("vm1"), "write -P 0x31 0 1M", "flush")
    wait_until(warm, "home-pc to hold the first writes")
    qemu_io(office.uri("vm1"), "write -P 0x32 2M 1M", "flush")
    wait_until(lambda: warm() and coverage(office, "vm1")["home-pc"] == 1.0, "home-pc to follow new writes")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", office.uri("vm1"), home.uri("vm1"))
    assert "vm1" not in [d["name"] for d in car.json("disk", "list")]  # not named: no replica

    office.cli("replicate", "vm1", "--off", "home-pc")
    wait_until(lambda: home.json("status", "vm1")["disks"][0]["replicate"] is None, "the policy to end everywhere")
    qemu_io(office.uri("vm1"), "write -P 0x33 4M 1M", "flush")
    time.sleep(3 * CHECK_INTERVAL)  # three rounds in which a warm replica would have caught up
    assert coverage(office, "vm1")["home-pc"] < 1.0


def test_a_lying_peer_is_caught_and_dropped(three_hosts: list[Host], tmp_path: Path) -> None:
    office, home, car = three_hosts
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(16 * MiB))
    office.cli("disk", "import", "vm1", str(image))
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    sync(home, "vm1")
    home.stop()
    home.start(liar=True)  # home-pc now flips a byte in every block it serves (tests/lying_peer.py)
    wait_until(lambda: visible(car, "vm1", holders=2), "car-pc to see both holders")
    res = sync(car, "vm1")
    assert res["error"] == ""
    liar = res["peers"]["home-pc"]
    assert liar["bad_blocks"] > 0 and liar["dropped"] and liar["bytes"] == 0, liar
    assert res["bytes_from"]["office-pc"] >= 16 * MiB
    run("qemu-img", "compare", "-f", "raw", image.as_posix(), car.uri("vm1"))
    assert car.json("verify", "vm1")["ok"]
    human = car.cli("sync", "vm1").stdout  # nothing left: the report is short and honest
    assert "0 blocks fetched" in human
