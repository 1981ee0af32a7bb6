"""The daemon's VM service: definitions, this host's QEMUs and VM moves, behind `p2pvbd vm …` and `migrate`.

Composes the runner (processes), the book (definitions in the index) and the move's destination side
(peer ops); the daemon registers those ops with the swarm and dispatches ``vm_*`` control ops here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pvbd.base.control import ControlError
from p2pvbd.base.control_ops import OpHandler
from p2pvbd.base.home import HomeError, check_name
from p2pvbd.migrate import MigrationError, MigrationProgress
from p2pvbd.migration.cancel import JobCancel
from p2pvbd.migration.handover import PeerForwarder
from p2pvbd.migration.jobs import run_job
from p2pvbd.swarm.access import PeerOp, member
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.vm import changes as vm_changes
from p2pvbd.vm.book import VmBook
from p2pvbd.vm.move import VmMoveProgress, VmTarget, move_vm
from p2pvbd.vm.qmp import QmpError
from p2pvbd.vm.runner import VmError, VmRunner
from p2pvbd.vm.warm import WarmMemory
from p2pvbd.vm.warm_pull import WarmReads
from p2pvbd.wire.vm_definition import DefinitionError, VmDefinition

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

# `vm stop` waits this long for the guest to power off after the ACPI button before QEMU is told to quit.
DEFAULT_STOP_TIMEOUT = 30.0
# QEMU migration states of a move still under way (QAPI MigrationStatus), which a restarted daemon cancels.
OUTGOING_UNFINISHED = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})
# A move asked for from its destination is followed by asking the source this often.
REMOTE_POLL_SECONDS = 0.25
# `vm list` asks a VM's owner whether it runs there; an owner that is down must not hold the list up
# (swarm/node.QUERY_TIMEOUT is the same bound for status queries).
WHERE_TIMEOUT = 5.0


class RemoteMove:
    """A move of a VM to this host, run by the host the VM runs on: its progress as last asked for."""

    def __init__(self, vm: str, source: str, dest: str, mode: str) -> None:
        self.vm, self.source, self.dest = vm, source, dest
        self.state: dict[str, Any] = {"vm": vm, "disk": vm, "from": source, "to": dest, "mode": mode,
                                      "phase": "prepare", "error": "", "disks": [], "total_bytes": 0,
                                      "done_bytes": 0, "bytes_on_wire": 0, "mirror_lag_blocks": 0, "peers": {},
                                      "ram_bytes": 0, "ram_wire_bytes": 0, "ram_pages": 0, "ram_by_ref": {},
                                      "ram_missed_pages": 0, "ram_from_peers": {}, "vm_downtime_ms": None,
                                      "disk_switchover_ms": None,
                                      "bytes_from": {}, "throttled": False,
                                      "duration_s": 0.0}
        self.finished: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.state)


# Sets a disk's replication policy (hosts on, hosts off, rate): migration/replication.Replication.set.
ReplicateDisk = Callable[[str, list[str], list[str], float | None], Awaitable[Any]]


class VmService:
    def __init__(self, swarm: Swarm, home: Path, nbd_socket: Path, replicate_disk: ReplicateDisk) -> None:
        self.swarm = swarm
        self.replicate_disk = replicate_disk  # the replication service's `set`: a VM's disks stay warm with it
        self.runner = VmRunner(home, nbd_socket)
        self.book = VmBook(swarm, home)
        self.target = VmTarget(swarm, self.runner, self.book)
        self.warm = WarmMemory(swarm, self.runner, self.book)
        self.warm_reads = WarmReads(self.runner, self.book)
        self.moves: dict[str, VmMoveProgress] = {}
        self._nursery: trio.Nursery | None = None
        self.book.on_deleted = self._deleted_elsewhere

    def ops(self) -> list[PeerOp]:
        return [*self.target.ops(), *self.warm.ops(), *self.warm_reads.ops(self.warm.owner),
                PeerOp("vm_move", self._may_pull, self._serve_move),
                PeerOp("vm_move_status", _the_destination, self._serve_move_status),
                PeerOp("vm_where", member, self._serve_where)]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = self.target.nursery = nursery
            await trio.to_thread.run_sync(self.runner.start_up_cleanup)
            await nursery.start(self.runner.run)
            await nursery.start(self.book.run)
            nursery.start_soon(self._adopt)  # QMP answers in milliseconds, but the daemon is ready without it
            nursery.start_soon(self.warm.run)
            task_status.started()

    def forward_left_vms(self) -> None:
        """Before the disks are served: a QEMU left running by a crashed daemon reconnects as a new client;
        for every disk of its that was (or, once a pending switchover resolves, is) handed over, its I/O goes
        to the new owner, as its old connection's did. Without this the guest would find its disk read-only."""
        for vm, _, pid, incoming in self.runner.left_running():
            if incoming:
                continue
            for disk in vm.disks:
                exp = self.swarm.ctl.get(disk)
                if exp is None:
                    continue
                exp.forward_pids |= {pid}
                owner = exp.store.owner
                if owner and owner != self.swarm.name and exp.forward is None:
                    exp.forward = PeerForwarder(self.swarm, owner, disk)
                    log.info("VM %s (QEMU pid %d) left running: its disk %s is forwarded to its owner %s",
                             vm.name, pid, disk, owner)

    async def _adopt(self) -> None:
        """QEMUs left by a daemon that crashed: an incoming one whose move died with it is stopped; an
        outgoing migration the crash cut off is cancelled, so the guest runs on here (QEMU resumes it)."""
        for rv in await self.runner.adopt():
            try:
                status = await rv.status()
                if status == "inmigrate":
                    log.info("VM %s was arriving when this daemon stopped; its move is over", rv.vm.name)
                    await self.runner.forget(rv, graceful=False)
                    continue
                self.runner.runs_here(rv)
                assert rv.qmp is not None
                outgoing = (await rv.qmp.command("query-migrate")).get("status")
                if outgoing in OUTGOING_UNFINISHED:
                    log.warning("VM %s was leaving (QEMU migration %s) when this daemon stopped: cancelled",
                                rv.vm.name, outgoing)
                    await rv.qmp.command("migrate_cancel")
            except QmpError as e:
                log.warning("VM %s left running cannot be checked (%s)", rv.vm.name, e)

    # ---- control ops ---------------------------------------------------------------------------
    def control_ops(self) -> dict[str, OpHandler]:
        """The `vm` commands, registered with the daemon's table."""
        return {
            "vm_create": self.op_vm_create,
            "vm_set": self.op_vm_set,
            "vm_delete": self.op_vm_delete,
            "vm_start": self.op_vm_start,
            "vm_approve": self.op_vm_approve,
            "vm_allow": self.op_vm_allow,
            "vm_stop": self.op_vm_stop,
            "vm_list": self.op_vm_list,
            "vm_replicate": self.op_vm_replicate,
        }

    async def op_vm_create(self, name: str, disks: str, memory: str = "1G", cpus: int = 1, accel: str = "auto",
                           kernel: str = "", initrd: str = "", append: str = "",
                           qemu_args: list[str] | None = None, replace: bool = False) -> dict[str, Any]:
        """`vm create` (``replace``: `vm create --replace`, a known VM defined anew)."""
        try:
            vm = VmDefinition.from_options(name, disks, memory, cpus=cpus, accel=accel, kernel=kernel,
                                           initrd=initrd, append=append, qemu_args=tuple(qemu_args or ()))
        except DefinitionError as e:
            raise ControlError(str(e)) from None
        return await self._define(vm, self.book.get(name) if replace else None, replace)

    async def op_vm_set(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """`vm set`: only the fields given change (``changes``: definition field -> new value)."""
        known = self._vm(name)
        try:
            vm = vm_changes.apply(known, changes)
        except DefinitionError as e:
            raise ControlError(str(e)) from None
        return await self._define(vm, known, True)

    async def _define(self, vm: VmDefinition, before: VmDefinition | None, replace: bool) -> dict[str, Any]:
        """Sign and publish ``vm`` (as the owner), and say what the change means: a running QEMU keeps the
        definition it started with, and hosts that approved the old one must approve the new one."""
        try:
            for what, path in (("kernel", vm.kernel), ("initrd", vm.initrd)):
                if path and not await trio.Path(path).is_file():
                    raise DefinitionError(f"{what} {path} is not a file on {self.swarm.name}")
            vm = await self.book.define(vm, replace)
        except DefinitionError as e:
            raise ControlError(str(e)) from None
        info = await self._info(vm)
        info["changed"] = vm_changes.differences(before, vm) if before is not None else []
        running = bool(info["host"]) and info["state"] != "moved away"
        info["restart_needed"] = before is not None and bool(info["changed"]) and running
        info["approve_again"] = before is not None and vm_changes.needs_new_approval(before, vm)
        return info

    async def op_vm_delete(self, name: str) -> dict[str, Any]:
        """`vm delete`: the definition goes (a tombstone in the index), and this host's memory image and
        run directory with it; its disks stay. Refused while the VM runs here or on its owner."""
        vm = self._vm(name)
        info = await self._info(vm)
        if info["host"] and info["state"] != "moved away":
            raise ControlError(f"{name} runs on {info['host']}: stop it first (`p2pvbd vm stop {name}`"
                               + (" there)" if info["host"] != self.swarm.name else ")"))
        if (move := self.moves.get(name)) is not None and move.finished is None:
            raise ControlError(f"{name} is moving to {move.dest}: delete it once the move has ended")
        try:
            await self.book.delete(name)
        except DefinitionError as e:
            raise ControlError(str(e)) from None
        if hosts := self.warm.info(name)["hosts"]:  # their copies of its memory go too
            await self.warm.set_policy(name, [], hosts, None)
        self.warm.states.pop(name, None)
        try:
            removed = await trio.to_thread.run_sync(self.runner.remove_files, name)
        except (VmError, OSError) as e:
            raise ControlError(f"VM {name} is deleted, but not its files on {self.swarm.name}: {e}") from None
        return {"name": name, "disks": list(vm.disks), "removed": [str(p) for p in removed]}

    async def op_vm_start(self, name: str) -> dict[str, Any]:
        vm = self._vm(name)
        self._check_approved(vm)
        for disk in vm.disks:
            exp = self.swarm.ctl.get(disk)
            if exp is None or exp.store.owner != self.swarm.name:
                where = exp.store.owner if exp is not None else (await self.swarm.owner_of(disk))[0]
                raise ControlError(f"{self.swarm.name} does not own disk {disk} of VM {name}"
                                   + (f": start it on {where}, or move the disk here first" if where else ""))
        try:
            await self.runner.start(vm)
        except VmError as e:
            raise ControlError(str(e)) from None
        return await self._info(vm)

    async def op_vm_approve(self, name: str) -> dict[str, Any]:
        """Let this host run the VM as its definition now stands (kernel, initrd, QEMU arguments)."""
        await self.book.refresh()
        vm = self._vm(name)
        self.book.approve(vm)
        return await self._info(vm)

    def _check_approved(self, vm: VmDefinition) -> None:
        try:
            self.book.check_approved(vm)
        except DefinitionError as e:
            raise ControlError(str(e)) from None

    async def op_vm_allow(self, name: str, hosts: list[str]) -> dict[str, Any]:
        """`vm allow`: the hosts that may pull the VM to themselves (empty: none)."""
        try:
            for host in hosts:
                check_name("host", host)
            vm = await self.book.allow(name, hosts)
        except (DefinitionError, HomeError) as e:
            raise ControlError(str(e)) from None
        return await self._info(vm)

    async def op_vm_stop(self, name: str, grace: float = DEFAULT_STOP_TIMEOUT) -> dict[str, Any]:
        vm = self._vm(name)
        await self.check_here(name, f"p2pvbd vm stop {name}")
        try:
            clean = await self.runner.stop(name, grace)
        except VmError as e:
            raise ControlError(str(e)) from None
        return await self._info(vm) | {"shut_down": clean}

    async def op_vm_replicate(self, name: str, on: list[str], off: list[str], rate: float | None = None
                              ) -> dict[str, Any]:
        """`vm replicate`: the hosts that keep the VM's memory warm (and its disks: the caller sets those)."""
        vm = self._vm(name)
        if not self.runs_here(name):
            raise ControlError(f"VM {name} does not run on {self.swarm.name}: set its warm hosts where it runs")
        for host in (*on, *off):
            check_name("host", host)
        if rate is not None and rate <= 0:
            raise ControlError("--rate must be positive")
        for disk in vm.disks:  # its disks are kept warm there too, as `replicate DISK` would
            await self.replicate_disk(disk, on, off, rate)
        return {"vm": vm.name, "disks": list(vm.disks)} | await self.warm.set_policy(name, on, off, rate)

    async def op_vm_list(self) -> list[dict[str, Any]]:
        await self.book.refresh()
        return [await self._info(vm) for vm in self.book.defined()]

    def _deleted_elsewhere(self, name: str) -> None:
        """A tombstone arrived: this host's files of the VM (a memory image it left, a warm copy) go too,
        unless a QEMU of it still runs here (its files go with a later `vm delete` here)."""
        if self._nursery is not None and not self.runs_here(name):
            self._nursery.start_soon(self._remove_files, name)

    async def _remove_files(self, name: str) -> None:
        try:
            if removed := await trio.to_thread.run_sync(self.runner.remove_files, name):
                log.info("VM %s was deleted: removed %s", name, removed[0])
        except (VmError, OSError) as e:
            log.warning("VM %s was deleted, but its files here stay: %s", name, e)

    async def check_here(self, name: str, command: str) -> None:
        """A ``command`` for a VM that runs on another host fails naming that host (a VM running nowhere is
        left to the command's own error)."""
        vm = self._vm(name)
        if self.runs_here(name):
            return
        elsewhere = await self._where(vm)
        if elsewhere:
            raise ControlError(f"{name} runs on {elsewhere}: run `{command}` there")

    async def _where(self, vm: VmDefinition) -> str:
        """The other host running ``vm``, as its disks' owner says (only the owner runs it), or ""."""
        exp = self.swarm.ctl.get(vm.disks[0])
        owner = exp.store.owner if exp is not None else (await self.swarm.owner_of(vm.disks[0]))[0]
        if not owner or owner == self.swarm.name:
            return ""
        try:
            with trio.fail_after(WHERE_TIMEOUT):
                conn = await self.swarm.connect(owner)
                reply = await conn.request("vm_where", {"vm": vm.name}, timeout=WHERE_TIMEOUT)
        except (PeerError, trio.TooSlowError) as e:
            log.info("cannot ask %s where VM %s runs: %s", owner, vm.name, getattr(e, "message", "timed out"))
            return ""
        return owner if reply.get("running") else ""

    async def _serve_where(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """vm_where: whether that VM runs here (any member may ask: `vm list` on every host shows where)."""
        return {"running": self.runs_here(str(body["vm"]))}

    def _vm(self, name: str) -> VmDefinition:
        vm = self.book.get(name)
        if vm is None:
            raise ControlError(f"no VM named {name!r} (see 'p2pvbd vm list')")
        return vm

    async def _info(self, vm: VmDefinition) -> dict[str, Any]:
        rv = self.runner.running.get(vm.name)
        if rv is not None and not rv.exited.is_set():
            host, state = self.swarm.name, await rv.status()
        elif elsewhere := await self._where(vm):
            host, state = elsewhere, f"running on {elsewhere}"
        else:
            host, state = "", "stopped here"
            move = self.moves.get(vm.name)
            if (move is not None and move.finished is not None and not move.error
                    and self.runner.ran_here_since.get(vm.name, -math.inf) < move.started):
                host, state = move.dest, "moved away"
        paths = self.runner.paths(vm.name)
        return {"name": vm.name, "host": host, "state": state, "disks": list(vm.disks), "memory": vm.memory,
                "cpus": vm.cpus, "append": vm.append, "accel": rv.accel if rv is not None else vm.accel,
                "serial": str(paths.serial),
                "qmp": str(paths.qmp), "host_parts": vm.host_parts, "approved": self.book.approved_here(vm),
                "allow": list(vm.allow), "warm": self.warm.info(vm.name)}

    # ---- moves ---------------------------------------------------------------------------------
    def knows(self, name: str) -> bool:
        return self.book.get(name) is not None

    def prepare_move(self, name: str, to: str, mode: str) -> VmMoveProgress:
        """Check that the VM can leave from here and make its progress record (the daemon runs the move)."""
        vm = self._vm(name)
        if name not in self.runner.running or self.runner.running[name].exited.is_set():
            raise ControlError(f"VM {name} is not running on {self.swarm.name}: run the command on the host running "
                               "it (see 'p2pvbd vm list')")
        if to == self.swarm.name:
            raise ControlError(f"VM {name} already runs on {to}")
        if (move := self.moves.get(name)) is not None and move.finished is None:
            raise ControlError(f"VM {name} is already moving to {move.dest}")
        moving = []
        for disk in vm.disks:
            exp = self.swarm.ctl.get(disk)
            if exp is not None and exp.store.owner == self.swarm.name:
                moving.append(disk)
            elif exp is None or exp.store.owner != to or exp.forward is None:
                owner = exp.store.owner if exp is not None else ""
                raise ControlError(f"{self.swarm.name} does not own disk {disk} of VM {name}"
                                   + (f" ({owner} does: the VM can move only there)" if owner else ""))
            # else: the disk went to ``to`` in a move whose memory did not follow; the VM runs here on
            # forwarded I/O, and only its memory (and the disks still here) move now
        disks = [MigrationProgress(d, self.swarm.name, to, mode) for d in moving]
        progress = self.moves[name] = VmMoveProgress(name, self.swarm.name, to, mode, disks)
        return progress

    def running_on(self, disk: str) -> str | None:
        """The VM running here on ``disk``, if any: moving the disk alone would leave it here reading
        every block over the network."""
        for name in list(self.runner.running):
            vm = self.book.get(name)
            if vm is not None and disk in vm.disks and self.runs_here(name):
                return name
        return None

    def runs_here(self, name: str) -> bool:
        rv = self.runner.running.get(name)
        return rv is not None and not rv.exited.is_set()

    async def request_move(self, name: str, mode: str, max_downtime_ms: float) -> RemoteMove:
        """`migrate VM --to THIS-HOST` run here: ask the host running the VM (its disks' owner) to move it."""
        vm = self._vm(name)
        self._check_approved(vm)
        source, _ = await self.swarm.owner_of(vm.disks[0])
        if source and source != self.swarm.name and self.swarm.name not in vm.allow:
            raise ControlError(f"VM {name} may be pulled only to the hosts its owner allows "
                               f"({', '.join(vm.allow) or 'none'}): run 'p2pvbd vm allow {name} {self.swarm.name}' "
                               f"on {source}, or 'p2pvbd migrate {name} --to {self.swarm.name}' there")
        if not source:
            raise ControlError(f"VM {name} is not running anywhere this host knows of; start it with "
                               f"'p2pvbd vm start {name}'")
        if source == self.swarm.name:
            raise ControlError(f"{self.swarm.name} owns the disks of VM {name} but does not run it: start it "
                               f"with 'p2pvbd vm start {name}', or, if it runs on the host it came from on "
                               "forwarded disk I/O, run this command there")
        try:
            conn = await self.swarm.connect(source)
            await conn.request("vm_move", {"vm": name, "to": self.swarm.name, "mode": mode,
                                           "max_downtime_ms": float(max_downtime_ms)})
        except PeerError as e:
            raise ControlError(f"{source} did not start moving VM {name} here: {e.message}") from None
        remote = RemoteMove(name, source, self.swarm.name, mode)
        assert self._nursery is not None
        self._nursery.start_soon(self._follow_remote, remote)
        return remote

    async def _follow_remote(self, remote: RemoteMove) -> None:
        try:
            while True:
                await trio.sleep(REMOTE_POLL_SECONDS)
                try:
                    conn = await self.swarm.connect(remote.source)
                    state = await conn.request("vm_move_status", {"vm": remote.vm, "to": remote.dest})
                except PeerError as e:
                    if self.runs_here(remote.vm):  # it arrived; only the source cannot be asked any more
                        remote.state.update(phase="done")
                        return
                    remote.state.update(phase="unknown", error=f"{remote.source} cannot be asked: {e.message}")
                    return
                remote.state.update(state)
                if state.get("done"):
                    return
        finally:
            remote.finished = time.monotonic()

    async def _may_pull(self, swarm: Swarm, peer: str, body: dict[str, Any]) -> str | None:
        """vm_move: a host asks this one, which runs the VM, to move it to the asker. Only to itself, and
        only when the VM's owner allowed it (`vm allow`, in the definition this host publishes): any member
        could ask, and a VM moved there runs there, with its disks, owned there."""
        if body.get("to") != peer:
            return f"{peer} may only ask to move a VM to itself"
        vm = self.book.get(body.get("vm"))  # type: ignore[arg-type]
        if vm is None:
            return f"no VM {str(body.get('vm'))[:64]!r} is defined here"
        if peer not in vm.allow:
            return (f"{peer} may not pull VM {vm.name}: its owner allows "
                    f"{', '.join(vm.allow) or 'no host'} ('p2pvbd vm allow {vm.name} HOST' on {swarm.name})")
        return None

    async def _serve_move(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """vm_move: the destination asks this host, which runs the VM, to move it there."""
        mode, max_downtime = body.get("mode"), body.get("max_downtime_ms")
        if mode not in ("sync", "async") or not isinstance(max_downtime, float) or not 0 < max_downtime <= 1e6:
            raise PeerError("bad_request", "vm_move needs mode sync|async and a positive max_downtime_ms")
        try:
            progress = self.prepare_move(str(body["vm"]), peer, mode)
        except ControlError as e:
            raise PeerError("refused", str(e)) from None
        for disk in progress.disks:
            self.swarm.migrations[disk.disk] = disk
        assert self._nursery is not None
        self._nursery.start_soon(self.run_move, progress, max_downtime)
        return {}

    async def _serve_move_status(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        move = self.moves.get(body["vm"])
        if move is None or move.dest != peer:
            raise PeerError("no_move", f"VM {body['vm']} is not moving to {peer}")
        return move.as_dict() | {"done": move.finished is not None}

    async def run_move(self, progress: VmMoveProgress, max_downtime_ms: float, cancel: JobCancel | None = None
                       ) -> None:
        """Run a move as a job; ``cancel``: how a person may stop it before its switchover (move_vm then
        cancels QEMU's migration and the guest runs on here)."""
        vm = self._vm(progress.vm)
        assert self._nursery is not None
        # The disks' tasks fail as a group: its first expected reason is the user's.
        await run_job(f"moving VM {progress.vm}", progress,
                      partial(move_vm, self.swarm, self.runner, vm, progress.dest, max_downtime_ms, progress,
                              self._nursery, warm_hosts=self.warm.info(progress.vm)["hosts"]),
                      (MigrationError, PeerError, VmError), cancel)


async def _the_destination(swarm: Swarm, peer: str, body: dict[str, Any]) -> str | None:
    """vm_move_status: only the host a VM moves to may ask how the move goes."""
    if body.get("to") != peer:
        return f"{peer} may only ask to move a VM to itself"
    return None
