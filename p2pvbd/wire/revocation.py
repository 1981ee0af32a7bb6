"""The swarm's revocation list: hosts the founder removed (a stolen laptop), signed by the swarm CA.

Only the CA key (the founder's) can sign a list, so any member may carry it: it spreads through the
index (a ``revoked`` record under ``REVOKED_KEY``, republished by every host that knows it) and is
pushed to every reachable host when made. A host keeps the valid list with the highest serial it has
seen. A revoked host's requests, connections and index records are refused everywhere. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# The index key of the list: one per swarm.
REVOKED_KEY = "swarm"
# Hosts one list names: one index record must hold them with the CA's signature (8 names of 64
# characters take ~600 bytes of a record's 1152); a person loses few machines.
MAX_REVOKED_HOSTS = 8
_DOMAIN = b"p2pvbd-revoked/1\0"


class RevocationError(ValueError):
    """A list that cannot be made (too many hosts) or is not the CA's."""


@dataclass(frozen=True)
class Revocations:
    serial: int = 0  # 0: the empty list nobody signed
    names: tuple[str, ...] = ()
    sig: bytes = b""

    def _message(self) -> bytes:
        return _DOMAIN + msgpack.packb([self.serial, list(self.names)])

    @classmethod
    def issue(cls, ca_key: Ed25519PrivateKey, names: Iterable[str], serial: int) -> Revocations:
        ordered = tuple(sorted(set(names)))
        if len(ordered) > MAX_REVOKED_HOSTS:
            raise RevocationError(f"a swarm revokes at most {MAX_REVOKED_HOSTS} hosts")
        unsigned = cls(serial, ordered)
        return cls(serial, ordered, ca_key.sign(unsigned._message()))

    def valid(self, ca_public: Ed25519PublicKey) -> bool:
        if self.serial == 0:
            return not self.names
        try:
            ca_public.verify(self.sig, self._message())
        except InvalidSignature:
            return False
        return True

    def revokes(self, name: str) -> bool:
        return name in self.names

    def with_host(self, ca_key: Ed25519PrivateKey, name: str) -> Revocations:
        return Revocations.issue(ca_key, (*self.names, name), self.serial + 1)

    def as_payload(self) -> dict[str, Any]:
        return {"serial": self.serial, "names": list(self.names), "sig": self.sig}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> Revocations:
        """From a payload ``dht_schema`` checked (types and bounds), or a file written by as_payload."""
        return cls(int(p["serial"]), tuple(p["names"]), bytes(p["sig"]))
