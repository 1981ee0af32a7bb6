"""Cancelling a job a person started (`jobs cancel ID`, Ctrl-C in `sync` or `migrate`).

A job can be cancelled until its commit starts, and only then: before it, cancelling leaves everything
as it was (a migration's source still owns the disk and serves its guest; a sync keeps the blocks it
already stored, each valid at its version). From the commit on (a disk's switchover, a VM's pause at
QEMU's pre-switchover), the hand-over cannot be undone halfway, so the job is left to finish.

Pure bookkeeping and wording here; the daemon owns the jobs and run_job (jobs.py) the cancel scope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

# The phases in which a job's commit has started, by kind of job (a sync never commits anything: every
# block it stores is valid on its own). A migration's switchover writes the pending marker and fences
# the export; a VM move's switchover pauses the guest at QEMU's pre-switchover and switches the disks.
COMMIT_PHASES: dict[str, frozenset[str]] = {
    "sync": frozenset(),
    "migration": frozenset({"switchover", "done"}),
    "vm move": frozenset({"switchover", "committed", "done"}),
}
# What a person is told when the commit has started: the CLI prints it as it is.
COMMITTING = {"sync": "the sync is done",
              "migration": "the commit has started; migration will finish",
              "vm move": "the switchover has started; the VM move will finish"}


@dataclass
class JobCancel:
    """One job's way to be cancelled: the cancel scope its work runs in, and what to say once it stopped
    (``describe``, called after the work unwound: it reads the state the job left)."""

    kind: str
    describe: Callable[[], Awaitable[str]]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    requested: bool = False
    ended: trio.Event = field(default_factory=trio.Event)

    def committing(self, phase: str) -> bool:
        return phase in COMMIT_PHASES[self.kind]

    def request(self, phase: str) -> bool:
        """Cancel unless the commit has started (then False: the job goes on)."""
        if self.committing(phase):
            return False
        self.requested = True
        self.scope.cancel()
        return True


def migration_cancelled(disk: str, here: str, dest: str, owner: str) -> str:
    """The state a cancelled disk migration left, from the owner the source's store records now."""
    if owner == here:
        return (f"cancelled before the commit: {here} still owns {disk} and serves its guest; {dest} may keep "
                "what it pulled as a replica")
    return f"cancelled, but {disk} is owned by {owner or 'nobody'} now"


def vm_move_cancelled(vm: str, here: str, dest: str, running: bool) -> str:
    if running:
        return (f"cancelled before the switchover: VM {vm} runs on at {here}, which still owns its disks; "
                f"{dest} may keep what it pulled as replicas")
    return f"cancelled before the switchover; VM {vm} is not running at {here} (see 'p2pvbd vm list')"


def sync_cancelled(disk: str, fetched: int, held: int, total: int) -> str:
    return (f"cancelled: {disk} keeps the {fetched} block(s) this sync pulled ({held} of {total} blocks held "
            "here, each valid at its version); 'p2pvbd sync' again goes on from there")
