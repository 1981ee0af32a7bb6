"""This host's QEMU processes: started, watched and stopped by the daemon, never restarted by themselves.

Each VM runs as a child of the daemon with its disks on the daemon's NBD Unix socket, its QMP socket,
serial log and QEMU's own messages (``qemu.log``) in ``HOME/vms/NAME``. The runner owns the nursery
that waits on every QEMU; when the daemon stops, its QEMUs are told to quit (their disks go with it).
A daemon that crashed leaves its QEMUs running, their NBD clients reconnecting: the restarted daemon
adopts them by their pid file and definition (see :meth:`VmRunner.adopt`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio

from p2pvbd.base.home import PRIVATE_DIR_MODE
from p2pvbd.vm import accel as accel_probe
from p2pvbd.vm.definition import RunPaths, qemu_argv
from p2pvbd.vm.qmp import Qmp, QmpError
from p2pvbd.wire.vm_definition import VmDefinition

log = logging.getLogger(__name__)

VMS_DIR = "vms"
# `vm delete` renames a VM's directory to this prefix before removing it; no VM name starts with a dot.
DELETED_PREFIX = ".deleted-"
# QEMU creates its QMP socket within a second of starting, also under TCG; after this it is stuck or
# failed, and its own log says why.
QMP_CONNECT_TIMEOUT = 20.0
# After QMP `quit` QEMU exits in milliseconds; one that does not is killed.
QUIT_TIMEOUT = 10.0
# How much of qemu.log an error message quotes: QEMU's reason is its last line or two.
LOG_TAIL_BYTES = 600
QEMU_BINARY = os.environ.get("P2PVBD_QEMU", "qemu-system-x86_64")


class VmError(Exception):
    """A VM could not be started, stopped or found (the message is for the user)."""


@dataclass
class RunningVm:
    vm: VmDefinition
    paths: RunPaths
    accel: str
    process: trio.Process | None  # None: adopted from a daemon that crashed (not this one's child)
    pid: int
    qmp: Qmp | None = None
    incoming: bool = False
    moving: bool = False  # a move to another host is under way
    exited: trio.Event = field(default_factory=trio.Event)
    exit_status: int | None = None

    async def status(self) -> str:
        """QEMU's run state (running, paused, inmigrate, postmigrate, …) or "exited"."""
        if self.exited.is_set() or self.qmp is None:
            return "exited"
        try:
            return str((await self.qmp.command("query-status"))["status"])
        except (QmpError, trio.TooSlowError):
            return "unknown"


def _prepare_run(paths: RunPaths) -> BinaryIO:
    """The VM's directory, without the sockets of an earlier run, and its QEMU log open for appending."""
    paths.directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    for sock in (paths.qmp, paths.incoming, paths.outgoing):
        sock.unlink(missing_ok=True)
    return open(paths.directory / "qemu.log", "ab")


