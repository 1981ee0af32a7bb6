"""Index record payloads against their schema, and the code reading them against whatever passes it.

Any member can sign any payload; what a node keeps and a lookup returns is what ``dht_schema`` accepts.
Properties: the schema rejects with PayloadError (a record with it: RecordError) and raises nothing else;
what builders make round-trips exactly; and whatever signed records pass, the swarm's readers of the
index (status, peers, owner and holders queries, the policy book, a pull) raise nothing but their own
errors. A per-publisher quota bounds the keys one publisher holds on a node.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p2pvbd.base.home import (
    DEFAULT_PEER_PORT,
    AddressError,
    Config,
    Home,
    HomeError,
    format_hostport,
    is_ip,
    parse_hostport,
)
from p2pvbd.daemon import Services, attach_services
from p2pvbd.kernel_hook_ctl import HookController
from p2pvbd.migration.fetcher import SyncError, SyncProgress
from p2pvbd.migration.pull import PullState, sync_disk
from p2pvbd.migration.replication import POLICY_FILE, Policy, Replication
from p2pvbd.swarm import trust
from p2pvbd.swarm.node import CATALOG_KEY, Swarm
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.dht_records import (
    MAX_KEYS_PER_PUBLISHER,
    MAX_RECORD_BYTES,
    FirstSeen,
    Record,
    RecordError,
    RecordStore,
    holders_payload,
    host_payload,
    key_digest,
    owner_payload,
    parse_record,
    sign_record,
)
from p2pvbd.wire.dht_schema import (
    KINDS,
    MAX_COUNTER,
    MAX_LINKS_LISTED,
    MAX_SEEN_AS,
    REACH_KINDS,
    PayloadError,
    check_payload,
)
from p2pvbd.wire.revocation import MAX_REVOKED_HOSTS, REVOKED_KEY, Revocations
from p2pvbd.wire.vm_definition import VmDefinition
from tests.forge import forge_record

KEY = Ed25519PrivateKey.generate()
CERT = "0f" * 32
ME = "me"
HOSTS = (ME, "office-pc", "home-pc")
DISKS = ("vm1", "vm2")
FIELDS = {"host": ("addresses", "cert", "reach", "seen_as", "links"), "owner": ("host", "epoch"),
          "holders": ("host", "current_blocks", "generation"), "catalog": ("host", "disks"),
          "policy": ("disk", "hosts", "rate", "set_at"),
          "vm": ("name", "disks", "memory", "cpus", "accel", "kernel", "initrd", "append", "qemu_args", "set_at"),
          "revoked": ("serial", "names", "sig")}

# msgpack-able values: what a member can put in a payload
_scalar = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.binary(max_size=40))
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
anything = st.recursive(_scalar, lambda c: st.lists(c, max_size=5) | st.dictionaries(_text, c, max_size=4),
                        max_leaves=20)
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
ports = st.integers(1, 65535)
addresses = st.one_of(
    st.builds(lambda a, p: f"{a}:{p}", st.ip_addresses(v=4), ports),
    st.builds(lambda a, p: f"[{a}]:{p}", st.ip_addresses(v=6), ports),
    st.builds(lambda a, p: f"{a}:{p}", st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){0,2}",
                                                     fullmatch=True), ports))
counters = st.integers(0, MAX_COUNTER - 1)


def valid_payload(kind: str, key: str, publisher: str) -> st.SearchStrategy[dict[str, Any]]:
    """Payloads the swarm's own code publishes (small enough for one record)."""
    if kind == "host":
        return st.builds(host_payload, st.lists(addresses, min_size=1, max_size=4, unique=True), st.just(CERT),
                         st.sampled_from(REACH_KINDS),
                         st.lists(st.ip_addresses().map(str), max_size=MAX_SEEN_AS, unique=True),
                         st.lists(names, max_size=6, unique=True))
    if kind == "owner":
        return st.builds(owner_payload, st.just(publisher), counters)
    if kind == "holders":
        return st.builds(holders_payload, st.just(publisher), counters, counters)
    if kind == "catalog":
        return st.builds(lambda d: {"host": publisher, "disks": d}, st.lists(names, max_size=6, unique=True))
    if kind == "vm":
        return st.builds(lambda n, more, mib, t: VmDefinition(n, (key, *more), mib << 20, set_at=t).as_payload(),
                         names, st.lists(names.filter(lambda d: d != key), max_size=3, unique=True),
                         st.integers(16, 4096), st.floats(0, 2**62))
    if kind == "revoked":
        return st.builds(lambda n, serial: Revocations(serial, tuple(sorted(n)), bytes(64)).as_payload(),
                         st.lists(names, max_size=MAX_REVOKED_HOSTS, unique=True), st.integers(1, MAX_COUNTER - 1))
    return st.builds(lambda h, r, t: Policy(key, tuple(h), r, t).as_payload(), st.lists(names, max_size=6, unique=True),
                     st.just(float("inf")) | st.floats(1, 2**63), st.floats(0, 2**62))


