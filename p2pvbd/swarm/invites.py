"""Invite tokens and the join protocol: how a new machine gets a certificate from the swarm's CA.

Split out of ``trust`` (keys, certificates, TLS contexts), which this module builds on. The founding host
prints a one-time token (``make_invite``) naming its addresses, pinning its CA and carrying a secret, and
remembers it in ``trust/invites.json``. The joiner sends a CSR with an HMAC proof of the secret
(``make_join_request``); the founder checks it, signs a host certificate and burns the invite
(``accept_join``); the joiner checks the reply against the token and stores its identity (``finish_join``).

Everything here is pure (bytes, paths, clocks passed in); the sockets live in ``peer_transport``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from p2pvbd.base.files import atomic_write
from p2pvbd.swarm.revoked import REVOKED_FILE, RevocationBook
from p2pvbd.swarm.trust import (
    SWARM_SECRET_BYTES,
    HostIdentity,
    TrustError,
    binding_for,
    cert_fingerprint,
    cert_to_pem,
    check_host_name,
    has_identity,
    issue_host_cert,
    key_binding_valid,
    load_identity,
    public_key_raw,
    save_identity,
    trust_dir,
    verify_host_cert,
)

INVITES_FILE = "invites.json"
INVITES_LOCK_FILE = "invites.lock"
# 128 bits: far beyond online guessing within an invite's lifetime.
INVITE_SECRET_BYTES = 16
# A token may carry a longer secret (newer versions), but nothing absurd.
MAX_INVITE_SECRET_BYTES = 64
# Invites are for "type this on the other machine now"; a week-old live token is a leak, not a feature.
MAX_INVITE_TTL_SECONDS = 7 * 24 * 3600
# A host rarely has more than a handful of addresses (LAN v4/v6, VPN, public); 16 is generous.
MAX_INVITE_ADDRESSES = 16
# host:port or [v6]:port fits easily; longer strings are not addresses.
MAX_ADDRESS_CHARS = 262
# 16 addresses x 262 chars plus the fixed fields, base64-inflated, stays below this.
MAX_TOKEN_CHARS = 8192
# Expired, never-used invites are kept this long so a late joiner gets "expired", not "unknown".
INVITE_PRUNE_AFTER_SECONDS = 30 * 24 * 3600

TOKEN_PREFIX = "p2pvbd1:"
JOIN_PROOF_LABEL = b"p2pvbd-join"
INVITE_ID_LABEL = b"p2pvbd-invite-id"


class InviteError(TrustError):
    """An invite token that cannot be used (malformed, unknown, used, expired) or a refused join."""


# ---- invites -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invite:
    """A parsed invite token, as the joiner sees it."""

    addresses: list[str]
    ca_fingerprint: str
    secret: bytes
    expires: float

    @property
    def invite_id(self) -> str:
        return invite_id_of(self.secret)


@dataclass
class InviteRecord:
    """What the inviter remembers about a token it printed (in ``trust/invites.json``).

    The secret itself is stored, not only its hash, because the inviter must recompute the joiner's HMAC
    proof; the file is 0600 beside ``ca.key``, which is worth far more, so hashing would protect nothing.
    Used records stay forever: they are the list of names this CA has issued.
    """

    invite_id: str
    secret: str
    expires: float
    created: float
    used: bool = False
    used_by: str | None = None
    used_at: float | None = None


def invite_id_of(secret: bytes) -> str:
    """What a joiner quotes so the inviter finds the record without the secret ever crossing the wire."""
    return hashlib.sha256(INVITE_ID_LABEL + secret).hexdigest()


def make_invite(identity: HostIdentity, addresses: list[str], ttl_seconds: int, now: float) -> tuple[str, InviteRecord]:
    """A one-line token for the new machine, and the record the inviter must ``record_invite``."""
    if not identity.can_invite:
        raise InviteError(f"host {identity.name!r} does not hold the swarm CA key; run 'invite' on the founding host")
    if not 0 < ttl_seconds <= MAX_INVITE_TTL_SECONDS:
        raise InviteError(f"invite lifetime must be between 1 and {MAX_INVITE_TTL_SECONDS} seconds")
    if not addresses or len(addresses) > MAX_INVITE_ADDRESSES:
        raise InviteError(f"an invite needs 1 to {MAX_INVITE_ADDRESSES} addresses")
    for a in addresses:
        if not isinstance(a, str) or not 0 < len(a) <= MAX_ADDRESS_CHARS:
            raise InviteError(f"bad address in invite: {a!r}")
    secret = secrets.token_bytes(INVITE_SECRET_BYTES)
    expires = float(int(now + ttl_seconds))
    payload = {"addresses": list(addresses), "ca_fingerprint": bytes.fromhex(identity.ca_fingerprint),
               "secret": secret, "expires": int(expires)}
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(msgpack.packb(payload)).rstrip(b"=").decode()
    return token, InviteRecord(invite_id=invite_id_of(secret), secret=secret.hex(), expires=expires, created=now)


def parse_invite(token: str) -> Invite:
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise InviteError(f"not a p2pvbd invite token (it should start with {TOKEN_PREFIX!r})")
    if len(token) > MAX_TOKEN_CHARS:
        raise InviteError("invite token is too long")
    body = token[len(TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_ext_len=0)
    except (binascii.Error, ValueError, msgpack.UnpackException) as e:
        raise InviteError("invite token is damaged (was it copied completely?)") from e
    if not isinstance(obj, dict):
        raise InviteError("invite token is damaged")
    addresses, fp, secret, expires = (obj.get(k) for k in ("addresses", "ca_fingerprint", "secret", "expires"))
    if (not isinstance(addresses, list) or not 0 < len(addresses) <= MAX_INVITE_ADDRESSES
            or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDRESS_CHARS for a in addresses)
            or not isinstance(fp, bytes) or len(fp) != hashlib.sha256().digest_size
            or not isinstance(secret, bytes) or not INVITE_SECRET_BYTES <= len(secret) <= MAX_INVITE_SECRET_BYTES
            or isinstance(expires, bool) or not isinstance(expires, int | float)):
        raise InviteError("invite token is damaged or from an incompatible version")
    return Invite(addresses=addresses, ca_fingerprint=fp.hex(), secret=secret, expires=float(expires))


@contextlib.contextmanager
def _invites_locked(home: Path) -> Iterator[dict[str, InviteRecord]]:
    """Read-modify-write of invites.json under an flock, so the CLI and the daemon never lose an update."""
    tdir = trust_dir(home)
    tdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(tdir / INVITES_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = tdir / INVITES_FILE
        try:
            raw = json.loads(path.read_text()) if path.exists() else []
            records = {r["invite_id"]: InviteRecord(**r) for r in raw}
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise TrustError(f"cannot read {path}: {e}") from e
        before = {k: asdict(v) for k, v in records.items()}
        yield records
        if {k: asdict(v) for k, v in records.items()} != before:
            data = json.dumps([asdict(r) for r in records.values()], indent=1).encode()
            atomic_write(path, data, 0o600)
    finally:
        os.close(fd)  # closing releases the flock


def record_invite(home: Path, record: InviteRecord, *, now: float | None = None) -> None:
    now = time.time() if now is None else now
    with _invites_locked(home) as records:
        for k, r in list(records.items()):
            if not r.used and r.expires + INVITE_PRUNE_AFTER_SECONDS < now:
                del records[k]
        records[record.invite_id] = record


def _check_usable(record: InviteRecord | None, now: float) -> InviteRecord:
    if record is None:
        raise InviteError("unknown invite token: it was not issued by this host (or was revoked)")
    if record.used:
        raise InviteError(f"this invite token was already used (by host {record.used_by!r}); ask for a new one")
    if now > record.expires:
        raise InviteError("this invite token has expired; ask for a new one")
    return record


def lookup_invite(home: Path, invite_id: str, now: float) -> InviteRecord:
    """The usable record for ``invite_id``, or InviteError saying why not. Does not consume it."""
    with _invites_locked(home) as records:
        return _check_usable(records.get(invite_id), now)


def outstanding_invites(home: Path, now: float) -> int:
    """Invites that can still be used: the join port listens only while there are any."""
    with _invites_locked(home) as records:
        return sum(1 for r in records.values() if not r.used and now <= r.expires)


def taken_names(identity: HostIdentity) -> set[str]:
    """Host names this CA has issued: its own and every joiner's (the used invite records)."""
    with _invites_locked(identity.home) as records:
        return {identity.name} | {r.used_by for r in records.values() if r.used_by}


