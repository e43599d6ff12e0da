# ruff: noqa: E501 -- a dialplan line cannot be wrapped
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
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from agi_bitrix.clicktocall_service import STATUS_RETRY
from agi_bitrix.testing.ami_calls import CallDriver, event_name_of
from agi_bitrix.testing.pbx_harness import REPO, AsteriskBuild, AsteriskPbx, free_tcp_port
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.portal_oauth import OAuthServer
from tests.conftest import until

from .conftest import TEST_QUEUES
from .crm import crm_object
from .test_callcard import FINISH, REGISTER, CallCardServer

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

CALL_START = "ONEXTERNALCALLSTART"
CLIENT_ID, CLIENT_SECRET = "local.6a7b8c9d0e1f2a.23456789", "click-secret-q1w2e3"
INSTALL_PATH, EVENTS_PATH = "/bitrix/install", "/bitrix/events"
AGENTS_CONTEXT, CLIENTS_CONTEXT = "agi-bitrix-e2e-agents", "agi-bitrix-e2e-clients"
AGENT_RING, CLIENT_RING = "AgiBitrixE2eAgentRing", "AgiBitrixE2eClientRing"
RING = 3  # clicktocall.ring: how long an agent's phone rings before the click ends as not answered
POLL_INTERVAL = 0.2  # events.offline.poll_interval of the offline test
WAIT = 20.0

# Agents (Bitrix24 user id -> extension): 1XX answer and stay on the line until the call ends;
# 2XX ring until the Originate gives up. Clients answer, talk one second and hang up.
ANSWERING_AGENTS = {str(user): str(100 + user) for user in range(1, 61)}
SILENT_AGENT = ("61", "261")

CLICK_DIALPLAN = f"""
[general]
autofallthrough = yes

#include "asterisk-samples/extensions.conf"

[globals](+)
AGI_BITRIX_OUTBOUND_CONTEXT={CLIENTS_CONTEXT}
AGI_BITRIX_CLIENT_RING=10

[{AGENTS_CONTEXT}]
exten => _X.,1,UserEvent({AGENT_RING},Number: ${{EXTEN}},CallId: ${{B24_CALL_ID}},CallerID: ${{CALLERID(num)}})
 same => n,Set(TIMEOUT(absolute)=60)
 same => n,GotoIf($["${{EXTEN:0:1}}" = "1"]?answer)
 same => n,Wait(120)
 same => n(answer),Answer()
 same => n,Wait(30)
 same => n,Hangup()

[{CLIENTS_CONTEXT}]
exten => _X.,1,UserEvent({CLIENT_RING},Number: ${{EXTEN}},CallerID: ${{CALLERID(num)}})
 same => n,Answer()
 same => n,Wait(1)
 same => n,Hangup()
"""

_clients = itertools.count(1)


def fresh_client() -> str:
    """A Moscow mobile (valid MOBILE of RU, so the dial policy lets it through) no click of this run used."""
    return f"7917{os.getpid() % 1000:03d}{next(_clients):04d}"


