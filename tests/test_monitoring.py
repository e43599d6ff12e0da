"""Metrics, health and the call log, as an admin's Prometheus, load balancer and grep see them."""

import asyncio
import gc
import json
import logging
import re
import socket

import aiohttp
import pytest

from agi_bitrix.app import Application
from agi_bitrix.bitrix.breaker import CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.lookup import CrmLookup, LookupMemory
from agi_bitrix.bitrix.settings import CacheSettings
from agi_bitrix.calllog import mask_number
from agi_bitrix.monitoring import Metrics
from agi_bitrix.testing.fake_asterisk import fake_call
from tests.conftest import ample_budget, call_requests, make_config


async def scrape(http, base) -> str:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


def value(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


async def test_metrics_move_as_calls_are_made(monitored, portal):
    _app, host, port, base, http = monitored
    before = await scrape(http, base)
    assert value(before, "agi_bitrix_sessions_in_flight") == 0
    assert value(before, "agi_bitrix_portal_breaker_state", state="closed") == 1
    for _ in range(3):
        await fake_call(host, port, callerid="89161234567")
    await fake_call(host, port, callerid="anonymous")
    portal.fail("html", status=502)
    await fake_call(host, port, callerid="89262345678")
    text = await scrape(http, base)
    assert value(text, "agi_bitrix_calls_total", status="FOUND", route="extension", rule="owner-at-work") == 3
    assert value(text, "agi_bitrix_calls_total", status="NO_CALLERID", route="queue", rule="fallback") == 1
    assert value(text, "agi_bitrix_calls_total", status="ERROR", route="queue", rule="fallback") == 1
    assert value(text, "agi_bitrix_lookups_total", result="miss") == 1
    assert value(text, "agi_bitrix_lookups_total", result="hit") == 2
    assert value(text, "agi_bitrix_lookups_total", result="error") == 1
    assert value(text, "agi_bitrix_portal_errors_total", reason="http_502") == 1
    assert value(text, "agi_bitrix_portal_request_seconds_count") == 2
    assert value(text, "agi_bitrix_call_seconds_count") == 5
    assert value(text, "agi_bitrix_cache_entries") == 1


async def test_sessions_in_flight_breaker_and_reloads(monitored, portal, tmp_path):
    app, host, port, base, http = monitored
    portal.fail("slow", delay=0.5)
    calls = [asyncio.create_task(fake_call(host, port, callerid=f"8916000000{i}")) for i in range(4)]
    await asyncio.sleep(0.2)
    assert value(await scrape(http, base), "agi_bitrix_sessions_in_flight") == 4
    await asyncio.gather(*calls)
    portal.reset_faults()
    portal.fail("error", status=500, code="INTERNAL_SERVER_ERROR", description="down")
    for i in range(5):
        await fake_call(host, port, callerid=f"8926000000{i}")
    text = await scrape(http, base)
    assert value(text, "agi_bitrix_portal_breaker_state", state="open") == 1
    assert value(text, "agi_bitrix_portal_breaker_state", state="closed") == 0
    assert not await app.reload(tmp_path / "missing.yaml")
    assert value(await scrape(http, base), "agi_bitrix_config_reloads_total", result="failure") == 1


async def health(http, base):
    async with http.get(f"{base}/healthz") as response:
        return response.status, await response.json()


async def test_health_flips_when_the_portal_dies_and_back(monitored, portal):
    app, host, port, base, http = monitored
    status, body = await health(http, base)
    assert status == 200 and body["portal"]["state"] == "not asked yet"
    assert body["config"]["sha256"] == app.config.digest and body["config"]["rules"] == 4
    assert body["uptime_seconds"] >= 0 and body["version"]
    await fake_call(host, port, callerid="89161234567")
    status, body = await health(http, base)
    assert (status, body["status"], body["portal"]["state"]) == (200, "ok", "answering")
    assert body["portal"]["last_success_seconds_ago"] < 5
    portal.fail("disconnect")
    await fake_call(host, port, callerid="89262345678")
    status, body = await health(http, base)
    assert (status, body["status"]) == (503, "degraded")
    assert body["portal"]["state"] == "failing: the last request failed"
    portal.reset_faults()
    await fake_call(host, port, callerid="84957654321")
    assert (await health(http, base))[0] == 200


async def test_call_log_one_line_per_call_without_secrets(portal, caplog):
    app = Application(make_config(portal.webhook_url))
    host, port = await app.start("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.INFO, logger="agi_bitrix.calls"):
            await fake_call(host, port, callerid="89161234567", uniqueid="1700.1")
            await fake_call(host, port, callerid="anonymous", uniqueid="1700.2")
            await fake_call(host, port, script="nope", uniqueid="1700 status=FOUND")
    finally:
        await app.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "agi_bitrix.calls"]
    assert len(lines) == 3, lines
    assert lines[0].startswith("call uniqueid=1700.1 phone=79161234567 status=FOUND route=extension"
                               " target=101 rule=owner-at-work error=- cache=miss latency_ms=")
    assert "uniqueid=1700.2 phone=- status=NO_CALLERID route=queue target=support rule=fallback" in lines[1]
    assert "uniqueid=1700?status?FOUND phone=- status=ERROR" in lines[2] and "error=unknown_script" in lines[2]
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "emulator-secret" not in everything


async def test_json_call_log_with_masked_numbers(portal, capfd, caplog):
    caplog.set_level(logging.INFO, logger="agi_bitrix.calls")
    config = make_config(portal.webhook_url, extra="call_log: {format: json, mask_numbers: true}")
    app = Application(config)
    host, port = await app.start("127.0.0.1", 0)
    try:
        await fake_call(host, port, callerid="89161234567", uniqueid="1700.9")
    finally:
        await app.stop()
    lines = [line for line in capfd.readouterr().err.splitlines() if '"uniqueid"' in line]
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["uniqueid"] == "1700.9" and entry["phone"] == "7916*****67"
    assert (entry["status"], entry["route"], entry["target"], entry["rule"]) == (
        "FOUND", "extension", "101", "owner-at-work")
    assert isinstance(entry["latency_ms"], float) and entry["time"].endswith("+00:00")


def test_mask_number():
    assert mask_number("79161234567") == "7916*****67"
    assert mask_number("102") == "***"


async def test_metrics_port_taken_does_not_stop_calls(portal, caplog):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        app = Application(make_config(portal.webhook_url, metrics=f'"127.0.0.1:{taken}"'))
        host, port = await app.start("127.0.0.1", 0)
        try:
            assert (await fake_call(host, port, callerid="89161234567")).variables["B24_TARGET"] == "101"
        finally:
            await app.stop()
    assert any("metrics, /healthz and the admin page are OFF" in r.getMessage() for r in caplog.records)


def session_failing_inside_aiohttp() -> aiohttp.ClientSession:
    """An HTTP session in which aiohttp itself fails with an exception that is no ClientError,
    as its internal asserts do: its request-start hooks run inside `post`, unwrapped."""
    trace = aiohttp.TraceConfig()

    async def on_request_start(session, context, params):
        raise AssertionError("an assert inside aiohttp")

    trace.on_request_start.append(on_request_start)
    return aiohttp.ClientSession(trace_configs=[trace])


@pytest.mark.parametrize("fault, reason", [
    ("host the idna codec refuses", "bad_url"),
    ("HTTP session closed", "session_closed"),
    ("exception inside aiohttp", "internal"),
])
async def test_an_unexpected_failure_is_an_honest_portal_error(monitored, portal, caplog, fault, reason):
    app, host, port, base, http = monitored
    caplog.set_level(logging.WARNING)  # asyncio's own logger included
    if fault == "host the idna codec refuses":
        # Past every URL check, as a host a check misses would be: aiohttp raises UnicodeError.
        app.runtime.portal._base = "http://portal..bitrix24.ru/rest/1/x/"
    elif fault == "HTTP session closed":
        await app.session.close()
    else:
        await app.session.close()
        app.session = session_failing_inside_aiohttp()
        app.runtime = app._build(app.config, previous=app.runtime)
    calls = [await fake_call(host, port, callerid=f"8916000000{n}") for n in range(3)]
    assert [(c.variables["B24_STATUS"], c.variables["B24_ERROR"]) for c in calls] == [("ERROR", reason)] * 3
    assert value(await scrape(http, base), "agi_bitrix_portal_errors_total", reason=reason) == 3
    status, body = await health(http, base)
    assert (status, body["portal"]["state"]) == (503, "failing: the last request failed")
    assert call_requests(portal) == []
    gc.collect()  # an unretrieved task exception is reported when the task is collected
    await asyncio.sleep(0.01)
    assert "never retrieved" not in caplog.text and "Exception in callback" not in caplog.text
    assert "cancelled" not in caplog.text
    if reason == "internal":  # a bug: one traceback per request, naming the exception
        tracebacks = [r for r in caplog.records if r.exc_info and "failed unexpectedly" in r.getMessage()]
        assert len(tracebacks) == 3 and "AssertionError" in tracebacks[0].getMessage()


async def test_portal_error_codes_make_a_bounded_set_of_metric_series(portal):
    """A portal (or a proxy) inventing a new code per answer must not add a series per code."""
    metrics = Metrics()
    async with make_session() as session:
        client = PortalClient(portal.webhook_url, session, timeout=1.0, budget=ample_budget())
        memory = LookupMemory(AnswerCache(CacheSettings()), CircuitBreaker(failures=10_000, cool_down=1))
        lookup = CrmLookup(client, memory, deadline=1.0, observer=metrics)
        answers = []
        for n in range(300):
            portal.fail("error", status=400 + n % 200, code=f"INVENTED_{n}", description="?", times=1)
            answers.append(await lookup.lookup(f"7916{n:07d}"))
        for n, status in enumerate((418, 451, 502, 599)):  # error pages without a code
            portal.fail("html", status=status, times=1)
            answers.append(await lookup.lookup(f"7926{n:07d}"))
        portal.fail("error", status=400, code="ERROR_CORE", description="empty", times=1)
        answers.append(await lookup.lookup("79169999999"))
    # The call still learns the portal's own code or status; the metric files it in a bucket.
    assert [a.error for a in answers[:2]] == ["INVENTED_0", "INVENTED_1"]
    assert [a.error for a in answers[300:]] == ["http_418", "http_451", "http_502", "http_599", "ERROR_CORE"]
    text = metrics.exposition().decode()
    series = [line for line in text.splitlines() if line.startswith("agi_bitrix_portal_errors_total{")]
    assert len(series) == 5, series  # other, http_4xx, http_5xx, http_502, ERROR_CORE
    assert value(text, "agi_bitrix_portal_errors_total", reason="other") == 300
    assert value(text, "agi_bitrix_portal_errors_total", reason="http_4xx") == 2
    assert value(text, "agi_bitrix_portal_errors_total", reason="http_5xx") == 1
    assert value(text, "agi_bitrix_portal_errors_total", reason="http_502") == 1
