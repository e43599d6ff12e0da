"""register and finish end to end: the whole application over real TCP, spoken to like Asterisk
does, against the portal emulator over real HTTP, with the outbox in a real SQLite file."""

import asyncio
import sys
import textwrap
import time

import pytest

from agi_bitrix.app import Application
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.config import load_config, parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from tests.conftest import TEST_RULES, until
from tests.filesystems import fill, remount, tmpfs
from tests.network import free_port

REGISTER = "telephony.externalcall.register"
FINISH = "telephony.externalcall.finish"
ANNA = "79161234567"  # CONTACT 12 of Anna (user 1, extension 101)
ANDREY = "74991112233"  # COMPANY 12 of Andrey (user 13), whose account is deactivated
UNKNOWN = "79990001122"
DID = "74950000000"


def callcard_config(webhook_url, outbox, callcard="", users="users: {refresh: 600}", deadline=1.0,
                    retry="{first: 0.05, max: 0.2}", rate_limit="{per_second: 1000, burst: 1000}"):
    text = textwrap.dedent(f"""\
        bitrix: {{webhook_url: "{webhook_url}", deadline: {deadline}, rate_limit: {rate_limit}}}
        routing:
          fallback_queue: support
          timezone: Europe/Moscow
          rules:
        """) + textwrap.indent(TEST_RULES, "    ") + textwrap.dedent(f"""\
        {users}
        callcard:
          outbox: {outbox}
          finish:
            record_url: "https://pbx.example.com/records/{{uniqueid}}/{{recording}}"
            retry: {retry}
        """) + textwrap.indent(textwrap.dedent(callcard), "  ")
    return parse_config(text, "callcard-test.yaml")


class Running:
    """An Application that a test can stop and start again on the same outbox."""

    def __init__(self, config):
        self.config = config
        self.app = None
        self.address = None

    async def start(self):
        self.app = Application(self.config)
        self.address = await self.app.start("127.0.0.1", 0)
        if self.app.users is not None:
            await self.app.users.load()
        return self

    async def stop(self):
        await self.app.stop()

    async def call(self, script, args=(), **header):
        host, port = self.address
        return await fake_call(host, port, script=script, args=args, **header)

    async def register(self, phone=ANNA, owner="1", linkedid="1700000000.1", did=DID, entity=("CONTACT", "12")):
        result = await self.call("register", (phone, owner, linkedid, did, *entity), uniqueid=linkedid)
        assert len(result.commands) == 1, result.commands
        return result.variables

    async def finish(self, call_id, owner="1", dialstatus="ANSWER", answered_at="", answered_by="",
                     hangup_at="", recording="", uniqueid="1700000000.1"):
        result = await self.call("finish", (call_id, owner, dialstatus, answered_at, answered_by, hangup_at,
                                            recording), uniqueid=uniqueid)
        # The hangup never waits for the portal: the server sends Asterisk nothing.
        assert result.commands == []


@pytest.fixture
async def server(portal, tmp_path):
    running = await Running(callcard_config(portal.webhook_url, tmp_path / "outbox.sqlite3")).start()
    yield running
    await running.stop()


def delivered_finishes(portal):
    return [call.finish_params for call in portal.calls.values() if call.finish_params is not None]


# -- register ---------------------------------------------------------------------------------


async def test_register_sends_the_call_and_sets_the_call_id(server, portal):
    variables = await server.register()
    call_id = variables["B24_CALL_ID"]
    assert variables == {"B24_CALL_ID": call_id, "B24_REGISTER_ERROR": ""}
    registered = portal.calls[call_id]
    params = registered.params
    assert params["CALL_START_DATE"].endswith("+00:00")
    assert {k: v for k, v in params.items() if k != "CALL_START_DATE"} == {
        "USER_ID": "1", "PHONE_NUMBER": ANNA, "TYPE": "2", "CRM_CREATE": "0", "SHOW": "1",
        "LINE_NUMBER": DID, "EXTERNAL_CALL_ID": "1700000000.1",
        "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": "12",
    }
    assert (registered.user_id, registered.crm_entity_type, registered.crm_entity_id) == ("1", "CONTACT", 12)


