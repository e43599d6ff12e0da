"""The follow-up of a missed call from a known client (callcard.follow_up): end to end, the whole
application over real TCP against the portal emulator over real HTTP, with the outbox in a real
SQLite file; crm.activity.todo.add and im.notify.personal.add as the REST docs describe them."""

import asyncio

import pytest

from agi_bitrix.testing.portal_model import TODO_ADD_METHOD
from tests.conftest import until
from tests.test_callcard import ANNA, FINISH, Running, callcard_config, delivered_finishes

# What the sample's caller channel holds after routing Anna's client: B24_ENTITY_TYPE,
# B24_ENTITY_ID, B24_PHONE, as GET FULL VARIABLE evaluates them.
ANNAS_CLIENT = f"CONTACT,12,{ANNA}"
HANGUP_AT = "1700000030.0"


def follow_up_config(portal, tmp_path, kind):
    return callcard_config(portal.webhook_url, tmp_path / "outbox.sqlite3",
                           f"follow_up: {{kind: {kind}, deadline: 7200}}")


async def missed(running, call_id, channel_values=ANNAS_CLIENT, dialstatus="NOANSWER"):
    """The sample's finish in the hangup handler; the server reads the CRM object off the channel."""
    result = await running.call("finish", (call_id, "1", dialstatus, "", "", HANGUP_AT, ""),
                                uniqueid="1700000000.1", full_variable=channel_values)
    # One GET FULL VARIABLE at most: the hangup handler waits for nothing else.
    assert [command for command in result.commands if not command.startswith("GET FULL VARIABLE")] == []
    return result


def methods(portal):
    return [request.method for request in portal.requests
            if request.method not in ("scope", "user.get", "telephony.externalcall.register")]


@pytest.fixture
async def todo_server(portal, tmp_path):
    running = await Running(follow_up_config(portal, tmp_path, "todo")).start()
    yield running
    await running.stop()


async def test_a_missed_call_from_a_client_leaves_one_todo_for_the_responsible_after_the_finish(
        todo_server, portal):
    call_id = (await todo_server.register())["B24_CALL_ID"]
    await asyncio.gather(*(missed(todo_server, call_id) for _ in range(2)))  # the h extension and a handler
    await until(lambda: portal.todos, what="the to-do")
    await asyncio.sleep(0.3)  # time for a second one, if there were going to be one

    assert methods(portal) == [FINISH, TODO_ADD_METHOD]  # in this order, each once
    assert portal.todos == [{"ownerTypeId": "3", "ownerId": "12", "deadline": "2023-11-15T00:13:50+00:00",
                             "title": f"Missed call from {ANNA}",
                             "description": f"The client called from {ANNA} and nobody answered: call back.",
                             "responsibleId": "1"}]
    assert delivered_finishes(portal)[0]["STATUS_CODE"] == "304"


async def test_a_notification_instead_when_configured(portal, tmp_path):
    running = await Running(follow_up_config(portal, tmp_path, "notify")).start()
    try:
        call_id = (await running.register())["B24_CALL_ID"]
        await missed(running, call_id)
        await until(lambda: portal.notifications, what="the notification")
    finally:
        await running.stop()
    assert portal.notifications == [
        {"USER_ID": "1", "MESSAGE": f"Missed call from {ANNA} (CONTACT 12): nobody answered, call back."}]
    assert portal.todos == []


@pytest.mark.parametrize("channel_values, dialstatus", [
    (",,79990001122", "NOANSWER"),  # not in the CRM: no object to follow up on
    (ANNAS_CLIENT, "ANSWER"),  # answered
    (ANNAS_CLIENT, "BUSY"),  # 486, not a missed call
    (f"CONTACT,12&ownerTypeId=1,{ANNA}", "NOANSWER"),  # what a channel variable should never hold
    (f"USER,1,{ANNA}", "NOANSWER"),  # no CRM object a to-do can be on
])
async def test_no_follow_up_without_a_known_client_or_a_missed_call(todo_server, portal, channel_values, dialstatus):
    call_id = (await todo_server.register())["B24_CALL_ID"]
    await missed(todo_server, call_id, channel_values, dialstatus)
    await until(lambda: delivered_finishes(portal))
    await asyncio.sleep(0.3)
    assert portal.todos == [] and methods(portal) == [FINISH]


async def test_off_by_default_and_the_hangup_handler_reads_nothing_more(portal, tmp_path):
    running = await Running(callcard_config(portal.webhook_url, tmp_path / "outbox.sqlite3")).start()
    try:
        assert running.config.callcard.follow_up.kind == "off"
        call_id = (await running.register())["B24_CALL_ID"]
        result = await missed(running, call_id)
        await until(lambda: delivered_finishes(portal))
        await asyncio.sleep(0.3)
    finally:
        await running.stop()
    assert result.commands == [] and portal.todos == [] and portal.notifications == []


async def test_a_follow_up_the_portal_refuses_for_a_while_is_retried_and_sent_once(todo_server, portal):
    portal.fail("html", method=TODO_ADD_METHOD, status=502, times=2)  # the portal down behind its proxy
    call_id = (await todo_server.register())["B24_CALL_ID"]
    await missed(todo_server, call_id)
    await until(lambda: portal.todos, timeout=5, what="the to-do after the refusals")
    await asyncio.sleep(0.3)
    assert len(portal.requests_for(TODO_ADD_METHOD)) == 3 and len(portal.todos) == 1


async def test_a_follow_up_survives_a_restart_and_is_sent_once(portal, tmp_path):
    config = follow_up_config(portal, tmp_path, "todo")
    portal.fail("hang", method=FINISH)  # the finish (and so its follow-up) waits
    running = await Running(config).start()
    try:
        call_id = (await running.register())["B24_CALL_ID"]
        await missed(running, call_id)
        await until(lambda: portal.requests_for(FINISH), what="the first attempt of the finish")
    finally:
        portal.reset_faults()
        await running.stop()
    running = await Running(config).start()
    try:
        await until(lambda: portal.todos, what="the to-do after the restart")
        await asyncio.sleep(0.3)
    finally:
        await running.stop()
    assert len(portal.todos) == 1 and portal.todos[0]["ownerId"] == "12"


def test_the_follow_up_kind_is_checked():
    from agi_bitrix.checking import ConfigError

    with pytest.raises(ConfigError) as refused:
        callcard_config("https://p.bitrix24.ru/rest/1/x/", "/tmp/o.sqlite3", "follow_up: {kind: email}")
    assert "callcard.follow_up.kind: 'email' is not one of off, todo, notify" in str(refused.value.problems[0])
    with pytest.raises(ConfigError) as refused:  # YAML's off is false: the check says to quote it
        callcard_config("https://p.bitrix24.ru/rest/1/x/", "/tmp/o.sqlite3", "follow_up: {kind: off}")
    assert "callcard.follow_up.kind: YAML read this as False; put the value in quotes" in str(
        refused.value.problems[0])
