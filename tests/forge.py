"""Index records as a misbehaving swarm member makes them: correctly signed, whatever they say.

``sign_record`` refuses a payload its kind's schema rejects, so these tests sign without it; and they
hand records to a running daemon the way any member's DHT node would, in a signed, MAC-sealed ``store``
RPC.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pvbd.swarm.trust import HostIdentity
from p2pvbd.wire.dht_records import DEFAULT_TTL, _signed_bytes, derive_mac_key, seal, unseal
from p2pvbd.wire.dht_wire import node_id_for, open_datagram, sign_datagram

# Bounds waiting for a daemon's reply to one datagram on loopback (it answers in well under a second).
REPLY_SECONDS = 30.0


def forge_record(signing_key: Ed25519PrivateKey, publisher: Any, kind: Any, key: Any, payload: Any,
                 ttl: float = DEFAULT_TTL, binding: bytes = b"") -> bytes:
    """A record signed by ``signing_key`` with no check of what it says; ``binding``: the CA's binding of
    a name to that key, as a member holds for its own name (trust.HostIdentity.binding)."""
    m = {"kind": kind, "key": key, "publisher": publisher, "pubkey": signing_key.public_key().public_bytes_raw(),
         "binding": binding, "ts": time.time(), "ttl": float(ttl), "payload": msgpack.unpackb(msgpack.packb(payload))}
    return msgpack.packb({**m, "sig": signing_key.sign(_signed_bytes(m))})


class IndexClient:
    """One UDP socket speaking the DHT's RPCs to daemons, as a swarm member (it holds the swarm secret)."""

    def __init__(self, member: HostIdentity) -> None:
        self.member = member
        self.mac_key = derive_mac_key(member.swarm_secret)
        self.node_id = node_id_for(member.name)  # the member's one id (a daemon learns a soon dead contact)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(REPLY_SECONDS)

    def close(self) -> None:
        self.sock.close()

    def store(self, port: int, dkey: bytes, raws: list[bytes]) -> object:
        """Send one ``store`` to 127.0.0.1:``port``; its reply (True: every record kept)."""
        msg_id = os.urandom(20)
        body = b"\x00" + msg_id + msgpack.packb(["store", [self.node_id, dkey, raws]])
        m = self.member
        signed = sign_datagram(body, m.name, m.key, m.key.public_key().public_bytes_raw(), m.binding)
        self.sock.sendto(seal(self.mac_key, signed), ("127.0.0.1", port))
        while True:  # the daemon may also send us requests (it hands records over to new contacts)
            opened = open_datagram(unseal(self.mac_key, self.sock.recv(65536)) or b"")
            reply = opened[1] if opened is not None else b""
            if reply[:1] == b"\x01" and reply[1:21] == msg_id:
                return msgpack.unpackb(reply[21:])
