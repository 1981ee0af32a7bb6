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


def main() -> None:
    for tool in ("qemu-io", "nbdinfo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the demo needs {tool} (apt-get install qemu-utils libnbd-bin)")
    work = Path(tempfile.mkdtemp(prefix="p2pvbd-demo-"))
    home = work / "office-pc"
    daemon = None
    try:
        say("1. Create this host's identity")
        run(BIN, "init", "office-pc", "--home", home)

        say("2. Start its daemon (in the background)")
        print(f"$ p2pvbd daemon --home {home} &", flush=True)
        daemon = subprocess.Popen([BIN, "daemon", "--home", home, "--log-file", home / "daemon.log"])
        wait_for_daemon(home, daemon)

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

        say("7. Stop the daemon; start it again: the data and versions are still there")
        run(BIN, "stop", "--home", home)
        daemon.wait(timeout=DAEMON_READY_SECONDS)
        daemon = subprocess.Popen([BIN, "daemon", "--home", home, "--log-file", home / "daemon.log"])
        wait_for_daemon(home, daemon)
        run("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 8M", uri)
        run(BIN, "status", "vm1", "--json", "--home", home)
        say("Done: the disk was written, read back, verified and survived a restart.")
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait(timeout=DAEMON_READY_SECONDS)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
