"""Click-to-call end to end, through the product's own parts only, on a real Asterisk 20 and 22.

`agi-bitrix serve` runs as its own process with a config an admin would write: an OAuth
application (installed through its install callback, which brings the application_token), the
`events` section (handler mode; offline mode in one test), `ami` (the minimal AMI user of
docs/ami.md, `read = call`, `write = originate`, that the PBX harness creates), `clicktocall`,
`callcard` and `users`; the subscription is made with `agi-bitrix events bind`, as the admin
does. The portal emulator POSTs ONEXTERNALCALLSTART as the portal does (portal_events.trigger);
the server's AMI client originates the agent's phone, the shipped sample's
[agi-bitrix-click-to-call] dials the client through the outbound context, and its hangup handler
finishes the call through the same server's `finish` AGI script.

What the stand-in phones saw comes from a second AMI connection (the harness's, `read = all`):
each agent's phone and each client reports its ring in a UserEvent, with the event's CALL_ID
(the B24_CALL_ID the Originate set, which the Local channel passes on). tests/asterisk/
test_click_to_call.py holds the dialplan's own rows (busy client, cancel, FreePBX).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from agi_bitrix.clicktocall_service import STATUS_RETRY
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.portal_oauth import OAuthServer
from tests.conftest import until

from .click_setup import (
    CALL_START,
    POLL_INTERVAL,
    RING,
    SILENT_AGENT,
    WAIT,
    Click,
    ClickServer,
    PhoneWatch,
    click_to_call_setup,
    fresh_client,
    running_emulator,
    switch_mode,
)

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def emulator() -> AsyncIterator[tuple[PortalEmulator, OAuthServer]]:
    async with running_emulator() as (portal, oauth):
        yield portal, oauth


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def setup(asterisk_root, asterisk_build, tmp_path_factory, emulator):
    portal, oauth = emulator
    async with click_to_call_setup(asterisk_root, asterisk_build, tmp_path_factory.mktemp("click-service"),
                                   portal, oauth) as (server, pbx):
        yield server, pbx


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def phones(setup) -> AsyncIterator[PhoneWatch]:
    watch = PhoneWatch()
    await watch.connect(setup[1])
    yield watch
    watch.close()


@pytest_asyncio.fixture(loop_scope="session")
async def clicks(emulator) -> AsyncIterator[Click]:
    async with aiohttp.ClientSession() as http:
        yield Click(emulator[0], http)


async def test_a_click_rings_the_agent_then_the_client_and_finishes_once_with_the_talk_time(setup, phones, clicks):
    server, _ = setup
    client = fresh_client()
    call_id = await clicks.click("1", client)

    await until(lambda: phones.clients_rung(client), WAIT, what="the client's phone ringing")
    finish = await clicks.finish_of(call_id)
    await asyncio.sleep(1.0)  # time for a second finish, if there were going to be one

    assert phones.agents_rung_for(call_id) == ["101"]
    [client_ring] = phones.clients_rung(client)
    assert client_ring["CallerID"] == "101"  # the client sees the agent's extension (no line number)
    assert (finish["CALL_ID"], finish["USER_ID"], finish["STATUS_CODE"]) == (call_id, "1", "200")
    assert 1 <= int(finish["DURATION"]) <= 2  # the client talks one second
    assert clicks.finishes(call_id) == 1
    assert server.health()["clicktocall"]["outcomes"].get("answered", 0) >= 1


async def test_healthz_sees_the_subscription_the_admin_made_with_the_server_running(setup):
    """The documented order: the server runs (its install callback takes the install), then the
    admin runs `events bind`; /healthz follows without a restart."""
    server, _ = setup
    await until(lambda: server.health()["events"]["subscribed"] is True, 2 * STATUS_RETRY + 5, interval=0.2,
                what="/healthz's events.subscribed")
    assert server.health()["events"]["problem"] is None


async def test_an_agent_who_does_not_answer_gets_no_client_leg_and_the_call_ends_as_missed(setup, phones, clicks):
    client = fresh_client()
    call_id = await clicks.click(SILENT_AGENT[0], client)

    finish = await clicks.finish_of(call_id, RING + WAIT)

    assert phones.agents_rung_for(call_id) == [SILENT_AGENT[1]] and phones.clients_rung(client) == []
    assert (finish["USER_ID"], str(finish["DURATION"]), finish["STATUS_CODE"], finish["FAILED_REASON"]) == (
        SILENT_AGENT[0], "0", "304", "the agent did not answer")


async def test_forged_and_replayed_events_never_reach_the_pbx(setup, phones, clicks):
    server, _ = setup
    events = clicks.portal.events
    forged = {"wrong token": {"application_token": "0" * 32}, "another portal": {"member_id": "b" * 32}}
    refused_before = server.health()["events"]["refused"]
    forged_calls = []
    for auth in forged.values():
        call_id = clicks.open_call("2", fresh_client())
        forged_calls.append(call_id)
        form = events.event_form(CALL_START, clicks.data(call_id, "2", fresh_client()), **auth)
        assert await clicks.post(server.events_url, form) == 403
    # A genuine click, then the same POST replayed: dialled once.
    client = fresh_client()
    call_id = await clicks.click("3", client)
    replay = events.event_form(CALL_START, clicks.data(call_id, "3", client))
    assert await clicks.post(server.events_url, replay) == 200  # answered, not acted on
    await clicks.finish_of(call_id)
    await asyncio.sleep(1.0)

    assert [phones.agents_rung_for(forged_call) for forged_call in forged_calls] == [[], []]
    assert phones.agents_rung_for(call_id) == ["103"] and len(phones.clients_rung(client)) == 1
    assert all(clicks.portal.calls[forged_call].finish_params is None for forged_call in forged_calls)
    refused = server.health()["events"]["refused"]
    assert {reason: refused.get(reason, 0) - refused_before.get(reason, 0)
            for reason in ("wrong_token", "wrong_portal", "duplicate")} == {
        "wrong_token": 1, "wrong_portal": 1, "duplicate": 1}


async def test_a_premium_rate_destination_is_refused_and_finished_without_an_originate(setup, phones, clicks):
    premium = "78091234567"  # +7 809: Russia's premium-rate range in libphonenumber's metadata
    call_id = await clicks.click("4", premium)

    finish = await clicks.finish_of(call_id)
    await asyncio.sleep(0.5)

    assert phones.agents_rung_for(call_id) == [] and phones.clients_rung(premium) == []
    assert (finish["USER_ID"], str(finish["DURATION"]), finish["STATUS_CODE"]) == ("4", "0", "403")
    assert "PREMIUM_RATE" in finish["FAILED_REASON"]


async def test_asterisk_killed_and_restarted_the_server_finishes_clicks_as_failed_then_reconnects(
        setup, phones, clicks):
    server, pbx = setup
    pbx.kill()
    try:
        await until(lambda: not server.health()["ami"]["up"], WAIT, interval=0.1, what="/healthz's ami down")
        call_id = await clicks.click("5", fresh_client())
        finish = await clicks.finish_of(call_id)
        assert (finish["USER_ID"], str(finish["DURATION"]), finish["STATUS_CODE"]) == ("5", "0", "503")
        assert finish["FAILED_REASON"].startswith("the PBX could not be asked")
        assert server.health()["clicktocall"]["outcomes"]["pbx_unreachable"] >= 1
    finally:
        pbx.start()  # the same configuration and ports, as a restarted Asterisk
        await phones.connect(pbx)
    await until(lambda: server.health()["ami"]["up"], WAIT, interval=0.1, what="the AMI client back by itself")

    client = fresh_client()
    call_id = await clicks.click("6", client)
    finish = await clicks.finish_of(call_id)

    assert phones.agents_rung_for(call_id) == ["106"] and len(phones.clients_rung(client)) == 1
    assert (finish["CALL_ID"], finish["STATUS_CODE"]) == (call_id, "200")
    assert server.health()["ami"]["reconnects"] >= 1


async def test_a_reload_that_changes_click_to_call_says_it_needs_a_restart(setup, phones, clicks):
    """ami, events and clicktocall are read at start: a SIGHUP that changes them must not look applied."""
    server, _ = setup
    server.config["clicktocall"]["ring"] = RING + 1
    server.set_events_mode("handler")  # writes the config
    try:
        server.process.send_signal(signal.SIGHUP)
        await until(lambda: "config reloaded" in server.log(), WAIT, interval=0.1, what="the reload")
        assert "clicktocall.ring changed; it takes effect after a restart" in server.log()
        # Still working with what it started with.
        client = fresh_client()
        call_id = await clicks.click("9", client)
        assert (await clicks.finish_of(call_id))["STATUS_CODE"] == "200"
    finally:
        server.config["clicktocall"]["ring"] = RING
        server.set_events_mode("handler")


@pytest_asyncio.fixture(loop_scope="session")
async def offline(setup) -> AsyncIterator[ClickServer]:
    """The same server switched to offline mode the admin's way: the config, `events bind`, a restart."""
    server, _ = setup
    await switch_mode(server, "offline")
    yield server
    await switch_mode(server, "handler")


async def test_offline_events_queued_in_the_portal_are_taken_handled_once_and_confirmed(offline, phones, clicks):
    events = clicks.portal.events
    assert [(b["event"], b["offline"]) for b in events.bindings if b["event"] == CALL_START] == [(CALL_START, True)]
    clients = {"7": fresh_client(), "8": fresh_client()}
    call_ids = {user: await clicks.click(user, client) for user, client in clients.items()}
    queued = list(events.queue)
    assert {record.data["CALL_ID"] for record in queued} == set(call_ids.values())

    finishes = {user: await clicks.finish_of(call_id) for user, call_id in call_ids.items()}
    await until(lambda: not events.queue, WAIT, what="the records confirmed")
    await asyncio.sleep(2 * POLL_INTERVAL + 0.5)  # more polls: nothing is handled twice

    assert [record.id for record in events.cleared[-2:]] == [record.id for record in queued]
    for user, call_id in call_ids.items():
        assert phones.agents_rung_for(call_id) == [str(100 + int(user))]
        assert len(phones.clients_rung(clients[user])) == 1
        assert (finishes[user]["STATUS_CODE"], clicks.finishes(call_id)) == ("200", 1)
    assert offline.health()["events"]["mode"] == "offline"
