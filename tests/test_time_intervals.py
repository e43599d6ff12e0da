"""routing.time_intervals: each part matching and not, at its boundaries, and every refusal as printed.

The semantics follow Prometheus Alertmanager's time_interval (timeinterval/timeinterval.go,
docs/configuration.md); the deliberate differences are listed in routing/compiler.py.
"""

import textwrap
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agi_bitrix.checking import ConfigError
from agi_bitrix.config import parse_config
from agi_bitrix.routing.engine import CallInfo, CrmAnswer, decide

WEBHOOK = 'bitrix: {webhook_url: "https://portal.example/rest/1/code/"}\n'


def config_text(spec: str, timezone: str = "Europe/Moscow") -> str:
    return (f"{WEBHOOK}routing:\n  fallback_queue: support\n  timezone: {timezone}\n"
            f"  time_intervals:\n    x: {spec}\n")


def holds(spec: str, moment: str, timezone: str = "Europe/Moscow") -> bool:
    """Whether interval `x` = `spec` holds at `moment`: ISO, on routing.timezone's clock unless it has an offset."""
    policy = parse_config(config_text(spec, timezone)).policy
    at = datetime.fromisoformat(moment)
    at = at.replace(tzinfo=policy.timezone) if at.tzinfo is None else at
    return any(interval.contains(at) for interval in policy.time_intervals["x"])