class ClickServer(CallCardServer):
    """`agi-bitrix serve` as an admin configures it for click-to-call: the shipped config with a
    callcard and users section (CallCardServer), an OAuth application, the HTTP listener for the
    install callback and the events, `events`, `ami` and `clicktocall`."""

    def __init__(self, workdir: Path, oauth: OAuthServer, ami_port: int, ami_user: str, ami_secret: str):
        # No webhook: an empty AGI_BITRIX_WEBHOOK_URL is no webhook (config.py reads it as unset).
        super().__init__("", workdir)
        self.http_port = free_tcp_port()
        self.token_file = workdir / f"oauth-{self.port}.json"
        secret_file = workdir / f"ami-secret-{self.port}"
        secret_file.write_text(ami_secret + "\n")
        secret_file.chmod(0o600)
        config = yaml.safe_load(self.config_path.read_text())
        config["bitrix"] = {**{key: config["bitrix"][key] for key in ("deadline", "rate_limit", "breaker")},
                            "oauth": {"portal_url": f"{oauth.url}/rest/", "client_id": CLIENT_ID,
                                      "client_secret": CLIENT_SECRET, "token_file": str(self.token_file),
                                      "token_url": f"{oauth.url}/oauth/token/", "install_path": INSTALL_PATH}}
        config["http"] = {"listen": f"127.0.0.1:{self.http_port}"}
        config["ami"] = {"username": ami_user, "secret_file": str(secret_file), "port": ami_port,
                         "reconnect": {"first": 0.2, "max": 1.0}}
        config["clicktocall"] = {"channel": f"Local/{{extension}}@{AGENTS_CONTEXT}", "ring": RING,
                                 "rate": {"per_second": 100, "burst": 100}}
        self.config = config
        self.set_events_mode("handler")

    def set_events_mode(self, mode: str) -> None:
        self.config["events"] = ({"mode": "handler", "handler": {"path": EVENTS_PATH, "public_url": self.events_url}}
                                 if mode == "handler" else {"mode": "offline", "offline": {"poll_interval": POLL_INTERVAL}})
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def events_url(self) -> str:
        return f"{self.http_url}{EVENTS_PATH}"

    def health(self) -> dict[str, Any]:
        # /healthz answers 503 while the portal is degraded; its body is the same.
        try:
            with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=5) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())

    async def bind_events(self) -> str:
        """`agi-bitrix events bind -c FILE`, as the admin runs it after choosing the mode (in a
        thread: the emulator it asks answers on this loop)."""
        run = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agi_bitrix", "events", "bind", "-c", str(self.config_path)],
                             capture_output=True, text=True, timeout=60, cwd=REPO,
                                   check=False)
        assert run.returncode == 0, f"events bind failed: {run.stdout}{run.stderr}"
        return run.stdout


class PhoneWatch:
    """The stand-in phones' rings, from an AMI connection of the test's own (read = all)."""

    def __init__(self) -> None:
        self.agent_rings: list[tuple[float, dict[str, str]]] = []  # (monotonic time, event fields)
        self.client_rings: list[tuple[float, dict[str, str]]] = []
        self.driver: CallDriver | None = None
        # A connection lost with Asterisk is made again by panoramisk itself (a call_later that
        # close() does not cancel), beside the one connect() makes: an event may come twice.
        self._seen: set[tuple[str, str]] = set()

    async def connect(self, pbx: AsteriskPbx) -> None:
        self.close()
        self.driver = await CallDriver.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
        self.driver.manager.register_event("UserEvent", self._on_event)

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
            self.driver = None

    async def _on_event(self, manager, event) -> None:
        fields = {key: str(value) for key, value in event.items()}
        name = event_name_of(event)
        if (fields.get("Uniqueid", ""), name) in self._seen:
            return
        self._seen.add((fields.get("Uniqueid", ""), name))
        if name == AGENT_RING:
            self.agent_rings.append((time.monotonic(), fields))
        elif name == CLIENT_RING:
            self.client_rings.append((time.monotonic(), fields))

    def agents_rung_for(self, call_id: str) -> list[str]:
        return [fields["Number"] for _, fields in self.agent_rings if fields.get("CallId") == call_id]

    def clients_rung(self, number: str) -> list[dict[str, str]]:
        return [fields for _, fields in self.client_rings if fields.get("Number") == number]


