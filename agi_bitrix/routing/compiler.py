"""The rule compiler: the YAML `routing:` section, checked, into a RoutingPolicy.

Every check that can fail happens here — names, regexes, time ranges, references to time
intervals, phone numbers — each problem reported with its line and rule path, so that matching
at call time (routing.engine) cannot fail.
"""

from __future__ import annotations

import calendar
import functools
import re
from collections.abc import Callable
from datetime import date
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import re2

from agi_bitrix.checking import Checker, LocatedDict, LocatedList, quoted
from agi_bitrix.phones import dialable_number, normalize_extension, normalize_number
from agi_bitrix.routing.rules import (
    CALL_STATUSES,
    ENTITY_TYPES,
    MONTHS,
    OWNER_PHONES,
    TIMEMAN_STATUSES,
    WEEKDAYS,
    DayRange,
    Match,
    Pattern,
    RoutingPolicy,
    Rule,
    Target,
    TimeInterval,
    TimeRange,
)

ROUTING_KEYS = ("timezone", "fallback_queue", "time_intervals", "rules")
_RULE_KEYS = ("name", "match", "route", "objects", "prefer")
_MATCH_KEYS = ("status", "did", "did_regex", "caller", "caller_regex", "during", "outside",
               "entity_type", "owner", "timeman", "has")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # it would print every refused pattern to standard error
_TIME_RANGE = re.compile(r"^([0-9]{1,2}):([0-9]{2})\s*-\s*([0-9]{1,2}):([0-9]{2})$")  # \d takes any script's digits


def compile_routing(check: Checker, section: LocatedDict, country: str) -> RoutingPolicy:
    zone_name = check.text(section, "timezone", "routing", "UTC") or "UTC"
    zone = _zone(zone_name)
    if zone is None:
        check.problem(section.lines.get("timezone", section.line), "routing.timezone",
                      f"unknown time zone {quoted(zone_name)} (expected a name like Europe/Moscow)")
        zone = ZoneInfo("UTC")
    fallback = check.text(section, "fallback_queue", "routing")
    if fallback is None:
        check.problem(section.line, "routing.fallback_queue",
                      "missing; every call that no rule decides goes to this queue")
        fallback = ""
    elif not _NAME.match(fallback):
        check.problem(section.lines["fallback_queue"], "routing.fallback_queue",
                      f"{quoted(fallback)} must be letters, digits, '_', '.', '-'")
    intervals = _time_intervals(check, section, zone)
    rules = _rules(check, section, country, intervals)
    return RoutingPolicy(tuple(rules), fallback, zone, country, intervals)


# Time intervals follow Alertmanager's time_interval (config/config.go, timeinterval/timeinterval.go;
# docs/configuration.md): the same parts (weekdays, days_of_month, months, years, times,
# location), each a list of which any item may hold, all parts given must hold, ranges "a:b"
# include both ends, negative days count from the month's end and ranges are cut to the month,
# months by name or number, "24:00" ends a day. Where we deliberately differ:
# - times are our own "HH:MM-HH:MM" strings, and one that ends before it starts runs over
#   midnight (Alertmanager has {start_time, end_time} and refuses that);
# - weekdays and months may also be written "mon-fri", abbreviated to three letters or more, and
#   a range of them may wrap ("fri-mon", "december:february"; Alertmanager refuses those);
# - location defaults to routing.timezone, not UTC; "Local" (the server's zone) is refused;
# - an interval no date can match ("days_of_month: [31]" with "months: [february]") is refused;
#   Alertmanager loads it and it never matches. Nothing depends on today's date, though: years
#   already past load as they always did.
_INTERVAL_PARTS = ("weekdays", "days_of_month", "months", "years", "times", "location")
_DAY = re.compile(r"^-?[0-9]{1,2}$")  # [0-9], not \d: ASCII digits only
_NUMBER = re.compile(r"^[0-9]{1,4}$")
_SEXAGESIMAL = "; YAML reads an unquoted 1:8 as the number 68: put ranges in quotes"
# The Gregorian calendar repeats every 400 years: 146,097 days, a whole number of weeks.
_CALENDAR_CYCLE = 400


