"""What many test modules share: waiting for the swarm to converge, and asking a host's CLI."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import trio

from tests.daemons import Host, run

# Records spread through the DHT within a publish round; this bounds waiting for it (not a speed check).
CONVERGE_SECONDS = 60.0
MiB = 1 << 20


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = CONVERGE_SECONDS, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


async def settled(predicate: Callable[[], Any], poll: float = 0.01) -> None:
    """Return once ``predicate()`` holds, for state that no event announces (a log line, a node's own
    retry); the caller bounds the wait with ``trio.fail_after``."""
    while not predicate():  # noqa: ASYNC110 -- no event to wait for: the state is polled
        await trio.sleep(poll)


def invite(host: Host) -> str:
    return host.cli("invite").stdout.strip()


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> None:
    """Run qemu-io commands; a standby export is flagged read-only and opens only with ``read_only``."""
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", c]
    run(*args, uri)


def sync(host: Host, disk: str, *extra: str, check: bool = True) -> dict[str, Any]:
    res = host.cli("sync", disk, *extra, "--json", check=check, timeout=600)
    return json.loads(res.stdout) if res.stdout.strip() else {"error": res.stderr, "returncode": res.returncode}


def visible(host: Host, disk: str, holders: int = 1) -> bool:
    res = host.cli("status", disk, "--json", check=False)
    return res.returncode == 0 and len(json.loads(res.stdout)["disks"][0]["replicas"]) >= holders


def coverage(host: Host, disk: str) -> dict[str, float]:
    return {r["host"]: r["coverage"] for r in host.json("status", disk)["disks"][0]["replicas"]}


def as_in_a_terminal() -> None:
    """A child's Ctrl-C as in a person's terminal (``preexec_fn``): a suite started in the background by a
    shell without job control (``make test &``) runs with SIGINT ignored, which its children inherit and a
    command rightly keeps, so a test of Ctrl-C would send it to a process that never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
