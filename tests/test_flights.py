"""Single flight alone (agi_bitrix.bitrix.flights): a number's waiting callers, the tasks that
hold numbers, and the flight across servers against a stand-in for the answers in Redis."""

import asyncio

from agi_bitrix.bitrix.breaker import CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.errors import PortalTimeout
from agi_bitrix.bitrix.flights import Flights, FlightTasks, SharedFlight
from agi_bitrix.bitrix.memory import LookupMemory
from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.bitrix.settings import CacheSettings
from agi_bitrix.bitrix.shared import Claim, SharedStateUnavailable
from tests.conftest import until

FOUND = CrmAnswer("FOUND", (), cache="hit")


def waiter():
    return asyncio.get_running_loop().create_future()


async def test_the_first_caller_starts_the_flight_and_all_get_its_answer():
    flights = Flights()
    first, second, late = waiter(), waiter(), waiter()
    assert flights.join("7001", first) and not flights.join("7001", second) and not flights.join("7001", late)
    late.set_result(None)  # its deadline passed
    assert not flights.given_up("7001")
    flights.settle("7001", FOUND)
    assert first.result() is second.result() is FOUND and late.result() is None
    assert "7001" not in flights and flights.given_up("7001")  # nobody waits: nothing to give up


async def test_a_failure_reaches_every_caller_and_ends_the_flight():
    flights = Flights()
    callers = [waiter(), waiter()]
    for caller in callers:
        flights.join("7001", caller)
    error = PortalTimeout("timeout", "no answer")
    flights.fail("7001", error)
    assert [caller.exception() for caller in callers] == [error, error] and len(flights) == 0


async def test_a_task_ending_by_any_exception_or_cancellation_releases_its_numbers(caplog):
    released = []
    tasks = FlightTasks(release=lambda phones, error: released.append((phones, error.reason)))

    async def broken():
        raise KeyError("a bug")

    async def forever():
        await asyncio.Event().wait()

    async def fine():
        pass
    tasks.start(broken(), holding=["7001"])
    tasks.start(fine(), holding=["7002"])
    tasks.start(forever(), holding=["7003"])
    await until(lambda: len(tasks) == 1, what="two tasks done")
    [running] = asyncio.all_tasks() - {asyncio.current_task()}
    running.cancel()
    await until(lambda: len(tasks) == 0, what="the cancelled task done")
    assert released == [(["7001"], "internal"), (["7003"], "cancelled")]
    assert "a portal lookup task for 7001 ended with an unexpected error" in caplog.text
    assert "KeyError: 'a bug'" in caplog.text


class StandInAnswers:
    """What SharedFlight uses of agi_bitrix.bitrix.shared.SharedAnswers, answering from a script."""

    def __init__(self, *claims):
        self.claims = list(claims)
        self.stored, self.released = [], []
        self.near_cache = 1.0

    async def claim(self, phone, cache, claim_for):
        claim = self.claims.pop(0)
        if isinstance(claim, Exception):
            raise claim
        return claim

    async def store(self, phone, answer, cache):
        self.stored.append((phone, answer.status))

    async def release(self, phone):
        self.released.append(phone)


def shared_flight(answers):
    memory = LookupMemory(AnswerCache(CacheSettings()), CircuitBreaker(3, 1.0), shared=answers)
    flights, asked_here, unreadable = Flights(), [], []
    tasks = FlightTasks(release=lambda phones, error: None)
    flight = SharedFlight(memory, flights, tasks, claim_for=1.0, ask_here=lambda p, t: asked_here.append(p),
                          unreadable=unreadable.append)
    return flight, flights, memory, asked_here, unreadable


async def test_an_answer_another_server_stored_settles_the_flight_and_fills_the_cache():
    stored = CrmAnswer("FOUND", (), cache="hit")
    flight, flights, memory, asked_here, _ = shared_flight(StandInAnswers(
        Claim(None, 0.0, fresh=False, ours=False),  # another server is asking: look again shortly
        Claim(stored, 0.5, fresh=True, ours=False)))
    caller = waiter()
    flights.join("7001", caller)
    await flight.ask_servers("7001", asyncio.get_running_loop().time() + 1.0)
    assert caller.result() is stored and memory.cache.fresh("7001") is not None and asked_here == []


async def test_an_unreadable_value_is_a_miss_this_server_asks_and_overwrites():
    answers = StandInAnswers(Claim(None, 0.0, fresh=False, ours=True, unreadable=True))
    flight, flights, _, asked_here, unreadable = shared_flight(answers)
    flights.join("7001", waiter())
    await flight.ask_servers("7001", asyncio.get_running_loop().time() + 1.0)
    assert unreadable == ["7001"] and asked_here == ["7001"] and "7001" in flight.claimed
    flight.share("7001", FOUND)
    flight.share("7001", FOUND)  # shared once: the number is no longer claimed
    await until(lambda: answers.stored, what="the answer stored")
    assert answers.stored == [("7001", "FOUND")] and not flight.claimed


async def test_redis_failing_or_every_caller_gone_hands_the_number_back():
    flight, flights, _, asked_here, _ = shared_flight(StandInAnswers(SharedStateUnavailable("down")))
    flights.join("7001", waiter())
    await flight.ask_servers("7001", asyncio.get_running_loop().time() + 1.0)
    assert asked_here == ["7001"]  # asked here, as without Redis
    flight, flights, _, asked_here, _ = shared_flight(StandInAnswers(Claim(None, 0.0, fresh=False, ours=False)))
    gone = waiter()
    gone.set_result(None)
    flights.join("7002", gone)
    await flight.ask_servers("7002", asyncio.get_running_loop().time() + 1.0)
    assert asked_here == [] and "7002" not in flights


async def test_a_failed_request_releases_the_claim_for_the_other_servers():
    answers = StandInAnswers(Claim(None, 0.0, fresh=False, ours=True))
    flight, flights, _, _, _ = shared_flight(answers)
    flights.join("7001", waiter())
    await flight.ask_servers("7001", asyncio.get_running_loop().time() + 1.0)
    flight.share("7001", None)
    flight.share("7002", FOUND)  # never claimed here: not this server's to store
    await until(lambda: answers.released, what="the claim released")
    assert answers.released == ["7001"] and answers.stored == []