def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _time_intervals(check: Checker, section: LocatedDict, zone: ZoneInfo) -> dict[str, tuple[TimeInterval, ...]]:
    value = section.get("time_intervals")
    if value is None:
        return {}
    if not isinstance(value, LocatedDict):
        check.problem(section.lines["time_intervals"], "routing.time_intervals",
                      "expected a mapping of interval names to lists of {weekdays, days_of_month, months, ...}")
        return {}
    result = {}
    for name, entries in value.items():
        path = f"routing.time_intervals.{name}"
        line = value.lines[name]
        if not _NAME.match(str(name)):
            check.problem(line, path, "interval names are letters, digits, '_', '.', '-'")
        holder = LocatedDict()
        holder[name] = entries
        holder.lines[name] = line
        parsed = []
        for item_line, item_path, item in check.items(holder, name, "routing.time_intervals") or []:
            if not isinstance(item, LocatedDict):
                check.problem(item_line, item_path, f"expected a mapping of {', '.join(_INTERVAL_PARTS)}")
                continue
            parsed.append(_time_interval(check, item, item_path, zone))
        result[str(name)] = tuple(parsed)
    return result


def _time_interval(check: Checker, item: LocatedDict, path: str, zone: ZoneInfo) -> TimeInterval:
    problems_before = len(check.problems)
    check.unknown_keys(item, path, _INTERVAL_PARTS)
    location = check.text(item, "location", path)
    if location is not None:
        found = _zone(location)
        if found is not None:
            zone = found
        else:
            check.problem(item.lines["location"], f"{path}.location",
                          f"unknown time zone {quoted(location)} (expected a name like Europe/Moscow)")
    interval = TimeInterval(
        weekdays=_cyclic(check, item, "weekdays", path, range(7), _weekday, "a weekday or range like mon-fri"),
        days_of_month=_days_of_month(check, item, path),
        months=_cyclic(check, item, "months", path, range(1, 13), _month,
                       "a month (january or jan, or 1 to 12) or range like \"january:march\""),
        years=_years(check, item, path),
        times=_times(check, item, path),
        zone=zone,
    )
    if len(check.problems) == problems_before and not _some_day_in(interval):
        given = [part for part in ("weekdays", "days_of_month", "months", "years") if part in item]
        check.problem(item.line, path, f"never matches: no date has all of its {', '.join(given)}")
    return interval


