"""The server on a real TCP socket, spoken to like Asterisk does, against the portal emulator."""

import asyncio
import time

import pytest

from agi_bitrix.app import Application
from agi_bitrix.testing.fake_asterisk import asterisk_header, command_words, fake_call, mset_pairs
from tests.conftest import call_requests, make_config


async def call(agi_server, **header):
    host, port, _ = agi_server
    result = await fake_call(host, port, **header)
    return result.variables


async def test_found_call_gets_all_variables_in_one_command(agi_server, portal):
    host, port, _ = agi_server
    result = await fake_call(host, port, callerid="89161234567", extension="74950000000", uniqueid="1.1")
    assert len(result.commands) == 1 and result.commands[0].startswith('EXEC MSet "')
    assert result.variables == {
        "B24_STATUS": "FOUND", "B24_ROUTE": "extension", "B24_TARGET": "101", "B24_QUEUE": "support",
        "B24_EXTENSION": "101", "B24_MOBILE": "79161110101", "B24_WORK_PHONE": "", "B24_PERSONAL_PHONE": "",
        "B24_USER_ID": "1", "B24_ENTITY_TYPE": "CONTACT", "B24_ENTITY_ID": "12", "B24_TIMEMAN": "OPENED",
        "B24_PHONE": "79161234567", "B24_RULE": "owner-at-work", "B24_ERROR": "", "B24_CACHE": "miss",
        "B24_NAME": "Иван Петров",
    }
    # The portal is asked in international digits, whatever format the PBX used.
    assert [r.params.get("PHONE_NUMBER") for r in call_requests(portal)] == ["79161234567"]


@pytest.mark.parametrize("callerid", ["89262345678", "+7 926 234-56-78", "9262345678", "79262345678"])
async def test_caller_id_formats(agi_server, callerid):
    v = await call(agi_server, callerid=callerid)
    assert (v["B24_STATUS"], v["B24_PHONE"], v["B24_ROUTE"], v["B24_RULE"]) == (
        "FOUND", "79262345678", "queue", "owner-on-break")


@pytest.mark.parametrize("callerid", ["anonymous", "unknown", "Restricted", "", "<sip:anonymous@x>"])
async def test_no_caller_id_asks_nobody(agi_server, portal, callerid):
    v = await call(agi_server, callerid=callerid)
    assert (v["B24_STATUS"], v["B24_ROUTE"], v["B24_TARGET"], v["B24_PHONE"]) == ("NO_CALLERID", "queue", "support", "")
    assert call_requests(portal) == []


async def test_first_argument_overrides_number_and_second_the_did(agi_server, portal):
    v = await call(agi_server, callerid="anonymous", extension="s", args=("8 (495) 765-43-21", "74951112233"))
    assert (v["B24_PHONE"], v["B24_RULE"], v["B24_TARGET"]) == ("74957654321", "sales-did", "sales")
    v = await call(agi_server, callerid="89161234567", args=("", ""))
    assert v["B24_PHONE"] == "79161234567"


async def test_query_string_on_script_path_does_not_break_routing(agi_server):
    v = await call(agi_server, script="route?tenant=7&x=y", callerid="89161234567")
    assert (v["B24_STATUS"], v["B24_TARGET"]) == ("FOUND", "101")


async def test_unknown_script_still_gets_a_route(agi_server):
    v = await call(agi_server, script="rout", callerid="89161234567")
    assert (v["B24_STATUS"], v["B24_ROUTE"], v["B24_TARGET"], v["B24_ERROR"]) == (
        "ERROR", "queue", "support", "unknown_script")


async def test_not_found(agi_server):
    v = await call(agi_server, callerid="89990001122")
    assert (v["B24_STATUS"], v["B24_ROUTE"], v["B24_TARGET"], v["B24_RULE"]) == (
        "NOT_FOUND", "queue", "support", "fallback")


