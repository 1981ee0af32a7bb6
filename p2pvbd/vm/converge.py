"""How long a VM may pause at the end of its memory's move, when the link cannot carry what the guest dirties;
and how large the pieces of its memory stream are, so that what is in flight holds the link briefly.

QEMU stops the guest for its last pass only once the pages still dirty fit in its ``downtime-limit`` at the
rate it measures. A guest that dirties memory about as fast as the link drains it (1 MiB/s of fresh data and
a busy TCP flow against a 20 Mbit/s uplink) never gets there: every pass leaves about as much as the last,
and the move would run until its timeout, sending the same pages again and again. So once QEMU's passes
stop shrinking (a pass left more than STALL_RATIO of the one before, after RAMP_AFTER_PASSES passes), the
limit moves towards what the smallest recent pass needs at QEMU's measured rate (at most doubling per
pass, and all the way once STALLS_TO_JUMP passes in a row stalled); and each
further pass that still does not end the copy raises it by RAMP_FACTOR (as OpenStack's
``live_migration_downtime_steps`` do), up to a cap. Pure: the caller reads QEMU's ``query-migrate`` and
sets the limit it is given.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Passes QEMU gets at the asked-for limit: the first sends all memory, and a guest that converges at all
# shows it in the next ones, each shorter than the last.
RAMP_AFTER_PASSES = 3
# A pass that left more than this share of the one before is not converging: at 0.8 the copy would need
# 10+ more passes (each as long as the link takes for it) to shrink tenfold.
STALL_RATIO = 0.8
# The limit given a stalled copy: the smallest of the last few passes at QEMU's rate, this much over it.
STALL_MARGIN = 1.2
RECENT_PASSES = 3
# ... but a stalled copy's limit at most doubles per pass: early passes are long and large, and a pass that
# is about to end small must not be met with a pause sized for the large ones.
STALL_STEP = 2.0
# ... until this many passes in a row stalled: the copy has reached what the guest writes in a pass, and each
# further pass sends as much again without shrinking the last one (a second of this guest's writes: ~2 MB of
# a 20 Mbit/s link per pass).
STALLS_TO_JUMP = 2
# Each further pass raises the limit by this factor: the pause ends at most 20 % above the shortest one the
# link allows.
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
    pass_bytes: list[int] = field(default_factory=list)  # what each pass had to send, at its start
    stalls: int = 0  # passes in a row that left more than STALL_RATIO of the one before

    def __post_init__(self) -> None:
        self.limit_ms = self.base_ms
        self.cap_ms = max(self.cap_ms, self.base_ms)  # a user asking for more than the cap gets what they asked

    def on_progress(self, passes: int, remaining: int | None = None, mbps: float | None = None) -> float | None:
        """QEMU reports ``passes`` dirty-page syncs so far, ``remaining`` bytes still to send and its rate
        (``mbps``, Mbit/s): the new limit to set, or None to keep it. Called soon after each sync, the
        remaining bytes are that pass's size."""
        if passes <= self.passes:
            return None
        new_passes = passes - self.passes
        self.passes = passes
        if remaining is not None:
            self.pass_bytes.append(remaining)
        if passes <= RAMP_AFTER_PASSES:
            return None
        grown = self.limit_ms * RAMP_FACTOR ** new_passes
        sizes = self.pass_bytes[1:]  # the first pass is all memory
        if len(sizes) >= 2 and mbps and sizes[-1] > STALL_RATIO * sizes[-2]:
            self.stalls += 1
            need_ms = min(sizes[-RECENT_PASSES:]) / (mbps * 1e6 / 8) * 1000 * STALL_MARGIN
            grown = max(grown, need_ms if self.stalls >= STALLS_TO_JUMP else min(need_ms, self.limit_ms * STALL_STEP))
        else:
            self.stalls = 0
        grown = min(self.cap_ms, grown)
        if grown <= self.limit_ms:
            return None
        self.limit_ms = grown
        return grown


# Each piece of the memory stream holds the link about this long at the rate measured, and what is in
# flight at once about IN_FLIGHT_SECONDS: the pause waits that long for what was already on its way when
# QEMU stopped the guest (a 1 MiB piece would be 0.4 s of a 20 Mbit/s link).
PIECE_SECONDS = 0.0125
IN_FLIGHT_SECONDS = 0.05
# ... but no piece is smaller than this: 8 pages, a few requests a second on the slowest link worth moving
# a VM over (1 Mbit/s), ~80 on 20 Mbit/s; per-piece costs stay small next to hashing the pages.
MIN_PIECE_BYTES = 32 * 1024
# ... and the bytes in flight may always reach this: with a round trip and a piece's processing (a few ms)
# on top of its time on the link, four minimal pieces keep a slow link busy.
MIN_IN_FLIGHT_BYTES = 4 * MIN_PIECE_BYTES
# ... and never needs more than this: above what the relay's 16 pieces of at most 1 MiB can hold (the
# cap also keeps a rate measured over an instant finite).
MAX_IN_FLIGHT_BYTES = 64 << 20
# The rates are what the destination took over the last this many seconds: long enough to span several
# pieces on a slow link, short enough to follow a link that changes.
RATE_HORIZON_SECONDS = 2.0


class StreamPace:
    """How much of QEMU's stream to read into the next piece, and how many bytes may be on the link at
    once, so that what is in flight holds the link for a bounded time however fast it is. Pieces of pages
    the destination holds are references, a few bytes a page: many of them may be in flight, and the
    hashing of the next ones overlaps the link carrying the pages it lacks. Pure: the caller passes the
    clock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.done_at: deque[tuple[float, int, int]] = deque()  # (when, stream bytes, wire bytes) per piece
        self.bytes_after_first = 0  # the sum of done_at's stream bytes but its oldest entry's
        self.wire_after_first = 0  # ... and of its wire bytes

    def taken(self, now: float, stream_bytes: int, wire_bytes: int = 0) -> None:
        if self.done_at:
            self.bytes_after_first += stream_bytes
            self.wire_after_first += wire_bytes
        self.done_at.append((now, stream_bytes, wire_bytes))
        self._forget(now)

    def _forget(self, now: float) -> None:
        while self.done_at and self.done_at[0][0] < now - RATE_HORIZON_SECONDS:
            self.done_at.popleft()
            if self.done_at:
                self.bytes_after_first -= self.done_at[0][1]
                self.wire_after_first -= self.done_at[0][2]
            else:
                self.bytes_after_first = self.wire_after_first = 0

    def _span(self, now: float) -> float:
        self._forget(now)
        return now - self.done_at[0][0] if len(self.done_at) >= 2 else 0.0

    def piece_bytes(self, now: float) -> int:
        if (span := self._span(now)) <= 0:
            return self.max_bytes  # nothing measured yet: a fast link's pieces
        rate = self.bytes_after_first / span
        return max(MIN_PIECE_BYTES, int(min(self.max_bytes, rate * PIECE_SECONDS)))

    def in_flight_bytes(self, now: float) -> int:
        """The most bytes to have on the link at once: IN_FLIGHT_SECONDS of what it carried lately."""
        if (span := self._span(now)) <= 0:
            return MIN_IN_FLIGHT_BYTES
        return max(MIN_IN_FLIGHT_BYTES, int(min(MAX_IN_FLIGHT_BYTES,
                                                 self.wire_after_first / span * IN_FLIGHT_SECONDS)))