@st.composite
def kind_key_publisher(draw: st.DrawFn) -> tuple[str, str, str]:
    kind = draw(st.sampled_from(sorted(KINDS)))
    publisher = draw(st.sampled_from(HOSTS))
    key = (publisher if kind == "host" else CATALOG_KEY if kind == "catalog" else REVOKED_KEY if kind == "revoked"
           else draw(st.sampled_from(DISKS)))
    return kind, key, publisher


@st.composite
def mutated(draw: st.DrawFn, kind: str, key: str, publisher: str) -> dict[str, Any]:
    """A valid payload with one field dropped, replaced by anything, or one field added."""
    p = dict(draw(valid_payload(kind, key, publisher)))
    field = draw(st.sampled_from(FIELDS[kind]))
    how = draw(st.sampled_from(["drop", "replace", "add"]))
    if how == "drop":
        del p[field]
    elif how == "replace":
        p[field] = draw(anything | st.sampled_from([None, True, -1, MAX_COUNTER, 2**64 - 1, 1.5, float("nan"),
                                                    "", "x" * 300, [], ["vm1", "vm1"], list(range(300))]))
    else:
        p[draw(_text)] = draw(anything)
    return p


@st.composite
def any_payload(draw: st.DrawFn, kind: str, key: str, publisher: str) -> Any:
    return draw(st.one_of(
        anything,
        st.fixed_dictionaries({f: anything for f in FIELDS[kind]}),
        mutated(kind, key, publisher),
        valid_payload(kind, key, publisher)))


@st.composite
def claims(draw: st.DrawFn) -> tuple[str, str, str, Any]:
    kind, key, publisher = draw(kind_key_publisher())
    return kind, key, publisher, draw(any_payload(kind, key, publisher))


def checked(kind: object, key: object, publisher: object, payload: object) -> dict[str, Any] | None:
    """check_payload's verdict: the payload, or None for a PayloadError (anything else fails the test)."""
    try:
        return check_payload(kind, key, publisher, payload)
    except PayloadError:
        return None


@settings(max_examples=500, deadline=None)
@given(claims())
def test_schema_rejects_only_with_its_own_error_and_is_idempotent(claim: tuple[str, str, str, Any]) -> None:
    kind, key, publisher, payload = claim
    out = checked(kind, key, publisher, payload)
    if out is not None:
        assert set(out) == set(FIELDS[kind])
        assert check_payload(kind, key, publisher, out) == out


@settings(max_examples=200, deadline=None)
@given(kind=anything, key=anything, publisher=anything, payload=anything)
def test_schema_takes_anything_in_any_argument(kind: Any, key: Any, publisher: Any, payload: Any) -> None:
    checked(kind, key, publisher, payload)
    for k in KINDS:
        checked(k, "vm1", "me", payload)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_what_the_swarm_publishes_round_trips(data: st.DataObject) -> None:
    kind, key, publisher = data.draw(kind_key_publisher())
    payload = data.draw(valid_payload(kind, key, publisher))
    assert check_payload(kind, key, publisher, payload) == payload
    rec = parse_record(sign_record(KEY, publisher, kind, key, payload))
    assert (rec.kind, rec.key, rec.publisher, rec.payload) == (kind, key, publisher, payload)


@settings(max_examples=300, deadline=None)
@given(claims())
def test_signed_records_pass_exactly_when_their_payload_does(claim: tuple[str, str, str, Any]) -> None:
    kind, key, publisher, payload = claim
    raw = forge_record(KEY, publisher, kind, key, payload)
    assume(len(raw) <= MAX_RECORD_BYTES)
    expected = checked(kind, key, publisher, payload)
    try:
        rec = parse_record(raw)
    except RecordError as e:
        assert expected is None
        # a payload that is no map fails the record's structure; anything else its schema
        assert (e.reason, e.origin) in (("malformed", None), ("bad_payload", (publisher, kind, key))), e
        with pytest.raises(ValueError):
            sign_record(KEY, publisher, kind, key, payload)  # the swarm's own code cannot publish it
    else:
        assert rec.payload == expected


