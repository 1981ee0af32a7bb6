"""The DHT's records: signed, expiring statements, the store a node keeps them in, and the datagram MAC.

Split out of ``dht`` so the rules a record must pass (format, signature, name, clock, key) and the limits
on what a node holds read apart from the kademlia and asyncio machinery that moves records around.
Pure: no sockets, no asyncio, no trio; ``dht`` stays the only module that runs on an event loop.

A record is a msgpack map (kind, key, publisher, publisher's Ed25519 key, ts, ttl, payload) signed by
the publisher, its payload checked against its kind's schema (``dht_schema``) right after the signature.
Each (kind, key) holds one record per publisher, the newest winning, and at most MAX_RECORDS_PER_KEY
publishers; a publisher holds records under at most MAX_KEYS_PER_PUBLISHER keys of a node. A record
carries the swarm CA's binding of its publisher's name to its signing key, which ``DhtNode``'s ``trust``
checks: a member can publish only under its own name, so these limits bound what one member costs a node.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from kademlia.storage import IStorage

from p2pvbd.base.home import is_name, parse_hostport
from p2pvbd.wire.dht_schema import KINDS, PayloadError, check_payload

MAC_BYTES = 16  # HMAC-SHA256 cut to 128 bits: RFC 2104 §5 allows truncating to >= half the output
# A host record with a few addresses is ~380 B with its key binding, a VM definition up to 1 KiB; a reply
# page still holds >= 6.
MAX_RECORD_BYTES = 1152
MAX_NAME_BYTES = 255  # host names (RFC 1035's limit) and disk names
MAX_CLOCK_SKEW = 300.0  # seconds a record's ts may lie in our future (hosts' clocks drift)
MAX_TTL = 604800.0  # one week: kademlia ForgetfulStorage's default maximum age
DEFAULT_TTL = 3600.0  # the paper's tRefresh: a vanished host's records are gone within the hour
MAX_RECORDS_PER_KEY = 64  # publishers per key: one person's machines, with headroom
MAX_STORED_KEYS = 65536  # a swarm member cannot make us hold more keys than this
# Keys one publisher holds records under on a node: a host publishes about 3 per disk (owner, holders, a
# policy) plus its host and catalog records, so this is over 1000 disks; 16 such publishers fill a node.
MAX_KEYS_PER_PUBLISHER = 4096
# Malformed records remembered so each (publisher, kind, key, reason) is logged once: a few hundred bytes
# each, so at most about 1 MiB; one forgotten and seen again is logged again.
LOGGED_DROPS = 1024

_FIELDS = ("kind", "key", "publisher", "pubkey", "binding", "ts", "ttl", "payload", "sig")
# The swarm CA's statement that ``pubkey`` is the publisher's (trust.key_binding): expiry and signature.
BINDING_BYTES = 8 + 64
_SIG_DOMAIN = "p2pvbd-dht-record/1"


class RecordError(ValueError):
    """A record failed a check; ``reason`` names its ``stats`` counter. ``origin`` is (publisher, kind,
    key) of a correctly signed record whose payload failed its schema: what a drop is logged under."""

    def __init__(self, reason: str, detail: str = "", origin: tuple[str, str, str] | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.origin = reason, detail, origin


class FirstSeen:
    """A bounded memory of what was seen, least recently seen forgotten first: to log a repeat once."""

    def __init__(self, size: int = LOGGED_DROPS) -> None:
        self._size = size
        self._seen: OrderedDict[Hashable, None] = OrderedDict()

    def first(self, item: Hashable) -> bool:
        """True the first time ``item`` is seen (or the first time since it was forgotten)."""
        if item in self._seen:
            self._seen.move_to_end(item)
            return False
        self._seen[item] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True


@dataclass(frozen=True)
class Record:
    """One publisher's verified statement about a key."""

    kind: str
    key: str
    publisher: str
    ts: float
    ttl: float
    payload: dict[str, Any]
    pubkey: bytes = field(repr=False)
    binding: bytes = field(repr=False, default=b"")

    @property
    def expires(self) -> float:
        return self.ts + self.ttl


def key_digest(kind: str, key: str) -> bytes:
    """The 160-bit DHT key of (kind, key); kinds hold no ':' so this is unambiguous."""
    return hashlib.sha1(f"{kind}:{key}".encode()).digest()  # kademlia.utils.digest, without asyncio


def derive_mac_key(swarm_secret: bytes) -> bytes:
    """A key for datagram MACs only, so the swarm secret itself never keys anything directly."""
    if len(swarm_secret) != 32:
        raise ValueError("swarm secret must be 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"p2pvbd dht datagram mac v1").derive(
        swarm_secret)


def seal(mac_key: bytes, data: bytes) -> bytes:
    return hmac.digest(mac_key, data, "sha256")[:MAC_BYTES] + data


