"""Cache, rate limiter, circuit breaker and the lookup that combines them."""

import asyncio
import time

import pytest

from agi_bitrix.bitrix.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.lookup import SECOND_REQUEST_AFTER, CrmLookup, LookupMemory, SearchTiming
from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.bitrix.operating import BURST_SHARE, SUSTAINED_SHARE, OperatingBudget
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.bitrix.settings import BitrixSettings, CacheSettings
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


FOUND = CrmAnswer("FOUND", ())
NOT_FOUND = CrmAnswer("NOT_FOUND")
DEFAULT_CACHE = CacheSettings()


def test_cache_ttls_and_stale_age():
    clock = Clock()
    cache = AnswerCache(CacheSettings(found_ttl=60, not_found_ttl=10, stale_for=600), clock)
    cache.store("1", FOUND)
    cache.store("2", NOT_FOUND)
    cache.store("3", CrmAnswer("ERROR", error="timeout"))  # failures are never cached
    assert cache.fresh("1") is FOUND and cache.fresh("2") is NOT_FOUND and cache.fresh("3") is None
    clock.now += 30
    assert cache.fresh("1") is FOUND and cache.fresh("2") is None
    assert cache.stale("2") is NOT_FOUND
    clock.now += 600
    assert cache.fresh("1") is None and cache.stale("1") is None and len(cache) == 1


def test_cache_is_bounded_least_recently_used_first():
    cache = AnswerCache(CacheSettings(max_entries=2), Clock())
    cache.store("1", FOUND)
    cache.store("2", FOUND)
    cache.fresh("1")
    cache.store("3", FOUND)
    assert cache.fresh("2") is None and cache.fresh("1") and cache.fresh("3")
    off = AnswerCache(CacheSettings(max_entries=0), Clock())
    off.store("1", FOUND)
    assert len(off) == 0


def test_limiter_allows_a_burst_then_the_drain_rate():
    clock = Clock()
    limiter = RateLimiter(per_second=2, burst=5, clock=clock)
    assert [limiter.reserve(max_wait=0) for _ in range(5)] == [0.0] * 5
    assert limiter.reserve(max_wait=0) is None  # the bucket is full and we cannot wait
    assert limiter.reserve(max_wait=1.0) == pytest.approx(0.5)
    assert limiter.reserve(max_wait=1.0) == pytest.approx(1.0)
    assert limiter.reserve(max_wait=1.0) is None  # 1.5 s away: not booked
    clock.now += 10
    assert limiter.reserve(max_wait=0) == 0.0


def test_limiter_never_exceeds_the_portal_bucket():
    """Simulate the portal's own leaky bucket and check we never overflow it."""
    clock = Clock()
    limiter = RateLimiter(per_second=2, burst=50, clock=clock)
    level, sent = 0.0, 0
    for _ in range(2000):  # 200 s of offered load at 10 requests/s
        clock.now += 0.1
        level = max(0.0, level - 0.2)
        wait = limiter.reserve(max_wait=0)
        if wait is not None:
            level += 1
            sent += 1
            assert level <= 50
    assert 390 <= sent <= 460  # ~2/s plus the initial burst


def test_limiter_backs_off_longer_each_time_and_recovers():
    clock = Clock()
    limiter = RateLimiter(per_second=2, burst=10, clock=clock)
    assert limiter.back_off() == 2.0
    assert limiter.reserve(max_wait=1.9) is None
    assert limiter.back_off() == 4.0
    clock.now += 4
    assert limiter.reserve(max_wait=0) == 0.0
    limiter.succeeded()
    assert limiter.back_off() == 2.0


def test_breaker_opens_probes_and_recovers():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cool_down=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    breaker.succeeded()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 10
    assert breaker.allow() and breaker.state == HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.failed()
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 10
    assert breaker.allow()
    breaker.abandoned()
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == CLOSED and breaker.allow()


