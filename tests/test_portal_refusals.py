"""The portal's error codes as the portal means them, through the whole server over real HTTP.

REST refused for the whole portal (a plan without REST, HTTPS required) opens the breaker at once
and shows in /healthz with its reason; codes an admin fixes (payment, scopes, credentials, the
auth type) hold the finishes instead of failing them; register tells what CRM_CREATE did.
"""

import asyncio
import json
import logging

import aiohttp
import pytest

from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.errors import NotPermitted, PaymentRequired, PortalRefused
from agi_bitrix.bitrix.oauth import request_tokens
from agi_bitrix.bitrix.users import UserDirectory
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.portal_oauth import OAuthServer
from agi_bitrix.testing.sample_data import SAMPLE_CRM, SAMPLE_USERS
from tests.conftest import ample_budget, until
from tests.test_callcard import FINISH, REGISTER, UNKNOWN, Running, callcard_config, delivered_finishes
from tests.test_oauth import CLIENT_ID, CLIENT_SECRET, oauth_settings_for

SEARCH = "telephony.externalcall.searchcrmentities"


@pytest.fixture
def monitored(monitored):
    """conftest's `monitored`, with the breaker's cool-down short and the URL of /healthz."""
    app, host, port, base, http = monitored
    app.memory.breaker.cool_down = 0.3  # what a reload of bitrix.breaker.cool_down sets
    return app, host, port, f"{base}/healthz", http


async def health(http, url):
    async with http.get(url) as response:
        return response.status, await response.json()


# -- the emulator answers as the docs say ---------------------------------------------------------

@pytest.mark.parametrize("mode, status, code, description", [
    ("commercial_plan", 403, "ACCESS_DENIED", "REST API is available only on commercial plans"),
    ("https_required", 400, "INVALID_REQUEST", "Https required"),
])
async def test_the_emulator_refuses_rest_for_the_whole_portal_as_documented(portal, mode, status, code,
                                                                            description):
    setattr(portal, mode, mode == "https_required")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{portal.webhook_url}user.get.json") as answer:
            assert answer.status == status
            assert await answer.json() == {"error": code, "error_description": description}


