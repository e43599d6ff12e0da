"""Click-to-call's pure parts and its flow with fakes: the dial policy, the `clicktocall` section's
checks, the status tables (Originate's reason, the client leg's DIALSTATUS), the per-user and
global limits, and what the flow does with each kind of click. tests/asterisk/test_click_to_call.py
runs the same flow against a real Asterisk 20 and 22."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest

from agi_bitrix.bitrix.models import CrmAnswer, CrmEntity
from agi_bitrix.bitrix.users import User
from agi_bitrix.callcard.finish import FinishService, finish_arguments
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.status import outgoing_status_code, status_code
from agi_bitrix.checking import ConfigError
from agi_bitrix.clicktocall import (
    AGENT_LEG,
    ClickLimits,
    ClickToCall,
    ClickToCallEvent,
    DialerError,
    OriginateOutcome,
    agent_leg_failure,
)
from agi_bitrix.config import parse_config
from agi_bitrix.dialpolicy import ClickToCallSettings, Destination, DialPolicy, Refusal, dial_destination, dial_policy

BASE = """\
bitrix:
  webhook_url: https://portal.example/rest/1/secretcode/
routing:
  fallback_queue: support
"""
# A click rings the agent's phone through AMI: the section, with its secret from the environment.
AMI = "ami: {username: agi-bitrix}\n"
AMI_ENV = {"AGI_BITRIX_AMI_SECRET": "the-ami-secret-of-these-tests"}
CALL_ID = "externalCall.0a1b2c3d4e5f.1700000000"
DEFAULT = DialPolicy(frozenset({"RU"}), frozenset({"FIXED_LINE", "MOBILE", "FIXED_LINE_OR_MOBILE"}), "RU")


# -- the dial policy --

@pytest.mark.parametrize(("raw", "expected"), [
    ("8 916 123-45-67", Destination("79161234567")),  # a mobile, typed the Russian way
    ("+7 (495) 123-45-67", Destination("74951234567")),  # a Moscow fixed line
    ("+7 809 123-45-67", "number_type"),  # premium rate
    ("8 800 123-45-67", "number_type"),  # toll free
    ("+49 30 12345678", "country"),  # a valid fixed line, of Germany
    ("112", "emergency"),
    ("01", "not_a_number"),  # too short to be any number
    ("911", "invalid"),  # a short code, not an emergency number in Russia: still no subscriber
    ("+7 916 123", "invalid"),
    ("120&Local/666@evil", "not_a_number"),  # never anything but digits reaches the PBX
    ("79161234567\n", Destination("79161234567")),
])
def test_the_default_policy_admits_only_fixed_and_mobile_numbers_of_the_country(raw, expected):
    found = dial_destination(raw, DEFAULT)
    assert (found if isinstance(found, Destination) else found.reason) == expected


def test_each_refusal_carries_the_documented_status():
    statuses = {raw: found.status for raw in ("+7 809 123-45-67", "+49 30 12345678", "112", "abc", "911")
                if isinstance(found := dial_destination(raw, DEFAULT), Refusal)}
    assert statuses == {"+7 809 123-45-67": "403", "+49 30 12345678": "484", "112": "403", "abc": "404",
                        "911": "404"}


def test_an_admin_widens_the_policy_in_yaml_but_never_to_emergency_numbers():
    config = parse_config(BASE + AMI + """\
callcard: {}
users: {}
clicktocall:
  dial_policy: {countries: [RU, KZ, DE], number_types: [fixed_line, MOBILE, TOLL_FREE, PREMIUM_RATE, UAN]}