def settings(**bitrix):
    defaults = {"webhook_url": "", "deadline": 0.5, "rate_per_second": 1000.0, "rate_burst": 1000,
                "breaker_failures": 3, "breaker_cool_down": 0.3}
    defaults.update(bitrix)
    return BitrixSettings(**defaults)


@pytest.fixture
async def make_lookup(portal):
    async with make_session() as session:
        def build(cache=DEFAULT_CACHE, **bitrix):
            given = settings(**bitrix)
            budget = RateLimiter(given.rate_per_second, given.rate_burst)
            client = PortalClient(portal.webhook_url, session, timeout=given.deadline, budget=budget)
            memory = LookupMemory(AnswerCache(cache),
                                  CircuitBreaker(given.breaker_failures, given.breaker_cool_down))
            return CrmLookup(client, memory, deadline=given.deadline)
        yield build


async def test_cache_hit_spares_the_portal(make_lookup, portal):
    lookup = make_lookup()
    first = await lookup.lookup("79161234567")
    second = await lookup.lookup("79161234567")
    assert (first.status, first.cache, second.status, second.cache) == ("FOUND", "miss", "FOUND", "hit")
    assert len(portal.requests) == 1
    missing = [await lookup.lookup("79990000000") for _ in range(3)]
    assert [a.cache for a in missing] == ["miss", "hit", "hit"] and len(portal.requests) == 2


async def test_single_flight_shares_one_request(make_lookup, portal):
    lookup = make_lookup()
    portal.fail("slow", delay=0.2)
    answers = await asyncio.gather(*(lookup.lookup("79161234567") for _ in range(50)))
    assert {a.status for a in answers} == {"FOUND"}
    assert len(portal.requests) == 1


async def test_stale_answer_when_the_portal_fails(make_lookup, portal):
    lookup = make_lookup(cache=CacheSettings(found_ttl=0.01, stale_for=60))
    await lookup.lookup("79161234567")
    await asyncio.sleep(0.02)
    portal.fail("html", status=502)
    answer = await lookup.lookup("79161234567")
    assert (answer.status, answer.cache, answer.error) == ("FOUND", "stale", "http_502")
    assert answer.entities[0].entity_id == "12"
    unknown = await lookup.lookup("79262345678")
    assert (unknown.status, unknown.error) == ("ERROR", "http_502")


async def test_stale_answer_stands_in_for_a_hung_portal_at_the_deadline(make_lookup, portal):
    lookup = make_lookup(cache=CacheSettings(found_ttl=0.01), deadline=0.3)
    await lookup.lookup("79161234567")
    await asyncio.sleep(0.02)
    portal.fail("hang")
    started = time.monotonic()
    answer = await lookup.lookup("79161234567")
    assert (answer.cache, answer.error) == ("stale", "timeout")
    assert time.monotonic() - started < 0.3 + 0.2


async def test_breaker_fails_fast_then_recovers_by_itself(make_lookup, portal):
    lookup = make_lookup(breaker_failures=3, breaker_cool_down=0.3)
    portal.fail("error", status=500, code="INTERNAL_SERVER_ERROR", description="down")
    for n in range(3):
        assert (await lookup.lookup(f"7916000000{n}")).error == "INTERNAL_SERVER_ERROR"
    assert lookup.breaker.state == OPEN
    asked = len(portal.requests)
    answers = [await lookup.lookup(f"7926000000{n}") for n in range(5)]
    assert {a.error for a in answers} == {"circuit_open"} and len(portal.requests) == asked
    portal.reset_faults()
    await asyncio.sleep(0.35)
    assert (await lookup.lookup("79161234567")).status == "FOUND"  # the probe
    assert lookup.breaker.state == CLOSED


