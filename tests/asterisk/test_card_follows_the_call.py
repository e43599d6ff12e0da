"""The plain-Asterisk sample on a real Asterisk 20 and 22: the call card follows the call (Dial's
and Queue's pre-dial handler b() shows it to each ringing phone's user, the answer hides it from
the rest) and the phones show the client's name from the CRM (B24_NAME into CALLERID(name)).
agi-bitrix runs as its own process against the portal emulator."""

import asyncio
import time

import pytest
import pytest_asyncio
import yaml

from agi_bitrix.routing.variables import display_name
from agi_bitrix.testing.ami_calls import event_name_of
from agi_bitrix.testing.sample_data import HOSTILE_NAME
from tests.conftest import until

from .crm import crm_object, fresh_phone
from .sample_calls import WAIT, sample_call
from .test_callcard import (
    DEFAULT_USER,
    CallCardServer,
    callcard_call,
    finished,
    registered_call,
    running_callcard_server,
    user_directory_refreshed,
)

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

SHOW = "telephony.externalcall.show"
HIDE = "telephony.externalcall.hide"
FINISH = "telephony.externalcall.finish"
MEMBERS = {"301": 301, "302": 302, "303": 303}  # extension: Bitrix24 user id


def member(extension):
    return f"Local/{extension}@agi-bitrix-test-phones/n"


@pytest.fixture(scope="module")
def card_server(portal, tmp_path_factory):
    """The shipped config with a call card (register SHOW on) and the user directory."""
    with running_callcard_server(portal, tmp_path_factory.mktemp("cards")) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def three_member_queue(portal, pbx):
    """Queue `support` with three members, each an employee in the user directory."""
    for extension, user in MEMBERS.items():
        portal.set_client(fresh_phone(), [crm_object(user, "OPENED", extension=extension)])
    await user_directory_refreshed(portal)
    for extension in MEMBERS:
        pbx.cli(f"queue add member {member(extension)} to support")
    yield
    for extension in MEMBERS:
        pbx.cli(f"queue remove member {member(extension)} from support")


def card_requests(portal, method, call_id):
    """USER_ID of each show or hide for this call, as sets of user ids (a list arrives as PHP's array)."""
    found = []
    for request in portal.requests_for(method):
        if request.params.get("CALL_ID") == call_id:
            users = request.params.get("USER_ID")
            found.append(frozenset(users.values()) if isinstance(users, dict) else frozenset([users]))
    return found


async def test_a_queue_of_three_shows_three_cards_and_the_answer_hides_the_rest(
        calls, portal, card_server, three_member_queue):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(300, "PAUSED", extension="300")])  # on a break: the queue

    call = callcard_call(calls, card_server, phone, answering="302")
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="302")
    card = await finished(portal, phone)

    shows = card_requests(portal, SHOW, card.call_id)
    assert sorted(shows, key=sorted) == [{"301"}, {"302"}, {"303"}]
    await until(lambda: card_requests(portal, HIDE, card.call_id), WAIT, interval=0.05)
    # The owner had it from register (SHOW), the members from their rings: all but 302 lose it.
    assert card_requests(portal, HIDE, card.call_id) == [{"300", "301", "303"}]
    assert card.card_requests[-1][0] == "hide"
    assert (card.finish_params["USER_ID"], card.finish_params["STATUS_CODE"]) == ("302", "200")


async def test_the_owners_extension_leg_and_a_queue_member(calls, portal, card_server, three_member_queue):
    """Dial's b() on the owner's extension (the owner already has the card from register: no
    second show), then the queue; the member who answers gets it, the owner loses it."""
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(304, "OPENED", extension="304")])

    call = callcard_call(calls, card_server, phone, answering="303")
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="303")
    card = await finished(portal, phone)
    await until(lambda: card_requests(portal, HIDE, card.call_id), WAIT, interval=0.05)

    assert next(event["Number"] for event in call.events if event_name_of(event) == "AgiBitrixTestRing") == "304"
    assert sorted(card_requests(portal, SHOW, card.call_id), key=sorted) == [{"301"}, {"302"}, {"303"}]
    assert card_requests(portal, HIDE, card.call_id) == [{"301", "302", "304"}]
    assert card.finish_params["USER_ID"] == "303"


