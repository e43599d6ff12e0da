"""The routing decision as a pure function: every branch of the default policy and each rule feature."""

import textwrap
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agi_bitrix.bitrix.models import CrmEntity, Owner, parse_search_result
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import load_config, parse_config
from agi_bitrix.routing.engine import (
    CallInfo,
    CrmAnswer,
    Decision,
    OwnerPhones,
    RuleTrace,
    decide,
    owner_phones,
)
from agi_bitrix.routing.variables import NAMES, channel_variables
from agi_bitrix.testing.sample_data import SAMPLE_CALLS, SAMPLE_CRM, SAMPLE_USERS

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "agi-bitrix.yaml"
POLICY = load_config(SHIPPED, environ={}).policy
NOON = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)  # Thursday 12:00 in Moscow


def entity(entity_type="CONTACT", entity_id=1, user="1", timeman="OPENED", inner="101", mobile="79161110101",
           work="", personal=""):
    return {"CRM_ENTITY_TYPE": entity_type, "CRM_ENTITY_ID": entity_id, "ASSIGNED_BY_ID": int(user),
            "ASSIGNED_BY": {"ID": user, "TIMEMAN_STATUS": timeman, "USER_PHONE_INNER": inner,
                            "WORK_PHONE": work, "PERSONAL_PHONE": personal, "PERSONAL_MOBILE": mobile}}


def found(*entities):
    return CrmAnswer("FOUND", tuple(parse_search_result(list(entities))))


def route(answer, policy=POLICY, phone="79161234567", did="74950000000", now=NOON):
    d = decide(CallInfo(phone, did), answer, policy, now)
    return d.route, d.target, d.rule


@pytest.mark.parametrize("timeman, inner, mobile, expected", [
    ("PAUSED", "101", "79161110101", ("queue", "support", "owner-on-break")),
    ("OPENED", "101", "79161110101", ("extension", "101", "owner-at-work")),
    ("OPENED", "", "79161110101", ("mobile", "79161110101", "owner-at-work")),
    ("OPENED", None, None, ("queue", "support", "owner-at-work")),
    ("UNAVAILABLE", "105", "", ("extension", "105", "owner-at-work")),
    ("NOT_INSTALLED", "106", "", ("extension", "106", "owner-at-work")),
    ("", "107", "", ("extension", "107", "owner-at-work")),
    (None, "107", "", ("extension", "107", "owner-at-work")),
    ("CLOSED", "103", "+7 (903) 555-12-34", ("mobile", "79035551234", "owner-day-over")),
    ("CLOSED", "103", "", ("queue", "support", "owner-day-over")),
    ("EXPIRED", "112", "8 905 765-43-21", ("mobile", "79057654321", "owner-day-over")),
    ("EXPIRED", "112", None, ("queue", "support", "owner-day-over")),
    ("SOMETHING_NEW", "101", "79161110101", ("queue", "support", "fallback")),
])
def test_default_policy_branches(timeman, inner, mobile, expected):
    assert route(found(entity(timeman=timeman, inner=inner, mobile=mobile))) == expected


@pytest.mark.parametrize("answer", [CrmAnswer("NOT_FOUND"), CrmAnswer("NO_CALLERID"),
                                    CrmAnswer("ERROR", error="timeout")])
def test_no_crm_object_goes_to_the_fallback_queue(answer):
    decision = decide(CallInfo(None), answer, POLICY, NOON)
    assert (decision.route, decision.target, decision.rule) == ("queue", "support", "fallback")
    assert decision.status == answer.status and decision.error == answer.error


def test_missing_timeman_key_counts_as_not_in_use():
    raw = entity()
    del raw["ASSIGNED_BY"]["TIMEMAN_STATUS"]
    assert route(found(raw)) == ("extension", "101", "owner-at-work")


@pytest.mark.parametrize("sample", SAMPLE_CALLS, ids=lambda s: s.phone)
def test_sample_crm_routes_as_the_demo_promises(sample):
    entities = SAMPLE_CRM.get(sample.phone)
    answer = found(*entities) if entities else CrmAnswer("NOT_FOUND")
    # The demo's user directory (on by default) knows who is deactivated.
    inactive = frozenset(uid for uid, user in SAMPLE_USERS.items() if user.get("ACTIVE") is False)
    d = decide(CallInfo(sample.phone, "74950000000"), answer, POLICY, NOON, inactive)
    assert (d.route, d.target) == (sample.route, sample.target)


