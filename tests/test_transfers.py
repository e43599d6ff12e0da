"""Transfers (agi_bitrix/callcard/transfers.py): the decision with fakes, then the listener wired by
hand into the whole application over real TCP against the portal emulator (the AMI events as
Asterisk 20 and 22 send them, main/stasis_bridges.c; their real sending is
tests/asterisk/test_transfers.py)."""

import asyncio

import pytest

from agi_bitrix.ami.protocol import Event
from agi_bitrix.bitrix.users import User
from agi_bitrix.callcard.cards import HIDE, SHOW
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.transfers import (
    ATTENDED,
    BLIND,
    STAYS,
    BridgeMembers,
    CardMove,
    Transfer,
    TransferFollower,
    card_move,
    transfer_from_event,
)
from tests import test_callcard
from tests.conftest import until
from tests.test_callcard import delivered_finishes

LINKEDID = "1700000000.1"


def blind_event(extension, result="Success", linkedid=LINKEDID):
    """BlindTransfer as Asterisk 22 sent it for AMI's BlindTransfer action (fields abridged)."""
    return Event((("Event", "BlindTransfer"), ("Result", result),
                  ("TransfererChannel", "Local/101@agi-bitrix-test-phones-00000001;1"),
                  ("TransfererLinkedid", linkedid),
                  ("TransfereeChannel", "PJSIP/trunk-00000000"), ("TransfereeLinkedid", linkedid),
                  ("IsExternal", "Yes"), ("Context", "agi-bitrix-transfer"), ("Extension", extension)))


def attended_event(target_channel, dest_type="Bridge", result="Success", linkedid=LINKEDID):
    """AttendedTransfer as Asterisk 22 sent it for a DTMF atxfer (fields abridged)."""
    return Event((("Event", "AttendedTransfer"), ("Result", result),
                  ("OrigTransfererChannel", "PJSIP/101-00000001"), ("OrigTransfererLinkedid", linkedid),
                  ("SecondTransfererChannel", "PJSIP/101-00000001"),
                  ("TransfereeChannel", "PJSIP/trunk-00000000"), ("TransfereeLinkedid", linkedid),
                  ("TransferTargetChannel", target_channel), ("IsExternal", "No"), ("DestType", dest_type)))


# -- reading the events ------------------------------------------------------------------------

def test_a_successful_blind_transfer_names_the_call_and_the_extension():
    assert transfer_from_event(blind_event("102")) == Transfer(
        BLIND, LINKEDID, "102", "Local/101@agi-bitrix-test-phones-00000001;1")


@pytest.mark.parametrize("channel", ["Local/102@agi-bitrix-transfer-00000002;1", "PJSIP/102-0000000a"])
def test_an_attended_transfer_names_the_target_channels_number(channel):
    transfer = transfer_from_event(attended_event(channel))
    assert (transfer.kind, transfer.linkedid, transfer.target) == (ATTENDED, LINKEDID, "102")


def test_an_attended_transfer_into_a_conference_or_an_app_names_no_target():
    for dest_type in ("Threeway", "App", "Link"):
        assert transfer_from_event(attended_event("PJSIP/102-0000000a", dest_type)).target == ""


def test_failed_transfers_and_other_events_are_nothing():
    assert transfer_from_event(blind_event("102", result="Fail")) is None
    assert transfer_from_event(attended_event("PJSIP/102-0000000a", result="Not Permitted")) is None
    assert transfer_from_event(Event((("Event", "Hangup"), ("Linkedid", LINKEDID)))) is None


# -- the decision ------------------------------------------------------------------------------

def test_to_a_colleague_the_card_moves_and_the_finish_names_them():
    assert card_move({"1"}, "2") == CardMove(show="2", hide=("1",), talking="2")


def test_to_someone_who_already_sees_it_there_is_no_second_show():
    # An attended transfer whose consultation call rang B with the ringing hook.
    assert card_move({"1", "2"}, "2") == CardMove(show="", hide=("1",), talking="2")


def test_everyone_else_who_still_holds_it_loses_it_in_a_stable_order():
    assert card_move({"10", "2", "1"}, "3") == CardMove(show="3", hide=("1", "2", "10"), talking="3")


