"""OAuth applications: the real client and token holder against the emulator's OAuth server
(agi_bitrix.testing.portal_oauth) over real HTTP. Its REST front checks each access token and hands
the request on to the portal emulator's webhook, so the methods answer exactly as they do for a
webhook."""

import asyncio
import json
import logging
import os
import stat
import textwrap

import aiohttp
import pytest
from yarl import URL

from agi_bitrix.app import Application
from agi_bitrix.bitrix.client import make_session
from agi_bitrix.bitrix.errors import AuthRejected, PortalError, RequestNotSent
from agi_bitrix.bitrix.oauth import EXPIRY_MARGIN, OAuthTokens, TokenFile, Tokens, portal_client, request_tokens
from agi_bitrix.bitrix.settings import OAuthSettings
from agi_bitrix.config import load_config, parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal_oauth import OAuthServer
from tests.conftest import TEST_RULES, oauth_section, until
from tests.network import free_port

SEARCH = "telephony.externalCall.searchCrmEntities"
CLIENT_ID, CLIENT_SECRET = "local.5f1a2b3c4d5e6f.12345678", "client-secret-x9y8z7"
# The rest of a config that routes by the test rules.
WITH_TEST_RULES = "routing:\n  fallback_queue: support\n  rules:\n" + textwrap.indent(TEST_RULES, "    ")


@pytest.fixture
async def emulator(make_portal):
    return await make_portal()


@pytest.fixture
async def oauth_portal(emulator):
    server = await OAuthServer(emulator, client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    yield server
    await server.stop()


@pytest.fixture
def token_path(tmp_path, oauth_portal):
    path = tmp_path / "oauth.json"
    # As an admin sets it up: only the refresh token from the application's installation.
    _, refresh = oauth_portal.issue_tokens()
    path.write_text(json.dumps({"refresh_token": refresh}))
    return path


def settings(oauth_portal, token_path, secret=CLIENT_SECRET):
    return OAuthSettings(f"{oauth_portal.url}/rest/", CLIENT_ID, secret, str(token_path),
                         f"{oauth_portal.url}/oauth/token/")


@pytest.fixture
async def session():
    async with make_session() as http:
        yield http


def application_section(oauth_portal, token_file, secret=CLIENT_SECRET, deadline=None):
    """The `bitrix:` section for the emulator's application; `secret` None leaves it to the environment."""
    return oauth_section(f"{oauth_portal.url}/rest/", CLIENT_ID, token_file, f"{oauth_portal.url}/oauth/token/",
                         secret, deadline)


def client(oauth_portal, token_path, session, **overrides):
    config = parse_config(application_section(oauth_portal, token_path, overrides.get("secret", CLIENT_SECRET),
                                              deadline=2) + "routing: {fallback_queue: support}\n")
    return portal_client(config.bitrix, session)


async def test_first_request_refreshes_saves_the_new_pair_and_uses_the_access_token(oauth_portal, token_path, session):
    portal = client(oauth_portal, token_path, session)
    entities = await portal.search_crm_entities("79161234567")
    assert [e.entity_id for e in entities] == ["12", "7"]
    assert oauth_portal.refreshes == 1 and oauth_portal.seen_auth == ["access-0002-secret"]
    saved = json.loads(token_path.read_text())
    assert (saved["access_token"], saved["refresh_token"]) == ("access-0002-secret", "refresh-0002-secret")
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    # No temporary left; the lock file processes take turns on stays, as private as the tokens.
    assert sorted(p.name for p in token_path.parent.iterdir()) == [token_path.name, f"{token_path.name}.lock"]
    assert stat.S_IMODE(os.stat(f"{token_path}.lock").st_mode) == 0o600


async def test_an_expired_token_is_refreshed_once_and_the_request_retried(oauth_portal, token_path, session):
    portal = client(oauth_portal, token_path, session)
    await portal.search_crm_entities("79161234567")
    oauth_portal.expire_access_tokens()
    entities = await portal.search_crm_entities("79161234567")
    assert entities and oauth_portal.refreshes == 2
    assert oauth_portal.seen_auth == ["access-0002-secret", "access-0002-secret", "access-0003-secret"]
    assert json.loads(token_path.read_text())["refresh_token"] == "refresh-0003-secret"


async def test_concurrent_requests_share_one_refresh(oauth_portal, token_path, session):
    portal = client(oauth_portal, token_path, session)
    await portal.search_crm_entities("79161234567")
    oauth_portal.expire_access_tokens()
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
    config_path.write_text(application_section(oauth_portal, token_path, None) + WITH_TEST_RULES)
    app = Application(load_config(config_path))
    host, port = await app.start("127.0.0.1", 0)
    try:
        first = (await fake_call(host, port, callerid="89161234567")).variables
        oauth_portal.expire_access_tokens()
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
    config_path.write_text(application_section(oauth_portal, tmp_path / "nowhere" / "oauth.json", None)
                           + "routing: {fallback_queue: support}\n")
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

    config = parse_config(application_section(oauth_portal, token_path) + WITH_TEST_RULES)
    text = await explain_call(config, "89161234567")
    assert "answer:   FOUND, 2 CRM object(s)" in text and f"portal:   {oauth_portal.url}/rest/" in text
    assert "secret" not in text


# -- the emulator's OAuth server, as Bitrix24's docs describe it ----------------------------------

def oauth_settings_for(server, token_path, secret=CLIENT_SECRET):
    return OAuthSettings(server.client_endpoint, CLIENT_ID, secret, str(token_path), f"{server.url}/oauth/token/")


async def authorization_code(server, state="s1"):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/oauth/authorize/", params={"client_id": CLIENT_ID, "state": state},
                            allow_redirects=False) as answer:
            assert answer.status == 302, await answer.text()
            location = URL(answer.headers["Location"])
    assert location.query["state"] == state and location.query["member_id"] == server.member_id
    return location.query["code"]


