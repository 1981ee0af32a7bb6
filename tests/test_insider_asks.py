"""A joined member ("mallory") asks for what only an owner may decide, with the stock CLI or its own
certificate: to have a running VM moved to it, to redefine another host's VM, to be named a disk's owner;
and it spends what it shares with the others: a host's relayed ends, a relay's rate, other hosts' dials
(its host record may name any address), a punch's dial (an address that is loopback in disguise).

office-pc owns vm1 (home-pc holds a replica, car-pc none; the fixture of test_insiders). Each request is
refused, or each claim shown as a conflict and never followed, each share bounded, and the owner's
choices still work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from p2pvbd.replica_store import ReplicaStore
from p2pvbd.swarm import access, relay, trust
from p2pvbd.swarm.dial_backoff import FIRST_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS, DialBackoff
from p2pvbd.swarm.peer_transport import PeerError, open_peer
from p2pvbd.swarm.punch import public_address
from p2pvbd.wire.dht_records import key_digest
from p2pvbd.wire.dht_schema import MAX_CLOCK_AHEAD_SECONDS
from p2pvbd.wire.vm_definition import VmDefinition
from tests.daemons import Host, run
from tests.forge import IndexClient, forge_record
from tests.helpers import invite, wait_until
from tests.test_insiders import as_member, swarm  # noqa: F401 - the fixture

VM = "workvm"
# The mallory epoch of test 5: as if it had edited its own store's files.
FORGED_EPOCH = 50


def vm_info(host: Host, vm: str = VM) -> dict[str, object] | None:
    return next((v for v in host.json("vm", "list") if v["name"] == vm), None)


def logged(host: Host, text: str) -> int:
    return (host.home / "daemon.log").read_text().count(text)


def test_a_member_pulls_a_vm_only_where_its_owner_allows(swarm: tuple[list[Host], bytes]) -> None:  # noqa: F811
    """mallory asks office-pc, which runs workvm, to move it to mallory: with the stock CLI (refused on
    mallory before it asks) and with its own certificate (refused by office-pc, logged once). car-pc, once
    office-pc allows it, pulls the VM; then no host may, and office-pc is refused too."""
    (office, home, car, mallory), _ = swarm
    office.cli("disk", "create", "boot", "--size", "1M")
    office.cli("disk", "create", "data", "--size", "1M")
    # No bootable disk: SeaBIOS waits for one, which is all a move needs of a guest.
    office.cli("vm", "create", VM, "--disk", "boot", "--memory", "16M", "--accel", "tcg")
    office.cli("vm", "start", VM)
    wait_until(lambda: all((vm_info(h) or {}).get("disks") == ["boot"] for h in (home, car, mallory)),
               "every host to learn workvm")
    assert vm_info(office)["allow"] == [] and vm_info(office)["state"] == "running"  # type: ignore[index]

    res = mallory.cli("migrate", VM, "--to", "mallory", check=False)
    assert res.returncode != 0 and f"p2pvbd vm allow {VM} mallory" in res.stderr and "Traceback" not in res.stderr, \
        res.stderr
    ask = {"vm": VM, "to": "mallory", "mode": "sync", "max_downtime_ms": 300.0}
    for _ in range(3):  # what a changed daemon on mallory asks, as often as it likes
        got = as_member(mallory, office, "vm_move", ask)
        assert isinstance(got, PeerError) and got.code == access.ERR_FORBIDDEN and "may not pull" in got.message, got
    assert logged(office, f"refused vm_move of {VM} from mallory:") == 1, office.log_tail()
    # A plain disk: only its owner migrates it, whoever asks.
    res = mallory.cli("migrate", "data", "--to", "mallory", check=False)
    assert res.returncode != 0 and "does not own 'data'" in res.stderr, res.stderr
    assert (vm_info(office)["state"], vm_info(office)["host"]) == ("running", "office-pc")  # type: ignore[index]
    owners = {d["name"]: (d["owner"], d["epoch"]) for d in office.json("disk", "list")}
    assert owners["boot"] == owners["data"] == ("office-pc", 1), owners

    # Only the owner says who may pull; car-pc, allowed, pulls it.
    res = car.cli("vm", "allow", VM, "car-pc", check=False)
    assert res.returncode != 0 and "run this on office-pc" in res.stderr, res.stderr
    office.cli("vm", "allow", VM, "car-pc")
    assert "car-pc" in office.cli("vm", "list").stdout
    wait_until(lambda: (vm_info(car) or {}).get("allow") == ["car-pc"], "car-pc to learn it may pull workvm")
    assert isinstance(as_member(mallory, office, "vm_move", ask), PeerError)
    assert logged(office, f"refused vm_move of {VM} from mallory:") == 1
    summary = json.loads(car.cli("migrate", VM, "--to", "car-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["from"] == "office-pc", summary
    wait_until(lambda: (vm_info(car) or {}).get("state") == "running", "workvm to run on car-pc")
    assert {d["name"]: d["owner"] for d in car.json("disk", "list")}["boot"] == "car-pc"

    # The allow-list moved with the VM; its new owner withdraws it: office-pc may not pull it back.
    car.cli("vm", "allow", VM, "--none")
    wait_until(lambda: (vm_info(office) or {}).get("allow") == [], "office-pc to learn no host may pull workvm")
    res = office.cli("migrate", VM, "--to", "office-pc", check=False)
    assert res.returncode != 0 and "may be pulled only" in res.stderr, res.stderr
    assert vm_info(car)["state"] == "running"  # type: ignore[index]
    car.cli("vm", "stop", VM, "--timeout", "0")
    assert all(h.alive() for h in (office, home, car))


def test_definitions_and_status_follow_the_deeds_not_the_index(swarm: tuple[list[Host], bytes],  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """mallory makes its own disk named vm1, raises its store's epoch to 50 in its own files and defines
    its own workvm on it (16 MiB, 64 CPUs, init=/bin/sh). Its daemon publishes the owner record and the
    definition, as any member may under its own name. Every honest host keeps office-pc's definition,
    approved where it was, and `status` names office-pc as the owner, with mallory's claim as a conflict."""
    (office, home, car, mallory), base = swarm
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"not run by this test")
    office.cli("vm", "create", VM, "--disk", "vm1", "--memory", "64M", "--kernel", str(kernel),
               "--append", "console=ttyS0")
    wait_until(lambda: home.cli("vm", "approve", VM, check=False).returncode == 0, "home-pc to approve workvm")

    (tmp_path / "fake.raw").write_bytes(b"\x66" * len(base))
    mallory.cli("disk", "import", "vm1", str(tmp_path / "fake.raw"))
    mallory.stop()
    with ReplicaStore.open(mallory.home / "disks" / "vm1") as store:
        store.set_owner("mallory", FORGED_EPOCH)
    mallory.start()
    # --replace: mallory's book may have learned office-pc's workvm by now, and any member may say --replace
    mallory.cli("vm", "create", VM, "--disk", "vm1", "--memory", "16M", "--cpus", "64", "--kernel", str(kernel),
                "--append", "console=ttyS0 init=/bin/sh", "--replace")
    honest = (office, home, car)
    for h in honest:  # each saw mallory's definition in the index, and did not take it
        wait_until(lambda h=h: logged(h, "ignoring mallory's definition of the VM on vm1: its owner is office-pc"),
                   f"{h.name} to see mallory's definition")
    for h in honest:
        v = vm_info(h)
        assert v is not None and (v["memory"], v["cpus"], v["append"]) == (64 << 20, 1, "console=ttyS0"), v
    assert vm_info(home)["approved"] is True and vm_info(car)["approved"] is False  # type: ignore[index]

    for h in honest:
        d = h.json("status", "vm1")["disks"][0]
        assert (d["owner"], d["epoch"]) == ("office-pc", 1), (h.name, d)
        assert [(c["host"], c["epoch"]) for c in d["conflicts"]] == [("mallory", FORGED_EPOCH)], (h.name, d)
        coverage = {r["host"]: r["coverage"] for r in d["replicas"]}
        assert coverage["office-pc"] == coverage["home-pc"] == 1.0, (h.name, d)
    text = car.cli("status", "vm1").stdout
    assert f"conflict: mallory claims to own it at epoch {FORGED_EPOCH}" in text, text
    assert logged(home, "not following mallory as the owner of vm1") == 1
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "base.raw"), home.uri("vm1"))
    assert all(h.alive() for h in honest)


