"""Batch scheduling alone (agi_bitrix.bitrix.batcher): which numbers leave together and when,
against a stand-in portal whose rate slots the test hands out, and a recorder for the requests."""

import asyncio

from agi_bitrix.bitrix.batcher import SECOND_REQUEST_AFTER, Batcher
from agi_bitrix.bitrix.breaker import OPEN, CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import RequestSlot
from agi_bitrix.bitrix.errors import RequestNotSent
from agi_bitrix.bitrix.flights import Flights, FlightTasks
from agi_bitrix.bitrix.memory import LookupMemory
from agi_bitrix.bitrix.operating import OperatingBudget
from agi_bitrix.bitrix.settings import CacheSettings
from tests.conftest import until


class StandInPortal:
    """Rate slots only when the test opens the gate (or a refusal it sets)."""

    def __init__(self):
        self.operating = OperatingBudget(1000.0)
        self.gate = asyncio.Event()
        self.refusal: Exception | None = None

    async def take_slot(self, max_wait, can_wait=False):
        await self.gate.wait()
        if self.refusal is not None:
            raise self.refusal
        return RequestSlot()


class Recorder:
    """The requests sent (held until `answer` is set) and the numbers failed."""

    def __init__(self):
        self.sent, self.failed, self.bugs = [], [], []
        self.answer = asyncio.Event()

    async def send(self, phones, slot):
        self.sent.append((asyncio.get_running_loop().time(), phones))
        await self.answer.wait()

    def fail(self, phones, error):
        self.failed += [(phone, error.reason) for phone in phones]

    def unexpected(self, phones, error):
        self.bugs.append((phones, type(error).__name__))


def batcher(deadline=1.0):
    portal, recorder, flights = StandInPortal(), Recorder(), Flights()
    memory = LookupMemory(AnswerCache(CacheSettings()), CircuitBreaker(3, 10.0))
    tasks = FlightTasks(release=recorder.fail)
    return Batcher(portal=portal, memory=memory, deadline=deadline, flights=flights, send=recorder.send,
                   outcomes=recorder, tasks=tasks), portal, recorder


def queue(batch, *phones, deadline=1.0):
    now = asyncio.get_running_loop().time()
    for phone in phones:
        batch.flights.join(phone, asyncio.get_running_loop().create_future())
        batch.add(phone, now + deadline)


async def test_numbers_arriving_while_a_sender_waits_for_its_slot_leave_together():
    batch, portal, recorder = batcher()
    queue(batch, "7001")
    await asyncio.sleep(0.01)
    queue(batch, "7002", "7003")
    portal.gate.set()
    await until(lambda: recorder.sent, what="a request")
    assert [phones for _, phones in recorder.sent] == [["7001", "7002", "7003"]]
    assert "7001" not in batch  # taken into the request


async def test_with_a_request_out_the_next_leaves_only_after_a_pause():
    batch, portal, recorder = batcher()
    portal.gate.set()
    queue(batch, "7001")
    await until(lambda: recorder.sent, what="the first request")
    queue(batch, "7002")
    queue(batch, "7003")
    await until(lambda: len(recorder.sent) == 2, what="the second request")
    (first_at, _), (second_at, second) = recorder.sent
    assert second == ["7002", "7003"] and second_at - first_at >= SECOND_REQUEST_AFTER * 0.9
    recorder.answer.set()


async def test_an_open_breaker_fails_the_waiting_numbers_at_once():
    batch, _, recorder = batcher()
    batch.memory.breaker.trip()
    assert batch.memory.breaker.state == OPEN
    queue(batch, "7001", "7002")
    await until(lambda: recorder.failed, what="the numbers failed")
    assert recorder.failed == [("7001", "circuit_open"), ("7002", "circuit_open")] and not recorder.sent


async def test_no_slot_fails_with_its_reason_and_a_bug_fails_as_unexpected():
    batch, portal, recorder = batcher()
    portal.refusal = RequestNotSent("rate_limited", "no slot within the deadline")
    portal.gate.set()
    queue(batch, "7001")
    await until(lambda: recorder.failed, what="the number failed")
    assert recorder.failed == [("7001", "rate_limited")]
    portal.refusal = ZeroDivisionError()
    queue(batch, "7002")
    await until(lambda: recorder.bugs, what="the bug reported")
    assert recorder.bugs == [(["7002"], "ZeroDivisionError")]


async def test_a_slow_number_travels_alone_and_a_batch_fits_the_time_left():
    batch, portal, recorder = batcher()
    batch.memory.timing.slow_seen("7001")
    batch.memory.timing.slow_seen("7001")
    batch.memory.timing.per_search = 0.1  # 100 ms a search, 100 ms overhead: 8 fit in 0.9 s
    queue(batch, "7001", *[f"80{n:02d}" for n in range(20)])
    portal.gate.set()
    recorder.answer.set()
    await until(lambda: len(recorder.sent) >= 2, what="two requests")
    alone, batched = (phones for _, phones in recorder.sent[:2])
    assert alone == ["7001"] and len(batched) == 8 and "7001" not in batched


async def test_a_number_whose_callers_all_gave_up_is_not_asked():
    batch, portal, recorder = batcher()
    queue(batch, "7001", deadline=0.0)
    queue(batch, "7002")
    for caller in batch.flights._waiters["7001"]:
        caller.set_result(None)
    portal.gate.set()
    await until(lambda: recorder.sent, what="a request")
    assert [phones for _, phones in recorder.sent] == [["7002"]] and "7001" not in batch.flights
