"""When requests leave and which numbers each takes. Numbers that arrive while requests are on
their way (or wait for a rate slot) leave together in one `batch` request of up to 50: a campaign
bringing many new numbers at once costs few of the portal's ~2 requests a second. A batch is only
as big as the time left to its oldest caller allows, by the time per search learned from the
portal's answers, and as the portal's operating-time budget allows; a number that is slow again
and again travels alone."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agi_bitrix.bitrix.client import SEARCH_KEY, RequestSlot
from agi_bitrix.bitrix.errors import RequestNotSent
from agi_bitrix.bitrix.flights import Flights, FlightTasks
from agi_bitrix.bitrix.hedging import CrmSearch, RequestOutcomes
from agi_bitrix.bitrix.memory import MAX_BATCH, LookupMemory

# Requests on their way at once: with batches that take most of the deadline, the portal's 2
# requests a second keep ~3 out at once.
MAX_REQUESTS_IN_FLIGHT = 4
# A further request leaves only once the last one has been out this long: a portal answering
# quickly then takes the numbers behind it in the next batch (fewer requests of its ~2 a
# second, less work here), and a slow one still cannot hold them for more than this.
SECOND_REQUEST_AFTER = 0.05


@dataclass(eq=False, kw_only=True)
class Batcher:
    """The numbers waiting for a request, and the senders that take them to the portal."""

    portal: CrmSearch
    memory: LookupMemory  # the breaker and the portal's speed
    deadline: float
    flights: Flights
    send: Callable[[list[str], RequestSlot], Awaitable[None]]  # one request; never raises but on a stop
    outcomes: RequestOutcomes
    tasks: FlightTasks
    # In arrival order, the numbers not yet taken into a request, with their first caller's
    # deadline (loop time).
    _waiting: dict[str, float] = field(default_factory=dict, init=False)
    _gathering: bool = field(default=False, init=False)  # a sender waits for its slot: new numbers join it
    _in_flight: int = field(default=0, init=False)  # requests out (hedges not counted)
    _last_sent: float = field(default=0.0, init=False)  # loop time the latest request left
    _next_sender: asyncio.TimerHandle | None = field(default=None, init=False)

    def __contains__(self, phone: str) -> bool:
        return phone in self._waiting

    def add(self, phone: str, given_up_at: float) -> None:
        """Queue a number for the portal, its first caller giving up at `given_up_at` (loop time)."""
        self._waiting[phone] = given_up_at
        self.start_when_due()

    def forget(self, phone: str) -> None:
        self._waiting.pop(phone, None)

    def start_when_due(self) -> None:
        """A sender for the waiting numbers: at once when no request is out; else once the latest
        has been out SECOND_REQUEST_AFTER (numbers behind a quick answer join the next batch)."""
        if not self._waiting or self._gathering or self._in_flight >= MAX_REQUESTS_IN_FLIGHT:
            return
        loop = asyncio.get_running_loop()
        due = self._last_sent + SECOND_REQUEST_AFTER if self._in_flight else 0.0
        if due > loop.time():
            if self._next_sender is None:
                self._next_sender = loop.call_at(due, self._sender_due)
            return
        if self._next_sender is not None:
            self._next_sender.cancel()
            self._next_sender = None
        self._gathering = True
        self.tasks.start(self._send_waiting())

    def _sender_due(self) -> None:
        self._next_sender = None
        self.start_when_due()

    async def _send_waiting(self) -> None:
        """One request for the numbers waiting. While it waits for a rate slot, new numbers join
        it; once it is out, the next sender may gather the numbers behind it."""
        try:
            chosen = await self._gather()
        finally:
            self._gathering = False
        if chosen is None:
            self.start_when_due()
            return
        phones, slot = chosen
        self._in_flight += 1
        self._last_sent = asyncio.get_running_loop().time()
        try:
            self.start_when_due()
            await self.send(phones, slot)
        finally:
            self._in_flight -= 1
            self.start_when_due()

    async def _gather(self) -> tuple[list[str], RequestSlot] | None:
        """A rate slot and the numbers for it, or None when they all got their answer otherwise."""
        if not self.memory.breaker.allow():
            self._fail(list(self._waiting), RequestNotSent(
                "circuit_open", "the portal failed repeatedly; not asking it until the cool-down ends"))
            return None
        try:
            await self._wait_for_operating_time()
            slot = await self.portal.take_slot(max_wait=self.deadline)
            phones = self._choose()
        except RequestNotSent as error:
            self.memory.breaker.abandoned()
            self._fail(list(self._waiting), error)
            return None
        except Exception as error:
            phones = list(self._waiting)
            self._waiting.clear()
            self.outcomes.unexpected(phones, error)
            return None
        except BaseException:
            self.memory.breaker.abandoned()
            raise
        if not phones:  # every number waiting was failed while this sender waited
            self.memory.breaker.abandoned()
            return None
        for phone in phones:
            del self._waiting[phone]
        return phones, slot

    async def _wait_for_operating_time(self) -> None:
        """Wait until the portal's operating-time budget has room for a search (see operating);
        the numbers that cannot wait that long get the fallback at once."""
        operating = self.portal.operating
        held = operating.held_for(SEARCH_KEY)
        if held > 0:
            raise RequestNotSent("operating_limit", f"searches used up their operating time at the portal;"
                                                    f" not asking it for {held:.0f} s more")
        wait = operating.wait_for(SEARCH_KEY, self.memory.timing.per_search)
        if wait <= 0:
            return
        now = asyncio.get_running_loop().time()
        late = [phone for phone, deadline in self._waiting.items()
                if now + wait + self.memory.timing.predict(1) > deadline]
        self._fail(late, RequestNotSent("operating_limit", "searches are paced to stay within the"
                                                                    " portal's operating-time budget; no room"
                                                                    " before the deadline"))
        if self._waiting:
            await asyncio.sleep(wait)

    def _fail(self, phones: list[str], error: RequestNotSent) -> None:
        for phone in phones:
            self._waiting.pop(phone, None)
        self.outcomes.fail(phones, error)

    def _choose(self) -> list[str]:
        """The waiting numbers for one request: a slow number alone; else as many as fit the
        operating time we may spend and the time left to the oldest of them. Oldest first, unless
        the newest make a bigger batch that still answers every one in time: when the portal
        falls behind, serving those whose time is nearly out would leave everyone late."""
        now = asyncio.get_running_loop().time()
        self._drop_given_up(now)
        if not self._waiting:
            return []
        oldest = next(iter(self._waiting))
        if self.memory.timing.travels_alone(oldest):
            return [oldest]
        batchable = [(phone, deadline) for phone, deadline in self._waiting.items()
                     if not self.memory.timing.travels_alone(phone)]
        most = min(MAX_BATCH, len(batchable),
                   max(1, math.floor(self.portal.operating.room(SEARCH_KEY) / self.memory.timing.per_search)))
        left = batchable[0][1] - now
        oldest_first = min(most, self.memory.timing.fitting(left)) if left >= self.memory.timing.predict(1) else 0
        newest_first = 0
        for count, (_, deadline) in enumerate(reversed(batchable), start=1):
            if count > most or deadline - now < self.memory.timing.predict(count):
                break
            newest_first = count
        if oldest_first and oldest_first >= newest_first:
            return [phone for phone, _ in batchable[:oldest_first]]
        # Nobody can be answered in time: the newest still goes, for the cache and later callers.
        return [phone for phone, _ in batchable[-max(1, newest_first):]]

    def _drop_given_up(self, now: float) -> None:
        """Forget the waiting numbers whose every caller has taken the fallback."""
        for phone, _ in list(itertools.takewhile(lambda item: item[1] <= now, self._waiting.items())):
            if self.flights.given_up(phone):
                del self._waiting[phone]
                self.flights.forget(phone)
