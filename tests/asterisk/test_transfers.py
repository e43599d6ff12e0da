"""Transfers on a real Asterisk 20 and 22 with the shipped sample dialplan and features.conf: the
call card follows a blind transfer (AMI's BlindTransfer action, what a phone's SIP REFER does:
ast_bridge_transfer_blind()) and an attended one (AMI's Atxfer, which presses the sample's
features.conf atxfer key *2 on the agent's phone; the consultation call goes to the
TRANSFER_CONTEXT the sample sets) to a colleague's extension, and stays with the agent for a
transfer to a mobile.

The application runs in this process, with the transfer listener wired by hand (app.py does not
wire it yet): an AmiClient logged in as the minimal AMI user of docs/ami.md (read = call), whose
events go to TransferFollower. The portal emulator records every method with its parameters in
order; the tests compare that whole sequence.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from agi_bitrix.ami.client import AmiClient
from agi_bitrix.ami.settings import AmiSettings
from agi_bitrix.callcard.transfers import TransferFollower
from agi_bitrix.config import load_config
from agi_bitrix.testing.ami_calls import CallDriver
from agi_bitrix.testing.pbx_harness import SAMPLES_DIR, AsteriskBuild, AsteriskPbx
from tests.test_callcard import Running

from .conftest import STAND_IN_CONTEXTS, TEST_DIALPLAN, TEST_QUEUES, running_pbx
from .crm import crm_object, fresh_phone
from .sample_calls import WAIT, is_sample_channel, sample_call
from .test_callcard import CallCardServer, finished

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

LOOKUP = "telephony.externalcall.searchcrmentities"
REGISTER = "telephony.externalcall.register"
SHOW = "telephony.externalcall.show"
HIDE = "telephony.externalcall.hide"
FINISH = "telephony.externalcall.finish"

assert "agi-bitrix-test-phones" in STAND_IN_CONTEXTS
# Phones that answer at once and talk until the test hangs up (the shared stand-ins talk 1 s).
# A phone whose number is in TEST_PRESSING presses TEST_KEYS a second after answering, as its
# user would on the keypad (the DTMF reaches the bridge through the Local channel's ;1 half).
TALKING_PHONES = r"""
[agi-bitrix-test-talking-phones]
exten => _X.,1,UserEvent(AgiBitrixTestRing,Kind: phone,Number: ${EXTEN})
 same => n,Answer()
 same => n,UserEvent(AgiBitrixTestAnswered,Number: ${EXTEN})
 same => n,GotoIf($["${TEST_PRESSING}" != "${EXTEN}"]?talk)
 same => n,Wait(1)
 same => n,SendDTMF(${TEST_KEYS})
 same => n(talk),Wait(80)
 same => n,Hangup()
"""
# The test root has no sound files: an announcement that cannot play ends an attended transfer.
NO_SOUNDS = "transferannouncesound =\n"
# Without a timing module and codecs, Asterisk 20 and 22 crash (SIGSEGV) when Atxfer's DTMF
# reaches a Local channel; every real installation loads them.
MODULES = ("res_timing_timerfd", "codec_ulaw", "format_pcm", "format_wav", "app_senddtmf")


def sample_features(pbx: AsteriskPbx) -> None:
    """The sample's features.conf (without announcements) and the MODULES a transfer needs."""
    features = (SAMPLES_DIR / "features.conf").read_text()
    (pbx.etc / "features.conf").write_text(features.replace("[general]\n", "[general]\n" + NO_SOUNDS, 1))
    modules = pbx.etc / "modules.conf"
    modules.write_text(modules.read_text() + "".join(f"load => {name}.so\n" for name in MODULES))


