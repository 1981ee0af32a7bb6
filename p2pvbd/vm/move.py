"""Moving a running VM, memory and disks, to another host with one command.

Source side (:func:`move_vm`), in order:

1. every disk's migration starts (the destination prepares an incoming export for each); once all
   exist, the destination starts QEMU with ``-incoming`` on them (``vm_incoming``);
2. the disks converge (bulk pull from every holder, then the mirror) and are held, still mirroring;
3. QEMU migrates the RAM with ``pause-before-switchover``; its stream goes to a Unix socket of this
   daemon, which carries it over the swarm's TLS link (``vm_ram``) to the destination daemon, which
   feeds its QEMU's incoming socket — no extra port, nothing in clear;
4. at ``pre-switchover`` the guest is paused with nothing in flight: all disks switch over together,
   then ``migrate-continue``; the destination VM resumes on its now local, owned disks, this QEMU quits.

A failure before the disks commit cancels QEMU's migration: the VM runs on here, its disks unchanged.
After a commit the VM stays here on forwarded disk I/O if QEMU's migration then fails: nothing is lost.

Destination side: :class:`VmTarget`, whose peer ops only the source of every disk's migration may call.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from p2pvbd.migrate import MigrationError, MigrationProgress, SwitchGate, migrate_disk
from p2pvbd.migration import failpoints
from p2pvbd.swarm import access
from p2pvbd.swarm.access import PeerOp
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.vm.converge import DowntimeRamp, StreamPace
from p2pvbd.vm.disk_pages import index_pages
from p2pvbd.vm.qmp import QmpError
from p2pvbd.vm.ram_image import PREFIX_BYTES, ImageWriter, RamImage, page_digest, split_prefixes
from p2pvbd.vm.ram_refs import (
    PAGE_BYTES,
    RAM_READ_BYTES,
    REF_DISK,
    SOURCE_PREVIOUS,
    RamPieceError,
    RamSender,
    missing_digests,
    rebuild,
)
from p2pvbd.vm.ram_window import WireWindow
from p2pvbd.vm.runner import RunningVm, VmError, VmRunner
from p2pvbd.vm.warm_pull import (
    SOURCE_WARM_PEER,
    WARM_PULL_GRACE_SECONDS,
    PullStats,
    grant_warm,
    image_takes_pages,
    pull_warm,
)
from p2pvbd.wire.vm_definition import DefinitionError, VmDefinition

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm
    from p2pvbd.vm.book import VmBook

log = logging.getLogger(__name__)

# QEMU's memory gets this share of --max-downtime (its downtime-limit: the last pages sent after the pause);
# the disks' switchover, inside the same pause, the rest.
RAM_DOWNTIME_SHARE = 0.5
# The destination announces at most this many digest prefixes of the pages it holds (4 bytes each, well
# inside a peer frame): a 4 GiB guest's pages.
MAX_HELD_PREFIXES = 1 << 20
# QEMU's own cap on its migration stream (its default is 128 MiB/s): the relay's window already holds QEMU
# to what the link takes, and a stream of pages the destination holds, sent as references, should run at
# the speed pages can be hashed (~1 GB/s), not take 8 s per GiB of memory.
RAM_QEMU_MAX_BANDWIDTH = 8 << 30
# QEMU's auto-converge: while a pass dirties more than half of what the pass before sent (QEMU's default
# threshold), the guest's vCPUs are throttled (20 %, then 10 % more per pass). A guest that writes fresh
# data about as fast as a slow link drains it otherwise makes pre-copy send it again pass after pass, and
# the last pass, inside the pause, stays as large as what it writes in one (vm/converge.py).
RAM_AUTO_CONVERGE = True
# Warm hosts an arrival reads memory from: a person's machines are a handful.
MAX_WARM_HOSTS = 16
# Pieces in flight at most; the destination takes them in order and holds each (≤ 1 MiB, and as much
# rebuilt) until its turn: 32 MiB at most. Pieces of references are a few KiB on the wire, so this many
# lets the source hash ahead while the link carries the pages the destination lacks; what is on the link
# at once is bounded in bytes (vm/ram_window.py).
RAM_WINDOW = 16
# QEMU's migration of the RAM: the longest it may take to reach pre-switchover or to complete. A link
# that moves less than a few MiB a minute is not one to move a VM over.
RAM_TIMEOUT = 3600.0
# How long the destination waits for its QEMU to run after the source said `migrate-continue`: the
# last device state is kilobytes.
RESUME_TIMEOUT = 60.0
# Undoing a failed move (cancel, abort at the destination, resume here): each step is milliseconds.
ABORT_SECONDS = 10.0
# QEMU run states a source is left in by a migration that got far (QAPI RunState).
STOPPED_BY_MIGRATION = frozenset({"postmigrate", "finish-migrate", "paused"})
# How often a destination checks that the disk migrations an incoming VM waits on are still alive.
WATCH_SECONDS = 2.0
# After its disks committed here, an incoming VM whose source says nothing for this long is given up: the
# source kept the VM (it failed or restarted after the commit). A live move's source speaks every few
# milliseconds from then on (the rest of the memory, then vm_finish).
INCOMING_VM_SILENCE_SECONDS = 60.0
# A source left paused by a failed move asks the destination this often whether the VM runs there.
SETTLE_RETRY_SECONDS = 2.0
# How often QEMU's migration state is asked for while its events are awaited (a missed event costs this).
STATUS_POLL_SECONDS = 0.05


@dataclass
class VmMoveProgress:
    vm: str
    source: str
    dest: str
    mode: str
    disks: list[MigrationProgress]
    phase: str = "prepare"
    ram_bytes: int = 0  # QEMU's stream
    ram_wire_bytes: int = 0  # what crossed for it: compressed, pages the destination holds by reference
    ram_pages: int = 0  # pages in QEMU's stream (zero pages are a flag in it, not counted)
    ram_by_ref: dict[str, int] = field(default_factory=dict)  # pages sent by reference, per place found
    ram_missed_pages: int = 0  # references the destination could not resolve: sent again in full
    ram_passes: int = 0  # QEMU's passes over the memory (dirty-page syncs) before the pause
    ram_downtime_limit_ms: float | None = None  # QEMU's downtime-limit at the end (vm/converge.py)
    ram_throttle_percent: int = 0  # the most auto-converge throttled the guest's vCPUs during the move
    ram_from_peers: dict[str, int] = field(default_factory=dict)  # bytes the destination read from warm hosts
    vm_downtime_ms: float | None = None
    disk_switchover_ms: float | None = None  # from pre-switchover to migrate-continue: the disks' part
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        disks = [d.as_dict() for d in self.disks]
        return {"vm": self.vm, "disk": self.vm, "from": self.source, "to": self.dest, "mode": self.mode,
                "phase": self.phase,
                "ram_bytes": self.ram_bytes, "ram_wire_bytes": self.ram_wire_bytes, "ram_pages": self.ram_pages,
                "ram_by_ref": dict(self.ram_by_ref), "ram_missed_pages": self.ram_missed_pages,
                "ram_passes": self.ram_passes, "ram_downtime_limit_ms": self.ram_downtime_limit_ms,
                "ram_throttle_percent": self.ram_throttle_percent,
                "ram_from_peers": dict(self.ram_from_peers),
                "vm_downtime_ms": self.vm_downtime_ms,
                "disk_switchover_ms": self.disk_switchover_ms, "duration_s": round(end - self.started, 3),
                "error": self.error, "disks": disks,
                "total_bytes": sum(d["total_bytes"] for d in disks), "done_bytes": sum(d["done_bytes"] for d in disks),
                "bytes_on_wire": sum(d["bytes_on_wire"] for d in disks) + self.ram_wire_bytes,
                "mirror_lag_blocks": sum(d["mirror_lag_blocks"] for d in disks), "peers": {},
                "bytes_from": {h: sum(d["bytes_from"].get(h, 0) for d in disks)
                               for h in sorted({h for d in disks for h in d["bytes_from"]})},
                "throttled": any(d["throttled"] for d in disks)}


async def move_vm(swarm: Swarm, runner: VmRunner, vm: VmDefinition, dest: str, max_downtime_ms: float,
                  progress: VmMoveProgress, later: trio.Nursery, warm_hosts: Sequence[str] = ()) -> None:
    """Move ``vm`` to ``dest``; ``later`` runs what outlives a failed move (settling a paused guest);
    ``warm_hosts`` keep the VM's memory warm: the destination may read the pages it lacks from them."""
    rv = runner.get(vm.name)
    if rv.incoming or rv.qmp is None:
        raise MigrationError(f"VM {vm.name} is still arriving on this host")
    qmp = rv.qmp
    conn = await swarm.connect(dest)
    gate = SwitchGate(len(progress.disks))  # the disks still here: those at the destination stay put
    started_qemu_migration = False
    moved = False
    image = ImageWriter(rv.paths.directory)  # the memory the VM leaves here: its next arrival sends less
    sender = RamSender(image=image)
    indexed = trio.Event()
    rv.moving = True  # warm copies wait: the move carries the memory, and needs the link
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_index_disk_pages, swarm, vm, sender, indexed)
            for p in progress.disks:
                nursery.start_soon(_disk, swarm, p, max_downtime_ms, gate)
            warm = await grant_warm(swarm, vm.name, dest, warm_hosts)
            await gate.prepared.wait()
            progress.phase = "disks"
            incoming: dict[str, Any] = {"vm": vm.as_payload(), "warm": warm}
            if warm:  # the destination reads from them none of the pages its disk replicas hold
                await indexed.wait()
                incoming["disk_pages"] = await trio.to_thread.run_sync(_prefixes, list(sender.disk_pages))
            reply = await conn.request("vm_incoming", incoming, timeout=RESUME_TIMEOUT)
            await _take_held(sender, progress, reply)
            await gate.converged.wait()
            await indexed.wait()
            if reply.get("warm_pull") is True:  # the destination read pages from warm hosts meanwhile
                await _take_held(sender, progress, await conn.request("vm_ram_held", {"vm": vm.name},
                                                                      timeout=RESUME_TIMEOUT))
            progress.phase = "ram"
            relayed = trio.Event()
            await nursery.start(_relay_ram, rv, conn, vm.name, progress, relayed, sender)
            await qmp.command("migrate-set-capabilities", capabilities=[
                {"capability": "pause-before-switchover", "state": True}, {"capability": "events", "state": True},
                {"capability": "auto-converge", "state": RAM_AUTO_CONVERGE}])
            ramp = DowntimeRamp(max_downtime_ms * RAM_DOWNTIME_SHARE)
            progress.ram_downtime_limit_ms = ramp.base_ms
            await qmp.command("migrate-set-parameters", **{"downtime-limit": max(1, int(ramp.base_ms)),
                                                             "max-bandwidth": RAM_QEMU_MAX_BANDWIDTH})
            started_qemu_migration = True
            await qmp.command("migrate", uri=f"unix:{rv.paths.outgoing}")
            with trio.fail_after(RAM_TIMEOUT):
                await _migration_reaches(rv, "pre-switchover", ramp, progress)
            progress.phase = "switchover"
            paused_at = trio.current_time()
            await failpoints.pause("vm.switchover")
            # The guest is paused: the last moment to give up without the disks' owner changing. The RAM
            # stream is idle now, so a destination QEMU that died meanwhile would go unnoticed until after.
            there = (await conn.request("vm_check", {"vm": vm.name}, timeout=RESUME_TIMEOUT))["status"]
            if there != "inmigrate":
                raise MigrationError(f"the incoming QEMU of {vm.name} on {dest} is {there}, not waiting for it")
            gate.go.set()
            await gate.committed.wait()
            moved = True  # the disks belong to the destination now: only forward from here
            progress.phase = "committed"
            await failpoints.pause("vm.committed")
            await qmp.command("migrate-continue", state="pre-switchover")
            progress.disk_switchover_ms = round((trio.current_time() - paused_at) * 1000, 2)
            with trio.fail_after(RAM_TIMEOUT):
                await _migration_reaches(rv, "completed")
            seen = round((trio.current_time() - paused_at) * 1000, 2)
            info = await qmp.command("query-migrate")
            # QEMU's downtime runs from stopping the guest to the end of the stream: RAM, devices and the
            # disks' switchover inside the pause. What this host saw of the pause bounds it from below
            # (QEMU has been seen to report 0).
            downtime = info.get("downtime")
            progress.vm_downtime_ms = max(seen, float(downtime) if isinstance(downtime, (int, float)) else 0.0)
            await relayed.wait()  # QEMU's "completed" means its stream reached the relay, not the destination
            await conn.request("vm_finish", {"vm": vm.name}, timeout=RESUME_TIMEOUT + 5)
        progress.phase = "done"
        await trio.to_thread.run_sync(image.commit)
    except BaseException:
        rv.moving = False
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(image.discard)
        with trio.CancelScope(shield=True), trio.move_on_after(ABORT_SECONDS):
            await _undo(swarm, rv, conn, dest, started_qemu_migration, later)
        if moved and not rv.exited.is_set():
            log.warning("VM %s stays on %s with its disks' I/O forwarded to %s", vm.name, swarm.name, dest)
        raise
    await runner.forget(rv)


