"""Swarm trust: the keys and certificates that let a person's machines trust each other only.

A swarm is a private CA. Every host holds an Ed25519 key and a certificate signed by that CA, and peer
connections are mutual TLS 1.3 against the CA alone, so a machine outside the swarm fails the handshake
before it can send a single request. Only the founding host keeps the CA key; a new machine joins by
presenting a one-time invite token that the founder printed (the tokens and the join protocol are in
``invites``, built on the certificate functions here).

Everything here is pure (bytes, paths, clocks passed in); the sockets live in ``peer_transport``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pvbd.base.files import atomic_write
from p2pvbd.base.home import NAME_RE

log = logging.getLogger(__name__)

TRUST_DIR = "trust"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
HOST_KEY_FILE = "host.key"
HOST_CERT_FILE = "host.pem"
SWARM_SECRET_FILE = "swarm_secret"
HOST_BINDING_FILE = "host.binding"
# What the CA signs to bind a host name to its key for index records: far smaller than the certificate
# (72 bytes against ~410), so every record can carry it.
KEY_BINDING_DOMAIN = b"p2pvbd-host-key/1\0"

# Host certificates live as long as the machine is likely to: there is no rotation machinery yet.
HOST_CERT_VALIDITY = dt.timedelta(days=3650)
# The CA must outlive the host certs it signs; host certs are additionally capped at the CA's expiry.
CA_CERT_VALIDITY = dt.timedelta(days=2 * 3650)
# Certs are backdated this much so a peer whose clock is a little behind still accepts a fresh cert.
CLOCK_SKEW = dt.timedelta(minutes=10)
# HMAC-SHA256 key size: the swarm secret keys DHT datagram MACs.
SWARM_SECRET_BYTES = 32


class TrustError(Exception):
    """A user-facing problem with keys, certificates or the trust directory."""


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
    binding: bytes = b""  # the CA's binding of this name to this key, carried in every index record

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


def check_host_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise TrustError(f"invalid host name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def _key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def public_key_raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def new_host_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _make_ca(now: float) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, self_signed_ca(key, "p2pvbd swarm", now, None)


def self_signed_ca(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey, label: str, now: float,
                   digest: hashes.HashAlgorithm | None) -> x509.Certificate:
    """A CA certificate that signs certificates only (no TLS use of its own). ``digest`` is None for Ed25519.

    A random suffix gives each CA a distinct subject, so OpenSSL reports a certificate of a foreign CA as
    "unable to get local issuer" instead of trying (and failing) a same-named CA's signature."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} {secrets.token_hex(8)}")])
    start = _utc(now) - CLOCK_SKEW
    return (
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
        .sign(key, digest)
    )


