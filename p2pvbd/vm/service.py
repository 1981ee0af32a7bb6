"""The daemon's VM service: definitions, this host's QEMUs and VM moves, behind `p2pvbd vm …` and `migrate`.

Composes the runner (processes), the book (definitions in the index) and the move's destination side
(peer ops); the daemon registers those ops with the swarm and dispatches ``vm_*`` control ops here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pvbd.control import ControlError
from p2pvbd.migrate import MigrationError, MigrationProgress
from p2pvbd.peer_transport import PeerError
from p2pvbd.swarm.access import PeerOp
from p2pvbd.vm.book import VmBook
from p2pvbd.vm.definition import DefinitionError, VmDefinition
from p2pvbd.vm.move import VmMoveProgress, VmTarget, move_vm
from p2pvbd.vm.runner import VmError, VmRunner

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

# `vm stop` waits this long for the guest to power off after the ACPI button before QEMU is told to quit.
DEFAULT_STOP_TIMEOUT = 30.0


class VmService:
    def __init__(self, swarm: Swarm, home: Path, nbd_socket: Path) -> None:
        self.swarm = swarm
        self.runner = VmRunner(home, nbd_socket)
        self.book = VmBook(swarm, home)
        self.target = VmTarget(swarm, self.runner, self.book)
        self.moves: dict[str, VmMoveProgress] = {}

    def ops(self) -> dict[str, PeerOp]:
        return self.target.ops()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.runner.run)
            await nursery.start(self.book.run)
            task_status.started()

    # ---- control ops ---------------------------------------------------------------------------
    async def op_vm_create(self, name: str, disks: str, memory: str = "1G", cpus: int = 1, accel: str = "auto",
                           kernel: str = "", initrd: str = "", append: str = "",
                           qemu_args: list[str] | None = None) -> dict[str, Any]:
        try:
            vm = VmDefinition.from_options(name, disks, memory, cpus=cpus, accel=accel, kernel=kernel,
                                           initrd=initrd, append=append, qemu_args=tuple(qemu_args or ()))
            for what, path in (("kernel", kernel), ("initrd", initrd)):
                if path and not Path(path).is_file():
                    raise DefinitionError(f"{what} {path} is not a file on {self.swarm.name}")
            vm = await self.book.define(vm)
        except DefinitionError as e:
            raise ControlError(str(e)) from None
        return await self._info(vm)

    async def op_vm_start(self, name: str) -> dict[str, Any]:
        vm = self._vm(name)
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

    async def op_vm_stop(self, name: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> dict[str, Any]:
        vm = self._vm(name)
        try:
            await self.runner.stop(name, timeout)
        except VmError as e:
            raise ControlError(str(e)) from None
        return await self._info(vm)

    async def op_vm_list(self) -> list[dict[str, Any]]:
        await self.book.refresh()
        return [await self._info(vm) for vm in sorted(self.book.vms.values(), key=lambda v: v.name)]

    def _vm(self, name: str) -> VmDefinition:
        vm = self.book.get(name)
        if vm is None:
            raise ControlError(f"no VM named {name!r} (see 'p2pvbd vm list')")
        return vm

    async def _info(self, vm: VmDefinition) -> dict[str, Any]:
        rv = self.runner.running.get(vm.name)
        if rv is not None and not rv.exited.is_set():
            host, state = self.swarm.name, await rv.status()
        else:
            host, state = "", "stopped here"
            move = self.moves.get(vm.name)
            if move is not None and move.finished is not None and not move.error:
                host, state = move.dest, "moved away"
        paths = self.runner.paths(vm.name)
        return {"name": vm.name, "host": host, "state": state, "disks": list(vm.disks), "memory": vm.memory,
                "cpus": vm.cpus, "accel": rv.accel if rv is not None else vm.accel, "serial": str(paths.serial),
                "qmp": str(paths.qmp)}

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
        for disk in vm.disks:
            exp = self.swarm.ctl.get(disk)
            if exp is None or exp.store.owner != self.swarm.name:
                raise ControlError(f"{self.swarm.name} does not own disk {disk} of VM {name}")
        disks = [MigrationProgress(d, self.swarm.name, to, mode) for d in vm.disks]
        progress = self.moves[name] = VmMoveProgress(name, self.swarm.name, to, mode, disks)
        return progress

    async def run_move(self, progress: VmMoveProgress, max_downtime_ms: float) -> None:
        vm = self._vm(progress.vm)
        try:
            await move_vm(self.swarm, self.runner, vm, progress.dest, max_downtime_ms, progress)
        except (MigrationError, VmError) as e:
            progress.error = str(e)
        except PeerError as e:
            progress.error = e.message
        except BaseExceptionGroup as eg:  # from the disks' tasks: the first reason is the user's
            expected, other = eg.split((MigrationError, PeerError, VmError))
            first = _first_leaf(expected or eg)
            progress.error = getattr(first, "message", None) or str(first) or type(first).__name__
            if other is not None:
                log.error("moving VM %s failed", progress.vm, exc_info=other)
        except Exception as e:
            log.exception("moving VM %s failed", progress.vm)
            progress.error = f"internal error: {e}"
        finally:
            progress.finished = time.monotonic()
            if progress.error:
                progress.phase = "failed"


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