def test_first_object_decides_by_default():
    answer = found(entity("LEAD", 5, user="8", inner="108"), entity("CONTACT", 6, user="1", inner="101"))
    d = decide(CallInfo("79201112233"), answer, POLICY, NOON)
    assert (d.target, d.entity.entity_type, d.entity.owner.user_id) == ("108", "LEAD", "8")


@pytest.mark.parametrize("hostile", ["120&Local/666@evil", "101,30,D(1)", "101\nEXEC Dial x", "1 01", '"101"'])
def test_hostile_extension_is_never_a_target(hostile):
    d = decide(CallInfo("79161234567"), found(entity(inner=hostile, mobile="")), POLICY, NOON)
    assert (d.route, d.target) == ("queue", "support")
    variables = channel_variables(d)
    assert variables["B24_EXTENSION"] == "" and variables["B24_TARGET"] == "support"


def test_hostile_mobile_falls_back_to_the_next_target():
    d = decide(CallInfo("1"), found(entity(timeman="CLOSED", mobile='+7916\nEXEC Dial "SIP/x"')), POLICY, NOON)
    assert (d.route, d.target) == ("queue", "support")


def policy_text(rules: str, intervals: str = "") -> str:
    """A config of `rules` (a YAML list), the fallback queue `support` and `intervals` (YAML under routing)."""
    return textwrap.dedent("""\
        bitrix: {webhook_url: "https://p.example/rest/1/x/"}
        routing:
          fallback_queue: support
          timezone: Europe/Moscow
        """) + intervals + "  rules:\n" + textwrap.indent(textwrap.dedent(rules), "    ")


BUSINESS_HOURS_AND_NIGHTS = """\
  time_intervals:
    business-hours:
      - weekdays: [mon-fri]
        times: ["09:00-18:00"]
    nights: [{times: ["22:00-06:00"]}]
"""


def policy(rules: str, extra: str = ""):
    return parse_config(policy_text(rules, BUSINESS_HOURS_AND_NIGHTS) + extra).policy


VIP = policy("""\
    - name: vip-after-hours
      match: {owner: [42], caller_regex: "7916.*", outside: [business-hours]}
      route: [mobile]
    - name: sales-did
      match: {did: ["74951112233"]}
      route: {queue: sales}
    - name: contact-before-lead
      objects: all
      prefer: [CONTACT, LEAD]
      match: {entity_type: [CONTACT, LEAD], timeman: [OPENED], has: [extension]}
      route: [extension]
    - name: anyone-with-work-phone
      objects: all
      route: [work_phone, personal_phone]
    - name: night-desk
      match: {during: [nights]}
      route: [{extension: "500"}]
    - name: hotline
      match: {status: [ERROR, NOT_FOUND]}
      route: [{number: "8 800 555-35-35"}]
""")


def at(local: str) -> datetime:
    """A Moscow wall-clock time on Thursday 26 or Saturday 28 November 2026."""
    day, clock = local.split()
    hour, minute = map(int, clock.split(":"))
    return datetime(2026, 11, {"thu": 26, "sat": 28}[day], hour, minute, tzinfo=ZoneInfo("Europe/Moscow"))


def test_vip_owner_goes_to_mobile_out_of_hours_only():
    vip = found(entity(user="42", mobile="79260004242", inner="142"))
    assert route(vip, VIP, now=at("thu 20:00")) == ("mobile", "79260004242", "vip-after-hours")
    assert route(vip, VIP, now=at("sat 11:00")) == ("mobile", "79260004242", "vip-after-hours")
    assert route(vip, VIP, now=at("thu 12:00"))[2] == "contact-before-lead"
    assert route(vip, VIP, phone="74990000000", now=at("thu 20:00"))[2] == "contact-before-lead"
    other = found(entity(user="7", mobile="79260007777"))
    assert route(other, VIP, now=at("thu 20:00"))[2] == "contact-before-lead"


def test_vip_rule_without_a_mobile_lets_the_next_rule_decide():
    d = decide(CallInfo("79161234567", "1"), found(entity(user="42", mobile="")), VIP, at("thu 20:00"))
    assert d.rule == "contact-before-lead"
    assert d.trace[0].reason.endswith("nothing to dial (owner's mobile unavailable)")


