"""Click-to-call as one running part (agi_bitrix/clicktocall_service.py): the AMI-backed Dialer
and the events' handler that hands each click to the flow, with fakes for AMI and the flow's
neighbours. The whole path on a real Asterisk is tests/asterisk/test_click_to_call_service.py."""

import asyncio
from typing import Any

import pytest

from agi_bitrix.ami.errors import AmiUnavailable, OriginateOutcomeUnknown
from agi_bitrix.ami.protocol import Event as AmiEvent
from agi_bitrix.bitrix.events import CallbackStart, ExternalCallStart
from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.clicktocall import DialerError, OriginateOutcome
from agi_bitrix.clicktocall_service import MAX_CLICKS_IN_FLIGHT, AmiDialer, ClickToCallService
from agi_bitrix.config import parse_config
from tests.test_click_to_call import CALL_ID, FakeDialer, Outbox, Users


class FakeAmi:
    """What AmiDialer asks of the AmiClient: one Async Originate and its OriginateResponse."""

    def __init__(self, error: Exception | None = None, reason: str = "4", response: str = "Success") -> None:
        self.error, self.reason, self.response = error, reason, response
        self.sent: list[list[tuple[str, str]]] = []

    async def send_awaiting(self, action: str, fields: Any, *, timeout: float) -> tuple[None, AmiEvent]:
        assert action == "Originate"
        self.sent.append(list(fields))
        if self.error is not None:
            raise self.error
        return None, AmiEvent((("Event", "OriginateResponse"), ("Response", self.response),
                               ("Reason", self.reason), ("Channel", "PJSIP/181-0001"), ("Uniqueid", "1.1")))


async def dial(ami: FakeAmi) -> OriginateOutcome:
    dialer = AmiDialer(ami)  # type: ignore[arg-type]
    return await dialer.originate("PJSIP/181", "agi-bitrix-click-to-call", "79161234567",
                                  {"B24_CALL_ID": CALL_ID}, '"Анна" <79161234567>', 30.0)


async def test_the_ami_dialer_sends_one_originate_and_returns_its_reason():
    ami = FakeAmi(reason="5", response="Failure")
    assert await dial(ami) == OriginateOutcome(5)
    fields = dict(ami.sent[0])
    assert (fields["Channel"], fields["Context"], fields["Exten"]) == (
        "PJSIP/181", "agi-bitrix-click-to-call", "79161234567")
    assert fields["Timeout"] == "30000" and fields["Async"] == "true"


@pytest.mark.parametrize("error", [AmiUnavailable("AMI is down: connection refused"),
                                   OriginateOutcomeUnknown("lost after sending")])
async def test_an_ami_that_cannot_say_how_the_originate_ended_is_a_dialer_error(error):
    # The flow finishes such a click as failed and never sends the Originate again.
    with pytest.raises(DialerError):
        await dial(FakeAmi(error=error))


CONFIG = """\
bitrix:
  oauth: {portal_url: "https://b24.example.com/rest/", client_id: local.1, client_secret: s,
          token_file: /nonexistent/oauth.json}
routing: {fallback_queue: support}
callcard: {}
users: {}
ami: {username: agi-bitrix}
clicktocall: {}
events: {mode: offline}
"""


def service(flow_dialer: FakeDialer) -> tuple[ClickToCallService, Outbox]:
    config = parse_config(CONFIG, environ={"AGI_BITRIX_AMI_SECRET": "a-secret-of-the-test"})
    outbox = Outbox()
    part = ClickToCallService(config, current_portal=lambda: None, users=Users(), outbox=outbox,  # type: ignore[arg-type]
                              names=None, link=None)
    assert part.flow is not None
    part.flow.dialer = flow_dialer
    return part, outbox


def click(call_id: str = CALL_ID, user_id: str = "81") -> ExternalCallStart:
    return ExternalCallStart(call_id=call_id, user_id=user_id, phone="79161234567", line_number="",
                             crm_entity_type="CONTACT", crm_entity_id="710", call_list_id="", is_mobile=False,
                             sent_at=0.0, source="offline")