def issue_host_cert(ca_key: ed25519.Ed25519PrivateKey, ca_cert: x509.Certificate,
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


def _binding_message(name: str, public_key: bytes, expires: int) -> bytes:
    return KEY_BINDING_DOMAIN + name.encode() + b"\0" + public_key + expires.to_bytes(8, "big")


def issue_key_binding(ca_key: ed25519.Ed25519PrivateKey, name: str, public_key: bytes, expires: int) -> bytes:
    """The CA's statement that ``public_key`` signs for host ``name`` until ``expires`` (Unix seconds)."""
    return expires.to_bytes(8, "big") + ca_key.sign(_binding_message(name, public_key, expires))


def key_binding_valid(ca_public: ed25519.Ed25519PublicKey, name: str, public_key: bytes, binding: bytes,
                      now: float) -> bool:
    if len(binding) != 72:
        return False
    expires = int.from_bytes(binding[:8], "big")
    if expires < now:
        return False
    try:
        ca_public.verify(binding[8:], _binding_message(name, public_key, expires))
    except InvalidSignature:
        return False
    return True


# Publisher bindings remembered as verified: one per (host, key) of the swarm, with plenty of headroom.
BINDING_CACHE_SIZE = 1024


class RecordTrust:
    """Decides whether an index record's publisher name goes with its signing key: the record must carry
    the swarm CA's binding of the two, and the publisher must not be revoked. Verified bindings are
    remembered (an Ed25519 verify each)."""

    def __init__(self, ca_public: ed25519.Ed25519PublicKey,
                 revoked: Callable[[str], bool] = lambda name: False) -> None:
        self._ca_public, self._revoked = ca_public, revoked
        self._good: dict[tuple[str, bytes, bytes], None] = {}

    def __call__(self, publisher: str, public_key: bytes, binding: bytes) -> bool:
        if self._revoked(publisher):
            return False
        item = (publisher, public_key, binding)
        if item in self._good:
            return int.from_bytes(binding[:8], "big") >= time.time()
        if not key_binding_valid(self._ca_public, publisher, public_key, binding, time.time()):
            return False
        self._good[item] = None
        if len(self._good) > BINDING_CACHE_SIZE:
            del self._good[next(iter(self._good))]
        return True


def binding_for(ca_key: ed25519.Ed25519PrivateKey, cert: x509.Certificate) -> bytes:
    """The binding of a host certificate's name and key, expiring with it."""
    return issue_key_binding(ca_key, verify_name(cert), public_key_raw(cert.public_key()),  # type: ignore[arg-type]
                             int(cert.not_valid_after_utc.timestamp()))


def verify_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise TrustError("host certificate must have exactly one common name")
    return check_host_name(names[0].value)


def save_identity(home: Path, *, key: ed25519.Ed25519PrivateKey, cert: x509.Certificate,
                  ca_cert: x509.Certificate, swarm_secret: bytes,
                  ca_key: ed25519.Ed25519PrivateKey | None, binding: bytes) -> None:
    tdir = trust_dir(home)
    tdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(tdir, 0o700)
    atomic_write(tdir / CA_CERT_FILE, cert_to_pem(ca_cert), 0o644)
    if ca_key is not None:
        atomic_write(tdir / CA_KEY_FILE, _key_pem(ca_key), 0o600)
    atomic_write(tdir / SWARM_SECRET_FILE, swarm_secret, 0o600)
    atomic_write(tdir / HOST_CERT_FILE, cert_to_pem(cert), 0o644)
    atomic_write(tdir / HOST_BINDING_FILE, binding, 0o644)
    # The host key goes last: its presence is what marks the identity as complete (has_identity).
    atomic_write(tdir / HOST_KEY_FILE, _key_pem(key), 0o600)


def create_swarm(home: Path, host_name: str, *, now: float | None = None) -> HostIdentity:
    """Found a new swarm: its CA, its secret, and this host as the first member (and only CA holder)."""
    check_host_name(host_name)
    if has_identity(home):
        raise TrustError(f"{trust_dir(home)} already holds a host identity; refusing to overwrite it")
    now = time.time() if now is None else now
    ca_key, ca_cert = _make_ca(now)
    key = new_host_key()
    cert = issue_host_cert(ca_key, ca_cert, key.public_key(), host_name, now)
    save_identity(home, key=key, cert=cert, ca_cert=ca_cert, swarm_secret=secrets.token_bytes(SWARM_SECRET_BYTES),
                  ca_key=ca_key, binding=binding_for(ca_key, cert))
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
        binding_path = tdir / HOST_BINDING_FILE
        binding = binding_path.read_bytes() if binding_path.exists() else b""
    except (OSError, ValueError) as e:
        raise TrustError(f"cannot load the host identity from {tdir}: {e}") from e
    if len(swarm_secret) != SWARM_SECRET_BYTES:
        raise TrustError(f"{tdir / SWARM_SECRET_FILE} is not {SWARM_SECRET_BYTES} bytes")
    name = verify_host_cert(cert, ca_cert)
    if public_key_raw(cert.public_key()) != public_key_raw(key.public_key()):  # type: ignore[arg-type]
        raise TrustError(f"{tdir / HOST_CERT_FILE} does not match {tdir / HOST_KEY_FILE}")
    if ca_key is not None and not binding:  # a founder made before bindings existed binds itself
        binding = binding_for(ca_key, cert)
        atomic_write(tdir / HOST_BINDING_FILE, binding, 0o644)
    if not key_binding_valid(ca_cert.public_key(), name, public_key_raw(key.public_key()),  # type: ignore[arg-type]
                             binding, time.time()):
        log.error("%s holds no valid binding of this host's name to its key: the swarm ignores its index "
                  "records; join the swarm again with a new invite", tdir / HOST_BINDING_FILE)
    return HostIdentity(home=Path(home), name=name, key=key, cert=cert, ca_cert=ca_cert,
                        swarm_secret=swarm_secret, ca_key=ca_key, binding=binding)


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
    return verify_name(cert)


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
    fetch the CA, ``invites.check_ca`` it against the token, then ``verify_host_cert`` the server's TLS certificate.
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
