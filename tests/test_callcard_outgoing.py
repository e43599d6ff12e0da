"""The `outgoing` script: an employee's call from a desk phone registered as TYPE=1, then finished
like an incoming call. The pure parts alone, then the whole application over real TCP, spoken to
like Asterisk does, against the portal emulator over real HTTP (the real-Asterisk proof is
tests/asterisk/test_outgoing.py)."""

import textwrap
import time

import pytest

from agi_bitrix.agi.protocol import AgiRequest
from agi_bitrix.callcard.outgoing import EMERGENCY, NOT_EXTERNAL, SHORT, external_number, outgoing_arguments
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import parse_config
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM, SAMPLE_USERS
from tests.conftest import call_requests, until
from tests.test_callcard import (
    FINISH,
    REGISTER,
    Running,
    callcard_config,
    delivered_finishes,
    register_with_a_hung_portal,
)

CLIENT = "79161230000"  # a client's mobile, not in the CRM
IGORS_MOBILE = "+79162220202"  # user 2's PERSONAL_MOBILE
LINES = """\
outgoing:
  lines:
    - {trunk: 1, line: "74951112233"}
    - {trunk: mts, line: "74957654321"}
  line_number: "74950000000"
  show: false
"""


# -- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(("dialled", "number", "reason"), [
    ("79161230000", "79161230000", ""),
    ("8 916 123-00-00", "79161230000", ""),  # the trunk prefix 8 of Russia
    ("+7 (495) 111-22-33", "74951112233", ""),
    ("+12025550123", "12025550123", ""),
    ("112", None, EMERGENCY),
    ("01", None, EMERGENCY),
    ("103", None, EMERGENCY),
    ("104", None, SHORT),  # the gas service: a short number, not an emergency one
    ("205", None, NOT_EXTERNAL),  # an extension
    ("*43", None, NOT_EXTERNAL),  # a feature code
    ("8495123", None, NOT_EXTERNAL),  # too short to be a subscriber number
    ("79161230000&Local/666@evil", None, NOT_EXTERNAL),
    ("", None, NOT_EXTERNAL),
])
def test_only_numbers_outside_the_company_are_registered(dialled, number, reason):
    assert external_number(dialled, "RU") == (number, reason)


def test_arguments_are_checked_and_the_header_fills_in():
    header = AgiRequest({"agi_uniqueid": "1700000000.7", "agi_extension": "89161230000"}, [])
    arguments = outgoing_arguments(["101", "", "mts", "bad id;"], header)
    assert (arguments.extension, arguments.dialled, arguments.trunk, arguments.external_call_id) == (
        "101", "89161230000", "mts", "1700000000.7")
    assert outgoing_arguments(["PJSIP/101", "79161230000", "", "1.2"], header).extension == ""


def test_each_trunk_has_its_line_and_the_others_the_default():
    config = parse_config('bitrix: {webhook_url: "https://x.bitrix24.ru/rest/1/code/"}\n'
                          "routing: {fallback_queue: support}\nusers: {}\ncallcard:\n" + textwrap.indent(LINES, "  "),
                          "c.yaml")
    outgoing = config.callcard.outgoing
    assert [outgoing.line_of(trunk) for trunk in ("1", "mts", "beeline")] == [
        "74951112233", "74957654321", "74950000000"]
    assert (outgoing.show, outgoing.crm_create) == (False, False)


def test_outgoing_config_problems_are_reported_with_file_line_and_key():
    text = textwrap.dedent("""\
        bitrix: {webhook_url: "https://x.bitrix24.ru/rest/1/code/"}
        routing: {fallback_queue: support}
        callcard:
          outgoing:
            lines:
              - {trunk: "main trunk", line: "74951112233"}
              - {trunk: 2, line: "74951112233,9"}
              - {trunk: 3}
            line_number: "+7 495"
            crm_create: maybe
        users: {}
        """)
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "c.yaml")
    assert [str(p) for p in raised.value.problems] == [
        ("c.yaml:6: callcard.outgoing.lines[0]: trunk: the trunk's name or number as the dialplan passes it"
         " (letters, digits, _ . + -)"),
        ("c.yaml:7: callcard.outgoing.lines[1]: line: '74951112233,9' is not a LINE_NUMBER (digits, letters, '+',"
         " '_', '.', '-')"),
        "c.yaml:8: callcard.outgoing.lines[2]: expected {trunk: NAME, line: NUMBER}, got {'trunk': 3}",
        "c.yaml:9: callcard.outgoing.line_number: '+7 495' must be digits, letters, '+', '_', '.', '-'",
        "c.yaml:10: callcard.outgoing.crm_create: expected true or false, got 'maybe'",
    ]


def test_outgoing_calls_without_a_user_directory_are_a_problem():
    text = textwrap.dedent("""\
        bitrix: {webhook_url: "https://x.bitrix24.ru/rest/1/code/"}
        routing: {fallback_queue: support}
        callcard:
          outbox: /var/lib/agi-bitrix/outbox.sqlite3
          outgoing: {lines: [{trunk: main, line: "74951112233"}]}
        """)
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "c.yaml")
    assert [str(p) for p in raised.value.problems] == [
        ("c.yaml:5: callcard.outgoing: needs a users section: the user directory turns the caller's extension"
         " into a Bitrix24 user")]
    assert parse_config(text + "users: {}\n", "c.yaml").callcard.outgoing.line_of("main") == "74951112233"


# -- the whole application --------------------------------------------------------------------


