"""Click-to-call: a user clicks a number in Bitrix24, their phone rings, and once they answer the
PBX dials the client.

The event (ONEXTERNALCALLSTART, already found authentic by the receiver) becomes a
`ClickToCallEvent`; `ClickToCall.handle` then, in order: checks the destination against the dial
policy (dialpolicy.py), finds the user's extension in the user directory (UF_PHONE_INNER), holds
the user's one slot and a token of the global rate, looks up the client's CRM name for the agent's
display, and asks the PBX (a `Dialer`: AMI's Originate) to ring the agent's channel and, once
answered, to send it into the click-to-call context with the client's number as the extension.
The dialplan (asterisk-samples/extensions.conf, [agi-bitrix-click-to-call]) dials the client and
finishes the call from its hangup handler with the event's CALL_ID (the portal opened the call
when the user clicked: there is no register).

Whenever the client is not dialled (refused by the policy, no extension, too many clicks, the
agent did not answer, the PBX unreachable) the call is finished here at once, through the same
outbox as every finish, with a STATUS_CODE and FAILED_REASON that say why (docs/click-to-call.md
has the table), and one log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.bitrix.users import User
from agi_bitrix.callcard.identity import CALL_ID_PATTERN, USER_ID_PATTERN
from agi_bitrix.callcard.status import CANCELLED, MISSED
from agi_bitrix.dialpolicy import ClickToCallSettings, Destination, dial_destination, dial_policy
from agi_bitrix.routing.variables import display_name

log = logging.getLogger("agi_bitrix.clicktocall")

_DIGITS = re.compile(r"^[0-9]{1,32}$")


@dataclass(frozen=True)
class ClickToCallEvent:
    """What the flow needs of an authentic ONEXTERNALCALLSTART (api-reference/telephony/events/
    on-external-call-start.md in bitrix24/b24restdocs); the receiver maps its event onto this."""

    call_id: str  # CALL_ID: the call the portal opened; finish closes this one
    user_id: str  # USER_ID: who clicked
    phone_number: str  # PHONE_NUMBER as the CRM holds it
    crm_entity_type: str = ""
    crm_entity_id: str = ""
    line_number: str = ""  # LINE_NUMBER: the line the user chose


# OriginateResponse's Reason: an AST_CONTROL_* code (include/asterisk/frame.h) that main/pbx.c's
# pbx_dial_reason() makes of how the first leg's dial ended (the same on Asterisk 20 and 22).
ANSWERED = 4  # AST_CONTROL_ANSWER


@dataclass(frozen=True)
class OriginateOutcome:
    reason: int

    @property
    def answered(self) -> bool:
        return self.reason == ANSWERED


class DialerError(Exception):
    """The PBX could not be asked: AMI down or refusing the login, the action refused, or its
    answer lost. The message names the cause and never a secret."""


class Dialer(Protocol):
    async def originate(self, channel: str, context: str, exten: str, variables: Mapping[str, str],
                        caller_id: str, timeout: float) -> OriginateOutcome:
        """Ring `channel` for at most `timeout` seconds; once answered, send it to `exten` in
        `context` with `variables` set on it. Returns when it was answered or has failed."""
        ...


class UserLookup(Protocol):
    def by_id(self, user_id: str) -> User | None: ...


class FinishQueue(Protocol):
    """Where the flow's finishes go: the call card's outbox (callcard/outbox.py's OutboxStore), so
    a finish the dialplan also sends for the same CALL_ID is delivered once."""

    async def add(self, key: str, params: dict[str, Any]) -> str: ...


class CrmNames(Protocol):
    async def lookup(self, phone: str) -> CrmAnswer: ...


@dataclass(frozen=True)
class Failure:
    status: str  # STATUS_CODE for telephony.externalcall.finish
    reason: str  # FAILED_REASON, and the log line's words


# The agent's leg, from OriginateResponse's Reason (pbx_dial_reason(): 0 for AST_DIAL_RESULT_FAILED
# and any other cause, AST_CONTROL_HANGUP, _RINGING for NO_ANSWER or ANSWERED_ELSEWHERE, _BUSY for
# USER_BUSY, _CONGESTION for CALL_REJECTED, out of order, temporary failure and congestion).
AGENT_LEG = {
    0: Failure("480", "the agent's phone could not be rung (no such endpoint, not registered, or a failure)"),
    1: Failure(CANCELLED, "the agent's call was hung up before it was answered"),
    3: Failure(MISSED, "the agent did not answer"),
    5: Failure("486", "the agent's phone is busy"),
    8: Failure("503", "the agent's phone refused the call or is out of order"),
}
PBX_UNREACHABLE = "503"
NO_PHONE = "480"
USER_BUSY = "486"
RATE_EXCEEDED = "480"
USER_INACTIVE = "403"


def agent_leg_failure(outcome: OriginateOutcome) -> Failure:
    return AGENT_LEG.get(outcome.reason, Failure("OTHER", f"the agent's call ended with Originate reason"
                                                          f" {outcome.reason}"))


class ClickLimits:
    """At most one click per user being placed at a time, and a global rate (a token bucket:
    the request budget's own GCRA, never waiting)."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket = RateLimiter(per_second, burst, clock)
        self.placing: set[str] = set()

    def admit(self, user_id: str) -> Failure | None:
        if user_id in self.placing:
            return Failure(USER_BUSY, "another click-to-call of this user is still being placed")
        if self.bucket.reserve(max_wait=0.0) is None:
            return Failure(RATE_EXCEEDED, "too many clicks at once (clicktocall.rate)")
        self.placing.add(user_id)
        return None

    def release(self, user_id: str) -> None:
        self.placing.discard(user_id)


def client_name(answer: CrmAnswer, event: ClickToCallEvent) -> str:
    """The CRM object's name as a phone may show it: the object the user clicked in, else the first."""
    chosen = next((entity for entity in answer.entities if (entity.entity_type, entity.entity_id)
                   == (event.crm_entity_type.upper(), event.crm_entity_id)), None)
    if chosen is None and answer.entities:
        chosen = answer.entities[0]
    return display_name(chosen.name) if chosen is not None else ""


class ClickToCall:
    def __init__(self, settings: ClickToCallSettings, *, default_country: str, prefix: str, dialer: Dialer,
                 users: UserLookup, outbox: FinishQueue, names: CrmNames | None = None,
                 name_wait: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        """`names`: the CRM lookup that gives the client's name (None: the number alone is shown);
        the ring waits at most `name_wait` seconds for it."""
        self.settings, self.prefix, self.policy = settings, prefix, dial_policy(settings, default_country)
        # Its neighbours, as Protocols: the PBX, the user directory, the outbox, the CRM.
        self.dialer, self.users, self.outbox, self.names = dialer, users, outbox, names
        self.name_wait = name_wait
        self.limits = ClickLimits(settings.rate_per_second, settings.rate_burst, clock)
        self.outcomes: Counter[str] = Counter()  # how clicks ended, for metrics and /healthz
        self._lookups: set[asyncio.Task[CrmAnswer]] = set()

    async def handle(self, event: ClickToCallEvent) -> str:
        """Act on one authentic click; returns how it ended: answered (the dialplan goes on) or
        the reason it was finished here."""
        if not (CALL_ID_PATTERN.match(event.call_id) and USER_ID_PATTERN.match(event.user_id)):
            log.warning("click-to-call event with an unusable CALL_ID %r or USER_ID %r: ignored",
                        event.call_id[:130], event.user_id[:30])
            return self._count("bad_event")
        destination = dial_destination(event.phone_number, self.policy)
        if not isinstance(destination, Destination):
            return await self._finish(event, Failure(destination.status, f"refused by the dial policy:"
                                                                         f" {destination.detail}"),
                                      f"refused_{destination.reason}")
        user = self.users.by_id(event.user_id)
        if user is None or not user.active or not user.extension:
            return await self._finish(event, _user_failure(user, event.user_id), "no_extension")
        refused = self.limits.admit(event.user_id)
        if refused is not None:
            return await self._finish(event, refused, "user_busy" if refused.status == USER_BUSY else "rate")
        try:
            outcome = await self._originate(event, user.extension, destination.number)
        except DialerError as error:
            return await self._finish(event, Failure(PBX_UNREACHABLE, f"the PBX could not be asked: {error}"),
                                      "pbx_unreachable")
        except Exception as error:  # a bug (ours or the AMI layer's): the call is still finished
            log.error("click-to-call %s: the Originate failed unexpectedly", event.call_id, exc_info=error)
            return await self._finish(event, Failure(PBX_UNREACHABLE, f"internal error ({type(error).__name__})"),
                                      "internal_error")
        finally:
            self.limits.release(event.user_id)
        if not outcome.answered:
            return await self._finish(event, agent_leg_failure(outcome), "agent_not_answered")
        log.info("click-to-call %s: user %s answered on %s; dialling %s", event.call_id, event.user_id,
                 user.extension, destination.number)
        return self._count("answered")

    async def refuse_busy(self, event: ClickToCallEvent) -> str:
        """Too many clicks are being placed on this server at once: finished now, never queued."""
        return await self._finish(event, Failure(RATE_EXCEEDED, "too many clicks being placed at once on this server"),
                                  "server_busy")

    async def _originate(self, event: ClickToCallEvent, extension: str, number: str) -> OriginateOutcome:
        name = await self._name(number, event)
        line = event.line_number.strip().removeprefix("+")
        variables = {
            f"{self.prefix}CALL_ID": event.call_id,
            f"{self.prefix}USER_ID": event.user_id,
            f"{self.prefix}EXTENSION": extension,
            # The client sees the line's number when it is one; else the dialplan sends the agent's.
            f"{self.prefix}LINE_NUMBER": line if _DIGITS.match(line) else "",
        }
        # display_name leaves no quote, comma or angle bracket that could break the header.
        caller_id = f'"{name}" <{number}>' if name else number
        log.info("click-to-call %s: ringing user %s on %s for %s", event.call_id, event.user_id, extension, number)
        return await self.dialer.originate(self.settings.channel.format(extension=extension), self.settings.context,
                                           number, variables, caller_id, self.settings.ring)

    async def _name(self, number: str, event: ClickToCallEvent) -> str:
        """The client's name, if the lookup gives it within name_wait; a late lookup goes on and
        fills the cache for the next time."""
        if self.names is None or not self.settings.show_name:
            return ""
        task = asyncio.ensure_future(self.names.lookup(number))
        self._lookups.add(task)
        task.add_done_callback(self._lookup_done)
        done, _ = await asyncio.wait({task}, timeout=self.name_wait)
        if not done or task.cancelled() or task.exception() is not None:
            return ""
        return client_name(task.result(), event)

    def _lookup_done(self, task: asyncio.Task[CrmAnswer]) -> None:
        self._lookups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("click-to-call: the CRM lookup for the client's name failed unexpectedly",
                      exc_info=task.exception())

    async def _finish(self, event: ClickToCallEvent, failure: Failure, outcome: str) -> str:
        params: dict[str, Any] = {"CALL_ID": event.call_id, "USER_ID": event.user_id, "DURATION": 0,
                                  "STATUS_CODE": failure.status, "FAILED_REASON": failure.reason}
        added = await self.outbox.add(event.call_id, params)
        log.warning("click-to-call %s by user %s to %r: %s; finished with %s (%s)", event.call_id, event.user_id,
                    event.phone_number[:40], failure.reason, failure.status,
                    "already finished" if added == "duplicate" else added)
        return self._count(outcome)

    def _count(self, outcome: str) -> str:
        self.outcomes[outcome] += 1
        return outcome


def _user_failure(user: User | None, user_id: str) -> Failure:
    """Why the click cannot ring this user's phone."""
    if user is None:
        return Failure(NO_PHONE, f"user {user_id} is not in the user directory (users section; not loaded yet?)")
    if not user.active:
        return Failure(USER_INACTIVE, f"user {user_id} is deactivated")
    return Failure(NO_PHONE, f"user {user_id} has no extension (UF_PHONE_INNER, \"Internal number\") in Bitrix24")
