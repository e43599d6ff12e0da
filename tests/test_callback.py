"""Callback requests' flow (agi_bitrix/callback.py) with stand-ins for the PBX and the portal: the
agents' choice, the retry schedule, the outcome's status, and the order of what the flow does.
Real Asterisk 20 and 22: tests/asterisk/test_callback.py."""

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest

from agi_bitrix.ami.protocol import Event
from agi_bitrix.bitrix.models import CrmAnswer, CrmEntity, Owner
from agi_bitrix.bitrix.users import User
from agi_bitrix.callback import (
    Attempt,
    Callback,
    CallbackRequest,
    agent_target,
    attempt_of,
    finish_status,
    retry_after,
)
from agi_bitrix.callback_settings import CallbackSettings
from agi_bitrix.callrecord import RoutedCall
from agi_bitrix.clicktocall import DialerError, OriginateOutcome
from agi_bitrix.config import ConfigError, parse_config
from agi_bitrix.routing.engine import CallInfo, Decision

ANSWERED, NO_ANSWER, BUSY = OriginateOutcome(4), OriginateOutcome(3), OriginateOutcome(5)
SETTINGS = CallbackSettings(line_queues=(("74951230000", "sales"),), attempts=3, interval=60.0, min_talk=5.0)


def decision(route: str, target: str, owner: str = "") -> Decision:
    entity = CrmEntity("CONTACT", "710", Owner(owner, "", "", "", "", "") if owner else None, "Anna")
    return Decision("FOUND", route, target, "owner", "79161234567", "support", entity=entity)


def test_the_owner_at_work_gets_the_callback_on_their_desk_phone():
    assert agent_target(SETTINGS, decision("extension", "181", "81"), "74951230000").channel == "PJSIP/181"


@pytest.mark.parametrize(("chosen", "line", "queue"), [
    (decision("queue", "vip"), "74951230000", "sales"),  # the line's queue first
    (decision("queue", "vip"), "74950000000", "vip"),  # a line without one: routing's queue
    (decision("mobile", "79160000000", "81"), "74950000000", "support"),  # never a personal mobile
    (None, "", "support"),  # routing failed: callback.queue
])
def test_otherwise_the_lines_queue_then_routings_queue_then_the_fallback(chosen, line, queue):
    settings = dataclasses.replace(SETTINGS, queue="support") if chosen is None else SETTINGS
    assert agent_target(settings, chosen, line).channel == f"Local/{queue}@agi-bitrix-callback-agents"


def test_retries_until_the_client_talks_long_enough_or_the_attempts_are_used_up():
    assert retry_after(Attempt(ANSWERED, "NOANSWER"), 1, SETTINGS) == 60.0
    assert retry_after(Attempt(ANSWERED, "ANSWER", talk=2.0), 1, SETTINGS) == 60.0  # too short: a machine?
    assert retry_after(Attempt(NO_ANSWER), 2, SETTINGS) == 60.0  # no agent answered: tried again too
    assert retry_after(Attempt(ANSWERED, "ANSWER", talk=5.0), 1, SETTINGS) is None
    assert retry_after(Attempt(ANSWERED, "NOANSWER"), 3, SETTINGS) is None
    # Never again when unsure: the client may have talked, or a lost Originate may still ring.
    assert retry_after(Attempt(ANSWERED, unknown=True), 1, SETTINGS) is None
    assert retry_after(Attempt(OriginateOutcome(0), pbx_error="down"), 1, SETTINGS) is None


