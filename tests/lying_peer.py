"""A lying swarm member for tests: the shipped daemon, except that every block it serves to a peer has its
first byte flipped (after compression, so the receiver's decoding or hash check must catch it).

Run as ``python -m tests.lying_peer daemon --home HOME`` (what ``tests.daemons.Host.start(liar=True)``
does): the same command line as ``p2pvbd``, with one method of the swarm node replaced in this process.
"""

from __future__ import annotations

import logging
from typing import Any

from p2pvbd import cli
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.swarm.node import Swarm

_honest_serve_blocks = Swarm._serve_blocks


def _lying_serve_blocks(self: Swarm, store: ReplicaStore, wanted: list[Any]) -> tuple[dict[str, Any], int]:
    reply, size = _honest_serve_blocks(self, store, wanted)
    reply["blocks"] = [entry._replace(payload=bytes([entry.payload[0] ^ 0xFF]) + entry.payload[1:])
                       if entry.payload else entry for entry in reply["blocks"]]
    return reply, size


if __name__ == "__main__":
    Swarm._serve_blocks = _lying_serve_blocks  # type: ignore[method-assign]
    logging.getLogger("p2pvbd").warning("this daemon is a lying peer: it corrupts every block it serves")
    cli.main()
