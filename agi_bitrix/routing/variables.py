"""The channel variables a decision becomes.

Every value is reduced to the characters its meaning allows before it leaves here: digits
for numbers and ids, capitals for portal enums, a short token for reasons. A CRM field that
does not fit becomes empty, so whatever a CRM user typed cannot reach the dialplan, whose
applications (Dial, Queue) split their own arguments on `&`, `,`, `/` and more.
"""

from __future__ import annotations

import re

from agi_bitrix.routing.engine import Decision

_DIGITS = re.compile(r"^[0-9]{1,32}$")
_ENUM = re.compile(r"^[A-Z_]{1,32}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

# Names without the prefix, in the order they are set.
NAMES = (
    "STATUS",
    "ROUTE",
    "TARGET",
    "QUEUE",
    "EXTENSION",
    "MOBILE",
    "WORK_PHONE",
    "PERSONAL_PHONE",
    "USER_ID",
    "ENTITY_TYPE",
    "ENTITY_ID",
    "TIMEMAN",
    "PHONE",
    "RULE",
    "ERROR",
    "CACHE",
)


def _only(pattern: re.Pattern[str], value: str) -> str:
    return value if pattern.match(value) else ""


def channel_variables(decision: Decision, prefix: str = "B24_") -> dict[str, str]:
    entity = decision.entity
    owner = entity.owner if entity else None
    phones = decision.owner_phones
    values = {
        "STATUS": decision.status,
        "ROUTE": decision.route,
        "TARGET": _only(_TOKEN, decision.target),
        "QUEUE": _only(_TOKEN, decision.fallback_queue),
        "EXTENSION": _only(_DIGITS, phones.extension),
        "MOBILE": _only(_DIGITS, phones.mobile),
        "WORK_PHONE": _only(_DIGITS, phones.work_phone),
        "PERSONAL_PHONE": _only(_DIGITS, phones.personal_phone),
        "USER_ID": _only(_DIGITS, owner.user_id) if owner else "",
        "ENTITY_TYPE": _only(_ENUM, entity.entity_type) if entity else "",
        "ENTITY_ID": _only(_DIGITS, entity.entity_id) if entity else "",
        "TIMEMAN": _only(_ENUM, owner.timeman_status) if owner else "",
        "PHONE": _only(_DIGITS, decision.phone),
        "RULE": _only(_TOKEN, decision.rule),
        "ERROR": _only(_TOKEN, decision.error) or ("portal_error" if decision.error else ""),
        "CACHE": decision.cache,
    }
    return {prefix + name: values[name] for name in NAMES}
