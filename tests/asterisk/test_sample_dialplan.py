"""asterisk-samples/extensions.conf, loaded as shipped, dialling what the server decided.

The test dialplan only points the sample's extension and outbound contexts at stand-ins that
report each ring (and answer when told to); queues are real app_queue queues. The AGI URL and
ring times are set per call as channel variables, which the sample lets win over its globals.
"""


import pytest

from agi_bitrix.testing.ami_calls import CallDriver, PlacedCall
from tests.conftest import until

from .crm import crm_object, fresh_phone
from .sample_calls import WAIT, is_sample_channel, joined_queue, rings, route_agi_status, sample_call

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]


def incoming_call(calls: CallDriver, agi_url: str, callerid: str, answering: str = "", **settings: str) -> PlacedCall:
    return sample_call(calls, "agi-bitrix-incoming", agi_url, callerid, answering, **settings)


async def test_route_extension_rings_the_owners_extension(calls, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(61, "OPENED", extension="161", mobile="79160000161")])

    call = incoming_call(calls, server.url, phone, answering="161")
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="161")
    await calls.wait_for(call, "Hangup", WAIT, where=is_sample_channel)

    assert rings(call) == [("extension", "161")]
    assert [e for e in call.events if e.event == "QueueCallerJoin"] == []


async def test_route_mobile_dials_the_mobile_through_the_outbound_context(calls, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(62, "CLOSED", extension="162", mobile="+7 (903) 555-01-62")])

    call = incoming_call(calls, server.url, phone, answering="79035550162")
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="79035550162")

    assert rings(call) == [("outbound", "79035550162")]


async def test_route_queue_puts_the_call_into_the_queue_the_server_named(calls, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(63, "PAUSED", extension="163", mobile="79160000163")])

    # The sample's own default queue differs, so the queue joined is the server's choice.
    call = incoming_call(calls, server.url, phone, AGI_BITRIX_QUEUE="sales")

    assert await joined_queue(calls, call) == "support"
    assert rings(call) == []


async def test_a_did_rule_sends_calls_to_that_line_into_its_own_queue(calls, portal, start_server):
    """"Calls to DID 74951112233 go to queue sales": the DID the sample passes (${EXTEN})
    reaches the rules, and the rule's queue reaches Queue()."""
    sales_line = start_server(first_rules=[
        {"name": "sales-line", "match": {"did": ["74951112233"]}, "route": {"queue": "sales"}}])
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(69, "OPENED", extension="169")])

    call = incoming_call(calls, sales_line.url, phone, dialled="74951112233")

    assert await joined_queue(calls, call) == "sales"
    assert rings(call) == []


async def test_an_extension_not_answering_falls_through_to_the_mobile_then_the_queue(calls, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(64, "OPENED", extension="164", mobile="79160000164")])

    call = incoming_call(calls, server.url, phone)

    assert await joined_queue(calls, call) == "support"
    assert rings(call) == [("extension", "164"), ("outbound", "79160000164")]


async def test_an_extension_not_answering_without_a_mobile_falls_through_to_the_queue(calls, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(65, "OPENED", extension="165")])

    call = incoming_call(calls, server.url, phone)

    assert await joined_queue(calls, call) == "support"
    assert rings(call) == [("extension", "165")]


async def test_a_hostile_extension_in_the_crm_rings_nothing_and_reaches_the_queue(calls, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(66, "OPENED", extension="166&Local/666@agi-bitrix-test-phones")])

    call = incoming_call(calls, server.url, phone)

    assert await joined_queue(calls, call) == "support"
    assert rings(call) == []


async def test_with_the_server_stopped_the_safe_defaults_send_the_call_to_the_queue(calls, portal, start_server):
    stopped = start_server()
    stopped.stop()
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(67, "OPENED", extension="167")])

    call = incoming_call(calls, stopped.url, phone, AGI_BITRIX_QUEUE="sales")

    assert await joined_queue(calls, call) == "sales"
    assert route_agi_status(call) == "FAILURE"
    assert rings(call) == []


async def test_with_the_server_crashing_mid_call_the_safe_defaults_send_the_call_to_the_queue(
        calls, portal, start_server):
    doomed = start_server()
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(68, "OPENED", extension="168")])
    portal.fail("hang", phone=phone)
    try:
        call = incoming_call(calls, doomed.url, phone, AGI_BITRIX_QUEUE="sales")
        # The server is in the middle of this call once the portal has the question.
        await until(lambda: any(phone in str(request.params) for request in portal.requests), WAIT, interval=0.05,
                    what="the portal to be asked")
        doomed.crash()
        joined = await calls.wait_for(call, "QueueCallerJoin", WAIT)
    finally:
        portal.reset_faults()
    b24_status = await calls.getvar(joined["Channel"], "B24_STATUS")
    await calls.hangup(joined["Channel"])

    assert (route_agi_status(call), b24_status, joined["Queue"]) == ("SUCCESS", "ERROR", "sales")
    assert rings(call) == []


@pytest.mark.parametrize("dialled", ["+74951112233", "s"])
async def test_a_did_with_a_plus_or_no_did_at_all_is_routed(calls, portal, start_server, dialled):
    """A DID sent as +7495... reaches the rules like 7495...; a request without a user part (s)
    is still routed: to the owner's extension, then, unanswered, to the fallback queue."""
    sales_line = start_server(first_rules=[
        {"name": "sales-line", "match": {"did": ["74951112233"]}, "route": {"queue": "sales"}}])
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(60, "OPENED", extension="160")])

    call = incoming_call(calls, sales_line.url, phone, dialled=dialled)

    if dialled == "s":
        assert await joined_queue(calls, call) == "support"
        assert rings(call) == [("extension", "160")]
    else:
        assert await joined_queue(calls, call) == "sales"
        assert rings(call) == []
