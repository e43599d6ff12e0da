"""The routing rules as data: what an admin wrote in `routing:`, validated and frozen.

Loading (routing.compiler) does every check that can fail — names, regexes, time ranges,
references to time intervals — so that matching at call time cannot fail.
"""

from __future__ import annotations

import calendar
import functools
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

# What searchCrmEntities may say about the owner's working day (see bitrix24-rest-notes.md);
# "" stands for "empty or missing": the portal has no time tracking.
TIMEMAN_STATUSES = ("OPENED", "PAUSED", "CLOSED", "EXPIRED", "UNAVAILABLE", "NOT_INSTALLED", "")
ENTITY_TYPES = ("CONTACT", "COMPANY", "LEAD")
CALL_STATUSES = ("FOUND", "NOT_FOUND", "NO_CALLERID", "ERROR")
# The owner's phones a route may dial, by their names in rules.
OWNER_PHONES = ("extension", "mobile", "work_phone", "personal_phone")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
UTC = ZoneInfo("UTC")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december")


@dataclass(frozen=True)
class TimeRange:
    """A daily range in minutes from midnight, start included, end excluded (1440 is 24:00); one
    that ends before it starts runs over midnight (22:00-06:00)."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


@dataclass(frozen=True)
class DayRange:
    """Days of the month, both ends included; a negative day counts from the month's end (-1 is
    the last day), and a range is cut to the month's days, as Alertmanager does."""

    first: int
    last: int

    def contains(self, day: int, month_length: int) -> bool:
        first = self.first if self.first > 0 else month_length + self.first + 1
        last = self.last if self.last > 0 else month_length + self.last + 1
        return max(first, 1) <= day <= min(last, month_length)


@dataclass(frozen=True)
class TimeInterval:
    """Alertmanager's time_interval: a moment is in it when every part given holds; an empty part
    means "any". Days, months and times are read on the wall clock of `zone` (the interval's
    `location`, else routing.timezone), and the day parts on the moment's own day, so a range over
    midnight covers the early hours and the late evening of that day."""

    weekdays: frozenset[int] = frozenset()  # 0 is Monday
    days_of_month: tuple[DayRange, ...] = ()
    months: frozenset[int] = frozenset()  # 1 is January
    years: tuple[tuple[int, int], ...] = ()  # (first, last), both included
    times: tuple[TimeRange, ...] = ()
    zone: ZoneInfo = UTC

    def contains(self, moment: datetime) -> bool:
        moment = moment.astimezone(self.zone)
        if not self.contains_day(moment.date()):
            return False
        minute = moment.hour * 60 + moment.minute
        return not self.times or any(r.contains(minute) for r in self.times)

    def contains_day(self, day: date) -> bool:
        if self.weekdays and day.weekday() not in self.weekdays:
            return False
        if self.months and day.month not in self.months:
            return False
        if self.years and not any(first <= day.year <= last for first, last in self.years):
            return False
        if self.days_of_month:
            length = calendar.monthrange(day.year, day.month)[1]
            return any(r.contains(day.day, length) for r in self.days_of_month)
        return True


@dataclass(frozen=True)
class Target:
    """Something a route can dial.

    kind is "owner" (value names one of OWNER_PHONES), "queue" (value is a queue name, or ""
    for the fallback queue), "extension" (a fixed inner number) or "number" (a fixed external
    number in international digits).
    """

    kind: str
    value: str = ""

    def describe(self) -> str:
        if self.kind == "owner":
            return f"owner's {self.value}"
        if self.kind == "queue":
            return f"queue {self.value}" if self.value else "fallback queue"
        return f"{self.kind} {self.value}"


class Pattern(Protocol):
    """A compiled did_regex or caller_regex: RE2's, which matches in time linear in the text
    (routing.compiler)."""

    @property
    def pattern(self) -> str: ...

    def fullmatch(self, text: str) -> object | None: ...


@dataclass(frozen=True)
class Match:
    """Conditions of a rule; all given ones must hold. None means "not asked"."""

    status: frozenset[str] | None = None
    did: frozenset[str] | None = None
    did_regex: Pattern | None = None
    caller: frozenset[str] | None = None
    caller_regex: Pattern | None = None
    during: tuple[str, ...] = ()
    outside: tuple[str, ...] = ()
    # Conditions on the CRM object (and its owner) that decides:
    entity_type: frozenset[str] | None = None
    owner: frozenset[str] | None = None
    timeman: frozenset[str] | None = None
    has: frozenset[str] = frozenset()

    @functools.cached_property  # asked for every rule of every call
    def about_crm_object(self) -> bool:
        return (
            self.entity_type is not None
            or self.owner is not None
            or self.timeman is not None
            or bool(self.has)
        )


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    route: tuple[Target, ...]
    # Which CRM objects may decide: "first" (the portal's own choice) or "all" of them, in the
    # portal's order re-sorted by `prefer` (entity types, most wanted first).
    objects: str = "first"
    prefer: tuple[str, ...] = ()
    line: int = 0

    @functools.cached_property
    def uses_crm_object(self) -> bool:
        """Whether the rule looks at a CRM object: a condition on it, or its owner as a target."""
        return self.match.about_crm_object or any(target.kind == "owner" for target in self.route)


@dataclass(frozen=True)
class RoutingPolicy:
    rules: tuple[Rule, ...]
    fallback_queue: str
    timezone: ZoneInfo
    default_country: str = "RU"
    time_intervals: dict[str, tuple[TimeInterval, ...]] = field(default_factory=dict)
