"""A client-side copy of the portal's leaky bucket, so this server never trips it.

The portal drains its bucket at `per_second` requests and refuses requests once `burst` are
queued (503 QUERY_LIMIT_EXCEEDED). We keep the same bucket as a "theoretical arrival time"
(the GCRA form of a leaky bucket): one number, no timer task. A caller asks for a slot and is
told how long to wait for it; if the wait is longer than the caller can afford (its deadline),
nothing is booked and the call takes its fallback at once instead of waiting in vain.

Requests that can wait (finishes, the user directory, hedges) see a smaller bucket: they leave
`keep_free` slots of the burst to the lookups, for which a caller is waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class RequestBudget(Protocol):
    """What the portal client draws every request from: this process's RateLimiter, or the one
    bucket all servers of the portal share (agi_bitrix.bitrix.shared.SharedRequestBudget)."""

    per_second: float
    burst: int

    async def take(self, max_wait: float, keep_free: int = 0) -> float | None:
        """As RateLimiter.reserve."""
        ...

    async def refused(self) -> float:
        """The portal answered QUERY_LIMIT_EXCEEDED: as RateLimiter.back_off."""
        ...

    def succeeded(self) -> None: ...


class RateLimiter:
    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = burst
        self.interval = 1.0 / per_second
        self.tolerance = (burst - 1) * self.interval
        self._clock = clock
        self._arrival = 0.0  # when the bucket will be empty again
        self._backoff = 0.0

    def reserve(self, max_wait: float, keep_free: int = 0) -> float | None:
        """Book a slot: the seconds to wait before sending, or None when that is over max_wait.
        With `keep_free`, only a slot that leaves that many of the burst free for others."""
        now = self._clock()
        arrival = max(self._arrival, now)
        wait = max(0.0, arrival - max(0.0, self.tolerance - keep_free * self.interval) - now)
        if wait > max_wait:
            return None
        self._arrival = arrival + self.interval
        return wait

    def spend_burst(self) -> None:
        """Count the whole burst as just spent: a share taken over from a bucket whose state is not
        known here (the shared one in Redis), so it grants its rate but no fresh burst."""
        self._arrival = max(self._arrival, self._clock() + self.tolerance)

    def back_off(self) -> float:
        """The portal said we are over its limit: send nothing for a while, longer each time."""
        self._backoff = min(60.0, self._backoff * 2 if self._backoff else 2.0)
        self._arrival = max(self._arrival, self._clock() + self._backoff + self.tolerance)
        return self._backoff

    def succeeded(self) -> None:
        self._backoff = 0.0

    async def take(self, max_wait: float, keep_free: int = 0) -> float | None:
        return self.reserve(max_wait, keep_free)

    async def refused(self) -> float:
        return self.back_off()