async def test_the_emulator_follows_the_documented_code_and_token_lifetimes(emulator, tmp_path, session):
    clock = [1_700_000_000.0]
    server = await OAuthServer(emulator, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                               redirect_uri="https://app.example/handler", clock=lambda: clock[0]).start()
    settings_ = oauth_settings_for(server, tmp_path / "t.json")
    try:
        # A code works once, within 30 s.
        code = await authorization_code(server)
        tokens = await request_tokens(settings_, session, {"grant_type": "authorization_code", "code": code},
                                      clock=lambda: clock[0])
        assert (tokens.client_endpoint, tokens.member_id, tokens.scope) == (
            server.client_endpoint, server.member_id, "telephony,user")
        assert tokens.expires_at == clock[0] + 3600
        with pytest.raises(AuthRejected) as raised:
            await request_tokens(settings_, session, {"grant_type": "authorization_code", "code": code})
        assert (raised.value.reason, raised.value.detail) == ("oauth_code_rejected", "invalid_grant, HTTP 400")
        late = await authorization_code(server)
        clock[0] += 31
        with pytest.raises(AuthRejected, match="invalid_grant"):
            await request_tokens(settings_, session, {"grant_type": "authorization_code", "code": late})
        # A refresh token is spent by its use and dies after 180 days unused.
        renewed = await request_tokens(settings_, session, {"grant_type": "refresh_token",
                                                            "refresh_token": tokens.refresh_token})
        assert renewed.refresh_token != tokens.refresh_token
        with pytest.raises(AuthRejected) as raised:
            await request_tokens(settings_, session, {"grant_type": "refresh_token",
                                                      "refresh_token": tokens.refresh_token})
        assert raised.value.reason == "refresh_token_rejected"
        clock[0] += 180 * 86400
        with pytest.raises(AuthRejected, match="invalid_grant"):
            await request_tokens(settings_, session, {"grant_type": "refresh_token",
                                                      "refresh_token": renewed.refresh_token})
        # A wrong secret, and an application that was removed, are the client's refusal.
        with pytest.raises(AuthRejected) as raised:
            await request_tokens(oauth_settings_for(server, tmp_path / "t.json", "wrong"), session,
                                 {"grant_type": "refresh_token", "refresh_token": server.refresh_token})
        assert (raised.value.reason, raised.value.detail) == ("oauth_client_rejected", "invalid_client, HTTP 401")
        server.uninstall()
        with pytest.raises(AuthRejected, match="invalid_client"):
            await request_tokens(settings_, session, {"grant_type": "refresh_token",
                                                      "refresh_token": server.refresh_token})
        # Any other documented code, as the token server words it.
        server.refuse_token_requests("PAYMENT_REQUIRED", "Payment required", status=402)
        with pytest.raises(PortalError) as raised:
            await request_tokens(settings_, session, {"grant_type": "refresh_token", "refresh_token": "x"})
        assert raised.value.reason == "oauth_PAYMENT_REQUIRED"
    finally:
        await server.stop()


