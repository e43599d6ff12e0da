# ruff: noqa: E501 -- a dialplan line cannot be wrapped
"""Outgoing calls from desk phones on a real Asterisk 20 and 22: the samples' [agi-bitrix-outgoing]
before the trunk's Dial() registers an employee's call to a client as TYPE=1 (their user, the
trunk's line), the answer stamp and the hangup handler finish it with the talk time and the
DIALSTATUS; extensions, short and emergency numbers, callers without a Bitrix24 user and a hung
portal never hold the call past the register deadline. Plain Asterisk: an outbound context as the
sample's comment shows it; FreePBX: the predial hook of macro-dialout-trunk, reached from
from-internal through the outbound route's stand-in (freepbx_standins.py).
"""

import time

import pytest
import pytest_asyncio
import yaml

from agi_bitrix.testing.ami_calls import CallDriver
from tests.conftest import until

from .conftest import DEADLINE_MARGIN
from .crm import crm_object, fresh_phone
from .sample_calls import WAIT, rings, sample_call
from .test_callcard import REGISTER, CallCardServer, finished, registered_call, user_directory_refreshed
from .test_freepbx_sample import freepbx, freepbx_calls  # noqa: F401 -- the FreePBX Asterisk of that module

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

EMPLOYEE, EXTENSION = "500", "501"  # a Bitrix24 user and their desk phone
NOBODY = "599"  # an extension no Bitrix24 user has
COLLEAGUE = "502"  # another user; their extension is their id
MAIN_LINE, FREEPBX_LINE = "74951112233", "74957654321"
# callcard.register.deadline, under the server's bitrix.deadline (1.5 s), so that it is the one that ends a register.
REGISTER_DEADLINE = 1.0

# An admin's outbound context as the plain sample's comment shows it; the trunk "main" is the
# stand-in trunk. TEST_RING: the Dial's ring time (empty: until someone gives up).
DESK_OUTBOUND = "agi-bitrix-test-desk-outbound"
DESK_DIALPLAN = (
    ("_X.", "Gosub", "agi-bitrix-outgoing,s,1(${CALLERID(num)},${EXTEN},main)"),
    ("_X.", "Dial", "Local/${EXTEN}@agi-bitrix-test-outbound,${TEST_RING},${AGI_BITRIX_ANSWER_HOOK}"),
    ("_X.", "Hangup", ""),
)


class OutgoingServer(CallCardServer):
    """The call card's server with callcard.outgoing: the line of the plain sample's trunk "main"
    and of FreePBX's trunk 1."""

    def __init__(self, webhook_url, workdir):
        super().__init__(webhook_url, workdir)
        config = yaml.safe_load(self.config_path.read_text())
        config["callcard"]["register"]["deadline"] = REGISTER_DEADLINE
        config["callcard"]["outgoing"] = {"lines": [{"trunk": "main", "line": MAIN_LINE},
                                                    {"trunk": 1, "line": FREEPBX_LINE}]}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def outgoing_server(portal, tmp_path_factory):
    # The employee is in the user directory's first load.
    portal.set_client(fresh_phone(), [crm_object(int(EMPLOYEE), "OPENED", extension=EXTENSION)])
    server = OutgoingServer(portal.webhook_url, tmp_path_factory.mktemp("outgoing"))
    server.start()
    # A call before the directory's first load would find no user. (The emulator answers on this
    # loop: the wait must not block it.)
    await until(lambda: "user directory: " in server.log(), WAIT, interval=0.05, what="the user directory")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def desk_outbound(pbx):
    for priority, (exten, app, data) in enumerate(DESK_DIALPLAN, start=1):
        pbx.cli(f"dialplan add extension {exten},{priority},{app}({data}) into {DESK_OUTBOUND}")
    yield DESK_OUTBOUND
    pbx.cli(f"dialplan remove context {DESK_OUTBOUND}")


@pytest_asyncio.fixture(loop_scope="session")
async def portal_faults(portal):
    yield portal
    portal.reset_faults()


def desk_call(calls: CallDriver, server: OutgoingServer, context: str, number: str, extension: str = EXTENSION,
              answering: str = "", **settings: str):
    """The phone of `extension` dials `number`; the stand-in trunk's `answering` number answers."""
    return sample_call(calls, context, server.url, extension, answering, dialled=number,
                       AGI_BITRIX_CALLCARD=server.callcard_url, **settings)


def outgoing_registers(portal, number):
    return [request.params for request in portal.requests_for(REGISTER)
            if request.params.get("PHONE_NUMBER") == number and request.params.get("TYPE") == "1"]


def outgoing_sessions(server: OutgoingServer) -> int:
    """How many `outgoing` sessions the server has logged as not registered, since it started."""
    return server.log_path.read_text(errors="replace").count("outgoing call ")