async def test_two_calls_from_one_client_are_two_calls(server, portal):
    # Same number, user and line within 30 minutes: only EXTERNAL_CALL_ID keeps them apart.
    first = await server.register(linkedid="1700000000.1")
    second = await server.register(linkedid="1700000000.7")
    assert first["B24_CALL_ID"] != second["B24_CALL_ID"]
    assert len(portal.calls) == 2


async def test_register_without_owner_uses_the_default_user_and_config(portal, tmp_path):
    config = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", """\
        register:
          default_user: 2
          crm_create: true
          crm_source: CALL
          show: false
          line_number: sales-line
        """)
    running = await Running(config).start()
    try:
        variables = await running.register(phone="8 (999) 000-11-22", owner="", entity=("", ""))
    finally:
        await running.stop()
    params = portal.calls[variables["B24_CALL_ID"]].params
    assert (params["USER_ID"], params["PHONE_NUMBER"], params["CRM_CREATE"], params["CRM_SOURCE"],
            params["SHOW"], params["LINE_NUMBER"]) == ("2", UNKNOWN, "1", "CALL", "0", "sales-line")
    assert "CRM_ENTITY_TYPE" not in params
    # CRM_CREATE made a lead of the unknown number, as the portal does.
    assert portal.calls[variables["B24_CALL_ID"]].crm_entity_type == "LEAD"


async def test_register_without_any_user_asks_nobody(server, portal):
    variables = await server.register(owner="", entity=("", ""))
    assert variables == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": "no_user"}
    assert portal.requests_for(REGISTER) == []


async def test_register_without_a_number_asks_nobody(server, portal):
    result = await server.call("register", ("", "1", "1.2", DID), callerid="anonymous")
    assert result.variables == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": "no_number"}
    assert portal.requests_for(REGISTER) == []


async def test_arguments_that_are_not_what_they_claim_are_dropped(server, portal):
    # A user id that is not a number is no owner, and there is no default user here.
    assert await server.register(owner="1&USER_ID=2") == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": "no_user"}
    result = await server.call("register", (ANNA, "1", "1.1 x", "nonsense", "CONTACT", "12 OR 1"),
                               uniqueid="1700000000.9", extension="74951112233")
    params = portal.calls[result.variables["B24_CALL_ID"]].params
    # The AGI header stands in for what is unusable: the channel's uniqueid, the dialled number.
    assert (params["EXTERNAL_CALL_ID"], params["LINE_NUMBER"]) == ("1700000000.9", "74951112233")
    assert "CRM_ENTITY_TYPE" not in params and "CRM_ENTITY_ID" not in params


@pytest.mark.parametrize("fault, options, reason", [
    ("error", {"status": 503, "code": "QUERY_LIMIT_EXCEEDED", "description": "Too many requests"},
     "QUERY_LIMIT_EXCEEDED"),
    ("error", {"status": 400, "code": "", "description": "Some failure"}, "http_400"),
    ("html", {}, "http_502"),
    ("disconnect", {}, "connect"),
])
async def test_register_failure_is_reported_and_the_call_goes_on(server, portal, fault, options, reason, caplog):
    portal.fail(fault, method=REGISTER, **options)
    assert await server.register() == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": reason}
    assert "register failed" in caplog.text and portal.code not in caplog.text


async def register_with_a_hung_portal(portal, tmp_path, register):
    """`register(running)` with callcard.register.deadline 0.3 s (the lookups' 5 s) while the portal
    never answers: the variables it set, and how long it took."""
    config = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", "register: {deadline: 0.3}\n",
                             deadline=5.0)
    running = await Running(config).start()
    portal.fail("hang", method=REGISTER)
    try:
        started = time.monotonic()
        variables = await register(running)
        return variables, time.monotonic() - started
    finally:
        portal.reset_faults()
        await running.stop()


async def test_register_has_its_own_deadline(portal, tmp_path):
    variables, took = await register_with_a_hung_portal(portal, tmp_path, Running.register)
    assert variables == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": "timeout"}
    assert 0.3 <= took < 0.8


async def test_without_a_callcard_section_register_and_finish_do_nothing(portal):
    from tests.conftest import call_requests, make_config

    app = Application(make_config(portal.webhook_url))
    host, port = await app.start("127.0.0.1", 0)
    try:
        registered = await fake_call(host, port, script="register", args=(ANNA, "1", "1.1", DID))
        finished = await fake_call(host, port, script="finish", args=("externalCall.x.1", "1", "ANSWER"))
    finally:
        await app.stop()
    assert registered.variables == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": "disabled"}
    assert finished.commands == [] and call_requests(portal) == []


# -- finish -----------------------------------------------------------------------------------


async def test_answered_call_is_finished_with_who_took_it_talk_time_and_recording(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]
    # Anna's call was taken at Igor's extension 102 (user 2) after ringing: 42.6 s of talk.
    await server.finish(call_id, owner="1", dialstatus="ANSWER", answered_at="1700000010.250",
                        answered_by="102@internal", hangup_at="1700000052.851",
                        recording="/var/spool/asterisk/monitor/1700000000.1.wav")
    await until(lambda: delivered_finishes(portal))
    assert delivered_finishes(portal) == [{
        "CALL_ID": call_id, "USER_ID": "2", "DURATION": "43", "STATUS_CODE": "200",
        "RECORD_URL": "https://pbx.example.com/records/1700000000.1/1700000000.1.wav",
    }]


async def test_answer_on_the_owners_mobile_is_the_owner(server, portal):
    call_id = (await server.register(phone="79201112233", owner="8", entity=("LEAD", "95")))["B24_CALL_ID"]
    await server.finish(call_id, owner="8", answered_at="100.0", answered_by="79208880808@outbound",
                        hangup_at="105.0")
    await until(lambda: delivered_finishes(portal))
    assert delivered_finishes(portal)[0]["USER_ID"] == "8"


async def test_unknown_answerer_falls_back_to_the_owner(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]
    await server.finish(call_id, owner="1", answered_at="100.0", answered_by="PJSIP/trunk-0000001a",
                        hangup_at="101.2")
    await until(lambda: delivered_finishes(portal))
    finished = delivered_finishes(portal)[0]
    assert (finished["USER_ID"], finished["DURATION"], finished["STATUS_CODE"]) == ("1", "1", "200")


@pytest.mark.parametrize("dialstatus, code", [
    ("NOANSWER", "304"), ("CANCEL", "304"), ("", "304"), ("BUSY", "486"), ("CONGESTION", "503"),
    ("CHANUNAVAIL", "480"),
])
async def test_unanswered_call_is_finished_with_the_status_of_the_dial(server, portal, dialstatus, code):
    call_id = (await server.register())["B24_CALL_ID"]
    await server.finish(call_id, owner="1", dialstatus=dialstatus, hangup_at="1700000030.0")
    await until(lambda: delivered_finishes(portal))
    # No talk, no recording, the owner missed it.
    assert delivered_finishes(portal) == [{"CALL_ID": call_id, "USER_ID": "1", "DURATION": "0", "STATUS_CODE": code}]


async def test_queue_answer_after_a_failed_dial_counts_as_answered(server, portal):
    # The extension rang in vain (DIALSTATUS=NOANSWER), then a queue member took the call.
    call_id = (await server.register())["B24_CALL_ID"]
    await server.finish(call_id, dialstatus="NOANSWER", answered_at="50.0", answered_by="PJSIP/101-000000a2",
                        hangup_at="80.4")
    await until(lambda: delivered_finishes(portal))
    finished = delivered_finishes(portal)[0]
    assert (finished["USER_ID"], finished["DURATION"], finished["STATUS_CODE"]) == ("1", "30", "200")


async def test_a_call_that_was_not_registered_is_not_finished(server, portal):
    await server.finish("", owner="1", dialstatus="NOANSWER")
    await asyncio.sleep(0.1)
    assert portal.requests_for(FINISH) == []
    assert await server.app.outbox.count("pending") == 0


async def test_duplicate_finish_from_the_dialplan_is_sent_once(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]
    # Both the h extension and a hangup handler run finish for the same call.
    await asyncio.gather(*(server.finish(call_id, dialstatus="NOANSWER") for _ in range(3)))
    await until(lambda: delivered_finishes(portal))
    await asyncio.sleep(0.2)
    assert len(portal.requests_for(FINISH)) == 1


async def test_hangup_never_waits_for_a_hung_portal(server, portal):
    call_id = (await server.register())["B24_CALL_ID"]
    portal.fail("hang", method=FINISH)
    started = time.monotonic()
    await server.finish(call_id, dialstatus="NOANSWER")
    assert time.monotonic() - started < 0.2
    portal.reset_faults()
    await until(lambda: delivered_finishes(portal))


async def test_finishes_refused_while_the_portal_is_down_are_delivered_after_recovery(server, portal):
    call_ids = [(await server.register(linkedid=f"1.{n}"))["B24_CALL_ID"] for n in range(3)]
    portal.fail("html", method=FINISH, status=503)
    for call_id in call_ids:
        await server.finish(call_id, dialstatus="NOANSWER")
    await until(lambda: len(portal.requests_for(FINISH)) >= 4)  # retried, with backoff
    assert delivered_finishes(portal) == []
    portal.reset_faults()
    refused = len(portal.requests_for(FINISH))
    await until(lambda: len(delivered_finishes(portal)) == 3)
    await asyncio.sleep(0.3)
    # Each call finished, and none asked twice once the portal took them.
    assert sorted(p["CALL_ID"] for p in delivered_finishes(portal)) == sorted(call_ids)
    assert len(portal.requests_for(FINISH)) == refused + 3
    assert await server.app.outbox.count("delivered") == 3 and await server.app.outbox.count("pending") == 0


async def test_queued_finish_survives_a_restart_and_is_delivered_once(portal, tmp_path):
    config = callcard_config(portal.webhook_url, tmp_path / "outbox.sqlite3")
    running = await Running(config).start()
    call_id = (await running.register())["B24_CALL_ID"]
    portal.fail("html", method=FINISH, status=502)
    await running.finish(call_id, dialstatus="NOANSWER")
    await until(lambda: len(portal.requests_for(FINISH)) >= 1)
    await running.stop()
    assert delivered_finishes(portal) == []

    portal.reset_faults()
    before = len(portal.requests_for(FINISH))
    restarted = await Running(config).start()
    try:
        await until(lambda: delivered_finishes(portal))
        await asyncio.sleep(0.3)
        assert len(portal.requests_for(FINISH)) == before + 1
        assert (await restarted.app.outbox.row(call_id))["state"] == "delivered"
    finally:
        await restarted.stop()


async def test_a_finish_the_portal_refuses_for_good_is_kept_and_not_retried(server, portal, caplog):
    await server.finish("externalCall.never.registered", owner="1", dialstatus="NOANSWER")
    await until(lambda: portal.requests_for(FINISH))
    await asyncio.sleep(0.3)
    assert len(portal.requests_for(FINISH)) == 1
    row = await server.app.outbox.row("externalCall.never.registered")
    assert row["state"] == "failed" and "Call is not found" in row["last_error"]
    assert "finish externalCall.never.registered will not be delivered" in caplog.text
    assert portal.code not in caplog.text and portal.code not in row["last_error"]


async def test_a_lost_answer_is_not_a_second_finish(portal, tmp_path):
    # The portal finishes the call but its answer comes after our deadline; the retry then
    # hears "Call is not found": delivered, not failed.
    config = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", deadline=0.3, retry="{first: 0.5}")
    server = await Running(config).start()
    call_id = (await server.register())["B24_CALL_ID"]
    portal.fail("slow", method=FINISH, times=1, delay=0.5)
    try:
        await server.finish(call_id, dialstatus="NOANSWER")
        await until(lambda: len(portal.requests_for(FINISH)) >= 2, timeout=5)
        await asyncio.sleep(0.2)
        row = await server.app.outbox.row(call_id)
    finally:
        await server.stop()
    assert row["state"] == "delivered" and row["attempts"] == 2
    assert row["last_error"] == "finished by an earlier attempt"


# -- configuration ----------------------------------------------------------------------------


def test_callcard_config_problems_are_reported_with_file_line_and_key():
    from agi_bitrix.checking import ConfigError

    text = textwrap.dedent("""\
        bitrix: {webhook_url: "https://x.bitrix24.ru/rest/1/code/"}
        routing: {fallback_queue: support}
        callcard:
          outbox: var/outbox.sqlite3
          register:
            default_user: anna
            crm_source: "web form"
            deadlin: 3
          finish:
            record_url: "https://pbx.example.com/{linkedid}.wav"
            retry: {first: 60, max: 10}
        users: {refresh: -5}
        """)
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "c.yaml")
    assert [str(p) for p in raised.value.problems] == [
        ("c.yaml:4: callcard.outbox: 'var/outbox.sqlite3' must be an absolute path to the SQLite file,"
         " a redis:// URL, or redis (the redis section's)"),
        "c.yaml:6: callcard.register.default_user: 'anna' is not a Bitrix24 user id (a number)",
        "c.yaml:7: callcard.register.crm_source: 'web form' is not a CRM source id like CALL",
        "c.yaml:8: callcard.register.deadlin: unknown key; did you mean 'deadline'?",
        "c.yaml:10: callcard.finish.record_url: unknown field {linkedid}; expected {call_id}, {uniqueid}, {recording}",
        "c.yaml:11: callcard.finish.retry.max: 10 is shorter than retry.first (60)",
        "c.yaml:12: users.refresh: expected a number of seconds from 0 to 86400, got -5",
    ]


def test_without_the_sections_the_call_card_is_off_and_the_directory_asks_for_the_user_scope():
    config = parse_config('bitrix: {webhook_url: "https://x.bitrix24.ru/rest/1/code/"}\n'
                          "routing: {fallback_queue: support}\n")
    assert (config.callcard.enabled, config.users.refresh, config.users.automatic) == (False, 600.0, True)
    config = parse_config('bitrix: {webhook_url: "https://x.bitrix24.ru/rest/1/code/"}\n'
                          "routing: {fallback_queue: support}\ncallcard:\nusers:\n")
    assert (config.callcard.enabled, config.callcard.outbox, config.users.refresh) == (
        True, "/var/lib/agi-bitrix/outbox.sqlite3", 600.0)


async def test_a_reload_changes_register_settings_without_a_restart(portal, tmp_path):
    path = tmp_path / "agi-bitrix.yaml"
    outbox = tmp_path / "o.sqlite3"

    def config_text(default_user):
        return textwrap.dedent(f"""\
            bitrix: {{webhook_url: "{portal.webhook_url}"}}
            routing: {{fallback_queue: support}}
            callcard:
              outbox: {outbox}
              register: {{default_user: {default_user}}}
            """)

    path.write_text(config_text(1))

    app = Application(load_config(path))
    host, port = await app.start("127.0.0.1", 0)
    try:
        first = await fake_call(host, port, script="register", args=(ANNA, "", "1.1", DID))
        path.write_text(config_text(2))
        assert await app.reload()
        second = await fake_call(host, port, script="register", args=(ANNA, "", "1.2", DID))
    finally:
        await app.stop()
    users = [portal.calls[r.variables["B24_CALL_ID"]].user_id for r in (first, second)]
    assert users == ["1", "2"]


async def test_serve_refuses_to_share_an_outbox_with_a_running_server(server, portal, tmp_path):
    # `server` holds tmp_path/outbox.sqlite3; a second process on the same file would send
    # finishes twice, so it must not start.
    config = tmp_path / "second.yaml"
    config.write_text(textwrap.dedent(f"""\
        bitrix: {{webhook_url: "{portal.webhook_url}"}}
        routing: {{fallback_queue: support}}
        callcard: {{outbox: {tmp_path / "outbox.sqlite3"}}}
        metrics: {{listen: "off"}}
        """))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", "serve", "-c", str(config), "--listen", f"127.0.0.1:{free_port()}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert (f"outbox {tmp_path / 'outbox.sqlite3'} is in use by another agi-bitrix process; nothing was started"
            in output.decode())
    assert "Traceback" not in output.decode() and portal.code not in output.decode()


# -- the portal's request budget --------------------------------------------------------------


async def test_register_spends_the_request_budget_the_lookups_spend(portal, tmp_path):
    # No user directory here: its user.get requests would take slots of this tiny budget too.
    config = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", users="users: {refresh: 0}",
                             rate_limit="{per_second: 0.2, burst: 2}")
    running = await Running(config).start()
    try:
        host, port = running.address
        routed = await fake_call(host, port, callerid="89161234567")  # one slot
        first = await running.register()  # the other
        second = await running.register(linkedid="1700000000.2")
    finally:
        await running.stop()
    assert routed.variables["B24_STATUS"] == "FOUND" and first["B24_REGISTER_ERROR"] == ""
    # The next slot is 5 s away, past the deadline: no request, and the call goes on.
    assert second == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": "rate_limited"}
    assert len(portal.requests_for(REGISTER)) == 1


class StoppedClock:
    """A monotonic clock for the request budget that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def test_finishes_wait_for_a_free_slot_and_a_limit_from_the_portal_holds_everyone_back(portal, tmp_path):
    config = callcard_config(portal.webhook_url, tmp_path / "o.sqlite3", rate_limit="{per_second: 100, burst: 5}")
    running = await Running(config).start()
    # The portal's pause lasts until the test moves the budget's clock, however slowly a loaded
    # machine runs the steps in between (on the real clock the lookup below could come too late).
    clock = StoppedClock()
    budget = running.app.portal.budget
    running.app.portal.budget = RateLimiter(budget.per_second, budget.burst, clock=clock)
    try:
        call_id = (await running.register())["B24_CALL_ID"]
        portal.fail("error", method=FINISH, times=1, status=503, code="QUERY_LIMIT_EXCEEDED",
                    description="Too many requests")
        await running.finish(call_id, dialstatus="NOANSWER")
        await until(lambda: portal.requests_for(FINISH))
        # The portal's refusal pauses every request of ours: a lookup now takes the fallback.
        host, port = running.address
        v = (await fake_call(host, port, callerid="89262345678")).variables
        assert (v["B24_STATUS"], v["B24_ERROR"]) == ("ERROR", "rate_limited")
        # The finish is tried again during the pause and held back on our side: no request.
        deadline = time.monotonic() + 5
        while "rate_limited" not in ((await running.app.outbox.row(call_id))["last_error"] or ""):
            assert time.monotonic() < deadline, "the finish was not retried during the pause"
            await asyncio.sleep(0.01)
        assert delivered_finishes(portal) == []
        # After the pause (2 s) the finish goes through, and the outbox records it.
        clock.now += 2.1
        await until(lambda: delivered_finishes(portal), what="the finish after the pause")
        await until(lambda: running.app.outbox.waiting == 0, what="the outbox to record the delivery")
        row = await running.app.outbox.row(call_id)
        assert row["state"] == "delivered" and "rate_limited" in row["last_error"]
    finally:
        await running.stop()


def test_the_yaml_in_the_call_card_docs_is_valid_config():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "call-card.md").read_text(encoding="utf-8")
    callcard, redis_outbox, lines, oauth, install = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    routing = "routing: {fallback_queue: support}\n"
    config = parse_config('bitrix: {webhook_url: "https://portal.example/rest/1/code/"}\n' + routing
                          + textwrap.dedent(callcard), "call-card.md")
    assert (config.callcard.register.default_user, config.callcard.finish.retry_max, config.users.refresh) == (
        "1", 600.0, 600.0)
    config = parse_config('bitrix: {webhook_url: "https://portal.example/rest/1/code/"}\n' + routing
                          + textwrap.dedent(redis_outbox), "call-card.md")
    assert (config.callcard.outbox, config.callcard.outbox_claim_after) == ("redis://:PASSWORD@10.0.0.5:6379/0", 60.0)
    config = parse_config('bitrix: {webhook_url: "https://portal.example/rest/1/code/"}\n' + routing + lines)
    assert [(line.number, line.crm_source) for line in config.lines] == [("74951112233", "CALL"),
                                                                          ("78005550000", "ADVERTISING")]
    config = parse_config(textwrap.dedent(oauth) + routing, "call-card.md",
                          environ={"AGI_BITRIX_CLIENT_SECRET": "s"})
    assert config.bitrix.oauth.token_file == "/var/lib/agi-bitrix/oauth.json"
    # The install callback's lines go into that application's section.
    import yaml

    merged, extra = yaml.safe_load(textwrap.dedent(oauth)), yaml.safe_load(install)
    merged["bitrix"]["oauth"].update(extra["bitrix"]["oauth"])
    config = parse_config(yaml.safe_dump({**merged, "http": extra["http"]}) + routing, "call-card.md",
                          environ={"AGI_BITRIX_CLIENT_SECRET": "s"})
    assert (config.bitrix.oauth.install_path, config.http.host, config.http.enabled) == (
        "/bitrix/install", "0.0.0.0", True)