async def test_a_hung_portal_does_not_hold_the_members_ring(calls, portal, card_server, three_member_queue):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(305, "PAUSED", extension="305")])
    portal.fail("hang", method=SHOW)
    try:
        call = callcard_call(calls, card_server, phone)
        joined = await calls.wait_for(call, "QueueCallerJoin", WAIT)
        joined_at = time.monotonic()
        for extension in MEMBERS:
            await calls.wait_for(call, "AgiBitrixTestRing", WAIT, Number=extension)
        ringing_after = time.monotonic() - joined_at
        await calls.hangup(joined["Channel"])
    finally:
        portal.reset_faults()
    # Three pre-dial AGI sessions, each waiting for nothing but the server's reply.
    assert ringing_after < 1.0, ringing_after


def methods_in_order(portal, call_id):
    """Each request about this call, as (method, USER_ID as a set), in the order the portal got them."""
    found = []
    for request in portal.requests:
        if request.params.get("CALL_ID") == call_id:
            users = request.params.get("USER_ID")
            found.append((request.method, frozenset(users.values()) if isinstance(users, dict) else frozenset([users])))
    return found


async def test_a_queue_call_the_caller_abandons_is_hidden_from_every_member(
        calls, portal, card_server, three_member_queue):
    """Three members ring, nobody answers, the caller hangs up after 3 s: the finish goes to the
    owner (whose card it closes) and one hide, before it, closes the three members' cards."""
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(309, "PAUSED", extension="309")])

    call = callcard_call(calls, card_server, phone)
    joined = await calls.wait_for(call, "QueueCallerJoin", WAIT)
    for extension in MEMBERS:
        await calls.wait_for(call, "AgiBitrixTestRing", WAIT, Number=extension)
    await asyncio.sleep(3)
    await calls.hangup(joined["Channel"])
    card = await finished(portal, phone)

    assert (card.finish_params["USER_ID"], card.finish_params["STATUS_CODE"]) == ("309", "304")
    requests = methods_in_order(portal, card.call_id)
    assert sorted(requests[:3], key=lambda request: sorted(request[1])) == [
        (SHOW, {"301"}), (SHOW, {"302"}), (SHOW, {"303"})]
    assert requests[3:] == [(HIDE, {"301", "302", "303"}), (FINISH, {"309"})]
    assert card.card_shown_to == set()


async def test_a_slow_portal_shows_the_queues_three_cards_together(calls, portal, card_server, three_member_queue):
    """Each show takes 1.5 s to answer: the three members' shows still reach the portal together,
    not one after the other's answer."""
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(310, "PAUSED", extension="310")])
    portal.fail("slow", method=SHOW, delay=1.5)
    try:
        call = callcard_call(calls, card_server, phone)
        joined = await calls.wait_for(call, "QueueCallerJoin", WAIT)
        call_id = registered_call(portal, phone).call_id
        await until(lambda: len(card_requests(portal, SHOW, call_id)) == 3, WAIT, interval=0.05)
        await calls.hangup(joined["Channel"])
    finally:
        portal.reset_faults()
    arrived = [request.at for request in portal.requests_for(SHOW) if request.params.get("CALL_ID") == call_id]
    assert max(arrived) - min(arrived) < 1.0, arrived


