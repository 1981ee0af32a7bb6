"""A host behind NAT: nobody can connect to it, yet every operation reaches it over the links it opens.

office-pc and home-pc sit on one network; car-pc behind its own NAT router (nftables masquerade), as on a
mobile network: it connects out to both, neither can connect in (its advertised address is private). It
holds a link open to every host it reaches, and the others send their requests back over those links.
With a guest writing throughout: office-pc migrates vm1 to car-pc, home-pc syncs from car-pc (a NATed
holder), and car-pc migrates vm1 back.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pvbd.migration.pull import MIN_RATE_SAMPLE_BYTES
from tests.daemons import PEER_PORT_IN_NAMESPACE, Host, run
from tests.helpers import sync, visible, wait_until
from tests.netns import Network, require_nft, require_root
from tests.test_migrate import BLOCK, BLOCKS, Guest, model_image
from tests.test_vm_move import GUEST_WAIT, MovingGuest, acked, approve, define_vm, move, vm_state

pytestmark = pytest.mark.root

CAR_LAN = "10.88.2.0/24"  # car-pc's side of its NAT router
OFFICE_LAN = "10.88.1.0/24"
SEED = 1301  # the disk's random contents, so a failure can be replayed
# car-pc opens its standing links within a publish round (swarm/node.PUBLISH_INTERVAL, 15 s); this
# bounds a broken daemon, not a speed.
LINK_SECONDS = 120.0
# A relayed link is replaced once the peer's new address is published (a publish round) and the last
# failed attempt on its old ones is a minute old (swarm/node.DIRECT_RETRY_SECONDS): a broken daemon's bound.
DIRECT_AGAIN_SECONDS = 240.0
# Records the moving guest writes before its first move (30-50 a second under TCG: a few seconds); it
# goes on writing through the moves.
RECORDS_BEFORE = 200


@pytest.fixture
def natted(tmp_path: Path) -> Iterator[tuple[Network, Host, Host, Host]]:
    require_root()
    require_nft()
    with Network() as net:
        made: list[Host] = []
        try:
            ns = net.add_host("office-pc")
            office = Host(tmp_path / "office-pc", "office-pc", prefix=ns.exec_prefix(), address=ns.address).start()
            made.append(office)
            ns = net.add_host("home-pc")
            made.append(Host(tmp_path / "home-pc", "home-pc", join=office.cli("invite").stdout.strip(),
                             prefix=ns.exec_prefix(), address=ns.address).start())
            ns = net.add_nat_host("car-pc", CAR_LAN)
            made.append(Host(tmp_path / "car-pc", "car-pc", "--listen", f"0.0.0.0:{PEER_PORT_IN_NAMESPACE}",
                             join=office.cli("invite").stdout.strip(), prefix=ns.exec_prefix(),
                             address=ns.address).start())
            yield net, *made  # type: ignore[misc]
        finally:
            for h in made:
                if h.alive():
                    h.stop()


def path_to(host: Host, peer: str) -> str | None:
    info = next((p for p in host.json("peers") if p["name"] == peer), None)
    return info["path"] if info is not None and info["reachable"] else None


def reach_of(host: Host, peer: str) -> tuple[str, list[str]] | None:
    """How ``peer``'s host record, as ``host`` reads it, says it can be reached."""
    info = next((p for p in host.json("peers") if p["name"] == peer), None)
    return (info["reach"], info["seen_as"]) if info is not None else None