# (interval, moment, holds): every part shown to hold and not to.
CASES = [
    # weekdays: ours (mon-fri), Alertmanager's (monday:friday), wrapping, a longer abbreviation
    ("[{weekdays: [mon-fri]}]", "2026-11-27 12:00", True),  # Friday
    ("[{weekdays: [mon-fri]}]", "2026-11-28 12:00", False),  # Saturday
    ("[{weekdays: ['monday:friday']}]", "2026-11-23 00:00", True),
    ("[{weekdays: ['monday:friday']}]", "2026-11-22 23:59", False),  # Sunday
    ("[{weekdays: [fri-mon]}]", "2026-11-29 12:00", True),  # Sunday
    ("[{weekdays: [fri-mon]}]", "2026-11-24 12:00", False),  # Tuesday
    ("[{weekdays: ['sunday:saturday']}]", "2026-11-25 12:00", True),
    ("[{weekdays: [thurs, Sat]}]", "2026-11-26 12:00", True),
    ("[{weekdays: [thurs, Sat]}]", "2026-11-27 12:00", False),
    # days_of_month: first and last days, ranges, negatives, cut to the month, leap years
    ("[{days_of_month: [1]}]", "2026-03-01 00:00", True),
    ("[{days_of_month: [1]}]", "2026-02-28 23:59", False),
    ("[{days_of_month: ['1:8']}]", "2026-01-08 23:59", True),
    ("[{days_of_month: ['1:8']}]", "2026-01-09 00:00", False),
    ("[{days_of_month: [31]}]", "2026-01-31 12:00", True),
    ("[{days_of_month: [31]}]", "2026-04-30 12:00", False),
    ("[{days_of_month: [-1]}]", "2026-01-31 12:00", True),
    ("[{days_of_month: [-1]}]", "2026-01-30 12:00", False),
    ("[{days_of_month: [-1]}]", "2026-04-30 12:00", True),
    ("[{days_of_month: [-1]}]", "2026-02-28 12:00", True),
    ("[{days_of_month: [-1]}]", "2028-02-28 12:00", False),  # a leap year
    ("[{days_of_month: [-1]}]", "2028-02-29 12:00", True),
    ("[{days_of_month: [-1]}]", "2000-02-29 12:00", True),  # divisible by 400: leap
    ("[{days_of_month: [-1]}]", "2100-02-28 12:00", True),  # divisible by 100: not
    ("[{days_of_month: ['-3:-1']}]", "2026-04-28 12:00", True),
    ("[{days_of_month: ['-3:-1']}]", "2026-04-27 12:00", False),
    ("[{days_of_month: ['25:-1']}]", "2026-02-25 12:00", True),
    ("[{days_of_month: ['25:-1']}]", "2026-02-24 12:00", False),
    ("[{days_of_month: ['25:31']}]", "2026-02-28 12:00", True),  # cut to February
    ("[{days_of_month: ['29:31']}]", "2026-02-28 12:00", False),
    ("[{days_of_month: ['29:31']}]", "2028-02-29 12:00", True),
    ("[{days_of_month: ['-31:-1']}]", "2026-02-01 12:00", True),  # from before the 1st: cut to it
    ("[{days_of_month: ['-31:-30']}]", "2026-01-02 12:00", True),
    ("[{days_of_month: ['-31:-30']}]", "2026-02-01 12:00", False),  # wholly before February's 1st
    # months: by name, abbreviation and number, ranges, wrapping
    ("[{months: [march]}]", "2026-03-31 23:59", True),
    ("[{months: [march]}]", "2026-04-01 00:00", False),
    ("[{months: [Sep, 3]}]", "2026-09-15 12:00", True),
    ("[{months: [Sep, 3]}]", "2026-03-15 12:00", True),
    ("[{months: [Sep, 3]}]", "2026-10-15 12:00", False),
    ("[{months: ['1:3']}]", "2026-01-01 00:00", True),
    ("[{months: ['1:3']}]", "2026-04-01 00:00", False),
    ("[{months: ['december:february']}]", "2026-12-01 00:00", True),
    ("[{months: ['december:february']}]", "2027-02-28 23:59", True),
    ("[{months: ['december:february']}]", "2027-03-01 00:00", False),
    ("[{months: [nov-dec]}]", "2026-11-01 00:00", True),
    # years: one, a range, both ends
    ("[{years: [2026]}]", "2026-12-31 23:59", True),
    ("[{years: [2026]}]", "2027-01-01 00:00", False),
    ("[{years: ['2026:2027']}]", "2027-12-31 23:59", True),
    ("[{years: ['2026:2027']}]", "2025-12-31 23:59", False),
    ("[{years: ['2026:2027']}]", "2028-01-01 00:00", False),
    ("[{years: [2026-2027]}]", "2027-06-01 12:00", True),
    # times: start included, end excluded, 24:00, a whole day, over midnight (as before)
    ("[{times: ['09:00-18:00']}]", "2026-11-26 09:00", True),
    ("[{times: ['09:00-18:00']}]", "2026-11-26 17:59", True),
    ("[{times: ['09:00-18:00']}]", "2026-11-26 18:00", False),
    ("[{times: ['09:00-18:00']}]", "2026-11-26 08:59", False),
    ("[{times: ['22:00-24:00']}]", "2026-11-26 23:59", True),
    ("[{times: ['22:00-24:00']}]", "2026-11-26 00:00", False),
    ("[{times: ['00:00-24:00']}]", "2026-11-26 00:00", True),
    ("[{times: ['00:00-24:00']}]", "2026-11-26 23:59", True),
    ("[{times: ['22:00-06:00']}]", "2026-11-26 23:30", True),
    ("[{times: ['22:00-06:00']}]", "2026-11-26 05:59", True),
    ("[{times: ['22:00-06:00']}]", "2026-11-26 06:00", False),
    ("[{times: ['22:00-06:00']}]", "2026-11-26 21:59", False),
    # over midnight with a day: the early hours and the late evening of that day, as before
    ("[{weekdays: [fri], times: ['22:00-06:00']}]", "2026-11-27 05:00", True),
    ("[{weekdays: [fri], times: ['22:00-06:00']}]", "2026-11-28 05:00", False),
    # every given part must hold; any interval of a name may
    ("[{months: [march], days_of_month: [8]}]", "2026-03-08 12:00", True),
    ("[{months: [march], days_of_month: [8]}]", "2026-04-08 12:00", False),
    ("[{months: [march], days_of_month: [8]}]", "2026-03-09 12:00", False),
    ("[{months: [december], days_of_month: [31], times: ['17:00-24:00']}]", "2026-12-31 17:00", True),
    ("[{months: [december], days_of_month: [31], times: ['17:00-24:00']}]", "2026-12-31 16:59", False),
    ("[{months: [december], days_of_month: [31], times: ['17:00-24:00']}]", "2026-12-30 17:00", False),
    ("[{days_of_month: [13], weekdays: [fri]}]", "2026-11-13 12:00", True),
    ("[{days_of_month: [13], weekdays: [fri]}]", "2026-10-13 12:00", False),  # a Tuesday
    ("[{months: [january], days_of_month: ['1:8']}, {months: [march], days_of_month: [8]}]",
     "2026-03-08 12:00", True),
    ("[{months: [january], days_of_month: ['1:8']}, {months: [march], days_of_month: [8]}]",
     "2026-01-05 12:00", True),
    ("[{months: [january], days_of_month: ['1:8']}, {months: [march], days_of_month: [8]}]",
     "2026-03-01 12:00", False),
    ("[{}]", "2026-03-01 12:00", True),  # no part: any moment, as in Alertmanager
]