async def _take_held(sender: RamSender, progress: VmMoveProgress, reply: dict[str, Any]) -> None:
    """Which pages the destination holds (``ram_held``), those of them it read from warm hosts
    (``ram_pulled``, counted apart: first) and the bytes that read took per host."""
    held: dict[str, frozenset[bytes]] = {}
    for key, source in (("ram_pulled", SOURCE_WARM_PEER), ("ram_held", SOURCE_PREVIOUS)):
        if isinstance(blob := reply.get(key), bytes):
            held[source] = await trio.to_thread.run_sync(split_prefixes, blob)
    sender.held = held
    peers = reply.get("ram_from_peers")
    if isinstance(peers, dict):
        got = {str(h): n for h, n in peers.items() if type(n) is int and n >= 0}
        progress.ram_from_peers = got
        progress.ram_wire_bytes += sum(got.values())


async def _index_disk_pages(swarm: Swarm, vm: VmDefinition, sender: RamSender, indexed: trio.Event) -> None:
    """While the disks converge: which pages of the guest's page cache the destination's replicas hold."""
    share = 2 * vm.memory // max(1, len(vm.disks))  # a page cache is never larger than the memory
    disks = [(exp.store, exp.recent.newest(share)) if (exp := swarm.ctl.get(disk)) is not None else None
             for disk in vm.disks]
    sender.disk_pages = await trio.to_thread.run_sync(index_pages, disks)
    indexed.set()


