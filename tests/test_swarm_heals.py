"""A swarm that heals: hosts find each other again after a restart, a new disk is waited for, and what
status, peers and jobs report is what happened."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable

from tests.daemons import Host
from tests.helpers import invite, sync, visible, wait_until

# A restarted founder rejoins through the peers it remembers within a couple of index rounds; without
# them it waited for its peers' hourly table refresh. This bounds a broken test, it is not a speed check.
REJOIN_SECONDS = 30.0


def reachable(host: Host, peer: str) -> bool:
    return any(p["name"] == peer and p["reachable"] for p in host.json("peers"))


def test_a_restarted_founder_finds_its_peers_again(make_host: Callable[..., Host]) -> None:
    office = make_host("office-pc")
    home = make_host("home-pc", join=invite(office))
    wait_until(lambda: reachable(office, "home-pc"), "office-pc to reach home-pc")
    book = office.home / "peers.json"
    wait_until(lambda: book.exists() and "home-pc" in json.loads(book.read_text())["hosts"],
               "office-pc to remember where home-pc is")
    assert office.json("peers")[0]["last_seen_ago_s"] is not None
    office.stop()
    assert office.cli("peers", check=False).returncode == 1  # down
    office.start()
    # The founder has nobody in its config to bootstrap from: only what it remembered.
    assert tomllib.loads((office.home / "config.toml").read_text())["bootstrap"] == []
    joined = [line for line in (office.home / "daemon.log").read_text().splitlines() if "joining the index" in line]
    assert joined[0].endswith("nobody") and f"127.0.0.1:{home.port}" in joined[-1], joined
    wait_until(lambda: reachable(office, "home-pc"), "the restarted founder to reach home-pc", REJOIN_SECONDS)
    office.cli("disk", "create", "vm1", "--size", "1M")
    wait_until(lambda: visible(home, "vm1"), "home-pc to see the founder's new disk", REJOIN_SECONDS)


def test_sync_finds_a_disk_created_a_moment_ago_and_refuses_an_unknown_one(make_host: Callable[..., Host]) -> None:
    office = make_host("office-pc")
    home = make_host("home-pc", join=invite(office))
    wait_until(lambda: reachable(home, "office-pc"), "home-pc to reach office-pc")
    # The sync starts as soon as the disk exists on another host, before its catalog record may have
    # spread; it waits that long for the index, then pulls.
    office.cli("disk", "create", "vm1", "--size", "1M")
    res = home.cli("sync", "vm1", "--json", check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["error"] == ""
    # A name no host has is refused at once, not after the wait for an owner.
    res = home.cli("sync", "nope", check=False)
    assert res.returncode == 1 and "no disk named 'nope' is known in this swarm" in res.stderr
    assert [j["disk"] for j in home.json("jobs")] == ["vm1"]


def test_peers_last_seen_is_the_last_contact(make_host: Callable[..., Host]) -> None:
    office = make_host("office-pc")
    home = make_host("home-pc", join=invite(office))
    wait_until(lambda: reachable(office, "home-pc"), "office-pc to reach home-pc")
    home.stop()  # before car-pc joins: the index still has home-pc's records, car-pc never heard it
    car = make_host("car-pc", join=invite(office))
    wait_until(lambda: reachable(office, "car-pc"), "office-pc to reach car-pc")

    def listed() -> dict[str, dict[str, object]] | None:
        view = {p["name"]: p for p in car.json("peers")}
        return view if "home-pc" in view else None

    view = wait_until(listed, "car-pc to list home-pc")
    assert not view["home-pc"]["reachable"]
    assert view["home-pc"]["last_seen"] is None and view["home-pc"]["last_seen_ago_s"] is None
    assert view["office-pc"]["reachable"] and 0 <= view["office-pc"]["last_seen_ago_s"] < 600
    assert "never" in next(line for line in car.cli("peers").stdout.splitlines() if "home-pc" in line)


def test_status_table_shows_policy_and_lag(make_host: Callable[..., Host]) -> None:
    office = make_host("office-pc")
    home = make_host("home-pc", join=invite(office))
    office.cli("disk", "create", "vm1", "--size", "1M")
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    assert sync(home, "vm1")["error"] == ""
    office.cli("replicate", "vm1", "--on", "home-pc", "--rate", "10mbit")

    def with_policy() -> str | None:
        table = office.cli("status", "vm1").stdout
        return table if "yes" in table else None

    table = wait_until(with_policy, "the policy in the status table")
    assert "lag" in table and "warm" in table and "owner upload for warm replicas at most" in table
    home_row = next(line for line in table.splitlines() if "home-pc" in line)
    assert "yes" in home_row and "0 blocks" in home_row
