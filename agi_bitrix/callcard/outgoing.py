"""The `outgoing` script: an employee's call from a desk phone to a client, in Bitrix24's call log.

Dialplan (asterisk-samples: [agi-bitrix-outgoing], run in the outbound context before the trunk's
Dial(); on FreePBX from macro-dialout-trunk's predial hook):
AGI(agi://HOST:PORT/outgoing,EXTENSION,NUMBER,TRUNK,${CHANNEL(linkedid)}). The caller's extension
becomes the Bitrix24 user whose UF_PHONE_INNER it is (the user directory); the dialled number, in
international digits, is registered with telephony.externalcall.register TYPE=1 (outgoing), and
LINE_NUMBER is callcard.outgoing's line of that trunk. Register's own machinery sends it
(RegisterService.send_register: the same deadline, the same failures, the same CRM notes), and the
same answer stamp, finish and recording follow: the session sets B24_CALL_ID, B24_USER_ID and
B24_REGISTER_ERROR, and the dialplan arms [agi-bitrix-finish] when B24_CALL_ID is set.

Only numbers outside the company are registered, and only they may wait for the portal: an
emergency number (libphonenumber's short-number metadata), another short number, an extension or
anything that is not a valid subscriber number answers at once with B24_REGISTER_ERROR saying
which. An extension with no active Bitrix24 user is logged; the call goes on unregistered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import phonenumbers
from phonenumbers import shortnumberinfo

from agi_bitrix.agi.channel import AgiChannel
from agi_bitrix.agi.protocol import AgiRequest, loggable
from agi_bitrix.bitrix.users import UserDirectory
from agi_bitrix.callcard.dialplan import dialplan_values
from agi_bitrix.callcard.register import CALL_ID_PATTERN, Created, RegisterService, set_register_answer
from agi_bitrix.config import Config
from agi_bitrix.phones import dialable_number, normalize_extension

log = logging.getLogger("agi_bitrix.callcard")

OUTGOING = 1  # register's TYPE (api-reference/telephony/telephony-external-call-register.md)
# Why a dialled number is not registered (B24_REGISTER_ERROR).
EMERGENCY, SHORT, NOT_EXTERNAL = "emergency", "short_number", "not_external"
# The longest short number libphonenumber knows has 6 digits; a subscriber number is longer.
_SHORT_NUMBER_DIGITS = 6


@dataclass(frozen=True)
class OutgoingArguments:
    extension: str  # the caller's extension, digits only; "" when it is none
    dialled: str  # as the dialplan gave it
    trunk: str  # the key of callcard.outgoing.lines
    external_call_id: str


def outgoing_expressions() -> tuple[str, ...]:
    """What a bare AGI(agi://HOST:PORT/outgoing) reads from the channel instead of arguments."""
    return ("${CALLERID(num)}", "${EXTEN}", "${AGI_BITRIX_TRUNK}", "${CHANNEL(linkedid)}")


def outgoing_arguments(values: list[str], request: AgiRequest) -> OutgoingArguments:
    """The dialplan's values, each checked, with the AGI header filling in what is missing."""
    args = [value.strip() for value in values] + [""] * 4
    call_ids = [text for text in (args[3], request.get("agi_uniqueid")) if CALL_ID_PATTERN.match(text)]
    return OutgoingArguments(
        extension=normalize_extension(args[0]) or "",
        dialled=args[1] or request.get("agi_extension"),
        trunk=args[2],
        external_call_id=call_ids[0] if call_ids else "",
    )


def external_number(dialled: str, default_country: str) -> tuple[str | None, str]:
    """(international digits, "") for a number outside the company; (None, why) for one that must
    not be registered: an emergency number, another short number (services, 3- or 4-digit codes),
    or anything that is not a valid subscriber number (an extension, a feature code, junk)."""
    digits = dialled.strip()
    if digits.isascii() and digits.isdigit() and len(digits) <= _SHORT_NUMBER_DIGITS:
        if shortnumberinfo.is_emergency_number(digits, default_country):
            return None, EMERGENCY
        if _is_short_number(digits, default_country):
            return None, SHORT
    number = dialable_number(dialled, default_country)
    return (number, "") if number is not None else (None, NOT_EXTERNAL)


def _is_short_number(digits: str, country: str) -> bool:
    try:
        return shortnumberinfo.is_valid_short_number_for_region(phonenumbers.parse(digits, country), country)
    except phonenumbers.NumberParseException:  # "0", "00": not even a short number
        return False


class OutgoingService:
    """The `outgoing` script; registers through `register`, so both kinds of call share its rules."""

    def __init__(self, config: Config, register: RegisterService, users: UserDirectory | None) -> None:
        self.config = config
        self.register = register
        self.users = users

    async def handle_outgoing(self, request: AgiRequest, channel: AgiChannel) -> None:
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        values = await dialplan_values(request, channel, outgoing_expressions())
        created = Created()
        try:
            call_id, user_id, error = await self.register_outgoing(request, values, created)
        except Exception:
            log.exception("call %s: outgoing register failed unexpectedly", uniqueid)
            call_id, user_id, error = "", "", "internal"
        prefix = self.config.variable_prefix
        # B24_USER_ID is the caller's user: finish sends it for a call nobody answered.
        variables = {f"{prefix}CALL_ID": call_id, f"{prefix}USER_ID": user_id, f"{prefix}REGISTER_ERROR": error}
        await set_register_answer(channel, uniqueid, prefix, variables,
                                  created if self.config.callcard.outgoing.crm_create else None)

    async def register_outgoing(self, request: AgiRequest, values: list[str],
                                created: Created | None = None) -> tuple[str, str, str]:
        """(CALL_ID, the caller's user id, "") on success; ("", user id or "", reason) otherwise."""
        config = self.config
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        if not config.callcard.enabled:
            return "", "", "disabled"
        arguments = outgoing_arguments(values, request)
        number, reason = external_number(arguments.dialled, config.policy.default_country)
        if number is None:
            log.info("call %s: outgoing call to %s (%s) is not registered", uniqueid,
                     loggable(arguments.dialled) or "-", reason.replace("_", " "))
            return "", "", reason
        user = self.users.by_extension(arguments.extension) if self.users is not None else None
        if user is None:
            log.warning("call %s: outgoing call from extension %s is not registered: %s", uniqueid,
                        arguments.extension or "-", self._why_no_user(arguments.extension))
            return "", "", "no_user"
        params = self.outgoing_params(arguments, number, user.user_id)
        settings = config.callcard.outgoing
        call_id, error = await self.register.send_register(params, uniqueid, show=settings.show,
                                                           crm_create=settings.crm_create, created=created)
        return call_id, user.user_id, error

    def _why_no_user(self, extension: str) -> str:
        if self.users is None:
            return "there is no user directory (users section)"
        if self.users.loaded_at is None:
            return "the user directory has not loaded yet"
        if not extension:
            return "no extension (digits) came with the call"
        return "no active Bitrix24 user has it as internal number (UF_PHONE_INNER)"

    def outgoing_params(self, arguments: OutgoingArguments, number: str, user_id: str) -> dict[str, Any]:
        settings = self.config.callcard.outgoing
        params: dict[str, Any] = {
            "USER_ID": user_id,
            "PHONE_NUMBER": number,
            "TYPE": OUTGOING,
            "CALL_START_DATE": datetime.now(UTC).isoformat(timespec="seconds"),
            "CRM_CREATE": settings.crm_create,
            "SHOW": settings.show,
            # Unique per call, or the portal merges this call into an earlier one within 30 minutes.
            "EXTERNAL_CALL_ID": arguments.external_call_id,
        }
        line = settings.line_of(arguments.trunk)
        if line:
            params["LINE_NUMBER"] = line
        return params
