"""What the lookups learn and keep across config reloads: the answers, the breaker, the portal's
speed (`SearchTiming`), and the portal's health as /healthz shows it (`LookupMemory`).

The health bookkeeping lives here, beside the state it keeps: which failures count against the
breaker, which open it at once, which leave it alone (see `LookupMemory.portal_failed`)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from agi_bitrix.bitrix.breaker import CLOSED, OPEN, CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.errors import BitrixError, PortalMisconfigured, RequestNotSent, RequestRejected
from agi_bitrix.bitrix.settings import BitrixSettings, CacheSettings
from agi_bitrix.bitrix.shared import SharedAnswers

log = logging.getLogger("agi_bitrix.lookup")

# Numbers per `batch` request: the portal's maximum.
MAX_BATCH = 50
# A number whose search takes over this share of the deadline this many times in a row goes
# in a request of its own: in a batch it would take that time from every other number.
SLOW_SHARE = 0.25
SLOW_TIMES = 2
SLOW_REMEMBERED = 1000
# What the portal is assumed to take before its answers say: ~50 ms there and back (a portal
# abroad), 20 ms per search (a CRM of some size). Learned with this weight per answer.
FIRST_OVERHEAD = 0.1
FIRST_PER_SEARCH = 0.02
LEARNING_WEIGHT = 0.2
# Below this a search counts as this: a portal reporting 0 must not make batches unbounded.
LEAST_PER_SEARCH = 0.001


class SearchTiming:
    """How long the portal takes, learned from its answers: seconds per search (the `processing`
    of each command in `result_time`, or of a single search's `time`), the rest of a request's
    round trip, and the numbers whose search is slow."""

    def __init__(self) -> None:
        self.per_search = FIRST_PER_SEARCH
        self.overhead = FIRST_OVERHEAD
        self._answers = 0
        self._slow: OrderedDict[str, int] = OrderedDict()

    def predict(self, numbers: int) -> float:
        """Seconds from sending a request of `numbers` searches to its answer."""
        return self.overhead + numbers * self.per_search

    def fitting(self, seconds: float) -> int:
        """The most searches one request can hold and still answer within `seconds`."""
        return max(1, min(MAX_BATCH, math.floor((seconds - self.overhead) / self.per_search)))

    def travels_alone(self, phone: str) -> bool:
        return self._slow.get(phone, 0) >= SLOW_TIMES

    def learn(self, round_trip: float, numbers: int, seconds: dict[str, float], deadline: float) -> None:
        # The mean of the first answers, then a moving average: the first answer replaces the guess.
        self._answers += 1
        weight = max(LEARNING_WEIGHT, 1 / self._answers)
        if seconds:
            searches = list(seconds.values())
            # The median: one slow number must not make every batch look slow.
            self.per_search += weight * (statistics.median(searches) - self.per_search)
            self.overhead += weight * (max(0.0, round_trip - sum(searches)) - self.overhead)
        else:  # the portal did not say: the round trip beyond the usual overhead is the searches'
            guess = max(0.0, round_trip - self.overhead) / numbers
            self.per_search += weight * (guess - self.per_search)
        self.per_search = max(LEAST_PER_SEARCH, self.per_search)
        for phone, taken in seconds.items():
            if taken > SLOW_SHARE * deadline:
                self.slow_seen(phone)
            else:
                self._slow.pop(phone, None)

    def slow_seen(self, phone: str) -> None:
        self._slow[phone] = self._slow.pop(phone, 0) + 1
        if len(self._slow) > SLOW_REMEMBERED:
            self._slow.popitem(last=False)


@dataclass
class LookupMemory:
    """What the lookups learn and keep across config reloads: the answers, the breaker, the
    portal's speed, and when it last answered and last failed (clock time, for /healthz)."""

    cache: AnswerCache
    breaker: CircuitBreaker
    last_success: float | None = None
    last_failure: float | None = None
    # The portal's refusal of REST as a whole (plan, HTTPS) when that was the last failure, for /healthz.
    misconfigured: PortalMisconfigured | None = None
    last_failure_reason: str = ""  # the reason of that failure (timeout, http_502, the portal's code)
    clock: Callable[[], float] = field(default=time.monotonic)
    timing: SearchTiming = field(default_factory=SearchTiming)
    # The answers of every server against the portal, and who asks for what (None: this server alone).
    shared: SharedAnswers | None = None
    # Whether an answer in Redis this version cannot read was logged (once a process: then counted).
    unreadable_logged: bool = False

    def reconfigure(self, cache: CacheSettings, bitrix: BitrixSettings) -> None:
        """A reload's settings: the answers, the breaker's state and the portal's speed are kept."""
        self.cache.reconfigure(cache)
        self.breaker.reconfigure(bitrix.breaker_failures, bitrix.breaker_cool_down)

    def portal_answered(self) -> None:
        """The portal answered a request (whatever it said of each number in it)."""
        if self.breaker.state != CLOSED:
            log.warning("portal answered again; circuit closed")
        self.breaker.succeeded()
        self.last_success = self.clock()

    def portal_failed(self, error: BitrixError) -> None:
        """A request failed with `error`: the breaker and /healthz learn what it means."""
        if isinstance(error, RequestRejected):
            # The portal is up and answered; it only refused this request. Counting that as an
            # outage would let a few odd caller IDs open the breaker for everyone.
            self.breaker.succeeded()
        elif isinstance(error, RequestNotSent):
            # Not asked (the OAuth tokens were rejected earlier): the call keeps that true reason
            # instead of circuit_open, and /healthz shows the auth state.
            self.breaker.abandoned()
        elif isinstance(error, PortalMisconfigured):
            self._refused_as_a_whole(error)
        else:
            self.last_failure = self.clock()
            self.misconfigured = None
            self.last_failure_reason = error.reason
            was_open = self.breaker.state == OPEN
            self.breaker.failed()
            if self.breaker.state == OPEN and not was_open:
                log.warning("portal keeps failing (last: %s); not asking it for %.0f s (circuit open)",
                            error.reason, self.breaker.cool_down)

    def _refused_as_a_whole(self, error: PortalMisconfigured) -> None:
        # REST is off for the whole portal (its plan, HTTPS): every request would be refused
        # alike until an admin acts, so the breaker opens at once. Said once per change: the
        # breaker's probe finds it again every cool-down.
        self.last_failure = self.clock()
        self.last_failure_reason = error.reason
        previous, self.misconfigured = self.misconfigured, error
        if previous is None or previous.reason != error.reason or self.breaker.state == CLOSED:
            log.error("portal refuses REST as a whole: %s (%s); %s. Calls take the fallback; the portal is"
                      " asked again every %.0f s", error.reason, error.detail, error.advice,
                      self.breaker.cool_down)
        self.breaker.trip()