def _bounds(value: Any, member: Callable[[str], int], separators: str) -> tuple[int, int]:
    """The first and last member of an item like "mon-fri", "1:8" or "march" (ValueError if it is not
    one); `member` reads one end."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(value)
    text = str(value).strip().lower()
    for separator in separators:
        first, found, last = text.partition(separator)
        if found:
            return member(first.strip()), member(last.strip())
    one = member(text)
    return one, one


def _cyclic(check: Checker, item: LocatedDict, key: str, path: str, members: range,
            member: Callable[[str], int], expected: str) -> frozenset[int]:
    """Weekdays or months: a range runs forward through `members` and may wrap, like fri-mon."""
    found: set[int] = set()
    for line, item_path, value in check.items(item, key, path) or []:
        try:
            first, last = _bounds(value, member, "-:")
        except ValueError:
            numbered = members.start == 1  # months may be numbers: "1:3" unquoted is YAML's 63
            hint = _SEXAGESIMAL if numbered and isinstance(value, int) and abs(value) >= 60 else ""
            check.problem(line, item_path, f"{quoted(value)} is not {expected}{hint}")
            continue
        index = members.index(first)
        found.add(first)
        while members[index] != last:
            index = (index + 1) % len(members)
            found.add(members[index])
    return frozenset(found)


def _weekday(text: str) -> int:
    """0 for Monday: "mon", "monday", any start of the name of three letters or more."""
    return _named(text, WEEKDAYS, 0)


def _month(text: str) -> int:
    """1 for January: by number, or by name as weekdays are."""
    if _NUMBER.match(text):
        if not 1 <= int(text) <= 12:
            raise ValueError(text)
        return int(text)
    return _named(text, MONTHS, 1)


def _named(text: str, names: tuple[str, ...], first: int) -> int:
    if len(text) >= 3:
        for index, name in enumerate(names):
            if name.startswith(text):
                return index + first
    raise ValueError(text)


def _days_of_month(check: Checker, item: LocatedDict, path: str) -> tuple[DayRange, ...]:
    ranges = []
    for line, item_path, value in check.items(item, "days_of_month", path) or []:
        try:
            first, last = _bounds(value, _day_of_month, ":")
        except ValueError:
            hint = _SEXAGESIMAL if isinstance(value, int) and abs(value) >= 60 else ""
            check.problem(line, item_path, f"{quoted(value)} is not a day of the month (1 to 31, or -1 for the"
                                           f" last to -31) or a range like \"1:8\"{hint}")
            continue
        days = DayRange(first, last)
        if not any(days.contains(day, length) for length in (28, 29, 30, 31) for day in range(1, length + 1)):
            check.problem(line, item_path, f"{quoted(value)} is empty in every month")
            continue
        ranges.append(days)
    return tuple(ranges)


def _day_of_month(text: str) -> int:
    if not _DAY.match(text) or not 1 <= abs(int(text)) <= 31:
        raise ValueError(text)
    return int(text)


def _years(check: Checker, item: LocatedDict, path: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for line, item_path, value in check.items(item, "years", path) or []:
        try:
            first, last = _bounds(value, _year, "-:")
        except ValueError:
            check.problem(line, item_path, f"{quoted(value)} is not a year (1 to 9999) or a range like \"2026:2027\"")
            continue
        if last < first:
            check.problem(line, item_path, f"{quoted(value)}: end year {last} is before start year {first}")
            continue
        ranges.append((first, last))
    return tuple(ranges)


def _year(text: str) -> int:
    if not _NUMBER.match(text) or int(text) == 0:
        raise ValueError(text)
    return int(text)


def _some_day_in(interval: TimeInterval) -> bool:
    """Whether any date has all the day parts of `interval` (its times and zone do not matter)."""
    return _some_day_with(interval.weekdays, interval.days_of_month, interval.months, interval.years)


# Keyed by the day parts: an interval repeated (YAML aliases make that cheap to write: 1,000
# copies of one impossible interval) is judged once, and judging one costs about a millisecond.
@functools.lru_cache(maxsize=4096)
def _some_day_with(weekdays: frozenset[int], days_of_month: tuple[DayRange, ...], months: frozenset[int],
                   years: tuple[tuple[int, int], ...]) -> bool:
    """As the calendar repeats every 400 years, a year stands for every year it equals modulo 400,
    and any 400 years for all. Within those, a month is tried once per weekday it starts on and
    length it has: the day parts see a date only through its year (allowed for all of them), its
    month, its day, its weekday and its month's length, so another such month answers alike."""
    interval = TimeInterval(weekdays=weekdays, days_of_month=days_of_month, months=months, years=years)
    years_by_residue: dict[int, int] = {}  # a year of each residue modulo 400 the interval allows
    for first, last in sorted(set(years)) or [(2000, 2399)]:
        for year in range(first, min(last, first + _CALENDAR_CYCLE - 1) + 1):
            years_by_residue.setdefault(year % _CALENDAR_CYCLE, year)
        if len(years_by_residue) == _CALENDAR_CYCLE:
            break
    tried: set[tuple[int, int, int]] = set()  # (month, weekday of its first day, its length)
    for year in sorted(years_by_residue.values()):
        for month in sorted(months) or range(1, 13):
            first_weekday, length = calendar.monthrange(year, month)
            if (month, first_weekday, length) in tried:
                continue
            tried.add((month, first_weekday, length))
            if any(interval.contains_day(date(year, month, day)) for day in range(1, length + 1)):
                return True
    return False


def _times(check: Checker, item: LocatedDict, path: str) -> tuple[TimeRange, ...]:
    ranges = []
    for line, item_path, value in check.items(item, "times", path) or []:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 09:00 as the number 540 (base 60).
            check.problem(line, item_path, "write time ranges in quotes, like \"09:00-18:00\"")
            continue
        minutes = _minutes(str(value).strip())
        if minutes is None:
            check.problem(line, item_path, f"{quoted(value)} is not a time range like \"09:00-18:00\"")
            continue
        if minutes[0] == minutes[1]:
            check.problem(line, item_path, f"{quoted(value)} is an empty range")
            continue
        start, end = minutes
        ranges.append(TimeRange(start, end))
    return tuple(ranges)


