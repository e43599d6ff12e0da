"""Asking the portal who owns a number, without hurting the call or the portal.

Order of business for one lookup: a fresh cached answer; else join a request already in flight
for the same number (single flight: a burst of calls from one number costs one request); else
start one, if the circuit breaker and the rate limiter allow it within the caller's deadline.
When the portal cannot answer in time, a stale cached answer stands in if there is one;
otherwise the call gets status ERROR with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from agi_bitrix.bitrix.breaker import CLOSED, OPEN, CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import PortalClient, PortalError
from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.config import BitrixSettings, CacheSettings
from agi_bitrix.monitoring import Metrics

log = logging.getLogger("agi_bitrix.lookup")

# Portal answers that mean "you are asking too much": slow down rather than retry.
LIMIT_ERRORS = frozenset({"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "OVERLOAD_LIMIT"})
# Portal answers that reject one request's parameters (HTTP 400), not the portal being down.
REQUEST_REJECTED = frozenset({"ERROR_CORE", "ERROR_ARGUMENT", "INVALID_REQUEST"})


class CrmLookup:
    def __init__(self, portal: PortalClient, bitrix: BitrixSettings, cache: CacheSettings,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None) -> None:
        self.portal = portal
        self.metrics = metrics or Metrics()
        # When the portal last answered / last failed (clock time), for /healthz.
        self.last_success: float | None = None
        self.last_failure: float | None = None
        self._clock = clock
        self.deadline = bitrix.deadline
        self.cache = AnswerCache(cache, clock)
        self.limiter = RateLimiter(bitrix.rate_per_second, bitrix.rate_burst, clock)
        self.breaker = CircuitBreaker(bitrix.breaker_failures, bitrix.breaker_cool_down, clock)
        self._flights: dict[str, asyncio.Task[CrmAnswer]] = {}
        self.portal_requests = 0

    async def lookup(self, phone: str) -> CrmAnswer:
        answer = await self._lookup(phone)
        self.metrics.lookups.labels(answer.cache if answer.status != "ERROR" else "error").inc()
        return answer

    async def _lookup(self, phone: str) -> CrmAnswer:
        cached = self.cache.fresh(phone)
        if cached is not None:
            return cached
        flight = self._flights.get(phone)
        if flight is None:
            flight = asyncio.create_task(self._fetch(phone), name=f"lookup {phone}")
            self._flights[phone] = flight
            flight.add_done_callback(lambda _: self._flights.pop(phone, None))
        try:
            # shield: a caller giving up must not cancel the request others wait on.
            return await asyncio.wait_for(asyncio.shield(flight), self.deadline)
        except TimeoutError:
            return self._fallback(phone, "timeout")
        except PortalError as error:
            return self._fallback(phone, error.reason)

    def configure(self, bitrix: BitrixSettings, cache: CacheSettings) -> None:
        """Apply reloaded settings; the cached answers and the breaker's state are kept."""
        self.deadline = bitrix.deadline
        self.cache.settings = cache
        limiter = self.limiter
        if (limiter.per_second, limiter.burst) != (bitrix.rate_per_second, bitrix.rate_burst):
            self.limiter = RateLimiter(bitrix.rate_per_second, bitrix.rate_burst, self._clock)
        self.breaker.threshold = bitrix.breaker_failures
        self.breaker.cool_down = bitrix.breaker_cool_down

    def _breaker_failed(self, reason: str) -> None:
        was_open = self.breaker.state == OPEN
        self.breaker.failed()
        if self.breaker.state == OPEN and not was_open:
            log.warning("portal keeps failing (last: %s); not asking it for %.0f s (circuit open)",
                        reason, self.breaker.cool_down)

    def _fallback(self, phone: str, reason: str) -> CrmAnswer:
        stale = self.cache.stale(phone)
        if stale is not None:
            return replace(stale, error=reason, cache="stale")
        return CrmAnswer("ERROR", error=reason, cache="miss")

    async def _fetch(self, phone: str) -> CrmAnswer:
        if not self.breaker.allow():
            raise PortalError("circuit_open", "the portal failed repeatedly; not asking it until the cool-down ends")
        wait = self.limiter.reserve(max_wait=self.deadline)
        if wait is None:
            self.breaker.abandoned()
            raise PortalError("rate_limited", "no request slot within the deadline (client-side rate limit)")
        try:
            if wait:
                await asyncio.sleep(wait)
            self.portal_requests += 1
            started = self._clock()
            try:
                entities = await self.portal.search_crm_entities(phone)
            finally:
                self.metrics.portal_seconds.observe(self._clock() - started)
        except PortalError as error:
            self.metrics.portal_errors.labels(error.reason).inc()
            log.warning("portal lookup for %s failed: %s (%s)", phone, error.reason, error.detail)
            if error.reason in REQUEST_REJECTED:
                # The portal is up and answered; it only refused this number. Counting that as
                # an outage would let a few odd caller IDs open the breaker for everyone.
                self.breaker.succeeded()
                raise
            self.last_failure = self._clock()
            self._breaker_failed(error.reason)
            if error.reason in LIMIT_ERRORS:
                pause = self.limiter.back_off()
                log.warning("portal says %s; no requests for %.0f s", error.reason, pause)
            raise
        except asyncio.CancelledError:
            self.breaker.abandoned()
            raise
        if self.breaker.state != CLOSED:
            log.warning("portal answered again; circuit closed")
        self.breaker.succeeded()
        self.limiter.succeeded()
        self.last_success = self._clock()
        answer = CrmAnswer("FOUND" if entities else "NOT_FOUND", tuple(entities), cache="miss")
        self.cache.store(phone, replace(answer, cache="hit"))  # as later calls will see it
        return answer
