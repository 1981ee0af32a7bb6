"""Who owns a disk as its chain of deeds proves it: the owner every display and decision names.

The index's owner records are claims any member can make, under its own name, at any epoch. A claim
counts only once its host proves it with a chain of deeds (``Ownership.prove``), pinned by the chain this
host holds when it has a replica. With a replica, the owner is the one the replica records, or a claim
at a higher epoch whose chain contains the replica's. Without one there is nothing to pin, and two
members may each prove a history of their own of a disk of the same name: the history the most holders
of the disk hold wins (one member counts once, however many records it publishes). Every claim above
the owner's epoch that proves nothing, or proves another history, is a conflict: shown by ``status``,
never followed.

Proofs cost a request to the claimant: a proof is remembered, and a whole answer is reused while the
index's claims and this host's replica stay as they were, for :data:`ANSWER_SECONDS`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from p2pvbd.swarm.deeds import Chain, DeedError
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.dht_records import FirstSeen

if TYPE_CHECKING:
    from p2pvbd.dht import DhtNode
    from p2pvbd.kernel_hook_ctl import HookController
    from p2pvbd.swarm.ownership import Ownership
    from p2pvbd.swarm.peer_transport import PeerConnection
    from p2pvbd.swarm.revoked import RevocationBook


class ProofHost(Protocol):
    """What resolving proven owners needs of the node: the index, its disks, links, deeds and revocations."""

    name: str
    dht: DhtNode
    ctl: HookController
    ownership: Ownership
    revoked: RevocationBook

    async def connect(self, peer: str, *, relay: bool = True) -> PeerConnection: ...

log = logging.getLogger(__name__)

# A claimant that does not send its proof within this is taken as not proving it (for now): a status
# query must answer with a host down (swarm/node.QUERY_TIMEOUT is 5 s for one summary).
PROOF_SECONDS = 10.0
# An answer is reused this long while the claims and the replica are unchanged: a status polled every
# second, or the VM book refreshed every 5 s, asks a lying claimant at most twice a minute.
ANSWER_SECONDS = 30.0
# Answers and proofs remembered: a few per disk, for far more disks than a person has.
MAX_REMEMBERED = 1024


@dataclass(frozen=True)
class Conflict:
    """An owner claim in the index that this host does not follow, and why."""

    host: str
    epoch: int
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "epoch": self.epoch, "error": self.why}


@dataclass(frozen=True)
class ProvenOwner:
    owner: str  # "" when no claim is proven and this host holds no replica recording one
    epoch: int
    conflicts: tuple[Conflict, ...] = ()


def history(chain: Chain) -> bytes:
    """A chain's history: the digest of its create link (two chains of one history share it)."""
    return chain.links[0].digest