class Click:
    """The portal's side of clicks: the call it opens, and the ONEXTERNALCALLSTART it sends."""

    def __init__(self, portal: PortalEmulator, http: aiohttp.ClientSession):
        self.portal, self.http = portal, http

    def open_call(self, user_id: str, client: str) -> str:
        """The call the portal opens when the user clicks (the CALL_ID its event carries)."""
        return self.portal.call_method(REGISTER, {"USER_ID": user_id, "PHONE_NUMBER": client, "TYPE": 1,
                                                  "SHOW": 0})["result"]["CALL_ID"]

    @staticmethod
    def data(call_id: str, user_id: str, client: str) -> dict[str, str]:
        # api-reference/telephony/events/on-external-call-start.md's fields.
        return {"PHONE_NUMBER": f"+{client}", "PHONE_NUMBER_INTERNATIONAL": f"+{client}", "EXTENSION": "",
                "USER_ID": user_id, "CALL_LIST_ID": "0", "LINE_NUMBER": "", "IS_MOBILE": "0",
                "CALL_ID": call_id, "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": "710"}

    async def click(self, user_id: str, client: str) -> str:
        """The user clicks `client`: the portal opens the call and sends the event to every binding."""
        call_id = self.open_call(user_id, client)
        statuses = await self.portal.events.trigger(CALL_START, self.data(call_id, user_id, client), self.http)
        assert statuses in ([200], []), statuses  # [] in offline mode: queued
        return call_id

    async def post(self, url: str, form: dict[str, str]) -> int:
        async with self.http.post(url, data=form) as answer:
            return answer.status

    async def finish_of(self, call_id: str, timeout: float = WAIT) -> dict[str, Any]:
        await until(lambda: self.portal.calls[call_id].finish_params is not None, timeout, interval=0.05,
                    what=f"the finish of {call_id}")
        return self.portal.calls[call_id].finish_params

    def finishes(self, call_id: str) -> int:
        return [request.params["CALL_ID"] for request in self.portal.requests_for(FINISH)].count(call_id)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def emulator() -> AsyncIterator[tuple[PortalEmulator, OAuthServer]]:
    # application_only: event.* through a webhook would be refused, as the docs say.
    portal = PortalEmulator(application_only=True)
    await portal.start()
    oauth = await OAuthServer(portal, client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    portal.events.domain, portal.events.member_id = oauth.domain, oauth.member_id
    for user_id, extension in {**ANSWERING_AGENTS, SILENT_AGENT[0]: SILENT_AGENT[1]}.items():
        # The user directory (user.get) knows each agent with their UF_PHONE_INNER.
        portal.set_client(fresh_client(), [crm_object(int(user_id), "OPENED", extension=extension)])
    yield portal, oauth
    await oauth.stop()
    await portal.stop()


@asynccontextmanager
async def click_to_call_setup(root: Path, build: AsteriskBuild, workdir: Path, portal: PortalEmulator,
                              oauth: OAuthServer) -> AsyncIterator[tuple[ClickServer, AsteriskPbx]]:
    """An Asterisk with the shipped sample and the stand-in phones, and the server the admin set
    up in order: AMI user, install, `events bind`, dialplan pointing at the server's call card."""
    placeholder = AsteriskPbx(root, "click-service", build)  # its ports and AMI users, before the server
    server = ClickServer(workdir, oauth, placeholder.ami_port, placeholder.ami_originate_username,
                         placeholder.ami_originate_secret)
    dialplan = CLICK_DIALPLAN + f"\n[globals](+)\nAGI_BITRIX_CALLCARD=agi://127.0.0.1:{server.port}\n"
    pbx_iterator: Iterator[AsteriskPbx] = _pbx_like(placeholder, dialplan)
    pbx = next(pbx_iterator)
    try:
        server.start()
        await install(server, portal, oauth)
        await server.bind_events()
        await until(lambda: server.health()["ami"].get("up") and server.health()["users"].get("users"), WAIT,
                    interval=0.1, what="AMI up and the user directory loaded")
        yield server, pbx
    finally:
        server.stop()
        next(pbx_iterator, None)


def _pbx_like(pbx: AsteriskPbx, extensions: str) -> Iterator[AsteriskPbx]:
    """running_pbx for an AsteriskPbx made beforehand (so its ports and secrets were known first)."""
    pbx.write_config(extensions, TEST_QUEUES)
    try:
        pbx.start()
        yield pbx
    finally:
        pbx.stop()


async def install(server: ClickServer, portal: PortalEmulator, oauth: OAuthServer) -> None:
    """The admin installs the application: the portal POSTs its first tokens and application_token."""
    status, body = await oauth.post_install_event(f"{server.http_url}{INSTALL_PATH}")
    assert (status, body) == (200, {"status": "success"}), (status, body, server.log())
    portal.events.application_token = oauth.application_token


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


@pytest_asyncio.fixture(loop_scope="session")
async def offline(setup) -> AsyncIterator[ClickServer]:
    """The same server switched to offline mode the admin's way: the config, `events bind`, a restart."""
    server, _ = setup
    await switch_mode(server, "offline")
    yield server
    await switch_mode(server, "handler")


async def switch_mode(server: ClickServer, mode: str) -> None:
    server.stop()
    server.set_events_mode(mode)
    await server.bind_events()
    server.start()
    await until(lambda: server.health()["ami"].get("up") and server.health()["users"].get("users"), WAIT,
                interval=0.1, what="AMI up and the user directory loaded")


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