def consume_invite(home: Path, invite_id: str, now: float, *, used_by: str | None = None) -> InviteRecord:
    """Mark the invite used, atomically (flock + atomic replace): of two racing joiners exactly one wins.

    Takes the invite id (``invite_id_of(secret)``) because the inviter never receives the secret itself.
    When ``used_by`` is given, the name is also checked against the issued names inside the same lock.
    """
    with _invites_locked(home) as records:
        record = _check_usable(records.get(invite_id), now)
        if used_by is not None and any(r.used_by == used_by for r in records.values()):
            raise InviteError(f"host name {used_by!r} is already taken in this swarm; choose another")
        record.used, record.used_by, record.used_at = True, used_by, now
        return InviteRecord(**asdict(record))


# ---- join ----------------------------------------------------------------------------------------


def make_csr(key: ed25519.Ed25519PrivateKey, name: str) -> bytes:
    """The joiner's certificate request (PEM): proves possession of the key it wants certified."""
    check_host_name(name)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, None))
    return csr.public_bytes(serialization.Encoding.PEM)


def join_proof(secret: bytes, public_key: bytes, name: str) -> bytes:
    """HMAC over the joiner's key and name: proves knowledge of the secret without revealing it, and binds
    the proof to this key and name so an eavesdropper (or a relaying server) cannot reuse it for another.
    """
    return hmac.new(secret, JOIN_PROOF_LABEL + public_key + name.encode(), "sha256").digest()


