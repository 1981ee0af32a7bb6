"""The pause a VM's move allows grows only when QEMU's passes over the memory stop converging."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2pvbd.vm.converge import (
    IN_FLIGHT_SECONDS,
    MIN_IN_FLIGHT_BYTES,
    MIN_PIECE_BYTES,
    PIECE_SECONDS,
    RAMP_AFTER_PASSES,
    RAMP_CAP_MS,
    RAMP_FACTOR,
    RATE_HORIZON_SECONDS,
    STALL_MARGIN,
    DowntimeRamp,
    StreamPace,
)
from p2pvbd.vm.ram_window import WireWindow


def test_the_asked_limit_holds_for_the_first_passes_then_grows_each_pass() -> None:
    ramp = DowntimeRamp(25.0)
    assert [ramp.on_progress(n) for n in range(1, RAMP_AFTER_PASSES + 1)] == [None] * RAMP_AFTER_PASSES
    assert ramp.on_progress(RAMP_AFTER_PASSES + 1) == 25.0 * RAMP_FACTOR
    assert ramp.on_progress(RAMP_AFTER_PASSES + 1) is None  # the same pass seen again changes nothing
    assert ramp.on_progress(RAMP_AFTER_PASSES + 3) == 25.0 * RAMP_FACTOR ** 3  # passes missed between polls count


def test_a_copy_that_stops_shrinking_gets_the_pause_its_smallest_pass_needs() -> None:
    ramp = DowntimeRamp(25.0)
    mbps = 20.0  # 2.5 MB/s: 2.5 kB per ms
    for n, size in enumerate([800_000_000, 50_000_000, 10_000_000], start=1):  # shrinking: no change
        assert ramp.on_progress(n, size, mbps) is None
    # the fourth pass left 9.5 MB after 10: stalled; the smallest recent pass, 9.5 MB, needs 3.8 s at 2.5 MB/s,
    # so the limit doubles towards it; the next pass stalls too, and the limit goes all the way, to the cap
    assert ramp.on_progress(4, 9_500_000, mbps) == 50.0
    assert ramp.on_progress(5, 9_400_000, mbps) == RAMP_CAP_MS
    converging = DowntimeRamp(25.0)
    for n, size in enumerate([800_000_000, 50_000_000, 10_000_000, 1_000_000], start=1):
        limit = converging.on_progress(n, size, mbps)
    assert limit == 25.0 * RAMP_FACTOR  # still shrinking fast: only the slow ladder
    small = DowntimeRamp(25.0)
    for n, size in enumerate([800_000_000, 1_000_000, 900_000, 950_000], start=1):
        limit = small.on_progress(n, size, mbps)
    assert limit == 50.0  # stalled: towards 432 ms (900 kB at 20 Mbit/s, with the margin), doubling
    need = 900_000 / 2500 * STALL_MARGIN
    assert small.on_progress(5, 950_000, mbps) == pytest.approx(need)  # stalled again: all the way
    # then (QEMU still not done) the ladder above it
    assert small.on_progress(6, 950_000, mbps) == pytest.approx(need * RAMP_FACTOR)
    shrinking_again = DowntimeRamp(25.0)
    for n, size in enumerate([800_000_000, 1_000_000, 900_000, 950_000, 500_000, 480_000], start=1):
        limit = shrinking_again.on_progress(n, size, mbps)
    assert limit == 120.0  # a shrinking pass (60 ms) between stalls starts the count again: doubling


def test_the_limit_stops_at_the_cap_and_a_larger_ask_is_kept() -> None:
    ramp = DowntimeRamp(25.0)
    ramp.on_progress(1000)
    assert ramp.limit_ms == RAMP_CAP_MS and ramp.on_progress(1001) is None
    big = DowntimeRamp(RAMP_CAP_MS * 2)
    assert big.on_progress(1000) is None and big.limit_ms == RAMP_CAP_MS * 2


@given(st.floats(1, 5000), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 1 << 32)), max_size=30),
       st.floats(0.1, 10_000))
def test_the_limit_never_shrinks_nor_passes_the_cap(base: float, polls: list[tuple[int, int]], mbps: float) -> None:
    ramp = DowntimeRamp(base)
    last = ramp.limit_ms
    for passes, remaining in sorted(polls):
        ramp.on_progress(passes, remaining, mbps)
        assert last <= ramp.limit_ms <= max(base, RAMP_CAP_MS)
        last = ramp.limit_ms


def test_pieces_shrink_to_a_slow_links_rate_and_stay_whole_on_a_fast_one() -> None:
    pace = StreamPace(1 << 20)
    assert pace.piece_bytes(0.0) == 1 << 20  # nothing measured yet
    for i in range(20):  # 10 MB/s: a 100 Mbit/s link
        pace.taken(i * 0.1, 1_000_000)
    assert pace.piece_bytes(1.9) == int(10e6 * PIECE_SECONDS)
    fast = StreamPace(1 << 20)
    for i in range(20):  # 1 GB/s
        fast.taken(i * 0.001, 1 << 20)
    assert fast.piece_bytes(0.02) == 1 << 20
    idle = StreamPace(1 << 20)
    for i in range(20):  # a trickle: QEMU has little left to send
        idle.taken(i * 0.1, 100)
    assert idle.piece_bytes(2.0) == MIN_PIECE_BYTES


@given(st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 1 << 20)), max_size=60))
def test_the_measured_rate_is_what_the_last_seconds_took(pieces: list[tuple[float, int]]) -> None:
    """The running sum agrees with summing the pieces of the horizon afresh, whatever the spacing."""
    pace, now, seen = StreamPace(1 << 20), 0.0, []
    for gap, n in pieces:
        now += gap
        pace.taken(now, n)
        seen.append((now, n))
        recent = [(t, b) for t, b in seen if t >= now - RATE_HORIZON_SECONDS]
        if len(recent) >= 2 and now - recent[0][0] > 0:
            rate = sum(b for _, b in recent[1:]) / (now - recent[0][0])
            assert pace.piece_bytes(now) == max(MIN_PIECE_BYTES, int(min(1 << 20, rate * PIECE_SECONDS)))


def test_the_bytes_in_flight_follow_what_the_link_carried_not_the_stream() -> None:
    pace = StreamPace(1 << 20)
    assert pace.in_flight_bytes(0.0) == MIN_IN_FLIGHT_BYTES  # nothing measured yet
    for i in range(20):  # pieces of references: 25 MB/s of stream, 250 kB/s on the link
        pace.taken(i * 0.04, 1_000_000, 10_000)
    assert pace.piece_bytes(0.77) > 8 * MIN_PIECE_BYTES  # and large pieces
    assert pace.in_flight_bytes(0.77) == MIN_IN_FLIGHT_BYTES
    busy = StreamPace(1 << 20)
    for i in range(20):  # pages the destination lacks on a 100 Mbit/s link
        busy.taken(i * 0.1, 1_250_000, 1_250_000)
    assert busy.in_flight_bytes(1.9) == int(12.5e6 * IN_FLIGHT_SECONDS)


async def test_pieces_enter_the_link_in_order_within_the_budget() -> None:
    window, entered = WireWindow(), []

    async def piece(seq: int, size: int) -> None:
        await window.enter(seq, size, lambda: 100)
        entered.append(seq)

    async with trio.open_nursery() as nursery:
        for seq, size in ((2, 30), (1, 80), (0, 50)):  # ready out of order
            nursery.start_soon(piece, seq, size)
        await trio.testing.wait_all_tasks_blocked()
        assert entered == [0]  # 1 would pass the budget; 2, which would not, must not overtake it
        window.leave(50)
        await trio.testing.wait_all_tasks_blocked()
        assert entered == [0, 1] and window.in_flight == 80
        window.leave(80)
        await trio.testing.wait_all_tasks_blocked()
        assert entered == [0, 1, 2]
    big = WireWindow()
    await big.enter(0, 10_000, lambda: 100)  # a piece larger than the budget goes alone
    assert big.in_flight == 10_000


def test_a_resent_piece_counts_at_its_new_size() -> None:
    window = WireWindow()
    trio.run(window.enter, 0, 100, lambda: 1000)
    window.resize(100, 4196)
    assert window.in_flight == 4196
    window.leave(4196)
    assert window.in_flight == 0
