"""Pacing bytes to a rate: background pulls served by an owner, relayed traffic, a migration's throttle."""

from __future__ import annotations

import math

import trio

# A token bucket holds at most this much time's worth of tokens: short bursts ride it, longer ones pace.
BUCKET_SECONDS = 0.25


class TokenBucket:
    """Paces bytes to ``rate``/s: ``take(n)`` sleeps as long as the debt needs."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate * BUCKET_SECONDS
        self._stamp = trio.current_time()

    async def take(self, n: int) -> None:
        if math.isinf(self.rate):
            return
        now = trio.current_time()
        self._tokens = min(self.rate * BUCKET_SECONDS, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)
