"""Click-to-call's events in handler mode: the portal's POST on the HTTP listener, judged before the
flow sees it (agi_bitrix.bitrix.events, event_gate, event_receiver), over real HTTP, with the
portal's form built by the emulator (agi_bitrix.testing.portal_events)."""

import asyncio
import json
import logging
import time

import aiohttp
import pytest

from agi_bitrix.bitrix.event_gate import EventGate, MemorySeen, TokenFileIdentity
from agi_bitrix.bitrix.event_receiver import MAX_BODY, EventReceiver
from agi_bitrix.bitrix.events import (
    CallbackStart,
    ExternalCallStart,
    MalformedEvent,
    StaleEvent,
    check_fresh,
    read_event,
    record_time,
)
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import HttpSettings, parse_config
from agi_bitrix.http_listener import HttpListener
from agi_bitrix.monitoring import Metrics
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal_events import PortalEvents
from tests.conftest import call_requests, until

CALL_START, CALLBACK_START = "ONEXTERNALCALLSTART", "ONEXTERNALCALLBACKSTART"
# on-external-call-start.md's example, with a Russian number (the config's country).
CLICK = {"PHONE_NUMBER": "+7 916 123-45-67", "PHONE_NUMBER_INTERNATIONAL": "+79161234567", "EXTENSION": "",
         "USER_ID": "1269", "CALL_LIST_ID": "0", "LINE_NUMBER": "7", "IS_MOBILE": "0",
         "CALL_ID": "externalCall.89350264e026dace3f2b14d1f438257c.1773236989",
         "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": "797"}
CALLBACK = {"PHONE_NUMBER": "+79161234567", "TEXT": "A callback has been ordered from the website",
            "VOICE": "ruinternalfemale", "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": "5785", "LINE_NUMBER": "7"}


def write_tokens(path, portal_events, **fields):
    tokens = {"refresh_token": "refresh-x", "application_token": portal_events.application_token,
              "member_id": portal_events.member_id, **fields}
    path.write_text(json.dumps(tokens))


class Receiving:
    """A receiver on a real listener (the monitoring server, as the Application has it), its events."""

    def __init__(self, receiver, server, url, handled):
        self.receiver, self.server, self.url, self.handled = receiver, server, url, handled
        self.metrics = server.metrics

    @property
    def refused(self):
        return dict(self.receiver.gate.refusals.counts)

    async def post(self, form=None, **request):
        async with aiohttp.ClientSession() as http, http.post(self.url, data=form, **request) as answer:
            return answer.status


async def start_receiving(portal_events, token_path, seen=None, handler=None, window=120.0):
    handled = []

    async def take(event):
        handled.append(event)

    metrics = Metrics()
    gate = EventGate(TokenFileIdentity(str(token_path), f"https://{portal_events.domain}/rest/"),
                     seen or MemorySeen(window), country="RU", replay_window=window, observer=metrics)
    receiver = EventReceiver(gate, handler or take, "/bitrix/events")
    server = HttpListener(HttpSettings(), metrics, lambda: (True, {}), pages=receiver.add_routes)
    host, port = await server.start("127.0.0.1", 0)
    return Receiving(receiver, server, f"http://{host}:{port}/bitrix/events", handled)


@pytest.fixture
def portal_events():
    return PortalEvents()


@pytest.fixture
async def receiving(portal_events, tmp_path):
    write_tokens(tmp_path / "oauth.json", portal_events)
    receiving = await start_receiving(portal_events, tmp_path / "oauth.json")
    yield receiving
    await receiving.receiver.close()
    await receiving.server.close()


async def test_a_genuine_click_reaches_the_handler_once(receiving, portal_events):
    portal_events.methods["event.bind"]({"event": CALL_START, "handler": receiving.url})
    async with aiohttp.ClientSession() as http:
        assert await portal_events.trigger(CALL_START, CLICK, http) == [200]
        await until(lambda: receiving.handled, what="the event at the handler")
        # The same POST again (a replay by whoever captured it, or a second delivery): not acted on.
        again = portal_events.event_form(CALL_START, CLICK)
        async with http.post(receiving.url, data=again) as answer:
            assert answer.status == 200 and (await answer.json()) == {"error": "duplicate"}
    await asyncio.sleep(0.05)
    [event] = receiving.handled
    assert event == ExternalCallStart(
        call_id=CLICK["CALL_ID"], user_id="1269", phone="79161234567", line_number="7", crm_entity_type="CONTACT",
        crm_entity_id="797", call_list_id="0", is_mobile=False, sent_at=event.sent_at, source="handler")
    assert abs(event.sent_at - time.time()) < 5 and receiving.refused == {"duplicate": 1}


