"""The demo's machines: network namespaces joined by 100 Mbit links as root, loopback ports otherwise.

Each machine has a home directory and runs every command in its own network namespace (when there is
one). The transcript shows a command as ``office-pc$ p2pvbd status``; one line per machine says what
that prompt stands for (``P2PVBD_HOME=… ip netns exec …``), so every line can be typed as shown.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the network harness lives in tests/

from p2pvbd.base.listen_check import listen_problem  # noqa: E402
from tests.daemons import PEER_PORT_IN_NAMESPACE, free_port  # noqa: E402
from tests.netns import PREFIX, Network, unavailable_reason  # noqa: E402

BIN = Path(sys.executable).parent / "p2pvbd"
# Each machine's link to the others, both directions: a typical home or office ethernet/fibre line.
LINK_RATE = "100mbit"
# The demo's settings, for running it beside daemons or namespaces that already use the defaults.
PORT_ENV = "P2PVBD_DEMO_PORT"
NETNS_PREFIX_ENV = "P2PVBD_DEMO_NETNS_PREFIX"
# On loopback the machines take PORT, PORT+10, PORT+20: each uses P and P+1 (joins), with room to spare.
LOOPBACK_PORT_STEP = 10
# The last machine's join port (P+1 of PORT+20) must still be a port.
MAX_DEMO_PORT = 65535 - 21
# A daemon answers on its control socket within moments; this bounds a broken start on a busy machine.
READY_SECONDS = 30.0
# Swarm records (a new disk, a new replica) spread through the index within a publish round or two.
SPREAD_SECONDS = 60.0


class DemoError(Exception):
    """A step of the story failed; the message says which and why."""


def style(code: str, text: str) -> str:
    """ANSI style on a terminal; plain text in a log."""
    return f"\033[{code}m{text}\033[0m" if sys.stdout.isatty() else text


def say(text: str) -> None:
    print("\n" + style("1", f"== {text}"), flush=True)


def note(text: str) -> None:
    print(style("2", f"# {text}"), flush=True)


def network_mode(force_loopback: bool) -> tuple[bool, str]:
    """Whether to use namespaces, and why (or why not)."""
    if force_loopback:
        return False, "loopback requested"
    reason = unavailable_reason()
    if reason is None:
        return True, "running as root with ip and tc available"
    return False, f"network namespaces unavailable: {reason}"


class Machine:
    """One of the user's computers: a home directory, maybe a namespace, and its daemon."""

    def __init__(self, name: str, home: Path, prefix: list[str], address: str, port: int) -> None:
        self.name, self.home, self.prefix, self.address, self.port = name, home, prefix, address, port
        self.env = {**os.environ, "P2PVBD_HOME": str(home)}
        self.daemon: subprocess.Popen[bytes] | None = None

    def explain(self) -> None:
        where = f" {shlex.join(self.prefix)}" if self.prefix else ""
        note(f"'{self.name}$ CMD' runs: P2PVBD_HOME={self.home}{where} CMD")

    def argv(self, cmd: tuple[str | Path, ...]) -> list[str]:
        return [*self.prefix, *(str(c) for c in cmd)]

    def show(self, cmd: tuple[str | Path, ...], background: bool = False) -> None:
        shown = shlex.join(str(c) for c in cmd).replace(str(BIN), "p2pvbd").replace(str(REPO) + "/", "")
        print(f"{style('36', self.name + '$')} {shown}{' &' if background else ''}", flush=True)

    def run(self, *cmd: str | Path, check: bool = True) -> str:
        """Show a command, run it here and print what it says; its stdout is returned."""
        self.show(cmd)
        res = subprocess.run(self.argv(cmd), capture_output=True, text=True, env=self.env)
        out = (res.stdout + res.stderr).rstrip()
        if out:
            print(out, flush=True)
        if check and res.returncode != 0:
            raise DemoError(f"{self.name}: {shlex.join(map(str, cmd))} exited with {res.returncode}")
        return res.stdout.strip()

    def query(self, *args: str) -> Any:
        """A p2pvbd query the story relies on but does not print (waiting, reading numbers)."""
        res = subprocess.run(self.argv((BIN, *args, "--json")), capture_output=True, text=True, env=self.env)
        return json.loads(res.stdout) if res.returncode == 0 and res.stdout.strip() else None

    def background(self, *cmd: str | Path, **kw: Any) -> subprocess.Popen[bytes]:
        self.show(cmd, background=True)
        return subprocess.Popen(self.argv(cmd), env=self.env, stdin=subprocess.DEVNULL, **kw)

    def init(self, inviter: Machine | None) -> None:
        listen = f"{self.address}:{self.port}"
        if inviter is None:
            self.run(BIN, "init", self.name, "--listen", listen)
        else:
            self.run(BIN, "join", inviter.run(BIN, "invite", "--ttl", "10m"), self.name, "--listen", listen)

    def start(self) -> None:
        self.daemon = self.background(BIN, "daemon", "--log-file", self.home / "daemon.log")
        wait_until(lambda: self.query("disk", "list") is not None, READY_SECONDS, f"the daemon of {self.name}",
                   lambda: self.daemon is not None and self.daemon.poll() is not None)

    def stop(self) -> None:
        """SIGTERM, as `p2pvbd stop` would: the daemon flushes and closes its disks."""
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(timeout=READY_SECONDS)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def uri(self, disk: str) -> str:
        return f"nbd+unix:///{disk}?socket={self.home / 'nbd.sock'}"