@pytest.mark.parametrize("spec, moment, expected", CASES)
def test_interval_parts(spec, moment, expected):
    assert holds(spec, moment) is expected


# (interval, routing.timezone, moment, holds): an interval's location against routing.timezone.
ZONE_CASES = [
    # New Year in Vladivostok (UTC+10) comes at 17:00 in Moscow (UTC+3)
    ("[{location: Asia/Vladivostok, months: [january], days_of_month: [1]}]", "Europe/Moscow",
     "2025-12-31 17:00", True),
    ("[{location: Asia/Vladivostok, months: [january], days_of_month: [1]}]", "Europe/Moscow",
     "2025-12-31 16:59", False),
    ("[{months: [january], days_of_month: [1]}]", "Europe/Moscow", "2025-12-31 17:00", False),
    ("[{months: [january], days_of_month: [1]}]", "Europe/Moscow", "2026-01-01 00:00", True),
    ("[{months: [january], days_of_month: [1]}]", "Asia/Vladivostok", "2025-12-31T14:00+00:00", True),
    # routing.timezone is the default for every interval: here UTC
    ("[{times: ['09:00-18:00']}]", "UTC", "2026-11-26T09:00+00:00", True),
    ("[{location: Europe/Moscow, times: ['09:00-18:00']}]", "UTC", "2026-11-26T06:00+00:00", True),
    ("[{location: Europe/Moscow, times: ['09:00-18:00']}]", "UTC", "2026-11-26T15:00+00:00", False),
    # a zone with summer time: 09:00 in Berlin is 08:00 UTC in winter, 07:00 UTC in summer
    ("[{location: Europe/Berlin, times: ['09:00-18:00']}]", "UTC", "2026-03-27T07:00+00:00", False),
    ("[{location: Europe/Berlin, times: ['09:00-18:00']}]", "UTC", "2026-03-30T07:00+00:00", True),
]


@pytest.mark.parametrize("spec, timezone, moment, expected", ZONE_CASES)
def test_location_and_routing_timezone(spec, timezone, moment, expected):
    assert holds(spec, moment, timezone) is expected


def test_a_holiday_rule_routes_and_the_trace_names_the_date():
    policy = parse_config(config_text("[{months: [march], days_of_month: [8]}]") + textwrap.indent(textwrap.dedent("""\
        rules:
          - {name: holiday, match: {during: [x]}, route: {queue: voicemail}}
        """), "  ")).policy
    moscow = ZoneInfo("Europe/Moscow")
    decision = decide(CallInfo("79161234567"), CrmAnswer("NOT_FOUND"), policy, datetime(2026, 3, 8, 10, tzinfo=moscow))
    assert (decision.route, decision.target, decision.rule) == ("queue", "voicemail", "holiday")
    decision = decide(CallInfo("79161234567"), CrmAnswer("NOT_FOUND"), policy, datetime(2026, 3, 9, 10, tzinfo=moscow))
    assert decision.rule == "fallback"
    assert decision.trace[0].reason == "Mon 2026-03-09 10:00 is outside x"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(text, "test.yaml")
    return [str(p) for p in error.value.problems]


