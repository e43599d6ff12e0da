"""The `lines:` list: read like match.did, made the application's external lines on the portal
(telephony.externalLine.get/add/update) over real HTTP against the emulator, and named in
register's LINE_NUMBER with the line's CRM_SOURCE."""

import asyncio
import dataclasses
import logging
import sys
import textwrap

import pytest

from agi_bitrix.bitrix.client import make_session
from agi_bitrix.bitrix.line_settings import line_and_source, line_for
from agi_bitrix.bitrix.lines import LINE_ADD, LINE_GET, LineSync
from agi_bitrix.bitrix.oauth import portal_client
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import parse_config
from agi_bitrix.testing.portal_lines import LINE_ADD_METHOD, LINE_GET_METHOD, LINE_UPDATE_METHOD
from tests import test_portal_refusals
from tests.conftest import until
from tests.test_callcard import ANNA, DID, Running, callcard_config
from tests.test_cli import ROOT
from tests.test_oauth import CLIENT_ID, CLIENT_SECRET

ROUTING = "routing: {fallback_queue: support}\n"
# The emulated portal's local application and a token file with its refresh token: (server, path).
emulator_oauth = test_portal_refusals.emulator_oauth

MOSCOW, SPB, KAZAN = "74951112233", "78120001122", "78430002233"
LINES = """\
lines:
  - {did: "+7 495 111-22-33", name: "Moscow office", crm_source: WEB}
  - {did: "8 (812) 000-11-22", name: "St Petersburg"}
  - {did: "+7 843 000-22-33"}
"""


def oauth_text(server, token_path, lines=LINES):
    return textwrap.dedent(f"""\
        bitrix:
          oauth:
            portal_url: "{server.client_endpoint}"
            client_id: "{CLIENT_ID}"
            client_secret: "{CLIENT_SECRET}"
            token_file: "{token_path}"
            token_url: "{server.url}/oauth/token/"
        """) + ROUTING + lines


