"""The card follows the call (ringing / answered) and the responsible person per DID, end to end:
the whole application over real TCP, spoken to like Asterisk does, against the portal emulator
over real HTTP (telephony.externalCall.show / .hide as api-reference/telephony/ describes them)."""

import asyncio
import time

import pytest
from prometheus_client import generate_latest

from agi_bitrix.checking import ConfigError
from agi_bitrix.config import parse_config
from agi_bitrix.testing.portal_model import PortalModel
from tests.conftest import until
from tests.test_callcard import ANNA, DID, FINISH, UNKNOWN, Running, callcard_config, delivered_finishes

SHOW = "telephony.externalcall.show"
HIDE = "telephony.externalcall.hide"


@pytest.fixture
async def server(portal, tmp_path):
    running = await Running(callcard_config(portal.webhook_url, tmp_path / "outbox.sqlite3")).start()
    yield running
    await running.stop()


async def ringing(server, call_id, number, channel="Local/s@incoming-00000001;1"):
    """The pre-dial handler's session; Asterisk gets no command, so the ring waits for nothing."""
    result = await server.call("ringing", (call_id, number), channel=channel)
    assert result.commands == []


async def answered(server, call_id, number):
    result = await server.call("answered", (call_id, number))
    assert result.commands == []


def card_requests(portal, method):
    return [request.params for request in portal.requests_for(method)]


def cards_counted(app, action, result):
    text = generate_latest(app.metrics.registry).decode()
    line = f'agi_bitrix_call_cards_total{{action="{action}",result="{result}"}}'
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


async def test_each_ringing_phone_shows_the_card_to_its_user_once(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]  # Anna's client, card shown to Anna (user 1)
    await ringing(server, call_id, "102")  # Igor's extension
    await ringing(server, call_id, "", channel="PJSIP/103-0000002a")  # Olga's phone, from the channel
    await until(lambda: len(card_requests(portal, SHOW)) == 2)
    # Igor rings again (a second Dial), Anna's own extension rings: they already see it.
    await ringing(server, call_id, "102")
    await ringing(server, call_id, "101@internal")
    await asyncio.sleep(0.2)

    assert card_requests(portal, SHOW) == [{"CALL_ID": call_id, "USER_ID": "2"}, {"CALL_ID": call_id, "USER_ID": "3"}]
    assert portal.calls[call_id].card_shown_to == {"1", "2", "3"}
    assert cards_counted(server.app, "show", "done") == 2


async def test_the_answer_hides_the_card_from_everyone_else_in_one_request(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]
    for extension in ("102", "103", "105"):
        await ringing(server, call_id, extension)
    await until(lambda: len(card_requests(portal, SHOW)) == 3)

    await answered(server, call_id, "Local/103@internal-00000004;1")  # Olga took it
    await until(lambda: card_requests(portal, HIDE))

    # USER_ID as a list goes out as PHP's array, USER_ID[0]=1&USER_ID[1]=2&...
    assert card_requests(portal, HIDE) == [{"CALL_ID": call_id, "USER_ID": {"0": "1", "1": "2", "2": "5"}}]
    assert portal.calls[call_id].card_shown_to == {"3"}
    # Finish then names who took the call.
    await server.finish(call_id, owner="1", answered_at="100.0", answered_by="103@internal", hangup_at="110.0")
    await until(lambda: delivered_finishes(portal))
    assert delivered_finishes(portal)[0]["USER_ID"] == "3"


async def test_a_calls_hide_waits_for_its_shows_still_under_way(server, portal):
    """A ring's show still on its way (a new connection, a token refresh, a slow answer) must not
    be overtaken by the answer's hide: the card would stay open on a phone that did not take the call."""
    call_id = (await server.register())["B24_CALL_ID"]
    portal.fail("slow", method=SHOW, delay=0.3, times=1)
    await ringing(server, call_id, "102")  # Igor's show: its answer takes 0.3 s
    await answered(server, call_id, "103@internal")  # Olga took it at once
    await until(lambda: card_requests(portal, HIDE), what="the hide")

    show, hide = portal.requests_for(SHOW)[0], portal.requests_for(HIDE)[0]
    assert hide.at - show.at >= 0.25  # sent once the show was answered, not beside it
    assert portal.calls[call_id].card_shown_to == {"3"}


def calls_in_order(portal, call_id):
    """Every request about this call as (method, USER_ID), in the order the portal got them."""
    return [(request.method, request.params.get("USER_ID")) for request in portal.requests
            if request.params.get("CALL_ID") == call_id]


