"""What the services above the swarm hand its node, as narrow interfaces: the node imports none of them.

The daemon builds the node first (every service talks to peers through it), then the services, and hands
the node what it needs of them: how to pace a background reply, what to say about a disk's replication
policy in ``status``, each peer's last pull rate in ``peers``.
Each hook defaults to "nothing to say", so a node alone (in tests) works.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


async def _unpaced(disk: str, nbytes: int) -> None:
    return None


def _nothing(key: str) -> Any:
    return None


@dataclass
class ServiceHooks:
    """The node's view of the services composed onto it."""

    # Sleep as long as the owner's pacing of background pulls of a disk needs for nbytes more.
    pace_background: Callable[[str, int], Awaitable[None]] = _unpaced
    # The disk's replication policy as its index payload, or None when it has none.
    replication_policy: Callable[[str], dict[str, Any] | None] = _nothing
    # What a peer delivered in this host's last pull from it (bytes/s), or None.
    pull_rate: Callable[[str], float | None] = _nothing
    # The owner this host's replica of the disk last completed a pull from (it then held all of its
    # versions), or None: its holders record then reports the whole disk current as of that pull.
    synced_owner: Callable[[str], str | None] = _nothing


class HasSource(Protocol):
    source: str


class IncomingMigrations(Protocol):
    """The destination side of disk migrations, as the access rules and the source side see it."""

    @property
    def incoming(self) -> Mapping[str, HasSource]: ...

    @property
    def resolving(self) -> Mapping[str, str]: ...

    def resolve_later(self, disk: str, dest: str, epoch: int) -> None: ...


class OutgoingMigration(Protocol):
    """A migration this host runs as its source: where to, and whether it finished."""

    dest: str
    finished: Any

    def as_dict(self) -> dict[str, Any]: ...