async def _exit_of(rv: RunningVm) -> None:
    """Return once QEMU has exited (recording its status when it is this daemon's child)."""
    if rv.process is not None:
        rv.exit_status = await rv.process.wait()
        return
    try:
        fd = os.pidfd_open(rv.pid)
    except ProcessLookupError:
        return  # gone already
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def _alive(rv: RunningVm) -> bool:
    if rv.process is not None:
        return rv.process.poll() is None  # reaps our child once it exited
    try:  # adopted: not our child, so an exited one may linger as a zombie until its parent reaps it
        state = Path(f"/proc/{rv.pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class VmRunner:
    def __init__(self, home: Path, nbd_socket: Path) -> None:
        self.dir = home / VMS_DIR
        self.nbd_socket = nbd_socket
        self.running: dict[str, RunningVm] = {}
        # When each VM last began to run here as this host's (started, or arrived by a move): a move away
        # older than that no longer says where it is.
        self.ran_here_since: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self._accel: str | None = None

    def paths(self, name: str) -> RunPaths:
        return RunPaths(self.dir / name)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self._terminate_all()

    async def power_down_all(self, grace: float) -> dict[str, list[str]]:
        """The daemon stops (`p2pvbd stop`, SIGTERM): every guest is asked to power off (ACPI), all at once
        and while the daemon still serves their disks; QEMUs whose guest has not within ``grace`` seconds
        are quit. Returns the VMs that shut down and those that had to be killed."""
        outcome: dict[str, list[str]] = {"shut_down": [], "killed": []}

        async def one(rv: RunningVm) -> None:
            clean = await self._power_down(rv, grace)
            outcome["shut_down" if clean else "killed"].append(rv.vm.name)
            log.info("VM %s %s", rv.vm.name, "shut down" if clean else f"killed: not off after {grace:g} s")

        async with trio.open_nursery() as nursery:
            for rv in [rv for rv in self.running.values() if not rv.exited.is_set()]:
                if rv.incoming:  # no guest runs in it yet: nothing to shut down
                    nursery.start_soon(self._quit, rv)
                else:
                    nursery.start_soon(one, rv)
        return {k: sorted(v) for k, v in outcome.items()}

    async def _terminate_all(self) -> None:
        """The daemon stops: its QEMUs stop with it (their disks are gone). The nursery that watched them is
        cancelled already, so this signals and polls: SIGTERM (QEMU exits cleanly), SIGKILL if still there."""
        left = [rv for rv in self.running.values() if _alive(rv)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for rv in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rv.pid, sig)
            with trio.move_on_after(QUIT_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for rv in left:
                        nursery.start_soon(_exit_of, rv)
            if not (left := [rv for rv in left if _alive(rv)]):
                break
        for rv in self.running.values():
            log.info("QEMU of VM %s stopped with the daemon", rv.vm.name)
        self.running.clear()

    async def resolve_accel(self, wanted: str) -> str:
        """kvm or tcg. "auto" takes KVM only if it boots a guest here (probed once per daemon)."""
        if wanted != "auto":
            return wanted
        if self._accel is None:
            self._accel = "kvm" if await accel_probe.kvm_boots(QEMU_BINARY) else "tcg"
            log.info("accelerator for VMs: %s", self._accel)
        return self._accel

    async def start(self, vm: VmDefinition, *, incoming: bool = False) -> RunningVm:
        """Start QEMU for ``vm``; once its QMP answers, it is running (or waiting for its migration stream)."""
        assert self._nursery is not None
        if vm.name in self.running and not self.running[vm.name].exited.is_set():
            raise VmError(f"VM {vm.name} is already running here")
        accel = await self.resolve_accel(vm.accel)
        paths = self.paths(vm.name)
        argv = qemu_argv(vm, paths, self.nbd_socket, accel, incoming=incoming, qemu=QEMU_BINARY)
        log.info("starting VM %s%s: %s", vm.name, " (incoming)" if incoming else "", " ".join(argv))
        with await trio.to_thread.run_sync(_prepare_run, paths) as out:
            try:
                proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            except OSError as e:
                raise VmError(f"cannot run {QEMU_BINARY}: {e.strerror}") from None
        await trio.to_thread.run_sync(paths.definition.write_text, json.dumps(vm.as_payload() | {"accel": accel}))
        rv = RunningVm(vm, paths, accel, proc, proc.pid, incoming=incoming)
        self.running[vm.name] = rv
        if not incoming:
            self.runs_here(rv)
        self._nursery.start_soon(self._watch, rv)
        try:
            rv.qmp = await self._connect_qmp(rv)
        except BaseException:
            await self._quit(rv)
            raise
        return rv

    async def _connect_qmp(self, rv: RunningVm) -> Qmp:
        assert self._nursery is not None
        with trio.move_on_after(QMP_CONNECT_TIMEOUT):
            while not rv.exited.is_set():
                try:
                    return await Qmp.open(self._nursery, rv.paths.qmp)
                except (OSError, QmpError):
                    await trio.sleep(0.05)
        await trio.sleep(0.1)  # let QEMU finish writing why it stopped
        raise VmError(f"QEMU for {rv.vm.name} " + ("exited" if rv.exited.is_set() else "did not answer on QMP")
                      + f": {self.log_tail(rv.vm.name)}")

    def log_tail(self, name: str) -> str:
        try:
            with open(self.paths(name).directory / "qemu.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "(no qemu.log)"
        return " / ".join(lines[-2:]) or "(qemu.log is empty)"

    def runs_here(self, rv: RunningVm) -> None:
        """``rv`` runs this host's VM now (it was started here, or its move here finished)."""
        rv.incoming = False
        self.ran_here_since[rv.vm.name] = time.monotonic()

    async def _watch(self, rv: RunningVm) -> None:
        """Mark ``rv`` exited once QEMU has exited (a cancelled watch, at daemon stop, marks nothing: the
        QEMU still runs until _terminate_all stops it)."""
        await _exit_of(rv)
        rv.exited.set()
        log.info("QEMU of VM %s exited (status %s)", rv.vm.name, rv.exit_status)
        if rv.qmp is not None:
            await rv.qmp.aclose()

    async def stop(self, name: str, grace: float) -> bool:
        """Ask the guest to power off (ACPI), then quit QEMU after ``grace`` seconds if it has not. True
        when the guest powered off by itself."""
        return await self._power_down(self.get(name), grace)

    async def _power_down(self, rv: RunningVm, grace: float) -> bool:
        if rv.qmp is not None and grace > 0 and not rv.exited.is_set():
            try:
                await rv.qmp.command("system_powerdown")
            except QmpError:
                pass
            with trio.move_on_after(grace):
                await rv.exited.wait()
        clean = rv.exited.is_set()
        await self._quit(rv)
        return clean

    async def _quit(self, rv: RunningVm, graceful: bool = True) -> None:
        """QMP `quit`, then SIGKILL if QEMU has not exited after QUIT_TIMEOUT (or at once if not
        ``graceful``): a QEMU whose NBD server is gone waits for it to come back before it exits."""
        if not rv.exited.is_set() and graceful:
            with trio.move_on_after(QUIT_TIMEOUT):
                if rv.qmp is not None:
                    try:
                        await rv.qmp.command("quit")
                    except QmpError:
                        pass
                await rv.exited.wait()
        if not rv.exited.is_set():
            try:
                os.kill(rv.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await rv.exited.wait()
        if self.running.get(rv.vm.name) is rv:
            del self.running[rv.vm.name]

    async def forget(self, rv: RunningVm, graceful: bool = True) -> None:
        """Quit a QEMU this host no longer runs the VM in: its source side after a move, or (not
        ``graceful``: killed, it never ran the guest) an incoming one whose move failed."""
        await self._quit(rv, graceful)

    async def adopt(self) -> list[RunningVm]:
        """Take over the QEMUs a crashed daemon left running (their pid file names a live QEMU of that VM)."""
        assert self._nursery is not None
        adopted = []
        for vm, paths, pid, incoming in self.left_running():
            if vm.name in self.running:
                continue
            rv = RunningVm(vm, paths, vm.accel, None, pid, incoming=incoming)
            self.running[vm.name] = rv
            self._nursery.start_soon(self._watch, rv)
            try:
                rv.qmp = await Qmp.open(self._nursery, paths.qmp)
            except (OSError, QmpError) as e:
                log.warning("QEMU of VM %s (pid %d) left running does not answer on QMP (%s); stopping it",
                            vm.name, pid, e)
                await self._quit(rv)
                continue
            log.info("adopted VM %s (QEMU pid %d) left running by the previous daemon", vm.name, pid)
            adopted.append(rv)
        return adopted

    def left_running(self) -> list[tuple[VmDefinition, RunPaths, int, bool]]:
        """QEMUs a previous daemon left running, from their pid files: (definition, paths, pid, incoming).
        Reads files only, so it runs before this daemon serves its disks."""
        found = []
        for directory in sorted(self.dir.iterdir()) if self.dir.is_dir() else ():
            paths = RunPaths(directory)
            try:
                pid = int(paths.pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                vm = VmDefinition.from_payload(json.loads(paths.definition.read_text()))
            except (OSError, ValueError):
                continue
            if b"-name" not in cmdline or vm.name.encode() not in cmdline:
                continue  # the pid was reused, or the file is not a VM's
            found.append((vm, paths, pid, b"-incoming" in cmdline))
        return found

    def remove_files(self, name: str) -> list[Path]:
        """`vm delete`: this host's directory of the VM (serial log, memory image, warm policy), renamed
        aside first so a crash midway leaves either the whole directory or none under the VM's name
        (start_up_cleanup removes what a crash left aside). Blocking: call it in a worker thread."""
        if name in self.running and not self.running[name].exited.is_set():
            raise VmError(f"VM {name} is running on this host")
        directory = self.paths(name).directory
        if not directory.exists():
            return []
        aside = self.dir / f"{DELETED_PREFIX}{name}.{time.time_ns()}"
        directory.rename(aside)
        shutil.rmtree(aside)
        return [directory]

    def start_up_cleanup(self) -> None:
        """Remove what a `vm delete` cut short by a crash left renamed aside."""
        for aside in self.dir.glob(f"{DELETED_PREFIX}*") if self.dir.is_dir() else ():
            shutil.rmtree(aside, ignore_errors=True)

    def get(self, name: str) -> RunningVm:
        rv = self.running.get(name)
        if rv is None or rv.exited.is_set():
            raise VmError(f"VM {name} is not running on this host")
        return rv
