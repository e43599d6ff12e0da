"""The portal client against the real emulator over TCP: every failure has its reason."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import pytest_asyncio

from agi_bitrix.bitrix.client import (
    MAX_BODY_BYTES,
    PortalClient,
    make_session,
    redact,
)
from agi_bitrix.bitrix.errors import OperatingTimeExceeded, PortalError, RequestNotSent
from agi_bitrix.bitrix.models import CrmEntity, Owner
from agi_bitrix.bitrix.operating import OperatingBudget
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM, SAMPLE_USERS
from tests.conftest import ample_budget
from tests.network import free_port as closed_port

SECRET = "s3cr3t-webhook-code"
ANNA = "79161234567"
TIMEOUT = 0.2


@pytest.fixture
async def portal(make_portal):
    return await make_portal(code=SECRET)


@pytest_asyncio.fixture
async def session():
    async with make_session() as http:
        yield http


@pytest.fixture
def client(portal, session):
    return PortalClient(portal.webhook_url, session, timeout=TIMEOUT, budget=ample_budget())


async def failure(coroutine) -> PortalError:
    with pytest.raises(PortalError) as caught:
        await coroutine
    error = caught.value
    assert SECRET not in error.detail and SECRET not in str(error) and SECRET not in repr(error)
    return error


# -- answers ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_search_returns_entities_in_portal_order(client):
    entities = await client.search_crm_entities("79201112233")
    assert [(entity.entity_type, entity.entity_id, entity.owner.user_id) for entity in entities] == [
        ("LEAD", "95", "8"),
        ("CONTACT", "44", "1"),
    ]
    assert entities[0] == CrmEntity(
        "LEAD", "95", Owner("8", "OPENED", "108", "", "", "79208880808")
    )


@pytest.mark.asyncio
async def test_search_posts_the_number_exactly_as_given(client, portal):
    assert len(await client.search_crm_entities("+7 (916) 123-45-67")) == 2
    [request] = portal.requests_for("telephony.externalCall.searchCrmEntities")
    assert request.http_method == "POST"
    assert request.params == {"PHONE_NUMBER": "+7 (916) 123-45-67"}


@pytest.mark.asyncio
async def test_unknown_number_is_an_empty_list(client):
    assert await client.search_crm_entities("79990001122") == []


@pytest.mark.asyncio
async def test_webhook_url_works_with_or_without_trailing_slash(portal, session):
    bare = PortalClient(portal.webhook_url.rstrip("/"), session, timeout=TIMEOUT, budget=ample_budget())
    assert len(await bare.search_crm_entities(ANNA)) == 2


@pytest.mark.asyncio
async def test_call_form_encodes_nested_values_and_booleans_as_php_reads_them(client, portal):
    [user] = await client.call("user.get", {"FILTER": {"ID": 13, "ACTIVE": False}})
    assert user["LAST_NAME"] == "Михайлов"
    assert portal.requests[-1].params == {"FILTER": {"ID": "13", "ACTIVE": "0"}}
    result = await client.call(
        "telephony.externalcall.register",
        {"USER_ID": 1, "PHONE_NUMBER": "79990001122", "TYPE": 2, "CRM_CREATE": True, "LINE_NUMBER": None},
    )
    assert result["CRM_CREATED_LEAD"]
    assert portal.requests[-1].params["CRM_CREATE"] == "1"
    assert portal.requests[-1].params["LINE_NUMBER"] == ""


@pytest.mark.asyncio
async def test_lookups_go_as_json_bodies(client, portal):
    # JSON keeps types (a form would have turned halt=0 into "0") and is the cheap encoding.
    await client.search_numbers([ANNA, "79990001122"])
    assert portal.requests[-1].params["halt"] == 0
    assert portal.requests[-1].params["cmd"]["n0"] == f"telephony.externalCall.searchCrmEntities?PHONE_NUMBER={ANNA}"
    await client.search_crm_entities(ANNA)
    assert portal.requests[-1].params == {"PHONE_NUMBER": ANNA}


# -- transport failures -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_slow_portal_is_a_timeout_within_the_deadline(client, portal):
    portal.fail("slow", delay=1.0)
    started = time.monotonic()
    error = await failure(client.search_crm_entities(ANNA))
    assert error.reason == "timeout"
    assert time.monotonic() - started < TIMEOUT + 0.2


@pytest.mark.asyncio
async def test_hung_portal_is_a_timeout(client, portal):
    portal.fail("hang")
    error = await failure(client.search_crm_entities(ANNA))
    assert error.reason == "timeout"
    assert "0.2 s" in error.detail


@pytest.mark.asyncio
async def test_timeout_then_recovery_on_the_same_session(client, portal):
    portal.fail("hang", times=1)
    assert (await failure(client.search_crm_entities(ANNA))).reason == "timeout"
    assert len(await client.search_crm_entities(ANNA)) == 2


@pytest.mark.asyncio
async def test_refused_connection_is_connect(session):
    client = PortalClient(f"http://127.0.0.1:{closed_port()}/rest/1/{SECRET}/", session, timeout=TIMEOUT,
                          budget=ample_budget())
    error = await failure(client.search_crm_entities(ANNA))
    assert error.reason == "connect"
    assert "ClientConnectorError" in error.detail


@pytest.mark.asyncio
@pytest.mark.parametrize("reset", [False, True])
async def test_dropped_or_reset_connection_is_connect(client, portal, reset):
    portal.fail("disconnect", reset=reset)
    assert (await failure(client.search_crm_entities(ANNA))).reason == "connect"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "answer, reason",
    [
        # The webhook URL pointing at some other service.
        (b"SSH-2.0-OpenSSH_9.2\r\n", "bad_http"),
        # Redirects are not followed: aiohttp would resend the POST as a GET without parameters.
        (b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://elsewhere/\r\nContent-Length: 0\r\n\r\n",
         "http_301"),
    ],
)
async def test_peer_that_is_not_the_portal(session, answer, reason):
    async def answer_and_close(reader, writer):
        await reader.read(65536)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_and_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = PortalClient(f"http://127.0.0.1:{port}/rest/1/{SECRET}/", session, timeout=TIMEOUT,
                              budget=ample_budget())
        assert (await failure(client.search_crm_entities(ANNA))).reason == reason
    finally:
        server.close()
        await server.wait_closed()


# -- error bodies --------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "status, code, reason",
    [
        (503, "QUERY_LIMIT_EXCEEDED", "QUERY_LIMIT_EXCEEDED"),
        (401, "expired_token", "expired_token"),
        (200, "OPERATION_TIME_LIMIT", "OPERATION_TIME_LIMIT"),
        (400, "", "http_400"),
        (500, None, "http_500"),
        (200, "", "portal_error"),
        # Codes that are not identifiers are not trusted as reasons (they reach channel variables).
        (500, "EXEC Dial\nSIP/x", "http_500"),
        (403, 42, "http_403"),
    ],
)
async def test_error_body_maps_to_portal_code_or_status(client, portal, status, code, reason):
    portal.fail("error", status=status, code=code, description="line one\nline two")
    error = await failure(client.search_crm_entities(ANNA))
    assert error.reason == reason
    assert f"HTTP {status}" in error.detail
    assert "\n" not in error.detail and "line one line two" in error.detail


@pytest.mark.asyncio
async def test_portal_own_errors_come_through(client, portal, session):
    assert (await failure(client.search_crm_entities(""))).reason == "ERROR_CORE"
    assert (await failure(client.call("crm.nothing.here", {}))).reason == "ERROR_METHOD_NOT_FOUND"
    intruder = PortalClient(portal.webhook_url.replace(SECRET, "guessed-code"), session, timeout=TIMEOUT,
                            budget=ample_budget())
    assert (await failure(intruder.search_crm_entities(ANNA))).reason == "INVALID_CREDENTIALS"


@pytest.mark.asyncio
async def test_rate_limited_portal_is_query_limit_exceeded(session):
    async with PortalEmulator(SAMPLE_CRM, code=SECRET, rate_limit=(2.0, 2)) as emulator:
        client = PortalClient(emulator.webhook_url, session, timeout=TIMEOUT, budget=ample_budget())
        await client.search_crm_entities(ANNA)
        await client.search_crm_entities(ANNA)
        assert (await failure(client.search_crm_entities(ANNA))).reason == "QUERY_LIMIT_EXCEEDED"


@pytest.mark.asyncio
async def test_proxy_html_page_is_http_status(client, portal):
    portal.fail("html", status=502)
    error = await failure(client.search_crm_entities(ANNA))
    assert error.reason == "http_502"
    assert "502 Bad Gateway" in error.detail


@pytest.mark.asyncio
async def test_html_with_status_200_is_bad_json(client, portal):
    portal.fail("html", status=200)
    assert (await failure(client.search_crm_entities(ANNA))).reason == "bad_json"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        b'{"result":[{"CRM_ENTITY_TYPE":"CONTA',  # cut short
        b"",
        b"\xff\xfe not utf-8",
        b"[" * 100_000,  # nesting deep enough to exhaust the parser's recursion
        b'{"result": ' + b"9" * 5000 + b"}",  # an integer longer than Python will convert
    ],
)
async def test_broken_json_is_bad_json(client, portal, body):
    portal.fail("bad_json", body=body)
    assert (await failure(client.search_crm_entities(ANNA))).reason == "bad_json"


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [b'{"time": {}}', b"[1, 2]", b'"result"'])
async def test_200_json_without_result_is_bad_result(client, portal, body):
    portal.fail("bad_json", body=body)
    assert (await failure(client.search_crm_entities(ANNA))).reason == "bad_result"


@pytest.mark.asyncio
@pytest.mark.parametrize("result", ["Array", [1, "two"], [{"CRM_ENTITY_TYPE": "CONTACT"}], {"0": {}}])
async def test_malformed_result_is_bad_result(client, portal, result):
    portal.fail("malformed", result=result)
    assert (await failure(client.search_crm_entities(ANNA))).reason == "bad_result"


@pytest.mark.asyncio
async def test_oversized_body_is_too_large(client, portal):
    portal.fail("malformed", result="x" * (MAX_BODY_BYTES + 1))
    error = await failure(client.search_crm_entities(ANNA))
    assert error.reason == "too_large"


# -- secrets --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_webhook_code_echoed_by_the_portal_is_redacted(client, portal):
    portal.fail("error", status=400, code="INVALID_REQUEST", description=f"bad call to {portal.webhook_url}")
    error = await failure(client.search_crm_entities(ANNA))
    assert "/rest/1/***/" in error.detail


@pytest.mark.asyncio
async def test_webhook_code_in_a_non_json_page_is_redacted(client, portal):
    portal.fail("bad_json", body=f"<p>Request {portal.webhook_url} failed</p>".encode())
    error = await failure(client.search_crm_entities(ANNA))
    assert "/rest/1/***/ failed" in error.detail


@pytest.mark.asyncio
@pytest.mark.parametrize("padding", range(150, 165, 3))
async def test_code_cut_by_the_excerpt_does_not_leak_in_part(client, portal, padding):
    portal.fail("bad_json", times=1, body=b"x" * padding + SECRET.encode())
    portal.fail("error", times=1, code="", description="y" * padding + SECRET)
    for _ in range(2):
        error = await failure(client.search_crm_entities(ANNA))
        assert SECRET[:6] not in error.detail


@pytest.mark.asyncio
async def test_failure_tracebacks_do_not_chain_library_errors(client, portal):
    portal.fail("disconnect")
    error = await failure(client.search_crm_entities(ANNA))
    assert error.__cause__ is None and error.__suppress_context__


def test_redacted_url_hides_the_code(session_free_client):
    assert session_free_client.redacted_url == "https://x.bitrix24.ru/rest/1/***/"
    assert SECRET not in session_free_client.redacted_url


@pytest.fixture
def session_free_client():
    # The client only touches the session when it sends, so a stand-in object is enough here.
    return PortalClient(f"https://x.bitrix24.ru/rest/1/{SECRET}", object(), timeout=1, budget=ample_budget())


@pytest.mark.parametrize(
    "url, redacted",
    [
        ("https://x.bitrix24.ru/rest/1/abc123/", "https://x.bitrix24.ru/rest/1/***/"),
        ("https://x.bitrix24.ru/rest/1/abc123", "https://x.bitrix24.ru/rest/1/***"),
        (
            "https://x.bitrix24.ru/rest/1/abc123/telephony.externalCall.searchCrmEntities.json",
            "https://x.bitrix24.ru/rest/1/***/telephony.externalCall.searchCrmEntities.json",
        ),
        (
            "https://x.bitrix24.ru/rest/user.get?auth=tok3n&ID=1",
            "https://x.bitrix24.ru/rest/user.get?auth=***&ID=1",
        ),
        (
            ("https://oauth.bitrix.info/oauth/token/?grant_type=refresh_token&client_id=app"
             "&client_secret=cs&refresh_token=rt"),
            ("https://oauth.bitrix.info/oauth/token/?grant_type=refresh_token&client_id=app"
             "&client_secret=***&refresh_token=***"),
        ),
        ("https://user:pa55@proxy.example/rest/", "https://user:***@proxy.example/rest/"),
        ("https://x.bitrix24.ru/", "https://x.bitrix24.ru/"),
    ],
)
def test_redact(url, redacted):
    assert redact(url) == redacted


# -- construction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"x.bitrix24.ru/rest/1/{SECRET}/",
        f"ftp://x.bitrix24.ru/rest/1/{SECRET}/",
        f"https://x.bitrix24.ru/rest/1/{SECRET}/profile.json",
        f"https://x.bitrix24.ru/rest/1/{SECRET}/?debug=1",
        "https://x.bitrix24.ru/rest/1/",
        f"https://x.bitrix24.ru/{SECRET}/",
    ],
)
def test_bad_webhook_url_is_refused_without_echoing_it(url):
    with pytest.raises(ValueError, match=r"webhook URL: expected an http\(s\) URL like https://PORTAL/rest/") as caught:
        PortalClient(url, object(), timeout=1, budget=ample_budget())
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "2"])
def test_timeout_must_be_a_positive_number(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        PortalClient(f"https://x.bitrix24.ru/rest/1/{SECRET}/", object(), timeout=timeout, budget=ample_budget())


@pytest.mark.asyncio
async def test_make_session_pools_and_identifies_itself():
    async with make_session(pool_size=3) as http:
        assert isinstance(http.connector, aiohttp.TCPConnector)
        assert http.connector.limit == 3
        assert http.headers["User-Agent"].startswith("agi-bitrix/")


@pytest.mark.asyncio
async def test_concurrent_lookups_share_the_pool(portal):
    async with make_session(pool_size=2) as http:
        client = PortalClient(portal.webhook_url, http, timeout=1.0, budget=ample_budget())
        results = await asyncio.gather(*(client.search_crm_entities(ANNA) for _ in range(20)))
    assert all(len(entities) == 2 for entities in results)


async def test_batch_search_answers_every_number_in_one_request(client, portal):
    portal.fail("error", status=400, code="ERROR_CORE", description="PHONE_NUMBER is empty", phone="79990000000")
    outcome = (await client.search_numbers(["79161234567", "79990000000", "79990001122"])).outcome
    assert len(portal.requests) == 1 and portal.requests[0].method == "batch"
    assert [e.entity_type for e in outcome["79161234567"]] == ["CONTACT", "COMPANY"]
    assert isinstance(outcome["79990000000"], PortalError) and outcome["79990000000"].reason == "ERROR_CORE"
    assert outcome["79990001122"] == []
    assert "emulator-secret" not in str(outcome["79990000000"])


async def test_batch_without_errors_and_a_broken_batch_answer(client, portal):
    outcome = (await client.search_numbers(["79161234567", "79262345678"])).outcome
    assert all(isinstance(v, list) and v for v in outcome.values())
    portal.fail("malformed", result={"result": "nope", "result_error": []})
    error = await failure(client.search_numbers(["79161234567", "79262345678"]))
    assert error.reason == "bad_result"


# -- the operating-time budget per method (limits.md) -----------------------------------------


async def test_operation_time_limit_holds_only_that_method(session):
    async with PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS, code=SECRET, search_time=0.05,
                              operating_limit=(0.01, 60.0)) as portal:
        client = PortalClient(portal.webhook_url, session, timeout=1.0, budget=ample_budget())
        await client.search_crm_entities(ANNA)  # passes the limit: the next one is blocked
        error = await failure(client.search_crm_entities(ANNA))
        assert isinstance(error, OperatingTimeExceeded)
        assert client.operating.held_for("telephony.externalcall.searchcrmentities") > 30
        # Not asked again while held; other methods go on (QUERY_LIMIT_EXCEEDED would stop all).
        with pytest.raises(RequestNotSent) as held:
            await client.search_crm_entities(ANNA)
        assert held.value.reason == "operating_limit" and portal.refusals["OPERATION_TIME_LIMIT"] == 1
        assert await client.call("user.get", {"ID": "1"})


async def test_the_portal_reporting_its_budget_nearly_spent_holds_the_method(session):
    async with PortalEmulator(SAMPLE_CRM, code=SECRET, search_time=0.02, operating_limit=(100.0, 600.0)) as portal:
        client = PortalClient(portal.webhook_url, session, timeout=1.0, budget=ample_budget(),
                              operating=OperatingBudget(limit=0.021, window=600.0))
        await client.search_crm_entities(ANNA)  # the answer says 0.02 s of 0.021 spent
        with pytest.raises(RequestNotSent) as held:
            await client.search_crm_entities(ANNA)
    assert held.value.reason == "operating_limit" and len(portal.requests) == 1


async def test_a_large_body_is_encoded_off_the_event_loop(client, portal, monkeypatch):
    """A recording's megabytes of base64 would hold every call on the loop while json.dumps runs."""
    import threading

    from agi_bitrix.bitrix import client as client_module

    encoded_in = []
    real_encode = client_module._encode

    def recording_encode(params, json_body):
        encoded_in.append(threading.current_thread() is threading.main_thread())
        return real_encode(params, json_body)

    monkeypatch.setattr(client_module, "_encode", recording_encode)
    await client.call("user.get", {"FILTER": {"ID": 1}}, json_body=True, large_body=True)
    await client.call("user.get", {"FILTER": {"ID": 1}}, json_body=True)
    assert encoded_in == [False, True]
