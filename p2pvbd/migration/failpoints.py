"""Failpoints: a test hook that pauses the daemon at named points of a migration.

Some windows a fault test must strike in are milliseconds long (a switchover of a small disk, the
instant between a destination's commit and its answer): a test cannot hit them reliably from outside.
A daemon started with, for example::

    P2PVBD_FAILPOINTS="migrate.switchover=1.5,migrate.commit_answer=3"

pauses that many seconds at each named point, after the state a test observes (the phase in `jobs`,
the owner in `disk list`) is already visible. Nothing else changes: a pause is what a slow disk or a
busy host could do anyway. Parsing is strict: an unknown point, a malformed entry or a pause outside
(0, MAX_PAUSE_SECONDS] stops the daemon from starting, so a typo never quietly turns a fault test into
one that tests nothing. The daemon logs every point it was given, and every pause, as a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)

ENV = "P2PVBD_FAILPOINTS"
# Every point there is, and where it pauses.
POINTS = {
    "migrate.bulk": "the source, once the destination's bulk pull has started (phase bulk); the pull goes on",
    "migrate.mirror": "the source, once mirroring has started (phase mirror; in sync mode each guest write "
                      "is shipped before its acknowledgement meanwhile)",
    "migrate.switchover": "the source, once the export is frozen and fenced (phase switchover): the guest's "
                          "requests are held meanwhile",
    "migrate.commit_answer": "the destination, between making a commit durable and answering it: only the "
                             "destination knows the outcome meanwhile",
    "sync.pull": "every worker of a pull (a sync, or a migration's bulk copy at the destination), once its first "
                 "request's blocks are stored (phase pulling): the pull holds what it has meanwhile",
    "vm.ram": "the source of a VM move, once QEMU sends its memory, before relaying any of it (phase ram): the "
              "guest runs on meanwhile",
    "vm.ram_crossing": "the source of a VM move, once the destination took the first piece of QEMU's memory "
                       "stream, before it relays more (phase ram, ram_bytes above 0 in jobs): the guest runs on, "
                       "the destination's QEMU holds part of the stream",
    "vm.warm_pull": "the destination of a VM move, once it has the warm hosts' indexes of the VM's memory, "
                    "before it reads any page from them",
    "vm.switchover": "the source of a VM move, once QEMU paused the guest at pre-switchover, before the disks "
                     "switch over (phase switchover)",
    "vm.committed": "the source of a VM move, once every disk is committed to the destination, before QEMU is "
                    "told to continue (phase committed): the guest is still paused",
}
# Under the freeze watchdog's 30 s (kernel_hook_ctl.MAX_FREEZE_SECONDS), so a pause at switchover never
# thaws the guest by itself; over the source's commit timeout (10 s, migrate.COMMIT_TIMEOUT), so a pause
# of the commit's answer can outlast it.
MAX_PAUSE_SECONDS = 20.0

_active: dict[str, float] = {}


class FailpointError(ValueError):
    """P2PVBD_FAILPOINTS does not parse; the message says which entry and why."""


def parse(text: str) -> dict[str, float]:
    """``"name=seconds,…"`` to {name: seconds}; an empty string is no failpoint."""
    points: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or name not in POINTS:
            raise FailpointError(f"{ENV}: {entry!r} is not NAME=SECONDS with NAME one of {', '.join(POINTS)}")
        if name in points:
            raise FailpointError(f"{ENV}: {name} is given twice")
        try:
            seconds = float(value)
        except ValueError:
            raise FailpointError(f"{ENV}: {entry!r}: {value!r} is not a number of seconds") from None
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_PAUSE_SECONDS):
            raise FailpointError(f"{ENV}: {entry!r}: a pause is more than 0 and at most {MAX_PAUSE_SECONDS:g} s")
        points[name] = seconds
    return points


def configure(environ: Mapping[str, str]) -> dict[str, float]:
    """Activate the failpoints ``environ`` names (none when ENV is unset); raises FailpointError."""
    points = parse(environ.get(ENV, ""))
    _active.clear()
    _active.update(points)
    for name, seconds in points.items():
        log.warning("%s: pausing %g s at %s: %s (fault injection)", ENV, seconds, name, POINTS[name])
    return points


async def pause(point: str) -> None:
    """Sleep as long as ``point`` is configured to pause (not at all, normally)."""
    assert point in POINTS, point
    seconds = _active.get(point)
    if seconds:
        log.warning("failpoint %s: pausing %g s", point, seconds)
        await trio.sleep(seconds)
