"""The real-QEMU test guest works end to end: it boots under TCG, writes records to an NBD disk, and a
second boot verifies every acknowledged one is on the disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.vm_guest import QemuGuest, build_initramfs, guest_kernel, qemu_nbd

pytestmark = pytest.mark.heavy

DISK_BYTES = 64 * 1024 * 1024
SLOTS = 1024


def test_guest_writes_then_verifies_every_acknowledged_record(tmp_path: Path) -> None:
    kernel = guest_kernel()
    initrd = build_initramfs(tmp_path)
    image, sock = tmp_path / "disk.raw", tmp_path / "nbd.sock"
    with image.open("wb") as f:
        f.truncate(DISK_BYTES)
    server = qemu_nbd(image, sock, "vm1")
    try:
        writer = QemuGuest(tmp_path / "writer", kernel, initrd, sock, "vm1", workload="write", slots=SLOTS).start()
        try:
            writer.wait_for(writer.ready, "GUEST READY")
            boot_s = time.monotonic() - writer.started
            writer.wait_for(lambda: writer.acked() >= 20, "20 acknowledged records")
            (k0, ms0), (k1, ms1) = writer.alive()[0], writer.alive()[-1]
            rate = (k1 - k0) * 1000 / max(ms1 - ms0, 1)
            assert writer.errors() == []
            writer.quit()
            acked = writer.acked()  # after quit: nothing more can be acknowledged
        finally:
            writer.kill()
        print(f"boot to GUEST READY {boot_s:.1f}s, ~{rate:.0f} records/s, {acked} acknowledged")

        checker = QemuGuest(tmp_path / "checker", kernel, initrd, sock, "vm1", workload="verify",
                            slots=SLOTS, acked=acked).start()
        try:
            result = checker.wait_for(checker.verify_result, "the VERIFY line")
            assert checker.wait_exit() == 0, "the guest powers QEMU off after verifying"
        finally:
            checker.kill()
        assert result["bad"] == 0, checker.diagnostics()
        assert result["stale"] == 0, checker.diagnostics()
        assert result["maxseq"] >= acked
        assert result["ok"] == result["maxseq"]  # no wrap-around yet: one slot per record written
    finally:
        server.terminate()
        server.wait()
