"""Connect an export to a kernel block device, with whatever this machine has.

With the kernel's nbd module, ``nbd-client`` gives a /dev/nbdN. Without it (many desktops and
containers), nbdfuse exposes the export as a file and ``losetup`` turns that file into /dev/loopN.
Each attachment is recorded in HOME/attach/DISK.json so ``detach`` can undo exactly what was done.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from p2pvbd.base.home import Home

ATTACH_DIR = "attach"
# nbdfuse writes its pid file once the FUSE mount serves; connecting is local, so seconds suffice.
NBDFUSE_READY_SECONDS = 15.0
# How long detach waits for nbdfuse to exit after the unmount.
NBDFUSE_EXIT_SECONDS = 10.0
POLL_SECONDS = 0.05
# `losetup -d` detaches asynchronously; on a busy host the loop device kept its file for ~1 s at most.
LOOP_RELEASE_SECONDS = 10.0
# /dev/nbd0../dev/nbd15 is the kernel module's default (nbds_max=16).
NBD_DEVICES = 16


class AttachError(Exception):
    """Attaching or detaching failed; the message says what to do."""


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise AttachError(f"{cmd[0]} is not installed") from e
    if res.returncode != 0:
        raise AttachError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.returncode}")
    return res.stdout.strip()


def _state_path(home: Home, disk: str) -> Path:
    return home.path / ATTACH_DIR / f"{disk}.json"


def has_nbd_module() -> bool:
    return Path("/sys/module/nbd").is_dir() and shutil.which("nbd-client") is not None


def _free_nbd_device() -> str:
    for i in range(NBD_DEVICES):
        if not Path(f"/sys/block/nbd{i}/pid").exists():
            return f"/dev/nbd{i}"
    raise AttachError("no free /dev/nbdN device")


def attach(home: Home, disk: str, device: str | None = None) -> str:
    """Attach ``disk`` and return the block device path."""
    state = _state_path(home, disk)
    if state.exists():
        raise AttachError(f"{disk} is already attached as {json.loads(state.read_text())['device']}")
    if os.geteuid() != 0:
        raise AttachError("attaching a block device needs root")
    state.parent.mkdir(exist_ok=True)
    if has_nbd_module():
        dev = device or _free_nbd_device()
        _run(["nbd-client", "-unix", str(home.nbd_socket), "-N", disk, dev])
        record = {"disk": disk, "method": "nbd-client", "device": dev}
    else:
        if device is not None:
            raise AttachError("--device needs the kernel nbd module, which this machine lacks (using nbdfuse + loop)")
        record = _attach_nbdfuse(home, disk)
    state.write_text(json.dumps(record))
    return str(record["device"])


def _attach_nbdfuse(home: Home, disk: str) -> dict[str, object]:
    if shutil.which("nbdfuse") is None:
        raise AttachError("neither the nbd kernel module nor nbdfuse is available (apt-get install libnbd-bin fuse3)")
    mnt = home.path / ATTACH_DIR / disk
    mnt.mkdir(parents=True, exist_ok=True)
    pidfile = mnt.with_suffix(".pid")
    pidfile.unlink(missing_ok=True)
    log = open(mnt.with_suffix(".log"), "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mnt), home.nbd_uri(disk)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    deadline = time.monotonic() + NBDFUSE_READY_SECONDS
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AttachError(f"nbdfuse could not serve {disk}: see {mnt.with_suffix('.log')}")
        time.sleep(POLL_SECONDS)
    try:
        loop = _run(["losetup", "--find", "--show", str(mnt / "nbd")])
    except AttachError:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        raise
    return {"disk": disk, "method": "nbdfuse", "device": loop, "mount": str(mnt), "pid": proc.pid}


def detach(home: Home, disk: str) -> str:
    """Undo attach; returns the device that was detached."""
    state = _state_path(home, disk)
    if not state.exists():
        raise AttachError(f"{disk} is not attached")
    record = json.loads(state.read_text())
    if record["method"] == "nbd-client":
        _run(["nbd-client", "-d", record["device"]])
    else:
        _run(["losetup", "-d", record["device"]])
        _unmount_when_released(record["device"], record["mount"])
        deadline = time.monotonic() + NBDFUSE_EXIT_SECONDS
        while _alive(int(record["pid"])) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
    state.unlink()
    return str(record["device"])


def _unmount_when_released(loop: str, mount: str) -> None:
    """Unmount nbdfuse once the loop device lets go of its file: ``losetup -d`` only asks the kernel to
    detach, and while the loop device still holds the file, fusermount fails with "busy"."""
    backing = Path("/sys/block") / Path(loop).name / "loop" / "backing_file"
    deadline = time.monotonic() + LOOP_RELEASE_SECONDS
    while True:
        res = subprocess.run(["fusermount3", "-u", mount], capture_output=True, text=True)
        if res.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AttachError(f"fusermount3 -u {mount} failed: {res.stderr.strip()}"
                              + (f" ({loop} still holds it)" if backing.exists() else ""))
        time.sleep(POLL_SECONDS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our child that nobody reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