async def test_hostile_crm_values_never_reach_the_pbx(agi_server):
    # Artem's extension is "120&Local/666@evil"; Viktor's mobile carries a newline and an EXEC.
    for callerid, extension in (("89997776655", ""), ("89035550000", "111")):
        result = await fake_call(agi_server[0], agi_server[1], callerid=callerid)
        assert len(result.commands) == 1
        v = result.variables
        assert (v["B24_ROUTE"], v["B24_TARGET"], v["B24_EXTENSION"], v["B24_MOBILE"]) == (
            "queue", "support", extension, "")
        assert "Local" not in result.commands[0] and "Dial" not in result.commands[0]


@pytest.mark.parametrize("kind, options, reason", [
    ("error", {"status": 503, "code": "QUERY_LIMIT_EXCEEDED", "description": "Too many requests"},
     "QUERY_LIMIT_EXCEEDED"),
    ("error", {"status": 500, "code": "", "description": "oops"}, "http_500"),
    ("error", {"status": 401, "code": "expired_token", "description": "The access token provided has expired."},
     "expired_token"),
    ("html", {"status": 502}, "http_502"),
    ("bad_json", {}, "bad_json"),
    ("malformed", {}, "bad_result"),
    ("disconnect", {}, "connect"),
])
async def test_portal_failures_give_fallback_with_reason(agi_server, portal, kind, options, reason):
    portal.fail(kind, **options)
    v = await call(agi_server, callerid="89161234567", extension="74950000000")
    assert (v["B24_STATUS"], v["B24_ROUTE"], v["B24_TARGET"], v["B24_ERROR"]) == ("ERROR", "queue", "support", reason)
    assert v["B24_PHONE"] == "79161234567"


async def test_rules_that_need_no_crm_still_apply_when_the_portal_fails(agi_server, portal):
    portal.fail("html", status=502)
    v = await call(agi_server, callerid="89161234567", extension="74951112233")
    assert (v["B24_STATUS"], v["B24_TARGET"], v["B24_RULE"]) == ("ERROR", "sales", "sales-did")


async def test_refused_connection_is_connect_error(unused_tcp_port):
    app = Application(make_config(f"http://127.0.0.1:{unused_tcp_port}/rest/1/code/"))
    host, port = await app.start("127.0.0.1", 0)
    try:
        v = (await fake_call(host, port, callerid="89161234567")).variables
    finally:
        await app.stop()
    assert (v["B24_STATUS"], v["B24_ERROR"], v["B24_TARGET"]) == ("ERROR", "connect", "support")


async def test_hung_portal_routes_by_fallback_within_the_deadline(agi_server, portal):
    portal.fail("hang")
    started = time.monotonic()
    results = await asyncio.gather(*(call(agi_server, callerid="89161234567") for _ in range(20)))
    elapsed = time.monotonic() - started
    assert all((v["B24_STATUS"], v["B24_ERROR"], v["B24_TARGET"]) == ("ERROR", "timeout", "support") for v in results)
    assert elapsed < 1.0 + 0.5  # deadline is 1.0 s in the test config


async def test_slow_portal_inside_the_deadline_is_waited_for(agi_server, portal):
    portal.fail("slow", delay=0.3)
    v = await call(agi_server, callerid="89161234567")
    assert (v["B24_STATUS"], v["B24_TARGET"]) == ("FOUND", "101")


async def raw_session(agi_server, data: bytes, replies: bytes = b"200 result=0\n", close_early=False):
    host, port, _ = agi_server
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    if close_early:
        writer.close()
        return b""
    received = await asyncio.wait_for(reader.readline(), 3)
    if received and replies:
        writer.write(replies)
        await writer.drain()
    rest = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    return received + rest


async def test_hangup_line_before_reply_keeps_sync(agi_server):
    received = await raw_session(agi_server, asterisk_header(callerid="89161234567"),
                                 replies=b"HANGUP\n100 result=0 Trying...\n200 result=0\n")
    words = command_words(received.decode().splitlines()[0])
    assert mset_pairs(words[2])["B24_TARGET"] == "101"


