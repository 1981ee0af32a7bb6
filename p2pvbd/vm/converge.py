"""How long a VM may pause at the end of its memory's move, when the link cannot carry what the guest dirties.

QEMU stops the guest for its last pass only once the pages still dirty fit in its ``downtime-limit`` at the
rate it measures. A guest that dirties memory faster than the link drains it between two passes (1 MiB/s of
fresh data against a 20 Mbit/s uplink is enough) never gets there: every pass leaves as much as the last,
and the move would run until its timeout. So, as OpenStack's ``live_migration_downtime_steps`` does, the
limit starts at what the user asked for and, once QEMU has made RAMP_AFTER_PASSES passes over the memory
without converging, grows by RAMP_FACTOR with each further pass, up to a cap: the move ends at the first
limit the link can meet, no more than RAMP_FACTOR above it. Pure: the caller reads QEMU's pass count and
sets the limit it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

# Passes QEMU gets at the asked-for limit: a guest that converges at all does so within a few (its first
# pass sends all memory, the next ones what was dirtied meanwhile, each shorter than the last).
RAMP_AFTER_PASSES = 5
# Each further pass raises the limit by this factor: the pause ends at most 20 % above the shortest one
# the link allows, reached in about 16 passes from 25 ms to 500 ms (seconds on a slow link, since a
# non-converging pass lasts about as long as its limit allows).
RAMP_FACTOR = 1.2
# The longest pause the ramp gives a guest: noticeable, but below any timeout a guest or its peers act on
# (Linux's virtio/SCSI command timeout is 30 s, TCP's first retransmission timeouts are 1 s and more, and
# the original prototype aimed at sub-second pauses on 100 Mbit/s).
RAMP_CAP_MS = 2000.0


@dataclass
class DowntimeRamp:
    """The downtime-limit to give QEMU as its passes go by; ``base_ms`` is what the user asked for."""

    base_ms: float
    cap_ms: float = RAMP_CAP_MS
    limit_ms: float = 0.0
    passes: int = 0

    def __post_init__(self) -> None:
        self.limit_ms = self.base_ms
        self.cap_ms = max(self.cap_ms, self.base_ms)  # a user asking for more than the cap gets what they asked

    def on_passes(self, passes: int) -> float | None:
        """QEMU reports ``passes`` dirty-page syncs so far: the new limit to set, or None to keep it."""
        if passes <= self.passes:
            return None
        grown = self.limit_ms
        for n in range(self.passes + 1, passes + 1):
            if n > RAMP_AFTER_PASSES:
                grown = min(self.cap_ms, grown * RAMP_FACTOR)
        self.passes = passes
        if grown == self.limit_ms:
            return None
        self.limit_ms = grown
        return grown


# Each piece of the memory stream in flight holds the link about this long at the rate measured: with
# RAM_WINDOW (4) pieces in flight, the pause waits at most ~0.1 s for what was already on its way when
# QEMU stopped the guest (1 MiB pieces would be 1.7 s of a 20 Mbit/s link).
PIECE_SECONDS = 0.025
# ... but no piece is smaller than this: 16 pages, a few requests a second on the slowest link worth moving
# a VM over (1 Mbit/s), and per-piece costs stay small next to hashing the pages.
MIN_PIECE_BYTES = 64 * 1024
# The rate is what the destination took over the last this many seconds: long enough to span several
# pieces on a slow link, short enough to follow a link that changes.
RATE_HORIZON_SECONDS = 2.0


class StreamPace:
    """How much of QEMU's stream to read into the next piece, so that the pieces in flight hold the link for
    a bounded time however fast it is. Pure: the caller passes the clock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.done_at: list[tuple[float, int]] = []  # (when, stream bytes) of each piece the destination took

    def taken(self, now: float, stream_bytes: int) -> None:
        self.done_at.append((now, stream_bytes))
        while self.done_at and self.done_at[0][0] < now - RATE_HORIZON_SECONDS:
            self.done_at.pop(0)

    def piece_bytes(self, now: float) -> int:
        recent = [(t, n) for t, n in self.done_at if t >= now - RATE_HORIZON_SECONDS]
        if len(recent) < 2 or (span := now - recent[0][0]) <= 0:
            return self.max_bytes  # nothing measured yet: a fast link's pieces
        rate = sum(n for _, n in recent[1:]) / span
        return max(MIN_PIECE_BYTES, min(self.max_bytes, int(rate * PIECE_SECONDS)))