@pytest.mark.parametrize(("attempt", "status"), [
    (Attempt(ANSWERED, "ANSWER", talk=42.4), ("200", 42, "")),
    (Attempt(ANSWERED, "ANSWER", talk=2.0), ("200", 2, "")),  # answered: the real outcome, even if short
    (Attempt(ANSWERED, "NOANSWER"), ("304", 0, "the client was not reached (NOANSWER) after 3 attempt(s)")),
    (Attempt(ANSWERED, "BUSY"), ("486", 0, "the client was not reached (BUSY) after 3 attempt(s)")),
    (Attempt(ANSWERED, ""), ("603-S", 0, "the client was not reached (no dial) after 3 attempt(s)")),
    (Attempt(NO_ANSWER), ("304", 0, "the agent did not answer (after 3 attempt(s))")),
    (Attempt(BUSY), ("486", 0, "the agent's phone is busy (after 3 attempt(s))")),
    (Attempt(ANSWERED, unknown=True), ("OTHER", 0, "the attempt's outcome was not reported (AMI connection lost?)")),
    (Attempt(OriginateOutcome(0), pbx_error="AmiUnavailable: down"),
     ("503", 0, "the PBX could not be asked: AmiUnavailable: down")),
])
def test_the_last_attempt_gives_the_finish(attempt, status):
    assert finish_status(attempt, 3) == status


def test_an_attempts_report_gives_the_talk_time_from_asterisks_stamps():
    def report(**fields: str) -> Event:
        return Event((("Event", "UserEvent"), ("UserEvent", "AgiBitrixCallbackDone"), *fields.items()))

    assert attempt_of(report(DialStatus="ANSWER", AnsweredAt="1000.250", HangupAt="1012.750"), ANSWERED) == Attempt(
        ANSWERED, "ANSWER", 12.5)
    assert attempt_of(report(DialStatus="noanswer", AnsweredAt="", HangupAt="1012.7"), ANSWERED) == Attempt(
        ANSWERED, "NOANSWER")


# -- the flow, in order ------------------------------------------------------------------------

CONFIG = parse_config("bitrix: {webhook_url: 'https://portal.example/rest/1/secretcode/'}\n"
                      "routing: {fallback_queue: support}\n"
                      "callcard: {register: {responsible: [{did: '74951230000', user: '9'}]}}\n")


class Journal:
    """Every stand-in writes what it was asked here, in order."""

    def __init__(self, reports: list[dict[str, str] | OriginateOutcome | DialerError]):
        self.entries: list[tuple[str, Any]] = []
        self.reports = reports
        self.flow: Callback | None = None

    async def route(self, call: CallInfo, uniqueid: str = "-") -> RoutedCall:
        self.entries.append(("route", (call.phone, call.did)))
        return RoutedCall(call, CrmAnswer("NOT_FOUND"), decision("queue", "support"), {}, 0.0)

    async def send_register(self, params: dict[str, Any], uniqueid: str, *, show: bool,
                            crm_create: bool) -> tuple[str, str]:
        self.entries.append(("register", params))
        return "externalCall.1", ""

    async def originate(self, channel: str, context: str, exten: str, variables: Mapping[str, str],
                        caller_id: str, timeout: float) -> OriginateOutcome:
        self.entries.append(("originate", (channel, context, exten)))
        outcome = self.reports.pop(0)
        if isinstance(outcome, DialerError):
            raise outcome
        if isinstance(outcome, OriginateOutcome):
            return outcome
        assert self.flow is not None  # the report arrives while the attempt waits for it
        token = variables["__B24_CALLBACK_ATTEMPT"]
        if "Agent" in outcome:  # the member's report comes first, before the call is connected
            self.flow.on_ami_event(Event((("Event", "UserEvent"), ("UserEvent", "AgiBitrixCallbackAgent"),
                                          ("Attempt", token), ("Agent", outcome["Agent"]))))
        fields = {"Event": "UserEvent", "UserEvent": "AgiBitrixCallbackDone", "Attempt": token,
                  **{key: value for key, value in outcome.items() if key != "Agent"}}
        asyncio.get_running_loop().call_soon(self.flow.on_ami_event, Event(tuple(fields.items())))
        return ANSWERED

    async def add(self, key: str, params: dict[str, Any]) -> str:
        self.entries.append(("finish", params))
        return "stored"

    async def sleep(self, seconds: float) -> None:
        self.entries.append(("sleep", seconds))


class Members:
    """The user directory: extension 181 is user 81's."""

    def by_number(self, number: str) -> User | None:
        return User("81", True, extension="181") if number == "181" else None


