"""The emulator answers like the portal, checked over real HTTP with a plain aiohttp session."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.portal_model import normalise_phone
from agi_bitrix.testing.sample_data import SAMPLE_CALLS, SAMPLE_CRM, SAMPLE_USERS

SEARCH = "telephony.externalCall.searchCrmEntities"
ANNA = "79161234567"


@pytest_asyncio.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http, url, **kwargs):
    async with http.post(url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def search(http, portal, phone):
    return await post(http, f"{portal.webhook_url}{SEARCH}.json", data={"PHONE_NUMBER": phone})


# -- shape of answers ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_success_body_has_portal_types(http, portal):
    status, body = await search(http, portal, ANNA)
    assert status == 200
    assert set(body) == {"result", "time"}
    assert {"start", "finish", "duration", "date_start", "date_finish"} <= set(body["time"])
    first = body["result"][0]
    assert first["CRM_ENTITY_TYPE"] == "CONTACT"
    assert first["CRM_ENTITY_ID"] == 12 and first["ASSIGNED_BY_ID"] == 1
    assert first["ASSIGNED_BY"]["ID"] == "1"
    assert [entity["CRM_ENTITY_TYPE"] for entity in body["result"]] == ["CONTACT", "COMPANY"]


@pytest.mark.asyncio
async def test_sample_phones_are_null_empty_or_hand_typed(http, portal):
    owners = {}
    for phone in ("74957654321", "79651239876", "79035550000"):
        _, body = await search(http, portal, phone)
        owner = body["result"][0]["ASSIGNED_BY"]
        owners[owner["ID"]] = owner
    assert owners["3"]["PERSONAL_MOBILE"] == "+7 (903) 555-12-34"
    assert owners["9"]["USER_PHONE_INNER"] is None and owners["9"]["PERSONAL_MOBILE"] is None
    assert "\nEXEC Dial" in owners["11"]["PERSONAL_MOBILE"]


@pytest.mark.asyncio
async def test_not_found_is_an_empty_list(http, portal):
    status, body = await search(http, portal, "79990001122")
    assert status == 200 and body["result"] == []


@pytest.mark.asyncio
@pytest.mark.parametrize("path", [SEARCH + ".json", SEARCH, SEARCH.upper(), SEARCH.lower() + ".JSON"])
async def test_method_name_is_case_insensitive_and_json_suffix_optional(http, portal, path):
    status, body = await post(http, portal.webhook_url + path, data={"PHONE_NUMBER": ANNA})
    assert status == 200 and len(body["result"]) == 2
    assert portal.requests[-1].method == "telephony.externalcall.searchcrmentities"


@pytest.mark.asyncio
async def test_get_query_form_and_json_body_are_all_read(http, portal):
    url = f"{portal.webhook_url}{SEARCH}.json"
    async with http.get(url, params={"PHONE_NUMBER": ANNA}) as response:
        assert len((await response.json())["result"]) == 2
    assert len((await post(http, url, data={"PHONE_NUMBER": ANNA}))[1]["result"]) == 2
    assert len((await post(http, url, json={"PHONE_NUMBER": int(ANNA)}))[1]["result"]) == 2
    assert [request.http_method for request in portal.requests_for(SEARCH)] == ["GET", "POST", "POST"]


@pytest.mark.asyncio
async def test_php_style_form_keys_become_nested_params(http, portal):
    status, body = await post(http, f"{portal.webhook_url}user.get", data={"FILTER[ID]": "13"})
    assert status == 200 and body["total"] == 1
    assert portal.requests[-1].params == {"FILTER": {"ID": "13"}}


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("credentials", ["2/emulator-secret", "1/wrong-secret"])
async def test_wrong_webhook_user_or_code_is_401(http, portal, credentials):
    base = portal.webhook_url.replace("1/emulator-secret", credentials)
    status, body = await post(http, f"{base}{SEARCH}.json", data={"PHONE_NUMBER": ANNA})
    assert status == 401
    assert body["error"] == "INVALID_CREDENTIALS" and body["error_description"]


@pytest.mark.asyncio
async def test_unknown_method_is_404(http, portal):
    status, body = await post(http, f"{portal.webhook_url}crm.lead.fly.json", data={})
    assert (status, body["error"]) == (404, "ERROR_METHOD_NOT_FOUND")


@pytest.mark.asyncio
@pytest.mark.parametrize("data", [{}, {"PHONE_NUMBER": ""}, {"PHONE_NUMBER": "0"}])
async def test_empty_phone_number_is_error_core(http, portal, data):
    status, body = await post(http, f"{portal.webhook_url}{SEARCH}.json", data=data)
    assert status == 400
    assert body == {"error": "ERROR_CORE", "error_description": "PHONE_NUMBER is empty"}


@pytest.mark.asyncio
async def test_json_body_that_is_not_json_is_refused(http, portal):
    status, body = await post(
        http, f"{portal.webhook_url}{SEARCH}.json", data=b"{oops",
        headers={"Content-Type": "application/json"},
    )
    assert (status, body["error"]) == (400, "INVALID_REQUEST")


# -- number matching --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, digits",
    [("89161234567", "79161234567"), ("+7 (916) 123-45-67", "79161234567"), ("9161234567", "9161234567"),
     ("8 800", "8800"), (None, "")],
)
def test_normalise_phone_like_the_portal(raw, digits):
    assert normalise_phone(raw) == digits


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "phone, found", [("89161234567", True), ("+7 (916) 123-45-67", True), ("9161234567", False)]
)
async def test_search_matches_through_the_normaliser(http, portal, phone, found):
    _, body = await search(http, portal, phone)
    assert bool(body["result"]) is found


@pytest.mark.asyncio
async def test_set_client_answers_raw_objects_as_given(http, portal):
    raw = [{"CRM_ENTITY_TYPE": "LEAD", "CRM_ENTITY_ID": "5", "ASSIGNED_BY_ID": None, "ASSIGNED_BY": []}]
    portal.set_client("8 (999) 000-11-22", raw)
    assert (await search(http, portal, "79990001122"))[1]["result"] == raw


@pytest.mark.asyncio
async def test_requests_are_recorded(http, portal):
    before = time.monotonic()
    await search(http, portal, "+7 916 123")
    [recorded] = portal.requests_for("TELEPHONY.externalCall.searchCrmEntities.json")
    assert recorded.method == "telephony.externalcall.searchcrmentities"
    assert recorded.params == {"PHONE_NUMBER": "+7 916 123"}
    assert before <= recorded.at <= time.monotonic()


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fault_for_one_number_and_limited_times(http, portal):
    portal.fail("error", phone="89161234567", times=1, status=503, code="QUERY_LIMIT_EXCEEDED",
                description="Too many requests")
    assert (await search(http, portal, "79262345678"))[0] == 200
    assert await search(http, portal, ANNA) == (
        503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"})
    assert (await search(http, portal, ANNA))[0] == 200


@pytest.mark.asyncio
async def test_faults_apply_in_order_and_can_target_a_method(http, portal):
    portal.fail("error", method="user.get", code="ACCESS_DENIED", status=403)
    portal.fail("error", times=1, code="", status=400, description="first")
    portal.fail("error", code="", status=500, description="second")
    assert (await search(http, portal, ANNA))[1]["error_description"] == "first"
    assert (await search(http, portal, ANNA))[1]["error_description"] == "second"
    assert (await post(http, f"{portal.webhook_url}user.get", data={}))[1]["error"] == "ACCESS_DENIED"
    portal.reset_faults()
    assert (await search(http, portal, ANNA))[0] == 200


@pytest.mark.asyncio
async def test_html_fault_is_a_proxy_page(http, portal):
    portal.fail("html")
    async with http.post(f"{portal.webhook_url}{SEARCH}", data={"PHONE_NUMBER": ANNA}) as response:
        assert response.status == 502 and response.content_type == "text/html"
        assert "<title>502 Bad Gateway</title>" in await response.text()


@pytest.mark.asyncio
async def test_bad_json_and_malformed_faults(http, portal):
    portal.fail("bad_json", times=1)
    portal.fail("malformed", times=1, result=[1, "two"])
    async with http.post(f"{portal.webhook_url}{SEARCH}", data={"PHONE_NUMBER": ANNA}) as response:
        with pytest.raises(ValueError, match="Unterminated string"):  # the default body is cut short
            await response.json()
    assert (await search(http, portal, ANNA))[1]["result"] == [1, "two"]


@pytest.mark.asyncio
@pytest.mark.parametrize("reset", [False, True])
async def test_disconnect_fault_answers_nothing(http, portal, reset):
    portal.fail("disconnect", reset=reset)
    with pytest.raises(aiohttp.ClientConnectionError):
        await search(http, portal, ANNA)


@pytest.mark.asyncio
async def test_slow_fault_answers_after_the_delay(http, portal):
    portal.fail("slow", delay=0.2)
    started = time.monotonic()
    status, _ = await search(http, portal, ANNA)
    assert status == 200 and 0.2 <= time.monotonic() - started < 0.8


@pytest.mark.asyncio
async def test_hang_lasts_until_reset_then_answers(http, portal):
    portal.fail("hang")
    pending = asyncio.ensure_future(search(http, portal, ANNA))
    await asyncio.sleep(0.2)
    assert not pending.done()
    portal.reset_faults()
    assert (await asyncio.wait_for(pending, 1.0))[0] == 200


@pytest.mark.asyncio
async def test_stop_releases_hung_requests(http):
    emulator = PortalEmulator(SAMPLE_CRM)
    await emulator.start()
    emulator.fail("hang")
    pending = asyncio.ensure_future(search(http, emulator, ANNA))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await emulator.stop()
    assert time.monotonic() - started < 0.5
    await asyncio.wait_for(asyncio.gather(pending, return_exceptions=True), 1.0)


def test_fail_rejects_unknown_kinds_and_options():
    emulator = PortalEmulator()
    with pytest.raises(ValueError, match="unknown fault kind"):
        emulator.fail("flood")
    with pytest.raises(TypeError, match="delay"):
        emulator.fail("hang", delay=1)
    with pytest.raises(ValueError, match="times must be at least 1"):
        emulator.fail("slow", times=0)


# -- rate limit -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rate_limit_refuses_past_the_burst_and_drains(http):
    async with PortalEmulator(SAMPLE_CRM, rate_limit=(10.0, 3)) as emulator:
        statuses = [(await search(http, emulator, ANNA))[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 503]
        assert (await search(http, emulator, ANNA))[1]["error"] == "QUERY_LIMIT_EXCEEDED"
        await asyncio.sleep(0.15)  # drains 1.5 requests at 10/s
        assert (await search(http, emulator, ANNA))[0] == 200


@pytest.mark.asyncio
async def test_no_rate_limit_by_default(http, portal):
    statuses = {(await search(http, portal, ANNA))[0] for _ in range(60)}
    assert statuses == {200}


# -- register / finish / user.get --------------------------------------------------------------


def register_params(**overrides):
    params = {"USER_ID": "1", "PHONE_NUMBER": ANNA, "TYPE": "2", "LINE_NUMBER": "74950000000",
              "EXTERNAL_CALL_ID": "1700000000.1"}
    params.update(overrides)
    return params


async def register(http, portal, **overrides):
    url = f"{portal.webhook_url}telephony.externalcall.register"
    return await post(http, url, data=register_params(**overrides))


async def finish(http, portal, **params):
    return await post(http, f"{portal.webhook_url}telephony.externalcall.finish", data=params)


@pytest.mark.asyncio
async def test_register_binds_the_crm_object_and_merges_repeats(http, portal):
    status, body = await register(http, portal)
    assert status == 200
    call_id = body["result"]["CALL_ID"]
    assert re.fullmatch(r"externalCall\.[0-9a-f]{32}\.\d{10}", call_id)
    assert (body["result"]["CRM_ENTITY_TYPE"], body["result"]["CRM_ENTITY_ID"]) == ("CONTACT", 12)
    assert (await register(http, portal, PHONE_NUMBER="89161234567"))[1]["result"]["CALL_ID"] == call_id
    assert (await register(http, portal, EXTERNAL_CALL_ID="1700000000.2"))[1]["result"]["CALL_ID"] != call_id
    assert portal.calls[call_id].params["EXTERNAL_CALL_ID"] == "1700000000.1"


@pytest.mark.asyncio
async def test_register_merge_window_is_thirty_minutes(http, portal):
    call_id = (await register(http, portal))[1]["result"]["CALL_ID"]
    portal.calls[call_id].registered_at -= 30 * 60
    assert (await register(http, portal))[1]["result"]["CALL_ID"] != call_id


@pytest.mark.asyncio
async def test_merged_call_cannot_be_finished_twice(http, portal):
    call_id = (await register(http, portal))[1]["result"]["CALL_ID"]
    assert (await register(http, portal))[1]["result"]["CALL_ID"] == call_id
    status, body = await finish(http, portal, CALL_ID=call_id, USER_ID="1", DURATION="42")
    assert status == 200
    assert body["result"]["CALL_FAILED_CODE"] == "200" and body["result"]["CALL_DURATION"] == 42
    assert portal.calls[call_id].finish_params["DURATION"] == "42"
    status, body = await finish(http, portal, CALL_ID=call_id, USER_ID="1")
    assert status == 400
    assert body["error"] == "" and body["error_description"].startswith("Call is not found")
    # Finished calls no longer absorb repeats.
    assert (await register(http, portal))[1]["result"]["CALL_ID"] != call_id


@pytest.mark.asyncio
async def test_finish_without_duration_is_missed(http, portal):
    call_id = (await register(http, portal))[1]["result"]["CALL_ID"]
    _, body = await finish(http, portal, CALL_ID=call_id, USER_PHONE_INNER="101")
    assert body["result"]["CALL_FAILED_CODE"] == "304"


@pytest.mark.asyncio
async def test_finish_unknown_call(http, portal):
    status, body = await finish(http, portal, CALL_ID="externalCall.nope.1", USER_ID="1")
    assert (status, body["error"]) == (400, "")


@pytest.mark.asyncio
async def test_register_finds_the_user_by_extension_and_checks_arguments(http, portal):
    params = register_params()
    del params["USER_ID"]
    status, body = await post(http, f"{portal.webhook_url}telephony.externalcall.register",
                              data={**params, "USER_PHONE_INNER": "103"})
    assert status == 200 and portal.calls[body["result"]["CALL_ID"]].user_id == "3"
    assert (await post(http, f"{portal.webhook_url}telephony.externalcall.register", data=params))[0] == 400
    assert (await register(http, portal, USER_ID="999"))[0] == 400
    assert (await register(http, portal, TYPE="9"))[0] == 400


@pytest.mark.asyncio
async def test_register_with_crm_create_makes_a_findable_lead(http, portal):
    status, body = await register(http, portal, PHONE_NUMBER="79990001122", CRM_CREATE="1")
    assert status == 200
    lead_id = body["result"]["CRM_CREATED_LEAD"]
    assert body["result"]["CRM_CREATED_ENTITIES"] == [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": lead_id}]
    [lead] = (await search(http, portal, "79990001122"))[1]["result"]
    assert (lead["CRM_ENTITY_TYPE"], lead["CRM_ENTITY_ID"], lead["ASSIGNED_BY_ID"]) == ("LEAD", lead_id, 1)


@pytest.mark.asyncio
async def test_user_get_is_derived_from_the_crm(http, portal):
    _, body = await post(http, f"{portal.webhook_url}user.get", json={"ID": 3})
    [olga] = body["result"]
    assert olga["NAME"] == "Ольга" and olga["ACTIVE"] is True
    assert olga["UF_PHONE_INNER"] == "103" and olga["PERSONAL_MOBILE"] == "+7 (903) 555-12-34"
    _, body = await post(http, f"{portal.webhook_url}user.get", data={"FILTER[ACTIVE]": "N"})
    assert [user["ID"] for user in body["result"]] == ["13"]
    _, body = await post(http, f"{portal.webhook_url}user.get", data={})
    assert body["total"] == 14 and body["result"][0]["ID"] == "1"


# -- sample data and the manual entry point ----------------------------------------------------


def test_sample_calls_refer_to_the_sample_crm():
    stories = {call.phone: call for call in SAMPLE_CALLS}
    not_found = [phone for phone in stories if normalise_phone(phone) not in SAMPLE_CRM]
    assert not_found == ["79990001122"]
    assert {call.route for call in SAMPLE_CALLS} == {"extension", "mobile", "queue"}


def test_command_line_serves_the_sample_data():
    with subprocess.Popen(
        [sys.executable, "-m", "agi_bitrix.testing.portal_cli", "--port", "0", "--rate-limit"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    ) as process:
        try:
            first_line = process.stdout.readline()
        finally:
            process.terminate()
    assert re.search(r"webhook URL http://127\.0\.0\.1:\d+/rest/1/emulator-secret/", first_line)


# -- time: searches, the network, the operating-time limit (limits.md) -------------------------


@pytest.mark.asyncio
async def test_a_batch_runs_its_searches_one_after_another_and_reports_each(http):
    async with PortalEmulator(SAMPLE_CRM, search_time=0.03, round_trip=0.04) as portal:
        portal.set_search_time("79262345678", 0.1)
        commands = {"a": f"{SEARCH}?PHONE_NUMBER={ANNA}", "b": f"{SEARCH}?PHONE_NUMBER=79262345678"}
        started = time.monotonic()
        status, body = await post(http, f"{portal.webhook_url}batch.json", json={"halt": 0, "cmd": commands})
        elapsed = time.monotonic() - started
    assert status == 200 and elapsed >= 0.03 + 0.1 + 0.04
    times = body["result"]["result_time"]
    assert times["a"]["processing"] == pytest.approx(0.03, abs=0.02)
    assert times["b"]["processing"] == pytest.approx(0.1, abs=0.03)
    assert times["b"]["start"] >= times["a"]["finish"]  # one after another
    # The outer batch is not counted in `operating` (limits.md), so its `time` has none.
    assert "operating" not in body["time"] and body["time"]["processing"] >= 0.13


@pytest.mark.asyncio
async def test_a_method_over_its_operating_time_is_blocked_alone_until_its_basket_drops(http):
    # Ten minutes and 480 s shrunk in proportion: a 1.2 s window, 0.1 s of execution.
    async with PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS, search_time=0.06,
                              operating_limit=(0.1, 1.2)) as portal:
        first = (await search(http, portal, ANNA))[1]["time"]
        second = (await search(http, portal, ANNA))[1]["time"]
        assert first["operating"] == pytest.approx(0.06, abs=0.02)
        assert second["operating"] == pytest.approx(0.12, abs=0.03)  # the call that passes it still runs
        assert second["operating_reset_at"] == pytest.approx(first["start"] + 1.2, abs=0.05)
        status, body = await search(http, portal, ANNA)
        assert (status, body["error"]) == (429, "OPERATION_TIME_LIMIT")
        commands = {"a": f"{SEARCH}?PHONE_NUMBER={ANNA}", "u": "user.get?ID=1"}
        status, body = await post(http, f"{portal.webhook_url}batch.json", json={"halt": 0, "cmd": commands})
        # Nested calls count as their methods: the search is blocked, user.get is not.
        assert body["result"]["result_error"]["a"]["error"] == "OPERATION_TIME_LIMIT"
        assert body["result"]["result"]["u"][0]["ID"] == "1"
        await asyncio.sleep(max(0.0, second["operating_reset_at"] - time.time()) + 0.05)
        status, body = await search(http, portal, ANNA)
        assert status == 200 and portal.refusals["OPERATION_TIME_LIMIT"] == 2