def test_a_definition_stamped_far_ahead_is_not_learned(swarm: tuple[list[Host], bytes],  # noqa: F811
                                                       tmp_path: Path) -> None:
    """A definition and a replication policy of office-pc's own (its key) stamped a day ahead, as a machine
    with a wrong clock would publish them, are refused: each would outrank every later change until then."""
    (office, home, car, mallory), _ = swarm
    office.cli("vm", "create", VM, "--disk", "vm1", "--memory", "64M")
    wait_until(lambda: vm_info(home) is not None, "home-pc to learn workvm")
    ahead = VmDefinition(VM, ("vm1",), 32 << 20, set_at=time.time() + 24 * 3600)
    assert ahead.too_far_ahead(time.time()) and not ahead.too_far_ahead(ahead.set_at - MAX_CLOCK_AHEAD_SECONDS)
    me = trust.load_identity(office.home)
    record = forge_record(me.key, "office-pc", "vm", "vm1", ahead.as_payload(), binding=me.binding)
    policy = forge_record(me.key, "office-pc", "policy", "vm1",
                          {"disk": "vm1", "hosts": ["home-pc"], "rate": -1, "set_at": ahead.set_at}, binding=me.binding)
    client = IndexClient(trust.load_identity(mallory.home))
    try:
        for h in (home, car):
            assert client.store(h.port, key_digest("vm", "vm1"), [record]) is True
            assert client.store(h.port, key_digest("policy", "vm1"), [policy]) is True
    finally:
        client.close()
    wait_until(lambda: logged(home, f"ignoring a definition of VM {VM} stamped"), "home-pc to see the definition")
    wait_until(lambda: logged(home, "ignoring office-pc's policy of vm1: stamped"), "home-pc to see the policy")
    office.cli("vm", "allow", VM, "home-pc")
    office.cli("replicate", "vm1", "--on", "car-pc")
    wait_until(lambda: (vm_info(home) or {}).get("allow") == ["home-pc"], "home-pc to learn the later change")
    assert vm_info(home)["memory"] == 64 << 20  # type: ignore[index]
    wait_until(lambda: (home.json("status", "vm1")["disks"][0]["replicate"] or {}).get("hosts") == ["car-pc"],
               "home-pc to learn office-pc's later policy")



