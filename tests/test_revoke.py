"""`p2pvbd revoke HOST`: the founder removes a stolen machine ("mallory") from the swarm for good.

Every host then refuses mallory's requests and its index records, also after a restart, and a host that
was down when the founder revoked it learns the list from the index. A list mallory signs itself, or an
older one, changes nothing; only the founder can revoke. A disk mallory owned is claimed from a replica
(`disk claim`), which only a revocation allows.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pvbd.swarm import trust
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.dht_records import key_digest
from p2pvbd.wire.revocation import Revocations
from tests.daemons import Host
from tests.forge import IndexClient, forge_record
from tests.helpers import invite, sync, visible, wait_until
from tests.test_insiders import as_member

# How long a revoked host's datagram goes unanswered before the test calls it dropped (loopback answers
# in milliseconds).
SILENCE_SECONDS = 3.0


def refuses(victim: Host, member: Host) -> bool:
    res = as_member(member, victim, "map_summary", {"disk": "vm1"})
    return isinstance(res, PeerError) and "revoked" in res.message


def peer_names(host: Host) -> set[str]:
    return {p["name"] for p in host.json("peers")}


def test_a_revoked_host_is_refused_everywhere_for_good(make_host: Callable[..., Host]) -> None:
    office = make_host("office-pc")
    home, car, mallory = (make_host(n, join=invite(office)) for n in ("home-pc", "car-pc", "mallory"))
    office.cli("disk", "create", "vm1", "--size", "1M")
    mallory.cli("disk", "create", "lap1", "--size", "1M")  # a disk the stolen machine owns
    wait_until(lambda: all(visible(h, "vm1") for h in (home, car, mallory)), "every host to see vm1")
    wait_until(lambda: visible(home, "lap1"), "home-pc to see lap1")
    assert sync(home, "lap1")["error"] == ""
    res = home.cli("disk", "claim", "lap1", check=False)
    assert res.returncode != 0 and "not revoked" in res.stderr, res.stderr  # its owner is still a member
    assert isinstance(as_member(mallory, office, "map_summary", {"disk": "vm1"}), dict)  # a member, so far
    assert not refuses(home, mallory)
    wait_until(lambda: "mallory" in peer_names(home), "home-pc to list mallory")

    # mallory's own list (its key is no CA's) naming office-pc, and a forged serial: not kept
    forged = Revocations.issue(Ed25519PrivateKey.generate(), ["office-pc"], 99)
    assert as_member(mallory, home, "revocations", forged.as_payload()) == {"kept": False}
    res = home.cli("revoke", "mallory", check=False)
    assert res.returncode != 0 and "CA key" in res.stderr and "Traceback" not in res.stderr, res.stderr

    car.stop()  # down while the founder revokes: it learns the list from the index
    revoked = office.json("revoke", "mallory")
    assert revoked["revoked"] == ["mallory"] and "home-pc" in revoked["told"], revoked
    assert refuses(home, mallory) and refuses(office, mallory)
    assert not isinstance(as_member(mallory, office, "revocations", forged.as_payload()), dict)
    wait_until(lambda: "mallory" not in peer_names(home), "home-pc to drop mallory's index records")
    assert office.json("status", "vm1")["disks"][0]["owner"] == "office-pc"
    # its index datagrams too: each is signed under its name, so knowing the swarm secret is not enough
    member = trust.load_identity(mallory.home)
    client = IndexClient(member)
    client.sock.settimeout(SILENCE_SECONDS)
    try:
        raw = forge_record(member.key, "mallory", "owner", "vm1", {"host": "mallory", "epoch": 99},
                           binding=member.binding)
        with pytest.raises(TimeoutError):
            client.store(office.port, key_digest("owner", "vm1"), [raw])
    finally:
        client.close()

    # The lost machine's disk: claimed from a replica, by a host that holds one
    claimed = home.json("disk", "claim", "lap1")
    assert (claimed["owner"], claimed["epoch"]) == ("home-pc", 2), claimed
    wait_until(lambda: office.json("status", "lap1")["disks"][0]["owner"] == "home-pc",
               "office-pc to see home-pc own lap1")

    car.start()
    wait_until(lambda: refuses(car, mallory), "car-pc to learn the list from the index", timeout=120)
    # car-pc, holding no replica of lap1, follows home-pc through its deeds: mallory's creation, then
    # home-pc's claim, which car-pc checks against the revocation list
    assert sync(car, "lap1")["error"] == ""
    assert next(d for d in car.json("disk", "list") if d["name"] == "lap1")["owner"] == "home-pc"
    home.stop()
    home.start()
    assert refuses(home, mallory)  # kept on disk
    listed = trust.load_identity(home.home).trust_dir / "revoked.json"
    assert listed.exists() and "mallory" in listed.read_text()
    assert office.cli("revoke", "office-pc", check=False).returncode != 0
    # a name that never joined would use up one of the list's few places for good: refused
    res = office.cli("revoke", "never-joined", check=False)
    assert res.returncode != 0 and "never-joined is not a member" in res.stderr and "Traceback" not in res.stderr, \
        res.stderr
    assert office.json("revoke", "mallory")["revoked"] == ["mallory"]  # again: nothing new, nothing lost
    res = office.cli("disk", "claim", "lap1", check=False)
    assert res.returncode != 0 and "no replica" in res.stderr, res.stderr
    res = car.cli("disk", "claim", "lap1", check=False)  # claimed once: home-pc owns it, not revoked
    assert res.returncode != 0 and "home-pc, which is not revoked" in res.stderr, res.stderr
