"""Callback requests: a visitor leaves their number in a CRM callback form, and the PBX calls back.

The event (ONEXTERNALCALLBACKSTART, already found authentic by the receiver) becomes a
`CallbackRequest`; `Callback.handle` then, in order: routes it like an incoming call from that
number on that line (service.py's Router: the same lookup and `decide()`), so the client's owner
gets it while at work and the line's queue otherwise (`agent_target`); registers it with
telephony.externalcall.register TYPE=4 (callback) for the owner, or the line's responsible user;
checks the number against click-to-call's dial policy; and then, for up to `callback.attempts`
attempts `callback.interval` seconds apart, asks the PBX (a `Dialer`: AMI's Originate) to ring the
agent's side and, once answered, to send that channel into the callback context with the client's
number as the extension. There (asterisk-samples/extensions.conf, [agi-bitrix-callback]) the agent
hears `callback.announcement`, the client is dialled with the answer stamp, and the channel's hangup
handler reports the attempt (a UserEvent `AgiBitrixCallbackDone` with its DIALSTATUS and stamps),
which reaches the flow over AMI. An attempt whose client talked `callback.min_talk` seconds or more
ends the retries.

The call is finished here, once, through the same outbox as every finish: 200 with the talk time
when the client was reached, otherwise the last attempt's status (status.outgoing_status_code for
the client's leg, clicktocall.AGENT_LEG for the agent's), with a FAILED_REASON that says how many
attempts were made. The form's TEXT is logged with the request (register has no field for it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from agi_bitrix.ami.protocol import Event
from agi_bitrix.bitrix.users import User, answering_number
from agi_bitrix.callback_settings import CallbackSettings
from agi_bitrix.callcard.identity import CALL_ID_PATTERN, responsible_user
from agi_bitrix.callcard.register import ENTITY_TYPES
from agi_bitrix.callcard.status import ANSWERED, outgoing_status_code
from agi_bitrix.callrecord import RoutedCall
from agi_bitrix.clicktocall import (
    PBX_UNREACHABLE,
    USER_BUSY,
    ClickLimits,
    Dialer,
    DialerError,
    FinishQueue,
    OriginateOutcome,
    agent_leg_failure,
)
from agi_bitrix.config import Config
from agi_bitrix.dialpolicy import Destination, dial_destination, dial_policy
from agi_bitrix.phones import normalize_number
from agi_bitrix.routing.engine import CallInfo, Decision

log = logging.getLogger("agi_bitrix.callback")

_NOT_DIGITS = re.compile(r"[^0-9+]")
_LINE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

CALLBACK = 4  # register's TYPE (api-reference/telephony/telephony-external-call-register.md)
DONE_EVENT = "AgiBitrixCallbackDone"  # the sample's UserEvent when an attempt's channel hangs up
AGENT_EVENT = "AgiBitrixCallbackAgent"  # the sample's UserEvent from the queue member who answered
UNKNOWN = "OTHER"  # an attempt whose report never came (AMI lost): no retry, it may have reached the client


@dataclass(frozen=True)
class CallbackRequest:
    """What the flow needs of an authentic ONEXTERNALCALLBACKSTART (api-reference/telephony/events/
    on-external-call-back-start.md in bitrix24/b24restdocs)."""

    phone_number: str  # PHONE_NUMBER as the form gave it
    text: str = ""  # TEXT: what the visitor wrote
    line_number: str = ""  # LINE_NUMBER: the line the form belongs to
    crm_entity_type: str = ""
    crm_entity_id: str = ""
    key: str = ""  # the receiver's digest of the event: the request's EXTERNAL_CALL_ID


@dataclass(frozen=True)
class AgentTarget:
    channel: str  # what Originate rings first
    describe: str  # for the log: "queue sales", "owner's extension 181"


@dataclass(frozen=True)
class Attempt:
    """How one attempt ended: the agent's leg (Originate's outcome), then the client's."""

    agent: OriginateOutcome
    dialstatus: str = ""  # the client leg's DIALSTATUS
    talk: float | None = None  # seconds the client talked; None: the client did not answer
    unknown: bool = False  # the agent answered, but the attempt's report never came
    pbx_error: str = ""  # the PBX could not be asked (the Originate may even have been sent)
    agent_channel: str = ""  # the queue member's channel that answered ("" when no queue rang)