def test_a_member_posing_as_a_relay_holds_a_bounded_share_of_an_ends_room(make_host: Callable[..., Host]) -> None:
    """mallory, as if it relayed pipes to home-pc, asks home-pc to accept 64 of them (the body's ``from``
    is any name it likes): home-pc takes MAX_ENDS_PER_RELAY of mallory's, and a pipe office-pc relays for
    car-pc is still accepted at once."""
    office = make_host("office-pc")
    home, car, mallory = (make_host(n, join=invite(office)) for n in ("home-pc", "car-pc", "mallory"))
    wait_until(lambda: {p["name"] for p in office.json("peers") if p["reachable"]} == {"home-pc", "car-pc", "mallory"},
               "office-pc to reach every member")
    identity = trust.load_identity(mallory.home)

    async def flood() -> list[dict[str, Any] | PeerError]:
        answers: list[dict[str, Any] | PeerError] = []
        async with open_peer("127.0.0.1", home.port, trust.client_ssl_context(identity)) as conn:
            for pipe in range(relay.MAX_PIPES):
                try:
                    answers.append(await conn.request("relay_accept", {"from": f"host{pipe}", "id": pipe + 1},
                                                      timeout=30))
                except PeerError as e:
                    answers.append(e)
        return answers

    answers = trio.run(flood)
    taken = [a for a in answers if isinstance(a, dict)]
    refused = [a for a in answers if isinstance(a, PeerError)]
    assert len(taken) == relay.MAX_ENDS_PER_RELAY < relay.MAX_PIPES, answers[:relay.MAX_ENDS_PER_RELAY + 1]
    assert all(e.code == "busy" and "mallory" in e.message for e in refused), refused[:1]
    res = as_member(car, office, "relay_open", {"to": "home-pc"})
    assert isinstance(res, dict) and isinstance(res["id"], int), res
    assert all(h.alive() for h in (office, home, car))