def callback_flow(journal: Journal, **settings: Any) -> Callback:
    config = dataclasses.replace(CONFIG, callback=dataclasses.replace(SETTINGS, **settings))
    flow = Callback(config, dialer=journal, routes=journal, registrar=journal, outbox=journal, users=Members(),
                    sleep=journal.sleep)
    journal.flow = flow
    return flow


REQUEST = CallbackRequest("+7 916 123-45-67", "please call after 6", "74951230000", "CONTACT", "710", "abc123")
TALKED = {"DialStatus": "ANSWER", "AnsweredAt": "100.0", "HangupAt": "130.4"}
RANG = {"DialStatus": "NOANSWER", "AnsweredAt": "", "HangupAt": "130.4"}


async def test_a_client_who_answers_the_second_attempt_is_registered_once_and_finished_once():
    journal = Journal([RANG, TALKED])
    assert await callback_flow(journal).handle(REQUEST) == "reached"
    register = journal.entries[1][1]
    assert {key: register[key] for key in ("USER_ID", "PHONE_NUMBER", "TYPE", "LINE_NUMBER", "CRM_ENTITY_TYPE",
                                           "CRM_ENTITY_ID", "EXTERNAL_CALL_ID")} == {
        "USER_ID": "9", "PHONE_NUMBER": "79161234567", "TYPE": 4, "LINE_NUMBER": "74951230000",
        "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": "710", "EXTERNAL_CALL_ID": "callback-abc123"}
    dialled = ("originate", ("Local/sales@agi-bitrix-callback-agents", "agi-bitrix-callback", "79161234567"))
    assert [name for name, _ in journal.entries] == ["route", "register", "originate", "sleep", "originate", "finish"]
    assert journal.entries[0] == ("route", ("79161234567", "74951230000"))
    assert journal.entries[2] == journal.entries[4] == dialled
    assert journal.entries[-1] == ("finish", {"CALL_ID": "externalCall.1", "USER_ID": "9", "DURATION": 30,
                                              "STATUS_CODE": "200"})


async def test_the_finish_names_the_queue_member_who_talked_to_the_client_not_the_registered_user():
    journal = Journal([{**RANG, "Agent": "PJSIP/182-00000001"}, {**TALKED, "Agent": "PJSIP/181-00000002"}])
    assert await callback_flow(journal).handle(REQUEST) == "reached"
    assert journal.entries[1][1]["USER_ID"] == "9"  # registered for the line's responsible user
    assert journal.entries[-1][1]["USER_ID"] == "81"  # who answered the attempt that reached the client


async def test_a_client_who_never_answers_is_finished_as_missed_after_the_configured_attempts():
    journal = Journal([RANG, RANG])
    assert await callback_flow(journal, attempts=2, interval=7.0).handle(REQUEST) == "not_reached"
    assert [entry[0] for entry in journal.entries] == ["route", "register", "originate", "sleep", "originate",
                                                      "finish"]
    assert ("sleep", 7.0) in journal.entries
    assert journal.entries[-1][1]["STATUS_CODE"] == "304"


async def test_a_premium_rate_number_is_registered_and_finished_as_refused_without_a_dial():
    journal = Journal([])
    premium = dataclasses.replace(REQUEST, phone_number="+7 809 123-45-67")
    assert await callback_flow(journal).handle(premium) == "refused_number_type"
    assert [entry[0] for entry in journal.entries] == ["route", "register", "finish"]
    assert journal.entries[-1][1]["STATUS_CODE"] == "403"
    assert "PREMIUM_RATE" in journal.entries[-1][1]["FAILED_REASON"]


async def test_an_unreachable_pbx_is_tried_once_and_finished_with_503():
    journal = Journal([DialerError("AmiUnavailable: not connected")])
    assert await callback_flow(journal).handle(REQUEST) == "not_reached"
    assert [entry[0] for entry in journal.entries] == ["route", "register", "originate", "finish"]
    assert journal.entries[-1][1]["STATUS_CODE"] == "503"


