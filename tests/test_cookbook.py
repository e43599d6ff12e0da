"""Every recipe in docs/cookbook.md routes the calls it describes as it says (tests/test_docs.py
checks that each is valid config)."""

import asyncio
import re
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agi_bitrix.bitrix.models import parse_search_result
from agi_bitrix.config import parse_config
from agi_bitrix.routing.engine import CallInfo, CrmAnswer, decide
from agi_bitrix.ruletest import load_cases, run_cases
from tests.test_docs import COOKBOOK, WEBHOOK, yaml_blocks

MOSCOW = ZoneInfo("Europe/Moscow")


def recipe(block: str) -> str:
    """A recipe by its first rule's name, as tests/test_docs.py names it."""
    return block.split("name: ")[1].split()[0]


RECIPES = {recipe(block): block for block in yaml_blocks(COOKBOOK)}


def owner(user="1", timeman="OPENED", inner="101", mobile="", entity_type="CONTACT", entity_id=1):
    """One CRM object in searchCrmEntities' shape (see bitrix24-rest-notes.md)."""
    return {"CRM_ENTITY_TYPE": entity_type, "CRM_ENTITY_ID": entity_id, "ASSIGNED_BY_ID": int(user),
            "ASSIGNED_BY": {"ID": user, "TIMEMAN_STATUS": timeman, "USER_PHONE_INNER": inner,
                            "PERSONAL_MOBILE": mobile}}


def found(*objects):
    return CrmAnswer("FOUND", tuple(parse_search_result(list(objects))))


NOBODY = CrmAnswer("NOT_FOUND")
PORTAL_DOWN = CrmAnswer("ERROR", error="connect")