async def test_an_unknown_application_gets_no_redirect(oauth_portal):
    oauth_portal.redirect_uri = "https://app.example/handler"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{oauth_portal.url}/oauth/authorize/", params={"client_id": "local.other"},
                            allow_redirects=False) as answer:
            assert answer.status == 400 and "Location" not in answer.headers


async def test_the_client_endpoint_is_stored_and_another_host_is_not_followed(oauth_portal, token_path, session,
                                                                            caplog):
    portal = client(oauth_portal, token_path, session)
    await portal.search_crm_entities("79161234567")
    saved = json.loads(token_path.read_text())
    assert (saved["client_endpoint"], saved["member_id"], saved["scope"]) == (
        oauth_portal.client_endpoint, oauth_portal.member_id, "telephony,user")
    assert portal.auth.rest_base() == oauth_portal.client_endpoint and "REST address" not in caplog.text
    # The same emulator under another name: the token server's client_endpoint (127.0.0.1) is
    # another host than the configured portal (localhost), so requests stay on the configured one.
    port = URL(oauth_portal.url).port
    tokens = OAuthTokens(OAuthSettings(f"http://localhost:{port}/rest/", CLIENT_ID, CLIENT_SECRET, str(token_path),
                                       f"{oauth_portal.url}/oauth/token/"), session)
    oauth_portal.expire_access_tokens()
    await tokens.access_token()
    assert tokens.rest_base() == f"http://localhost:{port}/rest/"
    assert (f"the token server names {oauth_portal.client_endpoint} as the portal's REST address, but"
            f" bitrix.oauth.portal_url is http://localhost:{port}/rest/; requests keep going to portal_url"
            ) in caplog.text


async def test_a_rejected_refresh_token_stops_asking_until_the_token_file_changes(oauth_portal, token_path, session,
                                                                                caplog):
    token_path.write_text(json.dumps({"refresh_token": "refresh-stale-secret"}))
    portal = client(oauth_portal, token_path, session)
    with pytest.raises(PortalError) as first:
        await portal.search_crm_entities("79161234567")
    asked = oauth_portal.token_requests
    for _ in range(5):
        with pytest.raises(RequestNotSent) as again:
            await portal.search_crm_entities("79161234567")
        assert again.value.reason == "refresh_token_rejected"
    assert first.value.reason == "refresh_token_rejected" and oauth_portal.token_requests == asked == 1
    assert caplog.text.count("rejected the refresh token") == 1
    healthy, state = portal.auth.state()
    assert not healthy and state["state"] == "refresh_token_rejected"
    assert "not asked again until" in state["detail"]
    # What to do comes with the state, chosen by the error's class (RefreshTokenRejected): log in again.
    assert state["advice"]["run"] == "agi-bitrix oauth login" and str(token_path) in state["advice"]["do"]
    # An admin (or oauth login) writes a good refresh token: the next request uses it.
    _, refresh = oauth_portal.issue_tokens()
    TokenFile(token_path).save(Tokens("", refresh, 0.0))
    assert await portal.search_crm_entities("79161234567")
    assert portal.auth.state()[0] and oauth_portal.refreshes == 1
    assert "advice" not in portal.auth.state()[1]


async def test_a_removed_application_stops_asking_and_a_reload_asks_again(oauth_portal, token_path, session):
    config_text = application_section(oauth_portal, token_path) + "routing: {fallback_queue: support}\n"
    portal = portal_client(parse_config(config_text).bitrix, session)
    oauth_portal.uninstall()
    with pytest.raises(PortalError, match="oauth_client_rejected"):
        await portal.search_crm_entities("79161234567")
    with pytest.raises(RequestNotSent, match="oauth_client_rejected"):
        await portal.search_crm_entities("79161234567")
    assert oauth_portal.token_requests == 1
    # OAuthClientRejected: logging in again cannot help while the client id or secret is wrong.
    advice = portal.auth.state()[1]["advice"]
    assert "bitrix.oauth.client_id" in advice["do"] and "run" not in advice
    reloaded = portal_client(parse_config(textwrap.dedent(config_text)).bitrix, session, previous=portal)
    assert reloaded.auth is portal.auth
    with pytest.raises(PortalError, match="oauth_client_rejected"):
        await reloaded.search_crm_entities("79161234567")
    assert oauth_portal.token_requests == 2


