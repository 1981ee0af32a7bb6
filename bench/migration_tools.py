"""Helpers of bench/migration.py: images, load, detaching, py-spy, and which code a run measured."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from multipeer_pull import daemon_pid
from py_spy_summary import stop_spies

from tests.daemons import BIN, Host

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SPY = Path(sys.executable).parent / "py-spy"
DETACH_RETRIES = 10  # x 0.5 s: the loop device lets go of the FUSE file a moment after `losetup -d`


def loadavg() -> float:
    """The 1-minute load average: the machine is shared, so every result carries it."""
    return round(os.getloadavg()[0], 2)


def make_image(path: Path, size: int) -> Path:
    """Random bytes: zstd gains nothing on them, so every stale byte crosses the link."""
    with open(path, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))
    return path


def detach(host: Host, disk: str) -> None:
    """``p2pvbd detach``, then make sure the FUSE mount is gone (retry, then lazily) so the home can go."""
    res = subprocess.run([BIN, "detach", disk, "--home", str(host.home)], capture_output=True, text=True, timeout=120)
    if res.returncode:
        print(f"  p2pvbd detach failed: {res.stderr.strip()}", flush=True)
    fuse_dir = host.home / "attach" / disk
    for attempt in range(DETACH_RETRIES):
        if not os.path.ismount(fuse_dir):
            return
        if attempt == 0:
            print(f"  {fuse_dir} still mounted after detach; unmounting it", flush=True)
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True, timeout=60)
        time.sleep(0.5)
    subprocess.run(["fusermount3", "-uz", str(fuse_dir)], capture_output=True, timeout=60)


# ---- profiling -------------------------------------------------------------------------------------
@contextlib.contextmanager
def spying(hosts: dict[str, Host], spy_dir: Path | None, tag: str, names: tuple[str, ...]) -> Iterator[None]:
    """py-spy (raw, --threads --idle) on the source's and destination's daemons while the block runs."""
    if spy_dir is None:
        yield
        return
    spy_dir.mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen([str(SPY), "record", "--format", "raw", "--threads", "--idle", "--rate", "100",
                               "--pid", str(daemon_pid(hosts[name])), "--output", str(spy_dir / f"{tag}-{name}.txt")],
                              stdout=subprocess.DEVNULL, stderr=open(spy_dir / f"{tag}-{name}.spy.log", "wb"))  # noqa: SIM115
             for name in names]
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        stop_spies(spies)
        for name in names:  # the daemons' debug logs, to line phases up with the profile
            with contextlib.suppress(OSError):
                shutil.copy(hosts[name].home / "daemon.log", spy_dir / f"{tag}-{name}.log")


def code_id() -> str:
    """HEAD plus a digest of p2pvbd/*.py as the daemons started (others may change the tree during a run)."""
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted((ROOT / "p2pvbd").rglob("*.py")))).hexdigest()
    return f"{git_head().split()[0]}+{digest[:8]}"


def git_head() -> str:
    res = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cI"], capture_output=True, text=True)
    return res.stdout.strip()