async def _undo(swarm: Swarm, rv: RunningVm, conn: Any, dest: str, started_qemu_migration: bool,
                later: trio.Nursery) -> None:
    """After a failed move: the VM runs on here, unless it already runs at the destination.

    QEMU may have sent its whole stream before the destination failed (its migration then "completed"
    and the guest is left in postmigrate): it resumes here only once the destination says its QEMU is
    not running, so the guest never runs twice. If the destination cannot say (its daemon is down), it
    stays paused and the destination is asked again until it answers."""
    qmp = rv.qmp
    assert qmp is not None
    if started_qemu_migration and not rv.exited.is_set():
        try:
            await qmp.command("migrate_cancel")
        except QmpError:
            pass
    try:
        dest_runs: bool | None = bool((await conn.request("vm_abort", {"vm": rv.vm.name}, timeout=5))["running"])
    except (PeerError, KeyError) as e:
        log.warning("cannot tell whether VM %s runs on %s (%s)", rv.vm.name, dest, e)
        dest_runs = None
    if rv.exited.is_set() or not started_qemu_migration:
        return
    if dest_runs:
        log.warning("VM %s runs on %s after all: stopping its copy here", rv.vm.name, dest)
        with trio.move_on_after(ABORT_SECONDS):
            await qmp.command("quit")
        return
    status = await rv.status()
    if status in STOPPED_BY_MIGRATION and dest_runs is False:
        log.warning("VM %s: its move failed after QEMU sent everything (%s); resuming it here", rv.vm.name, status)
        await qmp.command("cont")
    elif status in STOPPED_BY_MIGRATION:
        log.error("VM %s stays paused here until %s says whether its copy runs there", rv.vm.name, dest)
        later.start_soon(_settle, swarm, rv, dest)