def oauth_config(oauth_portal, token_path, tmp_path, extra_oauth="", metrics="off", extra=""):
    path = tmp_path / "agi-bitrix.yaml"
    path.write_text(textwrap.dedent(f"""\
        metrics: {{listen: {metrics}}}
        bitrix:
          breaker: {{failures: 2, cool_down: 60}}
          oauth:
            portal_url: "{oauth_portal.url}/rest/"
            client_id: "{CLIENT_ID}"
            client_secret: "{CLIENT_SECRET}"
            token_file: "{token_path}"
            token_url: "{oauth_portal.url}/oauth/token/"
        """) + textwrap.indent(textwrap.dedent(extra_oauth), "    ") + textwrap.dedent(f"""\
        {extra}
        routing:
          fallback_queue: support
          rules:
        """) + textwrap.indent(TEST_RULES, "    "))
    return load_config(path)


async def get_health(address):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{address[0]}:{address[1]}/healthz") as answer:
            return answer.status, await answer.json()


async def test_rejected_tokens_show_in_healthz_and_every_call_gets_the_reason(oauth_portal, token_path, tmp_path,
                                                                           caplog):
    token_path.write_text(json.dumps({"refresh_token": "refresh-stale-secret"}))
    app = Application(oauth_config(oauth_portal, token_path, tmp_path, metrics=f'"127.0.0.1:{free_port()}"'))
    host, port = await app.start("127.0.0.1", 0)
    try:
        # More calls than bitrix.breaker.failures: still the true reason, not circuit_open.
        calls = [(await fake_call(host, port, callerid=f"8916123456{n}")).variables for n in range(5)]
        status, health = await get_health(app.http_listener.address)
    finally:
        await app.stop()
    assert {(v["B24_STATUS"], v["B24_ERROR"], v["B24_TARGET"]) for v in calls} == {
        ("ERROR", "refresh_token_rejected", "support")}
    assert oauth_portal.token_requests == 1
    assert status == 503 and health["status"] == "degraded"
    assert health["auth"]["mode"] == "oauth application" and health["auth"]["state"] == "refresh_token_rejected"
    assert health["auth"]["token_file"] == str(token_path) and "secret" not in json.dumps(health)
    assert "secret" not in caplog.text


async def test_healthz_names_the_webhook_mode(portal_webhook_app):
    status, health = await get_health(portal_webhook_app.http_listener.address)
    assert status == 200 and health["auth"] == {"mode": "webhook"}


@pytest.fixture
async def portal_webhook_app(emulator):
    from tests.conftest import make_config

    app = Application(make_config(emulator.webhook_url, metrics=f'"127.0.0.1:{free_port()}"'))
    await app.start("127.0.0.1", 0)
    yield app
    await app.stop()


# -- the install callback -------------------------------------------------------------------------

@pytest.fixture
async def installing(oauth_portal, tmp_path):
    """A running Application with the install callback on, and no tokens yet."""
    token_path = tmp_path / "oauth.json"
    config = oauth_config(oauth_portal, token_path, tmp_path, extra_oauth="install_path: /bitrix/install\n",
                          metrics=f'"127.0.0.1:{free_port()}"')
    app = Application(config)
    address = await app.start("127.0.0.1", 0)
    host, port = app.http_listener.address
    yield app, address, f"http://{host}:{port}/bitrix/install", token_path
    await app.stop()


async def test_the_install_event_stores_the_tokens_and_calls_use_them(installing, oauth_portal, caplog):
    caplog.set_level(logging.INFO)
    _, (host, port), url, token_path = installing
    before = (await fake_call(host, port, callerid="89161234567")).variables
    assert before["B24_ERROR"] == "oauth_token_file"
    status, answer = await oauth_portal.post_install_event(url)
    assert (status, answer) == (200, {"status": "success"})
    saved = json.loads(token_path.read_text())
    assert saved["application_token"] == oauth_portal.application_token
    assert (saved["member_id"], saved["client_endpoint"]) == (oauth_portal.member_id, oauth_portal.client_endpoint)
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    after = (await fake_call(host, port, callerid="89161234567")).variables
    assert (after["B24_STATUS"], after["B24_TARGET"]) == ("FOUND", "101")
    # The install's own access token was checked (app.info) and then used; no refresh was needed.
    assert oauth_portal.seen_auth == [saved["access_token"], saved["access_token"]] and oauth_portal.refreshes == 0
    assert f"application installed on {oauth_portal.domain} (member_id {oauth_portal.member_id}" in caplog.text
    assert "secret" not in caplog.text


