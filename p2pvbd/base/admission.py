"""Who may hold a connection before proving anything, and the descriptors kept for the daemon's own use.

Anyone who reaches a TCP port can open connections that never finish TLS. Each holds a descriptor until its
handshake times out; with no bound, ~1030 idle connections under a 1024-descriptor limit (a systemd service's
default) made a daemon fail to open its own files. So a listener admits such connections through a ``Gate``:
at most so many at once, fewer per source address, a shorter handshake timeout once half are taken, the
oldest of the busiest source given up for a newcomer from a quieter one, and nothing new at all while free
descriptors are below a reserve kept for the control socket, NBD clients and the stores.

Pure bookkeeping: no sockets, no trio; the listeners (peer_transport) call it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Connections that have not finished their handshake, per listener. Every member reconnects at once after
# this host restarts: MAX_STANDING_LINKS (64) hosts with up to 4 links each (swarm/node.py) is 256.
MAX_UNAUTHENTICATED = 256
# From one source address (an IPv6 /64 counts as one): a few hosts behind one NAT, each with up to 4 links.
MAX_UNAUTHENTICATED_PER_SOURCE = 16
# Once half the slots are taken, a handshake gets this long instead of the usual 10 s: TLS 1.3 is two round
# trips, about a second on a bad mobile link; a stalled stranger gives its slot back sooner.
PRESSURED_HANDSHAKE_SECONDS = 2.0
# Descriptors always left free for the daemon's own use: MAX_CONTROL_CLIENTS (64) commands, MAX_TCP_CONNECTIONS
# (64) NBD clients, the Unix-socket NBD clients and each store's few files, VM sockets and worker threads: 256
# covers them on a host with a few dozen disks. No new peer connection is accepted while fewer are free.
DESCRIPTOR_RESERVE = 256
# How stale the count of open descriptors may be (listing /proc/self/fd costs ~0.1 ms per 1000); under the
# reserve's double it is counted at every connection.
DESCRIPTOR_RECOUNT_SECONDS = 0.1
# The soft limit is raised to the hard one at start, but no further than this: nothing here needs more, and
# QEMU and the other programs the daemon starts inherit it.
MAX_DESCRIPTORS = 1 << 16
# IPv6 sources are grouped by prefix: one end site gets a /64 (RFC 6177), so it is one source.
IPV6_SOURCE_PREFIX = 64


class Refused(Exception):
    """A connection the gate did not admit; the message says why (for a log line)."""


def source_of(host: str) -> str:
    """The source a connection is counted under: its IPv4 address, or its IPv6 /64."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{addr}/{IPV6_SOURCE_PREFIX}", strict=False))
    return str(addr)


def open_descriptors() -> int:
    """How many descriptors this process has open (the soft limit if they cannot even be listed)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own
    except OSError:
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft limit on open descriptors to the hard one (at most MAX_DESCRIPTORS); (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard if hard != resource.RLIM_INFINITY else MAX_DESCRIPTORS, MAX_DESCRIPTORS)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-descriptor limit from %d to %d: %s", soft, target, e)
            return soft, soft
        return soft, target
    return soft, soft


class Descriptors:
    """Whether a new connection leaves at least ``reserve`` descriptors free. Counted every
    DESCRIPTOR_RECOUNT_SECONDS, and at each connection once fewer than twice the reserve are free;
    connections taken since the last count are subtracted (closed ones are only seen at the next)."""

    def __init__(self, reserve: int = DESCRIPTOR_RESERVE, count: Callable[[], int] = open_descriptors,
                 limit: Callable[[], int] = lambda: resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reserve, self._count, self._limit, self._clock = reserve, count, limit, clock
        self._free, self._at, self._taken = 0, -float("inf"), 0

    def free(self) -> int:
        now = self._clock()
        if now - self._at >= DESCRIPTOR_RECOUNT_SECONDS or self._free - self._taken < 2 * self.reserve:
            self._free, self._at, self._taken = self._limit() - self._count(), now, 0
        return self._free - self._taken

    def take(self) -> bool:
        """Count one more descriptor as used, if that leaves the reserve free."""
        if self.free() <= self.reserve:
            return False
        self._taken += 1
        return True


@dataclass(eq=False)
class Ticket:
    """One admitted connection: ``evict`` ends it (called at most once, by the gate)."""

    source: str
    evict: Callable[[], None]
    since: float = field(default_factory=time.monotonic)


class Gate:
    """Admits connections that have not authenticated yet (see the module's docstring) until ``release``."""

    def __init__(self, total: int = MAX_UNAUTHENTICATED, per_source: int = MAX_UNAUTHENTICATED_PER_SOURCE,
                 descriptors: Descriptors | None = None) -> None:
        self.total, self.per_source = total, per_source
        self.descriptors = descriptors
        self._by_source: dict[str, list[Ticket]] = {}
        self.pending = 0

    def admit(self, host: str, evict: Callable[[], None]) -> Ticket:
        """A ticket for a new connection from ``host``, or Refused. May evict another's to make room."""
        source = source_of(host)
        mine = self._by_source.get(source, [])
        if len(mine) >= self.per_source:
            raise Refused(f"{len(mine)} connections from {source} are still in their handshake")
        if self.pending >= self.total:
            busiest = max(self._by_source.values(), key=len)
            if len(busiest) <= len(mine) + 1:  # every source holds its fair share: wait for a slot
                raise Refused(f"{self.pending} connections are still in their handshake")
            self._drop(busiest[0]).evict()  # the oldest of the busiest source gives way (and its descriptor)
        elif self.descriptors is not None and not self.descriptors.take():
            raise Refused(f"fewer than {self.descriptors.reserve} descriptors are free")
        ticket = Ticket(source, evict)
        self._by_source.setdefault(source, []).append(ticket)
        self.pending += 1
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The connection authenticated or ended: it no longer counts (twice is harmless)."""
        self._drop(ticket)

    def _drop(self, ticket: Ticket) -> Ticket:
        tickets = self._by_source.get(ticket.source)
        if tickets is not None and ticket in tickets:
            tickets.remove(ticket)
            self.pending -= 1
            if not tickets:
                del self._by_source[ticket.source]
        return ticket

    def handshake_timeout(self, normal: float) -> float:
        """``normal`` while fewer than half the slots are taken, PRESSURED_HANDSHAKE_SECONDS after."""
        return normal if self.pending < self.total // 2 else min(normal, PRESSURED_HANDSHAKE_SECONDS)