def test_to_a_mobile_or_an_external_number_the_card_stays():
    assert card_move({"1"}, "") is STAYS


# -- the listener --------------------------------------------------------------------------------

class FakeCards:
    def __init__(self):
        self.sent = []

    def send(self, method, call_id, users, uniqueid):
        self.sent.append((method, call_id, users))


class FakeUsers:
    """101 Anna (1), 102 Igor (2), whose mobile is 79162220202; UserDirectory.by_number's order."""

    def __init__(self):
        self.users = {"101": User("1", True, "101", "79161110101"), "102": User("2", True, "102", "79162220202")}

    def by_number(self, number):
        return self.users.get(number) or next((u for u in self.users.values() if u.mobile == number), None)


def answered_call(holders, call_id="externalCall.1"):
    holders.add(call_id, "1")
    holders.link(call_id, LINKEDID)
    holders.keep_only(call_id, "1")
    return call_id


def test_the_listener_shows_the_target_hides_the_transferer_and_notes_who_talks():
    holders, cards = CardHolders(), FakeCards()
    call_id = answered_call(holders)
    TransferFollower(holders, FakeUsers(), lambda: cards)(blind_event("102"))
    assert cards.sent == [(SHOW, call_id, ["2"]), (HIDE, call_id, ["1"])]
    assert holders.holders_of(call_id) == {"2"} and holders.handed_to(call_id) == "2"


@pytest.mark.parametrize("number", ["79162220202", "74951112233", "999",
                                    "102\r\nEvent: Hangup", "102@evil", "1" * 200])
def test_the_listener_leaves_a_transfer_to_a_mobile_an_external_or_unknown_number_alone(number):
    holders, cards = CardHolders(), FakeCards()
    call_id = answered_call(holders)
    TransferFollower(holders, FakeUsers(), lambda: cards)(blind_event(number))
    assert cards.sent == [] and holders.holders_of(call_id) == {"1"} and holders.handed_to(call_id) == ""


def test_the_listener_ignores_calls_it_did_not_register():
    holders, cards = CardHolders(), FakeCards()
    answered_call(holders)
    TransferFollower(holders, FakeUsers(), lambda: cards)(blind_event("102", linkedid="1700000099.7"))
    assert cards.sent == []


def test_what_is_kept_for_transfers_is_bounded_like_the_calls():
    holders = CardHolders(max_calls=2)
    for number in range(3):
        holders.link(f"externalCall.{number}", f"1700000000.{number}")
        holders.hand_over(f"externalCall.{number}", "2")
    assert holders.call_of("1700000000.0") is None and holders.handed_to("externalCall.0") == ""
    assert holders.call_of("1700000000.2") == "externalCall.2" and holders.handed_to("externalCall.2") == "2"


def bridge_event(name, bridge, channel):
    return Event((("Event", name), ("BridgeUniqueid", bridge), ("Channel", channel), ("Linkedid", LINKEDID)))


def attended_without_target():
    """As Asterisk 20 and 22 sent it when the colleague's channel had already moved into the
    client's bridge: DestType Bridge, no TransferTarget fields."""
    return Event((("Event", "AttendedTransfer"), ("Result", "Success"),
                  ("OrigTransfererChannel", "Local/101@phones-00000001;1"), ("OrigTransfererLinkedid", LINKEDID),
                  ("SecondTransfererChannel", "Local/101@phones-00000001;1"),
                  ("TransfereeChannel", "PJSIP/trunk-00000000"), ("TransfereeLinkedid", LINKEDID),
                  ("IsExternal", "No"), ("DestType", "Bridge"), ("DestBridgeUniqueid", "client-bridge")))


def test_an_attended_transfer_without_its_target_finds_the_colleague_already_in_the_clients_bridge():
    holders, cards = CardHolders(), FakeCards()
    call_id = answered_call(holders)
    follow = TransferFollower(holders, FakeUsers(), lambda: cards)
    follow(bridge_event("BridgeEnter", "client-bridge", "PJSIP/trunk-00000000"))
    follow(bridge_event("BridgeEnter", "client-bridge", "Local/101@phones-00000001;1"))
    follow(bridge_event("BridgeLeave", "client-bridge", "Local/101@phones-00000001;1"))
    follow(bridge_event("BridgeEnter", "client-bridge", "Local/102@agi-bitrix-transfer-00000002;1"))
    follow(attended_without_target())
    assert cards.sent == [(SHOW, call_id, ["2"]), (HIDE, call_id, ["1"])]


