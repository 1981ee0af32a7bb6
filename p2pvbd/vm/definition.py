"""The QEMU command line a VM definition (wire/vm_definition.py) becomes on this host: pure, no processes.

The paths of the files QEMU uses at run time (sockets, serial log) are this host's, chosen by the runner,
never part of the definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p2pvbd.wire.vm_definition import VmDefinition

# QEMU's NBD client waits this long for the daemon to come back (a restart after a crash takes seconds)
# before failing the guest's I/O: the VM outlives a crash of its daemon.
NBD_RECONNECT_SECONDS = 120
# Under TCG a guest gets this much more RAM than its definition says. QEMU before 9.0 (upstream commit
# 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory access") takes a fast path
# when it collects the dirty pages of a RAM block whose length is a multiple of 64 pages (256 KiB): it clears
# their dirty bits without resetting TCG's TLB, so the guest's later stores through entries already in
# its TLB mark nothing dirty and are lost from a live migration. The guest crashes after its move (slab
# corruption, virtio rings out of step). A length off that multiple makes QEMU take its page-by-page path,
# which resets the TLB; 8 KiB is the smallest step QEMU sizes RAM in (it rounds -m up to 8 KiB).
TCG_RAM_PAD = 8 * 1024


@dataclass(frozen=True)
class RunPaths:
    """Where this host's QEMU for one VM keeps its sockets and serial log (inside HOME/vms/NAME)."""

    directory: Path

    @property
    def qmp(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def serial(self) -> Path:
        return self.directory / "serial.log"

    @property
    def incoming(self) -> Path:
        """Where a destination QEMU listens for the migration stream, relayed here by its daemon."""
        return self.directory / "incoming.sock"

    @property
    def outgoing(self) -> Path:
        """Where a source QEMU sends its migration stream, which its daemon relays to the destination."""
        return self.directory / "outgoing.sock"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def definition(self) -> Path:
        """The definition this QEMU was started with: a restarted daemon adopts the QEMU by it."""
        return self.directory / "definition.json"


def qemu_argv(vm: VmDefinition, paths: RunPaths, nbd_socket: Path, accel: str, *, incoming: bool = False,
              qemu: str = "qemu-system-x86_64") -> list[str]:
    """QEMU's command line: disks over the daemon's NBD Unix socket (virtio-blk, the first one booted
    from without a kernel), QMP and the serial log in ``paths``; ``accel`` already resolved to kvm or tcg.

    The serial log is appended to, so a VM that moved back keeps one continuous log per host. A
    destination starts with ``-incoming`` on a Unix socket its daemon feeds from the source's stream.
    Under TCG the RAM is TCG_RAM_PAD larger, so that a live migration keeps every guest store."""
    memory = f"{(vm.memory + TCG_RAM_PAD) // 1024}K" if accel == "tcg" else f"{vm.memory // (1024 * 1024)}M"
    argv = [qemu, "-name", vm.name, "-accel", accel, "-m", memory,
            "-smp", str(vm.cpus), "-nodefaults", "-display", "none", "-no-user-config",
            "-chardev", f"file,id=serial0,path={paths.serial},append=on", "-serial", "chardev:serial0",
            "-qmp", f"unix:{paths.qmp},server=on,wait=off", "-pidfile", str(paths.pidfile)]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    for i, disk in enumerate(vm.disks):
        node = f"disk{i}"
        blockdev = (f"driver=nbd,node-name={node},server.type=unix,server.path={nbd_socket},export={disk},"
                    f"reconnect-delay={NBD_RECONNECT_SECONDS}")
        argv += ["-blockdev", blockdev, "-device",
                 f"virtio-blk-pci,drive={node},id=vd{i}" + (",bootindex=0" if i == 0 and not vm.kernel else "")]
    if vm.kernel:
        argv += ["-kernel", vm.kernel]
        if vm.initrd:
            argv += ["-initrd", vm.initrd]
        if vm.append:
            argv += ["-append", vm.append]
    argv += list(vm.qemu_args)
    if incoming:
        argv += ["-incoming", f"unix:{paths.incoming}"]
    return argv
