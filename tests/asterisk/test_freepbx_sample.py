"""asterisk-samples/extensions_custom.conf and globals_custom.conf, loaded as shipped into an
Asterisk laid out like FreePBX: the settings inside [globals], the custom context beside
stand-ins for the contexts FreePBX generates (freepbx_standins.py: the inbound route,
from-internal with ext-local and voicemail, an outbound route with macro-outbound-callerid,
ext-queues). A second Asterisk keeps the two samples from sharing globals.
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from agi_bitrix.testing.ami_calls import CallDriver, PlacedCall, event_name_of
from agi_bitrix.testing.pbx_harness import AsteriskBuild, AsteriskPbx
from tests.conftest import until

from .conftest import STAND_IN_CONTEXTS, running_pbx
from .crm import crm_object, fresh_phone
from .freepbx_standins import ROUTE_CID, freepbx_dialplan
from .sample_calls import WAIT, joined_queue, rings, sample_call
from .test_callcard import finished, running_callcard_server, user_directory_refreshed
from .test_card_follows_the_call import HIDE, SHOW, card_requests, ring_names

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]


def freepbx_config(build: AsteriskBuild) -> str:
    return r"""
[general]
autofallthrough = yes

[globals]
#include "asterisk-samples/globals_custom.conf"
; FreePBX's Settings > Advanced Settings > Ringtime Default.
RINGTIMER_DEFAULT=15
OUTKEEPCID_1=off

#include "asterisk-samples/extensions_custom.conf"
""" + freepbx_dialplan(build) + STAND_IN_CONTEXTS


FREEPBX_QUEUES = """
[general]
[400]
[401]
"""


@pytest.fixture(scope="module")
def freepbx(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    yield from running_pbx(asterisk_root, asterisk_build, "freepbx", freepbx_config(asterisk_build), FREEPBX_QUEUES)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def freepbx_calls(freepbx: AsteriskPbx) -> AsyncIterator[CallDriver]:
    driver = await CallDriver.connect(freepbx.ami_port, freepbx.ami_username, freepbx.ami_secret)
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def freepbx_server(start_server):
    """FreePBX names queues by number: the server's fallback queue is one of them."""
    return start_server(fallback_queue="400")


def trunk_call(calls: CallDriver, agi_url: str, callerid: str, answering: str = "", **settings: str) -> PlacedCall:
    """A call from the trunk: FreePBX's inbound route takes it to the custom destination."""
    return sample_call(calls, "from-pstn", agi_url, callerid, answering, **settings)


async def test_freepbx_route_extension_rings_the_extension_through_from_internal(
        freepbx_calls, portal, freepbx_server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(71, "OPENED", extension="171", mobile="79160000171")])

    call = trunk_call(freepbx_calls, freepbx_server.url, phone, answering="171")
    await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="171")

    assert rings(call) == [("extension", "171")]


async def test_freepbx_fall_through_reaches_the_mobile_then_the_queue_by_number(
        freepbx_calls, portal, freepbx_server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(72, "OPENED", extension="172", mobile="+7 916 000-01-72")])

    call = trunk_call(freepbx_calls, freepbx_server.url, phone)

    assert await joined_queue(freepbx_calls, call) == "400"
    assert rings(call) == [("extension", "172"), ("outbound", "79160000172")]


async def test_freepbx_route_queue_goes_to_ext_queues(freepbx_calls, portal, freepbx_server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(73, "PAUSED", extension="173")])

    call = trunk_call(freepbx_calls, freepbx_server.url, phone, AGI_BITRIX_QUEUE="401")

    assert await joined_queue(freepbx_calls, call) == "400"
    assert rings(call) == []


async def test_freepbx_with_the_server_stopped_the_safe_defaults_send_the_call_to_the_queue(
        freepbx_calls, portal, start_server):
    stopped = start_server(fallback_queue="400")
    stopped.stop()
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(74, "OPENED", extension="174")])

    call = trunk_call(freepbx_calls, stopped.url, phone, AGI_BITRIX_QUEUE="401")

    assert await joined_queue(freepbx_calls, call) == "401"
    assert rings(call) == []


