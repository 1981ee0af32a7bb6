"""What each kind of index record may say: the schema a record's payload passes before anyone reads it.

A record's signature proves who signed it, not that what it says is well formed: every swarm member can
sign any payload. So ``dht_records.parse_record`` checks the payload against its kind's schema right
after the signature, and a record that fails is dropped there: counted (``bad_payload``), logged once per
publisher, key and reason by ``dht``, never stored, forwarded or returned by a lookup. Code reading a
``Record.payload`` may therefore index its fields and trust their types and ranges.

=========  ===============  =====================================================================
kind       key              payload
=========  ===============  =====================================================================
host       its publisher    ``addresses``: 1 to 16 distinct "host:port" (IPv4, [IPv6] or a host name;
                            port 1 to 65535); ``cert``: the TLS certificate's sha256, 64 lowercase hex;
                            optional (defaults "unknown", [], []): ``reach``: "direct", "nat" or
                            "unknown"; ``seen_as``: up to 4 distinct IP addresses; ``links``: up to 64
                            distinct host names
owner      a disk name      ``host``: the publisher; ``epoch``: int
holders    a disk name      ``host``: the publisher; ``current_blocks``: int; ``generation``: int;
                            optional ``gone``: true once the host deleted its replica (`disk delete`)
catalog    a name           ``host``: the publisher; ``disks``: up to 256 distinct disk names
policy     a disk name      ``disk``: the key; ``hosts``: up to 64 distinct host names; ``rate``: -1
                            (unlimited) or bytes/s in [1, 2**63]; ``set_at``: seconds in [0, 2**63)
vm         its first disk   a VM definition as ``wire.vm_definition.VmDefinition`` checks it (name, disks,
                            memory, cpus, accel, kernel, initrd, append, qemu_args, set_at, allow)
revoked    "swarm"          ``serial``: int >= 1; ``names``: up to 8 distinct host names, sorted; ``sig``:
                            64 bytes (the CA's signature, checked by its readers: ``revocation``)
=========  ===============  =====================================================================

Names (keys, publishers, host and disk names inside payloads) follow ``home.NAME_RE``, the rule
``check_name`` applies to every host and disk name, matched in full. An int is an int (not a bool, not a
float) in [0, 2**63); ``rate`` and ``set_at`` are finite ints or floats, read as floats. A host speaks for
itself only: the ``host`` an owner, holders or catalog record names is its publisher. Fields beyond these
are allowed, so a newer version can add some without older hosts dropping its records (the record size
bounds them), and they are left out of the payload consumers get.

Semantics are the consumers' business: a valid record may still name a host nobody knows or an epoch
lower than one already seen. Pure: no trio, no asyncio.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from p2pvbd.base.home import AddressError, is_ip, is_name, parse_hostport
from p2pvbd.wire.revocation import MAX_REVOKED_HOSTS, REVOKED_KEY
from p2pvbd.wire.vm_definition import MAX_CLOCK_AHEAD_SECONDS as MAX_CLOCK_AHEAD_SECONDS
from p2pvbd.wire.vm_definition import VmDefinition

# Epochs, generations and block counts: msgpack's and numpy's int64 and the store's state hold below this.
MAX_COUNTER = 2**63
# Addresses in a host record: the same bound as the address book keeps per peer (swarm/address_book.py).
MAX_HOST_ADDRESSES = 16
# A "host:port" string: a DNS name's 253 characters (RFC 1035) plus ":65535".
MAX_ADDRESS_CHARS = 259
# How a host record says the host can be reached (swarm/node.Swarm.reach).
REACH_KINDS = ("direct", "nat", "unknown")
# Public addresses a host behind NAT lists: peers on different networks may see it behind different
# NATs (a carrier's, a home router's), a few at most.
MAX_SEEN_AS = 4
# Members a host lists as holding a direct link to it: its standing links (swarm/node.MAX_STANDING_LINKS).
MAX_LINKS_LISTED = 64
# Disks in one host's catalog: more short names than one record (dht_records.MAX_RECORD_BYTES) holds,
# so the record size is the real limit; this one makes the list's bound explicit.
MAX_CATALOG_DISKS = 256
# Hosts a policy names: one person's machines, with headroom (as dht_records.MAX_RECORDS_PER_KEY).
MAX_POLICY_HOSTS = 64
# A policy's cap on the owner's upload, bytes/s; -1 means unlimited. Below a byte a second a background
# pull's first reply would take longer than the records that started it live: no one means that.
MIN_RATE = 1.0
MAX_RATE = float(2**63)
UNLIMITED_RATE = -1
# trust.cert_fingerprint: sha256 of the DER certificate, in lowercase hex.
_CERT_RE = re.compile(r"[0-9a-f]{64}")
# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens, 253 characters at most;
# inner underscores too, which /etc/hosts and some resolvers accept.
_DNS_RE = re.compile(r"(?=.{1,253}\.?\Z)[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?")


class PayloadError(ValueError):
    """A payload does not match its kind's schema; the message names the field and what is wrong with it."""