def make_join_request(invite: Invite, key: ed25519.Ed25519PrivateKey, name: str) -> dict[str, Any]:
    """The body of the ``join`` request."""
    return {"invite_id": invite.invite_id, "name": name, "csr": make_csr(key, name),
            "proof": join_proof(invite.secret, public_key_raw(key.public_key()), name)}


def _parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError) as e:
        raise InviteError("join request carries an unreadable certificate request") from e
    if not isinstance(csr.public_key(), ed25519.Ed25519PublicKey) or not csr.is_signature_valid:
        raise InviteError("join request's certificate request is not a valid Ed25519 request")
    return csr


def sign_host_csr(ca_key: ed25519.Ed25519PrivateKey, ca_cert: x509.Certificate,
                  csr: x509.CertificateSigningRequest | bytes, name: str, taken: set[str] | frozenset[str],
                  *, now: float | None = None) -> x509.Certificate:
    """Issue a host cert for the CSR's key. The subject comes from ``name``, never from the CSR."""
    try:
        check_host_name(name)
    except TrustError as e:
        raise InviteError(str(e)) from e
    if name in taken:
        raise InviteError(f"host name {name!r} is already taken in this swarm; choose another")
    if isinstance(csr, bytes):
        csr = _parse_csr(csr)
    elif not csr.is_signature_valid:
        raise InviteError("certificate request signature is invalid")
    public_key = csr.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise InviteError("only Ed25519 host keys are accepted")
    return issue_host_cert(ca_key, ca_cert, public_key, name, time.time() if now is None else now)


