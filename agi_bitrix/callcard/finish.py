"""The `finish` script: telephony.externalcall.finish after hangup, through the durable outbox.

Dialplan (in the `h` extension or a hangup handler of the caller's channel):
AGI(agi://HOST:PORT/finish,${B24_CALL_ID},${B24_USER_ID},${DIALSTATUS},${SHARED(B24_ANSWERED_AT)},
${SHARED(B24_ANSWERED_BY)},${STRFTIME(,,%s.%3q)}[,${MIXMONITOR_FILENAME}[,DID[,outgoing]]])
The DID picks callcard.register.responsible's user for a call without an owner, as register did.
"outgoing" marks a call our user B24_USER_ID placed (the outgoing script's desk calls, and
click-to-call, agi_bitrix/clicktocall.py): that user finishes it, and the status says what the
client's side did (status.outgoing_status_code: a CANCEL is 603-S, not a missed call).

The answer stamp (B24_ANSWERED_AT, B24_ANSWERED_BY) is written by the [agi-bitrix-answered]
subroutine that Dial's U() and Queue's gosub run on the channel that answered; talk time is
hangup minus answer, both read from Asterisk's clock. The session sends Asterisk nothing: the
finish is stored durably and the hangup goes on; the portal is asked in the background. With
callcard.finish.recording.file, an answered call's recording is queued too, as a row of its own
that waits for the finish (callcard/recording.py uploads it).
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from agi_bitrix.agi.channel import AgiChannel
from agi_bitrix.agi.protocol import AgiRequest, loggable
from agi_bitrix.agi.quoting import agi_command
from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import (
    BitrixError,
    CallNotFound,
    WrongAuthType,
)
from agi_bitrix.bitrix.users import UserDirectory, answering_number
from agi_bitrix.callcard.dialplan import dialplan_values
from agi_bitrix.callcard.follow_up import FOLLOW_UP, follow_up_key, follow_up_row
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.identity import CALL_ID_PATTERN, USER_ID_PATTERN, responsible_user
from agi_bitrix.callcard.outbox import Entry, OutboxStore, Outcome
from agi_bitrix.callcard.status import ANSWERED, MISSED, outgoing_status_code, status_code
from agi_bitrix.config import Config
from agi_bitrix.phones import normalize_number

log = logging.getLogger("agi_bitrix.callcard")

FINISH = "telephony.externalcall.finish"

OUTGOING_MARK = "outgoing"  # finish's 9th argument: a call our user placed

RECORDING = "recording"  # the outbox's kind of row for a recording (callcard/recording.py sends it)
# What a value may be to stand in a recording's path: no "/", nothing hidden, nothing that climbs up.
_PATH_VALUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+@-]{0,199}$")


@dataclass(frozen=True)
class FinishArguments:
    call_id: str
    owner: str
    dialstatus: str
    answered_at: float | None
    answered_by: str
    hangup_at: float | None
    recording: str
    did: str = ""  # international digits, or ""
    outgoing: bool = False  # placed by our user `owner` (the 9th argument is "outgoing")


def finish_expressions(prefix: str) -> tuple[str, ...]:
    """The arguments of the sample's AGI(.../finish,...), as dialplan expressions."""
    return (f"${{{prefix}CALL_ID}}", f"${{{prefix}USER_ID}}", "${DIALSTATUS}", "${SHARED(B24_ANSWERED_AT)}",
            "${SHARED(B24_ANSWERED_BY)}", "${STRFTIME(,,%s.%3q)}", "${MIXMONITOR_FILENAME}")


def finish_arguments(values: list[str], default_country: str) -> FinishArguments:
    args = [value.strip() for value in values] + [""] * 9
    return FinishArguments(
        call_id=args[0] if CALL_ID_PATTERN.match(args[0]) else "",
        owner=args[1] if USER_ID_PATTERN.match(args[1]) else "",
        dialstatus=args[2].upper() if re.fullmatch(r"[A-Za-z]{1,20}", args[2]) else "",
        answered_at=_epoch(args[3]),
        answered_by=args[4],
        hangup_at=_epoch(args[5]),
        recording=os.path.basename(args[6]),
        did=normalize_number(args[7], default_country) or "",
        outgoing=args[8].strip().lower() == OUTGOING_MARK,
    )