def test_did_rule_applies_even_when_the_portal_fails():
    for answer in (CrmAnswer("ERROR", error="timeout"), CrmAnswer("NOT_FOUND"), found(entity(user="3"))):
        assert route(answer, VIP, did="74951112233") == ("queue", "sales", "sales-did")


def test_preferred_entity_type_picks_a_later_object():
    answer = found(entity("COMPANY", 1, user="5", inner="105"), entity("LEAD", 2, user="6", inner="106"),
                   entity("CONTACT", 3, user="7", inner="107"))
    d = decide(CallInfo("79161234567", "1"), answer, VIP, at("thu 12:00"))
    assert (d.route, d.target, d.rule, d.entity.entity_id) == ("extension", "107", "contact-before-lead", "3")


def test_all_objects_skips_owners_on_a_break_or_without_extension():
    answer = found(entity("CONTACT", 1, user="5", timeman="PAUSED", inner="105"),
                   entity("CONTACT", 2, user="6", inner=""),
                   entity("LEAD", 3, user="7", inner="107"))
    d = decide(CallInfo("79161234567", "1"), answer, VIP, at("thu 12:00"))
    assert (d.target, d.entity.entity_id) == ("107", "3")
    assert "CONTACT 1: TIMEMAN_STATUS PAUSED not in" in d.trace[2].reason
    assert "CONTACT 2: owner has no usable extension" in d.trace[2].reason


def test_other_owner_phones_in_the_rule_order():
    answer = found(entity(timeman="CLOSED", inner="", mobile="", work="", personal="+7 916 000-11-22"),
                   entity(timeman="CLOSED", inner="", mobile="", work="84951230000"))
    assert route(answer, VIP, now=at("thu 12:00")) == ("mobile", "79160001122", "anyone-with-work-phone")


def test_time_interval_over_midnight_and_fixed_extension():
    nobody = found(entity(timeman="CLOSED", inner="", mobile=""))
    assert route(nobody, VIP, now=at("thu 23:30")) == ("extension", "500", "night-desk")
    assert route(nobody, VIP, now=at("thu 05:59")) == ("extension", "500", "night-desk")
    assert route(nobody, VIP, now=at("thu 06:00")) == ("queue", "support", "fallback")


def test_fixed_number_for_errors():
    assert route(CrmAnswer("ERROR", error="http_502"), VIP, now=at("thu 12:00")) == ("mobile", "78005553535", "hotline")


def test_trace_explains_every_rule_tried():
    d = decide(CallInfo("79161234567", "1"), CrmAnswer("NOT_FOUND"), VIP, at("thu 12:00"))
    reasons = [(t.rule, t.decided) for t in d.trace]
    assert reasons == [("vip-after-hours", False), ("sales-did", False), ("contact-before-lead", False),
                       ("anyone-with-work-phone", False), ("night-desk", False), ("hotline", True)]


def test_every_variable_is_always_set():
    for answer in (CrmAnswer("NO_CALLERID"), CrmAnswer("ERROR", error="QUERY_LIMIT_EXCEEDED"), found(entity())):
        variables = channel_variables(decide(CallInfo(None), answer, POLICY, NOON), "PFX_")
        assert list(variables) == ["PFX_" + name for name in NAMES]


def test_variables_for_a_found_call():
    crm_object = {**entity(entity_id=12, user="1", work="+7 495 123-00-03"), "NAME": "Romashka LLC"}
    d = decide(CallInfo("79161234567"), found(crm_object), POLICY, NOON)
    assert channel_variables(d) == {
        "B24_STATUS": "FOUND", "B24_ROUTE": "extension", "B24_TARGET": "101", "B24_QUEUE": "support",
        "B24_EXTENSION": "101", "B24_MOBILE": "79161110101", "B24_WORK_PHONE": "74951230003",
        "B24_PERSONAL_PHONE": "", "B24_USER_ID": "1", "B24_ENTITY_TYPE": "CONTACT", "B24_ENTITY_ID": "12",
        "B24_TIMEMAN": "OPENED", "B24_PHONE": "79161234567", "B24_RULE": "owner-at-work", "B24_ERROR": "",
        "B24_CACHE": "", "B24_NAME": "Romashka LLC",
    }