""", environ=AMI_ENV)
    policy = dial_policy(config.clicktocall, config.policy.default_country)
    assert dial_destination("+7 809 123-45-67", policy) == Destination("78091234567")
    assert dial_destination("+49 30 12345678", policy) == Destination("493012345678")
    assert dial_destination("+7 701 123 45 67", policy) == Destination("77011234567")  # Kazakhstan's mobiles share +7
    assert isinstance(refused := dial_destination("112", policy), Refusal) and refused.reason == "emergency"


def test_the_countries_default_to_the_phones_country():
    config = parse_config(BASE + AMI + "phones: {default_country: KZ}\ncallcard: {}\nusers: {}\nclicktocall: {}\n",
                          environ=AMI_ENV)
    policy = dial_policy(config.clicktocall, config.policy.default_country)
    assert policy.countries == {"KZ"}
    assert isinstance(refused := dial_destination("+7 916 123-45-67", policy), Refusal) and refused.reason == "country"


def test_check_names_every_mistake_in_the_section():
    with pytest.raises(ConfigError) as error:
        parse_config(BASE + """\
clicktocall:
  channel: PJSIP/101&PJSIP/102
  context: "outbound,1"
  dial_policy: {countries: [XX], number_types: [PREMIUM]}
""", "test.yaml")
    assert [str(problem) for problem in error.value.problems] == [
        "test.yaml:5: clicktocall: needs the callcard section: a click-to-call is finished through its outbox",
        ("test.yaml:5: clicktocall: needs the ami section: a click rings the agent's phone through Asterisk's manager"
         " (Originate)"),
        ("test.yaml:5: clicktocall: needs the users section (with refresh above 0): the user directory gives each"
        " user's extension"),
        ("test.yaml:6: clicktocall.channel: 'PJSIP/101&PJSIP/102' must be a channel like PJSIP/{extension} or"
        " Local/{extension}@from-internal, with {extension} in it"),
        "test.yaml:7: clicktocall.context: 'outbound,1' is not a dialplan context name (letters, digits, _ and -)",
        "test.yaml:8: clicktocall.dial_policy.countries[0]: 'XX' is not a region code like RU, KZ, BY",
        ("test.yaml:8: clicktocall.dial_policy.number_types[0]: 'PREMIUM' is not one of: FIXED_LINE, MOBILE,"
        " FIXED_LINE_OR_MOBILE, TOLL_FREE, PREMIUM_RATE, SHARED_COST, VOIP, PERSONAL_NUMBER, PAGER, UAN, VOICEMAIL"),
    ]


def test_a_channel_template_holds_no_other_field():
    with pytest.raises(ConfigError, match="the only field"):
        parse_config(BASE + "callcard: {}\nusers: {}\nclicktocall: {channel: 'PJSIP/{extension}{context}'}\n")


# -- the status tables --

@pytest.mark.parametrize(("reason", "status"), [(0, "480"), (1, "603-S"), (3, "304"), (5, "486"), (8, "503"),
                                                (7, "OTHER")])
def test_originates_reason_gives_the_documented_status(reason, status):
    assert agent_leg_failure(OriginateOutcome(reason)).status == status
    assert not OriginateOutcome(reason).answered and OriginateOutcome(4).answered


def test_every_agent_leg_status_is_a_code_the_portal_documents():
    documented = {"200", "304", "603", "603-S", "403", "404", "486", "484", "503", "480", "402", "423", "OTHER"}
    assert {failure.status for failure in AGENT_LEG.values()} <= documented


@pytest.mark.parametrize(("answered", "dialstatus", "outgoing", "incoming"), [
    (True, "NOANSWER", "200", "200"),
    (False, "NOANSWER", "304", "304"),
    (False, "CANCEL", "603-S", "304"),  # the agent gave up while the client rang; incoming: missed
    (False, "BUSY", "486", "486"),
    (False, "CONGESTION", "503", "503"),
    (False, "CHANUNAVAIL", "480", "480"),
    (False, "", "603-S", "304"),  # the agent hung up before the client was dialled
    (False, "SOMETHING", "OTHER", "304"),
])
def test_the_client_legs_dialstatus_of_a_call_the_agent_placed(answered, dialstatus, outgoing, incoming):
    assert outgoing_status_code(answered, dialstatus) == outgoing
    assert status_code(answered, dialstatus) == incoming


class NumberDirectory:
    def by_number(self, number: str) -> User | None:
        return User("55", True, mobile="79161234567") if number == "79161234567" else None


def test_a_click_to_call_finish_is_the_agents_even_when_the_client_is_a_colleague():
    config = parse_config(BASE + "callcard: {}\n")
    service = FinishService(config, None, NumberDirectory(), CardHolders())  # type: ignore[arg-type]
    values = [CALL_ID, "81", "CANCEL", "", "79161234567", "1700000100.0", "", "", "outgoing"]
    assert service.finish_params(finish_arguments(values, "RU"), "1.1") == {
        "CALL_ID": CALL_ID, "USER_ID": "81", "DURATION": 0, "STATUS_CODE": "603-S"}
    answered = [CALL_ID, "81", "ANSWER", "1700000090.0", "79161234567", "1700000100.0", "", "", "OUTGOING"]
    assert service.finish_params(finish_arguments(answered, "RU"), "1.1") == {
        "CALL_ID": CALL_ID, "USER_ID": "81", "DURATION": 10, "STATUS_CODE": "200"}
    incoming = answered[:8]  # the same call as an incoming one: the colleague who answered took it
    assert service.finish_params(finish_arguments(incoming, "RU"), "1.1")["USER_ID"] == "55"


# -- the limits --

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_click_per_user_at_a_time():
    limits = ClickLimits(100.0, 100)
    assert limits.admit("81") is None
    refused = limits.admit("81")
    assert refused is not None and refused.status == "486"
    assert limits.admit("82") is None
    limits.release("81")
    assert limits.admit("81") is None


def test_the_global_rate_is_a_token_bucket():
    clock = Clock()
    limits = ClickLimits(1.0, 2, clock)
    assert [limits.admit(user) for user in ("1", "2")] == [None, None]
    refused = limits.admit("3")
    assert refused is not None and refused.status == "480"
    assert limits.admit("3") is not None  # a refusal takes no token, but none has come back yet
    clock.now += 1.0
    assert limits.admit("3") is None


# -- the flow, with fakes --

class FakeDialer:
    def __init__(self, reason: int = 4, error: str = "", bug: bool = False) -> None:
        self.reason = reason
        self.error = error
        self.bug = bug
        self.calls: list[dict[str, Any]] = []
        self.release: asyncio.Event | None = None

    async def originate(self, channel: str, context: str, exten: str, variables: Mapping[str, str],
                        caller_id: str, timeout: float) -> OriginateOutcome:
        self.calls.append({"channel": channel, "context": context, "exten": exten, "variables": dict(variables),
                           "caller_id": caller_id, "timeout": timeout})
        if self.release is not None:
            await self.release.wait()
        if self.error:
            raise DialerError(self.error)
        if self.bug:
            raise KeyError("Reason")
        return OriginateOutcome(self.reason)


USERS = {"81": User("81", True, extension="181"), "82": User("82", True),
         "83": User("83", False, extension="183"), "84": User("84", True, extension="184")}


class Users:
    def by_id(self, user_id: str) -> User | None:
        return USERS.get(user_id)


class Outbox:
    def __init__(self) -> None:
        self.added: dict[str, dict[str, Any]] = {}

    async def add(self, key: str, params: dict[str, Any]) -> str:
        if key in self.added:
            return "duplicate"
        self.added[key] = params
        return "stored"


class Names:
    def __init__(self, name: str = "Анна Смирнова", delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay

    async def lookup(self, phone: str) -> CrmAnswer:
        await asyncio.sleep(self.delay)
        return CrmAnswer("FOUND", (CrmEntity("LEAD", "5", None, "someone else"),
                                   CrmEntity("CONTACT", "710", None, self.name)))


def event(user_id: str = "81", phone: str = "8 916 123-45-67", call_id: str = CALL_ID) -> ClickToCallEvent:
    return ClickToCallEvent(call_id=call_id, user_id=user_id, phone_number=phone, crm_entity_type="contact",
                            crm_entity_id="710", line_number="+7 495 123-00-00")


def flow(dialer: FakeDialer, names: Names | None = None, **settings: Any) -> tuple[ClickToCall, Outbox]:
    outbox = Outbox()
    return ClickToCall(ClickToCallSettings(**settings), default_country="RU", prefix="B24_", dialer=dialer,
                       users=Users(), outbox=outbox, names=names or Names(), name_wait=0.2), outbox


async def test_an_answered_click_rings_the_agent_with_the_clients_name_and_finishes_nothing_itself():
    dialer = FakeDialer()
    click_to_call, outbox = flow(dialer, channel="Local/{extension}@from-internal", ring=20)
    assert await click_to_call.handle(event()) == "answered"
    assert dialer.calls == [{
        "channel": "Local/181@from-internal", "context": "agi-bitrix-click-to-call", "exten": "79161234567",
        "variables": {"B24_CALL_ID": CALL_ID, "B24_USER_ID": "81", "B24_EXTENSION": "181", "B24_LINE_NUMBER": ""},
        "caller_id": '"Анна Смирнова" <79161234567>', "timeout": 20.0}]
    assert outbox.added == {}
    assert click_to_call.limits.placing == set()


async def test_the_clients_name_is_filtered_as_b24_name_is():
    dialer = FakeDialer()
    click_to_call, _ = flow(dialer, names=Names('Evil" <666>, Inc;\n${SHELL}'))
    await click_to_call.handle(event())
    assert dialer.calls[0]["caller_id"] == '"Evil 666 Inc SHELL" <79161234567>'


async def test_a_slow_name_lookup_does_not_hold_the_ring():
    dialer = FakeDialer()
    click_to_call, _ = flow(dialer, names=Names(delay=5.0))
    await asyncio.wait_for(click_to_call.handle(event()), 1.0)
    assert dialer.calls[0]["caller_id"] == "79161234567"


@pytest.mark.parametrize(("line", "passed"), [("74951230000", "74951230000"), ("+74951230000", "74951230000"),
                                              ("sip-line-1", ""), ("7495&1", "")])
async def test_only_a_line_number_of_digits_is_passed_for_the_clients_caller_id(line, passed):
    dialer = FakeDialer()
    click_to_call, _ = flow(dialer)
    await click_to_call.handle(ClickToCallEvent(CALL_ID, "81", "89161234567", line_number=line))
    assert dialer.calls[0]["variables"]["B24_LINE_NUMBER"] == passed


class BrokenNames:
    async def lookup(self, phone: str) -> CrmAnswer:
        raise RuntimeError("a bug in the lookup")


async def test_a_failing_name_lookup_rings_without_the_name_and_says_why(caplog):
    dialer = FakeDialer()
    click_to_call, _ = flow(dialer, names=BrokenNames())  # type: ignore[arg-type]
    assert await click_to_call.handle(event()) == "answered"
    assert dialer.calls[0]["caller_id"] == "79161234567"
    assert "the CRM lookup for the client's name failed unexpectedly" in caplog.text


@pytest.mark.parametrize(("click", "outcome", "status"), [
    (event(phone="+7 809 123-45-67"), "refused_number_type", "403"),
    (event(phone="112"), "refused_emergency", "403"),
    (event(phone="+49 30 12345678"), "refused_country", "484"),
    (event(phone="not a number"), "refused_not_a_number", "404"),
    (event(user_id="82"), "no_extension", "480"),  # no UF_PHONE_INNER
    (event(user_id="83"), "no_extension", "403"),  # deactivated
    (event(user_id="99"), "no_extension", "480"),  # not in the directory
])
async def test_a_click_that_cannot_ring_is_finished_at_once_without_an_originate(click, outcome, status, caplog):
    dialer = FakeDialer()
    click_to_call, outbox = flow(dialer)
    assert await click_to_call.handle(click) == outcome
    assert dialer.calls == []
    params = outbox.added[CALL_ID]
    assert (params["CALL_ID"], params["USER_ID"], params["DURATION"], params["STATUS_CODE"]) == (
        CALL_ID, click.user_id, 0, status)
    assert params["FAILED_REASON"] in caplog.text and CALL_ID in caplog.text
    assert click_to_call.outcomes == {outcome: 1}


@pytest.mark.parametrize(("dialer", "outcome", "status"), [
    (FakeDialer(reason=3), "agent_not_answered", "304"),
    (FakeDialer(reason=5), "agent_not_answered", "486"),
    (FakeDialer(reason=0), "agent_not_answered", "480"),
    (FakeDialer(error="AMI connection refused"), "pbx_unreachable", "503"),
    (FakeDialer(bug=True), "internal_error", "503"),
])
async def test_an_agent_leg_that_fails_finishes_the_call_with_its_status(dialer, outcome, status):
    click_to_call, outbox = flow(dialer)
    assert await click_to_call.handle(event()) == outcome
    assert outbox.added[CALL_ID]["STATUS_CODE"] == status
    assert click_to_call.limits.placing == set()


async def test_a_second_click_of_the_same_user_while_the_first_rings_is_refused_as_busy():
    dialer = FakeDialer()
    dialer.release = asyncio.Event()
    click_to_call, outbox = flow(dialer)
    first = asyncio.create_task(click_to_call.handle(event(call_id="first")))
    await asyncio.sleep(0.3)
    assert await click_to_call.handle(event(call_id="second")) == "user_busy"
    other = asyncio.create_task(click_to_call.handle(event(user_id="84", call_id="other")))
    await asyncio.sleep(0.1)
    dialer.release.set()
    assert (await first, await other) == ("answered", "answered")
    assert list(outbox.added) == ["second"] and outbox.added["second"]["STATUS_CODE"] == "486"
    assert [call["variables"]["B24_CALL_ID"] for call in dialer.calls] == ["first", "other"]


async def test_clicks_beyond_the_global_rate_are_finished_not_dialled():
    dialer = FakeDialer()
    click_to_call, outbox = flow(dialer, rate_per_second=0.01, rate_burst=1)
    assert await click_to_call.handle(event(call_id="first")) == "answered"
    assert await click_to_call.handle(event(user_id="84", call_id="second")) == "rate"
    assert len(dialer.calls) == 1 and outbox.added["second"]["STATUS_CODE"] == "480"


@pytest.mark.parametrize("click", [event(call_id="a b"), event(user_id="x1"), event(call_id="")])
async def test_an_event_without_a_usable_call_or_user_id_is_dropped(click):
    dialer = FakeDialer()
    click_to_call, outbox = flow(dialer)
    assert await click_to_call.handle(click) == "bad_event"
    assert dialer.calls == [] and outbox.added == {}


def test_check_says_what_a_click_may_dial(tmp_path):
    path = tmp_path / "agi-bitrix.yaml"
    path.write_text(BASE + AMI + "callcard: {outbox: /tmp/outbox.sqlite3}\nusers: {}\n"
                                 "clicktocall: {dial_policy: {countries: [RU, KZ], number_types: [MOBILE, VOIP]}}\n")
    result = subprocess.run([sys.executable, "-m", "agi_bitrix", "check", "-c", str(path)], capture_output=True,
                            text=True, timeout=60, check=False, env={**os.environ, **AMI_ENV})
    assert result.returncode == 0, result.stderr
    assert (f"{path}: click-to-call: rings PJSIP/{{extension}}, then dials valid MOBILE, VOIP numbers of KZ, RU;"
            " never emergency numbers") in result.stdout