def test_the_reports_malformed_owner_records_are_dropped() -> None:
    for payload, reason in (({"host": "car-pc"}, "epoch: missing"),
                            ({"host": "car-pc", "epoch": "3"}, "epoch: not an int (str)"),
                            ({"host": "car-pc", "epoch": list(range(200))}, "epoch: not an int (list)"),
                            ({"host": "car-pc", "epoch": -1}, "epoch: outside [0, 2**63)"),
                            ({"host": "car-pc", "epoch": 2**63}, "epoch: outside [0, 2**63)"),
                            ({"host": "car-pc", "epoch": True}, "epoch: not an int (bool)"),
                            ({"host": "office-pc", "epoch": 9}, "host: not the publisher"),
                            ({"host": "car-pc\n", "epoch": 9}, "host: not a name")):
        with pytest.raises(RecordError) as err:
            parse_record(forge_record(KEY, "car-pc", "owner", "vm1", payload))
        assert err.value.reason == "bad_payload" and err.value.detail.startswith(reason), err.value
    rec = parse_record(forge_record(KEY, "car-pc", "owner", "vm1", {"host": "car-pc", "epoch": 3, "new": [1]}))
    assert rec.payload == {"host": "car-pc", "epoch": 3}  # a newer version's extra field: kept out of sight


def test_addresses_are_ones_both_parsers_take() -> None:
    ok = ["10.0.0.1:7420", "[::1]:7420", "[fe80::1%eth0]:1", "office-pc.lan:65535", "a:1"]
    bad = ["10.0.0.1", "::1:7420", "[::1]", "[10.0.0.1]:80", "host:0", "host:65536", "host:²", "ho st:80",
           "-host:80", ":80", "host:+80", "a" * 254 + ":80", "[::1]:80\n"]
    for a in ok:
        assert checked("host", "h", "h", {"addresses": [a], "cert": CERT}) is not None, a
    for a in bad:
        assert checked("host", "h", "h", {"addresses": [a], "cert": CERT}) is None, a
    for cert in ("0F" * 32, "0f" * 31, "sha256:" + "0f" * 32, b"\x0f" * 32):
        assert checked("host", "h", "h", {"addresses": ok[:1], "cert": cert}) is None


def test_a_host_record_says_how_the_host_is_reached() -> None:
    base = {"addresses": ["10.0.0.1:7420"], "cert": CERT}
    assert checked("host", "h", "h", base) == base | {"reach": "unknown", "seen_as": [], "links": []}  # an older host's
    ok = base | {"reach": "nat", "seen_as": ["192.0.2.7", "2001:db8::1"], "links": ["home-pc"]}
    assert checked("host", "h", "h", ok) == ok
    for bad in ({"reach": "punched"}, {"reach": None}, {"seen_as": ["192.0.2.7:80"]}, {"seen_as": ["x"]},
                {"seen_as": ["192.0.2.7"] * 2}, {"seen_as": [f"192.0.2.{i}" for i in range(MAX_SEEN_AS + 1)]},
                {"links": ["home-pc\n"]}, {"links": [f"h{i}" for i in range(MAX_LINKS_LISTED + 1)]}):
        assert checked("host", "h", "h", ok | bad) is None, bad


def test_log_once_memory_is_bounded() -> None:
    seen = FirstSeen(3)
    assert [seen.first(x) for x in "abca"] == [True, True, True, False]
    assert seen.first("d") and seen.first("b")  # b was the least recently seen: forgotten for d
    assert not seen.first("a")


def _record(publisher: str, kind: str, key: str, payload: dict[str, Any], ts: float | None = None
            ) -> tuple[bytes, Record]:
    raw = sign_record(KEY, publisher, kind, key, payload, ts=ts)
    return raw, parse_record(raw)


def test_a_publisher_holds_records_under_a_bounded_number_of_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("p2pvbd.wire.dht_records.MAX_KEYS_PER_PUBLISHER", 3)
    store = RecordStore()
    for i in range(3):
        assert store.merge(key_digest("owner", f"d{i}"), [_record("greedy", "owner", f"d{i}", {"host": "greedy",
                                                                                               "epoch": i})]) is None
    dkey = key_digest("owner", "d3")
    assert store.merge(dkey, [_record("greedy", "owner", "d3", owner_payload("greedy", 3))]) == "publisher_quota"
    assert store.records(dkey) == []
    assert store.merge(dkey, [_record("other", "owner", "d3", owner_payload("other", 1))]) is None  # others unaffected
    # a newer record under a key it holds is no new key; and its expired records make room again
    newer = _record("greedy", "owner", "d0", owner_payload("greedy", 9))
    assert store.merge(key_digest("owner", "d0"), [newer]) is None
    monkeypatch.setattr("time.time", lambda real=time.time: real() + 2 * 3600)  # every record expired
    assert store.merge(dkey, [_record("greedy", "owner", "d3", owner_payload("greedy", 3))]) is None
    assert [r.publisher for _, r in store.records(dkey)] == ["greedy"]
    assert MAX_KEYS_PER_PUBLISHER >= 3 * 1000 + 2  # owner, holders and policy of 1000 disks, host and catalog


