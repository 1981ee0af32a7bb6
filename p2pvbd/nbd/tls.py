"""TLS for NBD over TCP: each host's own NBD certificate authority, its server certificate, client credentials.

The Unix socket needs none of this (only its owner may connect); TCP reaches every local user, and the network
with a non-loopback address, so there the daemon speaks NBD only inside mutual TLS. Clients prove themselves
with a certificate from this host's NBD CA, written by ``p2pvbd nbd-client-cert`` in the directory layout qemu's
``tls-creds-x509`` and libnbd's ``tls-certificates`` read. The NBD CA is not the swarm's: an NBD client
certificate never gets onto the peer port, and a swarm certificate never opens a disk over NBD.

Only the user who owns HOME can read the CA key, so only that user can let a client in. There is no revocation
list: removing HOME/nbd-tls (a new CA at the next daemon start) shuts out every client certificate issued before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pvbd.base.files import atomic_write
from p2pvbd.base.home import PRIVATE_DIR_MODE, check_name
from p2pvbd.swarm.trust import CLOCK_SKEW, HOST_CERT_VALIDITY, TrustError, self_signed_ca

NBD_TLS_DIR = "nbd-tls"
LOCK_FILE = ".lock"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server-cert.pem"
SERVER_KEY_FILE = "server-key.pem"
# The file names qemu (crypto/tlscredsx509.h, QCRYPTO_TLS_CREDS_X509_*) and libnbd (tls-certificates=DIR) look
# for in a client's credentials directory; the CA keeps the same name in HOME/nbd-tls.
CA_CERT_FILE = "ca-cert.pem"
CLIENT_CERT_FILE = "client-cert.pem"
CLIENT_KEY_FILE = "client-key.pem"
PUBLIC_FILE_MODE = 0o644
KEY_FILE_MODE = 0o600
DEFAULT_CLIENT_NAME = "nbd-client"
# ECDSA P-256: every TLS stack NBD clients use (gnutls for qemu and libnbd, OpenSSL) takes it in TLS 1.2 and 1.3.
CURVE = ec.SECP256R1()
# Client certificates live as long as host certificates: a guest's disk must not stop opening on a date nobody
# remembers. The server certificate is issued afresh at every daemon start, so its lifetime matters little.
CLIENT_CERT_VALIDITY = HOST_CERT_VALIDITY
SERVER_CERT_VALIDITY = HOST_CERT_VALIDITY
# Addresses a wildcard listener's certificate names besides the machine's own: clients on this machine.
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::")


@dataclass(frozen=True)
class NbdCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def tls_dir(home: Path) -> Path:
    return Path(home) / NBD_TLS_DIR


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """One writer at a time in HOME/nbd-tls: the daemon and `nbd-client-cert` may both create the CA."""
    d.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    os.chmod(d, PRIVATE_DIR_MODE)
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, KEY_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _new_ca(host_name: str, now: float) -> NbdCa:
    key = ec.generate_private_key(CURVE)
    return NbdCa(key, self_signed_ca(key, f"p2pvbd NBD CA of {host_name}", now, hashes.SHA256()))


def load_or_create_ca(home: Path, host_name: str, *, now: float | None = None) -> NbdCa:
    """This host's NBD CA, created on first use (homes made before NBD over TLS existed have none)."""
    d = tls_dir(home)
    with _locked(d):
        key_path, cert_path = d / CA_KEY_FILE, d / CA_CERT_FILE
        if not key_path.exists():
            ca = _new_ca(host_name, time.time() if now is None else now)
            atomic_write(cert_path, ca.pem, PUBLIC_FILE_MODE)
            atomic_write(key_path, _key_pem(ca.key), KEY_FILE_MODE)  # last: its presence marks the CA whole
            return ca
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as e:
            raise TrustError(f"cannot load the NBD CA from {d}: {e} (remove {d} to make a new one; every client "
                             "certificate issued before stops working)") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise TrustError(f"{key_path} is not the key of {cert_path}")
        return NbdCa(key, cert)


def _leaf(ca: NbdCa, key: ec.EllipticCurvePrivateKey, common_name: str, usage: x509.ObjectIdentifier,
          names: list[x509.GeneralName], validity: dt.timedelta, now: float) -> x509.Certificate:
    start = _utc(now) - CLOCK_SKEW
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + validity, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # qemu's sanity check of x509 credentials refuses a critical key usage without key encipherment
        # (meaningless for an ECDSA key, and harmless).
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