async def test_metrics_show_finishes_waiting_and_failed(server, portal):
    def gauge(name):
        lines = server.app.metrics.exposition().decode().splitlines()
        line = next(entry for entry in lines if entry.startswith(name + " "))
        return float(line.split()[1])

    call_id = (await server.register())["B24_CALL_ID"]
    portal.fail("hang", method=FINISH)
    await server.finish(call_id, dialstatus="NOANSWER")
    await server.finish("externalCall.never.registered", dialstatus="NOANSWER")
    assert gauge("agi_bitrix_finishes_waiting") == 2
    portal.reset_faults()
    await until(lambda: gauge("agi_bitrix_finishes_waiting") == 0)
    assert gauge("agi_bitrix_finishes_failed") == 1


async def test_a_bare_register_reads_the_dialplan_values_in_one_more_round_trip(server, portal):
    # The fake Asterisk knows no variables (GET FULL VARIABLE gives nothing): the AGI header
    # stands in. The real-Asterisk test shows the values read from a real channel.
    result = await server.call("register", (), callerid="89161234567", uniqueid="1700000000.5")
    assert len(result.commands) == 2 and result.commands[1].startswith("EXEC MSet ")
    assert result.commands[0] == ('GET FULL VARIABLE "${B24_PHONE},${B24_USER_ID},${CHANNEL(linkedid)},${EXTEN},'
                                  '${B24_ENTITY_TYPE},${B24_ENTITY_ID}"')
    assert result.variables == {"B24_CALL_ID": "", "B24_REGISTER_ERROR": "no_user"}