def _epoch(text: str) -> float | None:
    """Seconds since 1970 as Asterisk prints them (${EPOCH}, ${STRFTIME(,,%s.%3q)}), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


class FinishService:
    def __init__(self, config: Config, outbox: OutboxStore | None, users: UserDirectory | None, holders: CardHolders,
                 clock: Callable[[], float] = time.time,
                 hide_cards: Callable[[str, list[str], str], None] | None = None) -> None:
        """`hide_cards(call_id, user_ids, uniqueid)` hides a finished call's card from those who
        still hold it but the finish's user (CardService.hide_at_finish), without waiting."""
        self.config = config
        self.outbox = outbox
        self.users = users
        self.holders = holders  # a finished call's card holders are forgotten
        self.clock = clock
        self.hide_cards = hide_cards

    async def handle_finish(self, request: AgiRequest, channel: AgiChannel) -> None:
        """Store the finish and close the session: the hangup never waits for the portal."""
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        if self.outbox is None:
            log.info("call %s: finish asked for, but there is no callcard section in the config", uniqueid)
            return
        values = await dialplan_values(request, channel, finish_expressions(self.config.variable_prefix))
        arguments = finish_arguments(values, self.config.policy.default_country)
        if not arguments.call_id:
            log.info("call %s: no B24_CALL_ID (the call was not registered); nothing to finish", uniqueid)
            return
        holders = self.holders.release(arguments.call_id)
        params = self.finish_params(arguments, uniqueid)
        self.close_cards(arguments.call_id, holders, params["USER_ID"] if params else "", uniqueid)
        if params is None:
            return
        added = await self.outbox.add(arguments.call_id, params)
        if added == "duplicate":
            log.info("call %s: finish %s was already queued; this one is ignored", uniqueid, arguments.call_id)
        elif added != "lost":  # the outbox logged a kept or lost finish at ERROR
            log.info("call %s: finish %s queued%s: user %s, %s s, status %s", uniqueid, arguments.call_id,
                     " in memory" if added == "kept" else "", params["USER_ID"], params["DURATION"],
                     params["STATUS_CODE"])
            if self.config.callcard.finish.recording_file and params["STATUS_CODE"] == ANSWERED:
                await self.queue_recording(arguments, uniqueid)
            if self.config.callcard.follow_up.kind != "off" and params["STATUS_CODE"] == MISSED:
                await self.queue_follow_up(channel, arguments, params["USER_ID"], uniqueid)

    async def queue_follow_up(self, channel: AgiChannel, arguments: FinishArguments, user_id: str,
                              uniqueid: str) -> None:
        """A missed call from a client the CRM knows: its follow-up, as an outbox row of its own
        sent once the finish is delivered (callcard/follow_up.py). The client is the CRM object
        routing found, read from the caller's channel: one more round trip, only for such calls."""
        assert self.outbox is not None
        prefix = self.config.variable_prefix
        reply = await channel.command(agi_command(
            "GET FULL VARIABLE", f"${{{prefix}ENTITY_TYPE}},${{{prefix}ENTITY_ID}},${{{prefix}PHONE}}"))
        values = [*(reply.data or "").split(",", 2), "", ""] if reply is not None and reply.ok else ["", "", ""]
        hangup_at = arguments.hangup_at if arguments.hangup_at is not None else self.clock()
        row = follow_up_row(self.config.callcard.follow_up, call_id=arguments.call_id, user_id=user_id,
                            entity_type=values[0], entity_id=values[1], phone=values[2].strip(), hangup_at=hangup_at)
        if row is None:
            log.info("call %s: missed, but from no CRM object routing knew; no follow-up", uniqueid)
            return
        added = await self.outbox.add(follow_up_key(arguments.call_id), row, kind=FOLLOW_UP, after=arguments.call_id)
        if added in ("stored", "kept"):
            log.info("call %s: follow-up (%s) of missed call %s queued for user %s on %s %s", uniqueid, row["kind"],
                     arguments.call_id, user_id, row["entity_type"], row["entity_id"])

    def close_cards(self, call_id: str, holders: list[str], finish_user: str, uniqueid: str) -> None:
        """A call nobody answered leaves its card open on every phone it rang: the finish closes
        it for its own user only, so the others get a hide now (before the finish is sent)."""
        others = [user for user in holders if user != finish_user]
        if others and self.hide_cards is not None:
            self.hide_cards(call_id, others, uniqueid)

    def finish_params(self, arguments: FinishArguments, uniqueid: str) -> dict[str, Any] | None:
        settings = self.config.callcard
        answered = arguments.answered_at is not None or arguments.dialstatus == "ANSWER"
        duration = 0
        if arguments.answered_at is not None:
            hangup_at = arguments.hangup_at if arguments.hangup_at is not None else self.clock()
            duration = max(0, round(hangup_at - arguments.answered_at))
        if arguments.outgoing:
            # The agent who placed it; whoever answered is the client, never a user to credit.
            user_id = arguments.owner
            status = outgoing_status_code(answered, arguments.dialstatus)
        else:
            user_id = self.taken_by(arguments) if answered else ""
            user_id = user_id or arguments.owner or responsible_user(settings.register, arguments.did)
            status = status_code(answered, arguments.dialstatus)
        if not user_id:
            log.warning("call %s: finish %s has no user (no owner, no responsible, no default_user); not sent",
                        uniqueid, arguments.call_id)
            return None
        params: dict[str, Any] = {
            "CALL_ID": arguments.call_id,
            "USER_ID": user_id,
            "DURATION": duration,
            "STATUS_CODE": status,
        }
        record_url = self.record_url(arguments, uniqueid) if answered else ""
        if record_url:
            params["RECORD_URL"] = record_url
        return params

    async def queue_recording(self, arguments: FinishArguments, uniqueid: str) -> None:
        """The recording's own outbox row, sent once the finish is delivered (attachRecord needs a
        finished call); its first look at the file after `recording.settle` seconds."""
        settings = self.config.callcard.finish
        assert self.outbox is not None
        path = recording_path(settings.recording_file, call_id=arguments.call_id, uniqueid=uniqueid,
                              recording=arguments.recording)
        if path is None:
            log.warning("call %s: no recording uploaded for %s: callcard.finish.recording.file needs a value this"
                        " call does not have (uniqueid %r, recording %r)", uniqueid, arguments.call_id, uniqueid,
                        arguments.recording)
            return
        now = self.clock()
        added = await self.outbox.add(recording_key(arguments.call_id),
                                      {"CALL_ID": arguments.call_id, "path": path, "hangup_at": now},
                                      kind=RECORDING, after=arguments.call_id,
                                      not_before=now + settings.recording_settle)
        if added in ("stored", "kept"):
            log.info("call %s: recording %s queued for %s", uniqueid, path, arguments.call_id)

    def taken_by(self, arguments: FinishArguments) -> str:
        """The Bitrix24 user whose extension or mobile answered, or "" when unknown; after a
        transfer to a colleague's extension, that colleague (callcard/transfers.py): the talk time
        still counts from the first answer."""
        handed_to = self.holders.handed_to(arguments.call_id)
        if handed_to:
            return handed_to
        number = answering_number(arguments.answered_by)
        user = self.users.by_number(number) if number and self.users is not None else None
        return user.user_id if user is not None else ""

    def record_url(self, arguments: FinishArguments, uniqueid: str) -> str:
        template = self.config.callcard.finish.record_url
        if not template or ("{recording}" in template and not arguments.recording):
            return ""
        return template.format(call_id=quote(arguments.call_id, safe=""), uniqueid=quote(uniqueid, safe=""),
                               recording=quote(arguments.recording, safe=""))