@pytest.fixture(scope="module")
def transfer_pbx(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    yield from running_pbx(asterisk_root, asterisk_build, "transfers", TEST_DIALPLAN + TALKING_PHONES, TEST_QUEUES,
                           prepare=sample_features)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def transfer_calls(transfer_pbx: AsteriskPbx) -> AsyncIterator[CallDriver]:
    driver = await CallDriver.connect(transfer_pbx.ami_port, transfer_pbx.ami_username, transfer_pbx.ami_secret)
    yield driver
    driver.close()


def ami_settings(pbx: AsteriskPbx, username: str) -> AmiSettings:
    # A generous action timeout: on a loaded test machine a Ping answered late must not drop the
    # connection, and the transfer events with it (docs/call-card.md says what a real drop costs).
    return AmiSettings(port=pbx.ami_port, username=username, secret_file="", connect_timeout=5.0,
                       action_timeout=30.0, reconnect_first=0.1, reconnect_max=0.5)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def phone_keys(transfer_pbx: AsteriskPbx) -> AsyncIterator[AmiClient]:
    """The agents' transfer keys, pressed over AMI (a full AMI user: BlindTransfer, Atxfer, Hangup)."""
    client = AmiClient(ami_settings(transfer_pbx, transfer_pbx.ami_username), lambda: transfer_pbx.ami_secret)
    client.start()
    assert await client.wait_up(10), client.health()
    yield client
    await client.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def app_with_transfers(portal, transfer_pbx, tmp_path_factory) -> AsyncIterator[Running]:
    """The call-card config of the other real-Asterisk tests, in this process, plus the listener:
    the wiring the Application will need (AmiClient.add_listener(TransferFollower(...)))."""
    workdir = tmp_path_factory.mktemp("transfers")
    server = CallCardServer(portal.webhook_url, workdir)  # only its config file; never started
    config = yaml.safe_load(server.config_path.read_text())
    config["bitrix"]["webhook_url"] = portal.webhook_url
    server.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    running = await Running(load_config(server.config_path)).start()
    app = running.app
    events = AmiClient(ami_settings(transfer_pbx, transfer_pbx.ami_originate_username),
                       lambda: transfer_pbx.ami_originate_secret)
    events.add_listener(TransferFollower(app.card_holders, app.users, lambda: app.runtime.cards))
    events.start()
    assert await events.wait_up(10), events.health()
    running.ami_events = events  # for the tests' messages: was the connection ever lost?
    yield running
    await events.stop()
    await running.stop()


# -- one call -------------------------------------------------------------------------------------

AGENT, COLLEAGUE = "331", "332"  # extensions; their Bitrix24 users have the same ids
COLLEAGUE_MOBILE = "79160000332"


@pytest_asyncio.fixture(loop_scope="session")
async def agents(portal, app_with_transfers):
    portal.set_client(fresh_phone(), [crm_object(int(COLLEAGUE), "OPENED", extension=COLLEAGUE,
                                                 mobile=COLLEAGUE_MOBILE)])
    await app_with_transfers.app.users.load()


async def answered_by_agent(calls, app, phone, keys=""):
    """A client of AGENT calls and AGENT answers (and presses `keys`); returns the call, the
    agent's channel in the bridge, the client's channel and when AGENT answered (time.monotonic())."""
    host, port = app.address
    call = sample_call(calls, "agi-bitrix-incoming", f"agi://{host}:{port}/route", phone,
                       AGI_BITRIX_CALLCARD=f"agi://{host}:{port}",
                       __AGI_BITRIX_EXTENSION_CONTEXT="agi-bitrix-test-talking-phones",
                       __AGI_BITRIX_OUTBOUND_CONTEXT="agi-bitrix-test-talking-phones",
                       __TEST_PRESSING=AGENT if keys else "", __TEST_KEYS=keys)
    answered = await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=AGENT)
    answered_at = time.monotonic()
    client = next(event["Channel"] for event in call.events if is_sample_channel(event))
    return call, answered["Channel"].replace(";2", ";1"), client, answered_at


def sequence(requests, app):
    """The methods in order; a failure also says whether the events' connection was ever lost."""
    assert app.ami_events.health()["reconnects"] == 0, app.ami_events.health()
    methods = [method for method, _ in requests]
    return methods


def call_requests(portal, phone, call_id):
    """Every request of this call, in order: (method, its parameters)."""
    return [(request.method, request.params) for request in portal.requests
            if request.params.get("PHONE_NUMBER") == phone or request.params.get("CALL_ID") == call_id]


def ran_in(call, context):
    """Whether any channel of the call ran a step of `context` (AMI's Newexten)."""
    return any(event.event == "Newexten" and event.get("Context") == context for event in call.events)


def agents_client(portal):
    """A new client's phone number, whose responsible user is AGENT (at work)."""
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(int(AGENT), "OPENED", extension=AGENT)])
    return phone


async def agents_call(calls, app, portal, keys=""):
    """answered_by_agent for a new client of AGENT's; returns the client's phone number first."""
    phone = agents_client(portal)
    return phone, *await answered_by_agent(calls, app, phone, keys)


async def blind_transfer(phone_keys, calls, call, agent, number):
    """The agent's phone transfers the call to `number` (a SIP REFER), which answers."""
    await phone_keys.send("BlindTransfer", [("Channel", agent), ("Exten", number),
                                            ("Context", "agi-bitrix-transfer")])
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=number)


async def client_hangs_up(calls, client, answered_at):
    """The client talks one more second and hangs up; returns how long the client talked."""
    await asyncio.sleep(1.0)
    await calls.hangup(client)
    return time.monotonic() - answered_at


async def finished_requests(portal, phone):
    """The finished card of the call from `phone` and every request of that call, in order."""
    card = await finished(portal, phone)
    return card, call_requests(portal, phone, card.call_id)


def assert_finished_by(finish, user, talked):
    """The finish names `user`, with a talk as long as the client's."""
    assert (finish["USER_ID"], finish["STATUS_CODE"]) == (user, "200")
    assert abs(int(finish["DURATION"]) - talked) <= 1.5, (finish, talked)


