"""The kernel path: export → block device (nbdfuse + loop here) → ext4 → files that survive a restart."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.daemons import Host, run

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root"),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no /dev/fuse"),
    pytest.mark.skipif(shutil.which("nbdfuse") is None, reason="nbdfuse not installed (libnbd-bin)"),
]


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "lost+found" not in p.parts}


def _attach_mount(host: Host, mnt: Path) -> str:
    dev = host.cli("attach", "vm1").stdout.strip()
    assert dev.startswith("/dev/")
    run("mount", dev, str(mnt))
    return dev


def test_ext4_on_attached_disk_survives_restart(host: Host, tmp_path: Path) -> None:
    host.cli("disk", "create", "vm1", "--size", "128M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dev = host.cli("attach", "vm1").stdout.strip()
    try:
        run("mkfs.ext4", "-q", "-F", dev)
        run("mount", dev, str(mnt))
        (mnt / "dir").mkdir()
        for i in range(20):
            (mnt / "dir" / f"file{i}").write_bytes(os.urandom(37_000 * (i + 1)))
        (mnt / "big").write_bytes(os.urandom(8 * 1024 * 1024))
        before = _checksums(mnt)
        run("umount", str(mnt))
        run("e2fsck", "-fn", dev)  # exit 0: the filesystem is clean
    finally:
        run("umount", str(mnt), check=False)
        host.cli("detach", "vm1", check=False)

    host.stop()
    host.start()
    assert host.json("verify", "vm1")["ok"]
    dev = _attach_mount(host, mnt)
    try:
        assert _checksums(mnt) == before
    finally:
        run("umount", str(mnt), check=False)
        assert host.cli("detach", "vm1").stdout.strip() == f"detached {dev}"
    assert str(host.home) not in run("losetup", "-a").stdout  # no loop device left on this host's mount


def test_attach_twice_is_refused_with_a_message(host: Host) -> None:
    host.cli("disk", "create", "vm1", "--size", "16M")
    host.cli("attach", "vm1")
    try:
        again = host.cli("attach", "vm1", check=False)
        assert again.returncode == 1
        assert "already attached" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        host.cli("detach", "vm1")
    gone = host.cli("detach", "vm1", check=False)
    assert gone.returncode == 1 and "not attached" in gone.stderr
