"""Does KVM actually run guests here? `--accel auto` asks by booting three instructions.

/dev/kvm can exist and open while guests crawl or hang in early boot (nested virtualisation that traps
everything, for one). So the probe boots a 512-byte boot sector that writes to QEMU's isa-debug-exit
port (QEMU then exits with status (1 << 1) | 1 = 3), first under TCG as the reference, then under KVM.
KVM is used only if it gets there too and not much slower than emulation does: on a machine where it
works it takes a fraction of TCG's time, where it is broken many times more (4-10 s against 0.2 s).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

import trio

log = logging.getLogger(__name__)

# mov al, 1; out 0xf4, al; hlt; jmp $-1 — then the boot signature at byte 510.
BOOT_SECTOR = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD]).ljust(510, b"\0") + b"\x55\xaa"
DEBUG_EXIT_STATUS = 3
# SeaBIOS reaches a boot sector in well under a second either way; this bounds a probe that hangs.
PROBE_TIMEOUT = 10.0
# KVM may take this many times TCG's probe time (plus the floor below, for QEMU's own start-up jitter)
# and still count as working.
KVM_SLOWER_FACTOR = 2.0
KVM_SLACK_SECONDS = 0.5


async def kvm_boots(qemu: str) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    t0 = trio.current_time()
    tcg = kvm = False
    with trio.move_on_after(PROBE_TIMEOUT) as probe:
        tcg = await boots(qemu, "tcg")
    if probe.cancelled_caught:
        log.info("tcg did not boot a probe sector within %.1f s: not used", PROBE_TIMEOUT)
    if not tcg:
        return False  # no reference: QEMU itself does not run here
    allowed = (trio.current_time() - t0) * KVM_SLOWER_FACTOR + KVM_SLACK_SECONDS
    with trio.move_on_after(allowed) as probe:
        kvm = await boots(qemu, "kvm")
    if probe.cancelled_caught:
        log.info("kvm did not boot a probe sector within %.1f s: not used", allowed)
    return kvm


async def boots(qemu: str, accel: str) -> bool:
    """Whether QEMU with ``accel`` runs the probe's boot sector to its end (the caller bounds how long)."""
    tmp = await trio.to_thread.run_sync(_probe_dir)
    try:
        image = Path(tmp.name) / "boot.img"
        argv = [qemu, "-accel", accel, "-nodefaults", "-display", "none", "-no-user-config", "-m", "16M",
                "-drive", f"file={image},format=raw,if=ide", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        try:
            res = await trio.run_process(argv, check=False, stdin=subprocess.DEVNULL,
                                         capture_stdout=True, capture_stderr=True)
        except OSError as e:
            log.warning("cannot run %s to probe %s: %s", qemu, accel, e)
            return False
        return res.returncode == DEBUG_EXIT_STATUS
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(tmp.cleanup)


def _probe_dir() -> tempfile.TemporaryDirectory[str]:
    """A private directory holding the boot sector as a disk image."""
    tmp = tempfile.TemporaryDirectory(prefix="p2pvbd-accel-")
    (Path(tmp.name) / "boot.img").write_bytes(BOOT_SECTOR)
    return tmp
