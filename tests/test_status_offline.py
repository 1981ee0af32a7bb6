"""`status` with the owner offline: answered from what is known, the owner marked unreachable, the
replicas still shown as current as they were (not as the blocks they hold)."""

from __future__ import annotations

import json
from typing import Any

from tests.daemons import Host
from tests.helpers import qemu_io, sync, visible, wait_until

BLOCKS = 1024  # a 64 MiB disk of 64 KiB blocks, of which the owner writes 32: mostly zero, as a new disk is


def disk_status(host: Host) -> dict[str, Any]:
    return host.json("status", "d1")["disks"][0]


def test_status_with_the_owner_down(three_hosts: list[Host]) -> None:
    office, home, car = three_hosts
    home.cli("disk", "create", "d1", "--size", "64M")
    qemu_io(home.uri("d1"), "write -P 5 0 2M")
    wait_until(lambda: visible(car, "d1"), "car-pc to see d1")
    sync(car, "d1")  # car-pc holds every block at the owner's version: 32 with data, the rest zero
    wait_until(lambda: visible(office, "d1", holders=2), "office-pc to see both holders")
    up = disk_status(office)
    assert up["owner_reachable"] and up["owner_error"] == ""
    assert {r["host"]: r["coverage"] for r in up["replicas"]} == {"car-pc": 1.0, "home-pc": 1.0}

    home.stop()
    text = office.cli("status")
    assert text.returncode == 0
    assert "home-pc (unreachable)" in text.stdout
    assert "d1: owner home-pc unreachable (" in text.stdout
    car_row = next(line for line in text.stdout.splitlines() if "car-pc" in line)
    assert "100.0%" in car_row and f"{BLOCKS}/{BLOCKS}" in car_row and "last known" not in car_row, text.stdout
    down = json.loads(office.cli("status", "--json").stdout)["disks"][0]
    assert down["owner"] == "home-pc" and down["owner_reachable"] is False and down["owner_error"]
    replicas = {r["host"]: r for r in down["replicas"]}
    assert replicas["car-pc"]["coverage"] == 1.0 and "stale" not in replicas["car-pc"], replicas
    assert replicas["car-pc"]["current_blocks"] == BLOCKS and replicas["car-pc"]["lag_blocks"] == 0
    # car-pc never asked for a status while home-pc was up: it knows its own replica completed a pull
    # from home-pc, and says so (as last known), not the 32 blocks of data it holds
    from_car = disk_status(car)
    assert from_car["owner_reachable"] is False
    mine = next(r for r in from_car["replicas"] if r["host"] == "car-pc")
    assert mine["coverage"] == 1.0 and mine["current_blocks"] == BLOCKS, mine

    home.start()
    wait_until(lambda: disk_status(office)["owner_reachable"], "office-pc to reach home-pc again")
    back = disk_status(office)
    assert back["owner_error"] == "" and all(r["coverage"] == 1.0 and "stale" not in r
                                             for r in back["replicas"])
