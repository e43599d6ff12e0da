"""Bitrix24's click-to-call events, read and judged before anything acts on them (no IO here).

Two events start a call from the portal (bitrix24/b24restdocs, api-reference/telephony/events/):
ONEXTERNALCALLSTART (a user clicks a number in the CRM; on-external-call-start.md) and
ONEXTERNALCALLBACKSTART (a visitor fills a CRM callback form; on-external-call-back-start.md).
They arrive either as the portal's POST to a handler (form-encoded `event`, `event_handler_id`,
`data[...]`, `ts`, `auth[...]`: api-reference/events/index.md) or as records of the offline
queue (`EVENT_NAME`, `EVENT_DATA`, `TIMESTAMP_X`: event-offline-get.md). Either way the result
is one frozen `ExternalCallStart` or `CallbackStart`, or an `EventRefused` whose class says why.

A forged event must never make the PBX dial (toll fraud), so what comes over HTTP is acted on
only with the application_token stored at installation (compared in constant time; the docs'
"main way to make sure that the request came from Bitrix24", safe-event-handlers.md), our
portal's member_id and domain; offline records come in the answer to our own authenticated
request to the configured portal, which is their proof. Then the fields must have their shape,
the event must be recent (a captured POST replayed later is refused by its `ts`), and seen for
the first time (`seen`): the dedupe key is the portal's CALL_ID, or for a callback, which has
none, a digest of the whole event.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

from agi_bitrix.bitrix.refusals import REFUSAL_LOG_INTERVAL, QuietLog
from agi_bitrix.phones import normalize_number

log = logging.getLogger("agi_bitrix.events")

EXTERNAL_CALL_START = "ONEXTERNALCALLSTART"
EXTERNAL_CALLBACK_START = "ONEXTERNALCALLBACKSTART"
EVENT_NAMES = (EXTERNAL_CALL_START, EXTERNAL_CALLBACK_START)
HANDLER, OFFLINE = "handler", "offline"  # how an event came: the event's `source`

# The portal's CALL_ID ("externalCall.<hex>.<unix time>"), in the same shape the call card's finish
# accepts (callcard/identity.py), so the flow can put it on the channel and finish it.
_CALL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ID = re.compile(r"[0-9]{1,20}")  # USER_ID, CRM_ENTITY_ID, CALL_LIST_ID: integers sent as text
_WORD = re.compile(r"[A-Za-z0-9_]{0,64}")  # CRM_ENTITY_TYPE (CONTACT, LEAD...), VOICE
_TEXT_LIMIT = 1000  # a callback's TEXT: read to the agent, never dialled
_LINE_LIMIT = 64
# Clocks differ: an event stamped this far in our future is still taken.
CLOCK_SKEW = 60.0


@dataclass(frozen=True)
class ExternalCallStart:
    """ONEXTERNALCALLSTART: dial `user_id`'s phone, then `phone`; finish the portal's `call_id`."""

    call_id: str
    user_id: str
    phone: str  # international digits (agi_bitrix.phones.normalize_number)
    line_number: str
    crm_entity_type: str
    crm_entity_id: str
    call_list_id: str
    is_mobile: bool
    sent_at: float  # unix time: the POST's `ts`, or the offline record's TIMESTAMP_X
    source: str  # HANDLER or OFFLINE

    @property
    def key(self) -> str:
        return f"call:{self.call_id}"


@dataclass(frozen=True)
class CallbackStart:
    """ONEXTERNALCALLBACKSTART: call `phone` back (register it with TYPE=4, the docs say)."""

    phone: str
    text: str
    voice: str
    line_number: str
    crm_entity_type: str
    crm_entity_id: str
    sent_at: float
    source: str
    key: str  # the event has no id of its own: a digest of what it says and when


Event = ExternalCallStart | CallbackStart
EventHandler = Callable[[Event], Awaitable[None]]


@dataclass(frozen=True)
class PortalIdentity:
    """What a genuine event's `auth` carries: the application_token the install event brought
    (kept in the token file), the portal's member_id and its domain (host[:port], lower case)."""

    application_token: str
    member_id: str
    domain: str


