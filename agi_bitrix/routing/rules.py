"""The routing rules as data: what an admin wrote in `routing:`, validated and frozen.

Loading (routing.compiler) does every check that can fail — names, regexes, time ranges,
references to time intervals — so that matching at call time cannot fail.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Protocol
from zoneinfo import ZoneInfo

# What searchCrmEntities may say about the owner's working day (see bitrix24-rest-notes.md);
# "" stands for "empty or missing": the portal has no time tracking.
TIMEMAN_STATUSES = ("OPENED", "PAUSED", "CLOSED", "EXPIRED", "UNAVAILABLE", "NOT_INSTALLED", "")
ENTITY_TYPES = ("CONTACT", "COMPANY", "LEAD")
CALL_STATUSES = ("FOUND", "NOT_FOUND", "NO_CALLERID", "ERROR")
# The owner's phones a route may dial, by their names in rules.
OWNER_PHONES = ("extension", "mobile", "work_phone", "personal_phone")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class TimeRange:
    """A daily range; one that ends before it starts runs over midnight (22:00-06:00)."""

    start: time
    end: time

    def contains(self, moment: time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


@dataclass(frozen=True)
class TimeInterval:
    """Days of the week and times of day; an empty part means "any"."""

    weekdays: frozenset[int] = frozenset()
    times: tuple[TimeRange, ...] = ()

    def contains(self, moment: datetime) -> bool:
        if self.weekdays and moment.weekday() not in self.weekdays:
            return False
        return not self.times or any(r.contains(moment.time()) for r in self.times)


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