class NumberLookup(Protocol):
    """The user directory (bitrix/users.py): whose extension or mobile a number is."""

    def by_number(self, number: str) -> User | None: ...


class Routes(Protocol):
    async def route(self, call: CallInfo, uniqueid: str = "-") -> RoutedCall: ...


class Registrar(Protocol):
    """callcard/register.py's RegisterService: the same deadline, failures and log lines."""

    async def send_register(self, params: dict[str, Any], uniqueid: str, *, show: bool,
                            crm_create: bool) -> tuple[str, str]: ...


def agent_target(settings: CallbackSettings, decision: Decision | None, line: str) -> AgentTarget:
    """The owner's desk phone when routing sends the client there (the owner at work); else the
    line's queue, the queue routing chose, callback.queue, or routing's fallback queue. A route to
    a mobile counts as not at work: a callback is the company's call, not a personal phone's."""
    if decision is not None and decision.route == "extension" and decision.target.isdigit():
        return AgentTarget(settings.owner_channel.format(extension=decision.target),
                           f"owner's extension {decision.target}")
    queue = dict(settings.line_queues).get(line, "")
    if not queue and decision is not None and decision.route == "queue":
        queue = decision.target
    queue = queue or settings.queue or (decision.fallback_queue if decision is not None else "")
    return AgentTarget(settings.queue_channel.format(queue=queue), f"queue {queue}")


def reached(attempt: Attempt, min_talk: float) -> bool:
    """The client was reached: answered and talked at least `min_talk` seconds."""
    return attempt.talk is not None and attempt.talk >= min_talk


def retry_after(attempt: Attempt, number: int, settings: CallbackSettings) -> float | None:
    """Seconds until attempt `number` + 1, or None when there is none: the client was reached, the
    attempts are used up, or the outcome is unknown (the client may have been talking, or an
    Originate whose answer was lost may still ring: another would ring twice)."""
    if reached(attempt, settings.min_talk) or attempt.unknown or attempt.pbx_error or number >= settings.attempts:
        return None
    return settings.interval


def finish_status(attempt: Attempt, attempts: int) -> tuple[str, int, str]:
    """(STATUS_CODE, DURATION, FAILED_REASON) of the callback after its last attempt."""
    if attempt.unknown:
        return UNKNOWN, 0, "the attempt's outcome was not reported (AMI connection lost?)"
    if attempt.pbx_error:
        return PBX_UNREACHABLE, 0, f"the PBX could not be asked: {attempt.pbx_error}"
    if not attempt.agent.answered:
        failure = agent_leg_failure(attempt.agent)
        return failure.status, 0, f"{failure.reason} (after {attempts} attempt(s))"
    if attempt.talk is not None:
        return ANSWERED, round(attempt.talk), ""
    status = outgoing_status_code(False, attempt.dialstatus)
    return status, 0, f"the client was not reached ({attempt.dialstatus or 'no dial'}) after {attempts} attempt(s)"


def attempt_of(event: Event, agent: OriginateOutcome) -> Attempt:
    """An attempt from its AgiBitrixCallbackDone report: talk time is hangup minus the answer stamp."""
    dialstatus = event.get("DialStatus").strip().upper()
    try:
        answered_at, hangup_at = float(event.get("AnsweredAt")), float(event.get("HangupAt"))
    except ValueError:
        return Attempt(agent, dialstatus)
    return Attempt(agent, dialstatus, max(0.0, hangup_at - answered_at))