def accept_join(identity: HostIdentity, body: dict[str, Any], now: float) -> dict[str, Any]:
    """The inviter's whole decision on a ``join`` request; returns the reply body or raises InviteError.

    Order matters: everything that can fail without burning the invite (proof, name, CSR) is checked
    first; consuming the invite is the last step before the reply.
    """
    if identity.ca_key is None:
        raise InviteError(f"host {identity.name!r} does not hold the swarm CA key and cannot accept joins")
    invite_id, name, csr_pem, proof = (body.get(k) for k in ("invite_id", "name", "csr", "proof"))
    if not (isinstance(invite_id, str) and isinstance(name, str) and isinstance(csr_pem, bytes)
            and isinstance(proof, bytes)):
        raise InviteError("malformed join request")
    record = lookup_invite(identity.home, invite_id, now)
    csr = _parse_csr(csr_pem)
    expected = join_proof(bytes.fromhex(record.secret), public_key_raw(csr.public_key()), name)  # type: ignore[arg-type]
    if not hmac.compare_digest(expected, proof):
        raise InviteError("join proof does not match the invite secret")
    if RevocationBook(identity.trust_dir / REVOKED_FILE, identity.ca_cert.public_key()).revokes(name):  # type: ignore[arg-type]
        # its old certificate is refused everywhere: a new one under the name would be isolated at once
        raise InviteError(f"{name} was revoked; choose another name")
    cert = sign_host_csr(identity.ca_key, identity.ca_cert, csr, name, taken_names(identity), now=now)
    consume_invite(identity.home, invite_id, now, used_by=name)
    return {"ca": identity.ca_pem, "cert": cert_to_pem(cert), "swarm_secret": identity.swarm_secret,
            "binding": binding_for(identity.ca_key, cert)}


def check_ca(ca_pem: bytes, expected_fingerprint: str) -> x509.Certificate:
    """The joiner's pin: the CA it is handed must be the one the token names, or nothing is trusted."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except (ValueError, TypeError) as e:
        raise TrustError("the inviter sent an unreadable CA certificate") from e
    if not hmac.compare_digest(cert_fingerprint(ca), expected_fingerprint.lower()):
        raise TrustError("the inviter's CA does not match the invite token: this is not the swarm you were invited to")
    return ca


def finish_join(home: Path, invite: Invite, key: ed25519.Ed25519PrivateKey, name: str,
                reply: dict[str, Any], *, now: float | None = None) -> HostIdentity:
    """Check the inviter's reply against the token and our key, then store the new identity."""
    ca_pem, cert_pem, swarm_secret, binding = (reply.get(k) for k in ("ca", "cert", "swarm_secret", "binding"))
    if not (isinstance(ca_pem, bytes) and isinstance(cert_pem, bytes) and isinstance(swarm_secret, bytes)
            and isinstance(binding, bytes)):
        raise TrustError("malformed join reply")
    if len(swarm_secret) != SWARM_SECRET_BYTES:
        raise TrustError("join reply carries a swarm secret of the wrong size")
    ca = check_ca(ca_pem, invite.ca_fingerprint)
    cert = x509.load_pem_x509_certificate(cert_pem)
    if verify_host_cert(cert, ca, now=now) != name:
        raise TrustError("the issued certificate is for another host name")
    if public_key_raw(cert.public_key()) != public_key_raw(key.public_key()):  # type: ignore[arg-type]
        raise TrustError("the issued certificate is for another key")
    if not key_binding_valid(ca.public_key(), name, public_key_raw(key.public_key()), binding,  # type: ignore[arg-type]
                             time.time() if now is None else now):
        raise TrustError("the inviter's binding of this host's name to its key does not verify")
    if has_identity(home):
        raise TrustError(f"{trust_dir(home)} already holds a host identity; refusing to overwrite it")
    save_identity(home, key=key, cert=cert, ca_cert=ca, swarm_secret=swarm_secret, ca_key=None, binding=binding)
    return load_identity(home)
