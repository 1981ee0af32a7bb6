"""The daemon's side of libvirt migrations of adopted domains (docs/DESIGN.md, "With libvirt").

Destination (called by the qemu hook at ``migrate begin``): asks the disks' owner to migrate them here,
answers once they converged and mirror, and gives the owner the word to switch over at the first write
the new QEMU sends (its guest then runs here: QEMU at the source flushed and inactivated its disks
before it sent the last of its state). Source: runs the disks' migrations and holds them converged
(vm/move.py's SwitchGate) until that word, or until libvirt says the domain stopped here and runs at the
destination; it calls them off when libvirt's migration ends with the domain still running here, or when
the destination's QEMU stopped. The switchover itself is migrate.py's: freeze, ship the rest, commit.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pvbd.base.control import ControlError
from p2pvbd.base.control_ops import OpHandler
from p2pvbd.base.home import check_name
from p2pvbd.libvirt import book, domxml
from p2pvbd.libvirt.virsh import Virsh, VirshError, parse_ms, parse_size
from p2pvbd.migrate import DEFAULT_MAX_DOWNTIME_MS, MigrationError, MigrationProgress, SwitchGate, migrate_disk
from p2pvbd.migration.jobs import run_job
from p2pvbd.swarm import access
from p2pvbd.swarm.access import PeerOp
from p2pvbd.swarm.peer_transport import PeerError

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

# The destination asks the source how its disks converge this often while the hook waits.
CONVERGE_POLL_SECONDS = 0.1
# How often a source holding converged disks asks its libvirt how the domain's migration goes, and a
# destination whose first write was held asks the source to switch over again after a refusal. A missed
# change costs this much of a held guest's time (libvirt's own job checks are per second too).
WATCH_SECONDS = 1.0
# `p2pvbd migrate DOMAIN`: libvirt's migration of the memory, bounded like vm/move.py's RAM_TIMEOUT.
MIGRATE_SECONDS = 3600.0
# After libvirt's migration finished, the disks' switchover follows within a watch interval or two.
SWITCHOVER_WAIT_SECONDS = 60.0
# After the disks arrived, how long a persistent definition libvirt makes here is watched for (libvirt
# makes it while it finishes the migration, within a second or two).
PERSIST_SECONDS = 30.0
# Disks one libvirt_move names: more than a domain has (libvirt allows some hundreds of virtio disks).
MAX_DOMAIN_DISKS = 256
# libvirt states in which the domain's QEMU is gone from a host.
GONE = frozenset({"shut off", "absent", "crashed"})
# libvirt states in which a destination holds the domain once its memory arrived.
ARRIVED = frozenset({"running", "paused"})


@dataclass
class DomainMove:
    """A libvirt migration of an adopted domain, reported like a VM move (vm/move.py VmMoveProgress)."""

    vm: str
    source: str
    dest: str
    mode: str = "async"
    disks: list[MigrationProgress] = field(default_factory=list)
    phase: str = "prepare"
    vm_downtime_ms: float | None = None
    ram_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        disks = [d.as_dict() for d in self.disks]
        return {"vm": self.vm, "disk": self.vm, "from": self.source, "to": self.dest, "mode": self.mode,
                "phase": self.phase, "ram_bytes": self.ram_bytes, "ram_wire_bytes": self.ram_bytes,
                "vm_downtime_ms": self.vm_downtime_ms,
                "disk_switchover_ms": max((d["downtime_ms"] or 0 for d in disks), default=None),
                "duration_s": round(end - self.started, 3), "error": self.error, "disks": disks,
                "total_bytes": sum(d["total_bytes"] for d in disks), "done_bytes": sum(d["done_bytes"] for d in disks),
                "bytes_on_wire": sum(d["bytes_on_wire"] for d in disks) + self.ram_bytes,
                "mirror_lag_blocks": sum(d["mirror_lag_blocks"] for d in disks), "peers": {},
                "bytes_from": {h: sum(d["bytes_from"].get(h, 0) for d in disks)
                               for h in sorted({h for d in disks for h in d["bytes_from"]})},
                "throttled": any(d["throttled"] for d in disks)}


@dataclass
class Outgoing:
    """Source side: a domain's disks migrating to ``dest`` while libvirt moves its memory."""

    domain: str
    dest: str
    move: DomainMove
    gate: SwitchGate
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    why_cancelled: str = ""

    def cancel(self, why: str) -> None:
        """Call the disks' migrations off, unless their switchover has begun (it then runs to its end)."""
        if self.gate.go.is_set() or self.done.is_set():
            return
        log.info("domain %s: %s; its disks stay here", self.domain, why)
        self.why_cancelled = why
        self.scope.cancel()