def test_a_host_behind_nat_is_reached_over_its_own_links(natted: tuple[Network, Host, Host, Host],
                                                          tmp_path: Path) -> None:
    net, office, home, car = natted
    base = random.Random(SEED).randbytes(BLOCKS * BLOCK)  # incompressible: what travels is what the rate measures
    (tmp_path / "base.raw").write_bytes(base)
    office.cli("disk", "import", "vm1", str(tmp_path / "base.raw"))
    wait_until(lambda: visible(car, "vm1") and visible(home, "vm1"), "car-pc and home-pc to see vm1")
    # nobody can connect to car-pc: its address is private, behind the router
    blocked = net["office-pc"].run("python3", "-c", "import socket, sys; socket.create_connection("
                                   f"(sys.argv[1], {PEER_PORT_IN_NAMESPACE}), timeout=3)", net["car-pc"].address,
                                   capture_output=True, text=True)
    assert blocked.returncode != 0, blocked
    for h in (office, home):
        wait_until(lambda h=h: path_to(h, "car-pc") == "inbound", f"{h.name} to reach car-pc over car-pc's link",
                   timeout=LINK_SECONDS)
    assert path_to(car, "office-pc") == "outbound"

    guest = Guest(office.uri("vm1"), tmp_path)
    summary = json.loads(office.cli("migrate", "vm1", "--to", "car-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["epoch"] == 2, summary
    wait_until(lambda: visible(home, "vm1", holders=2), "home-pc to see car-pc hold vm1")
    pulled = sync(home, "vm1", "--from", "car-pc")  # all of it over car-pc's link: the rate is that path's
    assert pulled["error"] == "" and pulled["bytes_from"]["car-pc"] >= MIN_RATE_SAMPLE_BYTES, pulled
    car_info = next(p for p in home.json("peers") if p["name"] == "car-pc")
    assert car_info["path"] == "inbound" and car_info["pull_rate"] > 0, car_info
    summary = json.loads(car.cli("migrate", "vm1", "--to", "office-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["epoch"] == 3, summary
    report = guest.finish()
    assert report["errors"] == [] and report["reads_ok"], report
    model = model_image(tmp_path / "model.raw", base, report["acked"])  # type: ignore[arg-type]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), office.uri("vm1"))


def both_natted(tmp_path: Path, ports: str) -> Iterator[tuple[Network, Host, Host, Host]]:
    """home-pc reachable (it founded the swarm: joiners must reach the inviter), office-pc and car-pc each
    behind their own NAT (``ports``: see ``Network.add_nat_host``): neither can connect to the other,
    both reach home-pc."""
    require_root()
    require_nft()
    with Network() as net:
        made: list[Host] = []
        try:
            ns = net.add_host("home-pc")
            home = Host(tmp_path / "home-pc", "home-pc", prefix=ns.exec_prefix(), address=ns.address).start()
            made.append(home)
            for name, lan in (("office-pc", OFFICE_LAN), ("car-pc", CAR_LAN)):
                ns = net.add_nat_host(name, lan, ports=ports)
                made.append(Host(tmp_path / name, name, "--listen", f"0.0.0.0:{PEER_PORT_IN_NAMESPACE}",
                                 join=home.cli("invite").stdout.strip(), prefix=ns.exec_prefix(),
                                 address=ns.address).start())
            yield net, *made  # type: ignore[misc]
        finally:
            for h in made:
                if h.alive():
                    h.stop()


@pytest.fixture
def punchable(tmp_path: Path) -> Iterator[tuple[Network, Host, Host, Host]]:
    yield from both_natted(tmp_path, "kept")


@pytest.fixture
def symmetric(tmp_path: Path) -> Iterator[tuple[Network, Host, Host, Host]]:
    yield from both_natted(tmp_path, "random")


def move_there_and_back(office: Host, home: Host, car: Host, tmp_path: Path) -> None:
    """With a guest writing at office-pc throughout: vm1 moves office-pc -> car-pc, home-pc syncs (from
    car-pc among others), vm1 moves back; every acknowledged write is there."""
    base = random.Random(SEED).randbytes(BLOCKS * BLOCK)
    (tmp_path / "base.raw").write_bytes(base)
    guest = Guest(office.uri("vm1"), tmp_path)
    summary = json.loads(office.cli("migrate", "vm1", "--to", "car-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["epoch"] == 2, summary
    wait_until(lambda: visible(home, "vm1", holders=2), "home-pc to see car-pc hold vm1")
    pulled = sync(home, "vm1")
    assert pulled["error"] == "" and pulled["bytes_from"].get("car-pc", 0) > 0, pulled
    summary = json.loads(car.cli("migrate", "vm1", "--to", "office-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["epoch"] == 3, summary
    report = guest.finish()
    assert report["errors"] == [] and report["reads_ok"], report
    model = model_image(tmp_path / "model.raw", base, report["acked"])  # type: ignore[arg-type]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(model), office.uri("vm1"))


def import_vm1(office: Host, others: tuple[Host, ...], tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(random.Random(SEED).randbytes(BLOCKS * BLOCK))  # incompressible
    office.cli("disk", "import", "vm1", str(tmp_path / "base.raw"))
    wait_until(lambda: all(visible(h, "vm1") for h in others), "every host to see vm1")


def test_two_hosts_behind_nat_punch_a_direct_link(punchable: tuple[Network, Host, Host, Host],
                                                  tmp_path: Path) -> None:
    """office-pc and car-pc, each behind a NAT that keeps ports and drops what arrives unasked, first
    talk through home-pc, then punch a direct link through both NATs (coordinated over the relayed
    one), which every later request uses: the relay carries nothing more."""
    net, home, office, car = punchable
    import_vm1(office, (home, car), tmp_path)
    wait_until(lambda: path_to(home, "car-pc") == "inbound" and path_to(home, "office-pc") == "inbound",
               "home-pc to reach both over their links", timeout=LINK_SECONDS)
    assert path_to(office, "car-pc") in ("relayed via home-pc", "punched")  # the first request: relayed
    wait_until(lambda: path_to(office, "car-pc") == "punched", "office-pc to punch a link to car-pc",
               timeout=LINK_SECONDS)
    assert path_to(car, "office-pc") == "punched"
    wait_until(lambda: reach_of(car, "office-pc") == ("nat", [net["office-pc-nat"].address]),
               "office-pc's host record to say it is behind its NAT", timeout=LINK_SECONDS)
    wait_until(lambda: reach_of(office, "home-pc") == ("direct", []), "home-pc's record to say it is reachable",
               timeout=LINK_SECONDS)
    relayed_before = home.log_tail(100_000).count("relaying ")

    move_there_and_back(office, home, car, tmp_path)
    assert home.log_tail(100_000).count("relaying ") == relayed_before  # no new pipe through home-pc
    assert path_to(office, "car-pc") == "punched"


def test_two_hosts_behind_symmetric_nat_talk_through_a_relay(symmetric: tuple[Network, Host, Host, Host],
                                                             tmp_path: Path) -> None:
    """office-pc and car-pc behind NATs that pick a new port per connection: punching fails, so they
    reach each other only through home-pc, which carries their end-to-end TLS session (it sees
    ciphertext only: tests/test_peer_transport.py checks what a carrier can read and alter)."""
    _, home, office, car = symmetric
    import_vm1(office, (home, car), tmp_path)
    wait_until(lambda: path_to(home, "car-pc") == "inbound" and path_to(home, "office-pc") == "inbound",
               "home-pc to reach both over their links", timeout=LINK_SECONDS)
    assert path_to(office, "car-pc") == "relayed via home-pc", office.json("peers")
    wait_until(lambda: any("punching through NAT failed" in h.log_tail(100_000) for h in (office, car)),
               "a punch between them to fail", timeout=LINK_SECONDS)

    move_there_and_back(office, home, car, tmp_path)
    assert "relaying office-pc <-> car-pc" in home.log_tail(100_000) or \
        "relaying car-pc <-> office-pc" in home.log_tail(100_000)
    assert path_to(office, "car-pc") == "relayed via home-pc"


def test_a_relayed_link_gives_way_to_a_direct_one_when_a_host_becomes_reachable(
        symmetric: tuple[Network, Host, Host, Host], tmp_path: Path) -> None:
    """office-pc and car-pc talk through home-pc until the host the relayed link was opened to is also
    plugged into the network home-pc is on (the car parked at the office), its NAT link still up and the
    relayed link with it: the other host notices the new address, connects to it directly and closes
    the relayed link. The disk then moves there and back with nothing relayed."""
    net, home, office, car = symmetric
    import_vm1(office, (home, car), tmp_path)
    wait_until(lambda: path_to(home, "car-pc") == "inbound", "home-pc to reach car-pc over its link",
               timeout=LINK_SECONDS)
    assert path_to(office, "car-pc") == "relayed via home-pc", office.json("peers")
    opened = re.search(r"relaying (\S+) <-> (\S+) \(pipe", home.log_tail(100_000))
    assert opened is not None, home.log_tail(2000)
    hosts = {h.name: h for h in (office, car)}
    a, b = hosts[opened[1]], hosts[opened[2]]  # a opened the relayed link to b

    new = net.plug_beside_nat(b.name)
    wait_until(lambda: path_to(a, b.name) == "outbound", f"{a.name} to connect to {b.name} directly",
               timeout=DIRECT_AGAIN_SECONDS)
    log = (a.home / "daemon.log").read_text()
    assert f"reached {b.name} directly; the link through home-pc closes" in log
    wait_until(lambda: path_to(b, a.name) == "inbound", f"{b.name} to answer over {a.name}'s link",
               timeout=LINK_SECONDS)
    b_info = next(p for p in a.json("peers") if p["name"] == b.name)
    assert f"{new}:{PEER_PORT_IN_NAMESPACE}" in b_info["addresses"], b_info
    relayed_before = home.log_tail(100_000).count("relaying ")
    move_there_and_back(office, home, car, tmp_path)
    assert home.log_tail(100_000).count("relaying ") == relayed_before  # no new pipe through home-pc


def test_a_running_vm_moves_between_hosts_behind_nat(symmetric: tuple[Network, Host, Host, Host],
                                                     guest_files: tuple[Path, Path]) -> None:
    """A real QEMU guest moves, memory and disk, from office-pc to car-pc and back, both behind NATs that
    defeat punching: every byte of the disk and of the RAM stream goes through home-pc's relay, inside the
    two ends' own TLS. The guest writes and checks its memory throughout (memory copies that take
    seconds, as through a relay, once crashed it: docs/DESIGN.md, "Guests under TCG")."""
    _, home, office, car = symmetric
    kernel, initrd = guest_files
    guest = MovingGuest((office, car), kernel, initrd, office.home)
    define_vm(office, kernel, initrd)
    approve(car)
    office.cli("vm", "start", "vm1")
    wait_until(lambda: acked(office) >= RECORDS_BEFORE, "the guest to write its records at office-pc",
               timeout=GUEST_WAIT)
    wait_until(lambda: path_to(office, "car-pc") == "relayed via home-pc", "office-pc to reach car-pc relayed",
               timeout=LINK_SECONDS)

    report = move(office, "car-pc", "async")
    assert report["ram_bytes"] > 0 and vm_state(office)["state"] != "running", report
    guest.writes_on(car, acked(office) + 30, "the guest to go on writing at car-pc")
    report = move(car, "office-pc", "sync")
    assert vm_state(car)["state"] != "running", report
    guest.writes_on(office, acked(car) + 30, "the guest to go on writing at office-pc again")
    assert path_to(office, "car-pc") == "relayed via home-pc" and "relaying " in home.log_tail(100_000)
    guest.stop_and_verify(office)
