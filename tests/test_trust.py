"""Keys, certificates, invite tokens and the pure half of the join protocol."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pvbd.swarm import invites, trust
from p2pvbd.swarm.invites import InviteError
from p2pvbd.swarm.trust import TrustError
from tests.daemons import Host

NOW = 1_700_000_000.0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def founder(tmp_path: Path) -> trust.HostIdentity:
    return trust.create_swarm(tmp_path / "alpha", "alpha")


def invite_and_join(founder: trust.HostIdentity, home: Path, name: str, now: float = NOW) -> trust.HostIdentity:
    token, record = invites.make_invite(founder, ["127.0.0.1:7420"], 600, now)
    invites.record_invite(founder.home, record, now=now)
    invite = invites.parse_invite(token)
    key = trust.new_host_key()
    reply = invites.accept_join(founder, invites.make_join_request(invite, key, name), now)
    return invites.finish_join(home, invite, key, name, reply)


def test_create_swarm_files_and_modes(founder: trust.HostIdentity) -> None:
    tdir = founder.home / "trust"
    for f in ("ca.pem", "ca.key", "host.key", "host.pem", "swarm_secret"):
        assert (tdir / f).is_file(), f
    for f in ("ca.key", "host.key", "swarm_secret"):
        assert mode(tdir / f) == 0o600, f
    assert mode(tdir) == 0o700
    assert len((tdir / "swarm_secret").read_bytes()) == 32
    assert not list(tdir.glob("*.tmp"))


def test_host_certificate_profile(founder: trust.HostIdentity) -> None:
    cert = founder.cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alpha"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alpha"]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < life < dt.timedelta(days=3651)
    assert founder.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(founder.ca_cert)


def test_load_identity_round_trip(founder: trust.HostIdentity) -> None:
    loaded = trust.load_identity(founder.home)
    assert loaded.name == "alpha"
    assert loaded.ca_fingerprint == founder.ca_fingerprint
    assert loaded.cert_fingerprint == founder.cert_fingerprint != founder.ca_fingerprint
    assert len(loaded.ca_fingerprint) == 64
    assert loaded.swarm_secret == founder.swarm_secret
    assert loaded.can_invite


def test_create_refuses_to_overwrite_and_bad_names(founder: trust.HostIdentity, tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="already holds"):
        trust.create_swarm(founder.home, "alpha2")
    with pytest.raises(TrustError, match="invalid host name"):
        trust.create_swarm(tmp_path / "x", "bad name")
    with pytest.raises(TrustError, match="no host identity"):
        trust.load_identity(tmp_path / "nothing")


def test_two_swarms_differ(founder: trust.HostIdentity, tmp_path: Path) -> None:
    other = trust.create_swarm(tmp_path / "gamma", "gamma")
    assert other.ca_fingerprint != founder.ca_fingerprint
    assert other.ca_cert.subject != founder.ca_cert.subject
    with pytest.raises(TrustError, match="not signed"):
        trust.verify_host_cert(other.cert, founder.ca_cert)


# ---- invite tokens -------------------------------------------------------------------------------


def test_token_round_trip(founder: trust.HostIdentity) -> None:
    token, record = invites.make_invite(founder, ["10.0.0.1:7420", "[fe80::1]:7420"], 600, NOW)
    assert token.startswith("p2pvbd1:") and "\n" not in token and " " not in token
    assert len(token) < 300
    invite = invites.parse_invite(f"  {token}\n")
    assert invite.addresses == ["10.0.0.1:7420", "[fe80::1]:7420"]
    assert invite.ca_fingerprint == founder.ca_fingerprint
    assert len(invite.secret) >= 16
    assert invite.expires == NOW + 600 == record.expires
    assert invite.invite_id == record.invite_id
    assert record.invite_id not in token and invite.secret.hex() == record.secret


@pytest.mark.parametrize("token", ["", "hello", "p2pvbd1:", "p2pvbd1:!!!!", "p2pvbd1:AAAA", "p2pvbd2:abcd",
                                   "p2pvbd1:" + "A" * 9000])
def test_damaged_tokens(token: str) -> None:
    with pytest.raises(InviteError):
        invites.parse_invite(token)


def test_truncated_token(founder: trust.HostIdentity) -> None:
    token, _ = invites.make_invite(founder, ["h:1"], 600, NOW)
    for cut in range(len("p2pvbd1:"), len(token) - 1, 7):
        with pytest.raises(InviteError):
            invites.parse_invite(token[:cut])


def test_invite_arguments_checked(founder: trust.HostIdentity) -> None:
    with pytest.raises(InviteError):
        invites.make_invite(founder, [], 600, NOW)
    with pytest.raises(InviteError):
        invites.make_invite(founder, ["h:1"], 0, NOW)
    with pytest.raises(InviteError):
        invites.make_invite(founder, ["h:1"], invites.MAX_INVITE_TTL_SECONDS + 1, NOW)


def test_consume_unknown_used_expired(founder: trust.HostIdentity) -> None:
    home = founder.home
    _, record = invites.make_invite(founder, ["h:1"], 600, NOW)
    with pytest.raises(InviteError, match="unknown"):
        invites.consume_invite(home, record.invite_id, NOW)
    invites.record_invite(home, record, now=NOW)
    assert mode(home / "trust" / "invites.json") == 0o600
    with pytest.raises(InviteError, match="expired"):
        invites.consume_invite(home, record.invite_id, NOW + 601)
    used = invites.consume_invite(home, record.invite_id, NOW + 1, used_by="beta")
    assert used.used and used.used_by == "beta"
    with pytest.raises(InviteError, match="already used"):
        invites.consume_invite(home, record.invite_id, NOW + 2)
    with pytest.raises(InviteError, match="already used"):
        invites.lookup_invite(home, record.invite_id, NOW + 2)


def test_prune_keeps_used_records(founder: trust.HostIdentity) -> None:
    _, old = invites.make_invite(founder, ["h:1"], 60, NOW)
    _, used = invites.make_invite(founder, ["h:1"], 60, NOW)
    invites.record_invite(founder.home, old, now=NOW)
    invites.record_invite(founder.home, used, now=NOW)
    invites.consume_invite(founder.home, used.invite_id, NOW, used_by="beta")
    later = NOW + invites.INVITE_PRUNE_AFTER_SECONDS + 3600
    _, fresh = invites.make_invite(founder, ["h:1"], 60, later)
    invites.record_invite(founder.home, fresh, now=later)
    with pytest.raises(InviteError, match="unknown"):
        invites.lookup_invite(founder.home, old.invite_id, NOW)
    assert "beta" in invites.taken_names(founder)


# ---- join ----------------------------------------------------------------------------------------


def test_join_gives_a_member_without_the_ca_key(founder: trust.HostIdentity, tmp_path: Path) -> None:
    beta = invite_and_join(founder, tmp_path / "beta", "beta", now=time.time())
    assert beta.name == "beta"
    assert not beta.can_invite and not (beta.home / "trust" / "ca.key").exists()
    assert beta.ca_fingerprint == founder.ca_fingerprint
    assert beta.swarm_secret == founder.swarm_secret
    assert trust.verify_host_cert(beta.cert, founder.ca_cert) == "beta"
    assert mode(beta.home / "trust" / "host.key") == 0o600
    assert trust.load_identity(beta.home).cert_fingerprint == beta.cert_fingerprint
    with pytest.raises(InviteError, match="CA key"):
        invites.make_invite(beta, ["h:1"], 600, NOW)


def test_records_trust_a_name_only_with_the_cas_binding_of_its_key(founder: trust.HostIdentity,
                                                                     tmp_path: Path) -> None:
    """Founder and joiner each hold the CA's binding of their name to their key; it names nobody else,
    fits no other key, and dies with its expiry; a founder made before bindings binds itself on load."""
    beta = invite_and_join(founder, tmp_path / "beta", "beta", now=time.time())
    check = trust.RecordTrust(founder.ca_cert.public_key())  # type: ignore[arg-type]
    raw = {h.name: trust.public_key_raw(h.key.public_key()) for h in (founder, beta)}
    assert check(founder.name, raw[founder.name], founder.binding) and check("beta", raw["beta"], beta.binding)
    assert check("beta", raw["beta"], beta.binding)  # remembered: the same answer
    assert not check(founder.name, raw["beta"], beta.binding)  # beta's key under the founder's name
    assert not check("beta", raw[founder.name], beta.binding)
    assert not check("beta", raw["beta"], founder.binding)
    assert not check("beta", raw["beta"], b"") and not check("beta", raw["beta"], bytes(72))
    expired = trust.issue_key_binding(founder.ca_key, "beta", raw["beta"], int(time.time()) - 1)  # type: ignore[arg-type]
    assert not check("beta", raw["beta"], expired)
    other = trust.create_swarm(tmp_path / "other", "beta")
    assert not check("beta", trust.public_key_raw(other.key.public_key()), other.binding)  # another swarm's CA
    (founder.home / "trust" / trust.HOST_BINDING_FILE).unlink()
    assert trust.load_identity(founder.home).binding and (founder.home / "trust" / trust.HOST_BINDING_FILE).exists()


def test_name_taken(founder: trust.HostIdentity, tmp_path: Path) -> None:
    invite_and_join(founder, tmp_path / "beta", "beta", now=time.time())
    for name in ("beta", "alpha"):
        with pytest.raises(InviteError, match="already taken"):
            invite_and_join(founder, tmp_path / f"again-{name}", name, now=time.time())


def test_wrong_proof_does_not_burn_the_invite(founder: trust.HostIdentity) -> None:
    token, record = invites.make_invite(founder, ["h:1"], 600, NOW)
    invites.record_invite(founder.home, record, now=NOW)
    invite = invites.parse_invite(token)
    key = trust.new_host_key()
    body = invites.make_join_request(invite, key, "beta")
    # The proof is bound to the name: renaming the request invalidates it.
    with pytest.raises(InviteError, match="proof"):
        invites.accept_join(founder, {**body, "name": "mallory"}, NOW)
    # ...and to the key: another key's CSR with this proof fails too.
    other = invites.make_csr(trust.new_host_key(), "beta")
    with pytest.raises(InviteError, match="proof"):
        invites.accept_join(founder, {**body, "csr": other}, NOW)
    assert invites.accept_join(founder, body, NOW)["cert"]
    with pytest.raises(InviteError, match="already used"):
        invites.accept_join(founder, body, NOW)


def test_malformed_join_requests(founder: trust.HostIdentity) -> None:
    token, record = invites.make_invite(founder, ["h:1"], 600, NOW)
    invites.record_invite(founder.home, record, now=NOW)
    body = invites.make_join_request(invites.parse_invite(token), trust.new_host_key(), "beta")
    for bad in ({}, {**body, "csr": "text"}, {**body, "csr": b"junk"}, {**body, "invite_id": 5}):
        with pytest.raises(InviteError):
            invites.accept_join(founder, bad, NOW)


def test_sign_host_csr_uses_the_given_name(founder: trust.HostIdentity) -> None:
    key = trust.new_host_key()
    csr = invites.make_csr(key, "claimed")
    assert founder.ca_key is not None
    cert = invites.sign_host_csr(founder.ca_key, founder.ca_cert, csr, "given", set())
    assert trust.verify_host_cert(cert, founder.ca_cert) == "given"
    with pytest.raises(InviteError, match="taken"):
        invites.sign_host_csr(founder.ca_key, founder.ca_cert, csr, "given", {"given"})
    with pytest.raises(InviteError, match="invalid"):
        invites.sign_host_csr(founder.ca_key, founder.ca_cert, csr, "../etc", set())


def test_check_ca_pins_the_token(founder: trust.HostIdentity, tmp_path: Path) -> None:
    other = trust.create_swarm(tmp_path / "gamma", "gamma")
    assert invites.check_ca(founder.ca_pem, founder.ca_fingerprint) == founder.ca_cert
    with pytest.raises(TrustError, match="does not match"):
        invites.check_ca(other.ca_pem, founder.ca_fingerprint)
    with pytest.raises(TrustError, match="unreadable"):
        invites.check_ca(b"nope", founder.ca_fingerprint)


def test_finish_join_rejects_a_foreign_reply(founder: trust.HostIdentity, tmp_path: Path) -> None:
    other = trust.create_swarm(tmp_path / "gamma", "gamma")
    now = time.time()
    token, record = invites.make_invite(founder, ["h:1"], 600, now)
    invites.record_invite(founder.home, record, now=now)
    invite = invites.parse_invite(token)
    key = trust.new_host_key()
    reply = invites.accept_join(founder, invites.make_join_request(invite, key, "beta"), now)
    home = tmp_path / "beta"
    with pytest.raises(TrustError, match="does not match"):
        invites.finish_join(home, invite, key, "beta", {**reply, "ca": other.ca_pem})
    with pytest.raises(TrustError, match="another key"):
        invites.finish_join(home, invite, trust.new_host_key(), "beta", reply)
    with pytest.raises(TrustError, match="another host name"):
        invites.finish_join(home, invite, key, "delta", reply)
    assert not trust.has_identity(home)


def test_ssl_contexts(founder: trust.HostIdentity) -> None:
    for ctx in (trust.server_ssl_context(founder), trust.client_ssl_context(founder)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert not trust.client_ssl_context(founder).check_hostname
    assert trust.join_client_ssl_context().verify_mode == ssl.CERT_NONE
    assert trust.join_server_ssl_context(founder).verify_mode == ssl.CERT_NONE


def test_peer_name() -> None:
    class Fake:
        def __init__(self, cert: dict[str, object]) -> None:
            self.cert = cert

        def getpeercert(self) -> dict[str, object]:
            return self.cert

    cert = {"subject": ((("organizationName", "x"),), (("commonName", "beta"),))}
    assert trust.peer_name(Fake(cert)) == "beta"
    assert trust.peer_name(Fake({})) == ""
    with pytest.raises(TrustError):
        trust.peer_name(Fake({"subject": ()}))


def test_homes_and_sockets_are_private_whatever_the_umask(make_host: Callable[..., Host]) -> None:
    """Under umask 000 (a careless service manager), a founder's and a joined host's homes stay 0700 and
    the NBD and control sockets 0600: plaintext NBD reads and writes every disk."""
    old = os.umask(0)
    try:
        office = make_host("office-pc")
        home = make_host("home-pc", join=office.cli("invite").stdout.strip())
    finally:
        os.umask(old)
    for h in (office, home):
        assert mode(h.home) == mode(h.home / "disks") == 0o700, h.name
        assert mode(Path(h.nbd_socket)) == mode(h.home / "control.sock") == 0o600, h.name