@pytest.mark.parametrize("name, shown", [
    ("Romashka LLC", "Romashka LLC"),
    ("  Жанна \t Щукина \n ", "Жанна Щукина"),
    # Quotes, commas, semicolons, backslashes and what the dialplan would evaluate are dropped.
    ('Фирма "Ромашка", \'Ltd\'; a\\b', "Фирма Ромашка Ltd ab"),
    ("${SHELL(rm -rf /)}", "SHELL(rm -rf /)"),
    ("Anna\nEXEC Dial SIP/x", "Anna EXEC Dial SIP/x"),
    ("😀\u200d😀 ☎ Anna", "Anna"),
    ("A & B (Moscow) #2 / +7", "A & B (Moscow) #2 / +7"),
    ("", ""),
    ("\",;$", ""),
    ("x" * 10_000, "x" * 40),
    # 40 letters, each with its combining mark kept: never a letter cut from its accent.
    ("й" * 45, "й" * 40),
    ("e\u0301" * 45, "e\u0301" * 40),
    ("\u0301\u0301 Anna", "Anna"),  # marks without a letter before them
])
def test_the_clients_name_is_only_what_a_phone_display_may_show(name, shown):
    d = decide(CallInfo("79161234567"), found({**entity(), "NAME": name}), POLICY, NOON)
    assert channel_variables(d)["B24_NAME"] == shown


def test_no_crm_object_no_name():
    assert channel_variables(decide(CallInfo("79161234567"), CrmAnswer("NOT_FOUND"), POLICY, NOON))["B24_NAME"] == ""


def test_hostile_crm_text_never_reaches_variables():
    raw = entity(timeman='OPENED"\nEXEC Dial x', user="1")
    raw["CRM_ENTITY_TYPE"] = "CONTACT,B24_ROUTE=evil"
    raw["ASSIGNED_BY"]["ID"] = "1&2"
    d = decide(CallInfo("79161234567"), found(raw), POLICY, NOON)
    variables = channel_variables(d)
    assert variables["B24_TIMEMAN"] == "" and variables["B24_ENTITY_TYPE"] == "" and variables["B24_USER_ID"] == ""
    error = channel_variables(decide(CallInfo(None), CrmAnswer("ERROR", error="bad code\n,x"), POLICY, NOON))
    assert error["B24_ERROR"] == "portal_error"


@pytest.mark.parametrize("service_number", ["112", "911", "01", "103", "0911", "+7 112", "8 800"])
def test_a_service_or_short_number_is_never_an_owners_phone_to_dial(service_number):
    answer = found(entity(timeman="CLOSED", mobile=service_number, work=service_number, personal=service_number))
    decision = decide(CallInfo("79161234567", "74950000000"), answer, VIP, NOON)
    assert (decision.route, decision.target) == ("queue", "support")
    assert decision.owner_phones.mobile == decision.owner_phones.work_phone == ""
    assert channel_variables(decision)["B24_MOBILE"] == ""


def test_a_fixed_number_target_must_be_a_subscriber_number_while_matching_stays_lenient():
    def problems(number):
        text = textwrap.dedent(f"""\
            bitrix: {{webhook_url: "https://p.example/rest/1/x/"}}
            routing:
              fallback_queue: support
              rules:
                - name: short
                  match: {{did: ["112"], caller: ["0911"]}}
                  route: [{{number: "{number}"}}]
            """)
        try:
            parse_config(text, "test.yaml")
        except ConfigError as error:
            return [str(problem) for problem in error.problems]
        return []

    assert problems("8 800 555-35-35") == [] and problems("+44 20 7946 0958") == []
    assert problems("112") == [
        ("test.yaml:7: routing.rules[short].route[0]: '112' is not a valid subscriber number in RU or in"
        " international form (service and short numbers cannot be dial targets)")]
    assert problems("911") and problems("01") and problems("7495")


# -- every condition shown to decide and shown not to; every target kind ------------------------

ANNA = CrmEntity("CONTACT", "12", Owner("5", "OPENED", inner_phone="105", personal_mobile="79161110105",
                                        work_phone="74951110105", personal_phone="79031110105"))
