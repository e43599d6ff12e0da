"""Refusals of unauthenticated POSTs (the portal's events, the install callback) in the log.

Anyone who can reach the listener can send them, so each kind of refusal is logged at once, then
at most once per interval with how many more came: a flood of forged POSTs is a line a minute, not
one per POST, and the first of a new kind is never held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REFUSAL_LOG_INTERVAL = 60.0


class QuietLog:
    """Warnings by kind: the first at once, then at most one per `interval`, counting those held.

    `more` names the held ones in the line that follows them ("like it": "(3 more like it since
    the last such line)")."""

    def __init__(self, logger: logging.Logger, more: str, interval: float = REFUSAL_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger, self._more = logger, more
        self._interval, self._clock = interval, clock
        self._next_line: dict[str, tuple[float, int]] = {}  # kind -> (next line's time, lines held)

    def warning(self, message: str, *args: object, kind: str = "") -> None:
        """Log `message % args`, or hold it; `kind` defaults to the message itself (before the args)."""
        kind = kind or message
        now = self._clock()
        due, held = self._next_line.get(kind, (0.0, 0))
        if now < due:
            self._next_line[kind] = (due, held + 1)
            return
        self._next_line[kind] = (now + self._interval, 0)
        suffix = f" ({held} more {self._more} since the last such line)" if held else ""
        self._logger.warning("%s%s", message % args, suffix)
