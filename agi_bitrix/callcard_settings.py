"""The call card's settings (the `callcard:` section), declared once with agi_bitrix.schema.

Read by agi_bitrix.config like the portal's sections are from agi_bitrix.bitrix.settings; the
call-card scripts (agi_bitrix/callcard/) use the dataclasses. Nothing here reads a file.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agi_bitrix.checking import LocatedDict, LocatedList, quoted
from agi_bitrix.redis_link import parse_redis_url
from agi_bitrix.schema import flag, items, not_shorter_than, number, section, text

RECORD_URL_FIELDS = ("call_id", "uniqueid", "recording")


_CRM_SOURCE = re.compile(r"^[A-Za-z0-9_.|-]{1,50}$")


_LINE_NUMBER = re.compile(r"^[A-Za-z0-9_.+-]{1,50}$")


_TRUNK = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


def _user_id(value: str) -> str:
    if value and not (value.isascii() and value.isdigit()):  # isdigit() alone passes fullwidth digits
        raise ValueError(f"{quoted(value)} is not a Bitrix24 user id (a number)")
    return value


@dataclass(frozen=True)
class Responsible:
    """callcard.register.responsible[]: who gets the calls to `did` that have no (active) owner."""

    did: str  # as written in the file
    user: str
    number: str = ""  # `did` in international digits, read with phones.default_country (parse_config)


_RESPONSIBLE_KEYS = ("did", "user")


def _responsible(item: Any) -> Responsible:
    """One {did: NUMBER, user: ID}; the number is normalised once the country is known."""
    if not isinstance(item, LocatedDict):
        raise ValueError(f"expected {{did: NUMBER, user: ID}}, got {quoted(item)}")
    unknown = [key for key in item if key not in _RESPONSIBLE_KEYS]
    if unknown:
        raise ValueError(f"unknown key {quoted(unknown[0])}; expected did and user")
    did, user = item.get("did"), item.get("user")
    if isinstance(did, (bool, LocatedDict, LocatedList)) or did is None or str(did).strip() == "":
        raise ValueError("needs did: the dialled number, like \"+7 495 111-22-33\"")
    if isinstance(user, bool) or not isinstance(user, (int, str)) or not _user_id(str(user).strip()):
        raise ValueError("needs user: a Bitrix24 user id (a number)")
    return Responsible(did=str(did).strip(), user=str(user).strip())


def _crm_source(value: str) -> str:
    if value and not _CRM_SOURCE.match(value):
        raise ValueError(f"{quoted(value)} is not a CRM source id like CALL")
    return value


def _line_number(value: str) -> str:
    if value and not _LINE_NUMBER.match(value):
        raise ValueError(f"{quoted(value)} must be digits, letters, '+', '_', '.', '-'")
    return value


def is_url(value: str) -> bool:
    """A callcard.outbox value that names a Redis server (any URL: one that is not Redis's is
    refused as a URL, never quoted, since it may hold a password) rather than a SQLite file."""
    return "://" in value


@dataclass(frozen=True)
class OutgoingLine:  # callcard.outgoing.lines[]: the LINE_NUMBER of outgoing calls through one trunk
    trunk: str  # the outgoing script's line argument: FreePBX's trunk number, or a name of the dialplan's own
    line: str


def _outgoing_line(item: Any) -> OutgoingLine:
    """One {trunk: NAME, line: NUMBER}; both plain words, as the dialplan and the portal take them."""
    if not isinstance(item, LocatedDict) or sorted(item) != ["line", "trunk"]:
        raise ValueError(f"expected {{trunk: NAME, line: NUMBER}}, got {quoted(item)}")
    trunk, line = (str(item[key]).strip() if isinstance(item[key], (int, str)) and not isinstance(item[key], bool)
                   else "" for key in ("trunk", "line"))
    if not _TRUNK.match(trunk):
        raise ValueError("trunk: the trunk's name or number as the dialplan passes it (letters, digits, _ . + -)")
    if not _LINE_NUMBER.match(line):
        raise ValueError(f"line: {quoted(line)} is not a LINE_NUMBER (digits, letters, '+', '_', '.', '-')")
    return OutgoingLine(trunk=trunk, line=line)


# `callcard.outbox: redis`: the outbox in the Redis of the `redis` section (its URL, which
# AGI_BITRIX_REDIS_URL overrides, and its key prefix), shared with the other servers' state.
SHARED_REDIS_OUTBOX = "redis"


def _outbox(value: str) -> str:
    if value == SHARED_REDIS_OUTBOX:
        return value
    if is_url(value):
        parse_redis_url(value)  # as the outbox will read it; the message never quotes the URL
        return value
    if not value.startswith("/"):
        raise ValueError(f"{quoted(value)} must be an absolute path to the SQLite file, a redis:// URL,"
                         " or redis (the redis section's)")
    return value


def _record_url(template: str) -> str:
    """A RECORD_URL template: an http(s) URL whose {fields} are RECORD_URL_FIELDS."""
    if not template:
        return template
    parts = urlsplit(template)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{quoted(template)} must be an http(s) URL")
    _check_template_fields(template)
    return template


def _check_template_fields(template: str) -> None:
    """ValueError unless `template`'s {fields} parse and are all RECORD_URL_FIELDS."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"bad template {quoted(template)}: {error} (write a literal brace as {{{{ or }}}})") from None
    unknown = [name for name in names if name not in RECORD_URL_FIELDS]
    if unknown:
        fields = ", ".join("{" + f + "}" for f in RECORD_URL_FIELDS)
        raise ValueError(f"unknown field {{{unknown[0]}}}; expected {fields}")


