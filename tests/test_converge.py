"""The pause a VM's move allows grows only when QEMU's passes over the memory stop converging."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pvbd.vm.converge import (
    MIN_PIECE_BYTES,
    PIECE_SECONDS,
    RAMP_AFTER_PASSES,
    RAMP_CAP_MS,
    RAMP_FACTOR,
    DowntimeRamp,
    StreamPace,
)


def test_the_asked_limit_holds_for_the_first_passes_then_grows_each_pass() -> None:
    ramp = DowntimeRamp(25.0)
    assert [ramp.on_passes(n) for n in range(1, RAMP_AFTER_PASSES + 1)] == [None] * RAMP_AFTER_PASSES
    assert ramp.on_passes(RAMP_AFTER_PASSES + 1) == 25.0 * RAMP_FACTOR
    assert ramp.on_passes(RAMP_AFTER_PASSES + 1) is None  # the same pass seen again changes nothing
    assert ramp.on_passes(RAMP_AFTER_PASSES + 3) == 25.0 * RAMP_FACTOR ** 3  # passes missed between polls count


def test_the_limit_stops_at_the_cap_and_a_larger_ask_is_kept() -> None:
    ramp = DowntimeRamp(25.0)
    ramp.on_passes(1000)
    assert ramp.limit_ms == RAMP_CAP_MS and ramp.on_passes(1001) is None
    big = DowntimeRamp(RAMP_CAP_MS * 2)
    assert big.on_passes(1000) is None and big.limit_ms == RAMP_CAP_MS * 2


@given(st.floats(1, 5000), st.lists(st.integers(0, 200), max_size=30))
def test_the_limit_never_shrinks_nor_passes_the_cap(base: float, polls: list[int]) -> None:
    ramp = DowntimeRamp(base)
    last = ramp.limit_ms
    for passes in sorted(polls):
        ramp.on_passes(passes)
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