class EventRefused(Exception):
    """An event not acted on; `reason` is the key it is counted and logged under."""

    reason: ClassVar[str] = "refused"


class UnknownEvent(EventRefused):
    """An event name this server does not act on (the portal sends what the application bound)."""

    reason = "unknown_event"


class MalformedEvent(EventRefused):
    """Not of the documented shape: a field missing, repeated or not text, a time or number unreadable."""

    reason = "malformed"


class NotAuthentic(EventRefused):
    """Not shown to come from our portal; the subclasses say how."""

    reason = "not_authentic"


class NoTokenStored(NotAuthentic):
    """Nothing to check against: the install event's application_token was never stored, so an
    event cannot be told from a forged one."""

    reason = "no_application_token"


class WrongToken(NotAuthentic):
    reason = "wrong_token"  # auth[application_token] missing, or not the one the install event brought


class WrongPortal(NotAuthentic):
    reason = "wrong_portal"  # auth[member_id] or auth[domain] is not the configured portal's


class StaleEvent(EventRefused):
    """Sent longer ago than events.replay_window, or stamped in the future beyond CLOCK_SKEW: a
    replay, or a queue that waited too long for the call to still be wanted."""

    reason = "stale"


class DuplicateEvent(EventRefused):
    reason = "duplicate"  # its key was taken already (by this server, or another one through Redis)


class TooLarge(EventRefused):
    reason = "too_large"  # a body past the receiver's limit, refused before it is read


def event_name(form: Mapping[str, str]) -> str:
    name = form.get("event", "").upper()
    if name not in EVENT_NAMES:
        raise UnknownEvent(f"event {name[:40]!r} is not one this server acts on")
    return name


def check_authentic(form: Mapping[str, str], identity: PortalIdentity) -> None:
    """The POST's `auth[...]` against our application and portal (every field is compared, so
    the time taken says nothing about which one differed)."""
    if not identity.application_token:
        raise NoTokenStored("no application_token is stored (the application was not installed through the"
                            " install callback), so no event can be told from a forgery")
    given = form.get("auth[application_token]", "")
    token_ok = hmac.compare_digest(given.encode(), identity.application_token.encode())
    member_ok = hmac.compare_digest(form.get("auth[member_id]", "").encode(), identity.member_id.encode())
    domain_ok = form.get("auth[domain]", "").lower() == identity.domain
    if not token_ok:
        raise WrongToken(f"application_token {'does not match' if given else 'is missing'}")
    if not (member_ok and domain_ok):
        raise WrongPortal("member_id or domain is not our portal's")


def data_fields(form: Mapping[str, str]) -> dict[str, str]:
    """`data[KEY]` fields of a POST as {KEY: value}."""
    return {key[5:-1]: value for key, value in form.items() if key.startswith("data[") and key.endswith("]")}


def read_event(name: str, data: Mapping[str, Any], sent_at: float, source: str, country: str) -> Event:
    """The event's data in its documented shape, or MalformedEvent."""
    if name == EXTERNAL_CALL_START:
        return ExternalCallStart(
            call_id=_field(data, "CALL_ID", _CALL_ID), user_id=_field(data, "USER_ID", _ID),
            phone=_phone(data, country), line_number=_line(data),
            crm_entity_type=_field(data, "CRM_ENTITY_TYPE", _WORD, optional=True),
            crm_entity_id=_field(data, "CRM_ENTITY_ID", _ID, optional=True),
            call_list_id=_field(data, "CALL_LIST_ID", _ID, optional=True),
            is_mobile=_field(data, "IS_MOBILE", re.compile("[01]"), optional=True) == "1",
            sent_at=sent_at, source=source)
    text = _text(data, "TEXT", _TEXT_LIMIT)
    phone, line = _phone(data, country), _line(data)
    crm_type = _field(data, "CRM_ENTITY_TYPE", _WORD, optional=True)
    crm_id = _field(data, "CRM_ENTITY_ID", _ID, optional=True)
    digest = hashlib.sha256("\n".join((str(int(sent_at)), phone, line, crm_type, crm_id, text)).encode())
    return CallbackStart(phone=phone, text=text, voice=_field(data, "VOICE", _WORD, optional=True),
                         line_number=line, crm_entity_type=crm_type, crm_entity_id=crm_id, sent_at=sent_at,
                         source=source, key=f"callback:{digest.hexdigest()[:32]}")