@dataclass
class Arriving:
    """Destination side: a domain whose disks migrate here from ``source``."""

    domain: str
    source: str
    disks: list[str]
    first_write: trio.Event = field(default_factory=trio.Event)


class LibvirtService:
    def __init__(self, swarm: Swarm, home: Path, nbd_socket: Path) -> None:
        self.swarm, self.home, self.nbd_socket = swarm, home, nbd_socket
        self.outgoing: dict[str, Outgoing] = {}
        self.arriving: dict[str, Arriving] = {}
        self.moves: dict[str, DomainMove] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def config(self) -> book.LibvirtConfig:
        """Read each time: `p2pvbd libvirt install-hook` may write it while the daemon runs."""
        return book.load_config(self.home)

    @property
    def virsh(self) -> Virsh:
        return Virsh(self.config.uri)

    def ops(self) -> list[PeerOp]:
        return [PeerOp("libvirt_hello", access.member, self._serve_hello),
                PeerOp("libvirt_state", access.member, self._serve_state),
                PeerOp("libvirt_move", access.member, self._serve_move, {"disks": MAX_DOMAIN_DISKS}),
                PeerOp("libvirt_move_status", self._the_destination, self._serve_move_status),
                PeerOp("libvirt_go", self._the_destination, self._serve_go),
                PeerOp("libvirt_cancel", self._the_destination, self._serve_cancel)]

    def control_ops(self) -> dict[str, OpHandler]:
        """The commands libvirt's hook and `libvirt list` send, registered with the daemon's table."""
        return {"libvirt_list": self.op_libvirt_list, "libvirt_incoming": self.op_libvirt_incoming,
                "libvirt_prepare": self.op_libvirt_prepare, "libvirt_stopped": self.op_libvirt_stopped}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _the_destination(self, swarm: Swarm, peer: str, body: dict[str, Any]) -> str | None:
        out = self.outgoing.get(body.get("domain"))  # type: ignore[arg-type]
        if out is None or out.dest != peer:
            return f"domain {body.get('domain')!r} is not moving from {swarm.name} to {peer}"
        return None

    # ---- control ops (the CLI and the hook) ------------------------------------------------------
    def knows(self, name: str) -> bool:
        return book.load(self.home, name) is not None

    async def op_libvirt_list(self) -> list[dict[str, Any]]:
        out = []
        for rec in book.all_records(self.home):
            try:
                state = await self.virsh.state(rec.domain)
            except VirshError as e:
                state = f"unknown ({e})"
            owners = {}
            for disk in rec.disks.values():
                exp = self.swarm.ctl.get(disk)
                owners[disk] = exp.store.owner if exp is not None else ""
            out.append({"domain": rec.domain, "state": state, "disks": rec.disks, "owners": owners,
                        "images": rec.images})
        return out

    async def op_libvirt_incoming(self, domain: str, disks: dict[str, str]) -> dict[str, Any]:
        """`migrate begin` here: bring the domain's p2pvbd disks (target -> disk) in, converged and mirrored."""
        known = set(await self.swarm.known_disks())
        ours = {t: d for t, d in disks.items() if d in known}
        reply = {"disks": sorted(ours.values()), "socket": str(self.nbd_socket)}
        if not ours:
            return reply
        owners = {d: (await self.swarm.owner_of(d))[0] for d in ours.values()}
        sources = {o for o in owners.values() if o != self.swarm.name}
        if not sources:
            self._remember(domain, ours)
            return reply  # its disks are here already
        if len(sources) > 1 or "" in sources:
            raise ControlError(f"the disks of {domain} have owners {', '.join(sorted(sources)) or 'unknown'}: "
                               "they must all be on the host the domain comes from")
        source = sources.pop()
        moving = sorted(d for d, o in owners.items() if o == source)
        if (old := self.arriving.get(domain)) is not None:
            self._drop(old)
        arr = self.arriving[domain] = Arriving(domain, source, moving)
        try:
            conn = await self.swarm.connect(source)
            await conn.request("libvirt_move", {"domain": domain, "disks": moving})
            while True:
                state = await conn.request("libvirt_move_status", {"domain": domain})
                if state["error"]:
                    raise ControlError(f"{source} did not move its disks here: {state['error']}")
                if state["converged"]:
                    break
                await trio.sleep(CONVERGE_POLL_SECONDS)
        except PeerError as e:
            self._drop(arr)
            raise ControlError(f"{source} did not move the disks here: {e.message}") from None
        except BaseException:
            self._drop(arr)
            raise
        for disk in moving:
            exp = self.swarm.ctl.get(disk)
            if exp is not None:
                exp.on_held_write = partial(self._held_write, arr)
        self._remember(domain, ours)
        assert self._nursery is not None
        self._nursery.start_soon(self._arrival, arr, conn)
        log.info("domain %s arrives from %s: its disks %s converged and mirror", domain, source, ", ".join(moving))
        return reply

    async def op_libvirt_prepare(self, domain: str, disks: dict[str, str]) -> dict[str, Any]:
        """The hook, before libvirt starts the domain's QEMU here: a domain not arriving by migration starts
        only where its p2pvbd disks are owned (elsewhere its writes would fail: the replicas here are
        standbys), so the same domain defined on two hosts never runs twice."""
        if domain in self.arriving:
            return {}
        known = set(await self.swarm.known_disks())
        for disk in sorted(d for d in disks.values() if d in known):
            owner, _ = await self.swarm.owner_of(disk)
            if owner != self.swarm.name:
                raise ControlError(f"its disk {disk} is owned by {owner or 'no known host'}, not {self.swarm.name}: "
                                   f"start it there, or move it here with 'p2pvbd migrate {domain} --to "
                                   f"{self.swarm.name}' on {owner or 'its host'}")
        return {}

    def _remember(self, domain: str, disks: dict[str, str]) -> None:
        rec = book.load(self.home, domain) or book.DomainRecord(domain, {})
        rec.disks = dict(disks)
        book.save(self.home, rec)

    def _drop(self, arr: Arriving) -> None:
        if self.arriving.get(arr.domain) is arr:
            del self.arriving[arr.domain]
        for disk in arr.disks:
            exp = self.swarm.ctl.get(disk)
            if exp is not None and exp.on_held_write is not None:
                exp.on_held_write = None

    def _held_write(self, arr: Arriving) -> None:
        if not arr.first_write.is_set():
            log.info("domain %s: its QEMU here sent its first write; asking %s to switch the disks over",
                     arr.domain, arr.source)
            arr.first_write.set()

    def _owned_here(self, disk: str) -> bool:
        exp = self.swarm.ctl.get(disk)
        return exp is not None and exp.store.owner == self.swarm.name

    async def _arrival(self, arr: Arriving, conn: Any) -> None:
        """Give the source the word at the new QEMU's first write; end once the disks are here, or their
        migration ended without them."""
        asked = False
        try:
            while self.arriving.get(arr.domain) is arr:
                with trio.move_on_after(WATCH_SECONDS):
                    await arr.first_write.wait()
                if all(self._owned_here(d) for d in arr.disks):
                    log.info("domain %s: its disks are here", arr.domain)
                    assert self._nursery is not None
                    self._nursery.start_soon(self._persist_here, arr)
                    return
                if any(not self._owned_here(d) and d not in self.swarm.migration_target.incoming for d in arr.disks):
                    log.info("domain %s: the migration of its disks from %s ended without them", arr.domain,
                             arr.source)
                    return
                if arr.first_write.is_set() and not asked:
                    try:
                        await conn.request("libvirt_go", {"domain": arr.domain})
                        asked = True
                    except PeerError as e:
                        log.warning("domain %s: %s does not switch its disks over yet: %s", arr.domain, arr.source,
                                    e.message)
                        await trio.sleep(WATCH_SECONDS)
        finally:
            self._drop(arr)

    async def _persist_here(self, arr: Arriving) -> None:
        """`virsh migrate --persistent` defines the domain here from the source's persistent definition,
        which the hook never sees: it names the source's socket. Point it at this host's once libvirt has
        defined it (its migration job here may hold the definition for a moment)."""
        deadline = trio.current_time() + PERSIST_SECONDS
        while trio.current_time() < deadline:
            try:
                info = await self.virsh.arun("dominfo", arr.domain)
                persistent = any(line.split(":", 1)[-1].strip() == "yes" for line in info.splitlines()
                                 if line.startswith("Persistent:"))
                if persistent:
                    xml = await self.virsh.arun("dumpxml", "--inactive", arr.domain)
                    fixed = domxml.point_at(xml, set(arr.disks), str(self.nbd_socket))
                    if {s for _, s in domxml.nbd_disks(xml).values()} <= {str(self.nbd_socket)}:
                        return
                    with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
                        f.write(fixed)
                        f.flush()
                        await self.virsh.arun("define", f.name)
                    log.info("domain %s: its persistent definition here now uses this host's disks", arr.domain)
                    return
            except (VirshError, domxml.DomainXmlError) as e:
                log.debug("domain %s: persistent definition not fixed yet: %s", arr.domain, e)
            await trio.sleep(WATCH_SECONDS)

    async def op_libvirt_stopped(self, domain: str) -> dict[str, Any]:
        """The hook: the domain's QEMU on this host is gone (`stopped end`, `release end`)."""
        log.debug("domain %s: its QEMU here stopped", domain)
        assert self._nursery is not None
        arr = self.arriving.get(domain)
        if arr is not None and not all(self._owned_here(d) for d in arr.disks):
            self._nursery.start_soon(self._call_off, arr)
        out = self.outgoing.get(domain)
        if out is not None and not out.done.is_set():
            self._nursery.start_soon(self._check_out, out)
        return {}

    async def _call_off(self, arr: Arriving) -> None:
        """The new QEMU is gone before the disks switched over: the source keeps them."""
        self._drop(arr)
        try:
            conn = await self.swarm.connect(arr.source)
            await conn.request("libvirt_cancel", {"domain": arr.domain, "why": f"its QEMU on {self.swarm.name} "
                                                  "stopped before the switchover"})
        except PeerError as e:
            log.warning("domain %s: cannot tell %s to keep its disks (%s); its migration ends when it finds "
                        "the domain running there", arr.domain, arr.source, e.message)

    # ---- peer ops (source side) ------------------------------------------------------------------
    async def _serve_hello(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """How libvirt reaches this host, for a source's `p2pvbd migrate DOMAIN --to HERE`."""
        return {"uri": self.config.peer_uri or f"qemu+ssh://{self.swarm.name}/system",
                "socket": str(self.nbd_socket), "migrate_uri": self.config.migrate_uri}

    async def _serve_state(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        domain = str(body.get("domain"))
        try:
            if body.get("job"):  # after a migration here: libvirt's figures of it
                return {"state": await self.virsh.state(domain), "job": await self.virsh.completed_job(domain)}
            return {"state": await self.virsh.state(domain)}
        except VirshError as e:
            raise PeerError("libvirt", str(e)) from None

    async def _serve_move(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """libvirt_move, from the destination's hook: migrate these disks of the domain there, held at the
        switchover. Only while libvirt migrates that adopted domain from here."""
        domain, disks = str(body.get("domain")), body.get("disks")
        if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks) or not disks:
            raise PeerError("bad_request", "libvirt_move needs the domain and its disks")
        rec = book.load(self.home, domain)
        if rec is None or not set(disks) <= set(rec.disks.values()):
            raise PeerError("refused", f"{', '.join(disks)} are not disks of a domain {domain} adopted on "
                                       f"{self.swarm.name}")
        if (old := self.outgoing.get(domain)) is not None and not old.done.is_set():
            if old.dest == peer:
                return {}
            raise PeerError("busy", f"domain {domain} is moving to {old.dest}")
        try:
            migrating = await self.virsh.migrating(domain)
        except VirshError as e:
            raise PeerError("refused", f"libvirt on {self.swarm.name}: {e}") from None
        if not migrating:
            raise PeerError("refused", f"libvirt on {self.swarm.name} is not migrating domain {domain}")
        for disk in disks:
            exp = self.swarm.ctl.get(disk)
            if exp is None or exp.store.owner != self.swarm.name:
                raise PeerError("refused", f"{self.swarm.name} does not own disk {disk}")
            running = self.swarm.migrations.get(disk)
            if running is not None and running.finished is None:
                raise PeerError("busy", f"{disk} is already migrating")
        move = self.moves.get(domain)
        if move is None or move.finished is not None or move.dest != peer:
            move = DomainMove(domain, self.swarm.name, peer)
        move.disks = [MigrationProgress(d, self.swarm.name, peer, "async") for d in disks]
        move.phase = "disks"
        for p in move.disks:
            self.swarm.migrations[p.disk] = p
        out = self.outgoing[domain] = Outgoing(domain, peer, move, SwitchGate(len(disks)))
        assert self._nursery is not None
        self._nursery.start_soon(self._run_out, out)
        return {}

    async def _serve_move_status(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        out = self.outgoing[str(body["domain"])]
        error = out.why_cancelled or next((d.error for d in out.move.disks if d.error), "")
        if out.done.is_set() and not error and not out.gate.committed.is_set():
            error = "the disks' migration ended"
        return {"converged": out.gate.converged.is_set(), "error": error}

    async def _serve_go(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """The destination's QEMU wrote: its guest runs there, so QEMU here has flushed and inactivated the
        disks (it does before it sends the last of the guest's state). libvirt is not asked: while it
        finishes the migration it answers only once its source QEMU is gone, seconds the new guest's
        write would wait. Were the word wrong, a write of the QEMU here would still be kept: its
        connection is forwarded to the new owner after the hand-over."""
        out = self.outgoing[str(body["domain"])]
        if not out.gate.converged.is_set():
            raise PeerError("not_ready", f"the disks of {out.domain} have not converged")
        log.info("domain %s: its QEMU on %s wrote; switching its disks over", out.domain, peer)
        out.gate.go.set()
        return {}

    async def _serve_cancel(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        self.outgoing[str(body["domain"])].cancel(str(body.get("why") or f"{peer} called the move off"))
        return {}

    async def _run_out(self, out: Outgoing) -> None:
        move = out.move
        try:
            with out.scope:
                async with trio.open_nursery() as nursery:
                    for p in move.disks:
                        nursery.start_soon(self._disk, p, out.gate)
                    nursery.start_soon(self._watch_out, out)
            if out.scope.cancelled_caught:
                raise MigrationError(out.why_cancelled or "called off")
            log.info("domain %s: its disks are on %s now", out.domain, out.dest)
        except BaseExceptionGroup as eg:
            first = eg
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            out.why_cancelled = out.why_cancelled or getattr(first, "message", None) or str(first)
            if not isinstance(first, (MigrationError, PeerError)):
                log.error("the disks of domain %s did not move", out.domain, exc_info=eg)
        except MigrationError as e:
            out.why_cancelled = str(e)
        finally:
            out.done.set()

    async def _disk(self, progress: MigrationProgress, gate: SwitchGate) -> None:
        try:
            await migrate_disk(self.swarm, progress.disk, progress.dest, progress.mode, DEFAULT_MAX_DOWNTIME_MS,
                               progress, gate)
            progress.phase = "done"
        except BaseException as e:
            progress.error = getattr(e, "message", None) or str(e) or "called off"
            progress.phase = "failed"
            raise
        finally:
            progress.finished = time.monotonic()

    async def _watch_out(self, out: Outgoing) -> None:
        """While the disks are held: libvirt's view of the domain here decides when libvirt gave up."""
        while not out.gate.committed.is_set():
            with trio.move_on_after(WATCH_SECONDS):
                await out.gate.committed.wait()
            if not out.gate.committed.is_set() and not out.gate.go.is_set():
                await self._check_out(out)

    async def _check_out(self, out: Outgoing) -> None:
        """The domain still runs here with no migration: libvirt gave up, call the disks' migration off.
        Its QEMU here is gone: switch over if the domain runs (or waits to) at the destination."""
        try:
            state = await self.virsh.state(out.domain)
            if state == "running" and not await self.virsh.migrating(out.domain):
                out.cancel(f"libvirt's migration to {out.dest} ended and the domain runs on here")
            elif state in GONE and out.gate.converged.is_set() and not out.gate.go.is_set():
                conn = await self.swarm.connect(out.dest)
                there = (await conn.request("libvirt_state", {"domain": out.domain}))["state"]
                if out.gate.go.is_set():
                    return  # the destination's first write gave the word meanwhile
                if there in ARRIVED:
                    log.info("domain %s: gone here and %s on %s; switching its disks over", out.domain, there,
                             out.dest)
                    out.gate.go.set()
                else:
                    out.cancel(f"the domain is gone here and {there} on {out.dest}")
        except (VirshError, PeerError) as e:
            log.warning("domain %s: cannot tell how its migration goes (%s)", out.domain,
                        getattr(e, "message", None) or e)

    # ---- `p2pvbd migrate DOMAIN --to HOST` -------------------------------------------------------
    def start_move(self, domain: str, to: str) -> DomainMove:
        check_name("host", to)
        if to == self.swarm.name:
            raise ControlError(f"domain {domain} is adopted on {to}: run this on the host it runs on")
        if (old := self.moves.get(domain)) is not None and old.finished is None:
            raise ControlError(f"domain {domain} is already moving to {old.dest}")
        move = self.moves[domain] = DomainMove(domain, self.swarm.name, to)
        assert self._nursery is not None
        self._nursery.start_soon(self._migrate, move)
        return move

    async def _migrate(self, move: DomainMove) -> None:
        await run_job(f"moving domain {move.vm}", move, lambda: self._move_domain(move),
                      (ControlError, VirshError, MigrationError, PeerError))

    async def _move_domain(self, move: DomainMove) -> None:
        state = await self.virsh.state(move.vm)
        if state != "running":
            raise ControlError(f"domain {move.vm} is {state} on {self.swarm.name}, not running")
        conn = await self.swarm.connect(move.dest)
        hello = await conn.request("libvirt_hello", {})
        args = ["migrate", "--live", "--p2p", move.vm, str(hello["uri"])]
        if hello.get("migrate_uri"):
            args += ["--migrateuri", str(hello["migrate_uri"])]
        rec = book.load(self.home, move.vm)
        disks = set(rec.disks.values()) if rec is not None else set()
        with tempfile.TemporaryDirectory() as tmp:
            if "yes" in (await self.virsh.arun("dominfo", move.vm)).split("Persistent:")[-1].split("\n")[0]:
                # the definition libvirt keeps there names that host's socket (the hook sees only the live one)
                inactive = await self.virsh.arun("dumpxml", "--inactive", move.vm)
                xml = Path(tmp) / "persistent.xml"
                xml.write_text(domxml.point_at(inactive, disks, str(hello["socket"])))
                args += ["--persistent", "--persistent-xml", str(xml), "--undefinesource"]
            move.phase = "ram"
            await self.virsh.arun(*args, seconds=MIGRATE_SECONDS)
        try:
            job = (await conn.request("libvirt_state", {"domain": move.vm, "job": True}))["job"]
            move.vm_downtime_ms = parse_ms(str(job.get("Total downtime", "")))
            move.ram_bytes = parse_size(str(job.get("Memory processed", "")))
        except (PeerError, KeyError) as e:
            log.info("domain %s: libvirt on %s has no figures of the migration (%s)", move.vm, move.dest, e)
        out = self.outgoing.get(move.vm)
        if out is not None:
            move.phase = "switchover"
            with trio.move_on_after(SWITCHOVER_WAIT_SECONDS):
                await out.done.wait()
            if not out.gate.committed.is_set():
                raise ControlError(f"libvirt moved {move.vm} but its disks did not switch over: "
                                   f"{out.why_cancelled or 'still waiting'}")
        move.phase = "done"