# ---- the server's certificate --------------------------------------------------------------------------------


def machine_addresses() -> list[str]:
    """Every address of this machine's interfaces (``ip -j addr``), for a wildcard listener's certificate."""
    try:
        out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
        return [a["local"] for ifc in json.loads(out) for a in ifc.get("addr_info", []) if "local" in a]
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        return []


def server_names(host: str) -> list[x509.GeneralName]:
    """What the server certificate names: the listen address (every address of the machine for a wildcard), the
    machine's host name, and localhost with the loopback addresses. libnbd checks the URI's host against these,
    qemu the ``server.host`` it connects to."""
    addresses = list(LOOPBACK_ADDRESSES)
    dns = list(LOOPBACK_NAMES)
    if host in WILDCARDS:
        addresses += machine_addresses()
        if socket.gethostname().isascii():  # a DNS name in a certificate is ASCII (IDNA A-labels)
            dns.append(socket.gethostname())
    elif host != "localhost":
        addresses.append(host)
    ips = dict.fromkeys(ipaddress.ip_address(a.split("%")[0]) for a in addresses)  # no zone in a certificate
    return [*(x509.DNSName(n) for n in dict.fromkeys(dns)), *(x509.IPAddress(ip) for ip in ips)]


def issue_server_cert(home: Path, host_name: str, listen_host: str, *, now: float | None = None) -> tuple[Path, Path]:
    """A fresh server key and certificate for ``listen_host``, written to HOME/nbd-tls; returns (cert, key)."""
    now = time.time() if now is None else now
    ca = load_or_create_ca(home, host_name, now=now)
    d = tls_dir(home)
    key = ec.generate_private_key(CURVE)
    cert = _leaf(ca, key, host_name, ExtendedKeyUsageOID.SERVER_AUTH, server_names(listen_host),
                 SERVER_CERT_VALIDITY, now)
    with _locked(d):
        atomic_write(d / SERVER_KEY_FILE, _key_pem(key), KEY_FILE_MODE)
        atomic_write(d / SERVER_CERT_FILE, _cert_pem(cert), PUBLIC_FILE_MODE)
    return d / SERVER_CERT_FILE, d / SERVER_KEY_FILE


def server_ssl_context(home: Path, host_name: str, listen_host: str) -> ssl.SSLContext:
    """Mutual TLS for the NBD TCP listener: only certificates of this host's NBD CA get past the handshake."""
    cert, key = issue_server_cert(home, host_name, listen_host)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # proto.md, "TLS versions": implementations MUST support TLS 1.2 and SHOULD NOT offer older versions.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=tls_dir(home) / CA_CERT_FILE)
    ctx.load_cert_chain(cert, key)
    ctx.num_tickets = 0  # no session resumption: a client reconnects rarely, and a ticket is one more write
    return ctx


# ---- client credentials ---------------------------------------------------------------------------------------


def write_client_credentials(home: Path, host_name: str, out: Path, client_name: str = DEFAULT_CLIENT_NAME,
                             *, now: float | None = None) -> Path:
    """Write ca-cert.pem, client-cert.pem and client-key.pem (0600) to ``out`` (made 0700 if missing).

    Refuses to replace credentials already there: a client using them would lose access."""
    check_name("client", client_name)
    out = Path(out).absolute()
    existing = [n for n in (CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE) if (out / n).exists()]
    if existing:
        raise TrustError(f"{out} already holds {', '.join(existing)}; choose another directory or remove them")
    now = time.time() if now is None else now
    ca = load_or_create_ca(home, host_name, now=now)
    key = ec.generate_private_key(CURVE)
    cert = _leaf(ca, key, client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [], CLIENT_CERT_VALIDITY, now)
    try:
        out.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        atomic_write(out / CLIENT_KEY_FILE, _key_pem(key), KEY_FILE_MODE)
        atomic_write(out / CLIENT_CERT_FILE, _cert_pem(cert), PUBLIC_FILE_MODE)
        atomic_write(out / CA_CERT_FILE, ca.pem, PUBLIC_FILE_MODE)
    except OSError as e:
        raise TrustError(f"cannot write client credentials to {out}: {e.strerror or e}") from e
    return out