async def test_a_bug_in_the_dialer_still_finishes_the_callback_once(caplog):
    journal = Journal([])  # originate pops from an empty list: an IndexError, as a bug would raise
    assert await callback_flow(journal).handle(REQUEST) == "not_reached"
    assert [entry[0] for entry in journal.entries] == ["route", "register", "originate", "finish"]
    assert journal.entries[-1][1]["FAILED_REASON"] == "the PBX could not be asked: internal error (IndexError)"
    assert "the attempt failed unexpectedly" in caplog.text


async def test_a_form_whose_number_is_junk_logs_and_registers_only_its_digits(caplog):
    journal = Journal([])
    junk = dataclasses.replace(REQUEST, phone_number="12\nINFO forged log line 34")
    assert await callback_flow(journal).handle(junk) == "refused_not_a_number"
    assert journal.entries[1][1]["PHONE_NUMBER"] == "1234"
    assert "forged" not in caplog.text and journal.entries[-1][1]["STATUS_CODE"] == "404"


async def test_an_attempt_whose_report_never_comes_is_finished_as_unknown_and_not_tried_again():
    journal = Journal([ANSWERED])  # answered, and no report follows
    assert await callback_flow(journal, max_call=0.05).handle(REQUEST) == "not_reached"
    assert [entry[0] for entry in journal.entries] == ["route", "register", "originate", "finish"]
    assert journal.entries[-1][1]["STATUS_CODE"] == "OTHER"


async def test_without_an_owner_or_responsible_user_nothing_is_registered_or_dialled(caplog):
    journal = Journal([])
    lineless = dataclasses.replace(REQUEST, line_number="74950000000")
    assert await callback_flow(journal).handle(lineless) == "no_user"
    assert [entry[0] for entry in journal.entries] == ["route"]
    assert "not registered, not called back" in caplog.text


async def test_a_form_sent_twice_while_its_number_is_called_back_is_dropped_and_the_rate_holds(caplog):
    release = asyncio.Event()
    journal = Journal([TALKED])
    flow = callback_flow(journal)
    original = journal.route

    async def slow_route(call: CallInfo, uniqueid: str = "-") -> RoutedCall:
        await release.wait()
        return await original(call, uniqueid)

    journal.route = slow_route  # type: ignore[method-assign]
    first = asyncio.create_task(flow.handle(REQUEST))
    await asyncio.sleep(0)
    assert await flow.handle(REQUEST) == "already_calling_back"
    release.set()
    assert await first == "reached"
    assert "this number is being called back already" in caplog.text
    flow.limits.bucket.reserve = lambda max_wait: None  # type: ignore[method-assign,assignment]  # the bucket is empty
    assert await flow.handle(REQUEST) == "rate"
    assert [name for name, _ in journal.entries].count("register") == 1


async def test_a_report_with_another_attempts_token_wakes_nothing():
    """Whoever can send a UserEvent over AMI cannot end an attempt without its random token."""
    journal = Journal([ANSWERED])
    flow = callback_flow(journal, max_call=0.2)
    forged = Event((("Event", "UserEvent"), ("UserEvent", "AgiBitrixCallbackDone"), ("Attempt", "0123456789abcdef"),
                    *TALKED.items()))
    asyncio.get_running_loop().call_later(0.05, flow.on_ami_event, forged)
    assert await flow.handle(REQUEST) == "not_reached"
    assert journal.entries[-1][1]["STATUS_CODE"] == "OTHER"


@pytest.mark.parametrize("sound", ["beep,skip", "beep&custom/other", "../../etc/passwd", "beep)", "a b"])
def test_an_announcement_that_could_add_playback_options_or_climb_out_is_refused(sound):
    text = ("bitrix: {webhook_url: 'https://portal.example/rest/1/secretcode/'}\nrouting: {fallback_queue: support}\n"
            f"callcard: {{}}\nami: {{username: x}}\ncallback: {{announcement: {sound!r}}}\n")
    with pytest.raises(ConfigError, match=r"callback\.announcement"):
        parse_config(text, environ={"AGI_BITRIX_AMI_SECRET": "s"})