async def _settle(swarm: Swarm, rv: RunningVm, dest: str) -> None:
    """A guest paused by a move whose destination could not answer: ask until it does, then run the VM
    where it is not already running."""
    while not rv.exited.is_set():
        await trio.sleep(SETTLE_RETRY_SECONDS)
        try:
            conn = await swarm.connect(dest)
            runs = bool((await conn.request("vm_abort", {"vm": rv.vm.name}, timeout=10))["running"])
        except (PeerError, KeyError) as e:
            log.info("VM %s stays paused: %s cannot say yet whether it runs there (%s)", rv.vm.name, dest, e)
            continue
        assert rv.qmp is not None
        try:
            if runs:
                log.warning("VM %s runs on %s: stopping its paused copy here", rv.vm.name, dest)
                await rv.qmp.command("quit")
            elif await rv.status() in STOPPED_BY_MIGRATION:
                log.warning("VM %s does not run on %s: resuming it here", rv.vm.name, dest)
                await rv.qmp.command("cont")
        except QmpError as e:
            log.warning("VM %s: settling its failed move: %s", rv.vm.name, e)
        return


async def _disk(swarm: Swarm, progress: MigrationProgress, max_downtime_ms: float, gate: SwitchGate) -> None:
    try:
        await migrate_disk(swarm, progress.disk, progress.dest, progress.mode, max_downtime_ms, progress, gate)
        progress.phase = "done"
    except BaseException as e:
        progress.error = getattr(e, "message", None) or str(e) or type(e).__name__
        progress.phase = "failed"
        raise
    finally:
        progress.finished = time.monotonic()


