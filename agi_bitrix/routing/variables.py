"""The channel variables a decision becomes.

Every value is reduced to the characters its meaning allows before it leaves here: digits
for numbers and ids, capitals for portal enums, a short token for reasons. A CRM field that
does not fit becomes empty, so whatever a CRM user typed cannot reach the dialplan, whose
applications (Dial, Queue) split their own arguments on `&`, `,`, `/` and more.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from agi_bitrix.routing.engine import Decision

_DIGITS = re.compile(r"^[0-9]{1,32}$")
_ENUM = re.compile(r"^[A-Z_]{1,32}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# The client's name goes onto phone displays (CALLERID(name)): letters, digits, spaces and this
# punctuation only. No quotes, commas, semicolons, backslashes, `$ { } [ ] ^ |` or control
# characters, which mean something to the dialplan, to SIP's display-name or to a phone's menu.
_NAME_PUNCTUATION = frozenset(" .-&()/+#№!?")
# Characters of a name shown on a phone, counting a letter with its combining marks as one.
NAME_LENGTH = 40
# A name is read this far at most: a 10 KB "name" costs no more than a long real one.
_NAME_READ = 1000

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
    "NAME",
)


def _only(pattern: re.Pattern[str], value: str) -> str:
    return value if pattern.match(value) else ""


def display_name(name: str) -> str:
    """The CRM object's name as a phone may show it: any run of whitespace becomes one space,
    then only letters (with their combining marks), digits and _NAME_PUNCTUATION are kept, cut
    to NAME_LENGTH letters without splitting a letter from its marks. "" when nothing is left."""
    return _display_name(name[:_NAME_READ])


@functools.lru_cache(maxsize=4096)  # the same clients call again and again; the function is pure
def _display_name(name: str) -> str:
    kept: list[str] = []
    letters = 0
    after_kept = False  # whether the character before was kept (a mark goes with it)
    for char in " ".join(name.split()):
        category = unicodedata.category(char)
        if category[0] == "M":
            if after_kept and kept[-1] != " ":
                kept.append(char)
            continue
        after_kept = (category[0] == "L" or category == "Nd" or char in _NAME_PUNCTUATION) and letters < NAME_LENGTH
        if after_kept:
            kept.append(char)
            letters += 1
    # Dropped characters can leave spaces side by side.
    return " ".join("".join(kept).split())


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
        "NAME": display_name(entity.name) if entity else "",
    }
    return {prefix + name: values[name] for name in NAMES}