LEAD = CrmEntity("LEAD", "7", Owner("6", "CLOSED", inner_phone="106", personal_mobile="79161110106"))
NO_OWNER = CrmEntity("COMPANY", "3", None)
SPLIT_DAY = """\
  time_intervals:
    split-day: [{times: ["09:00-13:00"]}, {times: ["14:00-18:00"]}]  # two intervals under one name
"""


def one_rule(rule: str, intervals: str = ""):
    """A policy of one rule (named "r") and the fallback queue `support`."""
    return parse_config(policy_text(rule, intervals)).policy


def decided(match: str, *entities, phone="79161234567", did="74951112233", now="thu 12:00", inactive=frozenset()):
    policy = one_rule(f"- name: r\n  match: {match}\n  route: [{{queue: sales}}]\n", SPLIT_DAY)
    answer = CrmAnswer("FOUND", entities) if entities else CrmAnswer("NOT_FOUND")
    decision = decide(CallInfo(phone, did), answer, policy, at(now), frozenset(inactive))
    return decision.rule == "r"


@pytest.mark.parametrize("match, call, entities, decides", [
    # status
    ("{status: [FOUND]}", {}, (ANNA,), True),
    ("{status: [FOUND]}", {}, (), False),
    # did: the list, and the regex over the whole DID (not a prefix, not a substring)
    ('{did: ["74951112233"]}', {}, (), True),
    ('{did: ["74951112233"]}', {"did": "74951112234"}, (), False),
    ('{did_regex: "7495111.*"}', {}, (), True),
    ('{did_regex: "7495111"}', {"did": "7495111"}, (), True),
    ('{did_regex: "7495111"}', {"did": "74951112233"}, (), False),
    ('{did_regex: "7495111"}', {"did": "17495111"}, (), False),
    ('{did_regex: "7495111"}', {"did": ""}, (), False),
    # caller: the list, and the regex over the whole number
    ('{caller: ["79161234567"]}', {}, (), True),
    ('{caller: ["79161234567"]}', {"phone": "79161234568"}, (), False),
    ('{caller: ["79161234567"]}', {"phone": None}, (), False),
    ('{caller_regex: "7916123"}', {"phone": "7916123"}, (), True),
    ('{caller_regex: "7916123"}', {"phone": "79161234567"}, (), False),
    ('{caller_regex: "7916123"}', {"phone": "17916123"}, (), False),
    ('{caller_regex: "7916.*"}', {"phone": None}, (), False),
    # during / outside a name of two intervals: any of them counts
    ("{during: [split-day]}", {"now": "thu 10:00"}, (), True),
    ("{during: [split-day]}", {"now": "thu 15:00"}, (), True),
    ("{during: [split-day]}", {"now": "thu 13:30"}, (), False),
    ("{outside: [split-day]}", {"now": "thu 13:30"}, (), True),
    ("{outside: [split-day]}", {"now": "thu 10:00"}, (), False),
    ("{outside: [split-day]}", {"now": "thu 15:00"}, (), False),
    # entity_type, owner, timeman, has: the object decides (the first one, by default)
    ("{entity_type: [CONTACT]}", {}, (ANNA,), True),
    ("{entity_type: [LEAD]}", {}, (ANNA,), False),
    ("{entity_type: [LEAD]}", {}, (ANNA, LEAD), False),  # only the first object is asked
    ("{entity_type: [LEAD]}", {}, (), False),  # no object: a condition on it cannot hold
    ("{owner: [5]}", {}, (ANNA,), True),
    ("{owner: [6]}", {}, (ANNA,), False),
    ("{owner: [5]}", {}, (NO_OWNER,), False),
    ("{timeman: [OPENED]}", {}, (ANNA,), True),
    ("{timeman: [CLOSED]}", {}, (ANNA,), False),
    ('{timeman: [""]}', {}, (NO_OWNER,), True),  # no owner: no time tracking either
    ("{timeman: [OPENED]}", {}, (NO_OWNER,), False),
    ("{has: [extension, mobile, work_phone, personal_phone]}", {}, (ANNA,), True),
    ("{has: [work_phone]}", {}, (LEAD,), False),
    ("{has: [extension]}", {}, (NO_OWNER,), False),
    # a deactivated owner's object decides nothing, not even "no condition"
    ("{timeman: [OPENED]}", {"inactive": {"5"}}, (ANNA,), False),
    ("{timeman: [OPENED]}", {"inactive": {"6"}}, (ANNA,), True),
])
def test_each_condition_decides_and_does_not(match, call, entities, decides):
    assert decided(match, *entities, **call) is decides