async def ring_delay(calls: CallDriver, call) -> float:
    """Seconds from the call's start to the stand-in trunk's ring."""
    await calls.wait_for(call, "AgiBitrixTestRing", WAIT)
    return time.monotonic() - call.originated_at


# -- plain Asterisk ----------------------------------------------------------------------------

async def test_an_answered_desk_call_is_registered_as_outgoing_and_finished_with_its_talk_time(
        calls, portal, outgoing_server, desk_outbound):
    client = fresh_phone()
    # The client's number is a colleague's mobile too: the call still stays the caller's.
    portal.set_client(fresh_phone(), [crm_object(int(COLLEAGUE), "OPENED", extension=COLLEAGUE, mobile=client)])
    await user_directory_refreshed(portal)
    dialled = "8" + client[1:]  # as people dial in Russia; registered in international digits
    call = desk_call(calls, outgoing_server, desk_outbound, dialled, answering=dialled)
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=dialled)
    hangup = await calls.wait_for(call, "Hangup", WAIT, where=lambda e: e["Channel"].endswith(";2")
                                  and "agi-bitrix-test-caller" in e["Channel"])
    card = await finished(portal, client)

    assert {key: card.params[key] for key in ("TYPE", "USER_ID", "PHONE_NUMBER", "LINE_NUMBER", "EXTERNAL_CALL_ID")} == {
        "TYPE": "1", "USER_ID": EMPLOYEE, "PHONE_NUMBER": client, "LINE_NUMBER": MAIN_LINE,
        "EXTERNAL_CALL_ID": hangup["Linkedid"]}
    finish = card.finish_params
    assert (finish["CALL_ID"], finish["USER_ID"], finish["STATUS_CODE"]) == (card.call_id, EMPLOYEE, "200")
    # The stand-in trunk talks for one second (Answer, Wait(1), Hangup).
    assert 1 <= int(finish["DURATION"]) <= 2


@pytest.mark.parametrize(("settings", "code"), [({"__TEST_BUSY": "{client}"}, "486"), ({"TEST_RING": "2"}, "304")],
                         ids=["busy", "no-answer"])
async def test_a_desk_call_nobody_takes_is_finished_with_the_dial_status(
        calls, portal, outgoing_server, desk_outbound, settings, code):
    client = fresh_phone()
    call = desk_call(calls, outgoing_server, desk_outbound, client,
                     **{name: value.format(client=client) for name, value in settings.items()})
    finish = (await finished(portal, client)).finish_params

    assert rings(call) == [("outbound", client)]
    assert (finish["USER_ID"], finish["DURATION"], finish["STATUS_CODE"]) == (EMPLOYEE, "0", code)


async def test_a_desk_call_the_employee_gives_up_on_while_it_rings_is_cancelled(
        calls, portal, outgoing_server, desk_outbound):
    client = fresh_phone()
    call = desk_call(calls, outgoing_server, desk_outbound, client)
    ring = await calls.wait_for(call, "AgiBitrixTestRing", WAIT)
    await calls.wait_for(call, "DialBegin", WAIT)
    await calls.hangup(next(event["Channel"] for event in call.events if event.event == "DialBegin"))
    finish = (await finished(portal, client)).finish_params

    assert ring["Number"] == client
    assert (finish["USER_ID"], finish["DURATION"], finish["STATUS_CODE"]) == (EMPLOYEE, "0", "603-S")


@pytest.mark.parametrize("number", ["112", "104", "205"], ids=["emergency", "short", "internal"])
async def test_internal_short_and_emergency_numbers_are_never_registered_nor_delayed(
        calls, portal_faults, outgoing_server, desk_outbound, number):
    portal = portal_faults
    portal.fail("hang", method=REGISTER)  # a register would hold the call for its whole deadline
    call = desk_call(calls, outgoing_server, desk_outbound, number)

    assert await ring_delay(calls, call) < 1.0
    assert rings(call) == [("outbound", number)]
    assert [r for r in portal.requests_for(REGISTER) if r.params.get("PHONE_NUMBER") == number] == []


async def test_an_extension_without_a_bitrix24_user_is_logged_and_the_call_goes_on(
        calls, portal, outgoing_server, desk_outbound):
    client = fresh_phone()
    call = desk_call(calls, outgoing_server, desk_outbound, client, extension=NOBODY, answering=client)
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=client)

    assert rings(call) == [("outbound", client)] and outgoing_registers(portal, client) == []
    assert f"outgoing call from extension {NOBODY} is not registered: no active Bitrix24 user" in (
        outgoing_server.log())


