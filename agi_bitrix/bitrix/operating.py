"""The portal's operating-time budget, per method: what we spend, what the portal reports, and holds.

limits.md in bitrix24/b24restdocs: the cloud adds up each method's execution time per application
or webhook in ten one-minute baskets; once the sum passes the limit (480 s in its example), the
next call of that method answers HTTP 429 OPERATION_TIME_LIMIT until enough baskets have dropped
(`operating_reset_at`: when the oldest one does). Other methods go on. Every answer's `time`
object reports `operating` and `operating_reset_at`; an outer `batch` is not counted, its nested
calls count as the methods they call.

We pace each method with a leaky bucket of execution seconds: it drains at SUSTAINED_SHARE of the
limit per window and holds BURST_SHARE of it, so whatever we send, no window holds more than
SUSTAINED_SHARE + BURST_SHARE of the limit, and a busy method never spends its whole budget in a
burst and then goes dark for minutes. A few numbers per method, behind a narrow interface (room,
spend, wait_for, reported, blocked, held_for): the state can move to a store shared by servers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

SUSTAINED_SHARE = 0.7
BURST_SHARE = 0.2
# A portal that reports more than this share spent (other integrations on the same webhook count
# too) gets no more calls of that method until its oldest basket drops.
REPORTED_HOLD_SHARE = 0.9
BASKETS = 10


@dataclass(slots=True)
class _MethodState:
    level: float = 0.0  # seconds of execution in our bucket, as of `updated`
    updated: float = 0.0
    held_until: float = 0.0  # our clock; no calls of the method before it
    reset_at: float = 0.0  # our clock: when the portal said its oldest basket drops


class OperatingBudget:
    def __init__(self, limit: float, window: float = 600.0, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        """`limit`: seconds of execution per method in the portal's `window` (ten baskets)."""
        self.limit = limit
        self.window = window
        self.capacity = BURST_SHARE * limit
        self.drain = SUSTAINED_SHARE * limit / window  # seconds of execution per second
        self._clock = clock
        self._wall_clock = wall_clock
        self._methods: dict[str, _MethodState] = {}

    def _state(self, method: str) -> _MethodState:
        state = self._methods.get(method)
        if state is None:
            state = self._methods[method] = _MethodState(updated=self._clock())
        now = self._clock()
        state.level = max(0.0, state.level - (now - state.updated) * self.drain)
        state.updated = now
        return state

    def held_for(self, method: str) -> float:
        """Seconds until `method` may be called again (0: now)."""
        return max(0.0, self._state(method).held_until - self._clock())

    def room(self, method: str) -> float:
        """Seconds of execution `method` may start now within our pace (0 while it is held)."""
        state = self._state(method)
        if state.held_until > state.updated:
            return 0.0
        return max(0.0, self.capacity - state.level)

    def wait_for(self, method: str, seconds: float) -> float:
        """Seconds until `seconds` of execution fit (inf when more than the bucket ever holds)."""
        if seconds > self.capacity:
            return math.inf
        state = self._state(method)
        drained = max(0.0, state.level + seconds - self.capacity) / self.drain
        return max(drained, state.held_until - state.updated)

    def spend(self, method: str, seconds: float) -> None:
        """Count `seconds` of execution (negative: give back what a reservation did not use)."""
        state = self._state(method)
        state.level = max(0.0, state.level + seconds)

    def reported(self, method: str, time_block: Any) -> None:
        """Read `operating` and `operating_reset_at` from an answer's `time` object, if it has them."""
        if not isinstance(time_block, Mapping):
            return
        operating, reset_at = time_block.get("operating"), time_block.get("operating_reset_at")
        if not (isinstance(operating, (int, float)) and _is_number(operating)
                and isinstance(reset_at, (int, float)) and _is_number(reset_at)):
            return
        state = self._state(method)
        state.reset_at = state.updated + (reset_at - self._wall_clock())
        if operating >= REPORTED_HOLD_SHARE * self.limit:
            state.held_until = max(state.held_until, state.reset_at)

    def blocked(self, method: str) -> float:
        """The portal answered OPERATION_TIME_LIMIT: hold `method` until the `operating_reset_at`
        of its last answer (limits.md: "for the first retry, refer to operating_reset_at from the
        last successful response"), or, when that has passed or is unknown, until the next basket
        drops. Returns the seconds held."""
        state = self._state(method)
        basket = self.window / BASKETS
        if state.reset_at > state.updated:
            until = state.reset_at
        elif state.held_until > state.updated:
            until = state.held_until + basket  # "if the error persists, wait for the next bucket reset"
        else:
            until = state.updated + basket
        state.held_until = until
        state.reset_at = 0.0  # used; a repeat waits a basket more
        return until - state.updated


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