def _minutes(text: str) -> tuple[int, int] | None:
    """"HH:MM-HH:MM" as minutes from midnight; 24:00 only ends a range ("00:00-24:00" is a whole day)."""
    match = _TIME_RANGE.match(text)
    if not match:
        return None
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 * 60 + m2 > 24 * 60:
        return None
    return h1 * 60 + m1, h2 * 60 + m2


def _rules(check: Checker, section: LocatedDict, country: str,
           intervals: dict[str, tuple[TimeInterval, ...]]) -> list[Rule]:
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for line, item_path, item in check.items(section, "rules", "routing") or []:
        if not isinstance(item, LocatedDict):
            check.problem(line, item_path, "a rule is a mapping with name, match and route")
            continue
        check.unknown_keys(item, item_path, _RULE_KEYS)
        name = check.text(item, "name", item_path)
        if name is None:
            check.problem(line, f"{item_path}.name", "missing; every rule needs a name (it is B24_RULE)")
            name = f"rule-{len(rules) + 1}"
        elif not _NAME.match(name):
            check.problem(item.lines["name"], f"{item_path}.name",
                          f"{quoted(name)} must be letters, digits, '_', '.', '-' (at most 64)")
        elif name in seen or name == "fallback":
            check.problem(item.lines["name"], f"{item_path}.name",
                          f"{quoted(name)} is already used (line {seen[name]})" if name in seen
                          else "'fallback' is reserved for calls no rule decides")
        seen.setdefault(name, item.lines.get("name", line))
        # Once it has a name, a rule is called by it: routing.rules[vip] rather than [3].
        path = f"routing.rules[{name}]" if "name" in item else item_path
        match = _match(check, item, path, country, intervals)
        route = _route(check, item, path, country)
        objects = (check.text(item, "objects", path, "first") or "first").lower()
        if objects not in ("first", "all"):
            check.problem(item.lines["objects"], f"{path}.objects",
                          f"{quoted(objects)} is not 'first' (the portal's choice) or 'all'")
        prefer = check.choices(item, "prefer", path, ENTITY_TYPES)
        if prefer and objects != "all":
            check.problem(item.lines["prefer"], f"{path}.prefer", "only makes sense with objects: all")
        prefer_order = tuple(str(v).upper() for _, _, v in check.items(item, "prefer", path) or []
                             if str(v).upper() in ENTITY_TYPES)
        rules.append(Rule(name, match, route, objects, prefer_order, line))
    return rules


def _match(check: Checker, rule: LocatedDict, path: str, country: str,
           intervals: dict[str, tuple[TimeInterval, ...]]) -> Match:
    section = check.section(rule, "match", f"{path}.match", _MATCH_KEYS)
    path = f"{path}.match"
    owners: frozenset[str] | None = None
    owner_items = check.items(section, "owner", path)
    if owner_items is not None:
        found_owners = set()
        for line, item_path, value in owner_items:
            text = str(value).strip()
            if isinstance(value, bool) or not (text.isascii() and text.isdigit()):  # isdigit(): fullwidth too
                check.problem(line, item_path, f"{quoted(value)} is not a Bitrix24 user id (a number)")
            else:
                found_owners.add(text)
        owners = frozenset(found_owners)
    names: dict[str, tuple[str, ...]] = {}
    for key in ("during", "outside"):
        found = []
        for line, item_path, value in check.items(section, key, path) or []:
            if str(value) not in intervals:
                known = ", ".join(intervals) or "none defined"
                check.problem(line, item_path,
                              f"no time interval {quoted(value)} in routing.time_intervals ({known})")
            else:
                found.append(str(value))
        names[key] = tuple(found)
    return Match(
        status=check.choices(section, "status", path, CALL_STATUSES),
        did=_numbers(check, section, "did", path, country),
        did_regex=_regex(check, section, "did_regex", path),
        caller=_numbers(check, section, "caller", path, country),
        caller_regex=_regex(check, section, "caller_regex", path),
        during=names["during"],
        outside=names["outside"],
        entity_type=check.choices(section, "entity_type", path, ENTITY_TYPES),
        owner=owners,
        timeman=check.choices(section, "timeman", path, TIMEMAN_STATUSES),
        has=check.choices(section, "has", path, OWNER_PHONES, upper=False) or frozenset(),
    )