def test_a_members_relayed_chunks_take_turns_with_the_others() -> None:
    """mallory sends 32 chunks through the relay at once, car-pc one a moment later: car-pc's waits for a
    round of the senders' chunks, not mallory's whole backlog (trio's mock clock: no real time passes)."""
    relays = relay.Relays(SimpleNamespace(name="office-pc", config=SimpleNamespace(extra={"relay_rate": "1M"})))  # type: ignore[arg-type]
    done: list[str] = []

    async def main() -> None:
        async def send(who: str) -> None:
            await relays._pace(who, relay.CHUNK_BYTES)
            done.append(who)

        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(send, "mallory")
            await trio.sleep(0.01)
            nursery.start_soon(send, "car-pc")
    trio.run(main, clock=MockClock(autojump_threshold=0))
    assert len(done) == 33 and done.index("car-pc") <= 8, done
    assert relays._turns == {}  # nothing kept for senders gone


def test_a_punch_dials_no_loopback_in_any_form() -> None:
    for text in ("[::ffff:127.0.0.1]:22", "127.0.0.1:22", "[::1]:22", "[::127.0.0.1]:22", "[::ffff:0.0.0.0]:22",
                 "0.0.0.0:22", "[2002:7f00:1::1]:22", "[::ffff:169.254.0.1]:22", "255.255.255.255:22",
                 "224.0.0.1:22", "[fe80::1]:22", "[fec0::1]:22"):
        with pytest.raises(PeerError, match="not an address a NAT shows"):
            public_address(text)
    assert public_address("[::ffff:10.77.0.1]:4000") == ("10.77.0.1", 4000)  # mapped, judged as IPv4
    assert public_address("192.0.2.7:4000") == ("192.0.2.7", 4000)
    assert public_address("[2001:db8::7]:4000") == ("2001:db8::7", 4000)


def test_an_address_that_fails_is_dialled_ever_more_rarely() -> None:
    dials = DialBackoff(limit=4)
    now, waits = 1000.0, []
    for _ in range(8):
        assert dials.due("mallory", "192.0.2.1:7000", now)
        due = dials.failed("mallory", "192.0.2.1:7000", now)
        assert not dials.due("mallory", "192.0.2.1:7000", due - 1)
        waits.append(due - now)
        now = due
    assert waits[:4] == [FIRST_BACKOFF_SECONDS * 2 ** i for i in range(4)] and max(waits) == MAX_BACKOFF_SECONDS
    # an address that answered as another host waits the longest at once; one that reached its peer none
    assert dials.failed("mallory", "127.0.0.1:22", 0.0, wrong_host=True) == MAX_BACKOFF_SECONDS
    dials.reached("mallory", "192.0.2.1:7000")
    assert dials.due("mallory", "192.0.2.1:7000", now)
    for i in range(10):  # bounded: the oldest are forgotten (and dialled as new)
        dials.failed("mallory", f"192.0.2.{i}:1", 0.0)
    assert len(dials._failed) == 4