async def test_a_call_nobody_answers_is_hidden_from_everyone_it_rang_but_the_finishs_user(server, portal):
    """Anna's client, card shown to Anna (register's SHOW); a queue rings Igor, Olga and Pavel;
    the caller gives up. The finish goes to Anna and closes her card; the three others get one
    hide, before the finish (the portal hides nothing for a call it has finished)."""
    call_id = (await server.register())["B24_CALL_ID"]
    for extension in ("102", "103", "105"):
        await ringing(server, call_id, extension)
    await until(lambda: len(card_requests(portal, SHOW)) == 3)

    await server.finish(call_id, owner="1", dialstatus="NOANSWER")
    await until(lambda: delivered_finishes(portal))

    assert calls_in_order(portal, call_id) == [
        (SHOW.lower(), "2"), (SHOW.lower(), "3"), (SHOW.lower(), "5"),
        (HIDE.lower(), {"0": "2", "1": "3", "2": "5"}), (FINISH, "1")]
    assert portal.calls[call_id].card_shown_to == set()  # the finish closed Anna's
    assert cards_counted(server.app, "hide", "done") == 1


async def test_the_finish_waits_for_the_hide_and_the_hangup_waits_for_neither(portal, tmp_path):
    config = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", "cards: {deadline: 0.5}")
    running = await Running(config).start()
    try:
        call_id = (await running.register())["B24_CALL_ID"]
        await ringing(running, call_id, "102")
        await until(lambda: card_requests(portal, SHOW))
        portal.fail("slow", method=HIDE, delay=0.3)
        started = time.monotonic()
        await running.finish(call_id, owner="1", dialstatus="NOANSWER")
        session_seconds = time.monotonic() - started
        await until(lambda: delivered_finishes(portal))
    finally:
        portal.reset_faults()
        await running.stop()
    assert session_seconds < 0.2, session_seconds
    hide, finish = portal.requests_for(HIDE)[0], portal.requests_for(FINISH)[0]
    assert finish.at - hide.at >= 0.25  # sent once the hide was answered
    assert hide.params["USER_ID"] == "2"


async def test_an_answered_call_hides_nothing_more_at_its_finish(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]
    await ringing(server, call_id, "102")
    await ringing(server, call_id, "103")
    await answered(server, call_id, "103")
    await server.finish(call_id, owner="1", answered_at="100.0", answered_by="103", hangup_at="110.0")
    await until(lambda: delivered_finishes(portal))
    # The answer hid it from Anna and Igor; the finish, sent for Olga, closes hers.
    assert card_requests(portal, HIDE) == [{"CALL_ID": call_id, "USER_ID": {"0": "1", "1": "2"}}]
    assert delivered_finishes(portal)[0]["USER_ID"] == "3"


async def test_the_phones_of_one_call_are_shown_the_card_together_on_a_slow_portal(server, portal):
    """Each show takes 0.4 s: the three phones' shows still leave together, and the answer's hide
    goes once they are all answered."""
    call_id = (await server.register())["B24_CALL_ID"]
    portal.fail("slow", method=SHOW, delay=0.4)
    for extension in ("102", "103", "105"):
        await ringing(server, call_id, extension)
    await answered(server, call_id, "105")
    await until(lambda: card_requests(portal, HIDE), what="the hide")

    shows = [request.at for request in portal.requests_for(SHOW)]
    hide = portal.requests_for(HIDE)[0].at
    assert len(shows) == 3 and max(shows) - min(shows) < 0.2, shows
    assert hide - max(shows) >= 0.35
    assert portal.calls[call_id].card_shown_to == {"5"}


async def test_a_ring_after_the_answer_shows_no_card(server, portal):
    """The queue's rings and the answer come as separate sessions: one that arrives after the
    answer is a phone that is about to stop ringing, not a new holder of the card."""
    call_id = (await server.register())["B24_CALL_ID"]
    await ringing(server, call_id, "102")
    await answered(server, call_id, "102@internal")
    await ringing(server, call_id, "103")  # late
    await until(lambda: card_requests(portal, HIDE), what="the hide")
    await asyncio.sleep(0.2)

    assert card_requests(portal, SHOW) == [{"CALL_ID": call_id, "USER_ID": "2"}]
    assert portal.calls[call_id].card_shown_to == {"2"}