def test_objects_all_and_prefer():
    rule = "- name: r\n  objects: all\n  prefer: [LEAD]\n  match: {timeman: [OPENED, CLOSED]}\n  route: [extension]\n"
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (ANNA, LEAD)), one_rule(rule), NOON)
    assert (d.entity, d.target) == (LEAD, "106")
    rule = "- name: r\n  objects: all\n  match: {timeman: [OPENED, CLOSED]}\n  route: [extension]\n"
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (LEAD, ANNA)), one_rule(rule), NOON)
    assert (d.entity, d.target) == (LEAD, "106")  # no prefer: the portal's order
    rule = "- name: r\n  objects: first\n  match: {timeman: [OPENED]}\n  route: [extension]\n"
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (LEAD, ANNA)), one_rule(rule), NOON)
    assert d.rule == "fallback"  # the second object would pass, but only the first is asked


# Every target kind, and what it dials for ANNA; owner phones without an owner are never available.
@pytest.mark.parametrize("route, entities, expected", [
    ("[extension]", (ANNA,), ("extension", "105")),
    ("[mobile]", (ANNA,), ("mobile", "79161110105")),
    ("[work_phone]", (ANNA,), ("mobile", "74951110105")),
    ("[personal_phone]", (ANNA,), ("mobile", "79031110105")),
    ("[{queue: sales}]", (ANNA,), ("queue", "sales")),
    ("[queue]", (ANNA,), ("queue", "support")),
    ('[{extension: "500"}]', (ANNA,), ("extension", "500")),
    ('[{number: "+7 916 000-00-01"}]', (ANNA,), ("mobile", "79160000001")),
    ('[{extension: "500"}, {queue: sales}]', (), ("extension", "500")),  # the first target, no object needed
    ("[extension, {queue: sales}]", (), ("queue", "sales")),  # no object: the owner's phones are missing
    ("[mobile, {queue: sales}]", (NO_OWNER,), ("queue", "sales")),
    ("[work_phone, personal_phone, {queue: sales}]", (NO_OWNER,), ("queue", "sales")),
    ("[extension]", (NO_OWNER,), ("queue", "support")),  # nothing to dial: the rule lets the fallback decide
    ("[mobile]", (), ("queue", "support")),
])
def test_every_target_kind(route, entities, expected):
    policy = one_rule(f"- name: r\n  route: {route}\n")
    answer = CrmAnswer("FOUND", entities) if entities else CrmAnswer("NOT_FOUND")
    d = decide(CallInfo("79161234567"), answer, policy, NOON)
    assert (d.route, d.target) == expected


def test_the_trace_says_why_in_words():
    d = decide(CallInfo(None), CrmAnswer("NOT_FOUND"), VIP, at("thu 12:00"))
    assert [t.reason for t in d.trace] == [
        "caller (none) does not match /7916.*/",
        "DID (none) not in ['74951112233']",
        "no CRM object (status NOT_FOUND)",
        "nothing to dial (owner's work_phone, owner's personal_phone unavailable)",
        "Thu 2026-11-26 12:00 is outside nights",
        "matched; dials number 78005553535",
    ]
    policy = one_rule('- name: r\n  match: {caller_regex: "7916.*", did_regex: "7495.*"}\n  route: [queue]\n')
    d = decide(CallInfo(None, "1"), CrmAnswer("NOT_FOUND"), policy, NOON)
    assert d.trace[0].reason == "DID 1 does not match /7495.*/"
    d = decide(CallInfo(None, "74951"), CrmAnswer("NOT_FOUND"), policy, NOON)
    assert d.trace[0].reason == "caller (none) does not match /7916.*/"
    assert d.trace[1] == RuleTrace("fallback", True, "no rule decided; fallback queue")
    policy = one_rule('- name: r\n  match: {caller: ["79990000000"], entity_type: [LEAD]}\n  route: [queue]\n')
    d = decide(CallInfo(None), CrmAnswer("NOT_FOUND"), policy, NOON)
    assert d.trace[0].reason == "caller (none) not in ['79990000000']"
    d = decide(CallInfo("79990000000"), CrmAnswer("FOUND", (ANNA, LEAD)), policy, NOON)
    assert d.trace[0].reason == "CONTACT 12: type not in ['LEAD']"
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (NO_OWNER,)), one_rule(
        "- name: r\n  objects: all\n  match: {owner: [5], timeman: [OPENED]}\n  route: [queue]\n"), NOON)
    assert d.trace[0].reason == "COMPANY 3: owner (none) not in ['5']"
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (NO_OWNER, ANNA, LEAD)), one_rule(
        "- name: r\n  objects: all\n  match: {timeman: [CLOSED]}\n  route: [mobile]\n"), NOON, frozenset({"6"}))
    assert d.trace[0].reason == ("COMPANY 3: TIMEMAN_STATUS (empty) not in ['CLOSED']; CONTACT 12: TIMEMAN_STATUS"
                                 " OPENED not in ['CLOSED']; LEAD 7: owner 6 is deactivated")


