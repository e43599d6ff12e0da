"""The user directory (user.get) and what routing does with deactivated owners."""

import json
import logging
import textwrap

import pytest

from agi_bitrix.app import Application
from agi_bitrix.bitrix.errors import PortalError, RequestNotSent
from agi_bitrix.bitrix.users import User, UserDirectory, answering_number, parse_user
from agi_bitrix.config import parse_config
from agi_bitrix.routing.engine import CallInfo, decide
from agi_bitrix.routing.variables import channel_variables
from agi_bitrix.testing.fake_asterisk import fake_call
from tests.conftest import TEST_RULES, ample_budget, until
from tests.test_routing import NOON, POLICY, entity, found

USER_GET = "user.get"
ANDREY = "74991112233"  # COMPANY 12, owner 13 (deactivated), CLOSED, mobile 79268889900


@pytest.mark.parametrize("item, expected", [
    ({"ID": "5", "ACTIVE": True, "UF_PHONE_INNER": "105", "PERSONAL_MOBILE": "+7 (916) 111-01-01"},
     User("5", True, "105", "79161110101")),
    ({"ID": "6", "ACTIVE": False, "UF_PHONE_INNER": 106, "PERSONAL_MOBILE": None}, User("6", False, "106", "")),
    ({"ID": "7", "ACTIVE": "N", "UF_PHONE_INNER": "120&Local/666@evil"}, User("7", False, "", "")),
    ({"ID": "8", "ACTIVE": "Y", "PERSONAL_MOBILE": "8 905 765-43-21\nEXEC x"}, User("8", True, "", "")),
    ({"ID": "", "ACTIVE": True}, None),
    ({"ID": "admin"}, None),
    ("Array", None),
])
def test_user_records_are_read_strictly(item, expected):
    assert parse_user(item, "RU") == expected


@pytest.mark.parametrize("answered_by, number", [
    ("101", "101"), ("101@internal", "101"), ("PJSIP/101-0000001a", "101"), ("SIP/102-00000003", "102"),
    ("Local/79161110101@outbound-00000003;1", "79161110101"), ("79161110101@outbound", "79161110101"),
    ("SIP/trunk/79161110101", "79161110101"), ("PJSIP/trunk-0000001a", ""), ("", ""), ("101&Local/666", ""),
])
def test_answering_number_from_what_the_dialplan_reports(answered_by, number):
    assert answering_number(answered_by) == number


@pytest.fixture
async def directory(portal):
    from agi_bitrix.bitrix.client import PortalClient, make_session

    async with make_session() as session:
        client = PortalClient(portal.webhook_url, session, timeout=1.0, budget=ample_budget())
        users = UserDirectory(lambda: client, refresh=600, default_country="RU")
        yield users
        await users.close()


async def test_directory_knows_who_is_deactivated_and_whose_number_is_whose(directory, portal):
    await directory.load()
    assert directory.inactive_among(["1", "13", "999"]) == {"13"}
    assert directory.by_number("101").user_id == "1"
    assert directory.by_number("8 (916) 111-01-01").user_id == "1"  # Anna's mobile
    assert directory.by_number("113") is None  # Andrey's extension: he can take no call
    assert directory.by_number("555") is None
    # One pass: the plain list holds the deactivated too (api-reference/user/user-get.md).
    assert [r.params.get("FILTER") for r in portal.requests_for(USER_GET)] == [None]


class PagedPortal:
    """user.get as the portal pages it: 50 per page, the offset as `start`."""

    def __init__(self, count, honour_start=True):
        self.users = [{"ID": str(n), "ACTIVE": n % 10 != 0, "UF_PHONE_INNER": str(100 + n)}
                      for n in range(1, count + 1)]
        self.honour_start = honour_start
        self.asked = []

    async def call(self, method, params, max_wait=0.0):
        self.asked.append(params["start"])
        start = params["start"] if self.honour_start else 0
        return self.users[start:start + 50]


async def test_directory_reads_every_page():
    portal = PagedPortal(120)
    directory = UserDirectory(lambda: portal, refresh=600, default_country="RU")
    await directory.load()
    assert portal.asked == [0, 50, 100]
    assert len(directory.inactive_among(str(n) for n in range(1, 121))) == 12
    assert directory.by_number("217").user_id == "117"


async def test_a_portal_that_ignores_start_does_not_page_forever():
    portal = PagedPortal(200, honour_start=False)
    directory = UserDirectory(lambda: portal, refresh=600, default_country="RU")
    await directory.load()
    assert portal.asked == [0, 50]


async def test_user_get_takes_its_slots_from_the_portal_budget(portal):
    from agi_bitrix.bitrix.client import PortalClient, make_session
    from agi_bitrix.bitrix.ratelimit import RateLimiter

    async with make_session() as session:
        # Four slots, two taken by lookups: user.get leaves half the burst to the calls.
        client = PortalClient(portal.webhook_url, session, timeout=1.0, budget=RateLimiter(0.01, 4))
        directory = UserDirectory(lambda: client, refresh=600, default_country="RU")
        await client.take_slot(max_wait=0)
        await directory.load()
        await client.take_slot(max_wait=0)
        with pytest.raises(RequestNotSent) as raised:
            await directory.load()
        await client.take_slot(max_wait=0)  # a lookup still gets the slot user.get left
    assert raised.value.reason == "rate_limited" and directory.loaded_at is not None
    assert len(portal.requests_for(USER_GET)) == 1