async def _migration_reaches(rv: RunningVm, status: str, ramp: DowntimeRamp | None = None,
                             progress: VmMoveProgress | None = None) -> None:
    """Wait until QEMU's outgoing migration is in ``status``; MigrationError if it failed or was cancelled.
    Woken by QEMU's MIGRATION events, so the guest's pause is not lengthened by a polling interval. With
    ``ramp``, QEMU's downtime-limit grows as its passes over the memory fail to converge (vm/converge.py)."""
    qmp = rv.qmp
    assert qmp is not None
    while True:
        info = await qmp.command("query-migrate")
        state = info.get("status")
        if state == status:
            return
        ram = info.get("ram", {})
        passes, remaining, mbps = ram.get("dirty-sync-count"), ram.get("remaining"), ram.get("mbps")
        if ramp is not None and progress is not None and isinstance(passes, int):
            throttle = info.get("cpu-throttle-percentage", 0)
            if passes > progress.ram_passes:  # where a slow move's time goes, pass by pass
                log.info("VM %s: memory pass %d, %s bytes left, QEMU at %s Mbit/s, %.1f MB on the wire so far, "
                         "vCPUs throttled %s %%", rv.vm.name, passes, remaining, mbps, progress.ram_wire_bytes / 1e6,
                         throttle)
            progress.ram_passes = passes
            if isinstance(throttle, int):
                progress.ram_throttle_percent = max(progress.ram_throttle_percent, throttle)
            if (limit := ramp.on_progress(passes, remaining if isinstance(remaining, int) else None,
                                          float(mbps) if isinstance(mbps, (int, float)) else None)) is not None:
                if progress.ram_downtime_limit_ms == ramp.base_ms:
                    log.info("the memory of %s does not converge within %.0f ms after %d passes: letting the "
                             "pause grow to %.0f ms, at most %.0f ms", rv.vm.name, ramp.base_ms, passes, limit,
                             ramp.cap_ms)
                await qmp.command("migrate-set-parameters", **{"downtime-limit": max(1, int(limit))})
                progress.ram_downtime_limit_ms = round(limit, 1)
        if state in ("failed", "cancelled", "cancelling"):
            why = info.get("error-desc", "no reason given")
            raise MigrationError(f"QEMU's migration of {rv.vm.name} {state}: {why}")
        if rv.exited.is_set():
            raise MigrationError(f"QEMU of {rv.vm.name} exited during its migration")
        with trio.move_on_after(STATUS_POLL_SECONDS):
            await qmp.wait_event(lambda e: e.get("event") == "MIGRATION")