def is_address(x: object) -> bool:
    """"host:port" that ``home.parse_hostport`` accepts with a port and a connect can be tried with: an
    IPv4 literal, a bracketed IPv6 literal or a DNS name."""
    if not isinstance(x, str) or len(x) > MAX_ADDRESS_CHARS:
        return False
    try:
        host, _ = parse_hostport(x, default_port=None)
    except AddressError:
        return False
    if x.startswith("["):
        return ":" in host and is_ip(host, scoped=True)
    return is_ip(host) or _DNS_RE.fullmatch(host) is not None


def _is_seen_ip(x: object) -> bool:
    return isinstance(x, str) and len(x) <= MAX_ADDRESS_CHARS and is_ip(x, scoped=True)


def _type_name(x: object) -> str:
    return type(x).__name__


def _field(p: dict[str, Any], name: str) -> Any:
    if name not in p:
        raise PayloadError(f"{name}: missing")
    return p[name]


def _counter(p: dict[str, Any], name: str) -> int:
    x = _field(p, name)
    if type(x) is not int:
        raise PayloadError(f"{name}: not an int ({_type_name(x)})")
    if not 0 <= x < MAX_COUNTER:
        raise PayloadError(f"{name}: outside [0, 2**63)")
    return x


def _number(p: dict[str, Any], name: str) -> float:
    x = _field(p, name)
    if type(x) not in (int, float) or not math.isfinite(x):
        raise PayloadError(f"{name}: not a finite number ({_type_name(x)})")
    return float(x)


def _name(p: dict[str, Any], name: str) -> str:
    x = _field(p, name)
    if not is_name(x):
        raise PayloadError(f"{name}: not a name")
    return str(x)


def _strings(p: dict[str, Any], name: str, ok: Callable[[object], bool], what: str, limit: int,
             least: int = 0) -> list[str]:
    x = _field(p, name)
    if not isinstance(x, list):
        raise PayloadError(f"{name}: not a list ({_type_name(x)})")
    if not least <= len(x) <= limit:
        raise PayloadError(f"{name}: {len(x)} entries, not {least} to {limit}")
    if not all(ok(e) for e in x):
        raise PayloadError(f"{name}: an entry is not {what}")
    if len(set(x)) != len(x):
        raise PayloadError(f"{name}: duplicate entries")
    return list(x)


def _publisher_host(p: dict[str, Any], publisher: str) -> str:
    host = _name(p, "host")
    if host != publisher:
        raise PayloadError("host: not the publisher (a host speaks for itself only)")
    return host


def _host(key: str, publisher: str, p: dict[str, Any]) -> dict[str, Any]:
    if key != publisher:
        raise PayloadError("key: not the publisher (a host publishes its own host record only)")
    cert = _field(p, "cert")
    if not (isinstance(cert, str) and _CERT_RE.fullmatch(cert)):
        raise PayloadError("cert: not 64 lowercase hex digits")
    reach = p.get("reach", "unknown")
    if reach not in REACH_KINDS:
        raise PayloadError(f"reach: not one of {', '.join(REACH_KINDS)}")
    return {"addresses": _strings(p, "addresses", is_address, "host:port", MAX_HOST_ADDRESSES, least=1),
            "cert": cert, "reach": reach,
            "seen_as": _strings(p, "seen_as", _is_seen_ip, "an IP address", MAX_SEEN_AS) if "seen_as" in p else [],
            "links": _strings(p, "links", is_name, "a host name", MAX_LINKS_LISTED) if "links" in p else []}