@pytest.fixture(scope="module")
def follow_up_server(portal, tmp_path_factory):
    """The card server's config with callcard.follow_up: a to-do for each missed call of a client."""
    portal.set_client(fresh_phone(), [crm_object(int(DEFAULT_USER), "OPENED", extension="190")])
    server = CallCardServer(portal.webhook_url, tmp_path_factory.mktemp("follow-up"))
    config = yaml.safe_load(server.config_path.read_text())
    config["callcard"]["follow_up"] = {"kind": "todo", "deadline": 3600}
    server.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_missed_call_from_a_known_client_leaves_one_todo_on_its_crm_object(
        calls, portal, follow_up_server, three_member_queue):
    """The hangup handler reads the CRM object routing found off the caller's channel; the to-do
    goes to the portal after the finish, once."""
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(311, "PAUSED", entity_type="COMPANY", entity_id=3110, extension="311")])
    todos = len(portal.todos)

    call = callcard_call(calls, follow_up_server, phone)
    joined = await calls.wait_for(call, "QueueCallerJoin", WAIT)
    await calls.hangup(joined["Channel"])
    card = await finished(portal, phone)
    await until(lambda: len(portal.todos) > todos, WAIT, interval=0.05)
    await asyncio.sleep(0.5)  # time for a second one, if there were going to be one

    assert (card.finish_params["USER_ID"], card.finish_params["STATUS_CODE"]) == ("311", "304")
    todo = portal.todos[todos:]
    assert [(t["ownerTypeId"], t["ownerId"], t["responsibleId"], t["title"]) for t in todo] == [
        ("4", "3110", "311", f"Missed call from {phone}")]
    finish_at = portal.requests_for(FINISH)[-1].at
    assert [r.at for r in portal.requests_for("crm.activity.todo.add")][-1] >= finish_at


async def test_no_card_hook_runs_with_the_call_card_off(calls, portal, server, three_member_queue):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(306, "PAUSED", extension="306")])
    shows = len(portal.requests_for(SHOW))

    call = sample_call(calls, "agi-bitrix-incoming", server.url, phone, "301")
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="301")
    await asyncio.sleep(0.3)

    assert registered_call(portal, phone) is None and len(portal.requests_for(SHOW)) == shows
    assert [event for event in call.events if event.event == "AGIExecStart"
            and "ringing" in event.get("Command", "")] == []


# -- the client's name on the phone --------------------------------------------------------------

def ring_names(call):
    return [(event["Number"], event["CallerName"]) for event in call.events
            if event_name_of(event) == "AgiBitrixTestRing"]


@pytest.mark.parametrize("callers_own_name, shown", [
    ("", "Romashka LLC"),  # no name: the CRM's
    ("+7 (916) 000-00-00", "Romashka LLC"),  # a number is no name
    ("Alice", "Alice"),  # a name the caller sent is kept
])
async def test_the_ringing_phone_shows_the_clients_name(calls, portal, server, callers_own_name, shown):
    phone = fresh_phone()
    client = crm_object(307, "OPENED", entity_type="COMPANY", extension="307")
    portal.set_client(phone, [{**client, "NAME": "Romashka LLC"}])

    call = sample_call(calls, "agi-bitrix-incoming", server.url, phone, "307", TEST_CALLERNAME=callers_own_name)
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="307")

    assert ring_names(call) == [("307", shown)]


async def test_a_hostile_name_reaches_the_phone_only_filtered(calls, portal, server):
    """A newline, quotes, a comma and semicolon, ${SHELL(...)}, an emoji, 10 KB: the ringing phone
    sees the server's filtered text, which is also all B24_NAME ever held."""
    phone = fresh_phone()
    client = crm_object(308, "OPENED", extension="308")
    portal.set_client(phone, [{**client, "NAME": HOSTILE_NAME}])
    filtered = display_name(HOSTILE_NAME)
    assert filtered == "SHELL(rm -rf /) Фирма Рожки Копытца Ltd"

    call = sample_call(calls, "agi-bitrix-incoming", server.url, phone, "308")
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="308")

    assert ring_names(call) == [("308", filtered)]
    assert [event["Value"] for event in call.events
            if event.event == "VarSet" and event["Variable"] == "B24_NAME"][-1] == filtered
