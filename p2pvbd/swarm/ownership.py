"""This host's side of ownership deeds (``deeds``): the chain kept beside each replica, the links it
signs, and the proofs it asks of others before it follows a new owner.

The chain lives in ``DISK_DIR/deeds`` (msgpack list of links, written atomically), and is always saved
*before* the store records the owner it proves: a crash in between leaves a link ahead of the store's
epoch, which is ignored (``local`` trims the chain to the store's epoch) and re-made or replaced later.
A disk owned here without a chain (made before chains existed) starts one with a ``create`` link at its
current epoch the first time it is asked for.

A replica's chain is the proof it last verified, and pins every later one: ``prove`` accepts an owner
only through a chain that contains it. The blocking calls here read and write files: run them in a thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgpack
import trio

from p2pvbd.base.files import atomic_write
from p2pvbd.swarm import deeds
from p2pvbd.swarm.deeds import Chain, DeedChecker, DeedError
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.swarm.trust import HostIdentity

if TYPE_CHECKING:
    from p2pvbd.replica_store import ReplicaStore
    from p2pvbd.swarm.peer_transport import PeerConnection


class Connects(Protocol):
    """What proving ownership needs of the node: a link to a host."""

    async def connect(self, peer: str, *, relay: bool = True) -> PeerConnection: ...

log = logging.getLogger(__name__)

DEEDS_FILE = "deeds"
# Asking an owner for its chain: a longest chain is ~5 MiB, seconds on a DSL link.
PROOF_TIMEOUT = 30.0
ERR_UNPROVEN = "unproven"


def load_links(directory: Path) -> list[bytes]:
    """The links saved in ``directory`` (unchecked), or none if there is no readable chain file."""
    try:
        raw = (directory / DEEDS_FILE).read_bytes()
    except FileNotFoundError:
        return []
    try:
        links = msgpack.unpackb(raw, max_array_len=deeds.MAX_CHAIN_LINKS, max_bin_len=deeds.MAX_LINK_BYTES,
                                max_str_len=0, max_map_len=0, max_ext_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        log.warning("ignoring unreadable %s: %s", directory / DEEDS_FILE, e)
        return []
    return links if isinstance(links, list) else []


def save_links(directory: Path, chain: Chain) -> None:
    atomic_write(directory / DEEDS_FILE, msgpack.packb(chain.raws()))


class Ownership:
    def __init__(self, identity: HostIdentity, checker: DeedChecker) -> None:
        self.identity, self.checker = identity, checker
        self.name = identity.name

    def _sign(self, kind: str, disk: str, epoch: int, owner: str, prev: bytes) -> bytes:
        return deeds.sign(kind, disk, epoch, owner, prev, self.name, self.identity.key, self.identity.binding)

    def local(self, store: ReplicaStore) -> Chain | None:
        """The chain this host holds for ``store`` as of its epoch (blocking); for a disk owned here, one
        that ends at this host, started (and saved) if there is none."""
        chain: Chain | None = None
        links = load_links(store.directory)
        if links:
            try:
                chain = self.checker.check(links, store.name, head_may_be_revoked=True).up_to(store.epoch)
            except DeedError as e:
                log.warning("%s: ignoring its saved chain: %s", store.name, e)
        if store.owner == self.name and (chain is None or (chain.owner, chain.epoch) != (self.name, store.epoch)):
            if chain is not None:
                log.warning("%s: its saved chain ends at %s (epoch %d), not here: starting a new one",
                            store.name, chain.owner, chain.epoch)
            chain = self.checker.check([self._sign(deeds.CREATE, store.name, store.epoch, self.name, b"")],
                                       store.name)
            save_links(store.directory, chain)
        return chain

    def hand_link(self, chain: Chain, dest: str, epoch: int) -> bytes:
        """The link handing ``chain``'s disk, owned here, to ``dest`` at ``epoch``."""
        return self._sign(deeds.HAND, chain.head.disk, epoch, dest, chain.head.digest)

    def handed(self, store: ReplicaStore, dest: str, epoch: int) -> None:
        """Record (blocking) that this host handed ``store``'s disk to ``dest`` at ``epoch``: the link
        first, then the owner. Signing is deterministic, so this re-makes the link the commit carried."""
        chain = self.local(store)
        if chain is not None and chain.owner == self.name and chain.epoch < epoch:
            save_links(store.directory, self.checker.extend(chain, self.hand_link(chain, dest, epoch), deeds.HAND))
        store.set_owner(dest, epoch)

    def claimed(self, store: ReplicaStore, epoch: int, counter: int) -> None:
        """Take ``store``'s disk over at ``epoch`` from its revoked owner (blocking): a claim link on the
        chain this replica holds (a new chain if it holds none), then the owner."""
        chain = self.local(store)
        if chain is None:
            chain = self.checker.check([self._sign(deeds.CREATE, store.name, epoch, self.name, b"")], store.name)
        else:
            link = self._sign(deeds.CLAIM, store.name, epoch, self.name, chain.head.digest)
            chain = self.checker.extend(chain, link, deeds.CLAIM)
        save_links(store.directory, chain)
        store.set_owner(self.name, epoch, counter)

    def adopt(self, store: ReplicaStore, chain: Chain) -> None:
        """Record (blocking) the owner ``chain`` proves for ``store``, the chain first."""
        save_links(store.directory, chain)
        if (store.owner, store.epoch) != (chain.owner, chain.epoch):
            store.set_owner(chain.owner, chain.epoch)

    def check_offer(self, links: object, disk: str, store: ReplicaStore | None) -> Chain:
        """The chain ``links`` proves, pinned by the one this host holds for ``store`` (blocking);
        DeedError if it proves nothing here."""
        pin = self.local(store) if store is not None else None
        if not isinstance(links, list):
            raise DeedError("no chain of deeds came with it")
        return self.checker.check(links, disk, pin=pin.head.digest if pin is not None else None)

    # ---- proofs from other hosts ------------------------------------------------------------------
    async def prove(self, swarm: Connects, host: str, disk: str, store: ReplicaStore | None) -> Chain:
        """``host``'s proof that it owns ``disk`` (at the epoch its chain ends at), checked against what this
        host holds; PeerError (``unproven``) if there is none."""
        try:
            with trio.fail_after(PROOF_TIMEOUT):
                conn = await swarm.connect(host)
                reply = await conn.request("deeds", {"disk": disk}, timeout=PROOF_TIMEOUT)
        except trio.TooSlowError:
            raise PeerError("timeout", f"{host} did not send its proof of owning {disk} in time") from None
        try:
            chain = await trio.to_thread.run_sync(self.check_offer, reply.get("links"), disk, store)
        except DeedError as e:
            raise PeerError(ERR_UNPROVEN, f"{host} does not prove it owns {disk}: {e}") from None
        if chain.owner != host:
            raise PeerError(ERR_UNPROVEN, f"{host}'s deeds for {disk} end at {chain.owner} (epoch {chain.epoch}), "
                                          f"not at {host}")
        return chain
