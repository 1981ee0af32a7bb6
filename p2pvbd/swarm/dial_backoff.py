"""When to dial an address a peer's host record names again, after it failed: pure, no I/O.

A member's host record may name any address (under its own name), and every member dials a peer's
addresses to keep a link to it: an address that never answers as that peer would be dialled by every
member every minute, for as long as the record lives. So each (peer, address) that failed waits
before the next dial, twice as long after each failure, up to :data:`MAX_BACKOFF_SECONDS`; one that
answered as another host waits the longest at once. Only a dial that reached the peer (its certificate
named it in the TLS handshake) clears an address's backoff.
"""

from __future__ import annotations

from collections import OrderedDict

# The first wait after a failed dial: as the node's DIRECT_RETRY_SECONDS, the wait before a peer is
# tried again at all (a host that became reachable is dialled again within a minute).
FIRST_BACKOFF_SECONDS = 60.0
# The longest wait: an address that failed five times in a row is dialled four times an hour. A peer
# that was away that long and is back dials this host itself, and its link is used meanwhile.
MAX_BACKOFF_SECONDS = 900.0
# (peer, address) pairs remembered: 16 addresses a record (dht_schema.MAX_HOST_ADDRESSES) for 64 peers;
# a forgotten one is dialled as new.
MAX_TRACKED = 1024
# Addresses of one peer dialled in one attempt: a host advertises its few global addresses; more in a
# record cost a connect timeout each before its link could be used.
MAX_DIAL_ADDRESSES = 8


class DialBackoff:
    def __init__(self, limit: int = MAX_TRACKED) -> None:
        self.limit = limit
        self._failed: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()  # -> (failures, next due)

    def due(self, peer: str, address: str, now: float) -> bool:
        entry = self._failed.get((peer, address))
        return entry is None or now >= entry[1]

    def next_due(self, peer: str, addresses: list[str]) -> float:
        """The soonest time one of ``addresses`` may be dialled again (0.0 if one may now)."""
        return min((self._failed.get((peer, a), (0, 0.0))[1] for a in addresses), default=0.0)

    def failed(self, peer: str, address: str, now: float, *, wrong_host: bool = False) -> float:
        """Record a failed dial; the time the address is due again."""
        failures = self._failed.pop((peer, address), (0, 0.0))[0] + 1
        wait = MAX_BACKOFF_SECONDS if wrong_host else min(MAX_BACKOFF_SECONDS,
                                                          FIRST_BACKOFF_SECONDS * 2 ** min(failures - 1, 32))
        self._failed[(peer, address)] = (failures, now + wait)
        while len(self._failed) > self.limit:
            self._failed.popitem(last=False)
        return now + wait

    def reached(self, peer: str, address: str) -> None:
        self._failed.pop((peer, address), None)
