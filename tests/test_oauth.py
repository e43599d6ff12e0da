"""OAuth applications: the real client and token holder against a token server and an OAuth
portal front over real HTTP. The front checks each access token and hands the request on to
the portal emulator's webhook, so the methods answer exactly as they do for a webhook."""

import asyncio
import json
import logging
import os
import stat
import textwrap

import aiohttp
import pytest
from aiohttp import web

from agi_bitrix.app import Application
from agi_bitrix.bitrix.client import make_session
from agi_bitrix.bitrix.errors import PortalError
from agi_bitrix.bitrix.oauth import EXPIRY_MARGIN, OAuthTokens, TokenFile, Tokens, portal_client
from agi_bitrix.bitrix.settings import OAuthSettings
from agi_bitrix.config import load_config, parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM
from tests.conftest import TEST_RULES

SEARCH = "telephony.externalCall.searchCrmEntities"
CLIENT_ID, CLIENT_SECRET = "local.5f1a2b3c4d5e6f.12345678", "client-secret-x9y8z7"


class OAuthPortal:
    """oauth.bitrix.info and https://PORTAL/rest/ as an OAuth application sees them."""

    def __init__(self, emulator: PortalEmulator):
        self.emulator = emulator
        self.generation = 0
        self.access_token, self.refresh_token = self._issue()
        self.refreshes = 0
        self.refresh_delay = 0.0
        self.seen_auth: list[str] = []
        self.url = ""
        self._runner = None

    def _issue(self):
        self.generation += 1
        return f"access-{self.generation:04d}-secret", f"refresh-{self.generation:04d}-secret"

    def expire(self):
        self.access_token = f"expired-{self.generation}"  # the current token stops working

    async def start(self):
        app = web.Application()
        app.router.add_get("/oauth/token/", self._token)
        app.router.add_post("/rest/{method}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._http = aiohttp.ClientSession()
        return self

    async def stop(self):
        await self._http.close()
        await self._runner.cleanup()

    async def _token(self, request):
        query = request.query
        if (query.get("client_id"), query.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
            return web.json_response({"error": "invalid_client", "error_description": "Invalid client"}, status=401)
        if query.get("grant_type") != "refresh_token" or query.get("refresh_token") != self.refresh_token:
            return web.json_response({"error": "invalid_grant", "error_description": "Invalid refresh token"},
                                     status=400)
        await asyncio.sleep(self.refresh_delay)
        self.refreshes += 1
        self.access_token, self.refresh_token = self._issue()  # the old refresh token is spent
        return web.json_response({
            "access_token": self.access_token, "expires": 1_700_003_600, "expires_in": 3600,
            "scope": "telephony,user", "domain": "oauth.bitrix.info", "server_endpoint": f"{self.url}/rest/",
            "status": "L", "client_endpoint": f"{self.url}/rest/", "member_id": "abc", "user_id": 1,
            "refresh_token": self.refresh_token,
        })

    async def _rest(self, request):
        # Lookups arrive as JSON, the call card's methods as forms: the portal reads both.
        is_json = request.content_type == "application/json"
        form = await request.json() if is_json else await request.post()
        token = form.get("auth", "")
        self.seen_auth.append(token)
        if token.startswith("expired-"):
            return web.json_response({"error": "expired_token",
                                      "error_description": "The access token provided has expired."}, status=401)
        if token != self.access_token:
            return web.json_response({"error": "invalid_token",
                                      "error_description": "The access token provided is invalid."}, status=401)
        fields = {key: value for key, value in form.items() if key != "auth"} if is_json else \
            [(key, value) for key, value in form.items() if key != "auth"]
        body = {"json": fields} if is_json else {"data": fields}
        async with self._http.post(f"{self.emulator.webhook_url}{request.match_info['method']}", **body) as answer:
            return web.Response(status=answer.status, body=await answer.read(), content_type="application/json")


@pytest.fixture
async def emulator():
    portal = PortalEmulator(SAMPLE_CRM)
    await portal.start()
    yield portal
    await portal.stop()


@pytest.fixture
async def oauth_portal(emulator):
    portal = await OAuthPortal(emulator).start()
    yield portal
    await portal.stop()


@pytest.fixture
def token_path(tmp_path, oauth_portal):
    path = tmp_path / "oauth.json"
    # As an admin sets it up: only the refresh token from the application's installation.
    path.write_text(json.dumps({"refresh_token": oauth_portal.refresh_token}))
    return path


def settings(oauth_portal, token_path, secret=CLIENT_SECRET):
    return OAuthSettings(f"{oauth_portal.url}/rest/", CLIENT_ID, secret, str(token_path),
                         f"{oauth_portal.url}/oauth/token/")


@pytest.fixture
async def session():
    async with make_session() as http:
        yield http


def client(oauth_portal, token_path, session, **overrides):
    config = parse_config(textwrap.dedent(f"""\
        bitrix:
          deadline: 2
          oauth:
            portal_url: "{oauth_portal.url}/rest/"
            client_id: "{CLIENT_ID}"
            client_secret: "{overrides.get('secret', CLIENT_SECRET)}"
            token_file: "{token_path}"
            token_url: "{oauth_portal.url}/oauth/token/"
        routing: {{fallback_queue: support}}
        """))
    return portal_client(config.bitrix, session)


async def test_first_request_refreshes_saves_the_new_pair_and_uses_the_access_token(oauth_portal, token_path, session):
    portal = client(oauth_portal, token_path, session)
    entities = await portal.search_crm_entities("79161234567")
    assert [e.entity_id for e in entities] == ["12", "7"]
    assert oauth_portal.refreshes == 1 and oauth_portal.seen_auth == ["access-0002-secret"]
    saved = json.loads(token_path.read_text())
    assert (saved["access_token"], saved["refresh_token"]) == ("access-0002-secret", "refresh-0002-secret")
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    assert [p.name for p in token_path.parent.iterdir()] == [token_path.name]  # no temporary left


async def test_an_expired_token_is_refreshed_once_and_the_request_retried(oauth_portal, token_path, session):
    portal = client(oauth_portal, token_path, session)
    await portal.search_crm_entities("79161234567")
    oauth_portal.expire()
    entities = await portal.search_crm_entities("79161234567")
    assert entities and oauth_portal.refreshes == 2
    assert oauth_portal.seen_auth == ["access-0002-secret", "access-0002-secret", "access-0003-secret"]
    assert json.loads(token_path.read_text())["refresh_token"] == "refresh-0003-secret"


async def test_concurrent_requests_share_one_refresh(oauth_portal, token_path, session):
    portal = client(oauth_portal, token_path, session)
    await portal.search_crm_entities("79161234567")
    oauth_portal.expire()
    oauth_portal.refresh_delay = 0.1
    answers = await asyncio.gather(*(portal.search_crm_entities("79161234567") for _ in range(10)))
    assert all(answers) and oauth_portal.refreshes == 2  # one at the start, one for all ten


async def test_a_token_near_its_expiry_is_refreshed_before_use(oauth_portal, token_path, session):
    clock = [1_700_000_000.0]
    tokens = OAuthTokens(settings(oauth_portal, token_path), session, clock=lambda: clock[0])
    assert await tokens.access_token() == "access-0002-secret"
    clock[0] += 3600 - EXPIRY_MARGIN - 1
    assert await tokens.access_token() == "access-0002-secret"
    clock[0] += 2
    assert await tokens.access_token() == "access-0003-secret"
    assert oauth_portal.seen_auth == []  # no request was spent on a token about to expire


async def test_a_rejected_refresh_token_is_said_clearly_and_never_logged(oauth_portal, token_path, session, caplog):
    token_path.write_text(json.dumps({"refresh_token": "refresh-stale-secret"}))
    portal = client(oauth_portal, token_path, session)
    with pytest.raises(PortalError) as raised:
        await portal.search_crm_entities("79161234567")
    assert raised.value.reason == "refresh_token_rejected"
    assert f"Bitrix24 rejected the refresh token in {token_path} (invalid_grant, HTTP 400)" in caplog.text
    assert "reinstall the application or write a fresh refresh_token" in caplog.text
    for secret in ("refresh-stale-secret", CLIENT_SECRET):
        assert secret not in caplog.text and secret not in str(raised.value)


async def test_a_wrong_client_secret_is_named_as_such(oauth_portal, token_path, session, caplog):
    portal = client(oauth_portal, token_path, session, secret="wrong-secret")
    with pytest.raises(PortalError) as raised:
        await portal.search_crm_entities("79161234567")
    assert raised.value.reason == "oauth_client_rejected"
    assert "client_id/client_secret" in caplog.text and "wrong-secret" not in caplog.text


async def test_an_unreachable_token_server_is_a_portal_error_without_secrets(token_path, session):
    tokens = OAuthTokens(OAuthSettings("http://127.0.0.1:9/rest/", CLIENT_ID, CLIENT_SECRET, str(token_path),
                                       "http://127.0.0.1:9/oauth/token/"), session)
    with pytest.raises(PortalError) as raised:
        await tokens.access_token()
    assert raised.value.reason == "oauth_connect" and CLIENT_SECRET not in str(raised.value)


async def test_tokens_never_appear_in_portal_errors(oauth_portal, token_path, session, emulator, caplog):
    caplog.set_level(logging.DEBUG)
    portal = client(oauth_portal, token_path, session)
    await portal.search_crm_entities("79161234567")
    # The portal echoes the request (token included) into an error page.
    emulator.fail("bad_json", body=b"<html>auth=access-0002-secret refresh-0002-secret</html>")
    with pytest.raises(PortalError) as raised:
        await portal.search_crm_entities("79161234567")
    assert "access-0002-secret" not in str(raised.value) and "refresh-0002-secret" not in str(raised.value)
    assert "secret" not in caplog.text


def test_a_failed_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "oauth.json"
    token_file = TokenFile(path)
    token_file.save(Tokens("a1", "r1", 1.0))

    def broken_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left on device"):
        token_file.save(Tokens("a2", "r2", 2.0))
    assert token_file.load() == Tokens("a1", "r1", 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["oauth.json"]


async def test_the_whole_server_routes_calls_as_an_oauth_application(oauth_portal, token_path, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("AGI_BITRIX_CLIENT_SECRET", CLIENT_SECRET)
    config_path = tmp_path / "agi-bitrix.yaml"
    config_path.write_text(textwrap.dedent(f"""\
        bitrix:
          oauth:
            portal_url: "{oauth_portal.url}/rest/"
            client_id: "{CLIENT_ID}"
            token_file: "{token_path}"
            token_url: "{oauth_portal.url}/oauth/token/"
        routing:
          fallback_queue: support
          rules:
        """) + textwrap.indent(TEST_RULES, "    "))
    app = Application(load_config(config_path))
    host, port = await app.start("127.0.0.1", 0)
    try:
        first = (await fake_call(host, port, callerid="89161234567")).variables
        oauth_portal.expire()
        app.lookup.cache.clear()
        second = (await fake_call(host, port, callerid="89161234567")).variables
        # A reload with the same application keeps its tokens: no second holder of the refresh token.
        tokens = app.portal.auth
        assert await app.reload() and app.portal.auth is tokens
    finally:
        await app.stop()
    assert (first["B24_STATUS"], first["B24_TARGET"]) == ("FOUND", "101")
    assert (second["B24_STATUS"], second["B24_TARGET"]) == ("FOUND", "101")
    assert oauth_portal.refreshes == 2


async def test_a_missing_token_file_routes_the_call_with_its_reason(oauth_portal, tmp_path, monkeypatch):
    """A fault on this machine, not the portal's: the call still gets the fallback with a true reason."""
    monkeypatch.setenv("AGI_BITRIX_CLIENT_SECRET", CLIENT_SECRET)
    config_path = tmp_path / "agi-bitrix.yaml"
    config_path.write_text(textwrap.dedent(f"""\
        bitrix:
          oauth:
            portal_url: "{oauth_portal.url}/rest/"
            client_id: "{CLIENT_ID}"
            token_file: "{tmp_path / 'nowhere' / 'oauth.json'}"
            token_url: "{oauth_portal.url}/oauth/token/"
        routing: {{fallback_queue: support}}
        """))
    app = Application(load_config(config_path))
    host, port = await app.start("127.0.0.1", 0)
    try:
        v = (await fake_call(host, port, callerid="89161234567")).variables
        healthy, _ = app.health()
    finally:
        await app.stop()
    assert (v["B24_STATUS"], v["B24_ERROR"], v["B24_TARGET"]) == ("ERROR", "oauth_token_file", "support")
    assert not healthy and oauth_portal.refreshes == 0


def test_config_takes_a_webhook_or_an_application_not_both():
    from agi_bitrix.checking import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config(textwrap.dedent("""\
            bitrix:
              webhook_url: https://x.bitrix24.ru/rest/1/code/
              oauth:
                portal_url: https://x.bitrix24.ru/api/
                client_id: local.1
                token_file: oauth.json
            routing: {fallback_queue: support}
            """), "c.yaml")
    assert [str(p) for p in raised.value.problems] == [
        "c.yaml:2: bitrix.webhook_url: set either a webhook or bitrix.oauth (an application), not both",
        ("c.yaml:4: bitrix.oauth.client_secret: missing; an OAuth application needs it"
         " (or the environment variable AGI_BITRIX_CLIENT_SECRET)"),
        "c.yaml:4: bitrix.oauth.portal_url: expected a URL like https://PORTAL/rest/",
        "c.yaml:6: bitrix.oauth.token_file: must be an absolute path",
    ]


async def test_the_dry_run_works_as_an_oauth_application(oauth_portal, token_path):
    from agi_bitrix.explain import explain_call

    config = parse_config(textwrap.dedent(f"""\
        bitrix:
          oauth:
            portal_url: "{oauth_portal.url}/rest/"
            client_id: "{CLIENT_ID}"
            client_secret: "{CLIENT_SECRET}"
            token_file: "{token_path}"
            token_url: "{oauth_portal.url}/oauth/token/"
        routing:
          fallback_queue: support
          rules:
        """) + textwrap.indent(TEST_RULES, "    "))
    text = await explain_call(config, "89161234567")
    assert "answer:   FOUND, 2 CRM object(s)" in text and f"portal:   {oauth_portal.url}/rest/" in text
    assert "secret" not in text


@pytest.mark.parametrize("code, reason", [
    ("invalid_scope", "oauth_invalid_scope"),
    ("ошибка", "oauth_error"),  # Unicode letters pass str.isalnum(); not a code we pass on
    ("\uff14\uff12", "oauth_error"),  # full-width digits
    ("A" * 100, "oauth_error"),
    ("bad code\n", "oauth_error"),
])
def test_the_token_servers_code_reaches_the_reason_only_as_a_short_ascii_identifier(token_path, session,
                                                                                    code, reason):
    tokens = OAuthTokens(OAuthSettings("http://127.0.0.1:9/rest/", CLIENT_ID, CLIENT_SECRET, str(token_path),
                                       "http://127.0.0.1:9/oauth/token/"), session)
    assert tokens._refusal(code, 400).reason == reason