def recording_key(call_id: str) -> str:
    """A recording's outbox key; "/" never occurs in a CALL_ID, so it cannot meet a finish's key."""
    return f"{call_id}/{RECORDING}"


def recording_path(template: str, *, call_id: str, uniqueid: str, recording: str) -> str | None:
    """callcard.finish.recording.file filled in, or None when a field it uses has no safe value."""
    values = {"call_id": call_id, "uniqueid": uniqueid, "recording": recording}
    used = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if any(not _PATH_VALUE.match(values[name]) for name in used):
        return None
    return template.format(**values)


async def send_finish(portal: PortalClient, entry: Entry) -> Outcome:
    """Deliver one queued finish; tell the outbox whether it is done, worth retrying, or lost."""
    try:
        # Finishes can wait and calls cannot: a finish only takes a request slot that is free now.
        await portal.call(FINISH, entry.params, max_wait=0.0)
    except BitrixError as error:
        if isinstance(error, WrongAuthType):
            log.error("finish %s: %s", entry.key, WrongAuthType.ADVICE)
        return finish_outcome(error, entry.attempt)
    log.info("finish %s delivered (attempt %d)", entry.key, entry.attempt)
    return Outcome("delivered")


def finish_outcome(error: BitrixError, attempt: int) -> Outcome:
    detail = f"{error.reason}: {error.detail}"
    # Held and retried until callcard.finish.retry.give_up_after (bitrix/errors.py says which).
    if error.retry_later:
        return Outcome("retry", detail)
    if attempt > 1 and isinstance(error, CallNotFound):
        # An earlier attempt whose answer was lost (a timeout, a crash) did finish the call:
        # the portal closes a call once and then no longer knows it.
        log.info("finish of an earlier attempt went through; the portal no longer has the call open")
        return Outcome("delivered", "finished by an earlier attempt")
    return Outcome("failed", detail)