async def test_later_install_calls_need_the_stored_application_token(installing, oauth_portal, caplog):
    _, _, url, token_path = installing
    first = oauth_portal.install_event()
    assert (await oauth_portal.post_install_event(url, first))[0] == 200
    stored = token_path.read_text()
    # A reinstall brings a new application_token: refused, since only the stored one proves the portal.
    forged = {**oauth_portal.install_event(), "auth[application_token]": "0" * 32}
    assert await oauth_portal.post_install_event(url, forged) == (403, {"error": "application_token does not match"})
    missing = {key: value for key, value in oauth_portal.install_event().items() if "application_token" not in key}
    assert (await oauth_portal.post_install_event(url, missing))[0] == 403
    assert token_path.read_text() == stored
    assert "application_token does not match the one stored in" in caplog.text
    assert "is missing, unlike the one stored in" in caplog.text
    for value in (forged["auth[application_token]"], first["auth[application_token]"], "secret"):
        assert value not in caplog.text
    # The same token again (the portal repeating itself) is taken.
    again = {**oauth_portal.install_event(), "auth[application_token]": first["auth[application_token]"]}
    assert (await oauth_portal.post_install_event(url, again))[0] == 200
    assert json.loads(token_path.read_text())["refresh_token"] == again["auth[refresh_token]"]


async def test_a_first_install_must_come_from_the_configured_portal_with_tokens_it_accepts(installing, oauth_portal):
    _, _, url, token_path = installing
    elsewhere = {**oauth_portal.install_event(), "auth[client_endpoint]": "https://evil.example/rest/"}
    assert await oauth_portal.post_install_event(url, elsewhere) == (403, {"error": "not the configured portal"})
    planted = {**oauth_portal.install_event(), "auth[access_token]": "access-planted-secret"}
    assert await oauth_portal.post_install_event(url, planted) == (
        403, {"error": "the portal does not accept these tokens"})
    assert not token_path.exists()


async def test_the_install_page_form_is_read_too(installing, oauth_portal):
    """settings/oauth/simple-way.md: AUTH_ID, REFRESH_ID... in the body, DOMAIN in the query."""
    _, _, url, token_path = installing
    access, refresh = oauth_portal.issue_tokens()
    form = {"AUTH_ID": access, "AUTH_EXPIRES": "3600", "REFRESH_ID": refresh, "SERVER_ENDPOINT": "x",
            "member_id": oauth_portal.member_id, "APPLICATION_TOKEN": "ec1b2074a9d3f5c81b6e40d27a95cf38",
            "APPLICATION_SCOPE": "telephony,user", "status": "L", "PLACEMENT": "DEFAULT"}
    query = f"?DOMAIN={oauth_portal.domain}&PROTOCOL=0&LANG=en&APP_SID=dd8cec11"
    assert await oauth_portal.post_install_event(url + query, form) == (200, {"status": "success"})
    saved = json.loads(token_path.read_text())
    assert (saved["refresh_token"], saved["application_token"]) == (refresh, "ec1b2074a9d3f5c81b6e40d27a95cf38")
    assert saved["client_endpoint"] == oauth_portal.client_endpoint


def test_the_install_path_needs_the_monitoring_listener(tmp_path):
    from agi_bitrix.checking import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config(textwrap.dedent(f"""\
            metrics: {{listen: off}}
            bitrix:
              oauth:
                portal_url: https://x.bitrix24.ru/rest/
                client_id: local.1
                client_secret: s
                token_file: {tmp_path}/oauth.json
                install_path: /bitrix/install
            routing: {{fallback_queue: support}}
            """), "c.yaml")
    assert [str(p) for p in raised.value.problems] == [
        "c.yaml:8: bitrix.oauth.install_path: is served on metrics.listen, which is off"]


# -- WRONG_AUTH_TYPE -------------------------------------------------------------------------------

