"""Callback requests on a real Asterisk 20 and 22: the flow (agi_bitrix/callback.py) with the
product's AMI client (AmiClient, clicktocall_service's AmiDialer), its Router, its register
(PortalRegistrar: RegisterService with a real PortalClient) against the portal emulator, and the
shipped sample's [agi-bitrix-callback-agents], [agi-bitrix-callback] and [agi-bitrix-callback-done].

What is proven here and nowhere else: an Originate of Local/<queue>@agi-bitrix-callback-agents is
answered when the queue's member answers (not before), the agent hears the announcement before the
client is dialled, each attempt's report reaches the flow over AMI with the client leg's DIALSTATUS
and answer stamp, and the portal sees, in order, the lookup, one register TYPE=4 and one finish with
the real outcome.
"""

import asyncio
import dataclasses
import itertools
import logging
import math
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agi_bitrix.ami.client import AmiClient
from agi_bitrix.ami.protocol import Event
from agi_bitrix.ami.settings import AmiSettings
from agi_bitrix.bitrix.breaker import CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.lookup import CrmLookup, LookupMemory
from agi_bitrix.bitrix.settings import CacheSettings
from agi_bitrix.bitrix.users import User
from agi_bitrix.callback import Callback, CallbackRequest
from agi_bitrix.callback_settings import CallbackSettings
from agi_bitrix.clicktocall import OriginateOutcome
from agi_bitrix.clicktocall_service import AmiDialer, PortalRegistrar
from agi_bitrix.config import parse_config
from agi_bitrix.service import Router
from agi_bitrix.testing.pbx_harness import AsteriskBuild, AsteriskPbx
from tests.conftest import ample_budget

from .conftest import TEST_DIALPLAN, running_pbx
from .crm import crm_object, fresh_mobiles
from .freepbx_standins import ROUTE_CID
from .test_callcard import FINISH, REGISTER
from .test_click_to_call import AGENT_EXTENSION, AGENT_ID, AGENT_PHONES
from .test_freepbx_sample import FREEPBX_QUEUES, freepbx_config

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

QUEUE, LINE = "callback-sales", "74951230000"
FREEPBX_QUEUE = "402"  # FreePBX names a queue by its number
RESPONSIBLE_ID = "9"  # callcard.register.default_user: who a queue's callback is registered for
# The line's queue: one member, the agent's phone stand-in (answers when TEST_AGENT is "answers").
CALLBACK_QUEUES = f"""
[general]
[{QUEUE}]
strategy = ringall
member => Local/{AGENT_EXTENSION}@agi-bitrix-test-agents/n
"""
SEARCH = "telephony.externalcall.searchcrmentities"  # as the emulator records a method: lower case
# A Moscow mobile no other request of this run has used (the lookup caches answers per number).
fresh_client = fresh_mobiles("7916", itertools.count(5001))