async def test_a_callback_request_reaches_the_handler_with_its_text(receiving, portal_events):
    assert await receiving.post(portal_events.event_form(CALLBACK_START, CALLBACK)) == 200
    await until(lambda: receiving.handled, what="the callback at the handler")
    [event] = receiving.handled
    assert isinstance(event, CallbackStart) and (event.phone, event.text, event.voice, event.crm_entity_id) == (
        "79161234567", CALLBACK["TEXT"], "ruinternalfemale", "5785")
    # A callback has no CALL_ID: the same form twice is still one callback.
    assert await receiving.post(portal_events.event_form(CALLBACK_START, CALLBACK, ts=event.sent_at)) == 200
    await asyncio.sleep(0.05)
    assert len(receiving.handled) == 1 and receiving.refused == {"duplicate": 1}


FORGERIES = {
    "wrong token": ({"application_token": "0" * 32}, {}, 403, "wrong_token"),
    "no token": ({"application_token": ""}, {}, 403, "wrong_token"),
    "another portal's member_id": ({"member_id": "b" * 32}, {}, 403, "wrong_portal"),
    "another domain": ({"domain": "evil.bitrix24.com"}, {}, 403, "wrong_portal"),
    "an old event replayed": ({}, {"ts": time.time() - 3600}, 403, "stale"),
    "an event from the future": ({}, {"ts": time.time() + 3600}, 403, "stale"),
}


@pytest.mark.parametrize("auth, when, status, reason", FORGERIES.values(), ids=FORGERIES.keys())
async def test_a_forged_or_replayed_event_never_reaches_the_handler(receiving, portal_events, auth, when, status,
                                                                    reason):
    form = portal_events.event_form(CALL_START, CLICK, **when, **auth)
    assert await receiving.post(form) == status
    # A genuine one afterwards goes through: the refusal did not spend its CALL_ID.
    assert await receiving.post(portal_events.event_form(CALL_START, CLICK)) == 200
    await until(lambda: receiving.handled, what="the genuine event")
    assert len(receiving.handled) == 1 and receiving.refused == {reason: 1}
    # What the forged-events alert (AgiBitrixEventsForged) watches.
    assert receiving.metrics.registry.get_sample_value("agi_bitrix_events_refused_total", {"reason": reason}) == 1


def malformed(portal_events, **data):
    return portal_events.event_form(CALL_START, {**CLICK, **data})


MALFORMED = {
    "unknown event": (lambda e: e.event_form("ONCRMDEALUPDATE", {"FIELDS[ID]": "1"}), "unknown_event"),
    "CALL_ID with a dialplan's characters": (lambda e: malformed(e, CALL_ID="x,1;Local/1@evil"), "malformed"),
    "USER_ID not a number": (lambda e: malformed(e, USER_ID="1 OR 1"), "malformed"),
    "no USER_ID": (lambda e: malformed(e, USER_ID=""), "malformed"),
    "a phone number that is not one": (
        lambda e: malformed(e, PHONE_NUMBER="120&Local/666@evil", PHONE_NUMBER_INTERNATIONAL=""), "malformed"),
    "an international number that is not one": (
        lambda e: malformed(e, PHONE_NUMBER_INTERNATIONAL="+7916;Local/666@evil"), "malformed"),
    "ts not a time": (lambda e: {**e.event_form(CALL_START, CLICK), "ts": "yesterday"}, "malformed"),
}