async def agi_bitrix(*args):
    """The real command in a process of its own, while the emulator answers in this one."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


# -- the list -------------------------------------------------------------------------------------

def test_each_did_is_read_like_match_did():
    config = parse_config('bitrix: {webhook_url: "https://p.example/rest/1/c/"}\n' + ROUTING + LINES, "x.yaml")
    assert [(line.number, line.name, line.crm_source) for line in config.lines] == [
        (MOSCOW, "Moscow office", "WEB"), (SPB, "St Petersburg", ""), (KAZAN, "", "")]
    assert line_for(config.lines, SPB).name == "St Petersburg" and line_for(config.lines, "74990000000") is None
    # Register's choice: the line's source, else the default; a DID without a line keeps the old rule.
    assert line_and_source(config.lines, MOSCOW, "", "CALL") == (MOSCOW, "WEB")
    assert line_and_source(config.lines, KAZAN, "", "CALL") == (KAZAN, "CALL")
    assert line_and_source(config.lines, "74990000000", "sales", "CALL") == ("sales", "CALL")


def test_a_did_listed_twice_or_no_number_is_refused_with_its_line_and_key():
    text = 'bitrix: {webhook_url: "https://p.example/rest/1/c/"}\n' + ROUTING + textwrap.dedent("""\
        lines:
          - {did: "+7 495 111-22-33", name: "Moscow office"}
          - {did: "8 495 111 22 33", name: "Moscow again"}
          - did: "office"
          - {did: "+7 812 000-11-22", nmae: "typo"}
          - {did: "+7 843 000-22-33", crm_source: "not a source"}
          - {name: "no number"}
        """)
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "x.yaml")
    assert [str(problem) for problem in raised.value.problems] == [
        "x.yaml:5: lines[1].did: '8 495 111 22 33' is the number of lines[0] again; list each line once",
        "x.yaml:6: lines[2].did: 'office' is not a phone number",
        "x.yaml:7: lines[3]: unknown key 'nmae'; expected did, name, crm_source",
        "x.yaml:8: lines[4]: crm_source 'not a source' is not a CRM source id like CALL",
        "x.yaml:9: lines[5]: needs did: the dialled number, like \"+7 495 111-22-33\"",
    ]


# -- the sync -------------------------------------------------------------------------------------

async def test_sync_adds_the_missing_renames_the_changed_leaves_the_others_alone_and_repeats_nothing(
        portal, emulator_oauth, caplog):
    caplog.set_level(logging.INFO, "agi_bitrix.lines")
    server, token_path = emulator_oauth
    lines = portal.external_lines
    lines.seed(SPB, "Old name")  # ours, renamed in the file since
    lines.seed(KAZAN, "Set by an admin")  # ours, no name in the file: left as it is
    lines.seed("74990000000", "Another server's line")  # not in the file
    config = parse_config(oauth_text(server, token_path), "lines.yaml")
    async with make_session() as session:
        client = portal_client(config.bitrix, session)
        sync = LineSync(config.lines, lambda: client, default_country="RU")
        first = await sync.sync()
        calls_of_the_first = list(lines.calls)
        second = await sync.sync()
    assert calls_of_the_first == [
        (LINE_GET_METHOD, {}),
        (LINE_ADD_METHOD, {"NUMBER": MOSCOW, "NAME": "Moscow office"}),
        (LINE_UPDATE_METHOD, {"NUMBER": SPB, "NAME": "St Petersburg"}),
    ]
    assert lines.names() == {SPB: "St Petersburg", KAZAN: "Set by an admin",
                             "74990000000": "Another server's line", MOSCOW: "Moscow office"}
    assert (first.added, first.renamed, first.unchanged, first.failed, first.foreign) == ([MOSCOW], [SPB], 1, [], 1)
    # The second sync finds everything in place: it only reads.
    assert lines.calls[len(calls_of_the_first):] == [(LINE_GET_METHOD, {})]
    assert (second.added, second.renamed, second.unchanged, second.failed) == ([], [], 3, [])
    assert {key: value for key, value in sync.health().items() if key != "synced_seconds_ago"} == {
        "state": "synced", "configured": 3, "known": 3, "added": 0, "renamed": 0, "failed": 0,
        "others_left_alone": 1, "error": None}
    changes = [record.getMessage() for record in caplog.records if "lines: added" in record.getMessage()
               or "lines: renamed" in record.getMessage()]
    assert changes == [f"lines: added {MOSCOW} ('Moscow office')",
                       f"lines: renamed {SPB} from 'Old name' to 'St Petersburg'"]


async def test_lines_added_or_changed_by_a_reload_are_synced_in_the_background(portal, emulator_oauth):
    server, token_path = emulator_oauth
    config = parse_config(oauth_text(server, token_path), "lines.yaml")
    renamed = parse_config(oauth_text(server, token_path, LINES.replace("Moscow office", "Moscow HQ")), "lines.yaml")
    async with make_session() as session:
        client = portal_client(config.bitrix, session)
        sync = LineSync((), lambda: client, default_country="RU")
        sync.start()  # no lines in the file: nothing asked, nothing shown but "off"
        assert (sync.health(), portal.external_lines.calls) == ({"state": "off"}, [])
        await sync.reload(config.lines)
        await until(lambda: sync.health()["state"] == "synced", what="the first sync")
        await sync.reload(config.lines)  # the same lines: nothing to do
        calls = len(portal.external_lines.calls)
        await sync.reload(renamed.lines)
        await until(lambda: sync.health()["state"] == "synced", what="the sync after the reload")
        await sync.close()
    assert portal.external_lines.calls[calls:] == [(LINE_GET_METHOD, {}),
                                                   (LINE_UPDATE_METHOD, {"NUMBER": MOSCOW, "NAME": "Moscow HQ"})]


async def test_a_line_the_portal_refuses_is_counted_and_the_others_go_on(portal, emulator_oauth, caplog):
    server, token_path = emulator_oauth
    portal.fail("error", code="INTERNAL_SERVER_ERROR", method=LINE_ADD_METHOD, times=1)
    config = parse_config(oauth_text(server, token_path), "lines.yaml")
    async with make_session() as session:
        client = portal_client(config.bitrix, session)
        sync = LineSync(config.lines, lambda: client, default_country="RU")
        first = await sync.sync()
        health = sync.health()
        second = await sync.sync()  # what the background does after RETRY_AFTER_FAILURE
    assert (first.failed, first.added) == ([MOSCOW], [SPB, KAZAN])
    assert (health["state"], health["failed"], health["added"], health["known"]) == ("failed", 1, 2, 2)
    assert (second.added, second.unchanged, second.ok) == ([MOSCOW], 2, True)
    assert f"lines: {LINE_ADD} {MOSCOW} failed: INTERNAL_SERVER_ERROR" in caplog.text


async def test_a_hostile_answer_adds_nothing_and_its_text_is_cut_in_the_log(portal, emulator_oauth, caplog):
    caplog.set_level(logging.INFO, "agi_bitrix.lines")
    server, token_path = emulator_oauth
    config = parse_config(oauth_text(server, token_path), "lines.yaml")
    portal.external_lines.seed(SPB, "x" * 100_000 + "\n\x1b[2J")
    portal.fail("malformed", method=LINE_GET_METHOD, result={"NUMBER": MOSCOW}, times=1)
    async with make_session() as session:
        client = portal_client(config.bitrix, session)
        sync = LineSync(config.lines, lambda: client, default_country="RU")
        malformed = await sync.sync()
        calls_after_the_malformed = list(portal.external_lines.calls)
        renamed = await sync.sync()
    # Not a list: read as an error, not as "no lines" (which would add them all again).
    assert (malformed.error, malformed.added, calls_after_the_malformed) == ("bad_result", [], [])
    assert renamed.renamed == [SPB]
    line = next(record.getMessage() for record in caplog.records if "renamed" in record.getMessage())
    assert line == f"lines: renamed {SPB} from {'x' * 100!r}... to 'St Petersburg'"


async def test_the_command_syncs_through_the_application(portal, emulator_oauth, tmp_path):
    server, token_path = emulator_oauth
    path = tmp_path / "lines.yaml"
    path.write_text(oauth_text(server, token_path))
    status, out, err = await agi_bitrix("lines", "sync", "-c", str(path))
    assert status == 0, err
    assert out.splitlines() == [
        f"{path}: lines: added {MOSCOW} ('Moscow office')", f"{path}: lines: added {SPB} ('St Petersburg')",
        f"{path}: lines: added {KAZAN}",
        (f"{path}: lines: 3 configured: 0 unchanged, 3 added, 0 renamed, 0 failed; 0 other line(s) of the"
         " application left alone")]
    assert portal.external_lines.names() == {MOSCOW: "Moscow office", SPB: "St Petersburg", KAZAN: ""}


async def test_a_webhook_is_told_the_lines_need_an_application(portal, tmp_path):
    path = tmp_path / "webhook.yaml"
    path.write_text(f'bitrix: {{webhook_url: "{portal.webhook_url}"}}\n' + ROUTING + LINES)
    status, out, err = await agi_bitrix("lines", "sync", "-c", str(path))
    check_status, _, check_err = await agi_bitrix("check", "-c", str(path))
    assert status == 1 and "Traceback" not in err
    # The portal was asked and refused, as its docs say, and the admin is told what to do instead.
    assert [request.method for request in portal.requests] == [LINE_GET_METHOD]
    assert portal.refusals["WRONG_AUTH_TYPE"] == 1 and portal.external_lines.names() == {}
    assert (f"{path}: error: lines: telephony.externalLine.get/.add/.update work only in the context of an"
            " application") in err
    assert "WRONG_AUTH_TYPE" in err and "bitrix.oauth" in err and "could not be read (WRONG_AUTH_TYPE)" in err
    assert portal.code not in out + err
    assert check_status == 0 and f"{path}: warning: lines: telephony.externalLine.get" in check_err


async def test_the_server_says_a_webhook_refusal_once_and_does_not_retry(portal, caplog):
    config = parse_config(f'bitrix: {{webhook_url: "{portal.webhook_url}"}}\n' + ROUTING + LINES)
    async with make_session() as session:
        client = portal_client(config.bitrix, session)
        sync = LineSync(config.lines, lambda: client, default_country="RU")
        sync.start()
        await until(sync._task.done, what="the background sync to stop")  # no retry is waiting
    health = sync.health()
    assert (health["state"], health["error"], health["known"]) == ("application only: WRONG_AUTH_TYPE",
                                                                   "WRONG_AUTH_TYPE", 0)
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and "WRONG_AUTH_TYPE" in errors[0] and "bitrix.oauth" in errors[0]
    assert portal.code not in caplog.text


async def test_the_sync_takes_no_slot_of_the_lookups_half(portal, emulator_oauth):
    server, token_path = emulator_oauth
    config = parse_config(oauth_text(server, token_path), "lines.yaml")
    async with make_session() as session:
        client = portal_client(config.bitrix, session)
        # The lookups' half of a burst of 4 is all that is left: the sync must not take it.
        client.budget = RateLimiter(per_second=0.001, burst=4)
        await client.take_slot(0)
        await client.take_slot(0)
        result = await LineSync(config.lines, lambda: client, default_country="RU").sync()
        await client.take_slot(0)
        await client.take_slot(0)  # both still there for calls
    assert result.error == "rate_limited" and portal.external_lines.calls == []


# -- register -------------------------------------------------------------------------------------

def with_lines(config, text):
    """`config` with the `lines:` list of `text`, read as the file reads it."""
    lines = parse_config(f'bitrix: {{webhook_url: "{config.bitrix.webhook_url}"}}\n' + ROUTING + text).lines
    return dataclasses.replace(config, lines=lines)


async def test_register_names_the_line_and_its_crm_source(portal, tmp_path):
    config = with_lines(callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", """\
        register: {crm_create: true, crm_source: CALL, line_number: sales-line}
        """), f'lines: [{{did: "{DID}", name: "Main", crm_source: WEB}}, {{did: "+7 843 000-22-33"}}]\n')
    running = await Running(config).start()
    try:
        sent = []
        for linkedid, did in (("1.1", DID), ("1.2", KAZAN), ("1.3", "74990000000")):
            variables = await running.register(linkedid=linkedid, did=did)
            params = portal.calls[variables["B24_CALL_ID"]].params
            sent.append((params["LINE_NUMBER"], params.get("CRM_SOURCE")))
    finally:
        await running.stop()
    # A configured line wins over callcard.register.line_number; its own source over crm_source.
    assert sent == [(DID, "WEB"), (KAZAN, "CALL"), ("sales-line", "CALL")]


async def test_a_portal_failure_during_the_sync_leaves_calls_alone_and_is_reported(portal, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "agi_bitrix.lines")
    config = with_lines(callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", "register: {default_user: 1}"),
                        LINES)
    portal.fail("hang", method=LINE_GET_METHOD)
    running = await Running(config).start()
    sync = running.app.lines  # the server's own sync, started with it
    try:
        await until(lambda: portal.requests_for(LINE_GET_METHOD), what="the sync to ask the portal")
        assert sync.health() == {"state": "syncing", "configured": 3}
        routed = await running.call("route", (), callerid=ANNA, extension=DID, uniqueid="1.5")
        variables = await running.register(linkedid="1.6")
        still_hanging = sync.last is None
        await until(lambda: sync.last is not None, what="the sync to give up")
        health = sync.health()
    finally:
        await running.stop()
    # The call was routed and registered while the sync hung on the portal.
    assert still_hanging
    assert routed.variables["B24_STATUS"] == "FOUND" and variables["B24_REGISTER_ERROR"] == ""
    assert (health["state"], health["error"]) == ("failed", "timeout")
    assert [record.getMessage() for record in caplog.records if record.name == "agi_bitrix.lines"] == [
        f"lines: {LINE_GET} failed: timeout: {LINE_GET} at {running.app.portal.redacted_url}: no answer within 1 s"]


async def test_a_bug_in_the_background_sync_is_logged_and_the_stop_still_works(caplog):
    def broken_portal():
        raise ValueError("a bug")

    sync = LineSync((), broken_portal, default_country="RU")
    sync.lines = parse_config('bitrix: {webhook_url: "https://p.example/rest/1/c/"}\n' + ROUTING + LINES).lines
    sync.start()
    await until(lambda: "failed unexpectedly" in caplog.text, what="the bug to be logged")
    await sync.close()  # waiting for the retry, not ended by the exception: stops without raising
    assert (sync.health()["state"], sync.health()["error"]) == ("failed", "internal")