def unseal(mac_key: bytes, datagram: bytes) -> bytes | None:
    """The datagram's body if its MAC is right, else None."""
    body = datagram[MAC_BYTES:]
    return body if hmac.compare_digest(datagram[:MAC_BYTES], hmac.digest(mac_key, body, "sha256")[:MAC_BYTES]) \
        else None


def _signed_bytes(m: dict[str, Any]) -> bytes:
    return msgpack.packb([_SIG_DOMAIN, *(m[f] for f in _FIELDS[:-1])])


def sign_record(signing_key: Ed25519PrivateKey, publisher: str, kind: str, key: str, payload: dict[str, Any],
                ttl: float = DEFAULT_TTL, ts: float | None = None, binding: bytes = b"") -> bytes:
    """Encode and sign a record; ValueError (RecordError) if verifiers would refuse it. ``binding`` is the
    CA's binding of ``publisher`` to the signing key, without which a swarm's members refuse the record."""
    m = {"kind": kind, "key": key, "publisher": publisher, "pubkey": signing_key.public_key().public_bytes_raw(),
         "binding": binding,
         "ts": float(time.time() if ts is None else ts), "ttl": float(ttl),
         "payload": msgpack.unpackb(msgpack.packb(payload))}  # sign exactly what verifiers will re-encode
    raw = msgpack.packb({**m, "sig": signing_key.sign(_signed_bytes(m))})
    check_record(parse_record(raw), key_digest(kind, key), m["ts"])
    return raw


def parse_record(raw: object) -> Record:
    """Structure, signature and payload schema checks: what depends only on the bytes (so it can be
    cached). The Record's payload holds only the fields its kind's schema knows."""
    if not isinstance(raw, bytes) or len(raw) > MAX_RECORD_BYTES:
        raise RecordError("malformed", "not bytes or too large")
    try:
        m = msgpack.unpackb(raw)
    except Exception as exc:
        raise RecordError("malformed", "not msgpack") from exc
    if not isinstance(m, dict) or m.keys() != set(_FIELDS):
        raise RecordError("malformed", "wrong fields")
    pk, ts, ttl, payload = m["pubkey"], m["ts"], m["ttl"], m["payload"]
    if not (isinstance(m["kind"], str) and m["kind"] in KINDS and is_name(m["key"]) and is_name(m["publisher"])
            and isinstance(pk, bytes) and len(pk) == 32 and isinstance(m["sig"], bytes) and len(m["sig"]) == 64
            and isinstance(m["binding"], bytes) and len(m["binding"]) in (0, BINDING_BYTES)
            and isinstance(ts, float) and math.isfinite(ts) and isinstance(ttl, float) and 0 < ttl <= MAX_TTL
            and isinstance(payload, dict) and all(isinstance(k, str) for k in payload)):
        raise RecordError("malformed", "bad field types")
    try:
        Ed25519PublicKey.from_public_bytes(pk).verify(m["sig"], _signed_bytes(m))
    except (InvalidSignature, ValueError) as exc:
        raise RecordError("bad_signature", f"from {m['publisher']!r}") from exc
    try:
        payload = check_payload(m["kind"], m["key"], m["publisher"], payload)
    except PayloadError as exc:
        raise RecordError("bad_payload", str(exc), (m["publisher"], m["kind"], m["key"])) from exc
    return Record(m["kind"], m["key"], m["publisher"], ts, ttl, payload, pk, m["binding"])


def check_record(rec: Record, dkey: bytes | None, now: float) -> None:
    """The checks that depend on where the record is filed and on the clock."""
    if dkey is not None and key_digest(rec.kind, rec.key) != dkey:
        raise RecordError("wrong_key", f"{rec.kind}:{rec.key}")
    if rec.ts > now + MAX_CLOCK_SKEW:
        raise RecordError("future_ts", f"{rec.ts - now:.0f}s ahead")
    if rec.expires < now:
        raise RecordError("expired")


def host_payload(addresses: list[str], cert_fingerprint: str, reach: str = "unknown", seen_as: list[str] | None = None,
                 links: list[str] | None = None) -> dict[str, Any]:
    """`host` kind, keyed by host name: where it listens, which TLS certificate it presents, and how it
    can be reached (``reach``: "direct", "nat" or "unknown"; ``seen_as``: behind NAT, the addresses peers
    saw it at; ``links``: the members it holds a direct link to, which can relay to it)."""
    for a in addresses:
        parse_hostport(a, default_port=None)
    return {"addresses": list(addresses), "cert": cert_fingerprint, "reach": reach, "seen_as": list(seen_as or []),
            "links": list(links or [])}


def owner_payload(host: str, epoch: int) -> dict[str, Any]:
    """`owner` kind, keyed by disk: which host owns it; the higher epoch wins a migration race."""
    return {"host": host, "epoch": int(epoch)}