@pytest.mark.parametrize("build, reason", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_event_never_reaches_the_handler(receiving, portal_events, build, reason):
    assert await receiving.post(build(portal_events)) == 400
    await asyncio.sleep(0.05)
    assert receiving.handled == [] and receiving.refused == {reason: 1}


async def test_bodies_that_are_not_an_events_form_are_refused_before_reading(receiving, portal_events):
    form = portal_events.event_form(CALL_START, CLICK)
    assert await receiving.post(json=form) == 400  # not a form
    body = "&".join(f"{key}={value}" for key, value in form.items())
    repeated = body + "&auth%5Bapplication_token%5D=" + "0" * 32  # which token counts? neither
    assert await receiving.post(repeated, headers={"Content-Type": "application/x-www-form-urlencoded"}) == 400
    assert await receiving.post({**form, "padding": "x" * MAX_BODY}) == 413
    assert await receiving.post(b"\xff\xfe" * 10, headers={"Content-Type": "application/x-www-form-urlencoded"}) == 400
    await asyncio.sleep(0.05)
    assert receiving.handled == [] and receiving.refused == {"malformed": 3, "too_large": 1}


async def test_without_a_stored_application_token_nothing_is_acted_on(portal_events, tmp_path):
    """Tokens from `oauth login` carry no application_token: no POST can be told from a forgery."""
    write_tokens(tmp_path / "oauth.json", portal_events, application_token="")
    receiving = await start_receiving(portal_events, tmp_path / "oauth.json")
    try:
        assert await receiving.post(portal_events.event_form(CALL_START, CLICK, application_token="")) == 403
        assert receiving.handled == [] and receiving.refused == {"no_application_token": 1}
        # Installed through the install callback later: the file changes, and the token is read again.
        write_tokens(tmp_path / "oauth.json", portal_events)
        assert await receiving.post(portal_events.event_form(CALL_START, CLICK)) == 200
        await until(lambda: receiving.handled, what="the event after the install")
    finally:
        await receiving.receiver.close()
        await receiving.server.close()


async def test_a_handler_that_raises_is_logged_and_counted_and_the_next_event_still_goes_through(
        portal_events, tmp_path, caplog):
    write_tokens(tmp_path / "oauth.json", portal_events)
    taken = []

    async def flaky(event):
        taken.append(event)
        if len(taken) == 1:
            raise RuntimeError("AMI is not connected")

    receiving = await start_receiving(portal_events, tmp_path / "oauth.json", handler=flaky)
    try:
        assert await receiving.post(portal_events.event_form(CALL_START, CLICK)) == 200
        second = {**CLICK, "CALL_ID": "externalCall.1.2"}
        assert await receiving.post(portal_events.event_form(CALL_START, second)) == 200
        await until(lambda: len(taken) == 2, what="both events at the handler")
        await asyncio.sleep(0.05)
    finally:
        await receiving.receiver.close()
        await receiving.server.close()
    assert receiving.receiver.health()["handler_failures"] == 1
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "handler failed" in r.getMessage()]
    assert len(failures) == 1 and CLICK["CALL_ID"] in failures[0].getMessage() and failures[0].exc_info


async def test_a_flood_of_forged_posts_is_one_log_line_a_reason_and_calls_are_still_routed(
        agi_server, portal, portal_events, tmp_path, caplog):
    """A thousand forged clicks while calls are routed on the same event loop: none reaches the
    handler, the portal is asked nothing but the calls' lookups, each reason is logged once."""
    write_tokens(tmp_path / "oauth.json", portal_events)
    receiving = await start_receiving(portal_events, tmp_path / "oauth.json")
    host, port, app = agi_server
    forged = [portal_events.event_form(CALL_START, {**CLICK, "CALL_ID": f"externalCall.f.{n}"},
                                       application_token=f"{n:032x}") for n in range(1000)]

    async def flood():
        async with aiohttp.ClientSession() as http:
            async def one(form):
                async with http.post(receiving.url, data=form) as answer:
                    return answer.status
            return await asyncio.gather(*(one(form) for form in forged))

    async def calls():
        answers = []
        for _ in range(5):
            app.lookup.cache.clear()
            answers.append((await fake_call(host, port, callerid="89161234567", timeout=5)).variables)
        return answers

    try:
        statuses, answers = await asyncio.gather(flood(), calls())
    finally:
        await receiving.receiver.close()
        await receiving.server.close()
    assert set(statuses) == {403} and receiving.handled == [] and receiving.refused == {"wrong_token": 1000}
    assert {(v["B24_STATUS"], v["B24_TARGET"]) for v in answers} == {("FOUND", "101")}
    assert {r.method for r in call_requests(portal)} == {"telephony.externalcall.searchcrmentities"}
    lines = [r for r in caplog.records if "Bitrix24 event from" in r.getMessage()]
    assert len(lines) == 1 and portal_events.application_token not in caplog.text


# -- the parts, without HTTP ----------------------------------------------------------------------

def test_an_offline_records_time_is_read_with_its_offset():
    assert record_time("2024-07-18T12:32:31+02:00") == 1721298751.0
    for wrong in ("2024-07-18T12:32:31", "yesterday", None, 1721298751):
        with pytest.raises(MalformedEvent):
            record_time(wrong)