def log_tail(home: Path, lines: int = 10) -> str:
    """The last lines p2pvbd itself logged (the index library's chatter says little about a failure)."""
    try:
        own = [line for line in (home / "daemon.log").read_text().splitlines() if " kademlia." not in line]
    except OSError:
        return "(no log)"
    return "\n".join(own[-lines:])


def wait_until(ready: Callable[[], bool], seconds: float, what: str,
               failed: Callable[[], bool] = lambda: False) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if failed() or time.monotonic() > deadline:
            raise DemoError(f"gave up waiting for {what}")
        time.sleep(0.2)


def demo_settings(environ: Mapping[str, str]) -> tuple[int | None, str]:
    """The peer port (P2PVBD_DEMO_PORT; None: 7420 in namespaces, free ports on loopback) and the
    namespace name prefix (P2PVBD_DEMO_NETNS_PREFIX), so the demo runs beside anything using the defaults."""
    port_text = environ.get(PORT_ENV, "")
    port = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) <= MAX_DEMO_PORT:
            raise DemoError(f"{PORT_ENV}={port_text!r}: a port from 1 to {MAX_DEMO_PORT}")
        port = int(port_text)
    prefix = environ.get(NETNS_PREFIX_ENV, PREFIX)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,12}", prefix):
        raise DemoError(f"{NETNS_PREFIX_ENV}={prefix!r}: 1-12 letters, digits, '_', '.' or '-'")
    return port, prefix


def make_machines(names: list[str], work: Path, use_netns: bool, stack: ExitStack) -> list[Machine]:
    """The machines, not yet initialised; `stack` stops their daemons and removes their namespaces."""
    port, prefix = demo_settings(os.environ)
    machines: list[Machine] = []
    net = stack.enter_context(Network(prefix=prefix)) if use_netns else None
    stack.callback(lambda: [m.stop() for m in machines])  # runs before the network goes away
    for i, name in enumerate(names):
        if net is not None:
            ns = net.add_host(name, upload=LINK_RATE, download=LINK_RATE)
            machines.append(Machine(name, work / name, ns.exec_prefix(), ns.address, port or PEER_PORT_IN_NAMESPACE))
        else:
            mine = free_port() if port is None else port + i * LOOPBACK_PORT_STEP
            if port is not None and (problem := listen_problem(f"127.0.0.1:{mine}")) is not None:
                raise DemoError(f"port {mine} of {PORT_ENV}={port} cannot be used ({problem}): choose another")
            machines.append(Machine(name, work / name, [], "127.0.0.1", mine))
    return machines
