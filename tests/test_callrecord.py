"""A call's record: one frozen value built from what the channel was sent, handed whole to each
sink (metrics, call log, recent calls) by the route script."""

import dataclasses
import logging

import pytest

from agi_bitrix.agi.protocol import AgiRequest
from agi_bitrix.calllog import CallLog
from agi_bitrix.callrecord import CallRecord
from agi_bitrix.config import CallLogSettings
from agi_bitrix.monitoring import Metrics
from agi_bitrix.routing.engine import Decision
from agi_bitrix.routing.variables import channel_variables
from agi_bitrix.service import Router, RouteScript
from agi_bitrix.web.recent import RecentCalls
from tests.conftest import make_config

DECISION = Decision(status="FOUND", route="extension", target="101", rule="owner-at-work", phone="79161234567",
                    fallback_queue="support", error="", cache="hit")


def test_sent_takes_each_field_from_its_variable_under_any_prefix():
    variables = channel_variables(dataclasses.replace(DECISION, status="ERROR", route="queue", target="support",
                                                      rule="portal-down", error="timeout", cache="miss"), "X_")
    record = CallRecord.sent("1700.1", variables, "X_", 0.25, None)
    assert record == CallRecord(uniqueid="1700.1", phone="79161234567", status="ERROR", route="queue",
                                target="support", rule="portal-down", error="timeout", cache="miss",
                                seconds=0.25, routed=None)


def test_the_record_is_what_was_sent_not_the_raw_decision():
    # The decision's error is no token; the channel got "portal_error", so the log and page say so too.
    variables = channel_variables(dataclasses.replace(DECISION, error="bad thing happened"))
    assert CallRecord.sent("u", variables, "B24_", 0.0, None).error == "portal_error"


def test_the_record_is_frozen_and_slotted():
    record = CallRecord.sent("u", channel_variables(DECISION), "B24_", 0.0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "NOT_FOUND"  # type: ignore[misc]
    assert not hasattr(record, "__dict__")


class Sink:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def record(self, call: CallRecord) -> None:
        self.records.append(call)


class Channel:
    async def set_variables(self, variables) -> bool:
        return True


async def test_the_route_script_hands_one_record_to_every_sink():
    config = make_config("https://portal.example/rest/1/code/")
    call_log, recorder, metrics = Sink(), Sink(), Metrics()
    script = RouteScript(Router(config, lookup=None), metrics, call_log, recorder)  # type: ignore[arg-type]
    await script.handle_unknown_script(AgiRequest({"agi_uniqueid": "1700.9", "agi_network_script": "rotue"}),
                                       Channel())
    [record] = call_log.records
    assert recorder.records == [record] and recorder.records[0] is record
    assert (record.uniqueid, record.status, record.route, record.error) == ("1700.9", "ERROR", "queue",
                                                                          "unknown_script")
    assert metrics.registry.get_sample_value(
        "agi_bitrix_calls_total", {"status": "ERROR", "route": "queue", "rule": record.rule}) == 1


def test_each_sink_reads_the_record(caplog):
    record = CallRecord.sent("1700.2", channel_variables(DECISION), "B24_", 0.0123, None)
    recent = RecentCalls(clock=lambda: 6000.0)
    recent.record(record)
    [kept] = recent.newest_first()
    assert (kept.number, kept.at, kept.phone, kept.route, kept.seconds) == (1, 6000.0, "79161234567", "extension",
                                                                            0.0123)
    assert recent.find(1) == kept and recent.per_minute(1) == [{"extension": 1}]
    with caplog.at_level(logging.INFO, logger="agi_bitrix.calls"):
        CallLog(CallLogSettings(mask_numbers=True)).record(record)
    line = ("call uniqueid=1700.2 phone=7916*****67 status=FOUND route=extension target=101 rule=owner-at-work"
            " error=- cache=hit latency_ms=12.3")
    assert [r.getMessage() for r in caplog.records] == [line]