async def test_freepbx_with_the_first_server_stopped_the_backup_server_routes_the_call(
        freepbx_calls, portal, start_server):
    stopped, backup = start_server(fallback_queue="400"), start_server(fallback_queue="400")
    stopped.stop()
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(79, "OPENED", extension="179")])

    call = trunk_call(freepbx_calls, stopped.url, phone, answering="179", AGI_BITRIX_URL_BACKUP=backup.url)
    await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="179")

    assert rings(call) == [("extension", "179")]
    assert f"phone={phone} " in backup.log()


async def test_freepbx_passes_the_inbound_routes_did_to_the_rules(freepbx_calls, portal, start_server):
    # The custom destination runs as extension s: only the AGI argument can carry the DID.
    sales_line = start_server(fallback_queue="400", first_rules=[
        {"name": "sales-line", "match": {"did": ["74951112233"]}, "route": {"queue": "401"}}])
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(75, "OPENED", extension="175")])

    call = trunk_call(freepbx_calls, sales_line.url, phone, dialled="74951112233")

    assert await joined_queue(freepbx_calls, call) == "401"
    assert rings(call) == []


def voicemail_answers(call: PlacedCall) -> list[str]:
    return [event["Mailbox"] for event in call.events if event_name_of(event) == "AgiBitrixTestVoicemail"]


# How the owner's extension fails, as the per-call settings that make it so. "rings out": the
# extension's own ring time (RINGTIMER_DEFAULT, 1 s) ends before the sample's (2 s), and
# FreePBX sends the call on to voicemail.
EXTENSION_FAILURES = {
    "busy": {"__TEST_BUSY": "{extension}"},
    "unavailable": {"__TEST_UNAVAILABLE": "{extension}"},
    "rings out": {"__RINGTIMER_DEFAULT": "1"},
}


@pytest.mark.parametrize("failure", EXTENSION_FAILURES)
async def test_freepbx_an_extension_that_fails_goes_on_to_the_mobile_and_queue_not_to_its_voicemail(
        freepbx_calls, portal, freepbx_server, failure):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(76, "OPENED", extension="176", mobile="79160000176")])
    settings = {name: value.format(extension="176") for name, value in EXTENSION_FAILURES[failure].items()}

    call = trunk_call(freepbx_calls, freepbx_server.url, phone, **settings)

    assert await joined_queue(freepbx_calls, call) == "400"
    assert (rings(call), voicemail_answers(call)) == ([("extension", "176"), ("outbound", "79160000176")], [])


async def test_freepbx_the_mobile_sees_the_clients_number_not_the_routes(freepbx_calls, portal, freepbx_server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(77, "CLOSED", extension="177", mobile="79160000177")])

    call = trunk_call(freepbx_calls, freepbx_server.url, phone, answering="79160000177")
    ring = await freepbx_calls.wait_for(call, "AgiBitrixTestRing", WAIT, Number="79160000177")

    # Without KEEPCID, the outbound route would send its own CID, ROUTE_CID.
    assert ring["CallerID"] == phone != ROUTE_CID


@pytest.fixture(scope="module")
def freepbx_callcard(portal, tmp_path_factory):
    with running_callcard_server(portal, tmp_path_factory.mktemp("freepbx-callcard"), fallback_queue="400") as server:
        yield server


def callcard_trunk_call(calls, server, phone, answering="", **settings):
    return trunk_call(calls, server.url, phone, answering, AGI_BITRIX_CALLCARD=server.callcard_url, **settings)


async def test_freepbx_call_card_extension_answers(freepbx_calls, portal, freepbx_callcard):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(81, "OPENED", entity_id=810, extension="181")])

    call = callcard_trunk_call(freepbx_calls, freepbx_callcard, phone, answering="181")
    await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="181")
    card = await finished(portal, phone)

    assert (card.params["USER_ID"], card.params["CRM_ENTITY_ID"]) == ("81", "810")
    assert (card.finish_params["USER_ID"], card.finish_params["STATUS_CODE"]) == ("81", "200")
    assert 1 <= int(card.finish_params["DURATION"]) <= 2


async def test_freepbx_call_card_mobile_answers(freepbx_calls, portal, freepbx_callcard):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(82, "CLOSED", extension="182", mobile="79160000182")])

    call = callcard_trunk_call(freepbx_calls, freepbx_callcard, phone, answering="79160000182")
    await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="79160000182")
    finish = (await finished(portal, phone)).finish_params

    assert (finish["USER_ID"], finish["STATUS_CODE"]) == ("82", "200")
    assert 1 <= int(finish["DURATION"]) <= 2


