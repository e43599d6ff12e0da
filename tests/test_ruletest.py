"""`agi-bitrix test` and `agi-bitrix route --record`: rule checks an admin can run in CI."""

import json
import textwrap

import pytest

from agi_bitrix.checking import ConfigError
from agi_bitrix.ruletest import load_cases, report, run_cases
from tests.test_cli import ROOT, SHIPPED, agi_bitrix, agi_bitrix_async

CASES = ROOT / "config" / "agi-bitrix-cases.yaml"


def test_shipped_example_cases_pass():
    result = agi_bitrix("test", "-c", str(SHIPPED), str(CASES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "6 cases, 0 failed"


def test_a_mismatch_fails_with_file_line_and_both_values(tmp_path):
    cases = tmp_path / "cases.yaml"
    cases.write_text(textwrap.dedent("""\
        cases:
          - name: on a break
            caller: "89262345678"
            crm:
              - {CRM_ENTITY_TYPE: CONTACT, CRM_ENTITY_ID: 1,
                 ASSIGNED_BY: {ID: "2", TIMEMAN_STATUS: PAUSED, USER_PHONE_INNER: "102"}}
            expect: {route: extension, target: "102"}
          - name: fine
            caller: "89990001122"
            crm: []
            expect: {target: support}
        """))
    result = agi_bitrix("test", "-c", str(SHIPPED), str(cases))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        (f"FAIL  on a break ({cases}:2): route='extension' got 'queue', target='102' got 'support';"
        " routed queue support (rule owner-on-break)"),
        "PASS  fine: queue support (rule fallback)",
        "2 cases, 1 failed",
    ]


def test_time_of_day_cases(tmp_path):
    config_file = tmp_path / "rules.yaml"
    config_file.write_text(textwrap.dedent("""\
        bitrix: {webhook_url: "https://p.example/rest/1/x/"}
        routing:
          fallback_queue: support
          timezone: Europe/Moscow
          time_intervals:
            office: [{weekdays: [mon-fri], times: ["09:00-18:00"]}]
          rules:
            - {name: night, match: {outside: [office]}, route: {queue: night}}
        """))
    cases = tmp_path / "cases.yaml"
    cases.write_text(textwrap.dedent("""\
        cases:
          - {name: day, caller: "89990001122", crm: [], time: "2026-11-26 12:00", expect: {target: support}}
          - {name: night, caller: "89990001122", crm: [], time: "2026-11-26 23:00", expect: {target: night}}
          - {name: utc given, caller: "89990001122", crm: [], time: "2026-11-26T12:00+00:00", expect: {target: support}}
        """))
    assert agi_bitrix("test", "-c", str(config_file), str(cases)).returncode == 0


def case_problems(cases, text):
    """The problems `load_cases` names in a cases file with `text`, as printed."""
    from agi_bitrix.config import load_config

    cases.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as error:
        load_cases(cases, load_config(SHIPPED, environ={}))
    return [str(p) for p in error.value.problems]


def test_broken_cases_file_names_every_problem(tmp_path):
    cases = tmp_path / "cases.yaml"
    problems = case_problems(cases, """\
        cases:
          - name: a
            caller: "89161234567"
            crm: []
            crm_error: timeout
            expect: {rout: queue}
          - caller: "89161234567"
            crm: "not a list"
            time: yesterday
            expect: {}
            colour: blue
        """)
    assert problems == [
        f"{cases}:4: cases[0].crm: give exactly one of crm (the answer inline), crm_file (recorded) or crm_error",
        (f"{cases}:6: cases[0].expect: 'rout' is not a variable; expected one of: status, route, target, queue,"
        " extension, mobile, work_phone, personal_phone, user_id, entity_type, entity_id, timeman, phone, rule,"
        " error, cache, name"),
        f"{cases}:8: cases[1].crm: not an answer of searchCrmEntities: result is str, expected a list",
        f"{cases}:9: cases[1].time: 'yesterday' is not a time like \"2026-11-26 12:00\"",
        (f"{cases}:10: cases[1].expect: expected a mapping of variables to values, e.g."
         f" {{route: queue, target: support}}"),
        (f"{cases}:11: cases[1].colour: unknown key; expected one of: name, caller, did, time, crm,"
         " crm_file, crm_error, expect"),
    ]
    assert agi_bitrix("test", "-c", str(SHIPPED), str(cases)).returncode == 2


async def test_recorded_answer_replays_as_a_case(portal, tmp_path):
    recorded = tmp_path / "pavel.json"
    result = await agi_bitrix_async("route", "-c", str(SHIPPED), "89201112233", "--record", str(recorded),
                                    env={"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
    assert result.returncode == 0, result.stderr
    assert f"recorded the portal's answer to {recorded}" in result.stdout
    saved = json.loads(recorded.read_text())
    assert saved["phone"] == "79201112233" and saved["result"][0]["CRM_ENTITY_TYPE"] == "LEAD"
    assert "emulator-secret" not in recorded.read_text()
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n  - {name: recorded, caller: '89201112233', crm_file: pavel.json,"
                     " expect: {target: '108', entity_type: LEAD}}\n")
    replay = agi_bitrix("test", "-c", str(SHIPPED), str(cases))
    assert replay.returncode == 0, replay.stdout + replay.stderr


async def test_nothing_is_recorded_when_the_portal_fails(portal, tmp_path):
    portal.fail("html", status=502)
    recorded = tmp_path / "x.json"
    result = await agi_bitrix_async("route", "-c", str(SHIPPED), "89201112233", "--record", str(recorded),
                                    env={"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
    assert "nothing recorded: the portal gave no answer (ERROR)" in result.stdout
    assert not recorded.exists()


async def test_run_cases_directly():
    from agi_bitrix.config import load_config

    config = load_config(SHIPPED, environ={})
    outcomes = await run_cases(load_cases(CASES, config), config)
    assert all(o.passed for o in outcomes)
    assert report(outcomes, "x").endswith("6 cases, 0 failed")


def test_an_unknown_key_in_a_case_gets_a_did_you_mean(tmp_path):
    cases = tmp_path / "cases.yaml"
    problems = case_problems(cases, """\
        cases:
          - {name: typo, caller: "84957654321", crm: [],
             expct: {target: support}}
        """)
    assert problems == [
        (f"{cases}:2: cases[0].expect: expected a mapping of variables to values, e.g."
         f" {{route: queue, target: support}}"),
        f"{cases}:3: cases[0].expct: unknown key; did you mean 'expect'?",
    ]


def test_a_cases_file_that_is_not_utf8_is_a_problem_not_a_crash(tmp_path):
    from agi_bitrix.config import load_config

    cases = tmp_path / "cases.yaml"
    cases.write_bytes(b"cases: [{name: \xe9}]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_cases(cases, load_config(SHIPPED, environ={}))