async def test_wrong_auth_type_from_register_and_finish_says_how_to_switch(emulator, tmp_path, caplog):
    from tests.test_callcard import FINISH, REGISTER, Running, callcard_config

    server = await Running(callcard_config(emulator.webhook_url, tmp_path / "outbox.sqlite3")).start()
    try:
        call_id = (await server.register())["B24_CALL_ID"]
        emulator.fail("error", status=401, code="WRONG_AUTH_TYPE", description="Current authorization type is"
                      " denied for this method")
        assert await server.register(linkedid="1.2") == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": "WRONG_AUTH_TYPE"}
        await server.finish(call_id)
        await until(lambda: caplog.text.count("the portal answered WRONG_AUTH_TYPE") >= 2)
        assert await server.app.outbox.count("delivered") == 0  # held: an admin can still switch
    finally:
        await server.stop()
    assert ("Bitrix24 documents telephony.externalcall.register and .finish as working only in the context of an"
            " application, not through an inbound webhook") in caplog.text
    assert 'docs/call-card.md, section "OAuth applications"' in caplog.text
    assert len(emulator.requests_for(REGISTER)) == 2 and emulator.requests_for(FINISH)


@pytest.mark.parametrize("code, reason", [
    ("invalid_scope", "oauth_invalid_scope"),
    ("ошибка", "oauth_error"),  # Unicode letters pass str.isalnum(); not a code we pass on
    ("\uff14\uff12", "oauth_error"),  # full-width digits
    ("A" * 100, "oauth_error"),
    ("bad code\n", "oauth_error"),
])
def test_the_token_servers_code_reaches_the_reason_only_as_a_short_ascii_identifier(code, reason):
    from agi_bitrix.bitrix.oauth import _refusal

    assert _refusal(code, 400, "refresh_token").reason == reason


# -- processes sharing one token file --------------------------------------------------------------

async def run_route(config_path, phone="89161234567"):
    """`agi-bitrix route` as an admin runs it beside a running server."""
    import sys

    from tests.test_cli import ROOT

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", "route", "-c", str(config_path), phone, cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, output.decode(errors="replace")


async def test_route_and_serve_refreshing_one_token_file_take_turns(oauth_portal, token_path, tmp_path):
    """Issue 21 item 6: both find the access token expired; the refresh token works once. The one
    that comes second waits for the first one's refresh and uses the pair it saved."""
    from tests.test_callcard_redis import serve, text_of

    oauth_config(oauth_portal, token_path, tmp_path)
    config_path = tmp_path / "agi-bitrix.yaml"
    config_path.write_text(config_path.read_text().replace("  breaker:", "  deadline: 5\n  breaker:", 1))
    process, port = await serve(config_path, "", tmp_path / "serve.log")
    try:
        first = (await fake_call("127.0.0.1", port, callerid="89161234567")).variables
        assert first["B24_STATUS"] == "FOUND", text_of(tmp_path / "serve.log")
        oauth_portal.expire_access_tokens()
        oauth_portal.refresh_delay = 1.0  # the token server is slow: the two refreshes overlap
        asked = oauth_portal.token_requests
        route = asyncio.create_task(run_route(config_path))
        await until(lambda: oauth_portal.token_requests > asked, timeout=30)  # route is refreshing
        # Numbers not asked before: the answers come from the portal, not from serve's cache.
        during = (await fake_call("127.0.0.1", port, callerid="89163332211")).variables
        returncode, output = await route
        later = [(await fake_call("127.0.0.1", port, callerid=f"8916123456{n}")).variables for n in range(3)]
    finally:
        process.terminate()
        await process.wait()
    log = text_of(tmp_path / "serve.log")
    assert returncode == 0 and "answer:   FOUND" in output, output
    assert (during["B24_STATUS"], during.get("B24_ERROR", "")) == ("FOUND", ""), log
    assert {v["B24_STATUS"] for v in later} == {"NOT_FOUND"} and "rejected the refresh token" not in log
    # One refresh at serve's start, one by route; serve took route's pair instead of a third.
    assert oauth_portal.refreshes == 2 and oauth_portal.token_requests == asked + 1
    saved = json.loads(token_path.read_text())
    assert saved["refresh_token"] == oauth_portal.refresh_token and "secret" not in log


