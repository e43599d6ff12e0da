"""The application's external lines, as the emulated portal keeps them (telephony.externalLine.*).

Follows Bitrix24's REST docs (bitrix-tools/b24-rest-docs, api-reference/telephony/):

- telephony-external-line-add.md: NUMBER (required), NAME, CRM_AUTO_CREATE (Y|N, default Y);
  answers {"ID": <integer>}; ERROR_CORE "NUMBER should not be empty", "Line already exists".
- telephony-external-line-get.md: no parameters; answers the application's lines as a list of
  {NUMBER, NAME, CRM_AUTO_CREATE}.
- telephony-external-line-update.md: NUMBER (required), NAME and/or CRM_AUTO_CREATE; answers
  {"ID": "<string>"}; ERROR_CORE "NUMBER should not be empty", "There are no fields to update",
  "Could not find line with number {NUMBER}".
- All three work only in an application's context: through a webhook, 403 WRONG_AUTH_TYPE
  "Current authorization type is denied for this method" (the emulator's front answers that;
  see `LINE_METHODS` in portal.py).

Every call is recorded with its parameters, in order, for tests to read (`calls`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from agi_bitrix.testing.portal_wire import ErrorAnswer

LINE_ADD_METHOD = "telephony.externalline.add"
LINE_GET_METHOD = "telephony.externalline.get"
LINE_UPDATE_METHOD = "telephony.externalline.update"
LINE_METHODS = frozenset({LINE_ADD_METHOD, LINE_GET_METHOD, LINE_UPDATE_METHOD})


@dataclass
class ExternalLine:
    line_id: int
    number: str
    name: str
    crm_auto_create: str = "Y"


class ExternalLines:
    """The lines of the one application the emulated portal serves."""

    def __init__(self) -> None:
        self.lines: dict[str, ExternalLine] = {}  # by NUMBER as it was given
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (method, params), in order
        self._ids = itertools.count(1)

    def seed(self, number: str, name: str) -> None:
        """A line that is there already (added by someone else, or by an earlier run)."""
        self.lines[number] = ExternalLine(next(self._ids), number, name)

    def names(self) -> dict[str, str]:
        return {line.number: line.name for line in self.lines.values()}

    def answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((method, dict(params)))
        if method == LINE_GET_METHOD:
            return {"result": [{"NUMBER": line.number, "NAME": line.name, "CRM_AUTO_CREATE": line.crm_auto_create}
                               for line in self.lines.values()]}
        number = str(params.get("NUMBER") or "").strip()
        if not number:
            raise ErrorAnswer(400, "ERROR_CORE", "NUMBER should not be empty")
        if method == LINE_ADD_METHOD:
            return self._add(number, params)
        return self._update(number, params)

    def _add(self, number: str, params: dict[str, Any]) -> dict[str, Any]:
        if number in self.lines:
            raise ErrorAnswer(400, "ERROR_CORE", "Line already exists")
        line = ExternalLine(next(self._ids), number, str(params.get("NAME") or ""),
                            _flag(params.get("CRM_AUTO_CREATE"), "Y"))
        self.lines[number] = line
        return {"result": {"ID": line.line_id}}  # an integer here, a string from update (the docs' examples)

    def _update(self, number: str, params: dict[str, Any]) -> dict[str, Any]:
        if "NAME" not in params and "CRM_AUTO_CREATE" not in params:
            raise ErrorAnswer(400, "ERROR_CORE", "There are no fields to update")
        line = self.lines.get(number)
        if line is None:
            raise ErrorAnswer(400, "ERROR_CORE", f"Could not find line with number {number}")
        if "NAME" in params:
            line.name = str(params["NAME"] or "")
        line.crm_auto_create = _flag(params.get("CRM_AUTO_CREATE"), line.crm_auto_create)
        return {"result": {"ID": str(line.line_id)}}


def _flag(value: Any, default: str) -> str:
    text = str(value or "").strip().upper()
    return text if text in ("Y", "N") else default
