"""Asking the portal who owns a number, without hurting the call or the portal.

Order of business for one lookup: a fresh cached answer; else join a request already in flight
for the same number (single flight: a burst of calls from one number costs one request; with
Redis, across servers too); else wait for the next request, if the circuit breaker and the rate
limiter allow one within the caller's deadline. When the portal cannot answer in time, a stale
cached answer stands in if there is one; otherwise the call gets status ERROR with the reason.

`CrmLookup` wires the parts, each readable and tested alone: `flights` (single flight, on this
server and across servers), `batcher` (when requests leave, which numbers each takes), `hedging`
(one request, asked again in smaller ones when late), `memory` (what is kept across reloads: the
cache, the breaker, the portal's speed and health). What came of each request comes back here
(`RequestOutcomes`): to the callers, the cache, the other servers and the portal's health.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Protocol

from agi_bitrix.bitrix.batcher import SECOND_REQUEST_AFTER, Batcher
from agi_bitrix.bitrix.errors import BitrixError, LocalFault, PortalError
from agi_bitrix.bitrix.flights import Flights, FlightTasks, SharedFlight, Waiter
from agi_bitrix.bitrix.hedging import CrmSearch, HedgedRequests
from agi_bitrix.bitrix.memory import LookupMemory, SearchTiming
from agi_bitrix.bitrix.models import CrmAnswer, CrmEntity

__all__ = ["SECOND_REQUEST_AFTER", "CrmLookup", "CrmSearch", "LookupMemory", "LookupObserver", "SearchTiming"]

log = logging.getLogger("agi_bitrix.lookup")


class LookupObserver(Protocol):
    """Where the lookup reports what it sees (agi_bitrix.monitoring.Metrics implements it)."""

    def lookup_answered(self, source: str) -> None:
        """One lookup done; `source` is hit, miss, stale or error."""

    def portal_request_done(self, seconds: float) -> None: ...

    def portal_request_failed(self, reason: str) -> None: ...

    def shared_answer_unreadable(self) -> None:
        """An answer in Redis had a shape this version cannot decode (taken as a miss)."""


class _NoObserver:
    def lookup_answered(self, source: str) -> None:
        pass

    def portal_request_done(self, seconds: float) -> None:
        pass

    def portal_request_failed(self, reason: str) -> None:
        pass

    def shared_answer_unreadable(self) -> None:
        pass


class CrmLookup:
    def __init__(self, portal: CrmSearch, memory: LookupMemory, *, deadline: float,
                 observer: LookupObserver | None = None) -> None:
        """`deadline`: seconds a caller waits for an answer before taking the fallback."""
        self.portal = portal
        self.memory = memory
        self.deadline = deadline
        self.observer: LookupObserver = observer or _NoObserver()
        self.cache = memory.cache
        self.breaker = memory.breaker
        self.timing = memory.timing
        self.flights = Flights()
        self.tasks = FlightTasks(release=self.fail)
        self.requests = HedgedRequests(portal=portal, memory=memory, deadline=deadline, outcomes=self,
                                       waited_for=self.flights.__contains__, tasks=self.tasks)
        self.batcher = Batcher(portal=portal, memory=memory, deadline=deadline, flights=self.flights,
                               send=self.requests.ask, outcomes=self, tasks=self.tasks)
        self.shared = memory.shared
        self.shared_flight = None if memory.shared is None else SharedFlight(
            memory, self.flights, self.tasks, claim_for=deadline, ask_here=self.batcher.add,
            unreadable=self._unreadable)

    async def lookup(self, phone: str) -> CrmAnswer:
        answer = await self._lookup(phone)
        self.observer.lookup_answered(answer.cache if answer.status != "ERROR" else "error")
        return answer

    async def _lookup(self, phone: str) -> CrmAnswer:
        cached = self.cache.fresh(phone, None if self.shared is None else self.shared.near_cache)
        if cached is not None:
            return cached
        # Each caller waits on a future of its own, which its deadline resolves to None if the
        # answer is late: giving up cancels nothing the others wait on (and costs no task
        # cancellation, as a timeout around the await would).
        loop = asyncio.get_running_loop()
        waiter: Waiter = loop.create_future()
        given_up_at = loop.time() + self.deadline
        deadline = loop.call_at(given_up_at, _give_up, waiter)
        if self.flights.join(phone, waiter):
            if self.shared_flight is not None and self.shared_flight.shared.link.up:
                self.tasks.start(self.shared_flight.ask_servers(phone, given_up_at), holding=[phone])
            else:
                self.batcher.add(phone, given_up_at)
        try:
            answer = await waiter
        except BitrixError as error:
            return self._fallback(phone, error.reason)
        finally:
            deadline.cancel()
        return answer if answer is not None else self._fallback(phone, "timeout")

    def _fallback(self, phone: str, reason: str) -> CrmAnswer:
        stale = self.cache.stale(phone)
        if stale is not None:
            return replace(stale, error=reason, cache="stale")
        return CrmAnswer("ERROR", error=reason, cache="miss")

    def _unreadable(self, phone: str) -> None:
        self.observer.shared_answer_unreadable()
        if not self.memory.unreadable_logged:
            self.memory.unreadable_logged = True
            log.warning("cannot read the answer for %s in Redis (another version of agi-bitrix wrote it?):"
                        " asking the portal instead and storing its answer; further ones are only counted"
                        " (agi_bitrix_shared_answers_unreadable_total)", phone)

    # -- what came of a request (hedging.RequestOutcomes) -------------------------------------------

    def request_done(self, seconds: float) -> None:
        self.observer.portal_request_done(seconds)

    def answered(self, outcome: dict[str, list[CrmEntity] | PortalError]) -> None:
        self.memory.portal_answered()
        for phone, entities in outcome.items():
            if isinstance(entities, PortalError):
                # The portal answered but refused this one number (ERROR_CORE for "0", ...).
                self.observer.portal_request_failed(entities.reason)
                log.warning("portal refused the lookup of %s: %s (%s)", phone, entities.reason, entities.detail)
                self.fail([phone], entities)
                continue
            status = "FOUND" if entities else "NOT_FOUND"
            found = tuple(entities)
            self.cache.store(phone, CrmAnswer(status, found, cache="hit"))  # as later calls will see it
            if self.shared_flight is not None:
                self.shared_flight.share(phone, CrmAnswer(status, found, cache="hit"))
            self.flights.settle(phone, CrmAnswer(status, found, cache="miss"))

    def unexpected(self, phones: list[str], error: Exception) -> None:
        """A bug (ours or a library's) on the lookup path: the callers get B24_ERROR=internal at
        once, and it counts as the portal failing (metrics, /healthz, breaker), logged once with
        its traceback."""
        log.error("portal lookup for %s failed unexpectedly: %s", ", ".join(phones) or "(no number)",
                  type(error).__name__, exc_info=error)
        self.failed(phones, LocalFault("internal", f"unexpected {type(error).__name__}"), logged=True)

    def failed(self, phones: list[str], error: BitrixError, logged: bool = False) -> None:
        self.observer.portal_request_failed(error.reason)
        if not logged:
            log.warning("portal lookup for %s failed: %s (%s)", ", ".join(phones), error.reason, error.detail)
        self.memory.portal_failed(error)
        self.fail(phones, error)

    def fail(self, phones: list[str], error: BitrixError) -> None:
        for phone in phones:
            self.batcher.forget(phone)
            if self.requests.asking(phone):  # another request may still answer it
                continue
            if self.shared_flight is not None:
                self.shared_flight.share(phone, None)
            self.flights.fail(phone, error)


def _give_up(waiter: Waiter) -> None:
    if not waiter.done():
        waiter.set_result(None)