async def test_a_failed_refresh_keeps_the_last_snapshot(directory, portal):
    await directory.load()
    portal.fail("error", method=USER_GET, status=503, code="QUERY_LIMIT_EXCEEDED", description="Too many")
    with pytest.raises(PortalError):
        await directory.load()
    assert directory.inactive_among(["13"]) == {"13"} and directory.by_number("101").user_id == "1"


async def test_background_refresh_picks_up_changes_and_explains_a_missing_scope(directory, portal, caplog):
    directory.refresh = 0.05
    portal.fail("error", method=USER_GET, times=1, status=401, code="insufficient_scope",
                description="The request requires higher privileges than provided by the webhook token")
    directory.start()
    await until(lambda: directory.loaded_at is not None, what="the first user.get answer to be read")
    assert "the webhook needs the 'user' scope" in caplog.text
    assert directory.inactive_among(["13"]) == {"13"}
    portal._user_extras["13"]["ACTIVE"] = True  # Andrey is taken back
    loaded = directory.loaded_at
    await until(lambda: directory.loaded_at != loaded, what="a refresh after the first")
    assert directory.inactive_among(["13"]) == frozenset()


# -- routing ----------------------------------------------------------------------------------


def test_a_deactivated_owner_sends_the_call_to_the_fallback_with_the_reason():
    answer = found(entity(entity_type="COMPANY", entity_id=12, user="13", timeman="CLOSED", inner="113",
                          mobile="79268889900"))
    assert decide(CallInfo("74991112233"), answer, POLICY, NOON).target == "79268889900"
    decision = decide(CallInfo("74991112233"), answer, POLICY, NOON, frozenset({"13"}))
    assert (decision.route, decision.target, decision.rule) == ("queue", "support", "fallback")
    assert [step.reason for step in decision.trace] == [
        "COMPANY 12: owner 13 is deactivated", "COMPANY 12: owner 13 is deactivated",
        "COMPANY 12: owner 13 is deactivated",
        "no rule decided (the owner of COMPANY 12 is deactivated); fallback queue"]
    variables = channel_variables(decision)
    # The call card goes to the default user, and nothing dials the former employee.
    assert (variables["B24_USER_ID"], variables["B24_EXTENSION"], variables["B24_MOBILE"],
            variables["B24_ENTITY_TYPE"], variables["B24_ENTITY_ID"]) == ("", "", "", "COMPANY", "12")


def test_with_objects_all_the_next_object_with_an_active_owner_decides():
    policy = parse_config(textwrap.dedent("""\
        bitrix: {webhook_url: "https://x.bitrix24.ru/rest/1/c/"}
        routing:
          fallback_queue: support
          rules:
            - name: any-object
              objects: all
              match: {timeman: [OPENED]}
              route: [extension]
        """)).policy
    answer = found(entity(user="13", inner="113"), entity(entity_id=2, user="1", inner="101"))
    decision = decide(CallInfo("79161234567"), answer, policy, NOON, frozenset({"13"}))
    assert (decision.target, decision.rule, decision.entity.owner.user_id) == ("101", "any-object", "1")


def test_a_rule_that_ignores_the_crm_still_never_names_a_deactivated_owner():
    policy = parse_config(textwrap.dedent("""\
        bitrix: {webhook_url: "https://x.bitrix24.ru/rest/1/c/"}
        routing:
          fallback_queue: support
          rules:
            - {name: sales-did, match: {did: ["74951112233"]}, route: {queue: sales}}
        """)).policy
    decision = decide(CallInfo("79161234567", "74951112233"), found(entity(user="13")), policy, NOON, frozenset({"13"}))
    assert (decision.target, decision.rule) == ("sales", "sales-did")
    assert channel_variables(decision)["B24_USER_ID"] == ""


def app_config(webhook_url, users):
    text = textwrap.dedent(f"""\
        bitrix: {{webhook_url: "{webhook_url}"}}
        {users}
        routing:
          fallback_queue: support
          rules:
        """) + textwrap.indent(TEST_RULES, "    ")
    return parse_config(text)


