"""Ownership deeds: a disk's owner is proven by a chain of signed links back to its creation, not claimed.

An owner record in the index, or an owner's own map summary, is any member's word. A deed chain is not:

* ``create``: the first link; the disk's first owner signs that it owns ``disk`` at ``epoch``.
* ``hand``: the owner of the previous link hands the disk to ``owner`` at a higher ``epoch`` (signed
  by the source of a migration inside its commit, so the destination holds it only once it took over).
* ``claim``: ``owner`` takes the disk over from a previous owner the swarm's founder revoked (a stolen
  machine); the revocation list, signed by the CA, is the rest of the proof.

Each link names the sha256 of the previous one, and carries its signer's key with the CA's binding of
that key to the signer's name (``trust.issue_key_binding``), so any member checks a chain with nothing
but the CA certificate and the revocation list. A host holding a replica pins the link it last verified
(its chain's head): a chain offered later must contain that link, and nothing signed after it by a
revoked host counts. A host with no replica has nothing to pin and takes the chain as offered.

What a chain cannot stop: a host a disk was handed to holds a valid link for it even when its
commit's outcome is later lost; if that host is stolen, revoke it. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from p2pvbd.base.home import is_name
from p2pvbd.swarm.trust import key_binding_valid
from p2pvbd.wire.dht_schema import MAX_COUNTER

CREATE, HAND, CLAIM = "create", "hand", "claim"
KINDS = (CREATE, HAND, CLAIM)
_DOMAIN = b"p2pvbd-deed/1\0"
# Links in one chain: a disk handed over twice a day for twenty years; ~300 bytes each, so the longest
# chain (~5 MiB) still fits one peer frame (wire/peer_wire.MAX_FRAME_BYTES, 8 MiB).
MAX_CHAIN_LINKS = 16384
# One encoded link: two names (NAME_RE allows 64 characters each), a 32-byte digest, a 32-byte key,
# the 72-byte binding and a 64-byte signature, with msgpack's framing: ~330 bytes; twice that, for headroom.
MAX_LINK_BYTES = 640
_KEY_BYTES, _DIGEST_BYTES, _SIG_BYTES, _BINDING_BYTES = 32, 32, 64, 72
# Links whose signatures were checked, remembered by digest so a chain checked again (at prepare, then
# at commit; at every sync) costs hashing only: a longest chain, with room for a few disks' more.
VERIFIED_CACHE = 4 * MAX_CHAIN_LINKS


class DeedError(ValueError):
    """A link or chain that does not prove what it claims; the message says which link and why."""


@dataclass(frozen=True)
class Deed:
    kind: str
    disk: str
    epoch: int
    owner: str
    prev: bytes  # sha256 of the previous link's encoding; empty for ``create``
    signer: str
    pubkey: bytes
    binding: bytes
    sig: bytes
    raw: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def _signed_bytes(kind: str, disk: str, epoch: int, owner: str, prev: bytes, signer: str, pubkey: bytes) -> bytes:
    return _DOMAIN + msgpack.packb([kind, disk, epoch, owner, prev, signer, pubkey])


def sign(kind: str, disk: str, epoch: int, owner: str, prev: bytes, signer: str,
         key: ed25519.Ed25519PrivateKey, binding: bytes) -> bytes:
    """One encoded link, signed by ``signer``'s host key. Ed25519 is deterministic, so signing the same
    link again gives the same bytes (a source re-makes its hand-over after a restart)."""
    from p2pvbd.swarm.trust import public_key_raw

    pubkey = public_key_raw(key.public_key())
    sig = key.sign(_signed_bytes(kind, disk, epoch, owner, prev, signer, pubkey))
    return msgpack.packb([kind, disk, epoch, owner, prev, signer, pubkey, binding, sig])


def parse(raw: object) -> Deed:
    """A link's fields, typed and bounded; DeedError if it is not one (its signature is not checked here)."""
    if not isinstance(raw, bytes) or len(raw) > MAX_LINK_BYTES:
        raise DeedError(f"a link is not bytes of at most {MAX_LINK_BYTES}")
    try:
        m: Any = msgpack.unpackb(raw, max_str_len=MAX_LINK_BYTES, max_bin_len=MAX_LINK_BYTES, max_array_len=16,
                                 max_map_len=0, max_ext_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise DeedError(f"a link is not msgpack: {e}") from None
    if not isinstance(m, list) or len(m) != 9:
        raise DeedError("a link is not a list of 9 fields")
    kind, disk, epoch, owner, prev, signer, pubkey, binding, sig = m
    if kind not in KINDS:
        raise DeedError(f"unknown link kind {kind!r}")
    if not (is_name(disk) and is_name(owner) and is_name(signer)):
        raise DeedError("a link's disk, owner or signer is not a name")
    if type(epoch) is not int or not 0 <= epoch < MAX_COUNTER:
        raise DeedError("a link's epoch is not an int in [0, 2**63)")
    if not (isinstance(prev, bytes) and len(prev) == (0 if kind == CREATE else _DIGEST_BYTES)):
        raise DeedError(f"a {kind} link's previous digest has the wrong length")
    if not (isinstance(pubkey, bytes) and len(pubkey) == _KEY_BYTES and isinstance(binding, bytes)
            and len(binding) == _BINDING_BYTES and isinstance(sig, bytes) and len(sig) == _SIG_BYTES):
        raise DeedError("a link's key, binding or signature has the wrong length")
    return Deed(kind, disk, epoch, owner, prev, signer, pubkey, binding, sig, raw)


@dataclass(frozen=True)
class Chain:
    """A checked chain: its links, oldest first."""

    links: tuple[Deed, ...]

    @property
    def head(self) -> Deed:
        return self.links[-1]

    @property
    def owner(self) -> str:
        return self.head.owner

    @property
    def epoch(self) -> int:
        return self.head.epoch

    def raws(self) -> list[bytes]:
        return [d.raw for d in self.links]

    def up_to(self, epoch: int) -> Chain | None:
        """The chain as it stood at ``epoch`` (its links at or below it), None if even the first is later."""
        kept = tuple(d for d in self.links if d.epoch <= epoch)
        return Chain(kept) if kept else None


class DeedChecker:
    """Checks chains against the swarm CA and its revocation list, remembering links whose signatures
    it verified (two Ed25519 verifies each, ~0.1 ms) so a chain seen again costs only its hashing."""

    def __init__(self, ca_public: ed25519.Ed25519PublicKey, revoked: Callable[[str], bool] = lambda name: False
                 ) -> None:
        self._ca_public, self._revoked = ca_public, revoked
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def _signature_ok(self, d: Deed, digest: bytes) -> bool:
        with self._lock:  # chains are checked in worker threads
            if digest in self._verified:
                self._verified.move_to_end(digest)
                return True
        # The binding's expiry is not checked: a link signed while its key was bound stays valid; a stolen
        # key is handled by revoking its host.
        if not key_binding_valid(self._ca_public, d.signer, d.pubkey, d.binding, now=0):
            return False
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(d.pubkey).verify(
                d.sig, _signed_bytes(d.kind, d.disk, d.epoch, d.owner, d.prev, d.signer, d.pubkey))
        except (InvalidSignature, ValueError):
            return False
        with self._lock:
            self._verified[digest] = None
            while len(self._verified) > VERIFIED_CACHE:
                self._verified.popitem(last=False)
        return True

    def check(self, raws: Sequence[object], disk: str, pin: bytes | None = None, *,
              head_may_be_revoked: bool = False) -> Chain:
        """The chain ``raws`` proves for ``disk``; DeedError if it proves nothing. With ``pin`` (the digest
        of the link this host last verified) the chain must contain it, and no link after it may be
        signed by a revoked host. The head's owner must not be revoked, unless ``head_may_be_revoked``
        (this host's own record of a disk whose owner was revoked since, which a claim extends)."""
        if not isinstance(raws, (list, tuple)) or not 1 <= len(raws) <= MAX_CHAIN_LINKS:
            raise DeedError(f"a chain is a list of 1 to {MAX_CHAIN_LINKS} links")
        links: list[Deed] = []
        pinned = pin is None
        for i, raw in enumerate(raws):
            d = parse(raw)
            digest = d.digest
            where = f"link {i} ({d.kind} to {d.owner} at epoch {d.epoch})"
            if d.disk != disk:
                raise DeedError(f"{where} is about {d.disk}, not {disk}")
            if i == 0:
                if d.kind != CREATE or d.signer != d.owner:
                    raise DeedError(f"{where}: a chain starts with its creator's own create link")
            else:
                prev = links[-1]
                if d.kind == CREATE or d.prev != prev.digest or d.epoch <= prev.epoch:
                    raise DeedError(f"{where} does not follow link {i - 1}")
                if d.kind == HAND and d.signer != prev.owner:
                    raise DeedError(f"{where} is signed by {d.signer}, not by {prev.owner}, the owner it hands from")
                if d.kind == CLAIM and (d.signer != d.owner or not self._revoked(prev.owner)):
                    raise DeedError(f"{where} claims the disk from {prev.owner}, which is not revoked")
            if pinned and pin is not None and self._revoked(d.signer):
                raise DeedError(f"{where} is signed by the revoked host {d.signer}")
            if not self._signature_ok(d, digest):
                raise DeedError(f"{where} does not carry a valid signature of {d.signer}")
            if digest == pin:
                pinned = True
            links.append(d)
        if not pinned:
            raise DeedError("the chain does not contain the hand-over this host holds (another history of the disk)")
        if self._revoked(links[-1].owner) and not head_may_be_revoked:
            raise DeedError(f"the chain ends at {links[-1].owner}, which is revoked")
        return Chain(tuple(links))

    def extend(self, chain: Chain, raw: object, kind: str) -> Chain:
        """``chain`` with one more link of ``kind``, checked as ``check`` would (its links' signatures are
        remembered, so this costs the chain's hashing and one link's verifies)."""
        d = parse(raw)
        if d.kind != kind:
            raise DeedError(f"expected a {kind} link, not {d.kind}")
        return self.check([*chain.raws(), raw], chain.head.disk)