@pytest.fixture
async def portal():
    emulator = PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS)
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
async def server(portal, tmp_path):
    running = await Running(callcard_config(portal.webhook_url, tmp_path / "outbox.sqlite3", LINES)).start()
    yield running
    await running.stop()


async def outgoing(server, extension="101", dialled="8 916 123-00-00", trunk="1", linkedid="1700000000.5"):
    result = await server.call("outgoing", (extension, dialled, trunk, linkedid), uniqueid=linkedid)
    assert len(result.commands) == 1, result.commands  # one EXEC MSet: a single round trip
    return result.variables


async def test_a_call_from_a_desk_phone_is_registered_as_outgoing_for_its_user(server, portal):
    variables = await outgoing(server)
    call_id = variables["B24_CALL_ID"]
    assert variables == {"B24_CALL_ID": call_id, "B24_USER_ID": "1", "B24_REGISTER_ERROR": ""}
    registered = portal.calls[call_id]
    assert {k: v for k, v in registered.params.items() if k != "CALL_START_DATE"} == {
        "USER_ID": "1", "PHONE_NUMBER": CLIENT, "TYPE": "1", "CRM_CREATE": "0", "SHOW": "0",
        "LINE_NUMBER": "74951112233", "EXTERNAL_CALL_ID": "1700000000.5"}
    assert registered.card_shown_to == set()  # show: false
    # Another trunk, another line; a trunk not listed, the default line.
    assert portal.calls[(await outgoing(server, trunk="mts", linkedid="1.2"))["B24_CALL_ID"]].params[
        "LINE_NUMBER"] == "74957654321"
    assert portal.calls[(await outgoing(server, trunk="", linkedid="1.3"))["B24_CALL_ID"]].params[
        "LINE_NUMBER"] == "74950000000"


@pytest.mark.parametrize(("dialled", "reason"), [("112", EMERGENCY), ("104", SHORT), ("205", NOT_EXTERNAL)])
async def test_internal_short_and_emergency_numbers_never_wait_on_the_portal(server, portal, dialled, reason):
    portal.fail("hang", method=REGISTER)
    started = time.monotonic()
    variables = await outgoing(server, dialled=dialled)
    assert time.monotonic() - started < 0.2
    assert variables == {"B24_CALL_ID": "", "B24_USER_ID": "", "B24_REGISTER_ERROR": reason}
    assert portal.requests_for(REGISTER) == []


@pytest.mark.parametrize("extension", ["199", "113"], ids=["nobody's", "a deactivated user's"])
async def test_an_extension_without_a_user_is_logged_and_the_call_goes_on(server, portal, caplog, extension):
    variables = await outgoing(server, extension=extension)
    assert variables == {"B24_CALL_ID": "", "B24_USER_ID": "", "B24_REGISTER_ERROR": "no_user"}
    assert portal.requests_for(REGISTER) == []
    assert (f"outgoing call from extension {extension} is not registered: no active Bitrix24 user has it"
            in caplog.text)


async def test_a_hung_portal_lets_the_call_go_on_at_the_register_deadline(portal, tmp_path):
    variables, took = await register_with_a_hung_portal(portal, tmp_path, outgoing)
    assert variables == {"B24_CALL_ID": "", "B24_USER_ID": "1", "B24_REGISTER_ERROR": "timeout"}
    assert 0.3 <= took < 0.8


@pytest.mark.parametrize(("dialstatus", "answered", "code", "duration"), [
    ("ANSWER", True, "200", "42"), ("BUSY", False, "486", "0"), ("NOANSWER", False, "304", "0")])
async def test_the_finish_is_the_callers_with_talk_time_and_status(server, portal, dialstatus, answered, code,
                                                                    duration):
    # Anna (extension 101) calls Igor's mobile: the call stays hers. The sample's stamp names the
    # caller's extension; the number that answered would name Igor.
    variables = await outgoing(server, dialled=IGORS_MOBILE)
    answered_at, answered_by = ("1700000100.000", "101") if answered else ("", "")
    await server.finish(variables["B24_CALL_ID"], variables["B24_USER_ID"], dialstatus, answered_at, answered_by,
                        "1700000142.200")
    await until(lambda: delivered_finishes(portal))
    assert delivered_finishes(portal) == [{"CALL_ID": variables["B24_CALL_ID"], "USER_ID": "1",
                                           "DURATION": duration, "STATUS_CODE": code}]
    assert len(portal.requests_for(FINISH)) == 1


@pytest.mark.parametrize(("mark", "code"), [("outgoing", "603-S"), ("", "304")], ids=["outgoing", "incoming"])
async def test_an_outgoing_call_the_employee_gives_up_on_is_cancelled_not_missed(server, portal, mark, code):
    variables = await outgoing(server)
    result = await server.call("finish", (variables["B24_CALL_ID"], variables["B24_USER_ID"], "CANCEL", "", "",
                                          "1700000142.200", "", "", mark))
    assert result.commands == []
    await until(lambda: delivered_finishes(portal))
    assert delivered_finishes(portal)[0]["STATUS_CODE"] == code


async def test_without_a_callcard_section_outgoing_does_nothing(portal):
    from agi_bitrix.app import Application
    from agi_bitrix.testing.fake_asterisk import fake_call
    from tests.conftest import make_config

    app = Application(make_config(portal.webhook_url))
    host, port = await app.start("127.0.0.1", 0)
    try:
        result = await fake_call(host, port, script="outgoing", args=("101", "79161230000", "1", "1.1"))
    finally:
        await app.stop()
    assert result.variables == {"B24_CALL_ID": "", "B24_USER_ID": "", "B24_REGISTER_ERROR": "disabled"}
    assert call_requests(portal) == []
