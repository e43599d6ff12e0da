"""Calls the server starts itself: an Async Originate and its outcome.

Asterisk answers an `Async: true` Originate at once ("Originate successfully queued") and tells
how it ended later, in an OriginateResponse event with the same ActionID (main/manager.c,
fast_originate): `Response: Success` when the first channel answered, `Failure` otherwise, and a
`Reason`: the last control frame the dialling saw (main/channel.c, __ast_request_and_dial and
handle_cause; values from include/asterisk/frame.h, the same on Asterisk 20 and 22).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from agi_bitrix.ami.client import AmiClient
from agi_bitrix.ami.errors import UnsafeAction

# A channel variable's name as Originate's Variable takes it; leading _ or __ make it inherited.
_VARIABLE_NAME = re.compile(r"_{0,2}[A-Za-z0-9][A-Za-z0-9_]{0,79}")
# Originate splits each Variable value with the dialplan's argument parser (main/manager.c,
# man_do_variable_value -> main/app.c, __ast_app_separate_args): a comma starts another
# NAME=value (a CRM value could set variables of its own), and quotes and backslashes are
# removed. Refused, so a value arrives as it was given or not at all.
_VARIABLE_VALUE_FORBIDDEN = frozenset(',"\\')
# Asterisk waits for the first leg's answer for the Originate's Timeout; we wait that long and
# this much more for the OriginateResponse (Asterisk's own hangup and event take a moment).
_OUTCOME_MARGIN = 5.0


class OriginateReason(enum.IntEnum):
    """OriginateResponse's `Reason` (AST_CONTROL_* of include/asterisk/frame.h)."""

    NOT_PLACED = 0  # the channel could not be requested or called, or ended with a cause other than busy/congestion
    HANGUP = 1  # AST_CONTROL_HANGUP: the channel hung up (or went away) before answering
    RINGING = 3  # AST_CONTROL_RINGING: still ringing when Timeout ran out: no answer
    ANSWERED = 4  # AST_CONTROL_ANSWER
    BUSY = 5  # AST_CONTROL_BUSY
    CONGESTION = 8  # AST_CONTROL_CONGESTION, also for an incomplete number (AST_CONTROL_INCOMPLETE)


@dataclass(frozen=True)
class OriginateResult:
    success: bool  # the first leg answered (and went on to the context or application)
    reason: int  # an OriginateReason, kept as a number when Asterisk sends one not listed
    channel: str  # the channel's name; on failure often the dial string (tech/data) instead
    uniqueid: str  # the first leg's Uniqueid: the ChannelId asked for, if one was

    @property
    def reason_name(self) -> str:
        try:
            return OriginateReason(self.reason).name.lower()
        except ValueError:
            return f"reason_{self.reason}"


@dataclass(frozen=True)
class OriginateRequest:
    """One Async Originate: ring `channel`; once it answers, send it to context+exten (or run an
    application). Values from the CRM may go anywhere here: fields() refuses what could inject."""

    channel: str  # who rings first, e.g. PJSIP/101 or Local/101@from-internal
    context: str = ""
    exten: str = ""
    priority: str = "1"
    application: str = ""
    data: str = ""
    timeout: float = 30.0  # seconds the first leg may ring
    caller_id: str = ""  # what the first phone shows: "Name" <number>
    variables: Mapping[str, str] = field(default_factory=dict)  # __NAME reaches every leg of the call
    channel_id: str = ""  # the first leg's Uniqueid (and the call's Linkedid), chosen by us
    other_channel_id: str = ""  # the ;2 half's Uniqueid of a Local channel
    account: str = ""

    def fields(self) -> list[tuple[str, str]]:
        """The Originate's fields; UnsafeAction for a combination or value Asterisk would misread."""
        if bool(self.application) == bool(self.context or self.exten):
            raise UnsafeAction("an Originate goes either to context+exten or to an application, exactly one")
        if self.context and not self.exten:
            raise UnsafeAction("an Originate to a context needs an exten")
        fields = [("Channel", self.channel)]
        if self.application:
            fields += [("Application", self.application), ("Data", self.data)]
        else:
            fields += [("Context", self.context), ("Exten", self.exten), ("Priority", self.priority)]
        fields += [("Timeout", str(max(1, round(self.timeout * 1000)))), ("Async", "true")]
        optional = (("CallerID", self.caller_id), ("ChannelId", self.channel_id),
                    ("OtherChannelId", self.other_channel_id), ("Account", self.account))
        fields += [(name, value) for name, value in optional if value]
        for name, value in self.variables.items():
            if not _VARIABLE_NAME.fullmatch(name):
                raise UnsafeAction("a variable name must be letters, digits and _ (leading _ or __ to inherit)")
            if any(char in _VARIABLE_VALUE_FORBIDDEN for char in value):
                raise UnsafeAction(f"the value of variable {name} holds a comma, quote or backslash,"
                                   " which Originate would split or strip")
            fields.append(("Variable", f"{name}={value}"))
        return fields


async def originate(client: AmiClient, request: OriginateRequest) -> OriginateResult:
    """Rings the request's channel for up to its timeout and returns how that ended. Raises as
    AmiClient.send_awaiting does: AmiUnavailable (nothing sent), UnsafeAction (nothing sent),
    ActionFailed (Asterisk refused it: permission, no such extension), ActionTimeout,
    OriginateOutcomeUnknown (the connection was lost after sending: it may still ring; never resend)."""
    _, event = await client.send_awaiting("Originate", request.fields(), timeout=request.timeout + _OUTCOME_MARGIN)
    try:
        reason = int(event.get("Reason", "0"))
    except ValueError:
        reason = OriginateReason.NOT_PLACED
    return OriginateResult(success=event.get("Response").lower() == "success", reason=reason,
                           channel=event.get("Channel"), uniqueid=event.get("Uniqueid"))
