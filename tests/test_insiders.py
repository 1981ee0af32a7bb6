"""A joined member with its own valid certificate ("mallory") tries every peer op it must not call.

office-pc owns vm1 and runs a guest on it the whole time, home-pc holds a replica, car-pc none. mallory
talks to their peer ports with its own certificate, as any member can, and asks for what only the
disk's owner, the source of its migration or the host that handed it over may ask. Each request is
refused with ``forbidden`` (or ``too_large``), logged once however often it is repeated, and changes
nothing: the daemons live on, the guest keeps writing, ownership and data stay as they were. Then the
legitimate moves (office-pc -> car-pc -> home-pc, whose replica's record of the owner is one move
behind) still work, with the guest's connection at office-pc relayed along them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from p2pvbd.migrate import SHIP_BATCH_BYTES
from p2pvbd.store.version_map import MIN_BLOCK_SIZE
from p2pvbd.swarm import access, deeds, relay, trust
from p2pvbd.swarm.peer_transport import PeerError, open_peer
from p2pvbd.sync_planner import MAX_REQUEST_BYTES
from p2pvbd.wire.dht_records import key_digest
from p2pvbd.wire.peer_wire import ERR_CONNECTION, MAX_BLOCK_ENTRIES, MIN_BLOCK_BYTES
from tests.daemons import Host, run
from tests.forge import IndexClient, forge_record
from tests.helpers import invite, qemu_io, sync, visible, wait_until
from tests.test_migrate import BLOCK, Guest, model_image

BLOCKS = 256  # a 16 MiB disk of 64 KiB blocks
GUEST_BLOCKS = 200  # the guest writes blocks 0..199; mallory aims at the rest, which keep their base bytes
TARGET = 250  # the block mallory tries to overwrite
BASE_FILL = 0x11  # the base bytes of the blocks the guest leaves alone
# One request of mallory's; a bound on a broken daemon, not a speed expectation.
REQUEST_SECONDS = 60.0


def as_member(member: Host, victim: Host, op: str, body: dict[str, Any]) -> dict[str, Any] | PeerError:
    """One request to ``victim``'s peer port with ``member``'s own certificate: its reply, or the error."""
    identity = trust.load_identity(member.home)

    async def ask() -> dict[str, Any]:
        async with open_peer("127.0.0.1", victim.port, trust.client_ssl_context(identity)) as conn:
            return await conn.request(op, body, timeout=REQUEST_SECONDS)
    try:
        return trio.run(ask)
    except PeerError as e:
        return e


def refusals(victim: Host, op: str, disk: str = "vm1", peer: str = "mallory") -> int:
    return (victim.home / "daemon.log").read_text().count(f"refused {op} of {disk} from {peer}:")


def refused(member: Host, victim: Host, op: str, body: dict[str, Any], code: str = access.ERR_FORBIDDEN,
            says: str = "mallory") -> str:
    """Send ``op`` twice; both must be refused with ``code`` and a message naming ``says``, logged once."""
    messages = []
    for _ in range(2):
        res = as_member(member, victim, op, body)
        assert isinstance(res, PeerError), f"{victim.name} took {op} from {member.name}: {res}"
        assert res.code == code and says in res.message, res
        messages.append(res.message)
    assert refusals(victim, op) == 1, victim.log_tail()
    return messages[0]


def owner_everywhere(hosts: list[Host], owner: str, epoch: int) -> bool:
    seen = {h.name: (d["owner"], d["epoch"]) for h in hosts for d in h.json("status", "vm1")["disks"]}
    return all(v == (owner, epoch) for v in seen.values())


def mode(host: Host, disk: str = "vm1") -> str | None:
    return next((d["mode"] for d in host.json("disk", "list") if d["name"] == disk), None)


@pytest.fixture
def swarm(make_host: Callable[..., Host], tmp_path: Path) -> tuple[list[Host], bytes]:
    """office-pc owns vm1, home-pc holds a replica of it, car-pc has none, mallory is a joined member."""
    office = make_host("office-pc")
    home, car, mallory = (make_host(n, join=invite(office)) for n in ("home-pc", "car-pc", "mallory"))
    base = bytes(range(256)) * (GUEST_BLOCKS * BLOCK // 256) + bytes([BASE_FILL]) * ((BLOCKS - GUEST_BLOCKS) * BLOCK)
    (tmp_path / "base.raw").write_bytes(base)
    office.cli("disk", "import", "vm1", str(tmp_path / "base.raw"))
    wait_until(lambda: visible(home, "vm1"), "home-pc to see vm1")
    assert sync(home, "vm1")["error"] == ""
    wait_until(lambda: all(visible(h, "vm1", holders=2) for h in (car, mallory)), "every host to see vm1's holders")
    return [office, home, car, mallory], base


def test_a_member_cannot_take_a_disk_or_write_into_it(swarm: tuple[list[Host], bytes], tmp_path: Path) -> None:
    (office, home, car, mallory), base = swarm
    honest = [office, home, car]
    guest = Guest(office.uri("vm1"), tmp_path, 1, "--blocks", str(GUEST_BLOCKS))  # writes all along
    at = TARGET * BLOCK

    def unharmed() -> None:
        assert all(h.alive() for h in honest), [h.log_tail() for h in honest if not h.alive()]
        assert guest.proc.poll() is None, "the guest stopped"
        assert owner_everywhere(honest, "office-pc", 1)
        assert (mode(office), mode(home), mode(car)) == ("primary", "standby", None)
        qemu_io(office.uri("vm1"), f"read -P {BASE_FILL} {at} 64k", f"write -P 0x22 {at + BLOCK} 4k",
                f"read -P 0x22 {at + BLOCK} 4k")  # another guest reads and writes too
        qemu_io(home.uri("vm1"), f"read -P {BASE_FILL} {at} 64k", read_only=True)

    # Guest I/O into office-pc's disk, as if mallory had handed it over.
    write = {"disk": "vm1", "op": "write", "offset": at, "data": b"\xee" * 4096, "fua": True}
    assert "did not hand vm1 over" in refused(mallory, office, "guest_io", write)
    unharmed()

    # A migration of vm1 to its owner, and to a replica, with every proof of ownership mallory can make:
    # office-pc's real chain (any member may read it), that chain with a hand-over to mallory that
    # mallory signed itself, and a vm1 history of mallory's own making.
    real = as_member(mallory, office, "deeds", {"disk": "vm1"})
    assert isinstance(real, dict), real
    me = trust.load_identity(mallory.home)
    head = deeds.parse(real["links"][-1])
    handed = [*real["links"], deeds.sign(deeds.HAND, "vm1", 7, "mallory", head.digest, "mallory", me.key, me.binding)]
    created = deeds.sign(deeds.CREATE, "vm1", 1, "mallory", b"", "mallory", me.key, me.binding)
    invented = [created, deeds.sign(deeds.HAND, "vm1", 7, "mallory", deeds.parse(created).digest, "mallory",
                                    me.key, me.binding)]
    prepare = {"disk": "vm1", "epoch": 1, "size": BLOCKS * BLOCK, "block_size": BLOCK, "mode": "sync",
               "deeds": real["links"]}
    assert "office-pc owns it" in refused(mallory, office, "migrate_prepare", prepare | {"deeds": invented})
    assert "its deeds end at office-pc, epoch 1" in refused(mallory, home, "migrate_prepare", prepare)
    for forged, says in ((handed, "not by office-pc"), (invented, "another history"), ([], "1 to")):
        res = as_member(mallory, home, "migrate_prepare", prepare | {"epoch": 7, "deeds": forged})
        assert isinstance(res, PeerError) and res.code == access.ERR_FORBIDDEN and says in res.message, res
    assert refusals(home, "migrate_prepare") == 1
    unharmed()

    # Commits: without a digest the request is malformed; with one, mallory prepared nothing to commit.
    res = as_member(mallory, home, "migrate_commit", {"disk": "vm1", "epoch": 2, "counter": 1 << 40})
    assert isinstance(res, PeerError) and res.code == "bad_request" and "map_digest" in res.message, res
    commit = {"disk": "vm1", "epoch": 2, "counter": 1 << 40, "map_digest": bytes(32), "deed": handed[-1]}
    assert "not the source of a migration" in refused(mallory, home, "migrate_commit", commit)
    assert "not the source of a migration" in refused(mallory, office, "migrate_commit", commit)
    # Blocks pushed without a prepare; a migration's status, pull and abort asked by a stranger.
    block = [TARGET, 1 << 40, bytes(16), b"\xee" * BLOCK, 0]
    refused(mallory, home, "put_blocks", {"disk": "vm1", "blocks": [block]})
    refused(mallory, home, "migrate_pull", {"disk": "vm1"})
    refused(mallory, home, "migrate_status", {"disk": "vm1", "epoch": 1})
    refused(mallory, home, "migrate_abort", {"disk": "vm1"})
    unharmed()

    # A read of a million stale entries is not even decoded (a get_blocks frame is small: the link is dropped);
    # one entry over the bound is refused before any is looked at.
    huge = {"disk": "vm1", "blocks": [[i % BLOCKS, 1] for i in range(1_000_000)]}
    million = as_member(mallory, office, "get_blocks", huge)
    assert isinstance(million, PeerError) and million.code == ERR_CONNECTION, million
    too_many = {"disk": "vm1", "blocks": [[i % BLOCKS, 1] for i in range(MAX_BLOCK_ENTRIES + 1)]}
    refused(mallory, office, "get_blocks", too_many, access.ERR_TOO_LARGE, says=str(MAX_BLOCK_ENTRIES))
    ok = as_member(mallory, office, "get_blocks", {"disk": "vm1", "blocks": [[TARGET, 0]] * MAX_BLOCK_ENTRIES})
    assert isinstance(ok, dict) and len(ok["blocks"]) >= 1, ok  # a member still reads, within the bound

    # A huge disk prepared where no replica is: nothing is created from the request's sizes. (car-pc holds
    # no chain of vm1 to pin, so mallory's invented one proves its ownership there: the sizes do not.)
    huge = prepare | {"size": 1 << 50, "block_size": 4096}
    res = as_member(mallory, car, "migrate_prepare", huge | {"epoch": 7, "deeds": invented})
    assert isinstance(res, PeerError) and "mallory" in res.message, res
    assert not (car.home / "disks" / "vm1").exists() and mode(car) is None
    # mallory's own disk: mallory may prepare it, but the replica has the size mallory's map says.
    mallory.cli("disk", "create", "evil", "--size", "1M")
    wait_until(lambda: visible(car, "evil"), "car-pc to see evil")
    evil_deeds = as_member(mallory, mallory, "deeds", {"disk": "evil"})
    assert isinstance(evil_deeds, dict), evil_deeds
    assert as_member(mallory, car, "migrate_prepare", huge | {"disk": "evil", "deeds": evil_deeds["links"]}) \
        == {"host": "car-pc"}
    evil = next(d for d in car.json("disk", "list") if d["name"] == "evil")
    assert (evil["size"], evil["block_size"], evil["owner"]) == (1 << 20, BLOCK, "mallory"), evil
    as_member(mallory, car, "migrate_abort", {"disk": "evil"})  # or car-pc dropped it already: mallory runs none
    wait_until(lambda: mode(car, "evil") == "standby", "car-pc to drop mallory's migration")
    unharmed()

    # The legitimate moves still work: office-pc -> car-pc, then car-pc -> home-pc, whose replica still
    # records office-pc at epoch 1 (it follows office-pc's record of the hand-over). The guest at
    # office-pc is forwarded to car-pc, then relayed on to home-pc.
    summary = json.loads(office.cli("migrate", "vm1", "--to", "car-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["epoch"] == 2, summary
    assert "did not hand vm1 over" in refused(mallory, car, "guest_io", write)
    summary = json.loads(car.cli("migrate", "vm1", "--to", "home-pc", "--json", timeout=600).stdout)
    assert summary["error"] == "" and summary["epoch"] == 3, summary
    wait_until(lambda: owner_everywhere(honest, "home-pc", 3), "every host to name home-pc the owner")
    assert "home-pc owns it" in refused(mallory, home, "migrate_prepare", prepare | {"epoch": 3})
    assert "did not hand vm1 over" in refused(mallory, home, "guest_io", write)
    report = guest.finish()
    assert report["errors"] == [] and report["reads_ok"], report
    model = bytearray(base)
    model[at + BLOCK:at + BLOCK + 4096] = b"\x22" * 4096
    image = model_image(tmp_path / "model.raw", bytes(model), report["acked"])  # type: ignore[arg-type]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), home.uri("vm1"))
    assert all(h.alive() for h in honest)


def test_an_owner_claimed_in_the_index_is_not_followed_unproven(swarm: tuple[list[Host], bytes],
                                                                    tmp_path: Path) -> None:
    """mallory imports a disk of its own named vm1 and publishes an owner record for it at epoch 99 (under
    its own name: valid), so the index names it vm1's owner; it asks for vm1 to be kept warm on home-pc.
    Its deeds end at epoch 1, and on home-pc they are another history than the replica's: every host names
    office-pc, shows mallory's claim as a conflict, and home-pc neither syncs from mallory nor takes its
    policy; its data stays office-pc's."""
    (office, home, car, mallory), base = swarm
    (tmp_path / "fake.raw").write_bytes(b"\x66" * len(base))
    mallory.cli("disk", "import", "vm1", str(tmp_path / "fake.raw"))
    member = trust.load_identity(mallory.home)  # an owner record under its own name, at a high epoch
    claim = forge_record(member.key, "mallory", "owner", "vm1", {"host": "mallory", "epoch": 99},
                         binding=member.binding)
    client = IndexClient(member)
    try:
        for h in (office, home, car):
            assert client.store(h.port, key_digest("owner", "vm1"), [claim]) is True  # a valid record
    finally:
        client.close()
    for h in (office, home, car):  # the claim is shown, the owner named is the one the deeds prove
        wait_until(lambda h=h: h.json("status", "vm1")["disks"][0]["conflicts"], f"{h.name} to see mallory's claim")
        d = h.json("status", "vm1")["disks"][0]
        assert (d["owner"], d["epoch"]) == ("office-pc", 1) and d["conflicts"][0]["host"] == "mallory", d
        # another history than the replica's, or than most holders hold; or (at car-pc, which holds no
        # replica, while the forged record outlives mallory's daemon's own) a claim its deeds cannot back
        why = d["conflicts"][0]["error"]
        assert "another history" in why or (h is car and "epoch 99 but its deeds end at epoch 1" in why), d
    assert sync(home, "vm1")["error"] == ""  # from office-pc: home-pc's replica never follows mallory
    office.cli("replicate", "vm1", "--on", "car-pc")  # the owner's policy: home-pc learns it
    wait_until(lambda: (home.json("status", "vm1")["disks"][0]["replicate"] or {}).get("hosts") == ["car-pc"],
               "home-pc to learn office-pc's policy")
    mallory.cli("replicate", "vm1", "--on", "home-pc")  # newer, for mallory's own vm1
    wait_until(lambda: "ignoring mallory's replication policy of vm1: its owner is office-pc"
               in (home.home / "daemon.log").read_text(), "home-pc to see mallory's policy")
    assert home.json("status", "vm1")["disks"][0]["replicate"]["hosts"] == ["car-pc"]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "base.raw"), home.uri("vm1"))
    d = next(d for d in home.json("disk", "list") if d["name"] == "vm1")
    assert (d["owner"], d["epoch"]) == ("office-pc", 1), d
    assert all(h.alive() for h in (office, home, car))