async def test_freepbx_call_card_queue_member_answers_through_the_member_gosub(
        freepbx_calls, portal, freepbx_callcard, freepbx):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(83, "PAUSED", extension="183")])
    portal.set_client(fresh_phone(), [crm_object(84, "OPENED", extension="184")])
    await user_directory_refreshed(portal)
    freepbx.cli("queue add member Local/184@agi-bitrix-test-phones/n to 400")
    try:
        call = callcard_trunk_call(freepbx_calls, freepbx_callcard, phone, answering="184")
        await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="184")
        finish = (await finished(portal, phone)).finish_params
    finally:
        freepbx.cli("queue remove member Local/184@agi-bitrix-test-phones/n from 400")

    assert (finish["USER_ID"], finish["STATUS_CODE"]) == ("84", "200")
    assert 1 <= int(finish["DURATION"]) <= 2


@pytest.mark.parametrize("failure", ["busy", "unavailable"])
async def test_freepbx_call_card_caller_giving_up_in_the_queue_after_a_failed_extension_is_missed(
        freepbx_calls, portal, freepbx_callcard, failure):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(85, "OPENED", extension="185")])
    settings = {name: value.format(extension="185") for name, value in EXTENSION_FAILURES[failure].items()}

    call = callcard_trunk_call(freepbx_calls, freepbx_callcard, phone, **settings)
    joined = await freepbx_calls.wait_for(call, "QueueCallerJoin", WAIT)
    await asyncio.sleep(0.2)
    await freepbx_calls.hangup(joined["Channel"])
    finish = (await finished(portal, phone)).finish_params

    assert (finish["USER_ID"], finish["DURATION"], finish["STATUS_CODE"]) == ("85", "0", "304")


# -- the card follows the call, the client's name on the phone ------------------------------------

@pytest.fixture(scope="module")
def freepbx_ringing_card(portal, tmp_path_factory):
    """A call card whose register does not pop the card up (show: false): only ringing phones get it."""
    with running_callcard_server(portal, tmp_path_factory.mktemp("freepbx-ringing"), fallback_queue="400",
                                 show=False) as server:
        yield server


async def test_freepbx_the_card_follows_the_call_from_the_extension_to_the_queue_member_who_answers(
        freepbx_calls, portal, freepbx_ringing_card, freepbx):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(380, "OPENED", extension="191")])  # rings out, no mobile
    members = {"192": 381, "193": 382, "194": 383}
    for extension, user in members.items():
        portal.set_client(fresh_phone(), [crm_object(user, "OPENED", extension=extension)])
    await user_directory_refreshed(portal)
    for extension in members:
        freepbx.cli(f"queue add member Local/{extension}@agi-bitrix-test-phones/n to 400")
    try:
        call = callcard_trunk_call(freepbx_calls, freepbx_ringing_card, phone, answering="193")
        await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="193")
        card = await finished(portal, phone)
    finally:
        for extension in members:
            freepbx.cli(f"queue remove member Local/{extension}@agi-bitrix-test-phones/n from 400")
    call_id = card.call_id

    # The owner's extension through from-internal (Dial's b()), then each member (VQ_OPTIONS' b()).
    assert rings(call)[0] == ("extension", "191")
    assert sorted(card_requests(portal, SHOW, call_id), key=sorted) == [{"380"}, {"381"}, {"382"}, {"383"}]
    await until(lambda: card_requests(portal, HIDE, call_id), WAIT, interval=0.05)
    assert card_requests(portal, HIDE, call_id) == [{"380", "381", "383"}]
    assert (card.finish_params["USER_ID"], card.finish_params["STATUS_CODE"]) == ("382", "200")


async def test_freepbx_the_extension_shows_the_clients_name(freepbx_calls, portal, freepbx_server):
    phone = fresh_phone()
    client = crm_object(384, "OPENED", entity_type="COMPANY", extension="195")
    portal.set_client(phone, [{**client, "NAME": "Romashka LLC"}])

    call = trunk_call(freepbx_calls, freepbx_server.url, phone, answering="195")
    await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="195")

    assert ring_names(call) == [("195", "Romashka LLC")]