async def test_limiter_sends_calls_to_fallback_instead_of_overloading_the_portal(make_lookup, portal):
    lookup = make_lookup(rate_per_second=2, rate_burst=3, deadline=0.2)
    # One after another: no batching to hide behind.
    answers = [await lookup.lookup(f"7916000{n:04d}") for n in range(6)]
    assert [a.status for a in answers[:3]] == ["NOT_FOUND"] * 3
    assert [a.error for a in answers[3:]] == ["rate_limited"] * 3
    assert len(portal.requests) == 3


async def test_a_burst_of_new_numbers_leaves_in_batches(make_lookup, portal):
    lookup = make_lookup(rate_per_second=2, rate_burst=3, deadline=1.0)
    numbers = ["79161234567", "79262345678"] + [f"7916000{n:04d}" for n in range(58)]
    answers = await asyncio.gather(*(lookup.lookup(number) for number in numbers))
    assert [a.status for a in answers[:2]] == ["FOUND", "FOUND"]
    assert answers[0].entities[0].entity_id == "12" and answers[1].entities[0].owner.user_id == "2"
    assert all(a.status == "NOT_FOUND" for a in answers[2:])
    batches = portal.requests_for("batch")
    assert len(portal.requests) <= 3 and batches  # 60 numbers within the 3-request burst
    assert max(len(r.params["cmd"]) for r in batches) <= 50


async def test_numbers_behind_a_quick_request_wait_for_it_and_leave_together(make_lookup, portal):
    lookup = make_lookup()
    portal.fail("slow", delay=SECOND_REQUEST_AFTER / 2)

    async def later(delay, number):
        await asyncio.sleep(delay)
        return await lookup.lookup(number)

    # One after another while the first request is out: no second request for each of them.
    answers = await asyncio.gather(lookup.lookup("79161234567"),
                                   *(later(0.005 * n, f"7916000{n:04d}") for n in range(1, 5)))
    assert [a.status for a in answers] == ["FOUND"] + ["NOT_FOUND"] * 4
    assert len(portal.requests) == 2 and len(portal.requests[1].params["cmd"]) == 4


async def test_a_number_right_after_an_answer_is_sent_at_once(make_lookup, portal):
    # The sender that just answered is finished, not busy: the next number must not wait for
    # a second sender as if a request were still out.
    lookup = make_lookup()
    started = time.monotonic()
    for n in range(10):
        assert (await lookup.lookup(f"7916000{n:04d}")).status == "NOT_FOUND"
    assert time.monotonic() - started < 10 * SECOND_REQUEST_AFTER / 2


async def test_a_slow_request_does_not_hold_the_numbers_behind_it(make_lookup, portal):
    lookup = make_lookup(deadline=2.0)
    portal.fail("slow", delay=0.4)
    first = asyncio.create_task(lookup.lookup("79161234567"))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    second = await lookup.lookup("79262345678")
    # It left SECOND_REQUEST_AFTER after the first, not when the first came back.
    assert time.monotonic() - started < 0.4 + SECOND_REQUEST_AFTER + 0.1
    assert second.status == "FOUND" and (await first).status == "FOUND"
    assert len(portal.requests) == 2


async def test_one_refused_number_in_a_batch_fails_alone(make_lookup, portal):
    lookup = make_lookup()
    portal.fail("error", status=400, code="ERROR_CORE", description="PHONE_NUMBER is empty", phone="79990000000")
    portal.fail("slow", delay=0.2, times=1)  # holds the first request so the rest gather
    first = asyncio.create_task(lookup.lookup("79031234567"))
    await asyncio.sleep(0.05)
    rest = await asyncio.gather(*(lookup.lookup(n) for n in ("79990000000", "79161234567", "79262345678")))
    await first
    assert [a.status for a in rest] == ["ERROR", "FOUND", "FOUND"] and rest[0].error == "ERROR_CORE"
    assert portal.requests_for("batch") and lookup.breaker.state == CLOSED


