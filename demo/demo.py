"""`make demo`: the single-host story, told with real commands.

A host is initialised, its daemon started, a disk created; a real NBD client (qemu-io) writes to the
disk through the daemon's export and reads it back; then `status` and `verify` show what the store
recorded. Every command printed is one a user could type.
"""

from __future__ import annotations

import json
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "p2pvbd"
# The daemon answers on its control socket within moments; this is a generous bound.
DAEMON_READY_SECONDS = 20.0
# Loopback ports of the demo's hosts (peers on TCP and the index on UDP; joins on the next port).
OFFICE_PC_PORT = 27420
HOME_PC_PORT = 27430
CAR_PC_PORT = 27440
# python3-libnbd is a Debian package: it imports only under the system interpreter.
SYSTEM_PYTHON = "/usr/bin/python3"
WORKLOAD = Path(__file__).resolve().parent.parent / "tests" / "workload.py"
# The guest writes whole 64 KiB blocks among the first 256 (16 MiB) of the disk.
GUEST_BLOCK = 64 * 1024
GUEST_BLOCKS = 256


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*cmd: str | Path, check: bool = True) -> str:
    shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(str(BIN), "p2pvbd")
    print(f"$ {shown}", flush=True)
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    out = (res.stdout + res.stderr).rstrip()
    if out:
        print(out, flush=True)
    if check and res.returncode != 0:
        raise SystemExit(f"demo failed: {shown} exited with {res.returncode}")
    return res.stdout.strip()


def wait_for_daemon(home: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DAEMON_READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited early; see {home / 'daemon.log'}")
        if subprocess.run([BIN, "--home", home, "disk", "list"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit("the daemon did not come up")


def wait_for_disk(home: Path, disk: str) -> None:
    """Records spread through the swarm's index within a publish round."""
    deadline = time.monotonic() + DAEMON_READY_SECONDS
    while time.monotonic() < deadline:
        res = subprocess.run([BIN, "--home", home, "status", disk, "--json"], capture_output=True)
        if res.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"{disk} did not show up on {home.name}")


def start_host(work: Path, name: str, port: int, daemons: list[subprocess.Popen[bytes]],
               token: str | None = None) -> Path:
    home = work / name
    if token is None:
        run(BIN, "init", name, "--listen", f"127.0.0.1:{port}", "--home", home)
    else:
        run(BIN, "join", token, name, "--listen", f"127.0.0.1:{port}", "--home", home)
    print(f"$ p2pvbd daemon --home {home} &", flush=True)
    daemons.append(subprocess.Popen([BIN, "daemon", "--home", home, "--log-file", home / "daemon.log"]))
    wait_for_daemon(home, daemons[-1])
    return home


def start_guest(uri: str, work: Path) -> subprocess.Popen[bytes] | None:
    """The verifying guest (tests/workload.py on libnbd), when the system Python has libnbd."""
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0:
        print("# (python3-libnbd is missing: the migration runs without a writing guest)")
        return None
    guest = subprocess.Popen([SYSTEM_PYTHON, str(WORKLOAD), uri, str(work / "stop"), str(work / "guest.json"),
                              "--blocks", str(GUEST_BLOCKS), "--pause", "0.005"])
    deadline = time.monotonic() + DAEMON_READY_SECONDS
    while not (work / "guest.json.ready").exists():
        if guest.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the guest workload could not connect")
        time.sleep(0.05)
    return guest


def check_guest(guest: subprocess.Popen[bytes], work: Path, before: bytes, car_uri: str) -> None:
    """Rebuild what the guest was promised and compare it with car-pc's disk."""
    (work / "stop").touch()
    guest.wait(timeout=120)
    report = json.loads((work / "guest.json").read_text())
    model = bytearray(before)
    for block, seq in report["acked"].items():
        b = int(block)
        head = struct.pack(">QQ", b, seq)
        model[b * GUEST_BLOCK:(b + 1) * GUEST_BLOCK] = (head * (GUEST_BLOCK // len(head)))
    (work / "model.raw").write_bytes(bytes(model))
    print(f"# the guest wrote {report['writes']} blocks during the migration, saw {len(report['errors'])} errors")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(work / "model.raw"), car_uri)
    if report["errors"] or not report["reads_ok"]:
        raise SystemExit("the guest saw errors")


def main() -> None:
    for tool in ("qemu-io", "qemu-img", "nbdinfo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the demo needs {tool} (apt-get install qemu-utils libnbd-bin)")
    work = Path(tempfile.mkdtemp(prefix="p2pvbd-demo-"))
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        say("1. office-pc: a new swarm, its daemon, a 64 MiB disk with data")
        office = start_host(work, "office-pc", OFFICE_PC_PORT, daemons)
        run(BIN, "disk", "create", "vm1", "--size", "64M", "--home", office)
        uri = run(BIN, "nbd-uri", "vm1", "--home", office)
        print(f"# a VM would use: qemu-system-x86_64 -drive file={uri},format=raw,if=virtio ...")
        run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 24M", "-c", "write -z 24M 8M", "-c", "flush", uri)
        run("nbdinfo", "--map", uri)

        say("2. home-pc joins and pulls a replica; then office-pc writes more (home-pc is partly stale)")
        home = start_host(work, "home-pc", HOME_PC_PORT, daemons,
                          run(BIN, "invite", "--ttl", "10m", "--home", office))
        wait_for_disk(home, "vm1")
        run(BIN, "sync", "vm1", "--home", home)
        run("qemu-io", "-f", "raw", "-c", "write -P 0xcd 0 4M", "-c", "write -P 0xef 40M 8M", "-c", "flush", uri)

        say("3. car-pc joins: it holds nothing yet")
        car = start_host(work, "car-pc", CAR_PC_PORT, daemons, run(BIN, "invite", "--ttl", "10m", "--home", office))
        run(BIN, "peers", "--home", car)
        wait_for_disk(car, "vm1")
        run(BIN, "status", "--home", car)

        say("4. A guest writes to vm1 on office-pc while vm1 moves to car-pc")
        before = Path(work / "before.raw")
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(before))
        guest = start_guest(uri, work)
        run(BIN, "migrate", "vm1", "--to", "car-pc", "--home", office)
        time.sleep(0.5)  # the guest's connection to office-pc is forwarded to car-pc now

        say("5. Afterwards: car-pc owns vm1, holds all of it, and has every write the guest was promised")
        car_uri = run(BIN, "nbd-uri", "vm1", "--home", car)
        if guest is not None:
            check_guest(guest, work, before.read_bytes(), car_uri)
        run(BIN, "status", "--home", car)
        run(BIN, "verify", "vm1", "--home", car)
        refused = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri, check=False)
        print(f"# a new writer on office-pc is refused: {'Operation not permitted' in refused}")
        run(BIN, "stop", "--home", office)
        print("# office-pc is gone; car-pc does not care:")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "read -P 0x77 0 1M", car_uri)
        say("Done: vm1 moved from office-pc to car-pc under a writing guest, pulled from two peers at once.")
    finally:
        for daemon in daemons:
            if daemon.poll() is None:
                daemon.terminate()
                daemon.wait(timeout=DAEMON_READY_SECONDS)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