async def _relay_ram(rv: RunningVm, conn: Any, vm: str, progress: VmMoveProgress, relayed: trio.Event,
                     sender: RamSender, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Accept QEMU's outgoing migration connection and carry its bytes, in order, to the destination, each
    page it holds as a reference (vm/ram_refs.py); ``relayed`` is set once every piece, the end included,
    has been taken there."""
    path = rv.paths.outgoing
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        stream = await listener.accept()
    finally:
        await listener.aclose()
        path.unlink(missing_ok=True)
    await failpoints.pause("vm.ram")
    window = trio.Semaphore(RAM_WINDOW)
    pace = StreamPace(RAM_READ_BYTES)
    wire = WireWindow()

    def budget() -> int:
        return pace.in_flight_bytes(trio.current_time())

    async def send(seq: int, piece: Any, eof: bool) -> None:
        admitted: int | None = None  # the piece's bytes on the link, once it is let on
        try:
            # A page the destination misses goes by a reference into its disks in the piece's next try
            # if it is disk content, else (and after a second miss) in full.
            exclude: frozenset[bytes] = frozenset()
            not_held: frozenset[bytes] = frozenset()
            while True:
                body, stats = await trio.to_thread.run_sync(sender.pack, piece, exclude, not_held)
                if admitted is None:
                    await wire.enter(seq, stats.wire_bytes, budget)
                else:
                    wire.resize(admitted, stats.wire_bytes)
                admitted = stats.wire_bytes
                reply = await conn.request("vm_ram", {"vm": vm, "seq": seq, "eof": eof, **body})
                progress.ram_wire_bytes += stats.wire_bytes
                missing = missing_digests(reply.get("missing") or b"")
                if not missing:
                    break
                if missing & exclude:
                    raise MigrationError(f"the destination of {vm} names pages as missing that were sent in full")
                progress.ram_missed_pages += len(missing)
                exclude |= missing & not_held
                not_held |= missing
            progress.ram_bytes += stats.stream_bytes
            pace.taken(trio.current_time(), stats.stream_bytes, stats.wire_bytes)
            progress.ram_pages += stats.pages
            for source, n in stats.by_ref.items():
                progress.ram_by_ref[source] = progress.ram_by_ref.get(source, 0) + n
            if seq == 0:
                await failpoints.pause("vm.ram_crossing")
        finally:
            if admitted is not None:
                wire.leave(admitted)
            window.release()

    digest = hashlib.sha256()  # of the stream as QEMU wrote it; the destination logs its own to compare
    async with stream, trio.open_nursery() as nursery:
        seq = 0
        while True:
            data = await stream.receive_some(pace.piece_bytes(trio.current_time()))
            digest.update(data)
            # reading QEMU's stream (pages hashed, and kept in this host's image) is memory-sized work: a
            # worker thread's, in order, as the reader's state runs from piece to piece
            piece = await trio.to_thread.run_sync(sender.read, bytes(data), not data)
            await window.acquire()
            nursery.start_soon(send, seq, piece, not data)
            seq += 1
            if not data:
                break
    log.info("VM %s: relayed QEMU's migration stream, %d bytes, sha256 %s", vm, progress.ram_bytes,
             digest.hexdigest())
    relayed.set()


@dataclass
class IncomingVm:
    rv: RunningVm
    source: str
    next_seq: int = 0
    stream: trio.SocketStream | None = None
    fed: int = 0  # bytes of the stream given to the incoming QEMU
    digest: Any = field(default_factory=hashlib.sha256)
    turn: trio.Event = field(default_factory=trio.Event)
    heard: float = field(default_factory=trio.current_time)  # the source's last request for it (trio time)
    image: RamImage | None = None  # the memory this VM left here when it last ran here
    pull: PullStats | None = None  # pages read from warm hosts while the disks converge
    pull_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    pull_done: trio.Event = field(default_factory=trio.Event)


class VmTarget:
    """The destination side of VM moves: starts the incoming QEMU, feeds it the stream, reports it running."""

    def __init__(self, swarm: Swarm, runner: VmRunner, book: VmBook) -> None:
        self.swarm, self.runner, self.book = swarm, runner, book
        self.incoming: dict[str, IncomingVm] = {}
        self.nursery: trio.Nursery | None = None  # the VM service's: where incoming VMs are watched

    def ops(self) -> list[PeerOp]:
        return [PeerOp("vm_incoming", self._source_of_every_disk, self.start_incoming),
                PeerOp("vm_ram", self._vm_source, self.ram),
                PeerOp("vm_check", self._vm_source, self.check),
                PeerOp("vm_ram_held", self._vm_source, self.held),
                PeerOp("vm_finish", self._vm_source, self.finish),
                PeerOp("vm_abort", self._vm_source_or_giver, self.abort)]

    async def _source_of_every_disk(self, swarm: Swarm, peer: str, body: dict[str, Any]) -> str | None:
        """vm_incoming: for each of the VM's disks, the source of its incoming migration here, or the host
        that handed it here (a VM that stayed there on forwarded disk I/O after its memory failed to follow)."""
        try:
            vm = VmDefinition.from_payload(body.get("vm"))  # type: ignore[arg-type]
        except DefinitionError as e:
            return f"not a VM definition: {e}"
        for disk in vm.disks:
            exp = swarm.ctl.get(disk)
            if exp is not None and exp.store.owner == swarm.name and disk not in swarm.migration_target.incoming:
                if peer not in exp.store.handed_from:
                    return f"{peer} did not hand disk {disk} over to {swarm.name}"
            elif (why := await access.migration_source(swarm, peer, {"disk": disk})) is not None:
                return why
        return None

    async def _vm_source(self, swarm: Swarm, peer: str, body: dict[str, Any]) -> str | None:
        inc = self.incoming.get(body.get("vm"))  # type: ignore[arg-type]
        if inc is None:
            return f"no VM {body.get('vm')!r} is arriving here"
        if inc.source != peer:
            return f"{peer} is not the source of VM {inc.rv.vm.name}"
        inc.heard = trio.current_time()
        return None

    async def _vm_source_or_giver(self, swarm: Swarm, peer: str, body: dict[str, Any]) -> str | None:
        """vm_abort: the source of the arrival; after a restart here (no arrival known), the host that handed
        the VM's disks here, asking whether the VM runs here; anyone, when no such VM runs here."""
        if body.get("vm") in self.incoming:
            return await self._vm_source(swarm, peer, body)
        rv = self.runner.running.get(body.get("vm"))  # type: ignore[arg-type]
        if rv is None or rv.exited.is_set():
            return None
        for disk in rv.vm.disks:
            if (why := await access.handed_over(swarm, peer, {"disk": disk})) is not None:
                return why
        return None

    async def start_incoming(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        vm = VmDefinition.from_payload(body["vm"])
        try:
            self.book.check_approved(vm)
        except DefinitionError as e:
            raise PeerError("forbidden", str(e)) from None
        if (old := self.incoming.get(vm.name)) is not None:
            await self._drop(vm.name, old)
        try:
            rv = await self.runner.start(vm, incoming=True)
        except VmError as e:
            raise PeerError("vm_failed", str(e)) from None
        inc = self.incoming[vm.name] = IncomingVm(rv, peer)
        assert self.nursery is not None
        self.nursery.start_soon(self._watch, vm.name, inc)
        warm = body.get("warm")
        hosts = [h for h in warm if isinstance(h, str) and h != self.swarm.name] if isinstance(warm, list) else []
        if hosts and await trio.to_thread.run_sync(image_takes_pages, rv.paths.directory, vm.memory):
            inc.pull = PullStats()
            on_disk = body.get("disk_pages")
            self.nursery.start_soon(self._pull, inc, hosts[:MAX_WARM_HOSTS], await trio.to_thread.run_sync(
                split_prefixes, on_disk[:MAX_HELD_PREFIXES * PREFIX_BYTES] if isinstance(on_disk, bytes) else b""))
            return {"warm_pull": True}
        return await self._held_here(inc)

    async def _held_here(self, inc: IncomingVm) -> dict[str, Any]:
        """Which pages the source may send by reference: a prefix of each one's digest."""
        image = await trio.to_thread.run_sync(RamImage.open, inc.rv.paths.directory)
        if image is None:
            return {}
        if self.incoming.get(inc.rv.vm.name) is not inc:  # called off meanwhile
            image.close()
            return {}
        inc.image = image
        return {"ram_held": await trio.to_thread.run_sync(inc.image.prefixes, MAX_HELD_PREFIXES)}

    async def _pull(self, inc: IncomingVm, hosts: list[str], on_disk: frozenset[bytes]) -> None:
        assert inc.pull is not None
        try:
            with inc.pull_scope:
                await pull_warm(self.swarm, inc.rv.vm.name, inc.rv.vm.memory, hosts, inc.rv.paths.directory, inc.pull,
                                on_disk)
        except Exception as e:  # an optimisation: the move goes on without it, and the daemon never stops for it
            log.warning("VM %s: reading its memory from warm hosts failed: %s", inc.rv.vm.name, e)
        finally:
            inc.pull_done.set()
        log.info("VM %s: read %s pages of its memory from warm hosts (%s bytes)", inc.rv.vm.name,
                 inc.pull.pages, inc.pull.wire_bytes)

    async def held(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """vm_ram_held: the disks are ready; the pull from warm hosts gets WARM_PULL_GRACE_SECONDS more,
        then the pages held are announced, those pulled apart."""
        inc = self._arriving(body)
        if inc.pull is None or inc.image is not None:  # nothing pulled, or asked again: the image as it is
            if inc.image is None:
                return await self._held_here(inc)
            return {"ram_held": await trio.to_thread.run_sync(inc.image.prefixes, MAX_HELD_PREFIXES)}
        with trio.move_on_after(WARM_PULL_GRACE_SECONDS):
            await inc.pull_done.wait()
        inc.pull_scope.cancel()
        await inc.pull_done.wait()
        pulled = await trio.to_thread.run_sync(_prefixes, inc.pull.digests)
        return await self._held_here(inc) | {"ram_pulled": pulled, "ram_from_peers": dict(inc.pull.wire_bytes)}

    def _arriving(self, body: dict[str, Any]) -> IncomingVm:
        """The incoming VM a request names; an abort or a watcher may have dropped it meanwhile."""
        inc = self.incoming.get(body.get("vm"))  # type: ignore[arg-type]
        if inc is None:
            raise PeerError("not_found", f"no VM {body.get('vm')!r} is arriving here (its move was called off)")
        return inc

    async def _drop(self, name: str, inc: IncomingVm) -> None:
        """Call off an arrival: forget it, close its stream, stop its QEMU."""
        if self.incoming.get(name) is inc:
            del self.incoming[name]
        inc.pull_scope.cancel()
        _close_image(inc)
        if inc.stream is not None:
            with trio.CancelScope(shield=True):
                await inc.stream.aclose()
        await self.runner.forget(inc.rv, graceful=False)

    async def _watch(self, name: str, inc: IncomingVm) -> None:
        """Stop an incoming QEMU whose move is over without it: once a disk's incoming migration from the
        same source has ended here (aborted, or given up by a source that stopped) and the disk is not ours."""
        while self.incoming.get(name) is inc:
            await trio.sleep(WATCH_SECONDS)
            silent = trio.current_time() - inc.heard > INCOMING_VM_SILENCE_SECONDS
            if silent and all(self._owned_here(d) for d in inc.rv.vm.disks) and await inc.rv.status() == "inmigrate":
                log.info("VM %s: its disks are here but %s has not sent its memory for %.0f s; stopping its "
                         "incoming QEMU (the VM runs on there)", name, inc.source, INCOMING_VM_SILENCE_SECONDS)
                await self._drop(name, inc)
                return
            for disk in inc.rv.vm.disks:
                disk_inc = self.swarm.migration_target.incoming.get(disk)
                if not self._owned_here(disk) and (disk_inc is None or disk_inc.source != inc.source):
                    if self.incoming.get(name) is inc:
                        log.info("VM %s: the migration of its disk %s from %s is over; stopping its incoming QEMU",
                                 name, disk, inc.source)
                        await self._drop(name, inc)
                    return

    def _owned_here(self, disk: str) -> bool:
        exp = self.swarm.ctl.get(disk)
        return exp is not None and exp.store.owner == self.swarm.name

    async def ram(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        inc = self._arriving(body)
        seq = body.get("seq")
        if type(seq) is not int:
            raise PeerError("bad_request", "vm_ram needs an int seq")
        if not inc.next_seq <= seq < inc.next_seq + RAM_WINDOW:
            raise PeerError("bad_request", f"vm_ram chunk {seq} is outside the window at {inc.next_seq}")
        stores = [e.store if (e := self.swarm.ctl.get(d)) is not None else None for d in inc.rv.vm.disks]

        def find(kind: int, digest: bytes, disk: int, offset: int) -> bytes | None:
            """A page by reference, checked against its digest (a worker thread's)."""
            if kind != REF_DISK:
                return inc.image.get(digest) if inc.image is not None else None
            store = stores[disk] if disk < len(stores) else None
            if store is None or offset % PAGE_BYTES or offset + PAGE_BYTES > store.size:
                return None
            page = store.read(offset, PAGE_BYTES)
            return page if page_digest(page) == digest else None

        try:  # unpacking and finding pages is memory-sized work: off the event loop
            data, missing = await trio.to_thread.run_sync(rebuild, body, find)
        except RamPieceError as e:
            raise PeerError("bad_request", str(e)) from None
        if missing:
            return {"missing": b"".join(missing)}
        eof = body.get("eof") is True  # a piece the reader held back entirely rebuilds to nothing
        while inc.next_seq != seq:
            await inc.turn.wait()
        for disk in inc.rv.vm.disks:  # its disks' migrations are alive while the memory streams
            self.swarm.ctl.heard_from_source(disk)
        try:
            if inc.stream is None:
                inc.stream = await trio.open_unix_socket(str(inc.rv.paths.incoming))
            if data:
                await inc.stream.send_all(data)
                inc.digest.update(data)
                inc.fed += len(data)
            if eof:
                await inc.stream.send_eof()
                log.info("VM %s: fed the migration stream to QEMU, %d bytes, sha256 %s", inc.rv.vm.name, inc.fed,
                         inc.digest.hexdigest())
        except (OSError, trio.BrokenResourceError) as e:
            raise PeerError("vm_failed", f"the incoming QEMU does not take its stream: {e}") from None
        finally:
            inc.next_seq += 1
            inc.turn.set()
            inc.turn = trio.Event()
        return {}

    async def check(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """The incoming QEMU's run state: "inmigrate" while it waits for the rest of the stream."""
        return {"status": await self._arriving(body).rv.status()}

    async def finish(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """Wait for the arrived VM to run here; it is this host's VM from then on."""
        inc = self._arriving(body)
        rv = inc.rv
        with trio.move_on_after(RESUME_TIMEOUT):
            while (status := await rv.status()) != "running":
                if rv.exited.is_set():
                    raise PeerError("vm_failed", f"QEMU exited: {self.runner.log_tail(rv.vm.name)}")
                await trio.sleep(STATUS_POLL_SECONDS / 5)
            self.runner.runs_here(rv)
            if self.incoming.get(rv.vm.name) is inc:
                del self.incoming[rv.vm.name]
            _close_image(inc)
            if inc.stream is not None:
                await inc.stream.aclose()
            self.book.learn(rv.vm)
            await self.book.publish()
            return {"status": status}
        raise PeerError("vm_failed", f"VM {rv.vm.name} did not start running here (QEMU says {status})")

    async def abort(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """The move is off: stop the incoming QEMU, unless the VM already runs here (then say so, and keep
        it: the source must not resume its copy)."""
        inc = self.incoming.get(body["vm"])
        if inc is None:
            return await self._runs_after_restart(body["vm"])
        if await inc.rv.status() == "running":
            await self.finish(peer, body)
            return {"running": True}
        await self._drop(inc.rv.vm.name, inc)
        return {"running": False}

    async def _runs_after_restart(self, name: str) -> dict[str, Any]:
        """vm_abort for a VM this daemon knows no arrival of (it restarted): a QEMU it adopted that runs the
        guest keeps it (the source must not resume its copy); one still waiting for its stream is stopped."""
        rv = self.runner.running.get(name)
        if rv is None or rv.exited.is_set():
            return {"running": False}
        if rv.qmp is None:
            raise PeerError("busy", f"VM {name}'s QEMU is being adopted here; ask again")
        status = await rv.status()
        if status == "inmigrate":
            await self.runner.forget(rv, graceful=False)
            return {"running": False}
        return {"running": True}


def _prefixes(digests: list[bytes]) -> bytes:
    return b"".join(sorted({d[:PREFIX_BYTES] for d in digests})[:MAX_HELD_PREFIXES])


def _close_image(inc: IncomingVm) -> None:
    if inc.image is not None:
        inc.image.close()
        inc.image = None