def _recording_file(template: str, record_url: str) -> str:
    """The path template of the recordings attachRecord uploads: absolute, its {fields} those of
    RECORD_URL_FIELDS, naming a .wav or .mp3 (the portal takes no other), and not with record_url."""
    if not template:
        return template
    if record_url:
        raise ValueError("set either finish.record_url (a URL in finish) or finish.recording.file (attachRecord"
                         " uploads the file), not both: the portal keeps one recording per call")
    if not template.startswith("/"):
        raise ValueError(f"{template!r} must be an absolute path like /var/spool/asterisk/monitor/{{uniqueid}}.wav")
    _check_template_fields(template)
    if not template.endswith("}") and not template.lower().endswith((".wav", ".mp3")):
        raise ValueError(f"{template!r} must name a .wav or .mp3 file: the portal takes no other recordings")
    return template


@dataclass(frozen=True)
class RegisterSettings:
    # Seconds register may take, request slot included; past it the call goes on without a card.
    deadline: float = number("deadline", 2.0, 0, 30)
    # Bitrix24 user id for calls without an (active) owner; "" = skip them.
    default_user: str = text("default_user", "", check=_user_id)
    # Per DID, who takes those calls instead of default_user (and so the missed ones).
    responsible: tuple[Responsible, ...] = items("responsible", (), check=_responsible)
    crm_create: bool = flag("crm_create", False)
    crm_source: str = text("crm_source", "", check=_crm_source)
    show: bool = flag("show", True)
    line_number: str = text("line_number", "", check=_line_number)  # "" = the dialled number (DID)


@dataclass(frozen=True)
class CardSettings:
    # Seconds a card's show or hide (telephony.externalCall.show/.hide) may take; it runs in the
    # background, so this bounds how long it may hold a request slot, never the ring.
    deadline: float = number("deadline", 2.0, 0, 30)


FOLLOW_UP_KINDS = ("off", "todo", "notify")


def _follow_up_kind(value: str) -> str:
    if value not in FOLLOW_UP_KINDS:
        raise ValueError(f"{quoted(value)} is not one of {', '.join(FOLLOW_UP_KINDS)}")
    return value


@dataclass(frozen=True)
class FollowUpSettings:
    # What a missed call from a client the CRM knows leaves for the person it was finished to:
    # off; todo (crm.activity.todo.add on the client's CRM object); notify (im.notify.personal.add).
    kind: str = text("kind", "off", check=_follow_up_kind)
    # Seconds from the hangup to the to-do's deadline.
    deadline: float = number("deadline", 3600.0, 0, 30 * 86400)


@dataclass(frozen=True)
class OutgoingSettings:  # the `outgoing` script (callcard/outgoing.py): employees' desk-phone calls
    # Per trunk, its LINE_NUMBER; the first entry of a trunk wins.
    lines: tuple[OutgoingLine, ...] = items("lines", (), check=_outgoing_line)
    line_number: str = text("line_number", "", check=_line_number)  # trunks not listed; "" = no LINE_NUMBER
    show: bool = flag("show", True)
    crm_create: bool = flag("crm_create", False)

    def line_of(self, trunk: str) -> str:
        return next((entry.line for entry in self.lines if entry.trunk == trunk), self.line_number)


@dataclass(frozen=True)
class FinishSettings:
    # Template with {call_id}, {uniqueid}, {recording}; "" = no RECORD_URL.
    record_url: str = text("record_url", "", check=_record_url)
    retry_first: float = number("retry.first", 5.0, 0, 3600, restart=True)
    retry_max: float = number("retry.max", 600.0, 0, 86400, check=not_shorter_than("retry.first"),
                              needs=("retry_first",), restart=True)
    give_up_after: float = number("retry.give_up_after", 86400.0, 0, 30 * 86400, restart=True)
    # attachRecord with the file MixMonitor wrote: a path template with {call_id}, {uniqueid},
    # {recording}; "" = no upload (callcard/recording.py).
    recording_file: str = text("recording.file", "", check=_recording_file, needs=("record_url",))
    # The largest recording uploaded; the portal documents no limit, base64 adds a third on the wire.
    recording_max_size: float = number("recording.max_size", 20.0, 0, 200, unit="MiB")
    # Unchanged this long (and the call hung up) before the file counts as closed by MixMonitor.
    recording_settle: float = number("recording.settle", 5.0, 0, 600)
    # After the hangup, how long the file may take to appear and settle before the upload fails.
    recording_wait: float = number("recording.wait", 600.0, 0, 86400)
    # The upload request's own timeout (a lookup's deadline is far too short for megabytes).
    recording_timeout: float = number("recording.timeout", 120.0, 0, 3600)


@dataclass(frozen=True)
class CallCardSettings:
    enabled: bool = True  # a config without a callcard section has it off (Config.callcard)
    # The SQLite file; or a redis:// URL for one outbox several servers share (callcard/redis_outbox.py).
    outbox: str = text("outbox", "/var/lib/agi-bitrix/outbox.sqlite3", check=_outbox, restart=True)
    # With the outbox in Redis: seconds a finish held by a server that stopped waits before another takes it.
    outbox_claim_after: float = number("outbox_claim_after", 60.0, 1, 3600, restart=True)
    register: RegisterSettings = section("register", RegisterSettings, absent=RegisterSettings())
    cards: CardSettings = section("cards", CardSettings, absent=CardSettings())
    finish: FinishSettings = section("finish", FinishSettings, absent=FinishSettings())
    follow_up: FollowUpSettings = section("follow_up", FollowUpSettings, absent=FollowUpSettings())
    outgoing: OutgoingSettings = section("outgoing", OutgoingSettings, absent=OutgoingSettings())
