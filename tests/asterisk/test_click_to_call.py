# ruff: noqa: E501 -- a dialplan line cannot be wrapped
"""Click-to-call on a real Asterisk 20 and 22: the flow (agi_bitrix/clicktocall.py) rings the
agent's phone with AMI's Originate, the shipped sample's [agi-bitrix-click-to-call] dials the
client through the outbound context once the agent answers, and its hangup handler finishes the
portal's call through agi-bitrix running as its own process (`agi-bitrix serve`) against the
portal emulator.

The flow's Dialer here is the test harness's AMI connection (`HarnessDialer`); the product's own
AMI client takes its place when the Application wires it. What is proven here and nowhere else:
Originate's outcome on this Asterisk (answered, not answered, busy) gives the documented status,
the agent's phone shows the CRM name, the client sees the line's number, and the talk time and
status of the client leg reach one finish with the event's CALL_ID.
"""

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agi_bitrix.bitrix.models import CrmAnswer, CrmEntity
from agi_bitrix.bitrix.users import User
from agi_bitrix.clicktocall import ClickToCall, ClickToCallEvent, DialerError, OriginateOutcome
from agi_bitrix.dialpolicy import ClickToCallSettings
from agi_bitrix.testing.ami_calls import CallDriver, PlacedCall, event_name_of
from agi_bitrix.testing.pbx_harness import AsteriskBuild, AsteriskPbx
from tests.conftest import until

from .conftest import TEST_DIALPLAN, TEST_QUEUES, running_pbx
from .crm import crm_object, fresh_mobiles
from .freepbx_standins import ROUTE_CID
from .sample_calls import WAIT, rings
from .test_callcard import FINISH, REGISTER, running_callcard_server
from .test_freepbx_sample import FREEPBX_QUEUES, freepbx_config

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

# The agents' phones: each reports its ring (with the caller ID it shows), then answers when
# TEST_AGENT is "answers" and stays on the line until the call ends, is busy when it is "busy",
# and otherwise rings until the Originate gives up.
AGENT_PHONES = r"""
[agi-bitrix-test-agents]
exten => _X.,1,UserEvent(AgiBitrixTestAgentRing,Number: ${EXTEN},CallerID: ${CALLERID(num)},CallerName: ${CALLERID(name)})
 same => n,GotoIf($["${TEST_AGENT}" = "answers"]?answer)
 same => n,GotoIf($["${TEST_AGENT}" = "busy"]?busy)
 same => n,Wait(120)
 same => n(answer),Answer()
 same => n,Wait(30)
 same => n,Hangup()
 same => n(busy),Busy(10)
"""
AGENT_CHANNEL = "Local/{extension}@agi-bitrix-test-agents"
AGENT_ID, AGENT_EXTENSION = "81", "181"
LINE = "74951230000"
CLIENT_NAME = "Анна Смирнова (Ромашка)"
_numbers = itertools.count(1)  # the clients' numbers and the clicks' call ids
# A Moscow mobile (a valid MOBILE number of RU) no other click of this run has used.
fresh_client = fresh_mobiles("7916", _numbers)