class Callback:
    def __init__(self, config: Config, *, dialer: Dialer, routes: Routes, registrar: Registrar, outbox: FinishQueue,
                 users: NumberLookup | None = None, sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        """`users`: who the queue member that talked to the client is, for the finish (None: the
        registered user is named)."""
        self.config = config
        self.settings: CallbackSettings = config.callback
        self.policy = dial_policy(config.clicktocall, config.policy.default_country)
        # Its neighbours, as Protocols: the PBX, the routing, register, the outbox, the directory.
        self.dialer, self.routes, self.registrar, self.outbox, self.users = dialer, routes, registrar, outbox, users
        self.sleep = sleep
        # One callback per number at a time (a form sent twice), within click-to-call's global rate.
        self.limits = ClickLimits(config.clicktocall.rate_per_second, config.clicktocall.rate_burst)
        self.outcomes: Counter[str] = Counter()  # how requests ended, for /healthz
        self._reports: dict[str, asyncio.Future[Event]] = {}
        self._agents: dict[str, str] = {}  # attempt token -> the member's channel that answered

    def on_ami_event(self, event: Event) -> None:
        """The AMI client's listener: an attempt's report wakes the attempt waiting for it; the
        member who answered (reported first) is kept for it."""
        if event.name != "UserEvent" or event.get("UserEvent") not in (DONE_EVENT, AGENT_EVENT):
            return
        token = event.get("Attempt")
        waiting = self._reports.get(token)
        if waiting is None or waiting.done():
            return
        if event.get("UserEvent") == AGENT_EVENT:
            self._agents[token] = event.get("Agent")[:200]
        else:
            waiting.set_result(event)

    async def handle(self, request: CallbackRequest) -> str:
        """Call the client back; returns how it ended (a token for logs and /healthz)."""
        default_country = self.config.policy.default_country
        # What the form gave, when it is no number: only its digits and "+" reach the logs and the portal.
        phone = (normalize_number(request.phone_number, default_country)
                 or _NOT_DIGITS.sub("", request.phone_number)[:32])
        line = request.line_number.strip().removeprefix("+")
        line = line if _LINE.fullmatch(line) else ""  # a line's number or code, nothing that could forge a log line
        log.info("callback request for %s on line %s: %r", phone, line or "-", request.text[:500])
        refused = self.limits.admit(phone)
        if refused is not None:
            log.warning("callback request for %s dropped: %s", phone,
                        "this number is being called back already" if refused.status == USER_BUSY else refused.reason)
            return self._count("already_calling_back" if refused.status == USER_BUSY else "rate")
        try:
            return await self._handle(request, phone, line)
        finally:
            self.limits.release(phone)

    async def _handle(self, request: CallbackRequest, phone: str, line: str) -> str:
        decision = await self._decision(phone, line)
        user_id = self._user(decision, line)
        if not user_id:
            log.error("callback request for %s: no owner, no callcard.register.responsible for line %s and no"
                      " default_user: not registered, not called back", phone, line or "-")
            return self._count("no_user")
        call_id, error = await self.registrar.send_register(
            self._register_params(request, phone, line, user_id), f"callback-{phone}",
            show=self.config.callcard.register.show, crm_create=self.config.callcard.register.crm_create)
        if not call_id:
            log.error("callback request for %s: not registered (%s); not called back", phone, error)
            return self._count("not_registered")
        destination = dial_destination(request.phone_number, self.policy)
        if not isinstance(destination, Destination):
            refusal = f"refused by the dial policy: {destination.detail}"
            await self._finish(call_id, user_id, (destination.status, 0, refusal))
            return self._count(f"refused_{destination.reason}")
        target = agent_target(self.settings, decision, line)
        return await self._call_back(call_id, user_id, target, destination.number, line)

    async def _call_back(self, call_id: str, user_id: str, target: AgentTarget, number: str, line: str) -> str:
        number_of_attempts, attempt = 0, Attempt(OriginateOutcome(0))
        for number_of_attempts in range(1, self.settings.attempts + 1):
            log.info("callback %s: attempt %d of %d: ringing %s for %s", call_id, number_of_attempts,
                     self.settings.attempts, target.describe, number)
            try:
                attempt = await self._attempt(call_id, target, number, line)
            except DialerError as error:
                attempt = Attempt(OriginateOutcome(0), pbx_error=str(error))
            except Exception as error:  # a bug (ours or the AMI layer's): the callback is still finished
                log.error("callback %s: the attempt failed unexpectedly", call_id, exc_info=error)
                attempt = Attempt(OriginateOutcome(0), pbx_error=f"internal error ({type(error).__name__})")
            pause = retry_after(attempt, number_of_attempts, self.settings)
            if pause is None:
                break
            await self.sleep(pause)
        status = finish_status(attempt, number_of_attempts)
        await self._finish(call_id, self._talked_with(attempt) or user_id, status)
        return self._count("reached" if status[0] == ANSWERED else "not_reached")

    async def _attempt(self, call_id: str, target: AgentTarget, number: str, line: str) -> Attempt:
        token = secrets.token_hex(8)
        report: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._reports[token] = report
        prefix = self.config.variable_prefix
        # The attempt's token reaches the queue member's channel too (inherited: "__").
        variables = {f"{prefix}CALL_ID": call_id, f"__{prefix}CALLBACK_ATTEMPT": token,
                     f"{prefix}CALLBACK_SOUND": self.settings.announcement, f"{prefix}LINE_NUMBER": line}
        try:
            agent = await self.dialer.originate(target.channel, self.settings.context, number, variables, number,
                                                self.settings.ring)
            if not agent.answered:
                return Attempt(agent)
            try:
                event = await asyncio.wait_for(report, self.settings.max_call)
            except TimeoutError:
                log.error("callback %s: no report of the attempt within callback.max_call (%g s)", call_id,
                          self.settings.max_call)
                return Attempt(agent, unknown=True)
            return dataclasses.replace(attempt_of(event, agent), agent_channel=self._agents.get(token, ""))
        finally:
            self._reports.pop(token, None)
            self._agents.pop(token, None)

    def _talked_with(self, attempt: Attempt) -> str:
        """The user whose phone, a queue member, talked to the client; "" when unknown."""
        if attempt.talk is None or not attempt.agent_channel or self.users is None:
            return ""
        user = self.users.by_number(answering_number(attempt.agent_channel))
        return user.user_id if user is not None else ""

    async def _decision(self, phone: str, line: str) -> Decision | None:
        try:
            routed = await self.routes.route(CallInfo(phone, did=line), uniqueid=f"callback-{phone}")
        except Exception:  # a bug: the request still reaches the line's queue
            log.exception("callback request for %s: routing failed; the line's queue takes it", phone)
            return None
        return routed.decision

    def _user(self, decision: Decision | None, line: str) -> str:
        """The callback's user in Bitrix24: the client's owner, else the line's responsible user."""
        entity = decision.entity if decision is not None else None
        if entity is not None and entity.owner is not None:
            return entity.owner.user_id
        return responsible_user(self.config.callcard.register, line)

    def _register_params(self, request: CallbackRequest, phone: str, line: str, user_id: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "USER_ID": user_id, "PHONE_NUMBER": phone, "TYPE": CALLBACK,
            "CALL_START_DATE": datetime.now(UTC).isoformat(timespec="seconds"),
            "CRM_CREATE": self.config.callcard.register.crm_create, "SHOW": self.config.callcard.register.show,
            # Unique per request, or the portal merges it into an earlier call within 30 minutes.
            "EXTERNAL_CALL_ID": _external_call_id(request.key),
        }
        if line:
            params["LINE_NUMBER"] = line
        entity_type = request.crm_entity_type.strip().upper()
        if entity_type in ENTITY_TYPES and request.crm_entity_id.isascii() and request.crm_entity_id.isdigit():
            params["CRM_ENTITY_TYPE"], params["CRM_ENTITY_ID"] = entity_type, request.crm_entity_id
        return params

    async def _finish(self, call_id: str, user_id: str, status: tuple[str, int, str]) -> None:
        code, duration, reason = status
        params: dict[str, Any] = {"CALL_ID": call_id, "USER_ID": user_id, "DURATION": duration, "STATUS_CODE": code}
        if reason:
            params["FAILED_REASON"] = reason
        added = await self.outbox.add(call_id, params)
        log.info("callback %s: finished with %s, %d s%s (%s)", call_id, code, duration,
                 f": {reason}" if reason else "", added)

    def _count(self, outcome: str) -> str:
        self.outcomes[outcome] += 1
        return outcome


def _external_call_id(key: str) -> str:
    value = f"callback-{key}"[:128]
    return value if CALL_ID_PATTERN.match(value) else f"callback-{secrets.token_hex(16)}"


__all__ = ["CALLBACK", "DONE_EVENT", "AgentTarget", "Attempt", "Callback", "CallbackRequest",
           "agent_target", "attempt_of", "finish_status", "reached", "retry_after"]