async def test_a_refused_refresh_token_is_not_final_while_the_file_holds_a_newer_one(oauth_portal, token_path,
                                                                                   session, caplog):
    """A writer that does not take the lock (an older version) spends the refresh token and saves the
    next pair while our refresh is on its way: the refusal is not taken as final."""
    tokens = OAuthTokens(settings(oauth_portal, token_path), session)
    await tokens.access_token()
    oauth_portal.expire_access_tokens()
    oauth_portal.refresh_delay = 0.5
    ours = asyncio.create_task(tokens.refresh(rejected=await tokens.access_token()))
    await until(lambda: oauth_portal.token_requests == 2)
    stored = TokenFile(token_path).load()
    oauth_portal.refresh_delay = 0.0  # theirs is answered while ours waits: theirs spends it
    theirs = await request_tokens(settings(oauth_portal, token_path), session,
                                  {"grant_type": "refresh_token", "refresh_token": stored.refresh_token})
    TokenFile(token_path).save(theirs)  # without the lock
    assert await ours == theirs.access_token
    assert tokens.state() == (True, tokens.state()[1]) and tokens.state()[1]["state"] == "ok"
    assert "now holds another one" in caplog.text and "rejected the refresh token" not in caplog.text


def test_the_lock_file_is_never_opened_through_a_link_or_as_a_fifo(tmp_path):
    """Whoever can write the token file's directory must not make a refresh open something else."""
    from agi_bitrix.bitrix.errors import TokenFileError

    token_file = TokenFile(tmp_path / "oauth.json")
    (tmp_path / "elsewhere").write_text("x")
    os.symlink(tmp_path / "elsewhere", token_file.lock_path)

    async def take() -> None:
        async with token_file.locked(wait=0.1):
            pass

    with pytest.raises(TokenFileError, match="cannot open the lock file"):
        asyncio.run(take())
    os.unlink(token_file.lock_path)
    os.mkfifo(token_file.lock_path)
    with pytest.raises(TokenFileError, match="is not a regular file"):
        asyncio.run(take())


@pytest.mark.parametrize("code, grant_type, kind, reason", [
    ("invalid_grant", "refresh_token", "RefreshTokenRejected", "refresh_token_rejected"),
    ("NO_AUTH_FOUND", "refresh_token", "RefreshTokenRejected", "refresh_token_rejected"),
    ("invalid_client", "refresh_token", "OAuthClientRejected", "oauth_client_rejected"),
    ("invalid_grant", "authorization_code", "OAuthCodeRejected", "oauth_code_rejected"),
])
def test_the_token_servers_refusals_are_classes_of_the_tree(code, grant_type, kind, reason):
    """What stops asking the token server is decided by class (TokensRevoked), not by reason strings."""
    from agi_bitrix.bitrix import errors
    from agi_bitrix.bitrix.oauth import _refusal

    refused = _refusal(code, 400, grant_type)
    assert type(refused) is getattr(errors, kind) and refused.reason == reason
    assert isinstance(refused, errors.AuthRejected)
    assert isinstance(refused, errors.TokensRevoked) == (grant_type == "refresh_token")


# -- the install callback after `oauth login`, and forged installs ---------------------------------

def logged_in(oauth_portal, token_path):
    """The token file as `agi-bitrix oauth login` writes it: a pair, and no application_token."""
    import time

    access, refresh = oauth_portal.issue_tokens()
    TokenFile(token_path).save(Tokens(access, refresh, time.time() + 3600, client_endpoint=oauth_portal.client_endpoint,
                                      member_id=oauth_portal.member_id, scope=oauth_portal.scope))
    return token_path.read_text()


async def test_after_oauth_login_no_install_call_replaces_the_tokens_until_the_file_is_removed(
        installing, oauth_portal, caplog):
    """Issue 21 item 7: a token file without application_token is not a first install, whoever's
    token the POST carries (ours, or another application's on the same portal)."""
    _, (host, port), url, token_path = installing
    stored = logged_in(oauth_portal, token_path)
    ours = oauth_portal.install_event()
    theirs = oauth_portal.install_event(client_id="local.0ther0app000.87654321")
    for form in (ours, theirs):
        assert await oauth_portal.post_install_event(url, form) == (
            403, {"error": "tokens are already stored; remove the token file to install again"})
    assert token_path.read_text() == stored and oauth_portal.app_info_requests == 0
    assert "already holds tokens but no application_token" in caplog.text
    assert 'remove that file first: docs/call-card.md, section "Installing again"' in caplog.text
    assert "secret" not in caplog.text and ours["auth[application_token]"] not in caplog.text
    # The documented reinstall: remove the file, install the application again.
    token_path.unlink()
    again = oauth_portal.install_event()
    assert await oauth_portal.post_install_event(url, again) == (200, {"status": "success"})
    assert json.loads(token_path.read_text())["application_token"] == again["auth[application_token]"]
    v = (await fake_call(host, port, callerid="89161234567")).variables
    assert (v["B24_STATUS"], v["B24_TARGET"]) == ("FOUND", "101")