class ProvenOwners:
    """Resolves and remembers proven owners for one swarm node."""

    def __init__(self, swarm: ProofHost) -> None:
        self.swarm = swarm
        self._answers: OrderedDict[tuple[Any, ...], tuple[float, ProvenOwner]] = OrderedDict()
        self._proofs: OrderedDict[tuple[Any, ...], Chain] = OrderedDict()
        self._logged = FirstSeen()  # (disk, host, epoch) of conflicts: logged once

    async def of(self, disk: str) -> ProvenOwner:
        swarm = self.swarm
        claims: dict[str, int] = {}
        for rec in await swarm.dht.lookup("owner", disk):
            host, epoch = str(rec.payload["host"]), int(rec.payload["epoch"])
            if not swarm.revoked.revokes(host):
                claims[host] = max(epoch, claims.get(host, -1))
        exp = swarm.ctl.get(disk)
        store = exp.store if exp is not None else None
        recorded = (store.owner, store.epoch) if store is not None and store.owner \
            and not swarm.revoked.revokes(store.owner) else None
        key = (disk, tuple(sorted(claims.items())), recorded, store is not None)
        now = time.monotonic()
        if (hit := self._answers.get(key)) is not None and now - hit[0] < ANSWER_SECONDS:
            self._answers.move_to_end(key)
            return hit[1]
        answer = await self._resolve(disk, claims, store, recorded)
        self._answers[key] = (now, answer)
        while len(self._answers) > MAX_REMEMBERED:
            self._answers.popitem(last=False)
        for c in answer.conflicts:
            if self._logged.first((disk, c.host, c.epoch)):
                log.warning("not following %s as the owner of %s (its claim at epoch %d): %s", c.host, disk,
                            c.epoch, c.why)
        return answer

    async def _resolve(self, disk: str, claims: dict[str, int], store: Any, recorded: tuple[str, int] | None
                       ) -> ProvenOwner:
        base = recorded[1] if recorded is not None else -1
        asked = {h: e for h, e in claims.items() if e > base and (h, e) != recorded}
        proofs: dict[str, Chain | str] = {}

        async def prove(host: str, epoch: int) -> None:
            proofs[host] = await self._prove(disk, host, epoch, store, recorded)

        async with trio.open_nursery() as nursery:
            for host, epoch in asked.items():
                nursery.start_soon(prove, host, epoch)
        chains = {h: c for h, c in proofs.items() if isinstance(c, Chain)}
        conflicts = [Conflict(h, asked[h], c) for h, c in proofs.items() if isinstance(c, str)]
        if recorded is None and len({history(c) for c in chains.values()}) > 1:
            chosen = await self._most_held(disk, chains)
            conflicts += [Conflict(h, asked[h], f"its chain of deeds is another history of {disk} than the one "
                                   "most of its holders hold")
                          for h, c in chains.items() if history(c) != chosen]
            chains = {h: c for h, c in chains.items() if history(c) == chosen}
        best = max(chains.values(), key=lambda c: c.epoch, default=None)
        if best is not None and best.epoch > base:
            owner, epoch = best.owner, best.epoch
        elif recorded is not None:
            owner, epoch = recorded
        else:
            owner, epoch = "", 0
        return ProvenOwner(owner, epoch, tuple(sorted((c for c in conflicts if c.epoch > epoch or c.host != owner),
                                                      key=lambda c: (-c.epoch, c.host))))

    async def _prove(self, disk: str, host: str, epoch: int, store: Any, recorded: tuple[str, int] | None
                     ) -> Chain | str:
        """``host``'s chain for its claim, or why it proves nothing."""
        if host == self.swarm.name:
            return f"{host} (this host) does not own {disk} at epoch {epoch}"
        key = (disk, host, epoch, recorded)
        if (chain := self._proofs.get(key)) is not None:
            self._proofs.move_to_end(key)
            return chain
        try:
            with trio.fail_after(PROOF_SECONDS):
                chain = await self.swarm.ownership.prove(self.swarm, host, disk, store)
        except trio.TooSlowError:
            return f"{host} did not send its proof of owning {disk} within {PROOF_SECONDS:.0f} s"
        except PeerError as e:
            return e.message
        if chain.epoch < epoch:
            return f"{host} claims epoch {epoch} but its deeds end at epoch {chain.epoch}"
        self._proofs[key] = chain
        while len(self._proofs) > MAX_REMEMBERED:
            self._proofs.popitem(last=False)
        return chain

    async def _most_held(self, disk: str, chains: dict[str, Chain]) -> bytes:
        """The history of ``disk`` that most of its holders hold (each asked for its chain); ties go to the
        history with the lowest create digest, so every host picks the same one."""
        holders = {str(r.payload["host"]) for r in await self.swarm.dht.lookup("holders", disk)
                   if not r.payload.get("gone")} | set(chains)
        counts: dict[bytes, int] = {history(c): 0 for c in chains.values()}

        async def ask(host: str) -> None:
            try:
                with trio.fail_after(PROOF_SECONDS):
                    conn = await self.swarm.connect(host)
                    reply = await conn.request("deeds", {"disk": disk}, timeout=PROOF_SECONDS)
                chain = await trio.to_thread.run_sync(self.swarm.ownership.check_offer, reply.get("links"), disk,
                                                      None)
            except (PeerError, DeedError, trio.TooSlowError):
                return
            if history(chain) in counts:
                counts[history(chain)] += 1

        async with trio.open_nursery() as nursery:
            for host in holders - {self.swarm.name}:
                nursery.start_soon(ask, host)
        return max(counts, key=lambda h: (counts[h], [-b for b in h]))

