"""A joined member ("mallory") asks for what only an owner may decide, with the stock CLI or its own
certificate: to have a running VM moved to it, to redefine another host's VM, to be named a disk's owner.

office-pc owns vm1 (home-pc holds a replica, car-pc none; the fixture of test_insiders). Each request is
refused, or each claim shown as a conflict and never followed, and the owner's choices still work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from p2pvbd import trust
from p2pvbd.dht_records import key_digest
from p2pvbd.peer_transport import PeerError
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.swarm import access
from p2pvbd.vm.definition import MAX_CLOCK_AHEAD_SECONDS, VmDefinition
from tests.daemons import Host, run
from tests.forge import IndexClient, forge_record
from tests.test_insiders import as_member, swarm  # noqa: F401 - the fixture
from tests.test_swarm import wait_until

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
    mallory.cli("vm", "create", VM, "--disk", "vm1", "--memory", "16M", "--cpus", "64", "--kernel", str(kernel),
                "--append", "console=ttyS0 init=/bin/sh")
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
    """A definition of office-pc's own (its key) stamped a day ahead, as a machine with a wrong clock
    would publish it, is refused: it would outrank every later change until that day."""
    (office, home, car, mallory), _ = swarm
    office.cli("vm", "create", VM, "--disk", "vm1", "--memory", "64M")
    wait_until(lambda: vm_info(home) is not None, "home-pc to learn workvm")
    ahead = VmDefinition(VM, ("vm1",), 32 << 20, set_at=time.time() + 24 * 3600)
    assert ahead.too_far_ahead(time.time()) and not ahead.too_far_ahead(ahead.set_at - MAX_CLOCK_AHEAD_SECONDS)
    me = trust.load_identity(office.home)
    record = forge_record(me.key, "office-pc", "vm", "vm1", ahead.as_payload(), binding=me.binding)
    client = IndexClient(trust.load_identity(mallory.home))
    try:
        for h in (home, car):
            assert client.store(h.port, key_digest("vm", "vm1"), [record]) is True
    finally:
        client.close()
    wait_until(lambda: logged(home, f"ignoring a definition of VM {VM} stamped"), "home-pc to see the record")
    office.cli("vm", "allow", VM, "home-pc")
    wait_until(lambda: (vm_info(home) or {}).get("allow") == ["home-pc"], "home-pc to learn the later change")
    assert vm_info(home)["memory"] == 64 << 20  # type: ignore[index]

