"""Ownership deeds (p2pvbd/swarm/deeds.py): what a chain proves, and what no forged or malformed one does."""

from __future__ import annotations

import time

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvbd.swarm import deeds
from p2pvbd.swarm.deeds import CLAIM, CREATE, HAND, DeedChecker, DeedError
from p2pvbd.swarm.trust import issue_key_binding, public_key_raw

CA = ed25519.Ed25519PrivateKey.generate()
EXPIRES = int(time.time()) + 3600
KEYS = {name: ed25519.Ed25519PrivateKey.generate() for name in ("office", "home", "car", "mallory")}
# mallory is a member: the CA bound its key to its name, like everyone else's.
BINDINGS = {name: issue_key_binding(CA, name, public_key_raw(k.public_key()), EXPIRES) for name, k in KEYS.items()}


def link(kind: str, epoch: int, owner: str, prev: bytes, signer: str, disk: str = "vm1") -> bytes:
    return deeds.sign(kind, disk, epoch, owner, prev, signer, KEYS[signer], BINDINGS[signer])


def digest(raw: bytes) -> bytes:
    return deeds.parse(raw).digest


def history() -> list[bytes]:
    """vm1: created on office at epoch 1, moved to home (2), then to car (3)."""
    a = link(CREATE, 1, "office", b"", "office")
    b = link(HAND, 2, "home", digest(a), "office")
    c = link(HAND, 3, "car", digest(b), "home")
    return [a, b, c]


def checker(revoked: frozenset[str] = frozenset()) -> DeedChecker:
    return DeedChecker(CA.public_key(), revoked.__contains__)


def test_a_chain_proves_its_last_owner() -> None:
    chain = checker().check(history(), "vm1")
    assert (chain.owner, chain.epoch) == ("car", 3)
    assert chain.up_to(2) is not None and chain.up_to(2).owner == "home"  # type: ignore[union-attr]
    assert chain.up_to(0) is None


def test_signing_is_deterministic() -> None:
    """A source re-makes the hand-over its commit carried, after a restart, byte for byte."""
    a = history()[0]
    assert link(HAND, 2, "home", digest(a), "office") == history()[1]


def test_a_member_cannot_hand_over_a_disk_it_does_not_own() -> None:
    a, b, _ = history()
    forged = link(HAND, 3, "mallory", digest(b), "mallory")  # home owns it at epoch 2, not mallory
    with pytest.raises(DeedError, match="not by home"):
        checker().check([a, b, forged], "vm1")


def test_a_member_cannot_claim_a_disk_whose_owner_is_not_revoked() -> None:
    a, b, c = history()
    claim = link(CLAIM, 4, "mallory", digest(c), "mallory")
    with pytest.raises(DeedError, match="not revoked"):
        checker().check([a, b, c, claim], "vm1")
    chain = checker(frozenset({"car"})).check([a, b, c, link(CLAIM, 4, "home", digest(c), "home")], "vm1")
    assert chain.owner == "home"


def test_another_history_is_refused_where_a_link_is_pinned() -> None:
    """mallory creates its own vm1: a host that holds vm1's real chain is not fooled; one with none is."""
    own = [link(CREATE, 1, "mallory", b"", "mallory")]
    own.append(link(HAND, 50, "mallory", digest(own[0]), "mallory"))
    pin = digest(history()[1])
    with pytest.raises(DeedError, match="another history"):
        checker().check(own, "vm1", pin=pin)
    assert checker().check(history(), "vm1", pin=pin).owner == "car"


def test_after_the_pin_a_revoked_host_signs_nothing() -> None:
    """car was stolen and revoked: it can still sign, but a hand-over it makes after what a replica
    pinned does not count there."""
    a, b, c = history()
    stolen = link(HAND, 4, "mallory", digest(c), "car")
    with pytest.raises(DeedError, match="revoked"):
        checker(frozenset({"car"})).check([a, b, c, stolen], "vm1", pin=digest(c))
    with pytest.raises(DeedError, match="revoked"):  # and a chain ending at a revoked owner proves nothing
        checker(frozenset({"car"})).check([a, b, c], "vm1")


def test_tampered_links_are_refused() -> None:
    a, b, c = history()
    fields = msgpack.unpackb(c)
    fields[3] = "mallory"  # the owner, after signing
    with pytest.raises(DeedError, match="signature"):
        checker().check([a, b, msgpack.packb(fields)], "vm1")
    fields = msgpack.unpackb(c)
    fields[7] = BINDINGS["mallory"]  # another host's binding
    with pytest.raises(DeedError, match="signature"):
        checker().check([a, b, msgpack.packb(fields)], "vm1")
    with pytest.raises(DeedError, match="does not follow"):
        checker().check([a, c], "vm1")
    with pytest.raises(DeedError, match="about vm1"):
        checker().check(history(), "vm2")


def test_a_key_the_ca_did_not_bind_signs_nothing() -> None:
    outsider = ed25519.Ed25519PrivateKey.generate()
    raw = deeds.sign(CREATE, "vm1", 1, "office", b"", "office", outsider, BINDINGS["office"])
    with pytest.raises(DeedError, match="signature"):
        checker().check([raw], "vm1")


_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_FIELD = st.one_of(st.binary(max_size=80), st.text(max_size=70), _INTS, st.none(), st.booleans())
# Lists shaped like a link (nine fields, kinds and names that pass) as well as arbitrary ones.
_LINKISH = st.tuples(st.sampled_from([*deeds.KINDS, "x"]), st.sampled_from(["vm1", "vm2", ""]), _INTS,
                     st.sampled_from(list(KEYS)), st.binary(max_size=40), st.sampled_from(list(KEYS)),
                     st.binary(max_size=40), st.sampled_from([*BINDINGS.values(), b""]), st.binary(max_size=70))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=700), _FIELD,
                          st.lists(_FIELD, max_size=10).map(msgpack.packb),
                          _LINKISH.map(lambda t: msgpack.packb(list(t)))), max_size=6),
       st.one_of(st.none(), st.binary(min_size=32, max_size=32)))
def test_arbitrary_chains_raise_only_deed_errors(raws: list[object], pin: bytes | None) -> None:
    """Whatever a member sends as a chain, checking it fails cleanly or proves an owner."""
    try:
        chain = checker().check(raws, "vm1", pin=pin)
    except DeedError:
        return
    assert chain.owner in KEYS