def test_every_refusal_names_file_line_key_and_value():
    found = problems(WEBHOOK + textwrap.dedent("""\
        routing:
          fallback_queue: support
          time_intervals:
            holidays:
              - days_of_month: [32, 0, "1-8", 1:8, "8:1", "-1:1", "\u0663", true]
                months: [febuary, 13, 1:3, "ma"]
                years: ["2027:2026", 0, "\uff12\uff10\uff12\uff16", 10000]
                location: Mars/Olympus
                day_of_month: [1]
                weekdays: [monkey, mo]
              - {times: ["00:00-24:00", "10:00-10:00", "00:00-00:00", "24:00-06:00", "18:00-24:30", 18:00]}
              - {location: Local}
              - {location: "../../etc/passwd"}
        """))
    digit_three, fullwidth_2026 = "'\u0663'", "'\uff12\uff10\uff12\uff16'"
    day = "is not a day of the month (1 to 31, or -1 for the last to -31) or a range like \"1:8\""
    month = "is not a month (january or jan, or 1 to 12) or range like \"january:march\""
    year = "is not a year (1 to 9999) or a range like \"2026:2027\""
    sexagesimal = "; YAML reads an unquoted 1:8 as the number 68: put ranges in quotes"
    where = "test.yaml:6: routing.time_intervals.holidays[0]"
    assert found == [
        f"{where}.days_of_month[0]: 32 {day}",
        f"{where}.days_of_month[1]: 0 {day}",
        f"{where}.days_of_month[2]: '1-8' {day}",
        f"{where}.days_of_month[3]: 68 {day}{sexagesimal}",
        f"{where}.days_of_month[4]: '8:1' is empty in every month",
        f"{where}.days_of_month[5]: '-1:1' is empty in every month",
        f"{where}.days_of_month[6]: {digit_three} {day}",
        f"{where}.days_of_month[7]: True {day}",
        f"test.yaml:7: routing.time_intervals.holidays[0].months[0]: 'febuary' {month}",
        f"test.yaml:7: routing.time_intervals.holidays[0].months[1]: 13 {month}",
        f"test.yaml:7: routing.time_intervals.holidays[0].months[2]: 63 {month}{sexagesimal}",
        f"test.yaml:7: routing.time_intervals.holidays[0].months[3]: 'ma' {month}",
        ("test.yaml:8: routing.time_intervals.holidays[0].years[0]: '2027:2026': end year 2026 is before"
         " start year 2027"),
        f"test.yaml:8: routing.time_intervals.holidays[0].years[1]: 0 {year}",
        f"test.yaml:8: routing.time_intervals.holidays[0].years[2]: {fullwidth_2026} {year}",
        f"test.yaml:8: routing.time_intervals.holidays[0].years[3]: 10000 {year}",
        ("test.yaml:9: routing.time_intervals.holidays[0].location: unknown time zone 'Mars/Olympus'"
         " (expected a name like Europe/Moscow)"),
        "test.yaml:10: routing.time_intervals.holidays[0].day_of_month: unknown key; did you mean 'days_of_month'?",
        "test.yaml:11: routing.time_intervals.holidays[0].weekdays[0]: 'monkey' is not a weekday or range like mon-fri",
        "test.yaml:11: routing.time_intervals.holidays[0].weekdays[1]: 'mo' is not a weekday or range like mon-fri",
        "test.yaml:12: routing.time_intervals.holidays[1].times[1]: '10:00-10:00' is an empty range",
        "test.yaml:12: routing.time_intervals.holidays[1].times[2]: '00:00-00:00' is an empty range",
        ("test.yaml:12: routing.time_intervals.holidays[1].times[3]: '24:00-06:00' is not a time range"
         " like \"09:00-18:00\""),
        ("test.yaml:12: routing.time_intervals.holidays[1].times[4]: '18:00-24:30' is not a time range"
         " like \"09:00-18:00\""),
        "test.yaml:12: routing.time_intervals.holidays[1].times[5]: write time ranges in quotes, like \"09:00-18:00\"",
        ("test.yaml:13: routing.time_intervals.holidays[2].location: unknown time zone 'Local'"
         " (expected a name like Europe/Moscow)"),
        ("test.yaml:14: routing.time_intervals.holidays[3].location: unknown time zone '../../etc/passwd'"
         " (expected a name like Europe/Moscow)"),
    ]