# -- an outbox that cannot be used takes the call card down, never routing --------------------


def gauge_of(app, name):
    lines = app.metrics.exposition().decode().splitlines()
    return float(next(entry for entry in lines if entry.startswith(name + " ")).split()[1])


async def test_an_outbox_folder_that_cannot_be_written_leaves_routing_up_and_the_call_card_recovers(
        portal, tmp_path, caplog):
    with tmpfs(tmp_path / "state", "1m", read_only=True) as folder:
        outbox = folder / "outbox.sqlite3"
        running = await Running(callcard_config(portal.webhook_url, outbox)).start()
        try:
            host, port = running.address
            routed = await fake_call(host, port, callerid="89161234567")
            assert (routed.variables["B24_STATUS"], routed.variables["B24_TARGET"]) == ("FOUND", "101")
            call_id = (await running.register())["B24_CALL_ID"]
            await running.finish(call_id, dialstatus="NOANSWER")
            healthy, body = running.app.health()
            assert healthy and body["status"] == "ok"  # calls are routed by the CRM
            assert body["callcard"] == {
                "state": "down", "problem": f"cannot open outbox {outbox}: Read-only file system",
                "outbox": str(outbox), "finishes_waiting": 1, "finishes_kept_in_memory": 1, "finishes_failed": 0,
                "finishes_lost": 0}
            assert gauge_of(running.app, "agi_bitrix_callcard_up") == 0
            assert gauge_of(running.app, "agi_bitrix_finishes_waiting") == 1
            assert gauge_of(running.app, "agi_bitrix_finishes_kept_in_memory") == 1
            assert delivered_finishes(portal) == []
            assert any(r.levelname == "ERROR" and r.getMessage().startswith(
                f"call card is DOWN: cannot open outbox {outbox}: Read-only file system") for r in caplog.records)

            remount(folder, read_only=False)
            await until(lambda: delivered_finishes(portal), what="the finish kept while the folder was read-only")
            await asyncio.sleep(0.3)
            assert [p["CALL_ID"] for p in delivered_finishes(portal)] == [call_id]
            assert len(portal.requests_for(FINISH)) == 1
            assert running.app.health()[1]["callcard"]["state"] == "up"
            assert gauge_of(running.app, "agi_bitrix_callcard_up") == 1
            assert gauge_of(running.app, "agi_bitrix_finishes_waiting") == 0
        finally:
            await running.stop()


