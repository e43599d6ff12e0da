"""One request and its hedges alone (agi_bitrix.bitrix.hedging), against a stand-in portal that
answers as each test says, and a recorder of what came of each request."""

import asyncio

import pytest

from agi_bitrix.bitrix.breaker import CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import SEARCH_KEY, RequestSlot, SearchAnswer
from agi_bitrix.bitrix.errors import PortalTimeout
from agi_bitrix.bitrix.flights import FlightTasks
from agi_bitrix.bitrix.hedging import HedgedRequests
from agi_bitrix.bitrix.memory import LookupMemory
from agi_bitrix.bitrix.operating import OperatingBudget
from agi_bitrix.bitrix.settings import CacheSettings
from tests.conftest import until


class StandInPortal:
    """Answers every number NOT_FOUND after `seconds(phones)`, or raises what `error` holds."""

    def __init__(self, seconds=lambda phones: 0.0):
        self.operating = OperatingBudget(1000.0)
        self.asked: list[list[str]] = []
        self.seconds = seconds
        self.error: BaseException | None = None

    async def take_slot(self, max_wait, can_wait=False):
        return RequestSlot()

    async def search_numbers(self, phones, slot):
        self.asked.append(list(phones))
        await asyncio.sleep(self.seconds(phones))
        if self.error is not None:
            raise self.error
        return SearchAnswer({phone: [] for phone in phones}, dict.fromkeys(phones, 0.001))


class Recorder:
    """What came of the requests (a RequestOutcomes), and the numbers callers still wait for."""

    def __init__(self):
        self.answers, self.failures, self.bugs, self.durations = [], [], [], []
        self.waiting: set[str] = set()

    def request_done(self, seconds):
        self.durations.append(seconds)

    def answered(self, outcome):
        self.answers.append(sorted(outcome))
        self.waiting -= set(outcome)

    def failed(self, phones, error):
        self.failures.append((phones, error.reason))

    fail = failed

    def unexpected(self, phones, error):
        self.bugs.append((phones, type(error).__name__))


def hedged(portal, deadline=1.0):
    recorder = Recorder()
    memory = LookupMemory(AnswerCache(CacheSettings()), CircuitBreaker(3, 10.0))
    requests = HedgedRequests(portal=portal, memory=memory, deadline=deadline, outcomes=recorder,
                              waited_for=recorder.waiting.__contains__, tasks=FlightTasks(release=recorder.fail))
    return requests, recorder


async def test_an_answer_goes_to_the_outcomes_and_the_portals_speed_is_learned():
    portal = StandInPortal()
    requests, recorder = hedged(portal)
    room = portal.operating.room(SEARCH_KEY)
    await requests.ask(["7001", "7002"], RequestSlot())
    assert recorder.answers == [["7001", "7002"]] and len(recorder.durations) == 1
    assert requests.memory.timing.per_search == pytest.approx(0.001)  # as the portal said
    assert portal.operating.room(SEARCH_KEY) == pytest.approx(room)  # the reservation given back
    assert not requests.asking("7001")


async def test_a_late_batch_is_asked_again_around_its_slow_number_and_the_first_answer_wins():
    slow = "7005"
    portal = StandInPortal(seconds=lambda phones: 1.5 if slow in phones else 0.01)
    requests, recorder = hedged(portal)
    phones = [f"700{n}" for n in range(1, 7)]
    recorder.waiting.update(phones)
    first = asyncio.create_task(requests.ask(phones, RequestSlot()))
    # Late at 1.5 times the predicted 0.22 s + 5 % of the deadline: ~0.38 s, well before the slow one answers.
    await until(lambda: len(recorder.answers) >= 5, timeout=1.2, what="the hedges' answers")
    assert sorted(portal.asked[1:]) == [[phone] for phone in phones]  # at most 8: each alone
    assert recorder.waiting == {slow} and requests.asking(slow)
    await first


async def test_a_lone_number_timing_out_is_slow_and_failures_are_told_by_their_class():
    portal = StandInPortal()
    requests, recorder = hedged(portal)
    portal.error = PortalTimeout("timeout", "no answer within 1 s")
    for _ in range(2):
        await requests.ask(["7001"], RequestSlot())
    assert recorder.failures == [(["7001"], "timeout")] * 2 and requests.memory.timing.travels_alone("7001")
    portal.error = ValueError("a library's bug")
    await requests.ask(["7002"], RequestSlot())
    assert recorder.bugs == [(["7002"], "ValueError")]


async def test_a_request_cancelled_at_stop_fails_its_numbers_and_stays_cancelled():
    portal = StandInPortal(seconds=lambda phones: 10.0)
    requests, recorder = hedged(portal)
    task = asyncio.create_task(requests.ask(["7001"], RequestSlot()))
    await until(lambda: requests.asking("7001"), what="the request out")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recorder.failures == [(["7001"], "cancelled")] and not requests.asking("7001")