async def test_a_hung_portal_holds_the_call_no_longer_than_the_register_deadline(
        calls, portal_faults, outgoing_server, desk_outbound):
    portal = portal_faults
    portal.fail("hang", method=REGISTER)
    client = fresh_phone()
    call = desk_call(calls, outgoing_server, desk_outbound, client, answering=client)

    assert REGISTER_DEADLINE - 0.1 <= await ring_delay(calls, call) <= REGISTER_DEADLINE + DEADLINE_MARGIN
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=client)
    assert registered_call(portal, client) is None
    assert "register took longer than 1.0 s; the call goes on without a card" in outgoing_server.log()


async def test_an_incoming_calls_leg_to_the_owners_mobile_is_no_outgoing_call(
        calls, portal, outgoing_server, desk_outbound):
    """The sample sends an incoming call on to the owner's mobile through the outbound context;
    with the outgoing step in that context, the leg is not registered a second time."""
    phone, mobile = fresh_phone(), fresh_phone()
    portal.set_client(phone, [crm_object(int(EMPLOYEE), "OPENED", extension=EXTENSION, mobile=mobile)])
    sessions = outgoing_sessions(outgoing_server)
    call = sample_call(calls, "agi-bitrix-incoming", outgoing_server.url, phone, mobile,
                       AGI_BITRIX_CALLCARD=outgoing_server.callcard_url, AGI_BITRIX_OUTBOUND_CONTEXT=desk_outbound)
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=mobile)
    card = await finished(portal, phone)

    assert (card.params["TYPE"], card.finish_params["STATUS_CODE"]) == ("2", "200")
    # The outgoing step skipped the leg before asking the server.
    assert outgoing_registers(portal, mobile) == [] and outgoing_sessions(outgoing_server) == sessions


# -- FreePBX ------------------------------------------------------------------------------------

async def test_freepbx_a_desk_call_through_an_outbound_route_is_registered_with_the_trunks_line(
        freepbx_calls, portal, outgoing_server):  # noqa: F811
    client = fresh_phone()
    # AMPUSER: the phone's extension, as FreePBX's macro-user-callerid sets it for every call of a phone.
    call = desk_call(freepbx_calls, outgoing_server, "from-internal", client, answering=client, AMPUSER=EXTENSION)
    await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=client)
    card = await finished(portal, client)

    assert {key: card.params[key] for key in ("TYPE", "USER_ID", "PHONE_NUMBER", "LINE_NUMBER")} == {
        "TYPE": "1", "USER_ID": EMPLOYEE, "PHONE_NUMBER": client, "LINE_NUMBER": FREEPBX_LINE}
    finish = card.finish_params
    assert (finish["USER_ID"], finish["STATUS_CODE"]) == (EMPLOYEE, "200")
    assert 1 <= int(finish["DURATION"]) <= 2


@pytest.mark.parametrize(("settings", "status", "code"), [
    ({"__TEST_BUSY": "{client}"}, "BUSY", "486"), ({"TRUNK_RING_TIMER": "2"}, "NOANSWER", "304")],
    ids=["busy", "no-answer"])
async def test_freepbx_a_desk_call_nobody_takes_is_finished_with_the_dial_status(
        freepbx_calls, portal, outgoing_server, settings, status, code):  # noqa: F811
    client = fresh_phone()
    call = desk_call(freepbx_calls, outgoing_server, "from-internal", client, AMPUSER=EXTENSION,
                     **{name: value.format(client=client) for name, value in settings.items()})
    # macro-dialout-trunk plays busy or congestion tones for 20 s: the employee puts the phone down.
    dial_end = await freepbx_calls.wait_for(call, "DialEnd", WAIT, DialStatus=status)
    await freepbx_calls.hangup(dial_end["Channel"])
    finish = (await finished(portal, client)).finish_params

    assert (finish["USER_ID"], finish["DURATION"], finish["STATUS_CODE"]) == (EMPLOYEE, "0", code)


async def test_freepbx_an_incoming_call_sent_on_through_a_trunk_is_no_outgoing_call(
        freepbx_calls, portal, outgoing_server):  # noqa: F811
    phone, mobile = fresh_phone(), fresh_phone()
    portal.set_client(phone, [crm_object(int(EMPLOYEE), "CLOSED", extension=EXTENSION, mobile=mobile)])
    sessions = outgoing_sessions(outgoing_server)
    call = sample_call(freepbx_calls, "from-pstn", outgoing_server.url, phone, mobile,
                       AGI_BITRIX_CALLCARD=outgoing_server.callcard_url)
    await freepbx_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=mobile)
    card = await finished(portal, phone)

    assert (card.params["TYPE"], card.finish_params["STATUS_CODE"]) == ("2", "200")
    # The outgoing step skipped the leg before asking the server.
    assert outgoing_registers(portal, mobile) == [] and outgoing_sessions(outgoing_server) == sessions