@pytest.mark.parametrize("spec, parts", [
    ("{days_of_month: [31], months: [february]}", "days_of_month, months"),
    ("{days_of_month: [31], months: [february, april]}", "days_of_month, months"),
    ("{days_of_month: [29], months: [february], years: ['2025:2027']}", "days_of_month, months, years"),
    ("{days_of_month: [29], months: [february], years: [2100]}", "days_of_month, months, years"),
    ("{days_of_month: [1], months: [january], years: [2026], weekdays: [mon]}",
     "weekdays, days_of_month, months, years"),
])
def test_an_interval_no_date_can_match_is_refused(spec, parts):
    assert problems(config_text(f"\n      - {spec}")) == [
        f"test.yaml:7: routing.time_intervals.x[0]: never matches: no date has all of its {parts}"]


@pytest.mark.parametrize("spec", [
    "{days_of_month: [29], months: [february]}",  # leap years
    "{days_of_month: [29], months: [february], years: ['2025:2028']}",
    "{days_of_month: [29], months: [february], years: [2000]}",
    "{days_of_month: [31], months: [january, february]}",
    "{days_of_month: [1], months: [january], years: [2026], weekdays: [thu]}",
    "{days_of_month: [13], weekdays: [fri]}",
    "{years: [2020]}",  # years already past still load: loading never depends on today's date
])
def test_an_interval_some_date_matches_loads(spec):
    assert parse_config(config_text(f"\n      - {spec}")).policy.time_intervals["x"]


def test_refusing_an_impossible_interval_is_quick_even_over_many_years():
    started = time.perf_counter()
    problems(config_text("[{days_of_month: [30], months: [february], years: ['1:9999', '5:5000', 2026]}]"))
    assert time.perf_counter() - started < 0.5


def test_an_impossible_interval_repeated_by_alias_is_judged_once_and_refused_at_each_place():
    # YAML aliases make 1,000 copies of one interval cheap to write; each copy took ~18 ms to
    # refuse (18 s for the file). Judged once per distinct interval, the file is refused at once.
    copies = "".join("\n      - *feb30" for _ in range(999))
    text = config_text("\n      - &feb30 {days_of_month: [30], months: [february]}" + copies)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        parse_config(text, "test.yaml")
    elapsed = time.perf_counter() - started
    assert error.value.count == 1000
    assert [str(p) for p in error.value.problems[:2]] == [
        "test.yaml:7: routing.time_intervals.x[0]: never matches: no date has all of its days_of_month, months",
        # an alias is the anchored node, so it carries the anchor's line; its path tells them apart
        "test.yaml:7: routing.time_intervals.x[1]: never matches: no date has all of its days_of_month, months"]
    assert elapsed < 5.0  # generous: the point is the result above; this only catches the old 18 s


def test_distinct_impossible_intervals_are_each_judged_quickly():
    distinct = "".join(f"\n      - {{days_of_month: [30], months: [february], years: ['{year}:{year + 9000}']}}"
                       for year in range(1, 201))
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        parse_config(config_text(distinct), "test.yaml")
    assert error.value.count == 200
    assert time.perf_counter() - started < 2.0  # ~0.25 s; each took ~19 ms before (3.8 s)