async def test_the_events_handler_returns_before_the_agent_answers():
    dialer = FakeDialer()
    dialer.release = asyncio.Event()  # the agent's phone rings until released
    part, outbox = service(dialer)
    await asyncio.wait_for(part.take(click()), 0.5)  # the offline poller confirms the record now
    await asyncio.sleep(0.05)
    assert len(dialer.calls) == 1 and part.health()["clicktocall"]["in_flight"] == 1
    dialer.release.set()
    await asyncio.sleep(0.05)
    assert part.health()["clicktocall"] == {"state": "on", "in_flight": 0, "outcomes": {"answered": 1},
                                            "callbacks_ignored": 0}
    assert outbox.added == {}  # answered: the dialplan's hangup handler finishes it
    await part.close()


async def test_past_the_bound_a_click_is_finished_at_once_not_queued(monkeypatch):
    monkeypatch.setattr("agi_bitrix.clicktocall_service.MAX_CLICKS_IN_FLIGHT", 2)
    dialer = FakeDialer()
    dialer.release = asyncio.Event()
    part, outbox = service(dialer)
    for number in range(3):
        await part.take(click(call_id=f"externalCall.0a1b2c3d4e5f.170000000{number}", user_id=f"8{number + 1}"))
    await asyncio.sleep(0.05)
    assert len(part._clicks) <= 2 and MAX_CLICKS_IN_FLIGHT > 2
    busy = outbox.added["externalCall.0a1b2c3d4e5f.1700000002"]
    assert (busy["STATUS_CODE"], busy["DURATION"]) == ("480", 0)
    dialer.release.set()
    await part.close()


async def test_a_callback_request_without_a_callback_section_is_said_and_counted_not_dialled(caplog):
    dialer = FakeDialer()
    part, _ = service(dialer)
    await part.take(CallbackStart(phone="79161234567", text="", voice="", line_number="", crm_entity_type="",
                                  crm_entity_id="", sent_at=0.0, source="offline", key="k"))
    assert dialer.calls == [] and part.health()["callback"] == {"state": "off", "ignored": 1}
    assert "no callback section, so nobody calls back" in caplog.text
    await part.close()


async def test_health_says_what_is_off():
    config = parse_config("bitrix: {webhook_url: 'https://portal.example/rest/1/secretcode/'}\n"
                          "routing: {fallback_queue: support}\n")
    part = ClickToCallService(config, current_portal=lambda: None, users=None, outbox=None,  # type: ignore[arg-type]
                              names=None, link=None)
    assert part.health() == {"ami": {"state": "off"}, "events": {"mode": "off"}, "clicktocall": {"state": "off"},
                             "callback": {"state": "off", "ignored": 0}}
    await part.start()
    await part.close()


class NotFound:
    async def lookup(self, phone: str) -> CrmAnswer:
        return CrmAnswer("NOT_FOUND")


class Registered:
    def __init__(self) -> None:
        self.params: list[dict[str, Any]] = []

    async def send_register(self, params: dict[str, Any], uniqueid: str, *, show: bool,
                            crm_create: bool) -> tuple[str, str]:
        self.params.append(params)
        return CALL_ID, ""


async def test_a_callback_request_goes_to_the_callback_flow_in_the_background_and_its_reports_are_heard():
    text = CONFIG.replace("callcard: {}", "callcard: {register: {default_user: '9'}}") + "callback: {}\n"
    config = parse_config(text, environ={"AGI_BITRIX_AMI_SECRET": "a-secret-of-the-test"})
    outbox = Outbox()
    part = ClickToCallService(config, current_portal=lambda: None, users=Users(), outbox=outbox,  # type: ignore[arg-type]
                              names=NotFound(), link=None)
    assert part.callback is not None and part.ami is not None
    assert part.callback.on_ami_event in part.ami._listeners  # each attempt's report reaches the flow
    registered = part.callback.registrar = Registered()
    part.callback.dialer = FakeDialer(error="AmiUnavailable: not connected")
    await asyncio.wait_for(part.take(CallbackStart(phone="+79161234567", text="call me", voice="", line_number="",
                                                   crm_entity_type="", crm_entity_id="", sent_at=0.0,
                                                   source="offline", key="k")), 0.5)
    await asyncio.sleep(0.05)
    assert [params["TYPE"] for params in registered.params] == [4]
    assert outbox.added[CALL_ID]["STATUS_CODE"] == "503"
    assert part.health()["callback"] == {"state": "on", "outcomes": {"not_reached": 1}, "ignored": 0}
    await part.close()