def post_time(form: Mapping[str, str]) -> float:
    """The POST's `ts`: unix seconds as digits."""
    stamp = form.get("ts", "")
    if not _ID.fullmatch(stamp):
        raise MalformedEvent("ts is not a unix time")
    return float(stamp)


def record_time(stamp: Any) -> float:
    """An offline record's TIMESTAMP_X (ISO 8601 with its offset, as event-offline-get.md shows)."""
    try:
        moment = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise MalformedEvent("TIMESTAMP_X is not an ISO 8601 time with an offset")
    return moment.timestamp()


def check_fresh(sent_at: float, now: float, window: float) -> None:
    """Refuse an event sent more than `window` seconds ago (a replay, or a click nobody waits for
    any more) or from further in the future than clocks differ."""
    age = now - sent_at
    if age > window:
        raise StaleEvent(f"sent {age:.0f} s ago, more than events.replay_window ({window:g} s)")
    if age < -CLOCK_SKEW:
        raise StaleEvent(f"stamped {-age:.0f} s in the future")


def _field(data: Mapping[str, Any], key: str, shape: re.Pattern[str], optional: bool = False) -> str:
    value = data.get(key, "")
    if isinstance(value, int) and not isinstance(value, bool):  # JSON from the offline queue
        value = str(value)
    if not isinstance(value, str):
        raise MalformedEvent(f"data[{key}] is not text")
    if value == "" and optional:
        return ""
    if not shape.fullmatch(value):
        raise MalformedEvent(f"data[{key}] is {'missing' if not value else 'not of its documented shape'}")
    return value


def _text(data: Mapping[str, Any], key: str, limit: int) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise MalformedEvent(f"data[{key}] is not text of at most {limit} characters")
    return value


def _line(data: Mapping[str, Any]) -> str:
    line = _text(data, "LINE_NUMBER", _LINE_LIMIT)
    if any(not character.isprintable() for character in line):
        raise MalformedEvent("data[LINE_NUMBER] holds control characters")
    return line


def _phone(data: Mapping[str, Any], country: str) -> str:
    """PHONE_NUMBER_INTERNATIONAL when the event has it (the portal's own reading, which needs no
    country of ours), else PHONE_NUMBER; either through agi_bitrix.phones."""
    raw = data.get("PHONE_NUMBER_INTERNATIONAL") or data.get("PHONE_NUMBER")
    number = normalize_number(raw, country) if isinstance(raw, str) else None
    if number is None:
        raise MalformedEvent("data[PHONE_NUMBER] (or _INTERNATIONAL) is not a phone number")
    return number


class EventObserver(Protocol):
    """Where refusals are reported for metrics (agi_bitrix.monitoring.Metrics implements it)."""

    def event_refused(self, reason: str) -> None:
        """One event refused; `reason` is its EventRefused class's `reason`."""


class RefusalCounter:
    """Refusals counted by reason; each reason logged at once, then at most once per `interval`
    with how many more came: a flood of forged POSTs is a line a minute, not one per POST."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic,
                 observer: EventObserver | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self._observer = observer
        self._lines = QuietLog(log, "refused for this reason", interval, clock)

    def refused(self, error: EventRefused, where: str) -> None:
        self.counts[error.reason] += 1
        if self._observer is not None:
            self._observer.event_refused(error.reason)
        self._lines.warning("Bitrix24 event from %s refused (%s): %s", where, error.reason, error, kind=error.reason)
