"""This host's copy of the swarm's revocation list: the newest valid one it has seen, kept on disk.

Lists come from the founder's `p2pvbd revoke`, from peers pushing them and from the index; each is
checked against the swarm CA (``revocation.Revocations.valid``) and kept only if newer, so a member can
neither forge a list nor roll one back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pvbd.base.files import atomic_write, read_json_file
from p2pvbd.wire.revocation import RevocationError, Revocations

log = logging.getLogger(__name__)

REVOKED_FILE = "revoked.json"


class RevocationBook:
    def __init__(self, path: Path, ca_public: Ed25519PublicKey) -> None:
        self.path, self._ca_public = path, ca_public
        self.current = self._load()

    def _load(self) -> Revocations:
        raw = read_json_file(self.path, dict, log)
        if raw is None:
            return Revocations()
        try:
            rev = Revocations(int(raw["serial"]), tuple(str(n) for n in raw["names"]), bytes.fromhex(raw["sig"]))
        except (KeyError, TypeError, ValueError, RevocationError) as e:
            log.error("ignoring %s: %s", self.path, e)
            return Revocations()
        if not rev.valid(self._ca_public):
            log.error("ignoring %s: not signed by this swarm's CA", self.path)
            return Revocations()
        return rev

    def revokes(self, name: str) -> bool:
        return self.current.revokes(name)

    def adopt(self, rev: Revocations) -> bool:
        """Keep ``rev`` if the CA signed it and it is newer than the list held; True if kept."""
        if rev.serial <= self.current.serial or not rev.valid(self._ca_public):
            return False
        atomic_write(self.path, json.dumps({"serial": rev.serial, "names": list(rev.names),
                                            "sig": rev.sig.hex()}).encode())
        added = sorted(set(rev.names) - set(self.current.names))
        self.current = rev
        log.warning("revocation list %d: %s revoked from the swarm", rev.serial, ", ".join(added) or "no host newly")
        return True