def test_a_member_holds_a_bounded_share_of_a_relay(make_host: Callable[..., Host]) -> None:
    """mallory opens relayed pipes through office-pc to home-pc and never uses them: office-pc carries
    MAX_PIPES_PER_HOST of them and refuses more, and car-pc still gets a pipe of its own."""
    office = make_host("office-pc")
    home, car, mallory = (make_host(n, join=invite(office)) for n in ("home-pc", "car-pc", "mallory"))
    wait_until(lambda: {p["name"] for p in office.json("peers") if p["reachable"]} == {"home-pc", "car-pc", "mallory"},
               "office-pc to reach every member")
    for _ in range(relay.MAX_PIPES_PER_HOST):
        res = as_member(mallory, office, "relay_open", {"to": "home-pc"})
        assert isinstance(res, dict) and isinstance(res["id"], int), res
    res = as_member(mallory, office, "relay_open", {"to": "home-pc"})
    assert isinstance(res, PeerError) and res.code == "busy" and "mallory" in res.message, res
    assert isinstance(as_member(car, office, "relay_open", {"to": "home-pc"}), dict)
    assert all(h.alive() for h in (office, home, car))


def test_an_idle_pipe_makes_room_for_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipes whose ends vanished without a word are dropped once idle, when their room is needed."""
    clock = [1000.0]
    monkeypatch.setattr(relay.time, "monotonic", lambda: clock[0])
    relays = relay.Relays(SimpleNamespace(name="office-pc", config=SimpleNamespace(extra={})))  # type: ignore[arg-type]
    for i in range(relay.MAX_PIPES):
        relays._room_for(f"host{i % 16}")
        relays.pipes[i] = relay._Pipe(f"host{i % 16}", "home-pc", clock[0])
    with pytest.raises(PeerError, match="64 pipes already"):
        relays._room_for("car-pc")
    relays.pipes[5].used = clock[0] = 1000.0 + relay.PIPE_IDLE_SECONDS + 1  # one carried a chunk just now
    relays._room_for("car-pc")
    assert list(relays.pipes) == [5]


def test_refusals_are_logged_once_in_bounded_memory(caplog: pytest.LogCaptureFixture) -> None:
    log = access.Refusals(limit=2)
    with caplog.at_level(logging.WARNING, logger=access.__name__):
        for _ in range(3):
            err = log.refuse("mallory", "guest_io", {"disk": "vm1"}, access.ERR_FORBIDDEN, "no")
        assert err.code == access.ERR_FORBIDDEN and len(caplog.records) == 1
        log.refuse("mallory", "guest_io", {"disk": "vm2"}, access.ERR_FORBIDDEN, "no")
        log.refuse("mallory", "guest_io", {"disk": "x" * 100_000}, access.ERR_FORBIDDEN, "no")  # logged as "?"
        assert len(caplog.records) == 3 and len(log._seen) == 2  # vm1 was forgotten: logged again next time
        log.refuse("mallory", "guest_io", {"disk": "vm1"}, access.ERR_FORBIDDEN, "no")
        assert len(caplog.records) == 4 and all(len(r.getMessage()) < 200 for r in caplog.records)


def test_block_entry_bound_covers_every_legitimate_request() -> None:
    assert MIN_BLOCK_BYTES == MIN_BLOCK_SIZE
    assert MAX_REQUEST_BYTES // MIN_BLOCK_SIZE <= MAX_BLOCK_ENTRIES  # the fetcher's get_blocks
    assert SHIP_BATCH_BYTES // MIN_BLOCK_SIZE <= MAX_BLOCK_ENTRIES  # the mirror's put_blocks
    async def handler(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return {}
    spec = access.PeerOp("get_blocks", access.member, handler, {"blocks": 2})

    assert access.check_lists("get_blocks", spec, {"blocks": [[0, 1]] * 2}) is None
    assert "3 blocks; at most 2" in (access.check_lists("get_blocks", spec, {"blocks": [[0, 1]] * 3}) or "")
