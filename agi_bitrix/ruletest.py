"""`agi-bitrix test`: example calls run through the rules, compared with what the admin expects.

A cases file lists calls (caller, DID, time) with the CRM answer each would get — written
inline in the portal's own shape, or recorded from the real portal with
`agi-bitrix route --record FILE` — and the variables expected. Nothing is sent anywhere, so
a rules change can be checked in the admin's own CI before `kill -HUP`.

    cases:
      - name: Anna is at work
        caller: "89161234567"
        time: "2026-11-26 12:00"        # in routing.timezone; default: now
        crm_file: recorded/anna.json    # or crm: [...] / crm: [] / crm_error: timeout
        expect: {route: extension, target: "101", rule: owner-at-work}
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agi_bitrix.bitrix.models import CrmAnswer, MalformedAnswer, parse_search_result
from agi_bitrix.checking import Checker, ConfigError, LocatedDict, LocatedList, Problem, quoted, read_file
from agi_bitrix.config import Config
from agi_bitrix.routing.engine import CallInfo
from agi_bitrix.routing.variables import NAMES
from agi_bitrix.service import Router, call_info

_CASE_KEYS = ("name", "caller", "did", "time", "crm", "crm_file", "crm_error", "expect")
_EXPECTABLE = tuple(name.lower() for name in NAMES)


@dataclass(frozen=True)
class Case:
    name: str
    line: int
    call: CallInfo
    answer: CrmAnswer
    moment: datetime | None
    expect: dict[str, str]


@dataclass(frozen=True)
class Outcome:
    case: Case
    actual: dict[str, str]
    mismatches: dict[str, tuple[str, str]]  # name -> (expected, actual)

    @property
    def passed(self) -> bool:
        return not self.mismatches


def load_cases(path: str | Path, config: Config) -> list[Case]:
    """Read and check a cases file; raises ConfigError with every problem."""
    file = str(path)
    check = Checker(file)
    data = check.load(read_file(file)[0])
    items = data.get("cases") if isinstance(data, LocatedDict) else None
    if not isinstance(items, LocatedList) or not items:
        raise ConfigError([*check.problems, Problem(file, 1, "cases", "expected a list of cases under `cases:`")])
    cases = []
    for index, item in enumerate(items):
        line = items.lines[index]
        where = f"cases[{index}]"
        if not isinstance(item, LocatedDict):
            check.problem(line, where, "a case is a mapping with caller, crm and expect")
            continue
        found_before = len(check.problems)
        problem = _reporter(check, item, where)
        check.unknown_keys(item, where, _CASE_KEYS)
        name = str(item.get("name") or f"case {index + 1}")
        country = config.policy.default_country
        caller = "" if item.get("caller") is None else str(item["caller"])
        did_text = "" if item.get("did") is None else str(item["did"])
        call = call_info(caller, did_text, country)
        answer = _answer(item, call, Path(path).parent, problem)
        moment = _moment(item, config, problem)
        expect = _expect(item, problem)
        if len(check.problems) == found_before:
            cases.append(Case(name, line, call, answer, moment, expect))
    check.raise_problems()
    return cases


def _reporter(check: Checker, item: LocatedDict, where: str) -> Callable[[str, str], None]:
    """Reports a problem of one case at its key's line (the case's own line without the key)."""
    def problem(key: str, message: str) -> None:
        check.problem(item.lines.get(key, item.line), f"{where}.{key}", message)
    return problem


def _answer(item: LocatedDict, call: CallInfo, base: Path, problem) -> CrmAnswer:
    given = [key for key in ("crm", "crm_file", "crm_error") if key in item]
    if call.phone is None:
        if given:
            problem(given[0], "a call without a usable caller ID never asks the portal; drop this key")
        return CrmAnswer("NO_CALLERID")
    if len(given) != 1:
        problem("crm", "give exactly one of crm (the answer inline), crm_file (recorded) or crm_error")
        return CrmAnswer("ERROR", error="invalid_case")
    key = given[0]
    if key == "crm_error":
        return CrmAnswer("ERROR", error=str(item[key]))
    result = item[key]
    if key == "crm_file":
        recorded = base / str(item[key])
        try:
            result = json.loads(recorded.read_text(encoding="utf-8"))["result"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem(key, f"cannot use {recorded}: {error}")
            return CrmAnswer("ERROR", error="invalid_case")
    try:
        entities = tuple(parse_search_result(result))
    except MalformedAnswer as error:
        problem(key, f"not an answer of searchCrmEntities: {error}")
        return CrmAnswer("ERROR", error="invalid_case")
    return CrmAnswer("FOUND" if entities else "NOT_FOUND", entities)


def _moment(item: LocatedDict, config: Config, problem) -> datetime | None:
    if "time" not in item:
        return None
    try:
        moment = datetime.fromisoformat(str(item["time"]))
    except ValueError:
        problem("time", f"{quoted(item['time'])} is not a time like \"2026-11-26 12:00\"")
        return None
    return moment.replace(tzinfo=config.policy.timezone) if moment.tzinfo is None else moment


def _expect(item: LocatedDict, problem) -> dict[str, str]:
    expect = item.get("expect")
    if not isinstance(expect, LocatedDict) or not expect:
        problem("expect", "expected a mapping of variables to values, e.g. {route: queue, target: support}")
        return {}
    result = {}
    for key, value in expect.items():
        name = str(key).lower()
        if name not in _EXPECTABLE:
            problem("expect", f"{quoted(key)} is not a variable; expected one of: {', '.join(_EXPECTABLE)}")
        else:
            result[name] = "" if value is None else str(value)
    return result


def _fixed(moment: datetime) -> datetime:
    return moment


class _Recorded:
    """The case's CRM answer, standing in for the portal lookup."""

    def __init__(self, answer: CrmAnswer) -> None:
        self.answer = answer

    async def lookup(self, phone: str) -> CrmAnswer:
        return self.answer


async def run_cases(cases: list[Case], config: Config, now: datetime | None = None) -> list[Outcome]:
    """Each case through the same Router the server uses, with its recorded answer and time."""
    now = now or datetime.now(UTC)
    prefix = config.variable_prefix
    outcomes = []
    for case in cases:
        router = Router(config, _Recorded(case.answer), clock=functools.partial(_fixed, case.moment or now))
        variables = (await router.route(case.call, uniqueid=case.name)).variables
        actual = {name[len(prefix):].lower(): value for name, value in variables.items()}
        mismatches = {name: (want, actual[name]) for name, want in case.expect.items() if actual[name] != want}
        outcomes.append(Outcome(case, actual, mismatches))
    return outcomes


def report(outcomes: list[Outcome], cases_file: str) -> str:
    lines = []
    for outcome in outcomes:
        case, actual = outcome.case, outcome.actual
        got = f"{actual['route']} {actual['target']} (rule {actual['rule']})"
        if outcome.passed:
            lines.append(f"PASS  {case.name}: {got}")
            continue
        wanted = ", ".join(f"{name}={want!r} got {have!r}" for name, (want, have) in outcome.mismatches.items())
        lines.append(f"FAIL  {case.name} ({cases_file}:{case.line}): {wanted}; routed {got}")
    failed = sum(not o.passed for o in outcomes)
    lines.append(f"{len(outcomes)} cases, {failed} failed")
    return "\n".join(lines)