@pytest.fixture(scope="module")
def click_pbx(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    yield from running_pbx(asterisk_root, asterisk_build, "click", TEST_DIALPLAN + AGENT_PHONES, TEST_QUEUES)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def click_calls(click_pbx: AsteriskPbx) -> AsyncIterator[CallDriver]:
    driver = await CallDriver.connect(click_pbx.ami_port, click_pbx.ami_username, click_pbx.ami_secret)
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def freepbx_click_pbx(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    """The FreePBX sample beside the stand-ins of FreePBX's generated dialplan."""
    yield from running_pbx(asterisk_root, asterisk_build, "click-freepbx", freepbx_config(asterisk_build) + AGENT_PHONES,
                           FREEPBX_QUEUES)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def freepbx_click_calls(freepbx_click_pbx: AsteriskPbx) -> AsyncIterator[CallDriver]:
    driver = await CallDriver.connect(freepbx_click_pbx.ami_port, freepbx_click_pbx.ami_username,
                                      freepbx_click_pbx.ami_secret)
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def callcard_server(portal, tmp_path_factory):
    portal.set_client("74950000081", [crm_object(int(AGENT_ID), "OPENED", extension=AGENT_EXTENSION)])
    with running_callcard_server(portal, tmp_path_factory.mktemp("click-to-call")) as server:
        yield server


class HarnessDialer:
    """The flow's Dialer over the harness's AMI connection: an Async Originate, whose outcome is
    the OriginateResponse event panoramisk hands back with the action's answer. Each originate is
    filed as a test call (TEST_CALL_ID), so the stand-ins' events can be read per click."""

    def __init__(self, calls: CallDriver, **test_variables: str):
        self.calls = calls
        self.test_variables = test_variables
        self.placed: list[PlacedCall] = []

    async def originate(self, channel: str, context: str, exten: str, variables: Mapping[str, str],
                        caller_id: str, timeout: float) -> OriginateOutcome:
        call_id = f"click-{os.getpid()}-{next(_numbers)}"
        values = {"__TEST_CALL_ID": call_id, **self.test_variables, **variables}
        assert not any("," in value for value in values.values()), values  # AMI would split them
        future = self.calls.manager.send_action({
            "Action": "Originate", "Channel": channel, "Context": context, "Exten": exten, "Priority": "1",
            "CallerID": caller_id, "Timeout": str(int(timeout * 1000)), "Async": "true",
            "Variable": [f"{name}={value}" for name, value in values.items()],
        })
        placed = self.calls.calls[call_id] = PlacedCall(call_id, time.monotonic(), future)
        self.placed.append(placed)
        answers = await future
        response = answers[-1] if isinstance(answers, list) else answers
        if response.get("Event") != "OriginateResponse":
            raise DialerError(f"Originate refused: {response.get('Message')}")
        return OriginateOutcome(int(response["Reason"]))


class Directory:
    def by_id(self, user_id: str) -> User | None:
        return User(AGENT_ID, True, extension=AGENT_EXTENSION) if user_id == AGENT_ID else None


class Names:
    async def lookup(self, phone: str) -> CrmAnswer:
        return CrmAnswer("FOUND", (CrmEntity("CONTACT", "710", None, CLIENT_NAME),))


class EmulatorOutbox:
    """The flow's own finishes go straight to the emulator here; the outbox's delivery is the
    subject of tests/test_callcard_outbox.py."""

    def __init__(self, portal):
        self.portal = portal
        self.finishes: dict[str, dict[str, Any]] = {}

    async def add(self, key: str, params: dict[str, Any]) -> str:
        if key in self.finishes:
            return "duplicate"
        self.finishes[key] = params
        self.portal.call_method(FINISH, dict(params))
        return "stored"


def opened_call(portal, client: str) -> str:
    """The call the portal opens when the user clicks the client's number (the CALL_ID the
    ONEXTERNALCALLSTART event carries): an outgoing call of that user."""
    return portal.call_method(REGISTER, {"USER_ID": AGENT_ID, "PHONE_NUMBER": client, "TYPE": 1,
                                         "SHOW": 0})["result"]["CALL_ID"]


def click(portal, client: str) -> ClickToCallEvent:
    return ClickToCallEvent(call_id=opened_call(portal, client), user_id=AGENT_ID, phone_number=f"+{client}",
                            crm_entity_type="CONTACT", crm_entity_id="710", line_number=LINE)


def click_to_call(portal, dialer: HarnessDialer, ring: float = 5.0) -> tuple[ClickToCall, EmulatorOutbox]:
    settings = ClickToCallSettings(channel=AGENT_CHANNEL, ring=ring)
    outbox = EmulatorOutbox(portal)
    flow = ClickToCall(settings, default_country="RU", prefix="B24_", dialer=dialer, users=Directory(),
                       outbox=outbox, names=Names())
    return flow, outbox


def dialer_for(calls: CallDriver, server, **test_variables: str) -> HarnessDialer:
    return HarnessDialer(calls, AGI_BITRIX_CALLCARD=server.callcard_url, AGI_BITRIX_CLIENT_RING="5",
                         **test_variables)


async def finish_of(portal, call_id: str) -> dict[str, Any]:
    await until(lambda: portal.calls[call_id].finish_params is not None, WAIT, interval=0.05)
    return portal.calls[call_id].finish_params


def agent_rings(call: PlacedCall) -> list[Any]:
    return [event for event in call.events if event_name_of(event) == "AgiBitrixTestAgentRing"]


async def test_a_click_rings_the_agent_then_the_client_and_finishes_the_call_with_its_talk_time(
        click_calls, portal, callcard_server):
    client = fresh_client()
    dialer = dialer_for(click_calls, callcard_server, TEST_AGENT="answers", __TEST_ANSWERING=client)
    flow, outbox = click_to_call(portal, dialer)
    event = click(portal, client)

    assert await flow.handle(event) == "answered"
    call = dialer.placed[0]
    ring = await click_calls.wait_for(call, "AgiBitrixTestRing", WAIT, Kind="outbound")
    finish = await finish_of(portal, event.call_id)
    await asyncio.sleep(0.5)  # time for a second finish, if there were going to be one

    assert [(e["Number"], e["CallerID"], e["CallerName"]) for e in agent_rings(call)] == [
        (AGENT_EXTENSION, client, CLIENT_NAME)]
    assert (ring["Number"], ring["CallerID"], ring.get("CallerName", "")) == (client, LINE, "")  # no name: absent
    # The client's stand-in talks for one second (Answer, Wait(1), Hangup).
    assert (finish["CALL_ID"], finish["USER_ID"], finish["STATUS_CODE"]) == (event.call_id, AGENT_ID, "200")
    assert 1 <= int(finish["DURATION"]) <= 2
    assert [r.params["CALL_ID"] for r in portal.requests_for(FINISH)].count(event.call_id) == 1
    assert outbox.finishes == {}


async def test_an_agent_who_does_not_answer_gets_no_client_leg_and_the_call_ends_as_not_answered(
        click_calls, portal, callcard_server):
    client = fresh_client()
    dialer = dialer_for(click_calls, callcard_server, __TEST_ANSWERING=client)
    flow, _ = click_to_call(portal, dialer, ring=2.0)
    event = click(portal, client)

    assert await flow.handle(event) == "agent_not_answered"
    finish = await finish_of(portal, event.call_id)

    assert len(agent_rings(dialer.placed[0])) == 1 and rings(dialer.placed[0]) == []
    assert (finish["USER_ID"], finish["DURATION"], finish["STATUS_CODE"], finish["FAILED_REASON"]) == (
        AGENT_ID, 0, "304", "the agent did not answer")


async def test_a_busy_agent_phone_ends_the_call_as_busy_without_a_client_leg(click_calls, portal, callcard_server):
    client = fresh_client()
    dialer = dialer_for(click_calls, callcard_server, TEST_AGENT="busy", __TEST_ANSWERING=client)
    flow, _ = click_to_call(portal, dialer)
    event = click(portal, client)

    assert await flow.handle(event) == "agent_not_answered"
    finish = await finish_of(portal, event.call_id)

    assert rings(dialer.placed[0]) == []
    assert (finish["STATUS_CODE"], finish["FAILED_REASON"]) == ("486", "the agent's phone is busy")


async def test_a_busy_client_ends_the_call_as_busy(click_calls, portal, callcard_server):
    client = fresh_client()
    dialer = dialer_for(click_calls, callcard_server, TEST_AGENT="answers", __TEST_BUSY=client)
    flow, outbox = click_to_call(portal, dialer)
    event = click(portal, client)

    assert await flow.handle(event) == "answered"
    await click_calls.wait_for(dialer.placed[0], "AgiBitrixTestRing", WAIT, Kind="outbound", Number=client)
    finish = await finish_of(portal, event.call_id)

    assert (finish["CALL_ID"], finish["USER_ID"], finish["DURATION"], finish["STATUS_CODE"]) == (
        event.call_id, AGENT_ID, "0", "486")
    assert outbox.finishes == {}


async def test_a_premium_rate_destination_is_refused_without_an_originate(click_calls, portal, callcard_server):
    dialer = dialer_for(click_calls, callcard_server, TEST_AGENT="answers")
    flow, _ = click_to_call(portal, dialer)
    premium = "78091234567"  # +7 809: Russia's premium-rate range in libphonenumber's metadata
    event = click(portal, premium)

    assert await flow.handle(event) == "refused_number_type"
    finish = await finish_of(portal, event.call_id)

    assert dialer.placed == []
    assert (finish["USER_ID"], finish["DURATION"], finish["STATUS_CODE"]) == (AGENT_ID, 0, "403")
    assert "PREMIUM_RATE" in finish["FAILED_REASON"]


async def test_an_agent_who_hangs_up_while_the_client_rings_cancels_the_call(click_calls, portal, callcard_server):
    """DIALSTATUS=CANCEL: for a call the agent placed, cancelled (603-S), not a missed call."""
    client = fresh_client()
    dialer = dialer_for(click_calls, callcard_server, TEST_AGENT="answers")
    flow, _ = click_to_call(portal, dialer)
    event = click(portal, client)

    assert await flow.handle(event) == "answered"
    await click_calls.wait_for(dialer.placed[0], "AgiBitrixTestRing", WAIT, Kind="outbound", Number=client)
    await click_calls.hangup(agent_rings(dialer.placed[0])[0]["Channel"])
    finish = await finish_of(portal, event.call_id)

    assert (finish["USER_ID"], finish["DURATION"], finish["STATUS_CODE"]) == (AGENT_ID, "0", "603-S")


async def test_on_freepbx_the_client_leg_leaves_through_the_outbound_route_as_the_agents_call(
        freepbx_click_calls, portal, callcard_server):
    """extensions_custom.conf's contexts as shipped: the client is dialled through from-internal,
    whose Outbound Route (stand-in of FreePBX's outrt-) sees the agent's extension and gives the
    call the route's caller ID; the finish is the same."""
    client = fresh_client()
    dialer = dialer_for(freepbx_click_calls, callcard_server, TEST_AGENT="answers", __TEST_ANSWERING=client)
    flow, outbox = click_to_call(portal, dialer)
    event = click(portal, client)

    assert await flow.handle(event) == "answered"
    ring = await freepbx_click_calls.wait_for(dialer.placed[0], "AgiBitrixTestRing", WAIT, Kind="outbound")
    finish = await finish_of(portal, event.call_id)

    assert (ring["Number"], ring["CallerID"]) == (client, ROUTE_CID)
    # The route took the caller as the agent's extension: what FreePBX finds the user by.
    assert [e["Value"] for e in dialer.placed[0].events
            if e.event == "VarSet" and e["Variable"] == "REALCALLERIDNUM"] == [AGENT_EXTENSION]
    assert (finish["CALL_ID"], finish["USER_ID"], finish["STATUS_CODE"]) == (event.call_id, AGENT_ID, "200")
    assert 1 <= int(finish["DURATION"]) <= 2
    assert outbox.finishes == {}