async def test_documented_error_codes_come_with_their_status_and_text(portal):
    portal.fail("error", code="PAYMENT_REQUIRED", times=1)
    portal.fail("error", code="NO_AUTH_FOUND", times=1)
    async with aiohttp.ClientSession() as http:
        answers = []
        for _ in range(2):
            async with http.post(f"{portal.webhook_url}user.get.json") as answer:
                answers.append((answer.status, await answer.json()))
    assert answers == [(402, {"error": "PAYMENT_REQUIRED", "error_description": "Payment required"}),
                       (401, {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"})]


async def test_application_only_methods_refuse_the_webhook_and_take_the_application():
    portal = PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS, application_only=True)
    await portal.start()
    oauth = await OAuthServer(portal, client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    access, _ = oauth.issue_tokens()
    params = {"USER_ID": "1", "PHONE_NUMBER": "79161234567", "TYPE": "2"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{portal.webhook_url}telephony.externalcall.register.json", data=params) as answer:
                webhook = (answer.status, await answer.json())
            async with http.post(f"{portal.webhook_url}telephony.externalCall.searchCrmEntities.json",
                                 data={"PHONE_NUMBER": "79161234567"}) as answer:
                lookup_status = answer.status
            async with http.post(f"{oauth.client_endpoint}telephony.externalcall.register.json",
                                 data={**params, "auth": access}) as answer:
                application = (answer.status, await answer.json())
    finally:
        await oauth.stop()
        await portal.stop()
    assert webhook == (403, {"error": "WRONG_AUTH_TYPE",
                             "error_description": "Current authorization type is denied for this method"})
    assert lookup_status == 200  # the lookup is no application-only method
    assert application[0] == 200 and application[1]["result"]["CALL_ID"].startswith("externalCall.")


# -- REST refused for the whole portal ------------------------------------------------------------

@pytest.mark.parametrize("mode, value, reason", [
    ("commercial_plan", False, "ACCESS_DENIED"),
    ("https_required", True, "INVALID_REQUEST"),
])
async def test_rest_refused_for_the_whole_portal_opens_the_breaker_and_shows_in_healthz(
        monitored, portal, caplog, mode, value, reason):
    app, host, port, url, http = monitored
    setattr(portal, mode, value)
    first = (await fake_call(host, port, callerid="89161234567")).variables
    # Not "one number refused": the next caller is not sent to a portal that refuses everyone.
    second = (await fake_call(host, port, callerid="89262345678")).variables
    assert (first["B24_STATUS"], first["B24_ERROR"], first["B24_TARGET"]) == ("ERROR", reason, "support")
    assert (second["B24_ERROR"], len(portal.requests_for(SEARCH))) == ("circuit_open", 1)
    status, body = await health(http, url)
    assert status == 503 and body["portal"]["breaker"] == "open"
    assert body["portal"]["state"].startswith(f"refuses REST: {reason} (")
    # The probe after each cool-down finds it again: still one line for the admin, not one per probe.
    for n in range(3):
        await asyncio.sleep(0.35)
        assert (await fake_call(host, port, callerid=f"8916123456{n}")).variables["B24_ERROR"] == reason
    said = [r for r in caplog.records if r.levelno == logging.ERROR and "refuses REST as a whole" in r.getMessage()]
    assert len(said) == 1 and reason in said[0].getMessage()
    assert len(portal.requests_for(SEARCH)) == 4

    setattr(portal, mode, not value)  # the admin fixed it
    await asyncio.sleep(0.35)
    assert (await fake_call(host, port, callerid="89161234567")).variables["B24_STATUS"] == "FOUND"
    assert (await health(http, url))[0] == 200
    setattr(portal, mode, value)  # and it breaks again: a change, said again
    await asyncio.sleep(0.05)
    app.lookup.cache.clear()
    await fake_call(host, port, callerid="89161234567")
    said = [r for r in caplog.records if r.levelno == logging.ERROR and "refuses REST as a whole" in r.getMessage()]
    assert len(said) == 2


async def test_a_plan_without_rest_is_not_read_as_a_missing_user_scope(portal, caplog):
    portal.commercial_plan = False
    async with make_session() as session:
        client = PortalClient(portal.webhook_url, session, timeout=1.0, budget=ample_budget())
        users = UserDirectory(lambda: client, refresh=0.05, default_country="RU")
        users.start()
        await until(lambda: "user directory not refreshed" in caplog.text)
        await users.close()
    assert "commercial plans" in caplog.text and "'user' scope" not in caplog.text


# -- finishes held while an admin can still fix it ------------------------------------------------

@pytest.mark.parametrize("code", ["ACCESS_DENIED", "INVALID_REQUEST", "PAYMENT_REQUIRED", "insufficient_scope",
                                  "NO_AUTH_FOUND", "expired_token", "invalid_token", "WRONG_AUTH_TYPE"])
async def test_a_finish_is_held_while_an_admin_can_fix_the_refusal(portal, tmp_path, code):
    running = await Running(callcard_config(portal.webhook_url, tmp_path / "o.sqlite3",
                                            retry="{first: 0.2, max: 0.2}")).start()
    try:
        call_id = (await running.register())["B24_CALL_ID"]
        portal.fail("error", method=FINISH, code=code)
        await running.finish(call_id, dialstatus="NOANSWER")
        await until(lambda: len(portal.requests_for(FINISH)) >= 2, what="a second attempt")
        row = await running.app.outbox.row(call_id)
        assert row["state"] == "pending" and row["last_error"].startswith(f"{code}: ")
        portal.reset_faults()
        await until(lambda: delivered_finishes(portal), what="the finish once the admin fixed it")
    finally:
        await running.stop()


async def test_the_token_servers_payment_and_scope_refusals_are_classed(emulator_oauth, tmp_path):
    oauth, token_path = emulator_oauth
    async with make_session() as session:
        kinds = []
        for code in ("PAYMENT_REQUIRED", "invalid_scope", "insufficient_scope"):
            oauth.refuse_token_requests(code, "from settings/oauth/error-codes.md")
            with pytest.raises(PortalRefused) as raised:
                await request_tokens(oauth_settings_for(oauth, token_path), session,
                                     {"grant_type": "refresh_token", "refresh_token": oauth.refresh_token})
            kinds.append((type(raised.value), raised.value.reason))
    assert kinds == [(PaymentRequired, "oauth_PAYMENT_REQUIRED"), (NotPermitted, "oauth_invalid_scope"),
                     (NotPermitted, "oauth_insufficient_scope")]


@pytest.fixture
async def emulator_oauth(portal, tmp_path):
    oauth = await OAuthServer(portal, client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    _, refresh = oauth.issue_tokens()
    token_path = tmp_path / "oauth.json"
    token_path.write_text(json.dumps({"refresh_token": refresh}))
    yield oauth, token_path
    await oauth.stop()


# -- what register's CRM_CREATE did --------------------------------------------------------------

CRM_CREATE = "register: {crm_create: true, default_user: 1}\n"


async def test_a_created_lead_is_named_in_b24_crm_created(portal, tmp_path, caplog):
    caplog.set_level(logging.INFO, "agi_bitrix.callcard")
    running = await Running(callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", CRM_CREATE)).start()
    try:
        variables = await running.register(phone=UNKNOWN, owner="", entity=("", ""))
    finally:
        await running.stop()
    assert variables == {"B24_CALL_ID": variables["B24_CALL_ID"], "B24_REGISTER_ERROR": "",
                         "B24_CRM_CREATED": "LEAD:1000", "B24_LEAD_ERROR": ""}
    assert "created in the CRM: LEAD:1000" in caplog.text


async def test_a_lead_the_portal_could_not_create_is_not_silent(portal, tmp_path, caplog):
    portal.lead_creation_error = "Lead creation is disabled;\nEXEC Dial(Local/666)"
    running = await Running(callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", CRM_CREATE)).start()
    try:
        variables = await running.register(phone=UNKNOWN, owner="", entity=("", ""))
    finally:
        await running.stop()
    # Registered all the same: the card shows, only the lead is missing.
    assert variables["B24_CALL_ID"] and variables["B24_REGISTER_ERROR"] == ""
    assert variables["B24_CRM_CREATED"] == ""
    assert variables["B24_LEAD_ERROR"] == "Lead creation is disabled; EXEC Dial(Local/666)"  # one line
    assert any(r.levelno == logging.WARNING and "could not create a lead" in r.getMessage()
               for r in caplog.records)
    assert len(portal.requests_for(REGISTER)) == 1
