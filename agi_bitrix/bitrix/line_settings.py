"""The `lines:` list: the DIDs the admin names, each a Bitrix24 external line with a CRM source.

    lines:
      - {did: "+7 495 111-22-33", name: "Moscow office", crm_source: CALL}

Each entry's keys are declared once with agi_bitrix.schema; agi_bitrix.config reads the list
(`line_entry` per item) and then `numbered_lines` reads each DID as `match.did` reads its numbers
(phones.default_country) and refuses a number listed twice, with the file's line. `line_for` is
the pure question register (and an outgoing call, by its caller ID) asks: which line is this?
The sync with the portal is agi_bitrix.bitrix.lines.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agi_bitrix import schema
from agi_bitrix.phones import normalize_number
from agi_bitrix.schema import text

# Register's CRM_SOURCE: a source id of the CRM's SOURCE list, as callcard.register.crm_source.
_CRM_SOURCE = re.compile(r"^[A-Za-z0-9_.|-]{1,50}$")
_NAME_CHARS = 100


def _crm_source(value: str) -> str:
    if value and not _CRM_SOURCE.match(value):
        raise ValueError(f"crm_source {value!r} is not a CRM source id like CALL")
    return value


def _name(value: str) -> str:
    """NAME is shown in the portal's lists and reports: one line of printable text."""
    if len(value) > _NAME_CHARS or not value.isprintable():
        raise ValueError(f"name must be one line of printable text, at most {_NAME_CHARS} characters")
    return value.strip()


@dataclass(frozen=True)
class Line:
    """lines[]: a DID the portal knows as an external line."""

    did: str = text("did")  # as written in the file; required
    name: str = text("name", "", check=_name)  # NAME; "" = none sent, and never renamed
    crm_source: str = text("crm_source", "", check=_crm_source)  # "" = callcard.register.crm_source
    number: str = ""  # `did` in international digits (numbered_lines): the line's NUMBER and LINE_NUMBER


_NEEDS = {"did": 'the dialled number, like "+7 495 111-22-33"'}


def line_entry(item: Any) -> Line:
    """One {did: NUMBER, name: TEXT, crm_source: ID}; the number is read once the country is known."""
    keys = schema.keys(Line)
    if not isinstance(item, Mapping):
        raise ValueError(f"expected {{{', '.join(f'{key}: ...' for key in keys)}}}")
    unknown = [str(key) for key in item if key not in keys]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; expected {', '.join(keys)}")
    values = {}
    for name, setting in schema.declared(Line):
        value = item.get(setting.key)
        default = schema.default(Line, name)
        if value is None and default is not dataclasses.MISSING:
            values[name] = default
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
            raise ValueError(f"needs {setting.key}: {_NEEDS.get(name, 'text')}")
        values[name] = setting.check(str(value).strip()) if setting.check else str(value).strip()
    return Line(**values)


def numbered_lines(located: Any, country: str, problem: Callable[[int, str, str], None]) -> tuple[Line, ...]:
    """The `lines:` list as read (`located`: the YAML list, each item with its line numbers), each
    DID in international digits. An entry `line_entry` refuses is left out (the config's reading
    of the list reported it); a DID that is no number, or one listed before, is a
    `problem(line, key, message)` at its `did` key."""
    numbered: list[Line] = []
    first: dict[str, int] = {}
    for index, item in enumerate(located if isinstance(located, list) else []):
        try:
            line = line_entry(item)
        except ValueError:
            continue
        where, key = getattr(item, "lines", {}).get("did", 0), f"lines[{index}].did"
        number = normalize_number(line.did, country)
        if number is None:
            problem(where, key, f"{line.did!r} is not a phone number")
        elif number in first:
            problem(where, key, f"{line.did!r} is the number of lines[{first[number]}] again; list each line once")
        else:
            first[number] = index
        numbered.append(dataclasses.replace(line, number=number or ""))
    return tuple(numbered)


def line_for(lines: Sequence[Line], number: str) -> Line | None:
    """The configured line whose number is `number` (international digits: the DID an incoming
    call came in on, or an outgoing call's caller ID), or None."""
    if not number:
        return None
    return next((line for line in lines if line.number == number), None)


def line_and_source(lines: Sequence[Line], number: str, default_line: str, default_source: str) -> tuple[str, str]:
    """Register's LINE_NUMBER and CRM_SOURCE for a call on `number` (the DID, or an outgoing
    call's caller ID, in international digits): the configured line's number and source, else
    `default_line` (callcard.register.line_number, or the number itself when that is "") and
    `default_source` (callcard.register.crm_source)."""
    line = line_for(lines, number)
    if line is None:
        return default_line or number, default_source
    return line.number, line.crm_source or default_source