async def test_multiline_520_reply_is_consumed(agi_server):
    received = await raw_session(agi_server, asterisk_header(callerid="89161234567"),
                                 replies=b"520-Invalid command syntax.  Proper usage follows:\nUsage: x\n"
                                         b"520 End of proper usage.\n")
    assert received.startswith(b"EXEC MSet")


async def test_hostile_clients_do_not_stall_real_calls(agi_server):
    host, port, _ = agi_server
    stalled = [await asyncio.open_connection(host, port) for _ in range(50)]  # connect and say nothing
    for _ in range(20):  # connect and close at once (a port scan)
        _, writer = await asyncio.open_connection(host, port)
        writer.close()
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\xff" * 5000, b"agi_network: yes\n" * 2000,
                 asterisk_header()[:40]):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(junk)
        stalled.append((reader, writer))
    started = time.monotonic()
    results = await asyncio.gather(*(call(agi_server, callerid="89161234567", uniqueid=f"r{i}") for i in range(20)))
    assert all(v["B24_TARGET"] == "101" for v in results)
    assert time.monotonic() - started < 1.0  # well before the 1 s header timeout frees anything
    # The server drops the silent ones after its header timeout.
    reader, writer = stalled[0]
    assert await asyncio.wait_for(reader.read(), 3) == b""
    for _, writer in stalled:
        writer.close()


async def test_oversized_header_is_closed_without_commands(agi_server):
    received = await raw_session(agi_server, b"agi_x: " + b"y" * 20000 + b"\n\n", replies=b"")
    assert received == b""


async def test_client_that_vanishes_before_the_reply(agi_server, portal):
    portal.fail("slow", delay=0.2)
    await raw_session(agi_server, asterisk_header(callerid="89161234567"), close_early=True)
    await asyncio.sleep(0.4)
    v = await call(agi_server, callerid="89161234567")
    assert v["B24_TARGET"] == "101"


async def test_concurrent_calls_each_get_their_own_answer(agi_server):
    numbers = {"89161234567": "101", "89262345678": "support", "84957654321": "79035551234",
               "89990001122": "support", "89857778899": "105"}
    calls = list(numbers.items()) * 20
    results = await asyncio.gather(*(call(agi_server, callerid=n, uniqueid=str(i)) for i, (n, _) in enumerate(calls)))
    assert [v["B24_TARGET"] for v in results] == [t for _, t in calls]


async def test_peer_values_reach_log_lines_without_control_characters(agi_server, caplog):
    # An allowed client (or an AMI originator choosing the uniqueid) must not forge log lines
    # or drive the admin's terminal: CR and ESC are logged as "?".
    forged = "1.1\r2024-01-01 INFO agi_bitrix: forged line\x1b[2J"
    caplog.set_level("INFO")
    await call(agi_server, script="no-such-script", uniqueid=forged)
    await call(agi_server, script="finish", uniqueid=forged)
    await call(agi_server, callerid="89161234567", uniqueid=forged)
    lines = [record.getMessage() for record in caplog.records if "forged" in record.getMessage()]
    assert len(lines) >= 3  # unknown script, finish without a callcard, the call log
    assert all(line.isprintable() for line in lines), lines


async def test_an_emergency_number_as_the_owners_mobile_is_never_dialled(agi_server):
    # Roman's day is closed and his PERSONAL_MOBILE is "112": the rule's mobile is unavailable.
    v = await call(agi_server, callerid="89164445566")
    assert (v["B24_STATUS"], v["B24_ROUTE"], v["B24_TARGET"], v["B24_MOBILE"]) == ("FOUND", "queue", "support", "")
    assert (v["B24_RULE"], v["B24_EXTENSION"]) == ("owner-day-over", "114")