def test_an_attended_transfer_without_its_target_waits_for_the_colleague_to_enter():
    holders, cards = CardHolders(), FakeCards()
    call_id = answered_call(holders)
    follow = TransferFollower(holders, FakeUsers(), lambda: cards)
    follow(bridge_event("BridgeEnter", "client-bridge", "PJSIP/trunk-00000000"))
    follow(attended_without_target())
    assert cards.sent == []
    follow(bridge_event("BridgeEnter", "client-bridge", "PJSIP/102-0000000b"))
    follow(bridge_event("BridgeEnter", "client-bridge", "PJSIP/103-0000000c"))  # a later one is not it
    assert cards.sent == [(SHOW, call_id, ["2"]), (HIDE, call_id, ["1"])]


def test_the_bridges_kept_are_bounded():
    bridges = BridgeMembers(max_bridges=2)
    for number in range(3):
        bridges.note(bridge_event("BridgeEnter", f"bridge-{number}", "PJSIP/101-00000001"))
    assert bridges.members("bridge-0") == frozenset() and bridges.members("bridge-2") == {"PJSIP/101-00000001"}
    bridges.note(bridge_event("BridgeDestroy", "bridge-2", ""))
    assert bridges.members("bridge-2") == frozenset()


def test_a_second_transfer_moves_it_again():
    holders, cards = CardHolders(), FakeCards()
    call_id = answered_call(holders)
    follow = TransferFollower(holders, FakeUsers(), lambda: cards)
    follow(blind_event("102"))
    follow(attended_event("PJSIP/101-0000000c"))
    assert cards.sent[2:] == [(SHOW, call_id, ["1"]), (HIDE, call_id, ["2"])]
    assert holders.handed_to(call_id) == "1"


# -- end to end: the application, the listener wired by hand, the portal emulator ---------------

server = test_callcard.server  # the fixture: the application with the call card, started for each test


def follower(server):
    app = server.app
    return TransferFollower(app.card_holders, app.users, lambda: app.runtime.cards)


async def test_a_blind_transfer_moves_the_card_and_the_finish_names_the_last_user_with_the_whole_talk(
        server, portal):
    call_id = (await server.register(linkedid=LINKEDID))["B24_CALL_ID"]  # Anna's client: shown to 1
    assert (await server.call("answered", (call_id, "101"))).commands == []
    follower(server)(blind_event("102"))
    await until(lambda: portal.requests_for(HIDE))
    await server.finish(call_id, answered_at="1700000010.000", answered_by="101", hangup_at="1700000070.400")
    await until(lambda: delivered_finishes(portal))

    cards = [(request.method, request.params) for request in portal.requests
             if request.method in (SHOW, HIDE, "telephony.externalcall.finish")]
    assert cards == [
        (SHOW, {"CALL_ID": call_id, "USER_ID": "2"}),
        (HIDE, {"CALL_ID": call_id, "USER_ID": "1"}),
        ("telephony.externalcall.finish", {"CALL_ID": call_id, "USER_ID": "2", "DURATION": "60",
                                           "STATUS_CODE": "200"}),
    ]


async def test_a_transfer_to_a_mobile_keeps_the_card_and_the_finish_with_the_transferring_user(server, portal):
    call_id = (await server.register(linkedid=LINKEDID))["B24_CALL_ID"]
    await server.call("answered", (call_id, "101"))
    follower(server)(blind_event("79162220202"))  # Igor's mobile
    await server.finish(call_id, answered_at="1700000010.000", answered_by="101", hangup_at="1700000030.000")
    await until(lambda: delivered_finishes(portal))
    await asyncio.sleep(0.1)

    assert portal.requests_for(SHOW) == [] and portal.requests_for(HIDE) == []
    assert delivered_finishes(portal)[0]["USER_ID"] == "1"