async def test_an_answer_without_a_ring_hook_shows_the_card_to_who_answered(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]
    await answered(server, call_id, "102")
    await until(lambda: card_requests(portal, SHOW) and card_requests(portal, HIDE))
    assert card_requests(portal, SHOW) == [{"CALL_ID": call_id, "USER_ID": "2"}]
    assert card_requests(portal, HIDE) == [{"CALL_ID": call_id, "USER_ID": "1"}]


@pytest.mark.parametrize("call_id, number", [
    ("", "102"),  # not registered: the dialplan passes an empty B24_CALL_ID
    ("externalCall.x&USER_ID=9", "102"),
    ("REGISTERED", "199"),  # no user has extension 199
    ("REGISTERED", "Local/s@incoming-00000001;1"),  # no number in it
])
async def test_no_card_without_a_call_or_a_user(server, portal, call_id, number):
    registered = (await server.register())["B24_CALL_ID"]
    await ringing(server, registered if call_id == "REGISTERED" else call_id, number)
    await answered(server, registered if call_id == "REGISTERED" else call_id, number)
    await asyncio.sleep(0.2)
    # An answer by a phone nobody can name hides nothing: it may be the owner's own other phone.
    assert card_requests(portal, SHOW) == [] and card_requests(portal, HIDE) == []


async def test_without_a_call_card_or_a_user_directory_nothing_is_sent(portal, tmp_path):
    no_callcard = parse_config(f"""\
        bitrix: {{webhook_url: "{portal.webhook_url}"}}
        routing: {{fallback_queue: support}}
        users: {{refresh: 600}}
        """.replace("        ", ""), "no-callcard.yaml")
    no_users = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", users="users: {refresh: 0}")
    for config in (no_callcard, no_users):
        running = await Running(config).start()
        try:
            await ringing(running, "externalCall.abc.1700000000", "102")
            await answered(running, "externalCall.abc.1700000000", "103")
        finally:
            await running.stop()
    assert portal.requests_for(SHOW) == [] and portal.requests_for(HIDE) == []


async def test_a_hung_portal_never_holds_the_ring(portal, tmp_path):
    """The session ends before the show is sent; the show gives up at the callcard deadline."""
    config = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", "register: {deadline: 0.3}")
    session_seconds, _ = await ring_with_the_show_hung(portal, config)
    assert session_seconds < 0.1, session_seconds


async def ring_with_the_show_hung(portal, config) -> tuple[float, float]:
    """One registered call rings phone 102 while the portal hangs on show: how long the ring's
    session took, and when the show was given up (both from the ring)."""
    running = await Running(config).start()
    try:
        call_id = (await running.register())["B24_CALL_ID"]
        portal.fail("hang", method=SHOW)
        started = time.monotonic()
        await ringing(running, call_id, "102")
        session_seconds = time.monotonic() - started
        await until(lambda: cards_counted(running.app, "show", "failed") == 1, timeout=3)
        return session_seconds, time.monotonic() - started
    finally:
        portal.reset_faults()
        await running.stop()


async def test_a_show_gives_up_at_the_cards_own_deadline_not_registers(portal, tmp_path, caplog):
    config = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3",
                             "register: {deadline: 5}\ncards: {deadline: 0.3}")
    _, gave_up_after = await ring_with_the_show_hung(portal, config)
    assert 0.3 <= gave_up_after < 2, gave_up_after
    assert any("took longer than 0.3 s (callcard.cards.deadline)" in r.getMessage() for r in caplog.records)


async def test_a_card_for_a_call_the_portal_does_not_have_is_counted(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]
    await server.finish(call_id, owner="1", dialstatus="NOANSWER")
    await until(lambda: delivered_finishes(portal))
    # A leg that still rings after the call was finished (the portal closed it): show answers false.
    await ringing(server, call_id, "102")
    await until(lambda: cards_counted(server.app, "show", "call_not_found") == 1)
    assert portal.calls[call_id].card_requests == []


# -- the responsible person per DID ------------------------------------------------------------

RESPONSIBLE = """\
    register:
      default_user: 2
      responsible:
        - {did: "+7 495 111-22-33", user: 3}
        - {did: "8 (495) 222-33-44", user: 5}
    """


