"""Click-to-call's events in offline mode: the portal's offline queue polled, each record handled
once and then confirmed (agi_bitrix.bitrix.event_poller), and subscribing with `agi-bitrix events`,
against the emulated portal reached through an OAuth application (the only context in which
Bitrix24 serves event.* methods)."""

import asyncio
import json
import logging
import textwrap
import time

import pytest

from agi_bitrix.bitrix.client import make_session
from agi_bitrix.bitrix.event_gate import EventGate, MemorySeen, TokenFileIdentity
from agi_bitrix.bitrix.event_poller import OfflinePoller
from agi_bitrix.bitrix.event_subscription import EventsStatus
from agi_bitrix.bitrix.oauth import portal_client
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.cli import main
from agi_bitrix.config import parse_config
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.portal_oauth import OAuthServer
from agi_bitrix.testing.sample_data import SAMPLE_CRM
from tests.conftest import until
from tests.test_events import CALL_START, CLICK

CLIENT_ID, CLIENT_SECRET = "local.5f1a2b3c4d5e6f.12345678", "client-secret-x9y8z7"
GET, CLEAR = "event.offline.get", "event.offline.clear"


@pytest.fixture
async def emulator():
    # application_only: event.* through a webhook would be refused, as the docs say.
    portal = PortalEmulator(SAMPLE_CRM, application_only=True)
    await portal.start()
    server = await OAuthServer(portal, client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    portal.events.domain, portal.events.member_id = server.domain, server.member_id
    yield portal, server
    await server.stop()
    await portal.stop()


def config_text(server, token_path, events):
    return textwrap.dedent(f"""\
        http: {{listen: "127.0.0.1:9599"}}
        bitrix:
          oauth:
            portal_url: "{server.url}/rest/"
            client_id: "{CLIENT_ID}"
            client_secret: "{CLIENT_SECRET}"
            token_file: "{token_path}"
            token_url: "{server.url}/oauth/token/"
        routing: {{fallback_queue: support}}
        events: {events}
        """)


@pytest.fixture
def config_file(emulator, tmp_path):
    _, server = emulator
    token_path = tmp_path / "oauth.json"
    _, refresh = server.issue_tokens()
    token_path.write_text(json.dumps({"refresh_token": refresh, "member_id": server.member_id}))
    path = tmp_path / "agi-bitrix.yaml"
    path.write_text(config_text(server, token_path, "{mode: offline, offline: {poll_interval: 0.05}}"))
    return path


@pytest.fixture
async def polling(emulator, config_file):
    """A poller over the configured application's portal client, with the events it handled."""
    config = parse_config(config_file.read_text(), str(config_file))
    async with make_session() as session:
        client = portal_client(config.bitrix, session)
        handled = []

        async def take(event):
            handled.append(event)

        gate = EventGate(TokenFileIdentity(config.bitrix.oauth.token_file, config.bitrix.oauth.portal_url),
                         MemorySeen(120.0), country="RU", replay_window=120.0)
        poller = OfflinePoller(lambda: client, gate, take, interval=0.05)
        yield poller, handled, client


def clicks(portal, count):
    return [portal.events.enqueue(CALL_START, {**CLICK, "CALL_ID": f"externalCall.q.{n}"}) for n in range(count)]


async def test_queued_events_are_taken_handled_once_and_confirmed(emulator, polling):
    portal, _ = emulator
    poller, handled, _ = polling
    queued = clicks(portal, 3)
    await poller.poll_once()
    assert [event.call_id for event in handled] == [f"externalCall.q.{n}" for n in range(3)]
    assert {event.source for event in handled} == {"offline"}
    assert portal.events.queue == [] and portal.events.cleared == queued
    [get] = portal.requests_for(GET)
    [clear] = portal.requests_for(CLEAR)
    # Reserved (clear=0), then confirmed by its process_id and the records' ids (event-offline-clear.md).
    assert get.params["clear"] == "0" and "process_id" not in get.params
    assert clear.params["process_id"] and sorted(clear.params["id"].values()) == ["1", "2", "3"]
    await poller.poll_once()  # nothing new: nothing handled twice
    assert len(handled) == 3 and len(portal.requests_for(CLEAR)) == 1


async def test_a_handler_that_raises_leaves_the_record_unconfirmed_and_it_is_tried_again(emulator, polling, caplog):
    portal, _ = emulator
    poller, handled, _ = polling
    attempts = []

    async def flaky(event):
        attempts.append(event.call_id)
        if len(attempts) == 1:
            raise RuntimeError("AMI is not connected")
        handled.append(event)

    poller._handler = flaky
    [record] = clicks(portal, 1)
    await poller.poll_once()
    assert handled == [] and portal.events.cleared == [] and record.process_id  # still reserved, not lost
    assert any(r.levelno == logging.ERROR and "not confirmed" in r.getMessage() for r in caplog.records)
    await poller.poll_once()  # the same reservation asked for again by its process_id
    assert [e.call_id for e in handled] == ["externalCall.q.0"] and portal.events.cleared == [record]
    assert portal.requests_for(GET)[1].params["process_id"] == record.process_id


async def test_a_record_that_keeps_failing_is_marked_erroneous_in_the_portals_queue(emulator, polling, caplog):
    portal, _ = emulator
    poller, _, _ = polling

    async def broken(event):
        raise RuntimeError("no extension for this user")

    poller._handler = broken
    [record] = clicks(portal, 1)
    for _ in range(3):
        await poller.poll_once()
    assert record.error and record in portal.events.queue and portal.events.cleared == []
    assert "marked erroneous in the portal's queue" in caplog.text
    assert poller.health()["marked_erroneous"] == 1 and poller.health()["handler_failures"] == 3


async def test_a_stale_record_is_refused_and_confirmed_so_it_does_not_block_the_queue(emulator, polling):
    """A click queued while the server was down for an hour: nobody waits on that call any more."""
    portal, _ = emulator
    poller, handled, _ = polling
    old = portal.events.enqueue(CALL_START, CLICK, at=time.time() - 3600)
    await poller.poll_once()
    assert handled == [] and portal.events.cleared == [old]
    assert dict(poller.gate.refusals.counts) == {"stale": 1}


async def test_two_pollers_share_the_queue_and_each_record_is_handled_once(emulator, polling):
    portal, _ = emulator
    poller, handled, client = polling
    other_handled = []

    async def take(event):
        await asyncio.sleep(0.01)
        other_handled.append(event)

    other = OfflinePoller(lambda: client, EventGate(lambda: None, MemorySeen(120.0), country="RU",
                                                    replay_window=120.0), take, interval=0.05, limit=5)
    poller._limit = 5
    clicks(portal, 40)
    for _ in range(6):
        await asyncio.gather(poller.poll_once(), other.poll_once())
    ids = [event.call_id for event in handled + other_handled]
    assert sorted(ids) == sorted(f"externalCall.q.{n}" for n in range(40)) and handled and other_handled
    assert portal.events.queue == []


async def test_polls_wait_for_the_budget_the_calls_lookups_leave(emulator, polling):
    """A poll is a request that can wait: it takes a slot only while half the burst stays free."""
    portal, _ = emulator
    poller, handled, client = polling
    client.budget = RateLimiter(per_second=0.01, burst=4)
    for _ in range(3):  # the lookups took most of the burst
        await client.take_slot(0.0)
    clicks(portal, 1)
    await poller.poll_once()
    assert portal.requests_for(GET) == [] and handled == []
    assert poller.health()["problem"] == "event.offline.get: rate_limited (not sent)"


async def test_events_bind_subscribes_in_the_configured_mode_and_status_says_so(emulator, config_file, tmp_path,
                                                                                capsys):
    portal, server = emulator
    assert await asyncio.to_thread(main, ["events", "status", "-c", str(config_file)]) == 1
    assert "not bound: ONEXTERNALCALLSTART, ONEXTERNALCALLBACKSTART" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["events", "bind", "-c", str(config_file)]) == 0
    assert "bound ONEXTERNALCALLSTART, ONEXTERNALCALLBACKSTART (offline)" in capsys.readouterr().out
    assert [(b["event"], b["offline"]) for b in portal.events.bindings] == [
        ("ONEXTERNALCALLSTART", True), ("ONEXTERNALCALLBACKSTART", True)]
    assert await asyncio.to_thread(main, ["events", "bind", "-c", str(config_file)]) == 0  # nothing twice
    assert len(portal.events.bindings) == 2
    # Switched to a handler: bound to its URL, the offline bindings removed.
    token_path = tmp_path / "oauth.json"
    config_file.write_text(config_text(
        server, token_path, "{mode: handler, handler: {public_url: 'http://127.0.0.1:1/bitrix/events'}}"))
    assert await asyncio.to_thread(main, ["events", "bind", "-c", str(config_file)]) == 0
    assert [(b["event"], b["handler"]) for b in portal.events.bindings] == [
        ("ONEXTERNALCALLSTART", "http://127.0.0.1:1/bitrix/events"),
        ("ONEXTERNALCALLBACKSTART", "http://127.0.0.1:1/bitrix/events")]
    assert await asyncio.to_thread(main, ["events", "status", "-c", str(config_file)]) == 0
    assert "events: handler, bound" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["check", "-c", str(config_file)]) == 0
    assert "events: handler on /bitrix/events, the portal POSTs to http://127.0.0.1:1/bitrix/events" in \
        capsys.readouterr().out