async def test_a_failed_batch_fails_every_number_in_it(make_lookup, portal):
    lookup = make_lookup()
    portal.fail("slow", delay=0.2, times=1)
    first = asyncio.create_task(lookup.lookup("79031234567"))
    await asyncio.sleep(0.05)
    portal.fail("html", status=502)
    rest = await asyncio.gather(*(lookup.lookup(n) for n in ("79161234567", "79262345678")))
    assert (await first).status == "FOUND"
    assert [a.error for a in rest] == ["http_502", "http_502"]
    assert len(portal.requests_for("batch")) == 1


async def test_query_limit_exceeded_pauses_requests(make_lookup, portal):
    lookup = make_lookup(breaker_failures=100)
    portal.fail("error", status=503, code="QUERY_LIMIT_EXCEEDED", description="Too many requests", times=1)
    assert (await lookup.lookup("79161234567")).error == "QUERY_LIMIT_EXCEEDED"
    answer = await lookup.lookup("79262345678")  # the portal would answer, but we hold back 2 s
    assert answer.error == "rate_limited" and len(portal.requests) == 1


async def test_repeated_callers_inside_one_ttl_cost_one_request_each(make_lookup, portal):
    lookup = make_lookup()
    numbers = ["79161234567", "79262345678", "74957654321", "79031234567", "79857778899",
               "79104445566", "78123334455", "79201112233", "79651239876", "79990001122"]
    await asyncio.gather(*(lookup.lookup(numbers[i % 10]) for i in range(1000)))
    assert len(portal.requests) <= 10


async def test_rejected_requests_do_not_open_the_breaker(make_lookup, portal):
    """The portal answering 400 ERROR_CORE for one odd number is not an outage."""
    lookup = make_lookup(breaker_failures=3)
    portal.fail("error", status=400, code="ERROR_CORE", description="PHONE_NUMBER is empty", phone="79990000000")
    for _ in range(5):
        assert (await lookup.lookup("79990000000")).error == "ERROR_CORE"
    assert lookup.breaker.state == CLOSED and lookup.memory.last_failure is None
    assert (await lookup.lookup("79161234567")).status == "FOUND"


# -- a portal that takes time: batches that fit the deadline ----------------------------------
# Time is scaled down by half from a real portal (50 ms round trip, the 2/s·50 bucket, 2 s
# deadline): 25 ms round trip, 4 requests/s, a 1 s deadline.

KNOWN_OWNER = SAMPLE_CRM["79161234567"]


@pytest.fixture
async def timed_portal(make_portal):
    return await make_portal(rate_limit=(4.0, 50), round_trip=0.025)


@pytest.fixture
async def timed_lookup(timed_portal):
    async with make_session() as session:
        budget = RateLimiter(4.0, 40)
        client = PortalClient(timed_portal.webhook_url, session, timeout=1.0, budget=budget)
        memory = LookupMemory(AnswerCache(DEFAULT_CACHE), CircuitBreaker(5, 10))
        yield CrmLookup(client, memory, deadline=1.0)


def spend_the_burst(lookup):
    """As on a server that has been busy for a while: every further slot is one the rate allows."""
    while lookup.portal.budget.reserve(max_wait=0) is not None:
        pass


def known_callers(portal, count, first=0):
    numbers = [f"7903{first + n:07d}" for n in range(count)]
    for number in numbers:
        portal.set_client(number, KNOWN_OWNER)
    return numbers


async def test_a_slow_batch_mate_sinks_nobody_else(timed_lookup, timed_portal):
    """22 callers together, one whose search takes longer than the deadline (a number with
    thousands of duplicates): only that one takes the fallback."""
    timed_portal.search_time = 0.0075
    await timed_lookup.lookup("79161234567")  # a running server has learned the portal's speed
    numbers = known_callers(timed_portal, 22)
    timed_portal.set_search_time(numbers[7], 2.0)
    started = time.monotonic()
    answers = await asyncio.gather(*(timed_lookup.lookup(number) for number in numbers))
    slow = answers.pop(7)
    assert (slow.status, slow.error) == ("ERROR", "timeout")
    assert [answer.status for answer in answers] == ["FOUND"] * 21
    assert time.monotonic() - started < 1.0 + 0.5
    # The others were asked again around the slow one; it ended up alone.
    alone = [r for r in timed_portal.requests_for("telephony.externalCall.searchCrmEntities")
             if r.params.get("PHONE_NUMBER") == numbers[7]]
    assert alone