def test_the_replay_window_holds_both_ways():
    check_fresh(1000.0, 1100.0, 120.0)
    check_fresh(1000.0, 950.0, 120.0)  # our clock behind the portal's by less than a minute
    for sent, now in ((1000.0, 1121.0), (1000.0, 900.0)):
        with pytest.raises(StaleEvent):
            check_fresh(sent, now, 120.0)


def test_offline_data_as_json_numbers_is_read_like_the_forms_text():
    event = read_event(CALL_START, {**CLICK, "USER_ID": 1269, "CRM_ENTITY_ID": 797}, 1.0, "offline", "RU")
    assert isinstance(event, ExternalCallStart) and (event.user_id, event.crm_entity_id) == ("1269", "797")
    with pytest.raises(MalformedEvent):
        read_event(CALL_START, {**CLICK, "USER_ID": True}, 1.0, "offline", "RU")


async def test_memory_dedupe_is_bounded_and_forgets_after_its_ttl():
    now = [0.0]
    seen = MemorySeen(ttl=10.0, limit=3, clock=lambda: now[0])
    assert [await seen.first_time(k) for k in ("a", "b", "a")] == [True, True, False]
    for key in ("c", "d"):
        await seen.first_time(key)
    assert await seen.first_time("a")  # pushed out by the bound: the oldest go first
    now[0] = 11.0
    assert await seen.first_time("d")  # its TTL passed


async def test_the_answer_to_a_forgery_does_not_say_which_proof_failed(receiving, portal_events):
    answers = []
    async with aiohttp.ClientSession() as http:
        for auth in ({"application_token": "0" * 32}, {"member_id": "b" * 32}, {"domain": "evil.example"}):
            async with http.post(receiving.url, data=portal_events.event_form(CALL_START, CLICK, **auth)) as answer:
                answers.append((answer.status, await answer.json()))
    assert answers == [(403, {"error": "not authentic"})] * 3


# -- the events section ---------------------------------------------------------------------------

OAUTH = """\
bitrix:
  oauth: {portal_url: "https://b24.example.com/rest/", client_id: local.1, client_secret: s, token_file: /tmp/t.json,
          install_path: /bitrix/install}
"""
WEBHOOK = 'bitrix: {webhook_url: "https://b24.example.com/rest/1/code/"}\n'
EVENTS_PROBLEMS = {
    "a webhook": (WEBHOOK, "{mode: offline}", "events.mode: offline needs bitrix.oauth"),
    "a handler without its URL": (OAUTH, "{mode: handler}", "events.handler.public_url: missing"),
    "plain HTTP to the internet": (OAUTH, "{mode: handler, handler: {public_url: 'http://pbx.example.com/e'}}",
                                   "must be an https:// URL"),
    "the install callback's path": (
        OAUTH, "{mode: handler, handler: {path: /bitrix/install, public_url: 'https://pbx.example.com/e'}}",
        "is bitrix.oauth.install_path's too"),
    "the listener off": (OAUTH + "http: {listen: off}\n",
                         "{mode: handler, handler: {public_url: 'https://pbx.example.com/e'}}",
                         "is served on http.listen, which is off"),
    "another mode": (OAUTH, "{mode: webhook}", "must be one of off, handler, offline"),
    "a path over the monitoring": (OAUTH, "{mode: handler, handler: {path: /healthz, public_url: 'https://p.example/e'}}",
                                   "other than /metrics and /healthz"),
}


@pytest.mark.parametrize("bitrix, events, problem", EVENTS_PROBLEMS.values(), ids=EVENTS_PROBLEMS.keys())
def test_check_refuses_an_events_section_that_cannot_work(bitrix, events, problem):
    with pytest.raises(ConfigError) as raised:
        parse_config(f"{bitrix}routing: {{fallback_queue: q}}\nevents: {events}\n")
    assert problem in str(raised.value)


def test_events_are_off_without_the_section_and_offline_needs_no_listener():
    assert parse_config(f"{WEBHOOK}routing: {{fallback_queue: q}}\n").events.mode == "off"
    no_install = OAUTH.replace(",\n          install_path: /bitrix/install", "")
    config = parse_config(f"{no_install}http: {{listen: off}}\nrouting: {{fallback_queue: q}}\n"
                          "events: {mode: offline, offline: {poll_interval: 5}}\n")
    assert (config.events.mode, config.events.poll_interval) == ("offline", 5.0)
