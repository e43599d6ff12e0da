"""Asking the portal who owns a number, without hurting the call or the portal.

Order of business for one lookup: a fresh cached answer; else join a request already in flight
for the same number (single flight: a burst of calls from one number costs one request); else
wait for the next request, if the circuit breaker and the rate limiter allow one within the
caller's deadline. Numbers that arrive while requests are on their way (or wait for a rate
slot) leave together in one `batch` request of up to 50: a campaign bringing many new numbers
at once costs few of the portal's ~2 requests a second. The portal runs a batch's searches one
after another, so a batch is only as big as the time left to its oldest caller allows, by the
time per search learned from the portal's answers; a late batch is asked again in smaller
requests while rate slots are free (the first answer wins), and a number that is slow again and
again travels alone. When the portal cannot answer in time, a stale cached answer stands in if
there is one; otherwise the call gets status ERROR with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agi_bitrix.bitrix.breaker import CLOSED, OPEN, CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import SEARCH_KEY, RequestSlot, SearchAnswer
from agi_bitrix.bitrix.errors import (
    BitrixError,
    LocalFault,
    PortalError,
    PortalMisconfigured,
    PortalTimeout,
    RequestNotSent,
    RequestRejected,
)
from agi_bitrix.bitrix.models import CrmAnswer, CrmEntity
from agi_bitrix.bitrix.operating import OperatingBudget
from agi_bitrix.bitrix.shared import POLL_EVERY, SharedAnswers, SharedStateUnavailable

log = logging.getLogger("agi_bitrix.lookup")

# Numbers per `batch` request (the portal's maximum), and requests on their way at once: with
# batches that take most of the deadline, the portal's 2 requests a second keep ~3 out at once.
MAX_BATCH = 50
MAX_REQUESTS_IN_FLIGHT = 4
# A further request leaves only once the last one has been out this long: a portal answering
# quickly then takes the numbers behind it in the next batch (fewer requests of its ~2 a
# second, less work here), and a slow one still cannot hold them for more than this.
SECOND_REQUEST_AFTER = 0.05
# A request is late at this many times its predicted time plus this share of the deadline; its
# unanswered numbers are then asked again in groups of about the square root of their count
# (all alone when at most HEDGE_ALONE), so two rounds find one slow number among 50.
LATE_FACTOR = 1.5
LATE_SHARE = 0.05
HEDGE_ALONE = 8
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


class CrmSearch(Protocol):
    """What the lookup needs of the portal client (agi_bitrix.bitrix.client.PortalClient)."""

    @property
    def operating(self) -> OperatingBudget: ...

    async def take_slot(self, max_wait: float, can_wait: bool = False) -> RequestSlot: ...

    async def search_numbers(self, phones: list[str], slot: RequestSlot) -> SearchAnswer: ...


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
        self.timing = memory.timing
        # Per number being looked up, the callers waiting for its answer (single flight: one
        # request however many wait); in arrival order, those not yet taken into a request, with
        # their first caller's deadline (loop time); and how many requests are asking for each.
        self._flights: dict[str, list[asyncio.Future[CrmAnswer | None]]] = {}
        self._waiting: dict[str, float] = {}
        self._asking: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._gathering = False  # a sender is waiting for its slot: new numbers join its request
        self._in_flight = 0  # requests out (hedges not counted)
        self._last_sent = 0.0  # loop time the latest request left
        self._next_sender: asyncio.TimerHandle | None = None
        self.shared = memory.shared
        self._claimed: set[str] = set()  # numbers this server asks for on behalf of all servers

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
        waiter = loop.create_future()
        given_up_at = loop.time() + self.deadline
        deadline = loop.call_at(given_up_at, _give_up, waiter)
        waiters = self._flights.get(phone)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._flights[phone] = [waiter]
            if self.shared is not None and self.shared.link.up:
                self._track(self._ask_servers(phone, given_up_at), holding=[phone])
            else:
                self._waiting[phone] = given_up_at
                self._start_sender_when_due()
        try:
            answer = await waiter
        except BitrixError as error:
            return self._fallback(phone, error.reason)
        finally:
            deadline.cancel()
        return answer if answer is not None else self._fallback(phone, "timeout")

    async def _ask_servers(self, phone: str, given_up_at: float) -> None:
        """Single flight across servers: the answer another server stored; else wait while another
        asks the portal for it; else (or when Redis fails) ask it here, as without Redis."""
        assert self.shared is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                claim = await self.shared.claim(phone, self.cache.settings, claim_for=self.deadline)
                if claim.unreadable:
                    self._unreadable(phone)
                if claim.answer is not None:  # fresh, or older for stale use if the portal fails
                    self.cache.store(phone, claim.answer, age=claim.age)
                if claim.fresh and claim.answer is not None:
                    self._settle(phone, claim.answer)
                    return
                if claim.ours:
                    self._claimed.add(phone)
                    break
                if all(waiter.done() for waiter in self._flights.get(phone, ())):
                    self._flights.pop(phone, None)  # every caller has taken the fallback
                    return
                await asyncio.sleep(POLL_EVERY)
        except SharedStateUnavailable:
            pass
        if not all(waiter.done() for waiter in self._flights.get(phone, ())):
            self._waiting[phone] = max(given_up_at, loop.time() + POLL_EVERY)
            self._start_sender_when_due()
        else:
            self._flights.pop(phone, None)

    def _unreadable(self, phone: str) -> None:
        self.observer.shared_answer_unreadable()
        if not self.memory.unreadable_logged:
            self.memory.unreadable_logged = True
            log.warning("cannot read the answer for %s in Redis (another version of agi-bitrix wrote it?):"
                        " asking the portal instead and storing its answer; further ones are only counted"
                        " (agi_bitrix_shared_answers_unreadable_total)", phone)

    def _share(self, phone: str, answer: CrmAnswer | None) -> None:
        """Store the portal's answer for the other servers (None: none came) and let go of the number."""
        if self.shared is None or phone not in self._claimed:
            return
        self._claimed.discard(phone)
        shared, cache = self.shared, self.cache.settings

        async def tell() -> None:
            try:
                if answer is None:
                    await shared.release(phone)
                else:
                    await shared.store(phone, answer, cache)
            except SharedStateUnavailable:
                pass  # the claim runs out by itself; the others ask the portal then
        self._track(tell())

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

    def _start_sender_when_due(self) -> None:
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
        self._track(self._send_waiting())

    def _sender_due(self) -> None:
        self._next_sender = None
        self._start_sender_when_due()

    def _track(self, work: Coroutine[Any, Any, None], holding: list[str] | None = None) -> None:
        """Run `work` as a task; `holding`: the numbers whose flight it is to end, which are released
        (their callers answered at once) should it end by an exception, whatever it is."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._task_done(done, holding or []))

    def _task_done(self, task: asyncio.Task[None], holding: list[str]) -> None:
        self._tasks.discard(task)
        # A safety net: every task turns the failures it expects into answers for its callers.
        # One it did not expect is logged here with its traceback (not as asyncio's "Task exception
        # was never retrieved"), and its numbers are let go: a flight left registered would make
        # every later call from the number wait for its deadline, for good.
        if task.cancelled():
            self._fail(holding, RequestNotSent("cancelled", "the server is stopping"))
        elif (error := task.exception()) is not None:
            log.error("a portal lookup task for %s ended with an unexpected error", ", ".join(holding)
                      or "(no number)", exc_info=error)
            self._fail(holding, LocalFault("internal", f"unexpected {type(error).__name__}"))

    async def _send_waiting(self) -> None:
        """One request for the numbers waiting. While it waits for a rate slot, new numbers join
        it; once it is out, the next sender may gather the numbers behind it."""
        try:
            chosen = await self._gather()
        finally:
            self._gathering = False
        if chosen is None:
            self._start_sender_when_due()
            return
        phones, slot = chosen
        self._in_flight += 1
        self._last_sent = asyncio.get_running_loop().time()
        self._start_sender_when_due()
        try:
            await self._ask(phones, slot)
        finally:
            self._in_flight -= 1
            self._start_sender_when_due()

    async def _gather(self) -> tuple[list[str], RequestSlot] | None:
        """A rate slot and the numbers for it, or None when they all got their answer otherwise."""
        if not self.breaker.allow():
            self._fail(list(self._waiting), RequestNotSent(
                "circuit_open", "the portal failed repeatedly; not asking it until the cool-down ends"))
            return None
        try:
            await self._wait_for_operating_time()
            slot = await self.portal.take_slot(max_wait=self.deadline)
        except RequestNotSent as error:
            self.breaker.abandoned()
            self._fail(list(self._waiting), error)
            return None
        except Exception as error:
            self._unexpected(list(self._waiting), error)
            return None
        except BaseException:
            self.breaker.abandoned()
            raise
        phones = self._choose()
        if not phones:  # every number waiting was failed while this sender waited
            self.breaker.abandoned()
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
        wait = operating.wait_for(SEARCH_KEY, self.timing.per_search)
        if wait <= 0:
            return
        now = asyncio.get_running_loop().time()
        late = [phone for phone, deadline in self._waiting.items()
                if now + wait + self.timing.predict(1) > deadline]
        self._fail(late, RequestNotSent("operating_limit", "searches are paced to stay within the portal's"
                                                           " operating-time budget; no room before the deadline"))
        if self._waiting:
            await asyncio.sleep(wait)

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
        if self.timing.travels_alone(oldest):
            return [oldest]
        batchable = [(phone, deadline) for phone, deadline in self._waiting.items()
                     if not self.timing.travels_alone(phone)]
        most = min(MAX_BATCH, len(batchable),
                   max(1, math.floor(self.portal.operating.room(SEARCH_KEY) / self.timing.per_search)))
        left = batchable[0][1] - now
        oldest_first = min(most, self.timing.fitting(left)) if left >= self.timing.predict(1) else 0
        newest_first = 0
        for count, (_, deadline) in enumerate(reversed(batchable), start=1):
            if count > most or deadline - now < self.timing.predict(count):
                break
            newest_first = count
        if oldest_first and oldest_first >= newest_first:
            return [phone for phone, _ in batchable[:oldest_first]]
        # Nobody can be answered in time: the newest still goes, for the cache and later callers.
        return [phone for phone, _ in batchable[-max(1, newest_first):]]

    def _drop_given_up(self, now: float) -> None:
        """Forget the waiting numbers whose every caller has taken the fallback."""
        for phone, _ in list(itertools.takewhile(lambda item: item[1] <= now, self._waiting.items())):
            if all(waiter.done() for waiter in self._flights.get(phone, ())):
                del self._waiting[phone]
                self._flights.pop(phone, None)

    async def _ask(self, phones: list[str], slot: RequestSlot) -> None:
        """Send one request and give its answers to whoever still waits for them."""
        loop = asyncio.get_running_loop()
        operating = self.portal.operating
        predicted = self.timing.predict(len(phones))
        reserved = len(phones) * self.timing.per_search  # what the portal will count, until it says
        operating.spend(SEARCH_KEY, reserved)
        for phone in phones:
            self._asking[phone] = self._asking.get(phone, 0) + 1
        late = None
        if self.breaker.state == CLOSED and len(phones) > 1:  # alone, a number delays nobody else
            late = loop.call_later(LATE_FACTOR * predicted + LATE_SHARE * self.deadline, self._hedge, phones)
        started = self._clock()
        sent_at = loop.time()
        try:
            answer = await self.portal.search_numbers(phones, slot)
        except BaseException as error:
            self._asked(phones, late, started)
            if isinstance(error, PortalTimeout):
                # A timed-out search may have run to its end; and a number alone that timed out
                # is slow itself.
                if len(phones) == 1:
                    self.timing.slow_seen(phones[0])
            else:
                operating.spend(SEARCH_KEY, -reserved)
            if isinstance(error, BitrixError):
                self._request_failed(phones, error)
            elif isinstance(error, Exception):
                self._unexpected(phones, error)
            else:
                # Only a real cancellation (the server stopping) or an interpreter exit gets here.
                self.breaker.abandoned()
                self._fail(phones, RequestNotSent("cancelled", "the server is stopping"))
                raise
            return
        self._asked(phones, late, started)
        operating.spend(SEARCH_KEY, -reserved)  # the client counted what the portal reported
        try:
            self.timing.learn(loop.time() - sent_at, len(phones), answer.seconds, self.deadline)
            self._answered(answer.outcome)
        except Exception as error:
            self._unexpected(phones, error)

    def _asked(self, phones: list[str], late: asyncio.TimerHandle | None, started: float) -> None:
        if late is not None:
            late.cancel()
        for phone in phones:
            if self._asking[phone] > 1:
                self._asking[phone] -= 1
            else:
                del self._asking[phone]
        self.observer.portal_request_done(self._clock() - started)

    def _hedge(self, phones: list[str]) -> None:
        """A request is late: its numbers still unanswered are asked again, in smaller requests,
        each only with a rate slot free now that leaves half the burst to first requests. The
        first answer wins; a slow number ends up alone, the others are answered around it."""
        unanswered = [phone for phone in phones if phone in self._flights]
        if not unanswered or self.breaker.state != CLOSED:
            return
        size = 1 if len(unanswered) <= HEDGE_ALONE else math.ceil(math.sqrt(len(unanswered)))
        for start in range(0, len(unanswered), size):
            self._track(self._ask_again(unanswered[start:start + size]))

    async def _ask_again(self, phones: list[str]) -> None:
        if self.portal.operating.room(SEARCH_KEY) < len(phones) * self.timing.per_search:
            return
        try:
            slot = await self.portal.take_slot(max_wait=0.0, can_wait=True)
        except RequestNotSent:
            return  # no slot to spare: the first request may still answer in time
        log.info("portal lookup of %d number(s) is late; asking for %s again", len(phones), ", ".join(phones))
        await self._ask(phones, slot)

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
            self._share(phone, CrmAnswer(status, found, cache="hit"))
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
            if phone in self._asking:  # another request may still answer it
                continue
            self._share(phone, None)
            for waiter in self._flights.pop(phone, ()):
                if not waiter.done():
                    waiter.set_exception(error)
                    # Marked as seen: its caller may be cancelled before it looks, and the
                    # failure is logged once per request, not once per forgotten waiter.
                    waiter.exception()


def _give_up(waiter: asyncio.Future[CrmAnswer | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
