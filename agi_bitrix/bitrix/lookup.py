"""Asking the portal who owns a number, without hurting the call or the portal.

Order of business for one lookup: a fresh cached answer; else join a request already in flight
for the same number (single flight: a burst of calls from one number costs one request); else
wait for the next request, if the circuit breaker and the rate limiter allow one within the
caller's deadline. Numbers that arrive while requests are on their way (or wait for a rate
slot) leave together in one `batch` request of up to 50: a campaign bringing many new numbers
at once costs few of the portal's ~2 requests a second. When the portal cannot answer in
time, a stale cached answer stands in if there is one; otherwise the call gets status ERROR
with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from agi_bitrix.bitrix.breaker import CLOSED, OPEN, CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import RequestSlot
from agi_bitrix.bitrix.errors import (
    BitrixError,
    LocalFault,
    PortalError,
    PortalMisconfigured,
    RequestNotSent,
    RequestRejected,
)
from agi_bitrix.bitrix.models import CrmAnswer, CrmEntity

log = logging.getLogger("agi_bitrix.lookup")

# Numbers per `batch` request (the portal's maximum), and requests on their way at once: two
# keep a slow answer from holding everyone up, and let the numbers behind them batch up.
MAX_BATCH = 50
MAX_REQUESTS_IN_FLIGHT = 2
# The second request leaves only once the first has been out this long: a portal answering
# quickly then takes the numbers behind it in the next batch (fewer requests of its ~2 a
# second, less work here), and a slow one still cannot hold them for more than this.
SECOND_REQUEST_AFTER = 0.05


class CrmSearch(Protocol):
    """What the lookup needs of the portal client (agi_bitrix.bitrix.client.PortalClient)."""

    async def take_slot(self, max_wait: float) -> RequestSlot: ...

    async def search_crm_entities(self, phone: str, slot: RequestSlot) -> list[CrmEntity]: ...

    async def search_crm_entities_batch(self, phones: list[str],
                                        slot: RequestSlot) -> dict[str, list[CrmEntity] | PortalError]: ...


class LookupObserver(Protocol):
    """Where the lookup reports what it sees (agi_bitrix.monitoring.Metrics implements it)."""

    def lookup_answered(self, source: str) -> None:
        """One lookup done; `source` is hit, miss, stale or error."""

    def portal_request_done(self, seconds: float) -> None: ...

    def portal_request_failed(self, reason: str) -> None: ...


class _NoObserver:
    def lookup_answered(self, source: str) -> None:
        pass

    def portal_request_done(self, seconds: float) -> None:
        pass

    def portal_request_failed(self, reason: str) -> None:
        pass


@dataclass
class LookupMemory:
    """What the lookups learn and keep across config reloads: the answers, the breaker, and when
    the portal last answered and last failed (clock time, for /healthz)."""

    cache: AnswerCache
    breaker: CircuitBreaker
    last_success: float | None = None
    last_failure: float | None = None
    # The portal's refusal of REST as a whole (plan, HTTPS) when that was the last failure, for /healthz.
    misconfigured: PortalMisconfigured | None = None
    last_failure_reason: str = ""  # the reason of that failure (timeout, http_502, the portal's code)
    clock: Callable[[], float] = field(default=time.monotonic)


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
        self._clock = memory.clock
        # Per number being looked up, the callers waiting for its answer (single flight: one
        # request however many wait); and, in arrival order, those not yet taken into a request.
        self._flights: dict[str, list[asyncio.Future[CrmAnswer | None]]] = {}
        self._waiting: dict[str, None] = {}
        self._senders: set[asyncio.Task[None]] = set()
        self._busy_since = 0.0  # loop time when the only running sender began its request
        self._second_sender: asyncio.TimerHandle | None = None

    async def lookup(self, phone: str) -> CrmAnswer:
        answer = await self._lookup(phone)
        self.observer.lookup_answered(answer.cache if answer.status != "ERROR" else "error")
        return answer

    async def _lookup(self, phone: str) -> CrmAnswer:
        cached = self.cache.fresh(phone)
        if cached is not None:
            return cached
        # Each caller waits on a future of its own, which its deadline resolves to None if the
        # answer is late: giving up cancels nothing the others wait on (and costs no task
        # cancellation, as a timeout around the await would).
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        deadline = loop.call_at(loop.time() + self.deadline, _give_up, waiter)
        waiters = self._flights.get(phone)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._flights[phone] = [waiter]
            self._waiting[phone] = None
            if not self._senders:
                self._start_sender()
            elif self._second_sender is None and len(self._senders) < MAX_REQUESTS_IN_FLIGHT:
                self._second_sender = loop.call_at(self._busy_since + SECOND_REQUEST_AFTER,
                                                   self._start_second_sender)
        try:
            answer = await waiter
        except BitrixError as error:
            return self._fallback(phone, error.reason)
        finally:
            deadline.cancel()
        return answer if answer is not None else self._fallback(phone, "timeout")

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

    def _start_sender(self) -> None:
        self._busy_since = asyncio.get_running_loop().time()
        sender = asyncio.create_task(self._send_waiting())
        self._senders.add(sender)
        sender.add_done_callback(self._sender_done)

    def _sender_done(self, sender: asyncio.Task[None]) -> None:
        self._senders.discard(sender)
        # A safety net: _send_one turns every failure into an answer for its callers, so this
        # should never find one. If it does, it is logged here with its traceback, not as
        # asyncio's "Task exception was never retrieved" when the task is collected.
        if not sender.cancelled() and (error := sender.exception()) is not None:
            log.error("a portal lookup sender ended with an unexpected error; the numbers it held"
                      " take the fallback at their deadline", exc_info=error)

    def _start_second_sender(self) -> None:
        self._second_sender = None
        if self._waiting and len(self._senders) < MAX_REQUESTS_IN_FLIGHT:
            self._start_sender()

    async def _send_waiting(self) -> None:
        """Send requests until no number waits. While a request is on its way (or waits for a
        rate-limit slot), new numbers gather and leave together in one `batch` request."""
        try:
            while self._waiting:
                await self._send_one()
        finally:
            # Now, not in the done callback a loop turn later: a number arriving in between
            # would count this sender as still running and wait for nobody.
            self._senders.discard(asyncio.current_task())

    async def _send_one(self) -> None:
        if not self.breaker.allow():
            self._fail(list(self._waiting), RequestNotSent(
                "circuit_open", "the portal failed repeatedly; not asking it until the cool-down ends"))
            return
        try:
            slot = await self.portal.take_slot(max_wait=self.deadline)
        except RequestNotSent as error:
            self.breaker.abandoned()
            self._fail(list(self._waiting), error)
            return
        except Exception as error:
            self._unexpected(list(self._waiting), error)
            return
        except BaseException:
            self.breaker.abandoned()
            raise
        phones = list(itertools.islice(self._waiting, MAX_BATCH))
        for phone in phones:
            del self._waiting[phone]
        if not phones:  # another sender took them while this one waited for its slot
            self.breaker.abandoned()
            return
        self._busy_since = asyncio.get_running_loop().time()
        started = self._clock()
        outcome: dict[str, list[CrmEntity] | PortalError]
        try:
            if len(phones) == 1:
                outcome = {phones[0]: await self.portal.search_crm_entities(phones[0], slot)}
            else:
                outcome = await self.portal.search_crm_entities_batch(phones, slot)
        except BitrixError as error:
            self._request_failed(phones, error)
            return
        except Exception as error:
            self._unexpected(phones, error)
            return
        except BaseException:
            # Only a real cancellation (the server stopping) or an interpreter exit gets here.
            self.breaker.abandoned()
            self._fail(phones, RequestNotSent("cancelled", "the server is stopping"))
            raise
        finally:
            self.observer.portal_request_done(self._clock() - started)
        try:
            self._answered(outcome)
        except Exception as error:
            self._unexpected(phones, error)

    def _answered(self, outcome: dict[str, list[CrmEntity] | PortalError]) -> None:
        if self.breaker.state != CLOSED:
            log.warning("portal answered again; circuit closed")
        self.breaker.succeeded()
        self.memory.last_success = self._clock()
        for phone, entities in outcome.items():
            if isinstance(entities, PortalError):
                # The portal answered but refused this one number (ERROR_CORE for "0", ...).
                self.observer.portal_request_failed(entities.reason)
                log.warning("portal refused the lookup of %s: %s (%s)", phone, entities.reason, entities.detail)
                self._fail([phone], entities)
                continue
            status = "FOUND" if entities else "NOT_FOUND"
            found = tuple(entities)
            self.cache.store(phone, CrmAnswer(status, found, cache="hit"))  # as later calls will see it
            self._settle(phone, CrmAnswer(status, found, cache="miss"))

    def _unexpected(self, phones: list[str], error: Exception) -> None:
        """A bug (ours or a library's) on the lookup path: the callers get B24_ERROR=internal at
        once, and it counts as the portal failing (metrics, /healthz, breaker), logged once with
        its traceback."""
        log.error("portal lookup for %s failed unexpectedly: %s", ", ".join(phones) or "(no number)",
                  type(error).__name__, exc_info=error)
        self._request_failed(phones, LocalFault("internal", f"unexpected {type(error).__name__}"), logged=True)

    def _request_failed(self, phones: list[str], error: BitrixError, logged: bool = False) -> None:
        self.observer.portal_request_failed(error.reason)
        if not logged:
            log.warning("portal lookup for %s failed: %s (%s)", ", ".join(phones), error.reason, error.detail)
        if isinstance(error, RequestRejected):
            # The portal is up and answered; it only refused this request. Counting that as an
            # outage would let a few odd caller IDs open the breaker for everyone.
            self.breaker.succeeded()
        elif isinstance(error, RequestNotSent):
            # Not asked (the OAuth tokens were rejected earlier): the call keeps that true reason
            # instead of circuit_open, and /healthz shows the auth state.
            self.breaker.abandoned()
        elif isinstance(error, PortalMisconfigured):
            # REST is off for the whole portal (its plan, HTTPS): every request would be refused
            # alike until an admin acts, so the breaker opens at once. Said once per change: the
            # breaker's probe finds it again every cool-down.
            self.memory.last_failure = self._clock()
            self.memory.last_failure_reason = error.reason
            previous, self.memory.misconfigured = self.memory.misconfigured, error
            if previous is None or previous.reason != error.reason or self.breaker.state == CLOSED:
                log.error("portal refuses REST as a whole: %s (%s); %s. Calls take the fallback; the portal is"
                          " asked again every %.0f s", error.reason, error.detail, error.advice,
                          self.breaker.cool_down)
            self.breaker.trip()
        else:
            self.memory.last_failure = self._clock()
            self.memory.misconfigured = None
            self.memory.last_failure_reason = error.reason
            self._breaker_failed(error.reason)
        self._fail(phones, error)

    def _settle(self, phone: str, answer: CrmAnswer) -> None:
        for waiter in self._flights.pop(phone, ()):
            if not waiter.done():  # done: that caller's deadline passed
                waiter.set_result(answer)

    def _fail(self, phones: list[str], error: BitrixError) -> None:
        for phone in phones:
            self._waiting.pop(phone, None)
            for waiter in self._flights.pop(phone, ()):
                if not waiter.done():
                    waiter.set_exception(error)
                    # Marked as seen: its caller may be cancelled before it looks, and the
                    # failure is logged once per request, not once per forgotten waiter.
                    waiter.exception()


def _give_up(waiter: asyncio.Future[CrmAnswer | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