# ---- the readers of the index -------------------------------------------------------------------------------


class FakeIndex:
    """What lookups return: the records given, as the DHT node returns them (already checked)."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    async def lookup(self, kind: str, key: str, **_: Any) -> list[Record]:
        return [r for r in self.records if (r.kind, r.key) == (kind, key)]

    async def publish(self, *_: Any, **__: Any) -> int:
        return 0

    def neighbours(self) -> list[tuple[str, int]]:
        return []


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> trust.HostIdentity:
    return trust.create_swarm(tmp_path_factory.mktemp("me"), ME)


async def _unreachable(peer: str, host: str, port: int, **_: Any) -> None:
    raise PeerError("connection", f"{peer} at {host}:{port} is not there (test)")


async def _read_everything(swarm: Swarm, services: Services) -> None:
    """Every entry point through which the swarm acts on index records."""
    async with trio.open_nursery() as nursery:
        swarm._nursery = nursery
        disks = await swarm.known_disks()
        for disk in DISKS:
            owner, epoch = await swarm.owner_of(disk)
            assert isinstance(owner, str) and isinstance(epoch, int)
            assert all(isinstance(h, str) for h in await swarm.holders_of(disk))
        status = await swarm.status()
        assert [d["name"] for d in status["disks"]] == disks
        msgpack.packb(status)  # what the control socket sends back
        msgpack.packb(await swarm.peers())
        await services.replication.refresh()
        for disk in DISKS:
            with pytest.raises((SyncError, PeerError)):
                await sync_disk(swarm, services.pulls, disk, SyncProgress(disk), background=True)
        nursery.cancel_scope.cancel()


@settings(max_examples=150, deadline=None)
@given(st.lists(claims(), max_size=12))
def test_readers_of_the_index_take_whatever_passes_the_schema(identity: trust.HostIdentity,
                                                               records: list[tuple[str, str, str, Any]]) -> None:
    passed = []
    for kind, key, publisher, payload in records:
        try:
            passed.append(parse_record(forge_record(KEY, publisher, kind, key, payload)))
        except RecordError:
            pass
    with tempfile.TemporaryDirectory() as home:
        swarm = Swarm(Home(Path(home)), Config(name=ME, listen="127.0.0.1:7420"), identity, HookController())
        services = attach_services(swarm, Path(home))
        swarm.dht = FakeIndex(passed)  # type: ignore[assignment]
        swarm._hold = _unreachable  # type: ignore[method-assign]
        trio.run(_read_everything, swarm, services)


def test_policy_book_keeps_the_good_policies_of_a_bad_file(tmp_path: Path) -> None:
    good = Policy("vm1", ("home-pc",), 1e6, 1.0).as_payload()
    path = tmp_path / POLICY_FILE
    path.write_text(json.dumps({"vm1": good, "vm2": {**good, "disk": "vm2", "rate": 0}, "vm3": "x",
                                "vm4": {**good, "disk": "vm4", "hosts": ["../etc"]}}))
    swarm = SimpleNamespace(name=ME)
    assert list(Replication(swarm, tmp_path, PullState()).policies) == ["vm1"]  # type: ignore[arg-type]
    path.write_text("[1, 2]")
    assert Replication(swarm, tmp_path, PullState()).policies == {}  # type: ignore[arg-type]


def test_one_address_parser_for_settings_and_records() -> None:
    """Settings may leave the port out, records may not; both refuse port 0, unbracketed IPv6 and
    non-ASCII digits, with an error that is both a user's HomeError and a peer's ValueError."""
    assert parse_hostport("office-pc") == ("office-pc", DEFAULT_PEER_PORT)
    assert parse_hostport("[::1]:80", default_port=None) == ("::1", 80)
    for text in ("office-pc", "::1:80", "host:0", "host:²", "[::1]x:80", "host:123456", 80):
        with pytest.raises(AddressError) as e:
            parse_hostport(text, default_port=None)
        assert isinstance(e.value, HomeError) and isinstance(e.value, ValueError)
    assert format_hostport(*parse_hostport("[fe80::1]:7")) == "[fe80::1]:7"


def test_one_ip_literal_check() -> None:
    assert is_ip("10.0.0.1") and is_ip("::1") and not is_ip("010.0.0.1") and not is_ip("[::1]")
    assert not is_ip("host") and not is_ip(None) and not is_ip("1.2.3.4\0")
    assert not is_ip("fe80::1%eth0") and is_ip("fe80::1%eth0", scoped=True)  # a zone only where asked
    assert not is_ip("10.0.0.1%eth0", scoped=True) and not is_ip("fe80::1%", scoped=True)
