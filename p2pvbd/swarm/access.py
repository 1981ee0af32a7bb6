"""Who may call each peer op: a rule per op, checked against the caller's certificate name before its handler.

Every member of the swarm holds a valid certificate, so TLS alone says only "a member". Reading maps
and blocks is what members are for; everything that changes who writes a disk, or writes into it, is
allowed to one host: the disk's current owner prepares a migration, the host that prepared it ships
blocks and commits, and a guest's forwarded I/O comes only from a host that handed the disk here.
``Swarm.handle_peer`` checks an op's bounds and rule in one place; a refusal is a ``forbidden`` (or
``too_large``) error for the caller and one log line per (peer, op, disk).

Ownership itself is proven by a chain of signed deeds back to the disk's creation (deeds.py,
swarm/ownership.py), never by the caller's word or an index record.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from p2pvbd.base.home import NAME_RE
from p2pvbd.swarm import maps
from p2pvbd.swarm.deeds import DeedError
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.peer_wire import OPS, OpSpec

if TYPE_CHECKING:
    from p2pvbd.kernel_hook_ctl import HookController
    from p2pvbd.swarm.ops import IncomingMigrations, OutgoingMigration
    from p2pvbd.swarm.ownership import Ownership


class RuleHost(Protocol):
    """What the rules here read of the node: who this host is, its disks, who owns them, migrations."""

    name: str
    ctl: HookController
    ownership: Ownership
    migration_target: IncomingMigrations
    migrations: Mapping[str, OutgoingMigration]

    async def map_of(self, host: str, disk: str) -> maps.MapSource: ...

log = logging.getLogger(__name__)

ERR_FORBIDDEN = "forbidden"
ERR_TOO_LARGE = "too_large"
# Refusals remembered so that each (peer, op, disk) is logged once: a member that varies the disk name
# costs a log line per new name and ~0.3 KiB per entry, at most this many; a forgotten one is logged again.
MAX_REMEMBERED_REFUSALS = 1024
# One map summary on the way: a host that answers none within this is presumed unreachable.
SUMMARY_TIMEOUT = 5.0

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
# A rule answers None to let the caller in, else why not (the refusal's message).
# Its first argument is the node (swarm/node.Swarm); the rules here need only a RuleHost of it.
Rule = Callable[[Any, str, dict[str, Any]], Awaitable[str | None]]


@dataclass(frozen=True)
class PeerOp:
    """One peer op, all of it: its name, its request's schema (the transport checks bodies against it
    before anything else: ``wire/peer_wire.OPS`` by default), who may call it, its handler, and its list
    fields' most entries. Each service lists its own (``ops()``); the daemon registers them all."""

    name: str
    rule: Rule
    handler: Handler
    lists: Mapping[str, int] = field(default_factory=dict)
    schema: OpSpec | None = None  # None: the wire table's, OPS[name], filled in here

    def __post_init__(self) -> None:
        if self.schema is None:
            if self.name not in OPS:
                raise ValueError(f"peer op {self.name!r} has no schema in wire/peer_wire.OPS")
            object.__setattr__(self, "schema", OPS[self.name])


# ---- rules ------------------------------------------------------------------------------------------------
async def member(swarm: RuleHost, peer: str, body: dict[str, Any]) -> str | None:
    """Any member: its certificate from the swarm's CA was checked in the TLS handshake (map and block reads)."""
    return None


async def current_owner(swarm: RuleHost, peer: str, body: dict[str, Any]) -> str | None:
    """migrate_prepare: the disk's current owner at the body's epoch, proven by its chain of deeds
    (``body["deeds"]``, deeds.py) and pinned by the chain this host holds if it has a replica. A host that
    owns the disk refuses: its own disk never becomes another host's incoming replica."""
    disk, claimed = body["disk"], body["epoch"]
    if (bad := _bad_disk(disk)) is not None:
        return bad
    exp = swarm.ctl.get(disk)
    store = exp.store if exp is not None else None
    if store is not None and store.owner == swarm.name:
        return f"{peer} is not the owner of {disk}: {swarm.name} owns it (epoch {store.epoch})"
    try:
        chain = await trio.to_thread.run_sync(swarm.ownership.check_offer, body["deeds"], disk, store)
    except DeedError as e:
        return f"{peer} does not prove it owns {disk}: {e}"
    if (chain.owner, chain.epoch) != (peer, claimed):
        return (f"{peer} is not the owner of {disk} at epoch {claimed}: its deeds end at {chain.owner}, "
                f"epoch {chain.epoch}")
    return None