async def test_a_first_install_with_another_applications_tokens_is_refused(installing, oauth_portal, caplog):
    """The portal accepts the other application's token for app.info, but names that application."""
    _, _, url, token_path = installing
    theirs = oauth_portal.install_event(client_id="local.0ther0app000.87654321")
    assert await oauth_portal.post_install_event(url, theirs) == (
        403, {"error": "the tokens belong to another application"})
    assert not token_path.exists() and oauth_portal.app_info_requests == 1
    assert ("its access token is another application's (app.info CODE 'local.0ther0app000.87654321',"
            f" bitrix.oauth.client_id {CLIENT_ID})") in caplog.text
    no_proof = {key: value for key, value in oauth_portal.install_event().items() if "application_token" not in key}
    assert await oauth_portal.post_install_event(url, no_proof) == (400, {"error": "application_token is required"})
    assert not token_path.exists() and oauth_portal.app_info_requests == 1


async def flood(url, form, count=150, seconds=3.0):
    """`count` install POSTs with made-up access tokens, spread over `seconds`; their statuses."""
    async with aiohttp.ClientSession() as http:
        async def forged(n):
            async with http.post(url, data={**form, "auth[access_token]": f"access-forged-{n}"}) as answer:
                return answer.status

        posts = []
        for n in range(count):
            posts.append(asyncio.create_task(forged(n)))
            await asyncio.sleep(seconds / count)
        return await asyncio.gather(*posts)


async def calls_during(app, host, port, count=10, interval=0.3):
    """Calls from a known number while something else runs, each a real lookup (the cache emptied)."""
    answers = []
    for _ in range(count):
        app.lookup.cache.clear()
        answers.append((await fake_call(host, port, callerid="89161234567")).variables)
        await asyncio.sleep(interval)
    return answers


async def test_a_flood_of_forged_installs_leaves_the_calls_their_requests(installing, oauth_portal, caplog):
    """Issue 21 item 8: 150 forged install POSTs in 3 s while calls are routed: every call reaches its
    owner, and the portal is asked app.info at most the install check's own allowance."""
    from agi_bitrix.bitrix.install import VERIFY_BURST

    app, (host, port), url, token_path = installing
    logged_in(oauth_portal, token_path)
    form = oauth_portal.install_event()
    statuses, calls = await asyncio.gather(flood(url, form), calls_during(app, host, port))
    assert {(v["B24_STATUS"], v["B24_TARGET"]) for v in calls} == {("FOUND", "101")}
    assert set(statuses) == {403} and oauth_portal.app_info_requests == 0
    # Each refusal is counted for the alerts, not only logged (the Application wires the counter in).
    assert sum(sample.value for metric in app.metrics.install_refused.collect() for sample in metric.samples
               if sample.name.endswith("_total")) == len(statuses)
    # Before the first install, forged ones are checked with the portal: only as many as the allowance.
    token_path.unlink()
    statuses = await flood(url, form)
    assert oauth_portal.app_info_requests <= VERIFY_BURST and statuses.count(429) >= 150 - VERIFY_BURST
    assert set(statuses) <= {403, 429}
    # One line per kind of refusal (then one a minute with a count), not one per POST.
    assert caplog.text.count("OAuth install callback from") <= 3
    assert caplog.text.count("did not accept the access token") <= VERIFY_BURST


async def test_a_first_install_never_replaces_a_token_file_that_appeared_while_it_was_checked(oauth_portal,
                                                                                          token_path, session):
    """Two first installs checked at once (or oauth login during the check): the later save does not
    overwrite the earlier one; the decision is taken again under the lock."""
    before = token_path.read_text()
    tokens = OAuthTokens(settings(oauth_portal, token_path), session)
    with pytest.raises(FileExistsError):
        await tokens.install(Tokens("access-late-secret", "refresh-late-secret", 1.0), first=True)
    assert token_path.read_text() == before
