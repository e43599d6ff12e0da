"""The lookups' memory alone (agi_bitrix.bitrix.memory): what each kind of failure does to the
breaker and to what /healthz shows, with a clock of the test's own and no portal."""

import logging

from agi_bitrix.bitrix.breaker import CLOSED, OPEN, CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.errors import PortalMisconfigured, PortalTimeout, RequestNotSent, RequestRejected
from agi_bitrix.bitrix.memory import LookupMemory
from agi_bitrix.bitrix.settings import CacheSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def memory(failures=2):
    clock = Clock()
    return LookupMemory(AnswerCache(CacheSettings(), clock), CircuitBreaker(failures, 30.0, clock), clock=clock), clock


def test_failures_in_a_row_open_the_breaker_said_once_and_an_answer_closes_it(caplog):
    kept, clock = memory(failures=2)
    for _ in range(3):
        kept.portal_failed(PortalTimeout("timeout", "no answer within 1 s"))
    assert kept.breaker.state == OPEN
    assert (kept.last_failure, kept.last_failure_reason) == (100.0, "timeout")
    assert [r.getMessage() for r in caplog.records].count(
        "portal keeps failing (last: timeout); not asking it for 30 s (circuit open)") == 1
    clock.now = 140.0
    kept.portal_answered()
    assert kept.breaker.state == CLOSED and kept.last_success == 140.0
    assert "portal answered again; circuit closed" in caplog.text


def test_a_refused_request_and_one_never_sent_are_not_the_portal_failing():
    kept, _ = memory(failures=1)
    kept.portal_failed(RequestRejected("ERROR_ARGUMENT", "one odd caller ID"))
    kept.portal_failed(RequestNotSent("refresh_token_rejected", "tokens rejected earlier"))
    assert kept.breaker.state == CLOSED
    assert kept.last_failure is None and kept.last_failure_reason == ""


def test_rest_refused_as_a_whole_opens_at_once_and_is_said_once_per_change(caplog):
    kept, _ = memory(failures=5)
    caplog.set_level(logging.ERROR, "agi_bitrix.lookup")
    for _ in range(3):
        kept.portal_failed(PortalMisconfigured("ACCESS_DENIED", "REST is available only on commercial plans"))
    assert kept.breaker.state == OPEN and kept.misconfigured.reason == "ACCESS_DENIED"
    kept.portal_failed(PortalMisconfigured("INVALID_REQUEST", "Https required"))
    said = [r.getMessage() for r in caplog.records if "refuses REST as a whole" in r.getMessage()]
    assert len(said) == 2 and "commercial plans" in said[0] and "https://" in said[1]
    kept.portal_failed(PortalTimeout("timeout", "no answer"))  # another failure: no longer misconfigured
    assert kept.misconfigured is None and kept.last_failure_reason == "timeout"