async def migration_source(swarm: RuleHost, peer: str, body: dict[str, Any]) -> str | None:
    """put_blocks, migrate_pull, migrate_job, migrate_commit, migrate_abort: the host that prepared the
    incoming migration of the disk here (itself confirmed as the owner by ``current_owner``)."""
    disk = body["disk"]
    if (bad := _bad_disk(disk)) is not None:
        return bad
    inc = swarm.migration_target.incoming.get(disk)
    if inc is not None and inc.source == peer:
        return None
    return (f"{peer} is not the source of a migration of {disk} here "
            + (f"({inc.source} is)" if inc is not None else "(none is under way)"))


async def migration_party(swarm: RuleHost, peer: str, body: dict[str, Any]) -> str | None:
    """migrate_status: the source of the disk's migration here, also after this host committed (the host
    it records the disk came from) or restarted (the owner its replica records since the prepare). With no
    replica here there is nothing to guard: the answer is "not committed"."""
    disk = body["disk"]
    if (bad := _bad_disk(disk)) is not None:
        return bad
    exp = swarm.ctl.get(disk)
    if exp is None:
        return None
    inc = swarm.migration_target.incoming.get(disk)
    if peer == exp.store.owner or peer in exp.store.handed_from[-1:] or (inc is not None and inc.source == peer):
        return None
    return f"{peer} is not the source of a migration of {disk} here"


async def handed_over(swarm: RuleHost, peer: str, body: dict[str, Any]) -> str | None:
    """guest_io: a host that handed the disk to this host (this host's durable record of it), whose open
    guest connections are forwarded here and relayed on along later hand-overs; the source of the incoming
    migration; and, for reads only, the destination of this host's own migration of the disk (an incoming
    replica reads through its source), while it runs or its outcome is being asked."""
    disk = body["disk"]
    if (bad := _bad_disk(disk)) is not None:
        return bad
    exp = swarm.ctl.get(disk)
    if exp is not None and peer in exp.store.handed_from:
        return None
    target = swarm.migration_target
    inc = target.incoming.get(disk)
    if inc is not None and inc.source == peer:
        return None
    if body.get("op") == "read":
        running = swarm.migrations.get(disk)
        if (running is not None and running.finished is None and running.dest == peer) \
                or target.resolving.get(disk) == peer:
            return None
    return f"{peer} did not hand {disk} over to {swarm.name}: its guest I/O is not taken here"


# ---- helpers ----------------------------------------------------------------------------------------------
def _bad_disk(disk: str) -> str | None:
    return None if NAME_RE.fullmatch(disk) else "not a disk name"


async def caller_summary(swarm: RuleHost, host: str, disk: str) -> maps.MapSummary:
    """``host``'s own map summary of ``disk`` over this host's link to it (its certificate names it);
    PeerError when it cannot be had."""
    try:
        with trio.fail_after(SUMMARY_TIMEOUT):
            return await (await swarm.map_of(host, disk)).summary()
    except trio.TooSlowError:
        raise PeerError("timeout", f"{host} did not answer within {SUMMARY_TIMEOUT:.0f} s") from None


def check_lists(op: str, spec: PeerOp, body: dict[str, Any]) -> str | None:
    """Why ``body`` names more entries than ``op`` takes (None if it does not): checked before any work."""
    for name, most in spec.lists.items():
        value = body.get(name)
        if isinstance(value, list) and len(value) > most:
            return f"{op} names {len(value)} {name}; at most {most} per request"
    return None


class Refusals:
    """Logs each refused (peer, op, disk or VM) once, remembering at most ``limit`` of them."""

    def __init__(self, limit: int = MAX_REMEMBERED_REFUSALS) -> None:
        self.limit = limit
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    def refuse(self, peer: str, op: str, body: dict[str, Any], code: str, reason: str) -> PeerError:
        """The error to answer ``op`` with; logged unless this (peer, op, disk) was refused already (a VM's
        ops name the VM instead of a disk)."""
        disk = body.get("disk", body.get("vm"))
        key = (peer, op, disk if isinstance(disk, str) and NAME_RE.fullmatch(disk) else "?")
        if key in self._seen:
            self._seen.move_to_end(key)
        else:
            self._seen[key] = None
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)
            log.warning("refused %s of %s from %s: %s", op, key[2], peer, reason)
        return PeerError(code, reason)