@pytest.fixture
async def responsible_server(portal, tmp_path):
    running = await Running(callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", RESPONSIBLE)).start()
    yield running
    await running.stop()


@pytest.mark.parametrize("did, user", [("74951112233", "3"), ("+7 (495) 222-33-44", "5"), ("74950000000", "2"),
                                       ("", "2")])
async def test_a_call_without_owner_goes_to_the_responsible_for_its_did(responsible_server, portal, did, user):
    variables = await responsible_server.register(phone=UNKNOWN, owner="", did=did, entity=("", ""))
    assert portal.calls[variables["B24_CALL_ID"]].user_id == user


async def test_the_owner_still_comes_first(responsible_server, portal):
    variables = await responsible_server.register(phone=ANNA, owner="1", did="74951112233")
    assert portal.calls[variables["B24_CALL_ID"]].user_id == "1"


@pytest.mark.parametrize("did, user", [("74951112233", "3"), ("", "2")])
async def test_a_missed_call_without_owner_is_the_responsibles(responsible_server, portal, did, user):
    call_id = (await responsible_server.register(phone=UNKNOWN, owner="", did=did, entity=("", "")))["B24_CALL_ID"]
    # The sample's finish: ..., MIXMONITOR_FILENAME, then the DID (the 8th argument).
    result = await responsible_server.call("finish", (call_id, "", "NOANSWER", "", "", "1700000030.0", "", did))
    assert result.commands == []
    await until(lambda: delivered_finishes(portal))
    assert delivered_finishes(portal) == [{"CALL_ID": call_id, "USER_ID": user, "DURATION": "0",
                                           "STATUS_CODE": "304"}]
    assert [request.params["USER_ID"] for request in portal.requests_for(FINISH)] == [user]


def test_responsible_dids_are_read_like_match_did_and_checked():
    config = callcard_config("https://p.bitrix24.ru/rest/1/x/", "/tmp/o.sqlite3", RESPONSIBLE)
    assert [(r.number, r.user) for r in config.callcard.register.responsible] == [("74951112233", "3"),
                                                                                ("74952223344", "5")]
    bad = RESPONSIBLE.rstrip(" ") + """\
        - {did: "sales", user: 4}
        - {did: "74951112233", user: "x"}
        - {did: "74951112233"}
        - {did: "74951112233", user: 4, queue: support}
    """
    with pytest.raises(ConfigError) as refused:
        callcard_config("https://p.bitrix24.ru/rest/1/x/", "/tmp/o.sqlite3", bad)
    assert [str(problem) for problem in refused.value.problems] == [
        "callcard-test.yaml:29: callcard.register.responsible[2].did: 'sales' is not a phone number",
        "callcard-test.yaml:30: callcard.register.responsible[3]: 'x' is not a Bitrix24 user id (a number)",
        "callcard-test.yaml:31: callcard.register.responsible[4]: needs user: a Bitrix24 user id (a number)",
        "callcard-test.yaml:32: callcard.register.responsible[5]: unknown key 'queue'; expected did and user",
    ]


# -- the emulator's show and hide, as the docs describe them ------------------------------------

def test_emulator_show_and_hide_follow_the_docs():
    model = PortalModel({ANNA: [{"CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": 1, "ASSIGNED_BY_ID": 1,
                                 "ASSIGNED_BY": {"ID": "1"}}]})
    call_id = model.call_method("telephony.externalcall.register", {
        "USER_ID": "1", "PHONE_NUMBER": ANNA, "TYPE": 2, "SHOW": 0, "LINE_NUMBER": DID,
        "EXTERNAL_CALL_ID": "1.1"})["result"]["CALL_ID"]
    call = model.calls[call_id]
    assert call.card_shown_to == set()
    # USER_ID: one id, a JSON list, PHP's form array; without it, the registered user.
    assert model.call_method(SHOW, {"CALL_ID": call_id, "USER_ID": 7})["result"] is True
    assert model.call_method(SHOW, {"CALL_ID": call_id, "USER_ID": [8, 9]})["result"] is True
    assert model.call_method(HIDE, {"CALL_ID": call_id, "USER_ID": {"0": "8", "1": "7"}})["result"] is True
    assert model.call_method(SHOW, {"CALL_ID": call_id})["result"] is True
    assert call.card_shown_to == {"1", "9"}
    assert call.card_requests == [("show", ("7",)), ("show", ("8", "9")), ("hide", ("8", "7")), ("show", ("1",))]
    # `false`, not an error, for a CALL_ID the portal does not have, or no longer (finished).
    assert model.call_method(SHOW, {"CALL_ID": "externalCall.nope.1"})["result"] is False
    assert model.call_method(HIDE, {})["result"] is False
    model.call_method(FINISH, {"CALL_ID": call_id, "USER_ID": "1"})
    assert model.call_method(HIDE, {"CALL_ID": call_id, "USER_ID": 9})["result"] is False
