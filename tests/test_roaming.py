"""Hosts that change network: a link to a host's old address is noticed dead and replaced.

office-pc, home-pc and car-pc sit in network namespaces; car-pc listens on every address it has, as a
laptop would. office-pc holds a connection to car-pc (``peers`` opened it) when car-pc moves to another
address: packets to the old one go nowhere. Once car-pc's new address is in the index (home-pc's
``peers`` shows it; office-pc is left alone), ``migrate --to car-pc`` on office-pc must notice its link
is dead and connect to the new address instead of waiting out the dead link, with a guest writing
throughout, and the disk must move back the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import PEER_PORT_IN_NAMESPACE, Host, run
from tests.helpers import visible, wait_until
from tests.netns import Network, require_root
from tests.test_migrate import BLOCK, BLOCKS, Guest, model_image

pytestmark = pytest.mark.root

PORT = PEER_PORT_IN_NAMESPACE
# car-pc's new address reaches the index within a publish round (swarm/node.PUBLISH_INTERVAL, 15 s);
# this bounds a broken daemon, not a speed.
INDEX_SECONDS = 120.0


@pytest.fixture
def roaming(tmp_path: Path) -> Iterator[tuple[Network, Host, Host, Host]]:
    require_root()
    with Network() as net:
        made: list[Host] = []
        try:
            office_ns = net.add_host("office-pc")
            office = Host(tmp_path / "office-pc", "office-pc", prefix=office_ns.exec_prefix(),
                          address=office_ns.address).start()
            made.append(office)
            home_ns = net.add_host("home-pc")
            made.append(Host(tmp_path / "home-pc", "home-pc", join=office.cli("invite").stdout.strip(),
                             prefix=home_ns.exec_prefix(), address=home_ns.address).start())
            car_ns = net.add_host("car-pc")
            car = Host(tmp_path / "car-pc", "car-pc", "--listen", f"0.0.0.0:{PORT}",
                       join=office.cli("invite").stdout.strip(), prefix=car_ns.exec_prefix(),
                       address=car_ns.address).start()
            made.append(car)
            yield net, office, made[1], car
        finally:
            for h in made:
                if h.alive():
                    h.stop()


def addresses(host: Host, of: str) -> list[str]:
    return next((p["addresses"] for p in host.json("peers") if p["name"] == of), [])


def test_a_host_that_changed_address_is_reached_at_the_new_one(roaming: tuple[Network, Host, Host, Host],
                                                                 tmp_path: Path) -> None:
    net, office, home, car = roaming
    base = bytes(range(256)) * (BLOCKS * BLOCK // 256)
    (tmp_path / "base.raw").write_bytes(base)
    office.cli("disk", "import", "vm1", str(tmp_path / "base.raw"))
    wait_until(lambda: visible(car, "vm1"), "car-pc to see vm1")
    old = net["car-pc"].address
    wait_until(lambda: any(p["name"] == "car-pc" and p["reachable"] for p in office.json("peers")),
               "office-pc to hold a link to car-pc")

    new = net.readdress("car-pc")
    wait_until(lambda: addresses(home, "car-pc") == [f"{new}:{PORT}"], "car-pc's new address to reach the index",
               timeout=INDEX_SECONDS)
    assert old != new

    guest = Guest(office.uri("vm1"), tmp_path)
    summary = json.loads(office.cli("migrate", "vm1", "--to", "car-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["epoch"] == 2, summary
    assert "is dead; connecting anew" in office.log_tail(2000)
    summary = json.loads(car.cli("migrate", "vm1", "--to", "office-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["epoch"] == 3, summary
    report = guest.finish()
    assert report["errors"] == [] and report["reads_ok"], report
    model = model_image(tmp_path / "model.raw", base, report["acked"])  # type: ignore[arg-type]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), office.uri("vm1"))