def holders_payload(host: str, current_blocks: int, generation: int, gone: bool = False) -> dict[str, Any]:
    """`holders` kind, keyed by disk: a host holding a replica, how complete, of which generation; ``gone``:
    it deleted its replica (the record replaces its last one, so peers stop asking it before that expires)."""
    return {"host": host, "current_blocks": int(current_blocks), "generation": int(generation)} | (
        {"gone": True} if gone else {})


def is_newer(a: tuple[bytes, Record], b: tuple[bytes, Record]) -> bool:
    """Newest ts wins; a tie is broken on the bytes so every node keeps the same record."""
    return (a[1].ts, a[0]) > (b[1].ts, b[0])


def newest_per_publisher(pairs: Iterable[tuple[bytes, Record]]) -> list[tuple[bytes, Record]]:
    """One record per publisher, the newest, ordered by publisher."""
    best: dict[str, tuple[bytes, Record]] = {}
    for p in pairs:
        if p[1].publisher not in best or is_newer(p, best[p[1].publisher]):
            best[p[1].publisher] = p
    return [best[k] for k in sorted(best)]


class RecordStore(IStorage):
    """IStorage with multi-valued keys: dkey → {publisher: (raw, Record)}, every record pre-verified.
    One record per publisher per key (the newest), MAX_RECORDS_PER_KEY per key, MAX_KEYS_PER_PUBLISHER
    keys per publisher, MAX_STORED_KEYS keys."""

    def __init__(self) -> None:
        self.data: dict[bytes, dict[str, tuple[bytes, Record]]] = {}
        self.stamp: dict[bytes, float] = {}  # monotonic time a key was last stored: drives §2.5 replication
        self._keys_of: dict[str, dict[bytes, float]] = {}  # publisher -> {dkey: its record's expiry}

    def merge(self, dkey: bytes, items: list[tuple[bytes, Record]]) -> str | None:
        """Keep the newest record per publisher; the stats reason if some were refused for lack of room
        ("key_full": the key or the store; "publisher_quota": the publisher's keys), else None."""
        if dkey not in self.data and len(self.data) >= MAX_STORED_KEYS:
            return "key_full"
        slot, refused = self.data.setdefault(dkey, {}), None
        for raw, rec in items:
            old = slot.get(rec.publisher)
            if old is None and len(slot) >= MAX_RECORDS_PER_KEY:
                refused = "key_full"
            elif old is None and not self._has_room(rec.publisher):
                refused = "publisher_quota"
            elif old is None or is_newer((raw, rec), old):
                slot[rec.publisher] = (raw, rec)
                self._keys_of.setdefault(rec.publisher, {})[dkey] = rec.expires
        self.stamp[dkey] = time.monotonic()
        self.records(dkey)  # drops the key again if nothing was kept
        return refused

    def _has_room(self, publisher: str) -> bool:
        """Whether ``publisher`` may hold a record under one more key, once its expired ones are gone."""
        keys = self._keys_of.get(publisher, {})
        if len(keys) >= MAX_KEYS_PER_PUBLISHER:
            now = time.time()
            for dkey in [k for k, expires in keys.items() if expires < now]:
                self._forget(dkey, publisher)
        return len(keys) < MAX_KEYS_PER_PUBLISHER

    def _forget(self, dkey: bytes, publisher: str) -> None:
        """Drop ``publisher``'s record of ``dkey``, and the key once nobody's record is left."""
        slot = self.data.get(dkey, {})
        slot.pop(publisher, None)
        if not slot:
            self.data.pop(dkey, None)
            self.stamp.pop(dkey, None)
        keys = self._keys_of.get(publisher, {})
        keys.pop(dkey, None)
        if not keys:
            self._keys_of.pop(publisher, None)

    def records(self, dkey: bytes) -> list[tuple[bytes, Record]]:
        """Unexpired records of a key, ordered by publisher (stable for paging)."""
        slot, now = self.data.get(dkey, {}), time.time()
        for publisher in [p for p, (_, rec) in slot.items() if rec.expires < now]:
            self._forget(dkey, publisher)
        if not slot:
            self.data.pop(dkey, None)
            self.stamp.pop(dkey, None)
        return [slot[p] for p in sorted(slot)]

    def __setitem__(self, key: bytes, value: Any) -> NoReturn:
        raise TypeError("records must be verified first: use merge()")

    def get(self, key: bytes, default: Any = None) -> Any:
        return [raw for raw, _ in self.records(key)] or default

    def __getitem__(self, key: bytes) -> list[bytes]:
        if raws := self.get(key):
            return raws
        raise KeyError(key)

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, list[bytes]]]:
        cutoff = time.monotonic() - seconds_old
        return [(k, raws) for k in list(self.data) if self.stamp.get(k, 0) <= cutoff and (raws := self.get(k))]

    def __iter__(self) -> Any:
        return iter(self.iter_older_than(-math.inf))