@pytest.fixture(scope="module")
def callback_pbx(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    yield from running_pbx(asterisk_root, asterisk_build, "callback", TEST_DIALPLAN + AGENT_PHONES, CALLBACK_QUEUES)


@pytest.fixture(scope="module")
def freepbx_callback_pbx(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    """The FreePBX sample beside the stand-ins of FreePBX's generated dialplan; the queue by number."""
    queues = FREEPBX_QUEUES + CALLBACK_QUEUES.replace("[general]", "").replace(QUEUE, FREEPBX_QUEUE)
    yield from running_pbx(asterisk_root, asterisk_build, "callback-freepbx", freepbx_config(asterisk_build)
                           + AGENT_PHONES, queues)


async def connected(pbx: AsteriskPbx) -> AmiClient:
    """The product's AMI client, as a user that may read `user` events (the attempts' reports)."""
    settings = AmiSettings(port=pbx.ami_port, username=pbx.ami_username, secret_file="",
                           connect_timeout=5.0, action_timeout=5.0, reconnect_first=0.1, reconnect_max=0.5)
    client = AmiClient(settings, lambda: pbx.ami_secret)
    client.start()
    assert await client.wait_up(10), client.health()
    return client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ami(callback_pbx: AsteriskPbx) -> AsyncIterator[AmiClient]:
    client = await connected(callback_pbx)
    yield client
    await client.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def freepbx_ami(freepbx_callback_pbx: AsteriskPbx) -> AsyncIterator[AmiClient]:
    client = await connected(freepbx_callback_pbx)
    yield client
    await client.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def portal_client(portal) -> AsyncIterator[PortalClient]:
    # The portal knows the agent (register checks USER_ID): a CRM object of theirs makes them a user.
    portal.set_client("74950000081", [crm_object(int(AGENT_ID), "OPENED", extension=AGENT_EXTENSION)])
    portal.set_client("74950000009", [crm_object(int(RESPONSIBLE_ID), "OPENED")])
    async with make_session() as session:
        yield PortalClient(portal.webhook_url, session, timeout=2.0, budget=ample_budget())


class AttemptVariables:
    """The product's AmiDialer, with what the stand-ins read added to each attempt's Originate:
    the agent answers; the client answers on the attempts listed in `client_answers` (1-based)."""

    def __init__(self, dialer: AmiDialer, client: str, client_answers: tuple[int, ...]):
        self.dialer = dialer
        self.client = client
        self.client_answers = client_answers
        self.attempts = 0

    async def originate(self, channel: str, context: str, exten: str, variables: Mapping[str, str],
                        caller_id: str, timeout: float) -> OriginateOutcome:
        self.attempts += 1
        answering = self.client if self.attempts in self.client_answers else "nobody"
        test_variables = {"__TEST_AGENT": "answers", "__TEST_ANSWERING": answering, "AGI_BITRIX_CLIENT_RING": "3"}
        return await self.dialer.originate(channel, context, exten, {**variables, **test_variables}, caller_id,
                                           timeout)


class PortalOutbox:
    """The finish straight to the emulator through the PortalClient, once per key (the outbox's
    own delivery is the subject of tests/test_callcard_outbox.py)."""

    def __init__(self, client: PortalClient):
        self.client = client
        self.keys: set[str] = set()

    async def add(self, key: str, params: dict[str, Any]) -> str:
        if key in self.keys:
            return "duplicate"
        self.keys.add(key)
        await self.client.call(FINISH, dict(params), max_wait=1.0)
        return "stored"


class Heard:
    """The AMI events the test reads beside the flow: the stand-ins' rings and the attempts' reports."""

    def __init__(self, ami: AmiClient):
        self.events: list[Event] = []
        self.remove = ami.add_listener(self.events.append)

    def user_events(self, name: str, **fields: str) -> list[Event]:
        return [event for event in self.events if event.name == "UserEvent" and event.get("UserEvent") == name
                and all(event.get(key) == value for key, value in fields.items())]


def announcement(pbx: AsteriskPbx) -> str:
    """Half a second of a 440 Hz tone as signed linear, 8 kHz (format_sln), where Asterisk reads it."""
    samples = (round(8000 * math.sin(2 * math.pi * 440 * n / 8000)) for n in range(4000))
    (pbx.host_home / "announcement.sln").write_bytes(b"".join(struct.pack("<h", sample) for sample in samples))
    return f"{pbx.home}/announcement"


def callback_flow(portal, ami: AmiClient, portal_client: PortalClient, dialer: AttemptVariables, sound: str,
                  **settings: Any) -> tuple[Callback, Callable[[], None]]:
    """The flow as clicktocall_service wires it, and the function that stops its AMI listener."""
    config = parse_config(f"bitrix: {{webhook_url: '{portal.webhook_url}'}}\n"
                          "routing: {fallback_queue: support, rules: [{name: owner-at-work,"
                          " match: {timeman: [OPENED]}, route: [extension, queue]}]}\n"
                          f"callcard: {{register: {{default_user: '{RESPONSIBLE_ID}'}}}}\n")
    callback = CallbackSettings(line_queues=((LINE, QUEUE),), owner_channel="Local/{extension}@agi-bitrix-test-agents",
                                announcement=sound, ring=10.0, attempts=2, interval=0.5, min_talk=0.5,
                                max_call=60.0)
    config = dataclasses.replace(config, callback=dataclasses.replace(callback, **settings))
    memory = LookupMemory(AnswerCache(CacheSettings()), CircuitBreaker(failures=10_000, cool_down=1))
    router = Router(config, CrmLookup(portal_client, memory, deadline=1.5))
    flow = Callback(config, dialer=dialer, routes=router, registrar=PortalRegistrar(config, lambda: portal_client),
                    outbox=PortalOutbox(portal_client), users=Members())
    return flow, ami.add_listener(flow.on_ami_event)


class Members:
    """The user directory: the agent's extension is the agent's."""

    def by_number(self, number: str) -> User | None:
        return User(AGENT_ID, True, extension=AGENT_EXTENSION) if number == AGENT_EXTENSION else None


def request(client: str) -> CallbackRequest:
    return CallbackRequest(f"+{client}", "Please call me back about the delivery", LINE, "CONTACT", "710",
                           f"test-{client}")


def telephony_methods(portal, since: int) -> list[tuple[str, dict[str, Any]]]:
    """Every method the portal was asked since `since`, in order, with its parameters."""
    return [(r.method, r.params) for r in portal.requests[since:]]


async def run(pbx, portal, ami, portal_client, client: str, client_answers: tuple[int, ...],
              **settings: Any) -> tuple[str, list[tuple[str, dict[str, Any]]], Heard, AttemptVariables]:
    since = len(portal.requests)
    heard = Heard(ami)
    dialer = AttemptVariables(AmiDialer(ami), client, client_answers)
    flow, remove_listener = callback_flow(portal, ami, portal_client, dialer, announcement(pbx), **settings)
    try:
        outcome = await asyncio.wait_for(flow.handle(request(client)), 120)
        await asyncio.sleep(0.3)  # a second finish, if there were going to be one
    finally:
        remove_listener()
        heard.remove()
    return outcome, telephony_methods(portal, since), heard, dialer


def assert_registered(methods: list[tuple[str, dict[str, Any]]], client: str, user: str = RESPONSIBLE_ID) -> str:
    assert [name for name, _ in methods] == [SEARCH, REGISTER, FINISH], methods
    register = methods[1][1]
    assert {key: str(register.get(key)) for key in ("USER_ID", "PHONE_NUMBER", "TYPE", "LINE_NUMBER",
                                                    "CRM_ENTITY_TYPE", "CRM_ENTITY_ID")} == {
        "USER_ID": user, "PHONE_NUMBER": client, "TYPE": "4", "LINE_NUMBER": LINE, "CRM_ENTITY_TYPE": "CONTACT",
        "CRM_ENTITY_ID": "710"}
    return methods[2][1]["CALL_ID"]


async def test_the_queue_agent_answers_hears_the_announcement_and_the_client_answers(
        callback_pbx, ami, portal, portal_client):
    client = fresh_client()
    outcome, methods, heard, dialer = await run(callback_pbx, portal, ami, portal_client, client, client_answers=(1,))

    assert outcome == "reached" and dialer.attempts == 1
    call_id = assert_registered(methods, client)
    finish = methods[2][1]
    # The client's stand-in talks for one second (Answer, Wait(1), Hangup); the finish names the
    # queue member who talked, not the line's responsible user the callback was registered for.
    assert (finish["CALL_ID"], finish["USER_ID"], finish["STATUS_CODE"]) == (call_id, AGENT_ID, "200")
    assert 1 <= int(finish["DURATION"]) <= 2 and "FAILED_REASON" not in finish
    assert len(heard.user_events("AgiBitrixTestAgentRing", Number=AGENT_EXTENSION)) == 1
    assert [e.get("CallerID") for e in heard.user_events("AgiBitrixTestRing", Number=client)] == [LINE]
    [report] = heard.user_events("AgiBitrixCallbackDone")
    assert (report.get("DialStatus"), report.get("Announcement")) == ("ANSWER", "SUCCESS")


async def test_a_client_who_does_not_answer_is_called_again_and_answers_the_second_attempt(
        callback_pbx, ami, portal, portal_client):
    client = fresh_client()
    outcome, methods, heard, dialer = await run(callback_pbx, portal, ami, portal_client, client, client_answers=(2,))

    assert outcome == "reached" and dialer.attempts == 2
    assert_registered(methods, client)
    assert [e.get("DialStatus") for e in heard.user_events("AgiBitrixCallbackDone")] == ["NOANSWER", "ANSWER"]
    assert len(heard.user_events("AgiBitrixTestRing", Number=client)) == 2
    finish = methods[2][1]
    assert (finish["USER_ID"], finish["STATUS_CODE"]) == (AGENT_ID, "200") and 1 <= int(finish["DURATION"]) <= 2


async def test_a_client_who_never_answers_is_finished_as_missed_after_the_configured_attempts(
        callback_pbx, ami, portal, portal_client):
    client = fresh_client()
    outcome, methods, heard, dialer = await run(callback_pbx, portal, ami, portal_client, client, client_answers=())

    assert outcome == "not_reached" and dialer.attempts == 2
    assert_registered(methods, client)
    assert [e.get("DialStatus") for e in heard.user_events("AgiBitrixCallbackDone")] == ["NOANSWER", "NOANSWER"]
    finish = methods[2][1]
    assert (finish["USER_ID"], str(finish["DURATION"]), finish["STATUS_CODE"], finish["FAILED_REASON"]) == (
        RESPONSIBLE_ID, "0", "304", "the client was not reached (NOANSWER) after 2 attempt(s)")


async def test_the_owner_at_work_gets_the_callback_on_their_own_phone(callback_pbx, ami, portal, portal_client,
                                                                     caplog):
    caplog.set_level(logging.INFO, "agi_bitrix.callback")
    client = fresh_client()
    portal.set_client(client, [crm_object(int(AGENT_ID), "OPENED", extension=AGENT_EXTENSION)])
    outcome, methods, heard, _ = await run(callback_pbx, portal, ami, portal_client, client, client_answers=(1,),
                                           line_queues=())

    assert outcome == "reached"
    assert_registered(methods, client, user=AGENT_ID)
    # No queue for the line, and routing's queue (support) does not exist on this Asterisk: the
    # agent's phone rang as the owner's extension (owner_channel), or not at all.
    assert len(heard.user_events("AgiBitrixTestAgentRing", Number=AGENT_EXTENSION)) == 1
    assert f"attempt 1 of 2: ringing owner's extension {AGENT_EXTENSION} for {client}" in caplog.text
    assert methods[2][1]["STATUS_CODE"] == "200"


async def test_a_premium_rate_number_is_refused_by_the_dial_policy_and_finished_with_nothing_dialled(
        callback_pbx, ami, portal, portal_client):
    premium = "78091234567"  # +7 809: Russia's premium-rate range in libphonenumber's metadata
    outcome, methods, heard, dialer = await run(callback_pbx, portal, ami, portal_client, premium, client_answers=(1,))

    assert outcome == "refused_number_type" and dialer.attempts == 0
    assert_registered(methods, premium)
    finish = methods[2][1]
    assert (finish["USER_ID"], str(finish["DURATION"]), finish["STATUS_CODE"]) == (RESPONSIBLE_ID, "0", "403")
    assert "PREMIUM_RATE" in finish["FAILED_REASON"]
    assert heard.user_events("AgiBitrixTestAgentRing") == heard.user_events("AgiBitrixTestRing") == []


async def test_on_freepbx_the_queue_by_number_rings_the_agent_and_the_client_leaves_through_the_outbound_route(
        freepbx_callback_pbx, freepbx_ami, portal, portal_client):
    """extensions_custom.conf's contexts as shipped: the client is dialled through from-internal, whose
    Outbound Route (stand-in of FreePBX's outrt-) gives the call the route's caller ID."""
    client = fresh_client()
    outcome, methods, heard, _ = await run(freepbx_callback_pbx, portal, freepbx_ami, portal_client, client,
                                           client_answers=(1,), line_queues=((LINE, FREEPBX_QUEUE),))

    assert outcome == "reached"
    assert_registered(methods, client)
    assert len(heard.user_events("AgiBitrixTestAgentRing", Number=AGENT_EXTENSION)) == 1
    assert [e.get("CallerID") for e in heard.user_events("AgiBitrixTestRing", Number=client)] == [ROUTE_CID]
    [report] = heard.user_events("AgiBitrixCallbackDone")
    assert (report.get("DialStatus"), report.get("Announcement")) == ("ANSWER", "SUCCESS")
    assert (methods[2][1]["USER_ID"], methods[2][1]["STATUS_CODE"]) == (AGENT_ID, "200")
    assert 1 <= int(methods[2][1]["DURATION"]) <= 2
