"""asterisk-samples/extensions_custom.conf and globals_custom.conf, loaded as shipped into an
Asterisk laid out like FreePBX: the settings inside [globals], the custom context beside
stand-ins for the contexts FreePBX generates (from-pstn's inbound route, from-internal,
ext-queues). A second Asterisk keeps the two samples from sharing globals.
"""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from agi_bitrix.testing.ami_calls import CallDriver, PlacedCall
from agi_bitrix.testing.pbx_harness import AsteriskPbx

from .conftest import STAND_IN_CONTEXTS, running_pbx
from .crm import crm_object, fresh_phone
from .sample_calls import WAIT, joined_queue, rings, sample_call

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

FREEPBX_DIALPLAN = r"""
[general]
autofallthrough = yes

[globals]
#include "asterisk-samples/globals_custom.conf"

#include "asterisk-samples/extensions_custom.conf"

; Stand-ins for FreePBX's generated dialplan.
; An inbound route whose destination is the custom destination custom-agi-bitrix,s,1.
[from-pstn]
exten => _X.,1,Set(__FROM_DID=${EXTEN})
 same => n,Goto(custom-agi-bitrix,s,1)

; Extensions have three digits; longer numbers leave through an outbound route.
[from-internal]
exten => _XXX,1,Goto(agi-bitrix-test-phones,${EXTEN},1)
exten => _XXXX.,1,Goto(agi-bitrix-test-outbound,${EXTEN},1)

[ext-queues]
exten => _X.,1,Queue(${EXTEN})
""" + STAND_IN_CONTEXTS

FREEPBX_QUEUES = """
[general]
[400]
[401]
"""


@pytest.fixture(scope="module")
def freepbx(asterisk_root: Path) -> Iterator[AsteriskPbx]:
    yield from running_pbx(asterisk_root, "freepbx", FREEPBX_DIALPLAN, FREEPBX_QUEUES)


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


async def test_freepbx_passes_the_inbound_routes_did_to_the_rules(freepbx_calls, portal, start_server):
    # The custom destination runs as extension s: only the AGI argument can carry the DID.
    sales_line = start_server(fallback_queue="400", first_rules=[
        {"name": "sales-line", "match": {"did": ["74951112233"]}, "route": {"queue": "401"}}])
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(75, "OPENED", extension="175")])

    call = trunk_call(freepbx_calls, sales_line.url, phone, dialled="74951112233")

    assert await joined_queue(freepbx_calls, call) == "401"
    assert rings(call) == []