async def test_a_slower_crm_still_routes_nearly_every_caller(timed_lookup, timed_portal):
    """40 ms per search at 60 new callers a second (here 20 ms at 120/s): batches of ~50 would
    take past the deadline; batches sized to it route nearly everyone."""
    timed_portal.search_time = 0.02
    await timed_lookup.lookup("79161234567")
    spend_the_burst(timed_lookup)
    numbers = known_callers(timed_portal, 360)
    calls = []
    started = time.monotonic()
    for index, number in enumerate(numbers):
        await asyncio.sleep(max(0.0, started + index / 120 - time.monotonic()))
        calls.append(asyncio.create_task(timed_lookup.lookup(number)))
    answers = await asyncio.gather(*calls)
    found = sum(answer.status == "FOUND" for answer in answers)
    assert found >= 0.9 * len(numbers), (found, {answer.error for answer in answers})
    assert timed_portal.refusals == {}
    batches = timed_portal.requests_for("batch")
    assert max(len(r.params["cmd"]) for r in batches) * 0.02 < 1.0  # no batch longer than the deadline


# -- the operating-time budget ------------------------------------------------------------------


def test_operating_budget_paces_a_method_and_holds_it_on_the_portals_word():
    clock, wall = Clock(), Clock()
    budget = OperatingBudget(limit=100.0, window=100.0, clock=clock, wall_clock=wall)
    assert budget.room("m") == pytest.approx(BURST_SHARE * 100)
    budget.spend("m", 20.0)
    assert budget.room("m") == 0 and budget.room("other") == pytest.approx(20.0)
    assert budget.wait_for("m", 7.0) == pytest.approx(7.0 / (SUSTAINED_SHARE * 1.0))
    clock.now += 10
    assert budget.room("m") == pytest.approx(7.0)
    # However we spend, no window of 100 s holds more than 90 % of the limit.
    spent = []
    for _ in range(1000):
        clock.now += 1
        seconds = budget.room("m")
        budget.spend("m", seconds)
        spent.append(seconds)
    assert max(sum(spent[i:i + 100]) for i in range(900)) <= 0.9 * 100 + 1e-6
    budget.reported("m", {"operating": 95.0, "operating_reset_at": wall.now + 30})
    assert budget.held_for("m") == pytest.approx(30.0) and budget.room("m") == 0
    assert budget.blocked("m") == pytest.approx(30.0)  # OPERATION_TIME_LIMIT: until that reset
    assert budget.blocked("m") == pytest.approx(40.0)  # again: the next basket (10 s) too
    assert budget.held_for("other") == 0


async def test_lookups_keep_being_answered_and_never_exhaust_the_operating_time():
    # 480 s per ten minutes shrunk 200 times: 2.4 s per 3 s; 20 ms a search, 60 new callers a
    # second, 3.6 s of searches a second asked for: without pacing the portal would block the
    # method for the rest of the window.
    async with PortalEmulator(SAMPLE_CRM, search_time=0.02, operating_limit=(2.4, 3.0)) as portal, \
            make_session() as session:
        client = PortalClient(portal.webhook_url, session, timeout=1.0, budget=RateLimiter(1000, 1000),
                              operating=OperatingBudget(2.4, 3.0))
        lookup = CrmLookup(client, LookupMemory(AnswerCache(DEFAULT_CACHE), CircuitBreaker(5, 10)), deadline=1.0)
        numbers = known_callers(portal, 240)
        calls = []
        started = time.monotonic()
        for index, number in enumerate(numbers):
            await asyncio.sleep(max(0.0, started + index / 60 - time.monotonic()))
            calls.append(asyncio.create_task(lookup.lookup(number)))
        answers = await asyncio.gather(*calls)
    assert portal.refusals == {}
    found = [answer.status == "FOUND" for answer in answers]
    assert all(any(found[second * 60:second * 60 + 60]) for second in range(4))  # answered throughout
    assert 0.25 * len(found) < sum(found) < 0.9 * len(found)
    assert {answer.error for answer in answers if answer.status == "ERROR"} <= {"operating_limit", "timeout"}


