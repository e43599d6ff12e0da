"""The call card follows the call: shown to whoever's phone rings, hidden from the rest on answer.

Dialplan (asterisk-samples): Dial's and Queue's pre-dial handler b(agi-bitrix-ringing^s^1(NUMBER))
runs AGI(agi://HOST:PORT/ringing,${AGI_BITRIX_CALL_ID},NUMBER-OR-CHANNEL) on each phone's channel
before it rings; the answer stamp [agi-bitrix-answered] runs AGI(agi://HOST:PORT/answered,
${AGI_BITRIX_CALL_ID},NUMBER-OR-CHANNEL) on the channel that answered. The number is turned into a
Bitrix24 user by the user directory (UF_PHONE_INNER, else PERSONAL_MOBILE), and
telephony.externalCall.show / .hide are sent (api-reference/telephony/telephony-external-call-show.md,
-hide.md: USER_ID one id or a list; `false` for a call the portal does not have). Bitrix24's
requirements for telephony integrations ask for exactly this (market/preparing-to-publish/
requirements-telephony.md: show the card to the employee the call goes to, hide it from the others).

A pre-dial handler holds the ring until it returns, and Queue() runs them one member after
another. So each session sends Asterisk nothing and ends as soon as its arguments are read: the
show or hide goes to the portal afterwards, in the background, and only through a request slot
that is free at once (like a finish), so it never holds a ring and never takes a slot a call's
lookup needs. Who holds each call's card is kept in memory (`CardHolders`, outliving reloads):
register's SHOW adds the registered user, each ring its user, the answer keeps only the one who
answered, and finish forgets the call and hides the card from everyone who still holds it but the
finish's user (a call nobody answered: all the phones it rang). After a restart between the ring
and the end of the call the others' cards are not hidden.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from agi_bitrix.agi.channel import AgiChannel
from agi_bitrix.agi.protocol import AgiRequest, loggable
from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.bitrix.users import UserDirectory, answering_number
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.identity import CALL_ID_PATTERN
from agi_bitrix.config import Config

log = logging.getLogger("agi_bitrix.callcard")

SHOW = "telephony.externalcall.show"
HIDE = "telephony.externalcall.hide"
# What a show or hide ends as, for agi_bitrix_call_cards_total{action, result}.
DONE, NOT_FOUND, FAILED = "done", "call_not_found", "failed"


class CardService:
    """The `ringing` and `answered` scripts, and register's and finish's notes about holders."""

    def __init__(self, config: Config, portal: PortalClient, users: UserDirectory | None, holders: CardHolders,
                 count: Callable[[str, str], None]) -> None:
        """`count(action, result)` counts each show and hide sent (the metrics)."""
        self.config = config
        self.portal = portal
        self.users = users
        self.holders = holders
        self.count = count
        self._sending: set[asyncio.Task[None]] = set()
        # Per call, its shows and hides under way: a hide waits for all of them, a show only for
        # the hides (the shows for the phones of one queue go out together).
        self._under_way: dict[str, dict[asyncio.Task[None], str]] = {}

    async def handle_ringing(self, request: AgiRequest, channel: AgiChannel) -> None:
        """A phone is about to ring: show the card to its user, if they do not have it yet."""
        found = self._call_and_user(request, "ringing")
        if found is None:
            return
        call_id, user_id = found
        if self.holders.add(call_id, user_id):
            self._send(SHOW, call_id, [user_id], loggable(request.get("agi_uniqueid")) or "-")

    async def handle_answered(self, request: AgiRequest, channel: AgiChannel) -> None:
        """A phone answered: hide the card from everyone else who had it; show it to the one who
        answered if no ring showed it (a leg without the ringing hook)."""
        # Who answered must be known: hiding the card from everyone but an unknown phone could
        # hide it from the very person talking (an owner on a phone the directory does not list).
        found = self._call_and_user(request, "answered")
        if found is None:
            return
        call_id, user_id = found
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        if self.holders.add(call_id, user_id):
            self._send(SHOW, call_id, [user_id], uniqueid)
        others = self.holders.keep_only(call_id, user_id)
        if others:
            self._send(HIDE, call_id, others, uniqueid)

    def _call_and_user(self, request: AgiRequest, script: str) -> tuple[str, str] | None:
        """(CALL_ID, the user of the number or channel in the arguments), or None when there is
        nothing to do; says why in the log."""
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        if not self.config.callcard.enabled:
            log.info("call %s: %s asked for, but there is no callcard section in the config", uniqueid, script)
            return None
        args = [arg.strip() for arg in request.args] + ["", ""]
        call_id = args[0] if CALL_ID_PATTERN.match(args[0]) else ""
        if not call_id:
            log.info("call %s: %s without a usable CALL_ID (the call was not registered); nothing to do",
                     uniqueid, script)
            return None
        number = answering_number(args[1] or request.get("agi_channel"))
        user = self.users.by_number(number) if number and self.users is not None else None
        if user is None:
            why = "there is no user directory (users section)" if self.users is None else "no active user has it"
            log.info("call %s: %s %s: %s; no card for it", uniqueid, script, loggable(number or args[1]) or "-", why)
            return None
        return call_id, user.user_id

    def hide_at_finish(self, call_id: str, users: list[str], uniqueid: str) -> None:
        """The call ended (the finish script ran): hide its card from `users`, everyone still
        holding it but the finish's user, whose card the finish closes (the portal's
        finishExternalCall hides it from the finish's USER_ID only). In the background; the
        finish waits for it (`settled`): the portal hides nothing for a call it has finished."""
        if self.config.callcard.enabled and users:
            self._send(HIDE, call_id, users, uniqueid)

    async def settled(self, call_id: str) -> None:
        """Wait until this call's shows and hides under way are done (each within its deadline)."""
        under_way = list(self._under_way.get(call_id, ()))
        if under_way:
            await asyncio.wait(under_way)

    def _send(self, method: str, call_id: str, users: list[str], uniqueid: str) -> None:
        # After the session: the ring or the bridge waits for nothing but the AGI round trip.
        # One call's cards reach the portal in the order the phones rang and answered: a ring's
        # show still on its way must not land after the hide that closes that card, and a show
        # after a hide waits for it. Shows for different phones do not wait for each other: with
        # a slow portal, a queue's members would otherwise see the card one deadline apart.
        under_way = self._under_way.setdefault(call_id, {})
        before = [task for task, kind in under_way.items() if method == HIDE or kind == HIDE]
        task = asyncio.create_task(self._in_turn(before, method, call_id, users, uniqueid))
        under_way[task] = method
        self._sending.add(task)
        task.add_done_callback(functools.partial(self._sent, call_id))

    def _sent(self, call_id: str, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        under_way = self._under_way.get(call_id)
        if under_way is not None:
            under_way.pop(task, None)
            if not under_way:
                del self._under_way[call_id]

    async def _in_turn(self, before: list[asyncio.Task[None]], method: str, call_id: str, users: list[str],
                       uniqueid: str) -> None:
        if before:
            await asyncio.wait(before)
        await self._request(method, call_id, users, uniqueid)

    async def _request(self, method: str, call_id: str, users: list[str], uniqueid: str) -> None:
        action = "show" if method == SHOW else "hide"
        params: dict[str, Any] = {"CALL_ID": call_id, "USER_ID": users[0] if len(users) == 1 else users}
        try:
            async with asyncio.timeout(self.config.callcard.cards.deadline):
                # Only a slot that is free now: a card is worth less than a call's lookup.
                result = await self.portal.call(method, params, max_wait=0.0)
        except TimeoutError:
            log.warning("call %s: %s of %s for user(s) %s took longer than %.1f s (callcard.cards.deadline)",
                        uniqueid, method, call_id, ",".join(users), self.config.callcard.cards.deadline)
            self.count(action, FAILED)
            return
        except BitrixError as error:
            log.warning("call %s: %s of %s for user(s) %s failed: %s", uniqueid, method, call_id, ",".join(users),
                        error)
            self.count(action, FAILED)
            return
        if result is not True:
            log.warning("call %s: %s of %s: the portal does not have this call (answered %.40r)", uniqueid,
                        method, call_id, result)
            self.count(action, NOT_FOUND)
            return
        log.info("call %s: card of %s %s user(s) %s", uniqueid, call_id,
                 "shown to" if method == SHOW else "hidden from", ",".join(users))
        self.count(action, DONE)

    async def close(self) -> None:
        """Let the shows and hides under way end (each within its deadline)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    def send(self, method: str, call_id: str, users: list[str], uniqueid: str) -> None:
        """A show or hide decided elsewhere (a transfer, callcard/transfers.py), in turn with the
        call's others."""
        self._send(method, call_id, users, uniqueid)