async def test_health_says_the_mode_whether_it_is_subscribed_and_what_was_refused(emulator, polling, config_file):
    portal, _ = emulator
    poller, _, client = polling
    status = EventsStatus("offline", "", poller.gate, poller)
    await status.refresh(client)
    assert (status.health()["subscribed"], status.health()["problem"]) == (
        False, "not bound: ONEXTERNALCALLSTART, ONEXTERNALCALLBACKSTART (run `agi-bitrix events bind`)")
    assert await asyncio.to_thread(main, ["events", "bind", "-c", str(config_file)]) == 0
    await status.refresh(client)
    portal.events.enqueue(CALL_START, CLICK)
    portal.events.enqueue(CALL_START, {**CLICK, "USER_ID": "x"})
    await poller.poll_once()
    health = status.health()
    assert (health["mode"], health["subscribed"], health["problem"], health["accepted"]) == ("offline", True, None, 1)
    assert health["refused"] == {"malformed": 1} and health["last_event_seconds_ago"] < 5
    assert health["offline"]["confirmed"] == 2 and health["offline"]["problem"] is None


async def test_a_portal_that_refuses_the_queue_is_asked_seldom_and_logged_once(emulator, polling, caplog):
    """Tokens that are not an administrator's: the portal answers ACCESS_DENIED (event-offline-get.md)."""
    portal, _ = emulator
    poller, _, _ = polling
    portal.fail("error", method=GET, code="ACCESS_DENIED")
    poller._problem_interval = 0.5
    poller.start()
    try:
        await asyncio.sleep(0.4)
        assert len(portal.requests_for(GET)) == 1 and poller.health()["problem"] == "event.offline.get: ACCESS_DENIED"
        portal.reset_faults()
        await until(lambda: poller.health()["problem"] is None, what="the queue answering again")
    finally:
        await poller.close()
    assert caplog.text.count("offline events: event.offline.get: ACCESS_DENIED") == 1
