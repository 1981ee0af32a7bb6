"""`status`: every disk's owner, epoch and each replica's coverage, answered within about a second.

What it needs is asked concurrently: the index (the disk catalog, the owner claims behind the deeds, the
holders), then each holder's map summary. Each step is bounded (INDEX_SECONDS, ASK_SECONDS); what has not
answered by then is stood in for by its last answer (swarm/recall.py). The index is bounded only while a
peer this host had a link with has none alive (a node gone silent is what stalls a lookup), and a host
heard from lately is never bounded: its link is open, so its answer is worth waiting for (up to
QUERY_TIMEOUT, as before): a loaded host may take longer than ASK_SECONDS, and a remembered summary of a
live host would show old coverage.

When the owner does not answer, coverage cannot be measured against it. The disk says so
(``owner_reachable: false``, ``owner_error``) and each replica shows what is known: all of it current
when its root equals the root the owner last showed; else the coverage last measured here against that
root, while the replica's root is unchanged since; else what the holder last published (``stale``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

import trio

from p2pvbd.dht import DhtNode
from p2pvbd.kernel_hook_ctl import HookController
from p2pvbd.swarm import maps
from p2pvbd.swarm.ops import ServiceHooks
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.swarm.proven import ProvenOwners
from p2pvbd.swarm.recall import Answer, Recall

log = logging.getLogger(__name__)

# A person waits about a second for `status` whatever is down: half for the index, half for the hosts.
# The index's RPC timeout (5 s) for a node that just went silent is what this keeps them from waiting.
INDEX_SECONDS = 0.5
ASK_SECONDS = 0.5
# A summary request gives up after this (as node.QUERY_TIMEOUT); in the background when not waited for.
QUERY_TIMEOUT = 5.0


class StatusHost(Protocol):
    """What of the swarm node `status` reads."""

    name: str
    ctl: HookController
    proven: ProvenOwners
    hooks: ServiceHooks
    dht: DhtNode

    async def known_disks(self) -> list[str]: ...
    async def map_of(self, host: str, disk: str) -> maps.MapSource: ...
    async def current_blocks(self, disk: str, holder: maps.MapSource, mine: maps.MapSummary,
                             owner: maps.MapSource, ref: maps.MapSummary) -> int: ...
    def known_coverage(self, disk: str, host: str, mine: bytes, ref: bytes) -> int | None: ...
    def has_live_link(self, peer: str) -> bool: ...
    def a_peer_in_doubt(self) -> bool: ...


class StatusView:
    """Answers `status` for one node, remembering what each source said last (a Recall)."""

    def __init__(self, swarm: StatusHost, recall: Recall) -> None:
        self.swarm, self.recall = swarm, recall

    async def known_disks(self, index_by: float) -> list[str]:
        """Every disk in the catalog, by ``index_by`` (trio time) when a catalog was read before."""
        answer = await self.recall.get(("catalog",), self.swarm.known_disks, index_by)
        if answer.value is None:
            raise answer.error or RuntimeError("no catalog")
        return list(answer.value)

    async def status(self, disk: str | None = None) -> dict[str, Any]:
        """Every disk's status, or ``disk``'s (ValueError when the swarm has none of that name)."""
        # The catalog and each disk's lookups, together; bounded only while a peer is in doubt: with every
        # link alive nothing stalls the index, and a slow lookup (shaped links, a loaded host) is waited for
        # rather than answered with a holder missing.
        index_by = trio.current_time() + INDEX_SECONDS if self.swarm.a_peer_in_doubt() else math.inf
        names = await self.known_disks(index_by)
        if disk is not None:
            if disk not in names:
                raise ValueError(f"no disk named {disk!r} in the swarm")
            names = [disk]
        results: dict[str, dict[str, Any]] = {}

        async def one(name: str) -> None:
            results[name] = await self.disk(name, index_by)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        return {"host": self.swarm.name, "disks": [results[n] for n in names]}

    async def disk(self, disk: str, index_by: float) -> dict[str, Any]:
        """Owner, epoch and each replica's coverage against the owner's map, from map summaries: a replica
        whose root equals the owner's costs nothing, another a descent into where they differ."""
        swarm, recall = self.swarm, self.recall
        answers: dict[str, Answer] = {}

        async def index(name: str, key: tuple[str, str], query: Any) -> None:
            answers[name] = await recall.get(key, query, index_by)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(index, "proven", ("proven", disk), lambda: swarm.proven.of(disk))
            nursery.start_soon(index, "holders", ("holders", disk), lambda: swarm.holder_records(disk))
        if answers["proven"].value is None:
            raise answers["proven"].error or RuntimeError("no owner")
        proven = answers["proven"].value
        owner, epoch = proven.owner, proven.epoch
        local = swarm.ctl.get(disk)
        if not answers["proven"].fresh and local is not None and local.store.epoch > epoch:
            owner, epoch = local.store.owner, local.store.epoch  # it changed hands here since that answer
        holders = {str(r.payload["host"]): r for r in answers["holders"].value or []}
        if local is not None:
            holders.setdefault(swarm.name, None)

        asks: dict[str, Answer] = {}
        ask_by = trio.current_time() + ASK_SECONDS

        async def ask(host: str) -> None:
            async def summary() -> tuple[maps.MapSource, maps.MapSummary]:
                with trio.fail_after(QUERY_TIMEOUT):
                    source = await swarm.map_of(host, disk)
                    return source, await source.summary()
            live = host == swarm.name or swarm.has_live_link(host)
            asks[host] = await recall.get(("summary", disk, host), summary,
                                          trio.current_time() + QUERY_TIMEOUT if live else ask_by)

        async with trio.open_nursery() as nursery:
            for host in {*holders, owner} - {""}:
                nursery.start_soon(ask, host)
        summaries = {h: a.value[1] for h, a in asks.items() if a.value is not None}
        fresh = {h: a.value[0] for h, a in asks.items() if a.fresh}
        errors = {h: _reason(a.error) for h, a in asks.items() if not a.fresh}
        owner_reachable = owner in fresh
        ref = summaries.get(owner) if owner_reachable else None
        current: dict[str, int] = {}

        async def compare(host: str, ref: maps.MapSummary) -> None:
            try:
                with trio.fail_after(QUERY_TIMEOUT):
                    current[host] = await swarm.current_blocks(disk, fresh[host], summaries[host], fresh[owner], ref)
            except (PeerError, trio.TooSlowError) as e:
                errors[host] = _reason(e)

        if ref is not None:
            async with trio.open_nursery() as nursery:
                for host in holders:
                    if host == owner:
                        current[host] = ref.n_blocks
                    elif host in fresh and summaries[host].n_blocks == ref.n_blocks:
                        nursery.start_soon(compare, host, ref)
        else:
            current |= self._known(disk, owner, holders, summaries)
        last_ref = ref or summaries.get(owner)
        any_summary = last_ref or next(iter(summaries.values()), None)
        total = any_summary.n_blocks if any_summary is not None else 0
        replicas = []
        for host in sorted(holders):
            entry: dict[str, Any] = {"host": host}
            if host in current:
                entry |= {"coverage": current[host] / total if total else 0.0, "current_blocks": current[host],
                          "total_blocks": total}
                if host in errors:
                    entry["error"] = errors[host]
            else:  # neither measured nor known from earlier: what the holder last published
                rec = holders[host]
                held = min(rec.payload["current_blocks"], total) if rec is not None else 0
                entry |= {"coverage": (held / total) if total else 0.0, "current_blocks": held,
                          "total_blocks": total, "stale": True, "error": errors.get(host) or errors.get(owner, "")}
            entry["lag_blocks"] = entry["total_blocks"] - entry["current_blocks"]
            replicas.append(entry)
        return {"name": disk, "size": any_summary.size if any_summary else 0,
                "block_size": any_summary.block_size if any_summary else 0, "owner": owner, "epoch": epoch,
                "owner_reachable": owner_reachable or not owner,
                "owner_error": "" if owner_reachable or not owner else errors.get(owner, "not answering"),
                "replicas": replicas, "replicate": swarm.hooks.replication_policy(disk),
                "conflicts": [c.as_dict() for c in proven.conflicts],
                "migration": ref.extra.get("migration") if ref is not None else None}

    def _known(self, disk: str, owner: str, holders: dict[str, Any], summaries: dict[str, maps.MapSummary]
               ) -> dict[str, int]:
        """With the owner not answering: each replica's coverage as far as it is known here, against the
        owner's last summary (see the module's docstring)."""
        ref = summaries.get(owner)
        if ref is None:
            return {}
        known: dict[str, int] = {}
        for host in holders:
            mine = summaries.get(host)
            if host == owner:
                known[host] = ref.n_blocks  # the reference itself, as it last was
            elif mine is None or mine.n_blocks != ref.n_blocks:
                continue
            elif maps.same_root(mine.root, ref.root):
                known[host] = ref.n_blocks
            elif (measured := self.swarm.known_coverage(disk, host, mine.root, ref.root)) is not None:
                known[host] = measured
        return known


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "not answering"
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    return getattr(error, "message", None) or str(error) or type(error).__name__