def _owner(key: str, publisher: str, p: dict[str, Any]) -> dict[str, Any]:
    return {"host": _publisher_host(p, publisher), "epoch": _counter(p, "epoch")}


def _holders(key: str, publisher: str, p: dict[str, Any]) -> dict[str, Any]:
    gone = p.get("gone", False)
    if not isinstance(gone, bool):
        raise PayloadError("gone: not a bool")
    return {"host": _publisher_host(p, publisher), "current_blocks": _counter(p, "current_blocks"),
            "generation": _counter(p, "generation")} | ({"gone": True} if gone else {})


def _catalog(key: str, publisher: str, p: dict[str, Any]) -> dict[str, Any]:
    return {"host": _publisher_host(p, publisher),
            "disks": _strings(p, "disks", is_name, "a disk name", MAX_CATALOG_DISKS)}


def _policy(key: str, publisher: str, p: dict[str, Any]) -> dict[str, Any]:
    if _name(p, "disk") != key:
        raise PayloadError("disk: not the record's key")
    rate = _number(p, "rate")
    if rate != UNLIMITED_RATE and not MIN_RATE <= rate <= MAX_RATE:
        raise PayloadError("rate: neither -1 (unlimited) nor in [1, 2**63] bytes/s")
    set_at = _number(p, "set_at")
    if not 0 <= set_at < MAX_COUNTER:
        raise PayloadError("set_at: outside [0, 2**63)")
    return {"disk": key, "hosts": _strings(p, "hosts", is_name, "a host name", MAX_POLICY_HOSTS), "rate": rate,
            "set_at": set_at}


def _vm(key: str, publisher: str, p: dict[str, Any]) -> dict[str, Any]:
    try:
        vm = VmDefinition.from_payload(p)
    except ValueError as e:
        raise PayloadError(str(e)) from None
    if vm.disks[0] != key:
        raise PayloadError("disks: the first is not the record's key")
    if not 0 <= vm.set_at < MAX_COUNTER:
        raise PayloadError("set_at: outside [0, 2**63)")
    return vm.as_payload()


def _revoked(key: str, publisher: str, p: dict[str, Any]) -> dict[str, Any]:
    if key != REVOKED_KEY:
        raise PayloadError(f"key: not {REVOKED_KEY!r}")
    serial = _counter(p, "serial")
    if serial < 1:
        raise PayloadError("serial: below 1")
    names = _strings(p, "names", is_name, "a host name", MAX_REVOKED_HOSTS)
    if names != sorted(names):
        raise PayloadError("names: not sorted")
    sig = _field(p, "sig")
    if not (isinstance(sig, bytes) and len(sig) == 64):
        raise PayloadError("sig: not 64 bytes")
    return {"serial": serial, "names": names, "sig": sig}


_SCHEMAS: dict[str, Callable[[str, str, dict[str, Any]], dict[str, Any]]] = {
    "host": _host, "owner": _owner, "holders": _holders, "catalog": _catalog, "policy": _policy, "vm": _vm,
    "revoked": _revoked}
KINDS = frozenset(_SCHEMAS)


def check_payload(kind: object, key: object, publisher: object, payload: object) -> dict[str, Any]:
    """The payload reduced to its kind's fields, every one checked; PayloadError (and nothing else) if
    anything is wrong."""
    if not (isinstance(kind, str) and kind in _SCHEMAS):
        raise PayloadError("kind: unknown")
    if not is_name(key):
        raise PayloadError("key: not a name")
    if not is_name(publisher):
        raise PayloadError("publisher: not a name")
    if not (isinstance(payload, dict) and all(isinstance(k, str) for k in payload)):
        raise PayloadError("payload: not a map of field names")
    return _SCHEMAS[kind](str(key), str(publisher), payload)
