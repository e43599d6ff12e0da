# ruff: noqa: E501 -- a dialplan line cannot be wrapped
"""Click-to-call as an admin sets it up, for tests/asterisk/test_click_to_call_service.py and
bench/click_bench.py: the portal emulator with an OAuth application and agents in its user
directory, an Asterisk with the shipped sample and stand-in phones, and `agi-bitrix serve`
configured with `ami`, `events`, `clicktocall`, `callcard` and `users`, installed through its
install callback and subscribed with `agi-bitrix events bind`.

The stand-in phones report each ring in a UserEvent: an agent's with the event's CALL_ID (the
B24_CALL_ID the server's Originate set, which the Local channel passes on), a client's with the
number dialled. `PhoneWatch` reads them over an AMI connection of the test's own (read = all).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from agi_bitrix.testing.ami_calls import CallDriver, event_name_of
from agi_bitrix.testing.pbx_harness import REPO, AsteriskBuild, AsteriskPbx, free_tcp_port
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.portal_oauth import OAuthServer
from tests.conftest import until

from .conftest import TEST_QUEUES
from .crm import crm_object
from .test_callcard import FINISH, REGISTER, CallCardServer

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
exten => _X.,1,UserEvent({AGENT_RING},Number: ${{EXTEN}},CallId: ${{B24_CALL_ID}},CallerID: ${{CALLERID(num)}},At: ${{STRFTIME(,,%s.%3q)}})
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

    def set_events_mode(self, mode: str, poll_interval: float = POLL_INTERVAL) -> None:
        self.config["events"] = ({"mode": "handler", "handler": {"path": EVENTS_PATH, "public_url": self.events_url}}
                                 if mode == "handler" else {"mode": "offline", "offline": {"poll_interval": poll_interval}})
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



@asynccontextmanager
async def running_emulator(**options: Any) -> AsyncIterator[tuple[PortalEmulator, OAuthServer]]:
    """The portal (`options` as for PortalEmulator) with our application installable, and every
    agent in its user directory."""
    # application_only: event.* through a webhook would be refused, as the docs say.
    portal = PortalEmulator(application_only=True, **options)
    await portal.start()
    oauth = await OAuthServer(portal, client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    portal.events.domain, portal.events.member_id = oauth.domain, oauth.member_id
    for user_id, extension in {**ANSWERING_AGENTS, SILENT_AGENT[0]: SILENT_AGENT[1]}.items():
        # The user directory (user.get) knows each agent with their UF_PHONE_INNER.
        portal.set_client(fresh_client(), [crm_object(int(user_id), "OPENED", extension=extension)])
    try:
        yield portal, oauth
    finally:
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


async def switch_mode(server: ClickServer, mode: str, poll_interval: float = POLL_INTERVAL) -> None:
    """The admin's way: the config, `events bind`, a restart."""
    server.stop()
    server.set_events_mode(mode, poll_interval)
    await server.bind_events()
    server.start()
    await until(lambda: server.health()["ami"].get("up") and server.health()["users"].get("users"), WAIT,
                interval=0.1, what="AMI up and the user directory loaded")