# Per recipe: (what the recipe says, caller, DID, Moscow wall-clock time, the portal's answer,
# expected (route, target, rule)).
OUTCOMES = {
    "closed": [
        ("in hours the owner's desk phone", "79161234567", "", "2026-11-26 12:00", found(owner()),
         ("extension", "101", "owner-at-work")),
        ("out of hours the night queue, whatever the CRM says", "79161234567", "", "2026-11-26 18:00",
         found(owner()), ("queue", "night", "closed")),
        ("Saturday until 15:00", "79161234567", "", "2026-11-28 14:59", found(owner()),
         ("extension", "101", "owner-at-work")),
        ("Saturday after 15:00", "79161234567", "", "2026-11-28 15:00", found(owner()),
         ("queue", "night", "closed")),
        ("Sunday", "79161234567", "", "2026-11-29 12:00", found(owner()), ("queue", "night", "closed")),
        ("owner on a break", "79161234567", "", "2026-11-26 12:00", found(owner(timeman="PAUSED")),
         ("queue", "support", "owner-on-break")),
        ("owner's day over", "79161234567", "", "2026-11-26 12:00",
         found(owner(timeman="CLOSED", mobile="+7 903 555-12-34")), ("mobile", "79035551234", "owner-day-over")),
    ],
    "holiday": [
        ("1-8 January, a weekday", "79161234567", "", "2026-01-05 12:00", found(owner()),
         ("queue", "holiday", "holiday")),
        ("the first minute of the holidays", "79161234567", "", "2026-01-01 00:00", NOBODY,
         ("queue", "holiday", "holiday")),
        ("the last minute of the holidays", "79161234567", "", "2026-01-08 23:59", found(owner()),
         ("queue", "holiday", "holiday")),
        ("the day after", "79161234567", "", "2026-01-09 12:00", found(owner()),
         ("extension", "101", "owner-at-work")),
        ("8 March even on a Sunday: the holiday rule comes first", "79161234567", "", "2026-03-08 12:00",
         found(owner()), ("queue", "holiday", "holiday")),
        ("8 March in another year", "79161234567", "", "2027-03-08 12:00", found(owner()),
         ("queue", "holiday", "holiday")),
        ("9 March is a working day", "79161234567", "", "2027-03-09 12:00", found(owner()),
         ("extension", "101", "owner-at-work")),
        ("11 May 2026 only", "79161234567", "", "2026-05-11 12:00", found(owner()),
         ("queue", "holiday", "holiday")),
        ("11 May 2027 is a working day", "79161234567", "", "2027-05-11 12:00", found(owner()),
         ("extension", "101", "owner-at-work")),
        ("holidays hold when the portal is down", "79161234567", "", "2026-05-01 12:00", PORTAL_DOWN,
         ("queue", "holiday", "holiday")),
        ("a short day before 17:00", "79161234567", "", "2026-12-31 16:59", found(owner()),
         ("extension", "101", "owner-at-work")),
        ("a short day from 17:00", "79161234567", "", "2026-12-31 17:00", found(owner()),
         ("queue", "night", "closed-early")),
        ("30 April from 17:00", "79161234567", "", "2026-04-30 17:30", found(owner()),
         ("queue", "night", "closed-early")),
        ("an ordinary day at 17:00", "79161234567", "", "2026-12-30 17:00", found(owner()),
         ("extension", "101", "owner-at-work")),
    ],
    "vip-after-hours": [
        ("VIP of user 42 out of hours: his mobile", "79161234567", "", "2026-11-26 20:00",
         found(owner(user="42", inner="142", mobile="79160004242")), ("mobile", "79160004242", "vip-after-hours")),
        ("the other listed number", "74957654321", "", "2026-11-26 20:00",
         found(owner(user="42", inner="142", mobile="79160004242")), ("mobile", "79160004242", "vip-after-hours")),
        ("in hours the rule does not hold", "79161234567", "", "2026-11-26 12:00",
         found(owner(user="42", inner="142", mobile="79160004242")), ("queue", "support", "fallback")),
        ("no mobile in Bitrix24: the next rules apply", "79161234567", "", "2026-11-26 20:00",
         found(owner(user="42", inner="142")), ("queue", "support", "fallback")),
        ("another owner's client", "79161234567", "", "2026-11-26 20:00",
         found(owner(user="7", inner="107", mobile="79160000707")), ("queue", "support", "fallback")),
        ("a caller matching the pattern, any time", "79851234567", "", "2026-11-26 12:00",
         found(owner(user="7", inner="107", mobile="79160000707")), ("extension", "107", "vip-any-time")),
    ],
    "sales-line": [
        ("the sales number", "79161234567", "74951112233", "2026-11-26 12:00", NOBODY,
         ("queue", "sales", "sales-line")),
        ("the sales number while the portal is down", "79161234567", "78005553535", "2026-11-26 12:00", PORTAL_DOWN,
         ("queue", "sales", "sales-line")),
        ("the service numbers", "79161234567", "74952220001", "2026-11-26 12:00", PORTAL_DOWN,
         ("queue", "service", "service-line")),
        ("any other number", "79161234567", "74953330000", "2026-11-26 12:00", NOBODY,
         ("queue", "support", "fallback")),
    ],
    "sales-line-known-client": [
        ("a known client's manager at work", "79161234567", "74951112233", "2026-11-26 12:00", found(owner()),
         ("extension", "101", "sales-line-known-client")),
        ("the manager on a break: the sales queue", "79161234567", "74951112233", "2026-11-26 12:00",
         found(owner(timeman="PAUSED")), ("queue", "sales", "sales-line")),
        ("an unknown caller: the sales queue", "79161234567", "74951112233", "2026-11-26 12:00", NOBODY,
         ("queue", "sales", "sales-line")),
    ],
    "contact-owner-first": [
        ("the contact's manager although the portal lists a lead first", "79161234567", "", "2026-11-26 12:00",
         found(owner("5", inner="105", entity_type="LEAD"), owner("6", inner="106")),
         ("extension", "106", "contact-owner-first")),
        ("the contact's manager away: the lead's", "79161234567", "", "2026-11-26 12:00",
         found(owner("5", inner="105", entity_type="LEAD"), owner("6", timeman="CLOSED", inner="106")),
         ("extension", "105", "contact-owner-first")),
        ("everyone's day over: the first with a mobile", "79161234567", "", "2026-11-26 12:00",
         found(owner("5", "CLOSED", "105", "79160000505", entity_type="LEAD"), owner("6", "EXPIRED", "106")),
         ("mobile", "79160000505", "anyone-with-a-mobile")),
    ],
    "anna-mobile-to-desk": [
        ("Anna's mobile", "79161110101", "", "2026-11-26 12:00", NOBODY, ("extension", "101", "anna-mobile-to-desk")),
        ("Igor's mobile", "79162220202", "", "2026-11-26 12:00", NOBODY, ("extension", "102", "igor-mobile-to-desk")),
        ("anyone else", "79163330303", "", "2026-11-26 12:00", NOBODY, ("queue", "support", "fallback")),
    ],
}


def test_every_recipe_has_its_calls():
    assert sorted(RECIPES) == sorted(OUTCOMES)


@pytest.mark.parametrize("name, says, caller, did, time, answer, expected",
                         [pytest.param(name, *case, id=f"{name}: {case[0]}")
                          for name, cases in OUTCOMES.items() for case in cases])
def test_recipe_routes_as_it_says(name, says, caller, did, time, answer, expected):
    policy = parse_config(WEBHOOK + RECIPES[name], "cookbook").policy
    moment = datetime.fromisoformat(time).replace(tzinfo=MOSCOW)
    decision = decide(CallInfo(caller, did), answer, policy, moment)
    assert (decision.route, decision.target, decision.rule) == expected, decision.trace


def test_the_holiday_case_the_cookbook_shows_passes(tmp_path):
    case = re.search(r"`(\{name: new year.*?\})`", COOKBOOK.read_text(encoding="utf-8")).group(1)
    cases = tmp_path / "cases.yaml"
    cases.write_text(f"cases:\n  - {case}\n")
    config = parse_config(WEBHOOK + RECIPES["holiday"], "cookbook")
    outcomes = asyncio.run(run_cases(load_cases(cases, config), config))
    assert [(o.passed, o.actual["rule"]) for o in outcomes] == [(True, "holiday")]