def test_search_timing_learns_the_portal_and_a_number_slow_again_and_again():
    timing = SearchTiming()
    timing.learn(0.08, 3, {"a": 0.01, "b": 0.01, "slow": 0.9}, deadline=2.0)
    # The median search, the rest of the round trip: one slow number does not make all look slow.
    assert timing.per_search == pytest.approx(0.01) and timing.overhead == 0.0
    timing.learn(0.25, 2, {"a": 0.01, "slow": 0.6}, deadline=2.0)
    assert timing.travels_alone("slow") and not timing.travels_alone("a")
    timing.learn(0.1, 1, {"slow": 0.01}, deadline=2.0)  # fast again: back in batches
    assert not timing.travels_alone("slow")
    assert timing.fitting(1.5) == min(50, int((1.5 - timing.overhead) / timing.per_search))


async def test_a_number_slow_again_and_again_travels_alone(make_lookup, portal):
    lookup = make_lookup()
    lookup.timing.slow_seen("79031234567")
    lookup.timing.slow_seen("79031234567")
    numbers = ["79161234567", "79031234567", "79262345678", "79990000001", "79990000002"]
    answers = await asyncio.gather(*(lookup.lookup(number) for number in numbers))
    assert [a.status for a in answers] == ["FOUND", "FOUND", "FOUND", "NOT_FOUND", "NOT_FOUND"]
    [batch] = portal.requests_for("batch")
    assert "79031234567" not in str(batch.params["cmd"]) and len(batch.params["cmd"]) == 4
    [alone] = portal.requests_for("telephony.externalCall.searchCrmEntities")
    assert alone.params["PHONE_NUMBER"] == "79031234567"


async def test_a_portal_falling_behind_still_answers_as_many_as_it_can(timed_lookup, timed_portal):
    """More new callers than the portal can take (here 20 ms a search at 1.25 times the ~144/s
    that 4 requests a second of deadline-sized batches allow): batches of the oldest, whose time
    is nearly out, would leave everyone late; the newest that fit are answered instead."""
    timed_portal.search_time = 0.02
    await timed_lookup.lookup("79161234567")
    spend_the_burst(timed_lookup)
    numbers = known_callers(timed_portal, 540)
    calls = []
    started = time.monotonic()
    for index, number in enumerate(numbers):
        await asyncio.sleep(max(0.0, started + index / 180 - time.monotonic()))
        calls.append(asyncio.create_task(timed_lookup.lookup(number)))
    answers = await asyncio.gather(*calls)
    found = sum(answer.status == "FOUND" for answer in answers)
    assert found >= 0.5 * len(numbers), found
    assert timed_portal.refusals == {}


def test_a_share_taken_over_from_the_shared_bucket_grants_its_rate_but_no_fresh_burst():
    """Redis (the servers' one bucket) stops answering: each server falls back to its share, which
    must not add a burst of its own to a shared bucket that may be full."""
    clock = Clock()
    share = RateLimiter(per_second=4, burst=4, clock=clock)
    share.spend_burst()
    assert share.reserve(max_wait=0) == 0.0  # the rate: one now
    assert share.reserve(max_wait=0) is None  # but no burst behind it
    clock.now += 0.25
    assert share.reserve(max_wait=0) == 0.0