@pytest.mark.parametrize("users, scopes, expected", [
    # No users section: on, since the webhook has the user scope (the portal's `scope` says so).
    ("", ["crm", "telephony", "user"], ("queue", "support", "fallback", "")),
    ("users: {refresh: 600}", ["crm", "telephony", "user"], ("queue", "support", "fallback", "")),
    # Without the scope nothing can tell a fired owner: the default cannot be safe (healthz says why).
    ("", ["telephony"], ("mobile", "79268889900", "owner-day-over", "13")),
    ("users: {refresh: 0}", ["crm", "telephony", "user"], ("mobile", "79268889900", "owner-day-over", "13")),
])
async def test_the_server_skips_deactivated_owners_by_default_when_the_auth_has_the_user_scope(
        portal, users, scopes, expected, caplog):
    caplog.set_level(logging.INFO)
    portal.scopes = scopes
    app = Application(app_config(portal.webhook_url, users))
    host, port = await app.start("127.0.0.1", 0)
    try:
        if app.users is not None:
            await app.users.refresh_once()
        v = (await fake_call(host, port, callerid="8" + ANDREY[1:], uniqueid="7.1")).variables
        health = app.health()[1]["users"]
    finally:
        await app.stop()
    assert (v["B24_ROUTE"], v["B24_TARGET"], v["B24_RULE"], v["B24_USER_ID"]) == expected
    skipped = expected[0] == "queue"
    assert ("call 7.1: deactivated owner(s) 13 skipped" in caplog.text) == skipped
    assert health["deactivated_owners"] == ("skipped" if skipped else "not skipped")
    # The portal is asked for its scopes only when no users section decides.
    assert bool(portal.requests_for("scope")) == (users == "")
    assert bool(portal.requests_for(USER_GET)) == skipped


async def test_when_the_scope_cannot_be_known_healthz_and_the_log_say_so_and_it_is_asked_again(
        portal, caplog):
    portal.fail("html", method="scope", status=502, times=1)
    app = Application(app_config(portal.webhook_url, ""))
    await app.start("127.0.0.1", 0)
    try:
        wait = await app.users.refresh_once()
        unknown = app.health()[1]["users"]
        await app.users.refresh_once()
        known = app.health()[1]["users"]
    finally:
        await app.stop()
    assert wait == 30.0  # RETRY_AFTER_FAILURE, not the 600 s refresh
    assert unknown == {"deactivated_owners": "unknown", "why": "the portal's scope method failed: http_502",
                       "users": 0, "loaded": False}
    assert "deactivated owners unknown (the portal's scope method failed: http_502)" in caplog.text
    assert known["deactivated_owners"] == "skipped" and known["users"] == 14


async def test_an_oauth_token_files_scope_decides_without_asking_the_portal(tmp_path):
    from agi_bitrix.bitrix.client import PortalClient, make_session
    from agi_bitrix.bitrix.oauth import OAuthTokens, TokenFile, Tokens
    from agi_bitrix.bitrix.settings import OAuthSettings

    token_path = tmp_path / "oauth.json"
    async with make_session() as session:
        auth = OAuthTokens(OAuthSettings("http://127.0.0.1:9/rest/", "local.1", "secret", str(token_path),
                                         "http://127.0.0.1:9/oauth/token/"), session)
        client = PortalClient("http://127.0.0.1:9/rest/", session, timeout=0.5, budget=ample_budget(), auth=auth)
        directory = UserDirectory(lambda: client, refresh=600, default_country="RU", automatic=True)
        answers = []
        for scope in ("telephony,crm", "telephony,user"):
            TokenFile(token_path).save(Tokens("a", "r", 9e9, scope=scope))
            answers.append(await directory.user_scope())
    assert answers == [False, True]  # and no request: the portal at 127.0.0.1:9 answers nothing


async def test_the_dry_run_explains_a_skipped_owner_like_the_server_decides(portal):
    from agi_bitrix.explain import explain_call

    config = app_config(portal.webhook_url, "users: {refresh: 600}")
    text = await explain_call(config, "8" + ANDREY[1:])
    assert "COMPANY 12: owner 13 is deactivated" in text
    assert "=> fallback: no rule decided (the owner of COMPANY 12 is deactivated); fallback queue" in text
    portal.fail("error", method=USER_GET, status=401, code="insufficient_scope", description="no")
    text = await explain_call(config, "8" + ANDREY[1:])
    assert "users:    not loaded (insufficient_scope); deactivated owners were not skipped" in text


def test_check_says_whether_deactivated_owners_will_be_skipped(tmp_path):
    from tests.test_cli import agi_bitrix

    def check(users="", oauth_scope=None):
        auth = 'webhook_url: "https://portal.example/rest/1/code/"'
        if oauth_scope is not None:
            token_file = tmp_path / "oauth.json"
            token_file.write_text(json.dumps({"access_token": "a", "refresh_token": "r", "expires_at": 1.0,
                                              "scope": oauth_scope}))
            auth = (f"oauth: {{portal_url: 'https://portal.example/rest/', client_id: local.1,"
                    f" client_secret: s, token_file: '{token_file}'}}")
        config = tmp_path / "agi-bitrix.yaml"
        config.write_text(f"bitrix: {{{auth}}}\nrouting: {{fallback_queue: support}}\n{users}\n")
        result = agi_bitrix("check", "-c", str(config))
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    assert "skipped only if the credentials carry the user scope, which cannot be known here" in check()
    assert "deactivated owners: skipped (users section)" in check("users: {refresh: 600}")
    assert "deactivated owners: NOT skipped (users.refresh is 0)" in check("users: {refresh: 0}")
    assert "deactivated owners: skipped (the token file's scopes include user)" in check(oauth_scope="telephony,user")
    assert "deactivated owners are NOT skipped: the token file's scopes lack user" in check(oauth_scope="telephony")
