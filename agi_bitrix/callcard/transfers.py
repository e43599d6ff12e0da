"""Transfers: the call card follows a blind or attended transfer to another employee's extension.

What Asterisk reports (main/stasis_bridges.c, blind_transfer_to_ami() and
attended_transfer_to_ami(), the same on branches 20 and 22; class `call`, so the minimal AMI user
of docs/ami.md with `read = call` gets them):
- `BlindTransfer` — `Result`, the transferer's and the transferee's channel state (fields with the
  prefixes `Transferer` and `Transferee`: `...Channel`, `...Uniqueid`, `...Linkedid`, ...),
  `Context` and `Extension`: where the transferee (the client) was sent.
- `AttendedTransfer` — `Result`, `OrigTransferer...`, `SecondTransferer...`, `Transferee...`,
  `TransferTarget...` (the channel the client is now connected to), `DestType`.
Both come for every way a transfer starts: features.conf's `blindxfer`/`atxfer` (DTMF), a
phone's own transfer (SIP REFER, which res_pjsip_refer hands to the same bridge functions), and
AMI's `BlindTransfer`/`Atxfer`. `IsExternal` says whether the transfer was started from outside
the bridge (REFER, AMI), not whether it goes to an external number.

The call is found by the client's linkedid (`TransfereeLinkedid`), which register saw as
`${CHANNEL(linkedid)}` (CardHolders.link). The destination counts as an employee only when its
number is a user's extension (UF_PHONE_INNER): a mobile or an external number keeps the card
with the user who transferred, as Bitrix24's telephony requirements ask
(market/preparing-to-publish/requirements-telephony.md). docs/call-card.md, "Transfers".

`card_move()` is the decision (pure); `TransferFollower` is the AMI listener that applies it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Protocol

from agi_bitrix.agi.protocol import loggable
from agi_bitrix.bitrix.users import UserDirectory, answering_number
from agi_bitrix.callcard.cards import HIDE, SHOW, CardService
from agi_bitrix.callcard.holders import MAX_CALLS, CardHolders
from agi_bitrix.phones import normalize_extension

log = logging.getLogger("agi_bitrix.callcard")

BLIND, ATTENDED = "blind", "attended"
WAITING_MAX = 1000  # attended transfers waiting for their colleague's BridgeEnter


class AmiEvent(Protocol):
    """What is read of an AMI event (agi_bitrix.ami.protocol.Event has it)."""

    @property
    def name(self) -> str: ...

    def get(self, name: str, default: str = "") -> str: ...


@dataclass(frozen=True)
class Transfer:
    kind: str  # BLIND or ATTENDED
    linkedid: str  # the client's linkedid: which call
    target: str  # the number the client was transferred to; "" when Asterisk does not say
    transferer: str  # the channel that let the call go (for the log)
    # An attended transfer whose event names no target: the bridge the client is in now, and the
    # channels there that are not the colleague (the client, the transferring channels).
    dest_bridge: str = ""
    not_target: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CardMove:
    """What a transfer does to the card: show it to `show` (or nobody, ""), hide it from `hide`,
    and whom the finish names from now on (`talking`, "" = unchanged)."""

    show: str
    hide: tuple[str, ...]
    talking: str


STAYS = CardMove("", (), "")


def transfer_from_event(event: AmiEvent) -> Transfer | None:
    """The transfer an AMI event reports, or None (another event, or a transfer that failed)."""
    if event.name not in ("BlindTransfer", "AttendedTransfer") or event.get("Result") != "Success":
        return None
    if event.name == "BlindTransfer":
        linkedid = event.get("TransfereeLinkedid") or event.get("TransfererLinkedid")
        return Transfer(BLIND, linkedid, event.get("Extension"), event.get("TransfererChannel"))
    # Attended: the client is now bridged with TransferTarget (PJSIP/102-..., or the Local channel
    # an atxfer dialled, Local/102@ctx-...;1). A merge into a conference (Threeway), an app or a
    # Local link names no single target: the card stays.
    linkedid = event.get("TransfereeLinkedid") or event.get("OrigTransfererLinkedid")
    transferer = event.get("OrigTransfererChannel")
    if event.get("DestType") != "Bridge":
        return Transfer(ATTENDED, linkedid, "", transferer)
    target = event.get("TransferTargetChannel")
    if target:
        return Transfer(ATTENDED, linkedid, answering_number(target), transferer)
    # Seen on 20 and 22: when the colleague's channel has already moved into the client's bridge as
    # the snapshot is taken, the event has no TransferTarget fields; that channel is found among
    # the bridge's members (BridgeEnter, class call), which TransferFollower keeps.
    not_target = frozenset(filter(None, (event.get("TransfereeChannel"), transferer,
                                         event.get("SecondTransfererChannel"))))
    return Transfer(ATTENDED, linkedid, "", transferer, event.get("DestBridgeUniqueid"), not_target)


def card_move(holders: Collection[str], target_user: str) -> CardMove:
    """Given who holds the call's card and the employee whose extension took the call ("" for a
    mobile, an external or unknown number): what to show, what to hide, who talks now."""
    if not target_user:
        return STAYS  # off the PBX's phones: the transferring user stays responsible
    show = "" if target_user in holders else target_user
    hide = tuple(sorted((user for user in holders if user != target_user), key=lambda uid: (len(uid), uid)))
    return CardMove(show, hide, target_user)


def extension_user(users: UserDirectory | None, number: str) -> str:
    """The active user whose extension (not mobile) is `number`, or ""."""
    extension = normalize_extension(number)
    user = users.by_number(extension) if extension and users is not None else None
    return user.user_id if user is not None and user.extension == extension else ""


class BridgeMembers:
    """Who is in each bridge, from BridgeEnter / BridgeLeave / BridgeDestroy; bounded (the oldest
    bridges are forgotten first)."""

    def __init__(self, max_bridges: int = MAX_CALLS) -> None:
        self._bridges: OrderedDict[str, set[str]] = OrderedDict()
        self._max_bridges = max_bridges

    def note(self, event: AmiEvent) -> str:
        """Takes a bridge event; returns the channel that entered a bridge, or ""."""
        bridge, channel = event.get("BridgeUniqueid"), event.get("Channel")
        if not bridge:
            return ""
        if event.name == "BridgeDestroy":
            self._bridges.pop(bridge, None)
        elif event.name == "BridgeLeave":
            self._bridges.get(bridge, set()).discard(channel)
        elif event.name == "BridgeEnter" and channel:
            self._bridges.setdefault(bridge, set()).add(channel)
            self._bridges.move_to_end(bridge)
            while len(self._bridges) > self._max_bridges:
                self._bridges.popitem(last=False)
            return channel
        return ""

    def members(self, bridge: str) -> frozenset[str]:
        return frozenset(self._bridges.get(bridge, ()))


def only_target(members: Collection[str], not_target: Collection[str]) -> str:
    """The one channel of `members` that is not in `not_target`, or "" (none, or several)."""
    candidates = [channel for channel in members if channel not in not_target]
    return candidates[0] if len(candidates) == 1 else ""


class TransferFollower:
    """The AMI listener (AmiClient.add_listener) that moves the card on each transfer."""

    def __init__(self, holders: CardHolders, users: UserDirectory | None, cards: Callable[[], CardService]) -> None:
        """`cards` gives the CardService in use (a reload replaces it; the holders outlive it)."""
        self.holders = holders
        self.users = users
        self.cards = cards
        self.bridges = BridgeMembers()
        # Attended transfers waiting for their colleague's BridgeEnter, by the client's bridge.
        self._waiting: OrderedDict[str, tuple[str, Transfer]] = OrderedDict()

    def __call__(self, event: AmiEvent) -> None:
        if event.name.startswith("Bridge"):
            self._bridge_event(event)
            return
        transfer = transfer_from_event(event)
        if transfer is None:
            return
        call_id = self.holders.call_of(transfer.linkedid)
        if call_id is None:
            return  # a call this server did not register (or no call card): nothing to move
        if transfer.dest_bridge:
            target = only_target(self.bridges.members(transfer.dest_bridge), transfer.not_target)
            if not target:  # the colleague's BridgeEnter has not come yet
                self._waiting[transfer.dest_bridge] = (call_id, transfer)
                while len(self._waiting) > WAITING_MAX:
                    self._waiting.popitem(last=False)
                return
            transfer = replace(transfer, target=answering_number(target))
        self._move(call_id, transfer)

    def _bridge_event(self, event: AmiEvent) -> None:
        entered = self.bridges.note(event)
        bridge = event.get("BridgeUniqueid")
        if event.name == "BridgeDestroy":
            self._waiting.pop(bridge, None)
        waiting = self._waiting.get(bridge) if entered else None
        if waiting is not None and entered not in waiting[1].not_target:
            del self._waiting[bridge]
            self._move(waiting[0], replace(waiting[1], target=answering_number(entered)))

    def _move(self, call_id: str, transfer: Transfer) -> None:
        where = f"{transfer.kind} transfer of {call_id} by {loggable(transfer.transferer) or '-'}"
        target = loggable(transfer.target) or "-"
        move = card_move(self.holders.holders_of(call_id), extension_user(self.users, transfer.target))
        if move is STAYS:
            log.info("%s to %s: not an employee's extension; the card stays", where, target)
            return
        self.holders.hand_over(call_id, move.talking)
        log.info("%s to %s: the card goes to user %s", where, target, move.talking)
        uniqueid = loggable(transfer.linkedid) or "-"
        cards = self.cards()
        if move.show:
            cards.send(SHOW, call_id, [move.show], uniqueid)
        if move.hide:
            cards.send(HIDE, call_id, list(move.hide), uniqueid)
