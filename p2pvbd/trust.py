"""Swarm trust: the keys, certificates and invite tokens that let a person's machines trust each other only.

A swarm is a private CA. Every host holds an Ed25519 key and a certificate signed by that CA, and peer
connections are mutual TLS 1.3 against the CA alone, so a machine outside the swarm fails the handshake
before it can send a single request. Only the founding host keeps the CA key; a new machine joins by
presenting a one-time invite token that the founder printed (see ``make_invite`` and the join functions).

Everything here is pure (bytes, paths, clocks passed in); the sockets live in ``peer_transport``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import ssl
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pvbd.home import NAME_RE

TRUST_DIR = "trust"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
HOST_KEY_FILE = "host.key"
HOST_CERT_FILE = "host.pem"
SWARM_SECRET_FILE = "swarm_secret"
INVITES_FILE = "invites.json"
INVITES_LOCK_FILE = "invites.lock"

# Host certificates live as long as the machine is likely to: there is no rotation machinery yet.
HOST_CERT_VALIDITY = dt.timedelta(days=3650)
# The CA must outlive the host certs it signs; host certs are additionally capped at the CA's expiry.
CA_CERT_VALIDITY = dt.timedelta(days=2 * 3650)
# Certs are backdated this much so a peer whose clock is a little behind still accepts a fresh cert.
CLOCK_SKEW = dt.timedelta(minutes=10)
# HMAC-SHA256 key size: the swarm secret keys DHT datagram MACs.
SWARM_SECRET_BYTES = 32
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


class TrustError(Exception):
    """A user-facing problem with keys, certificates or the trust directory."""


class InviteError(TrustError):
    """An invite token that cannot be used (malformed, unknown, used, expired) or a refused join."""


# ---- identity ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostIdentity:
    """Everything a host needs to speak to its swarm. ``ca_key`` is set only on the founding host."""

    home: Path
    name: str
    key: ed25519.Ed25519PrivateKey
    cert: x509.Certificate
    ca_cert: x509.Certificate
    swarm_secret: bytes
    ca_key: ed25519.Ed25519PrivateKey | None = None

    @property
    def trust_dir(self) -> Path:
        return trust_dir(self.home)

    @property
    def ca_fingerprint(self) -> str:
        return cert_fingerprint(self.ca_cert)

    @property
    def cert_fingerprint(self) -> str:
        return cert_fingerprint(self.cert)

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_path(self) -> Path:
        return self.trust_dir / HOST_CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.trust_dir / HOST_KEY_FILE

    @property
    def can_invite(self) -> bool:
        return self.ca_key is not None


def trust_dir(home: Path) -> Path:
    return Path(home) / TRUST_DIR


def has_identity(home: Path) -> bool:
    return (trust_dir(home) / HOST_KEY_FILE).exists()


def cert_fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the DER encoding, hex: what tokens pin and what `p2pvbd` prints."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _check_host_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TrustError(f"invalid host name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file created with its final mode, so a key is never briefly world-readable."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _public_raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def new_host_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _make_ca(now: float) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.generate()
    # A random suffix gives each swarm's CA a distinct subject, so OpenSSL reports a foreign host as
    # "unable to get local issuer" instead of trying (and failing) a same-named CA's signature.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pvbd swarm {secrets.token_hex(8)}")])
    start = _utc(now) - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CA_CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    return key, cert


def _issue_host_cert(ca_key: ed25519.Ed25519PrivateKey, ca_cert: x509.Certificate,
                     public_key: ed25519.Ed25519PublicKey, name: str, now: float) -> x509.Certificate:
    start = _utc(now) - CLOCK_SKEW
    end = min(start + HOST_CERT_VALIDITY, ca_cert.not_valid_after_utc)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, None)
    )


def _save_identity(home: Path, *, key: ed25519.Ed25519PrivateKey, cert: x509.Certificate,
                   ca_cert: x509.Certificate, swarm_secret: bytes,
                   ca_key: ed25519.Ed25519PrivateKey | None) -> None:
    tdir = trust_dir(home)
    tdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(tdir, 0o700)
    _write_file(tdir / CA_CERT_FILE, _cert_pem(ca_cert), 0o644)
    if ca_key is not None:
        _write_file(tdir / CA_KEY_FILE, _key_pem(ca_key), 0o600)
    _write_file(tdir / SWARM_SECRET_FILE, swarm_secret, 0o600)
    _write_file(tdir / HOST_CERT_FILE, _cert_pem(cert), 0o644)
    # The host key goes last: its presence is what marks the identity as complete (has_identity).
    _write_file(tdir / HOST_KEY_FILE, _key_pem(key), 0o600)


def create_swarm(home: Path, host_name: str, *, now: float | None = None) -> HostIdentity:
    """Found a new swarm: its CA, its secret, and this host as the first member (and only CA holder)."""
    _check_host_name(host_name)
    if has_identity(home):
        raise TrustError(f"{trust_dir(home)} already holds a host identity; refusing to overwrite it")
    now = time.time() if now is None else now
    ca_key, ca_cert = _make_ca(now)
    key = new_host_key()
    cert = _issue_host_cert(ca_key, ca_cert, key.public_key(), host_name, now)
    _save_identity(home, key=key, cert=cert, ca_cert=ca_cert, swarm_secret=secrets.token_bytes(SWARM_SECRET_BYTES),
                   ca_key=ca_key)
    return load_identity(home)


def _load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TrustError(f"{path} is not an Ed25519 key")
    return key


def load_identity(home: Path) -> HostIdentity:
    tdir = trust_dir(home)
    if not has_identity(home):
        raise TrustError(f"{tdir} holds no host identity: create a swarm or join one first")
    try:
        key = _load_private_key(tdir / HOST_KEY_FILE)
        cert = x509.load_pem_x509_certificate((tdir / HOST_CERT_FILE).read_bytes())
        ca_cert = x509.load_pem_x509_certificate((tdir / CA_CERT_FILE).read_bytes())
        swarm_secret = (tdir / SWARM_SECRET_FILE).read_bytes()
        ca_key_path = tdir / CA_KEY_FILE
        ca_key = _load_private_key(ca_key_path) if ca_key_path.exists() else None
    except (OSError, ValueError) as e:
        raise TrustError(f"cannot load the host identity from {tdir}: {e}") from e
    if len(swarm_secret) != SWARM_SECRET_BYTES:
        raise TrustError(f"{tdir / SWARM_SECRET_FILE} is not {SWARM_SECRET_BYTES} bytes")
    name = verify_host_cert(cert, ca_cert)
    if _public_raw(cert.public_key()) != _public_raw(key.public_key()):  # type: ignore[arg-type]
        raise TrustError(f"{tdir / HOST_CERT_FILE} does not match {tdir / HOST_KEY_FILE}")
    return HostIdentity(home=Path(home), name=name, key=key, cert=cert, ca_cert=ca_cert,
                        swarm_secret=swarm_secret, ca_key=ca_key)


def verify_host_cert(cert: x509.Certificate | bytes, ca_cert: x509.Certificate, *, now: float | None = None) -> str:
    """Check that ``cert`` (object, PEM or DER) is a live host cert signed by ``ca_cert``; return its host name.

    Used where OpenSSL is not doing it for us: when a joiner pins the inviter's TLS certificate, and on load.
    """
    try:
        if isinstance(cert, bytes):
            cert = (x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----")
                    else x509.load_der_x509_certificate(cert))
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise TrustError(f"certificate is not signed by this swarm's CA: {e or type(e).__name__}") from e
    now_dt = _utc(time.time() if now is None else now)
    if not cert.not_valid_before_utc <= now_dt <= cert.not_valid_after_utc:
        raise TrustError("certificate is not valid at this time (check the clock)")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise TrustError("a CA certificate is not a host certificate")
    except x509.ExtensionNotFound as e:
        raise TrustError("host certificate lacks basicConstraints") from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise TrustError("host certificate must have exactly one common name")
    return _check_host_name(names[0].value)


# ---- TLS -----------------------------------------------------------------------------------------


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    # TLS 1.3 only: encrypted certificates (host names stay private), no legacy cipher negotiation.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_ssl_context(identity: HostIdentity) -> ssl.SSLContext:
    """Mutual TLS for the peer port: only certificates from this swarm's CA get past the handshake."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=identity.ca_pem.decode())
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def client_ssl_context(identity: HostIdentity) -> ssl.SSLContext:
    """Mutual TLS to a peer. No host name check: the CA is the authority, the peer's CN is its name."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=identity.ca_pem.decode())
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def join_server_ssl_context(identity: HostIdentity) -> ssl.SSLContext:
    """The inviter's join listener: a joiner has no certificate yet, so none is asked for.

    Serve it on its own port, open only while invites are outstanding; the peer port never relaxes.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def join_client_ssl_context() -> ssl.SSLContext:
    """The joiner's side: no CA to verify against yet. Callers must pin the server before sending the proof:
    fetch the CA, ``check_ca`` it against the token, then ``verify_host_cert`` the server's TLS certificate.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_name(ssl_object: Any) -> str:
    """The host name (certificate CN) of a verified peer; '' when the peer presented no verified cert."""
    cert = ssl_object.getpeercert()
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise TrustError("peer certificate has no common name")


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
            _write_file(path, data, 0o600)
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
    _check_host_name(name)
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
            "proof": join_proof(invite.secret, _public_raw(key.public_key()), name)}


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
        _check_host_name(name)
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
    return _issue_host_cert(ca_key, ca_cert, public_key, name, time.time() if now is None else now)


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
    expected = join_proof(bytes.fromhex(record.secret), _public_raw(csr.public_key()), name)  # type: ignore[arg-type]
    if not hmac.compare_digest(expected, proof):
        raise InviteError("join proof does not match the invite secret")
    cert = sign_host_csr(identity.ca_key, identity.ca_cert, csr, name, taken_names(identity), now=now)
    consume_invite(identity.home, invite_id, now, used_by=name)
    return {"ca": identity.ca_pem, "cert": _cert_pem(cert), "swarm_secret": identity.swarm_secret}


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
    ca_pem, cert_pem, swarm_secret = (reply.get(k) for k in ("ca", "cert", "swarm_secret"))
    if not (isinstance(ca_pem, bytes) and isinstance(cert_pem, bytes) and isinstance(swarm_secret, bytes)):
        raise TrustError("malformed join reply")
    if len(swarm_secret) != SWARM_SECRET_BYTES:
        raise TrustError("join reply carries a swarm secret of the wrong size")
    ca = check_ca(ca_pem, invite.ca_fingerprint)
    cert = x509.load_pem_x509_certificate(cert_pem)
    if verify_host_cert(cert, ca, now=now) != name:
        raise TrustError("the issued certificate is for another host name")
    if _public_raw(cert.public_key()) != _public_raw(key.public_key()):  # type: ignore[arg-type]
        raise TrustError("the issued certificate is for another key")
    if has_identity(home):
        raise TrustError(f"{trust_dir(home)} already holds a host identity; refusing to overwrite it")
    _save_identity(home, key=key, cert=cert, ca_cert=ca, swarm_secret=swarm_secret, ca_key=None)
    return load_identity(home)