def test_a_decision_names_its_object_and_what_was_passed_over():
    rule = "- name: r\n  objects: all\n  route: [work_phone]\n"
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (LEAD, ANNA)), one_rule(rule), NOON)
    assert d.trace[0] == RuleTrace("r", True, "matched CONTACT 12 (passed over: LEAD 7: nothing to dial"
                                              " (owner's work_phone unavailable)); dials owner's work_phone")
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (ANNA,)), one_rule("- name: r\n  route: [mobile]\n"), NOON)
    assert d.trace[0] == RuleTrace("r", True, "matched CONTACT 12; dials owner's mobile")


def test_the_fallback_keeps_the_first_object_and_the_callers_number():
    d = decide(CallInfo(None), CrmAnswer("FOUND", (LEAD, ANNA)), one_rule(
        "- name: r\n  match: {status: [ERROR]}\n  route: [queue]\n"), NOON)
    assert (d.rule, d.entity, d.phone, d.owner_phones.extension) == ("fallback", LEAD, "", "106")
    d = decide(CallInfo(None), CrmAnswer("FOUND", (LEAD, ANNA)), one_rule("- name: r\n  route: [queue]\n"), NOON)
    assert (d.rule, d.entity, d.phone) == ("r", LEAD, "")


def test_a_deactivated_owner_is_never_named_nor_dialled():
    # In the fallback: the object stays, its owner goes, and the trace says why.
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (ANNA,)), one_rule(
        "- name: r\n  match: {status: [ERROR]}\n  route: [queue]\n"), NOON, frozenset({"5"}))
    assert (d.entity, d.owner_phones) == (CrmEntity("CONTACT", "12", None), OwnerPhones())
    assert d.trace[-1] == RuleTrace("fallback", True,
                                    "no rule decided (the owner of CONTACT 12 is deactivated); fallback queue")
    d = decide(CallInfo("1"), CrmAnswer("FOUND", (ANNA,)), one_rule(
        "- name: r\n  match: {status: [ERROR]}\n  route: [queue]\n"), NOON, frozenset({"6"}))
    assert (d.entity, d.trace[-1].reason) == (ANNA, "no rule decided; fallback queue")
    # In a rule that asks nothing of the object: it decides, without the owner.
    d = decide(CallInfo("1", "74950000000"), CrmAnswer("FOUND", (ANNA, LEAD)), one_rule(
        '- name: r\n  match: {did: ["74950000000"]}\n  route: [{queue: sales}]\n'), NOON, frozenset({"5"}))
    assert (d.rule, d.target, d.entity, d.owner_phones) == ("r", "sales", CrmEntity("CONTACT", "12", None),
                                                            OwnerPhones())


def test_owner_phones_and_a_decision_built_by_hand():
    assert owner_phones(None, "RU") == owner_phones(NO_OWNER, "RU") == OwnerPhones("", "", "", "")
    assert owner_phones(ANNA, "RU") == OwnerPhones("105", "79161110105", "74951110105", "79031110105")
    decision = Decision(status="ERROR", route="queue", target="support", rule="fallback", phone="",
                        fallback_queue="support")
    variables = channel_variables(decision)
    assert (variables["B24_ERROR"], variables["B24_CACHE"], variables["B24_EXTENSION"]) == ("", "", "")
    assert CallInfo("1").did == ""
