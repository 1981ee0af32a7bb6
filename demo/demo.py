"""`make demo`: the single-host story, told with real commands.

A host is initialised, its daemon started, a disk created; a real NBD client (qemu-io) writes to the
disk through the daemon's export and reads it back; then `status` and `verify` show what the store
recorded. Every command printed is one a user could type.
"""

from __future__ import annotations

import shlex
import shutil
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


def main() -> None:
    for tool in ("qemu-io", "nbdinfo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the demo needs {tool} (apt-get install qemu-utils libnbd-bin)")
    work = Path(tempfile.mkdtemp(prefix="p2pvbd-demo-"))
    home = work / "office-pc"
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        say("1. Create this host's identity")
        run(BIN, "init", "office-pc", "--listen", f"127.0.0.1:{OFFICE_PC_PORT}", "--home", home)

        say("2. Start its daemon (in the background)")
        print(f"$ p2pvbd daemon --home {home} &", flush=True)
        daemons.append(subprocess.Popen([BIN, "daemon", "--home", home, "--log-file", home / "daemon.log"]))
        wait_for_daemon(home, daemons[0])

        say("3. Create a 256 MiB disk and find its NBD URI")
        run(BIN, "disk", "create", "vm1", "--size", "256M", "--home", home)
        uri = run(BIN, "nbd-uri", "vm1", "--home", home)
        print(f"# a VM would use: qemu-system-x86_64 -drive file={uri},format=raw,if=virtio ...")

        say("4. A real NBD client writes through the export: every write is versioned")
        run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 8M", "-c", "write -P 0xcd 64M 1M",
            "-c", "write -z 128M 4M", "-c", "flush", uri)
        run("nbdinfo", "--map", uri)

        say("5. Read it back and check the pattern")
        run("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 8M", "-c", "read -P 0xcd 64M 1M",
            "-c", "read -P 0 128M 4M", uri)

        say("6. What the host knows about its disks")
        run(BIN, "status", "--home", home)
        run(BIN, "verify", "vm1", "--home", home)

        say("7. A second machine joins the swarm with a one-time token")
        token = run(BIN, "invite", "--ttl", "10m", "--home", home)
        other = work / "home-pc"
        run(BIN, "join", token, "home-pc", "--listen", f"127.0.0.1:{HOME_PC_PORT}", "--home", other)
        print(f"$ p2pvbd daemon --home {other} &", flush=True)
        daemons.append(subprocess.Popen([BIN, "daemon", "--home", other, "--log-file", other / "daemon.log"]))
        wait_for_daemon(other, daemons[-1])
        run(BIN, "peers", "--home", other)
        wait_for_disk(other, "vm1")
        run(BIN, "status", "--home", other)

        say("8. Stop office-pc's daemon; start it again: the data and versions are still there")
        run(BIN, "stop", "--home", home)
        daemons[0].wait(timeout=DAEMON_READY_SECONDS)
        daemons[0] = subprocess.Popen([BIN, "daemon", "--home", home, "--log-file", home / "daemon.log"])
        wait_for_daemon(home, daemons[0])
        run("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 8M", uri)
        run(BIN, "status", "vm1", "--json", "--home", home)
        say("Done: the disk was written, read back, verified, seen from a second host and survived a restart.")
    finally:
        for daemon in daemons:
            if daemon.poll() is None:
                daemon.terminate()
                daemon.wait(timeout=DAEMON_READY_SECONDS)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