async def test_serve_starts_and_routes_when_the_outbox_folder_cannot_be_written(portal, tmp_path):
    with tmpfs(tmp_path / "state", "1m", read_only=True) as folder:
        config = tmp_path / "serve.yaml"
        config.write_text(textwrap.dedent(f"""\
            bitrix: {{webhook_url: "{portal.webhook_url}"}}
            routing: {{fallback_queue: support}}
            callcard: {{outbox: {folder / "outbox.sqlite3"}}}
            metrics: {{listen: "off"}}
            """))
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agi_bitrix", "serve", "-c", str(config), "--listen", f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            routed = None
            deadline = time.monotonic() + 20
            while routed is None:
                assert process.returncode is None, (await process.stdout.read()).decode()
                assert time.monotonic() < deadline, "serve did not start listening"
                try:
                    routed = await fake_call("127.0.0.1", port, callerid="89161234567")
                except OSError:
                    await asyncio.sleep(0.1)
            assert routed.variables["B24_STATUS"] == "FOUND"
        finally:
            process.terminate()
            output, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, output.decode()
        assert "call card is DOWN: cannot open outbox" in output.decode()


async def test_finishes_asked_for_while_the_disk_is_full_are_delivered_once_space_returns(portal, tmp_path, caplog):
    # A real full file system: a 1 MiB tmpfs, filled up after the outbox opened.
    with tmpfs(tmp_path / "state", "1m") as folder:
        running = await Running(callcard_config(portal.webhook_url, folder / "outbox.sqlite3")).start()
        try:
            call_ids = [(await running.register(linkedid=f"1.{n}"))["B24_CALL_ID"] for n in range(3)]
            filler = fill(folder)
            for call_id in call_ids:
                await running.finish(call_id, dialstatus="NOANSWER")
            callcard = running.app.health()[1]["callcard"]
            assert (callcard["state"], callcard["finishes_kept_in_memory"], callcard["finishes_waiting"]) == (
                "down", 3, 3)
            assert "database or disk is full" in callcard["problem"]
            assert gauge_of(running.app, "agi_bitrix_callcard_up") == 0
            kept = [r for r in caplog.records if r.getMessage().startswith("finish ") and "kept in memory" in
                    r.getMessage()]
            assert len(kept) == 3 and {r.levelname for r in kept} == {"ERROR"}
            await asyncio.sleep(0.3)  # retried every 0.05 s meanwhile, and still full
            assert delivered_finishes(portal) == []
            messages = [r.getMessage() for r in caplog.records]
            assert sum(m.startswith("call card is DOWN") for m in messages) == 1  # once per change
            assert not any(m.startswith("call card is up again") for m in messages)

            filler.unlink()
            await until(lambda: len(delivered_finishes(portal)) == 3, what="the finishes kept while the disk was full")
            await asyncio.sleep(0.3)
            assert sorted(p["CALL_ID"] for p in delivered_finishes(portal)) == sorted(call_ids)
            assert len(portal.requests_for(FINISH)) == 3
            assert await running.app.outbox.count("delivered") == 3
            assert running.app.health()[1]["callcard"]["state"] == "up"
        finally:
            await running.stop()
