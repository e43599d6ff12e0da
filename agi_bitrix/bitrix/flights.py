"""Single flight: a burst of calls from one number costs one lookup, on this server (`Flights`)
and across the servers sharing Redis (`SharedFlight`); and the tasks that hold a flight
(`FlightTasks`), which let go of their numbers however they end.

A flight stays registered until its answer or failure is given out: one left behind would make
every later call from its number wait for the deadline, for good. So every task that holds a
number is started with it, and releases it should it end by an exception nobody expected."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from agi_bitrix.bitrix.errors import BitrixError, LocalFault, RequestNotSent
from agi_bitrix.bitrix.memory import LookupMemory
from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.bitrix.shared import POLL_EVERY, SharedStateUnavailable

log = logging.getLogger("agi_bitrix.lookup")

Waiter = asyncio.Future[CrmAnswer | None]


class Flights:
    """Per number being looked up, the callers waiting for its answer. Each caller waits on a
    future of its own, which its deadline may resolve to None (see CrmLookup): giving up cancels
    nothing the others wait on."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[Waiter]] = {}

    def __contains__(self, phone: str) -> bool:
        return phone in self._waiters

    def __len__(self) -> int:
        return len(self._waiters)

    def join(self, phone: str, waiter: Waiter) -> bool:
        """Add a caller's `waiter`; True if it is the number's first (its lookup is to start)."""
        waiters = self._waiters.get(phone)
        if waiters is not None:
            waiters.append(waiter)
            return False
        self._waiters[phone] = [waiter]
        return True

    def given_up(self, phone: str) -> bool:
        """Whether every caller of the number has taken the fallback (true of no flight at all)."""
        return all(waiter.done() for waiter in self._waiters.get(phone, ()))

    def forget(self, phone: str) -> None:
        self._waiters.pop(phone, None)

    def settle(self, phone: str, answer: CrmAnswer) -> None:
        for waiter in self._waiters.pop(phone, ()):
            if not waiter.done():  # done: that caller's deadline passed
                waiter.set_result(answer)

    def fail(self, phone: str, error: BitrixError) -> None:
        for waiter in self._waiters.pop(phone, ()):
            if not waiter.done():
                waiter.set_exception(error)
                # Marked as seen: its caller may be cancelled before it looks, and the
                # failure is logged once per request, not once per forgotten waiter.
                waiter.exception()


class FlightTasks:
    """The lookup's background tasks. One that ends by an exception (or is cancelled) has the
    numbers it holds released through `release`, with the true reason; it is logged here with its
    traceback, not as asyncio's "Task exception was never retrieved" when collected."""

    def __init__(self, release: Callable[[list[str], BitrixError], None]) -> None:
        self._release = release
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, work: Coroutine[Any, Any, None], holding: list[str] | None = None) -> None:
        """Run `work`; `holding`: the numbers whose flight it is to end."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._done(done, holding or []))

    def _done(self, task: asyncio.Task[None], holding: list[str]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self._release(holding, RequestNotSent("cancelled", "the server is stopping"))
        elif (error := task.exception()) is not None:
            log.error("a portal lookup task for %s ended with an unexpected error", ", ".join(holding)
                      or "(no number)", exc_info=error)
            self._release(holding, LocalFault("internal", f"unexpected {type(error).__name__}"))


class SharedFlight:
    """Single flight across servers: the answer another server stored; else wait while another
    asks the portal for it; else (or when Redis fails) ask it here, as without Redis. The numbers
    this server asks for on behalf of all are `claimed` until their answer is shared."""

    def __init__(self, memory: LookupMemory, flights: Flights, tasks: FlightTasks, *, claim_for: float,
                 ask_here: Callable[[str, float], None], unreadable: Callable[[str], None]) -> None:
        """`ask_here(phone, given_up_at)`: queue the number for the portal; `unreadable(phone)`:
        Redis held a value for it of a shape this version cannot read (taken as a miss)."""
        assert memory.shared is not None
        self.shared = memory.shared
        self.cache = memory.cache
        self.flights = flights
        self.tasks = tasks
        self.claim_for = claim_for
        self._ask_here = ask_here
        self._unreadable = unreadable
        self.claimed: set[str] = set()

    async def ask_servers(self, phone: str, given_up_at: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                claim = await self.shared.claim(phone, self.cache.settings, claim_for=self.claim_for)
                if claim.unreadable:
                    self._unreadable(phone)
                if claim.answer is not None:  # fresh, or older for stale use if the portal fails
                    self.cache.store(phone, claim.answer, age=claim.age)
                if claim.fresh and claim.answer is not None:
                    self.flights.settle(phone, claim.answer)
                    return
                if claim.ours:
                    self.claimed.add(phone)
                    break
                if self.flights.given_up(phone):
                    self.flights.forget(phone)  # every caller has taken the fallback
                    return
                await asyncio.sleep(POLL_EVERY)
        except SharedStateUnavailable:
            pass
        if not self.flights.given_up(phone):
            self._ask_here(phone, max(given_up_at, loop.time() + POLL_EVERY))
        else:
            self.flights.forget(phone)

    def share(self, phone: str, answer: CrmAnswer | None) -> None:
        """Store the portal's answer for the other servers (None: none came) and let go of the number."""
        if phone not in self.claimed:
            return
        self.claimed.discard(phone)
        shared, cache = self.shared, self.cache.settings

        async def tell() -> None:
            try:
                if answer is None:
                    await shared.release(phone)
                else:
                    await shared.store(phone, answer, cache)
            except SharedStateUnavailable:
                pass  # the claim runs out by itself; the others ask the portal then
        self.tasks.start(tell())
