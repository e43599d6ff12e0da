"""The last calls, in memory, for the admin page: a bounded ring of calls and a count per minute.

RouteScript records every call here (service.CallRecorder) on the hot path, so recording keeps
the call's record (built once for all its sinks) in a plain tuple with its number and time: a
deque append and a dict increment. Everything else (the page's row, masking, local time, the
trace's text) is done when a page is asked for.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from agi_bitrix.callrecord import CallRecord

RECENT_CALLS = 200  # calls kept for the list; the oldest goes first
CHART_MINUTES = 60  # minutes of per-route counts kept for the chart


@dataclass(frozen=True, slots=True, kw_only=True)
class RecentCall(CallRecord):
    """A call's record as the page lists it, with its place in the list and its time."""

    number: int  # counts up from 1 per process: the call's address on the page (/calls/NUMBER)
    at: float  # wall-clock time (time.time()) the call was decided

    @classmethod
    def kept(cls, number: int, at: float, call: CallRecord) -> RecentCall:
        return cls(number=number, at=at, **{field.name: getattr(call, field.name) for field in _RECORD_FIELDS})


_RECORD_FIELDS = fields(CallRecord)


class RecentCalls:
    def __init__(self, size: int = RECENT_CALLS, minutes: int = CHART_MINUTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self._calls: deque[tuple[int, float, CallRecord]] = deque(maxlen=size)  # made RecentCalls when read
        # (minute since the epoch, calls by route) for the last `minutes` minutes that had calls.
        self._minutes: deque[tuple[int, dict[str, int]]] = deque(maxlen=minutes)
        self._minute_starts = self._minute_ends = 0.0  # the current minute's bounds in clock time,
        self._counts: dict[str, int] = {}  # and its counts (the last of self._minutes)
        self._numbers = itertools.count(1)
        self._clock = clock

    def record(self, call: CallRecord) -> None:
        now = self._clock()
        self._calls.append((next(self._numbers), now, call))
        if not self._minute_starts <= now < self._minute_ends:  # float compares: // alone costs ~0.8 us here
            minute = int(now // 60)
            self._minute_starts, self._minute_ends = minute * 60.0, minute * 60.0 + 60.0
            self._counts = {}
            self._minutes.append((minute, self._counts))
        counts = self._counts
        route = call.route
        counts[route] = counts.get(route, 0) + 1

    def newest_first(self) -> Iterator[RecentCall]:
        return (RecentCall.kept(*kept) for kept in reversed(self._calls))

    def find(self, number: int) -> RecentCall | None:
        return next((RecentCall.kept(*kept) for kept in self._calls if kept[0] == number), None)

    def per_minute(self, minutes: int = CHART_MINUTES) -> list[dict[str, int]]:
        """Calls by route for each of the last `minutes` minutes, oldest first, the last being the
        current one; a minute without calls is empty."""
        current = int(self._clock() // 60)
        first = current - minutes + 1
        counts: list[dict[str, int]] = [{} for _ in range(minutes)]
        for minute, by_route in self._minutes:
            if first <= minute <= current:
                counts[minute - first] = dict(by_route)
        return counts
