"""A circuit breaker in front of the portal.

After `failures` failures in a row the portal is not asked for `cool_down` seconds: calls take
their fallback (or a stale answer) at once instead of each waiting out the deadline. Then one
request is let through as a probe; its success closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, failures: int, cool_down: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cool_down = cool_down
        self._clock = clock
        self.state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    def reconfigure(self, failures: int, cool_down: float) -> None:
        """New bitrix.breaker settings on reload; the state (open, the failures counted) is kept."""
        self.threshold = failures
        self.cool_down = cool_down

    def allow(self) -> bool:
        """May a request go to the portal now? In half-open state only one (the probe) may."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self._clock() - self._opened_at >= self.cool_down:
            self.state = HALF_OPEN
            self._probing = False
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def succeeded(self) -> None:
        self.state = CLOSED
        self._failures = 0
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        if self.state == HALF_OPEN or self._failures >= self.threshold:
            self.state = OPEN
            self._opened_at = self._clock()
        self._probing = False

    def trip(self) -> None:
        """Open now, without counting to the threshold: the portal refuses everyone alike (its plan,
        HTTPS), so more requests before the cool-down would only be refused the same way."""
        self.state = OPEN
        self._opened_at = self._clock()
        self._probing = False

    def abandoned(self) -> None:
        """An allowed request was never sent (no rate-limit slot, shutdown): it proves nothing."""
        self._probing = False