def assert_card_moved_to_colleague(requests, app, card, talked):
    """The card was shown to COLLEAGUE, hidden from AGENT, and the finish names COLLEAGUE."""
    assert sequence(requests, app) == [LOOKUP, REGISTER, SHOW, HIDE, FINISH], requests
    assert requests[2][1] == {"CALL_ID": card.call_id, "USER_ID": COLLEAGUE}
    assert requests[3][1] == {"CALL_ID": card.call_id, "USER_ID": AGENT}
    assert_finished_by(requests[4][1], COLLEAGUE, talked)


async def test_a_blind_transfer_moves_the_card_and_the_finish_names_the_colleague_with_the_whole_talk(
        transfer_calls, phone_keys, portal, app_with_transfers, agents):
    phone = agents_client(portal)
    await app_with_transfers.app.users.load()

    call, agent, client, answered_at = await answered_by_agent(transfer_calls, app_with_transfers, phone)
    await asyncio.sleep(1.0)
    await blind_transfer(phone_keys, transfer_calls, call, agent, COLLEAGUE)
    talked = await client_hangs_up(transfer_calls, client, answered_at)
    card, requests = await finished_requests(portal, phone)

    assert_card_moved_to_colleague(requests, app_with_transfers, card, talked)
    assert requests[1][1]["USER_ID"] == AGENT and requests[1][1]["SHOW"] == "1"


async def test_a_blind_transfer_by_the_hash_key_on_the_agents_phone(
        transfer_calls, phone_keys, portal, app_with_transfers, agents):
    """features.conf's blindxfer (#) allowed by the sample's Dial option t, into the
    TRANSFER_CONTEXT the sample gave the agent's channel."""
    phone, call, _agent, client, answered_at = await agents_call(transfer_calls, app_with_transfers, portal,
                                                                 keys=f"#{COLLEAGUE}")
    await transfer_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=COLLEAGUE)
    assert ran_in(call, "agi-bitrix-transfer-extension")
    talked = await client_hangs_up(transfer_calls, client, answered_at)
    card, requests = await finished_requests(portal, phone)

    assert_card_moved_to_colleague(requests, app_with_transfers, card, talked)


async def test_a_queue_member_transfers_by_the_hash_key(transfer_pbx, transfer_calls, portal, app_with_transfers,
                                                      agents):
    """The sample's Queue() option t: the member who answered may transfer too."""
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(int(AGENT), "PAUSED", extension=AGENT)])  # on a break: the queue
    member = f"Local/{AGENT}@agi-bitrix-test-talking-phones/n"
    transfer_pbx.cli(f"queue add member {member} to support")
    try:
        call, _agent, client, answered_at = await answered_by_agent(transfer_calls, app_with_transfers, phone,
                                                                    keys=f"#{COLLEAGUE}")
        await transfer_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=COLLEAGUE)
        talked = await client_hangs_up(transfer_calls, client, answered_at)
    finally:
        transfer_pbx.cli(f"queue remove member {member} from support")
    card, requests = await finished_requests(portal, phone)

    # Register shows the owner the card; the member's ring showed it to AGENT, who is the owner.
    assert_card_moved_to_colleague(requests, app_with_transfers, card, talked)


async def test_an_attended_transfer_by_the_atxfer_key_moves_the_card_when_the_agent_hangs_up(
        transfer_calls, phone_keys, portal, app_with_transfers, agents):
    phone, call, agent, client, answered_at = await agents_call(transfer_calls, app_with_transfers, portal)
    # *2 then 332 on the agent's phone, into the TRANSFER_CONTEXT the sample gave the channel.
    await phone_keys.send("Atxfer", [("Channel", agent), ("Exten", COLLEAGUE)])
    await transfer_calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=COLLEAGUE)
    assert ran_in(call, "agi-bitrix-transfer-extension")
    await asyncio.sleep(0.5)
    registered = [params for method, params in call_requests(portal, phone, None) if method == REGISTER]
    assert not any(request.method in (SHOW, HIDE) for request in portal.requests
                   if request.params.get("CALL_ID") == registered[0].get("CALL_ID")), \
        "the card moved before the agent handed the call over"
    await phone_keys.send("Hangup", [("Channel", agent)])  # the agent hangs up: the transfer completes
    talked = await client_hangs_up(transfer_calls, client, answered_at)
    card, requests = await finished_requests(portal, phone)

    assert_card_moved_to_colleague(requests, app_with_transfers, card, talked)


async def test_a_transfer_to_a_mobile_keeps_the_card_and_the_finish_with_the_agent(
        transfer_calls, phone_keys, portal, app_with_transfers, agents):
    phone, call, agent, client, answered_at = await agents_call(transfer_calls, app_with_transfers, portal)
    await blind_transfer(phone_keys, transfer_calls, call, agent, COLLEAGUE_MOBILE)
    talked = await client_hangs_up(transfer_calls, client, answered_at)
    _card, requests = await finished_requests(portal, phone)

    assert sequence(requests, app_with_transfers) == [LOOKUP, REGISTER, FINISH], requests
    assert_finished_by(requests[2][1], AGENT, talked)
