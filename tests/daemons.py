"""Real daemons in subprocesses, one home directory each: the hosts of end-to-end tests."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

BIN = str(Path(sys.executable).parent / "p2pvbd")
REPO = Path(__file__).resolve().parent.parent  # where `python -m tests.lying_peer` finds the tests package
# Starting a daemon is quick; this bounds a broken start, it is not a speed assertion.
READY_SECONDS = 30.0
# On SIGTERM a test daemon quits its QEMUs at once (`daemon --vm-timeout`): the test guest ignores the ACPI
# button unless told otherwise, and a test's teardown need not wait for it.
TEST_VM_TIMEOUT = 0.0


# A host alone in its network namespace has every port to itself.
PEER_PORT_IN_NAMESPACE = 7420
# Ports handed to test hosts come from this range, away from the kernel's ephemeral range (32768+).
PORT_RANGE = (20000, 30000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port P with TCP P, UDP P (the DHT) and TCP P+1 (joins) all free on ``host``."""
    for _ in range(200):
        port = random.randrange(*PORT_RANGE)
        socks = []
        try:
            for kind, p in ((socket.SOCK_STREAM, port), (socket.SOCK_DGRAM, port), (socket.SOCK_STREAM, port + 1)):
                s = socket.socket(socket.AF_INET, kind)
                socks.append(s)
                s.bind((host, p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port found")


class Host:
    """A p2pvbd host: a home directory and (while running) its daemon process."""

    def __init__(self, home: Path, name: str, *extra_init: str, join: str | None = None,
                 prefix: list[str] | None = None, address: str = "127.0.0.1") -> None:
        self.home = home
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        # Commands and the daemon run behind this, e.g. ["ip", "netns", "exec", NS] for a namespace.
        self.prefix: list[str] = prefix or []
        self.port = free_port() if address == "127.0.0.1" else PEER_PORT_IN_NAMESPACE
        listen = ["--listen", f"{address}:{self.port}"] if "--listen" not in extra_init else []
        if join is None:
            self.cli("init", name, *listen, *extra_init)
        else:
            self.cli("join", join, name, *listen, *extra_init)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*self.prefix, BIN, *args, "--home", str(self.home)], capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"p2pvbd {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self, env: dict[str, str] | None = None, liar: bool = False, nofile: int | None = None,
              vm_timeout: float = TEST_VM_TIMEOUT) -> Host:
        """Start the daemon; ``liar``: as tests/lying_peer.py, which corrupts every block it serves;
        ``nofile``: its soft and hard limit on open descriptors (a service manager's limits); ``vm_timeout``:
        how long its guests may take to power off when it gets SIGTERM."""
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.home / "daemon.log", "ab")  # noqa: SIM115 - owned by the child
        program = [sys.executable, "-m", "tests.lying_peer"] if liar else [BIN]
        self.proc = subprocess.Popen([*self.prefix, *program, "daemon", "--home", str(self.home), "-v",
                                      "--vm-timeout", str(vm_timeout)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO,
                                     env={**os.environ, **(env or {})},
                                     preexec_fn=None if nofile is None else partial(_limit_descriptors, nofile))
        log.close()
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon of {self.name} exited: {self.log_tail()}")
            if self.cli("disk", "list", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        raise AssertionError(f"daemon of {self.name} did not come up: {self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.home / "daemon.log").read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=READY_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon of {self.name} ignored SIGTERM") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def nbd_socket(self) -> str:
        return str(self.home / "nbd.sock")

    def uri(self, disk: str) -> str:
        return f"nbd+unix:///{disk}?socket={self.nbd_socket}"


def _limit_descriptors(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def run(*cmd: str, check: bool = True, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a real tool; on failure show what it said."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


# What qemu-io prints when a standby export refuses a write: "Permission denied" when it refuses to open an export
# flagged NBD_FLAG_READ_ONLY read-write, "Operation not permitted" (EPERM) for a write on a connection that was
# told the export was writable.
WRITE_REFUSALS = ("Permission denied", "Operation not permitted")


def write_refused(res: subprocess.CompletedProcess[str]) -> bool:
    """Whether a qemu-io write was refused by the export (not failed for some other reason)."""
    return res.returncode != 0 and any(r in res.stdout + res.stderr for r in WRITE_REFUSALS)


def system_python() -> str:
    """python3-libnbd is a Debian package: it imports only under the system interpreter."""
    return "/usr/bin/python3"


def env_without_venv() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env
