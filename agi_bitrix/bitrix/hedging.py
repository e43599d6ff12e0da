"""Requests to the portal for some numbers, hedged: a request that is late has its unanswered
numbers asked again in smaller requests while rate slots are free (the first answer wins), so a
slow number ends up alone and the others are answered around it.

`HedgedRequests.ask` sends one request and keeps its books (which numbers are being asked, the
operating time reserved, the portal's speed learned); what came of it goes to `RequestOutcomes`
(CrmLookup: the callers, the cache, the breaker)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from agi_bitrix.bitrix.breaker import CLOSED
from agi_bitrix.bitrix.client import SEARCH_KEY, RequestSlot, SearchAnswer
from agi_bitrix.bitrix.errors import BitrixError, PortalError, PortalTimeout, RequestNotSent
from agi_bitrix.bitrix.flights import FlightTasks
from agi_bitrix.bitrix.memory import LookupMemory
from agi_bitrix.bitrix.models import CrmEntity
from agi_bitrix.bitrix.operating import OperatingBudget

log = logging.getLogger("agi_bitrix.lookup")

# A request is late at this many times its predicted time plus this share of the deadline; its
# unanswered numbers are then asked again in groups of about the square root of their count
# (all alone when at most HEDGE_ALONE), so two rounds find one slow number among 50.
LATE_FACTOR = 1.5
LATE_SHARE = 0.05
HEDGE_ALONE = 8


class CrmSearch(Protocol):
    """What the lookup needs of the portal client (agi_bitrix.bitrix.client.PortalClient)."""

    @property
    def operating(self) -> OperatingBudget: ...

    async def take_slot(self, max_wait: float, can_wait: bool = False) -> RequestSlot: ...

    async def search_numbers(self, phones: list[str], slot: RequestSlot) -> SearchAnswer: ...


class RequestOutcomes(Protocol):
    """Where what came of a request goes (CrmLookup)."""

    def request_done(self, seconds: float) -> None:
        """A request came back (answered or failed) after `seconds`."""

    def answered(self, outcome: dict[str, list[CrmEntity] | PortalError]) -> None:
        """The portal answered: each number's entities, or its refusal of that one number."""

    def failed(self, phones: list[str], error: BitrixError) -> None:
        """The request failed: counts for the portal's health, and its numbers fail."""

    def unexpected(self, phones: list[str], error: Exception) -> None:
        """A bug on the lookup path: the numbers fail as `internal`, logged with the traceback."""

    def fail(self, phones: list[str], error: BitrixError) -> None:
        """The numbers' callers get `error` (unless another request still asks for them)."""


@dataclass(eq=False, kw_only=True)
class HedgedRequests:
    """The requests out, and how many ask for each number (a hedge asks again)."""

    portal: CrmSearch
    memory: LookupMemory  # the breaker, the portal's speed, the clock
    deadline: float
    outcomes: RequestOutcomes
    waited_for: Callable[[str], bool]  # whether a caller still waits for the number's answer
    tasks: FlightTasks
    _asking: dict[str, int] = field(default_factory=dict, init=False)

    def asking(self, phone: str) -> bool:
        """Whether a request is out for the number (its answer may still come)."""
        return phone in self._asking

    async def ask(self, phones: list[str], slot: RequestSlot) -> None:
        """Send one request and give what comes of it to the outcomes; never raises but a real
        cancellation (the server stopping), after failing its numbers."""
        loop = asyncio.get_running_loop()
        operating = self.portal.operating
        reserved = len(phones) * self.memory.timing.per_search  # what the portal will count, until it says
        operating.spend(SEARCH_KEY, reserved)
        for phone in phones:
            self._asking[phone] = self._asking.get(phone, 0) + 1
        late = None
        if self.memory.breaker.state == CLOSED and len(phones) > 1:  # alone, a number delays nobody else
            late = loop.call_later(LATE_FACTOR * self.memory.timing.predict(len(phones)) + LATE_SHARE * self.deadline,
                                   self._hedge, phones)
        started = self.memory.clock()
        sent_at = loop.time()
        try:
            answer = await self.portal.search_numbers(phones, slot)
        except BaseException as error:
            self._asked(phones, late, started)
            self._request_failed(phones, reserved, error)
            if not isinstance(error, Exception):
                raise
            return
        self._asked(phones, late, started)
        operating.spend(SEARCH_KEY, -reserved)  # the client counted what the portal reported
        try:
            self.memory.timing.learn(loop.time() - sent_at, len(phones), answer.seconds, self.deadline)
            self.outcomes.answered(answer.outcome)
        except Exception as error:
            self.outcomes.unexpected(phones, error)

    def _request_failed(self, phones: list[str], reserved: float, error: BaseException) -> None:
        if isinstance(error, PortalTimeout):
            # A timed-out search may have run to its end; and a number alone that timed out
            # is slow itself.
            if len(phones) == 1:
                self.memory.timing.slow_seen(phones[0])
        else:
            self.portal.operating.spend(SEARCH_KEY, -reserved)
        if isinstance(error, BitrixError):
            self.outcomes.failed(phones, error)
        elif isinstance(error, Exception):
            self.outcomes.unexpected(phones, error)
        else:
            # Only a real cancellation (the server stopping) or an interpreter exit gets here.
            self.memory.breaker.abandoned()
            self.outcomes.fail(phones, RequestNotSent("cancelled", "the server is stopping"))

    def _asked(self, phones: list[str], late: asyncio.TimerHandle | None, started: float) -> None:
        if late is not None:
            late.cancel()
        for phone in phones:
            if self._asking[phone] > 1:
                self._asking[phone] -= 1
            else:
                del self._asking[phone]
        self.outcomes.request_done(self.memory.clock() - started)

    def _hedge(self, phones: list[str]) -> None:
        """A request is late: its numbers still unanswered are asked again, in smaller requests,
        each only with a rate slot free now that leaves half the burst to first requests."""
        unanswered = [phone for phone in phones if self.waited_for(phone)]
        if not unanswered or self.memory.breaker.state != CLOSED:
            return
        size = 1 if len(unanswered) <= HEDGE_ALONE else math.ceil(math.sqrt(len(unanswered)))
        for start in range(0, len(unanswered), size):
            self.tasks.start(self._ask_again(unanswered[start:start + size]))

    async def _ask_again(self, phones: list[str]) -> None:
        if self.portal.operating.room(SEARCH_KEY) < len(phones) * self.memory.timing.per_search:
            return
        try:
            slot = await self.portal.take_slot(max_wait=0.0, can_wait=True)
        except RequestNotSent:
            return  # no slot to spare: the first request may still answer in time
        log.info("portal lookup of %d number(s) is late; asking for %s again", len(phones), ", ".join(phones))
        await self.ask(phones, slot)