def _numbers(check: Checker, section: LocatedDict, key: str, path: str,
             country: str) -> frozenset[str] | None:
    items = check.items(section, key, path)
    if items is None:
        return None
    numbers = set()
    for line, item_path, value in items:
        number = None if isinstance(value, (bool, LocatedDict, LocatedList)) else normalize_number(str(value), country)
        if number is None:
            check.problem(line, item_path, f"{quoted(value)} is not a phone number")
        else:
            numbers.add(number)
    return frozenset(numbers)


def _regex(check: Checker, section: LocatedDict, key: str, path: str) -> Pattern | None:
    """The regex as RE2 compiles it. Python's re backtracks: `(7+)+8` made a call dialling 27
    sevens take 4 s, doubling with each digit, and the event loop stood still meanwhile. RE2 takes
    time linear in the text whatever the pattern, and refuses what would need backtracking."""
    text = check.text(section, key, path)
    if text is None:
        return None
    try:
        re.compile(text)  # for Python's messages, which admins know and which name the position
    except re.error as error:
        check.problem(section.lines[key], f"{path}.{key}", f"bad regular expression {quoted(text)}: {error}")
        return None
    try:
        return cast(Pattern, re2.compile(text, _RE2_OPTIONS))
    except re2.error as error:
        reason = error.args[0]  # RE2's message, as bytes
        reason = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        check.problem(section.lines[key], f"{path}.{key}",
                      f"{quoted(text)}: {reason}; rules are matched by RE2, which takes linear time and has"
                      " no backreferences or lookaround")
        return None


def _route(check: Checker, rule: LocatedDict, path: str, country: str) -> tuple[Target, ...]:
    items: list[tuple[int, str, Any]] | None
    if isinstance(rule.get("route"), LocatedDict):  # a single {queue: NAME} without a list
        items = [(rule.lines["route"], f"{path}.route", rule["route"])]
    else:
        items = check.items(rule, "route", path)
    if not items:
        check.problem(rule.lines.get("route", rule.line), f"{path}.route",
                      "missing; say what to dial, e.g. [extension, mobile, queue]")
        return (Target("queue"),)
    targets = []
    for line, item_path, value in items:
        target = _target(value, country)
        if isinstance(target, str):
            check.problem(line, item_path, target)
        else:
            targets.append(target)
    return tuple(targets) or (Target("queue"),)


_TARGET_HELP = ("expected extension, mobile, work_phone, personal_phone, queue, "
                "{queue: NAME}, {extension: NUMBER} or {number: PHONE}")


def _target(value: Any, country: str) -> Target | str:
    if isinstance(value, str) and value in OWNER_PHONES:
        return Target("owner", value)
    if value == "queue":
        return Target("queue")
    if isinstance(value, LocatedDict) and len(value) == 1:
        (kind, argument), = value.items()
        text = "" if argument is None or isinstance(argument, bool) else str(argument).strip()
        if kind == "queue":
            if _NAME.match(text):
                return Target("queue", text)
            return f"queue name {quoted(argument)} must be letters, digits, '_', '.', '-'"
        if kind == "extension":
            extension = normalize_extension(text)
            return Target("extension", extension) if extension else f"extension {quoted(argument)} must be digits"
        if kind == "number":
            if normalize_number(text, country) is None:
                return f"{quoted(argument)} is not a phone number"
            number = dialable_number(text, country)
            return Target("number", number) if number else (
                f"{quoted(argument)} is not a valid subscriber number in {country} or in international form"
                " (service and short numbers cannot be dial targets)")
    return f"{quoted(value)}: {_TARGET_HELP}"
