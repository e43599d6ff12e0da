"""Config files written to hurt: alias bombs, huge files and values, URLs the portal client
refuses, look-alike digits, regexes that backtrack forever. Each is refused at load, quickly,
with a short message; what loads is what `serve` runs."""

import textwrap
import time

import pytest

from agi_bitrix.checking import MAX_FILE_BYTES, ConfigError
from agi_bitrix.config import load_config, parse_config
from tests.test_cli import agi_bitrix

BASE = """\
bitrix:
  webhook_url: https://portal.example/rest/1/secretcode/
routing:
  fallback_queue: support
"""


def problems(text: str, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(textwrap.dedent(text), "test.yaml", environ or {})
    return [str(p) for p in error.value.problems]


def alias_bomb(levels: int) -> str:
    """Each level is a list of nine aliases of the level before: 9**levels values from ~1 KB."""
    lines = ['lol: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]" for n in range(1, levels)]
    # Where the expansion would be quoted: every item of an owner list is checked and reported.
    rule = f"  rules:\n    - {{name: bomb, match: {{owner: *l{levels - 1}}}, route: [queue]}}\n"
    return "\n".join(lines) + "\n" + BASE + rule


# -- YAML that expands, nests or is simply too big --

def test_an_alias_bomb_is_refused_before_it_is_built(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(7))
    assert bomb.stat().st_size < 1000
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        load_config(bomb, environ={})
    assert time.monotonic() - started < 1.0
    assert [str(p) for p in error.value.problems] == [
        f"{bomb}: more than 1,000,000 values once YAML aliases (*name) are expanded"]
    result = agi_bitrix("check", "-c", str(bomb))
    assert result.returncode == 2
    assert len(result.stdout + result.stderr) < 500, result.stderr[:1000]


def test_aliases_an_admin_uses_still_load():
    config = parse_config(BASE + (
        "  time_intervals:\n"
        '    office: &office [{weekdays: [mon-fri], times: ["09:00-18:00"]}]\n'
        "    also-office: *office\n"
        "  rules: [{name: a, match: {during: [also-office]}, route: [queue]}]\n"))
    assert config.policy.time_intervals["also-office"] == config.policy.time_intervals["office"]


def test_an_alias_inside_its_own_anchor_is_refused():
    assert problems(BASE + "  rules: &loop [*loop]\n") == [
        "test.yaml:5: an alias refers to the anchor it stands in"]


def test_nesting_deeper_than_the_parser_can_follow_is_refused():
    assert problems(BASE + "  rules: " + "[" * 5000 + "]" * 5000 + "\n") == [
        "test.yaml:5: nested deeper than 100 levels"]


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "#" * MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(big, environ={})
    assert [str(p) for p in error.value.problems] == [f"{big}: larger than 4 MiB; refused unread"]


def test_a_cases_file_over_the_size_limit_is_refused(tmp_path):
    config = tmp_path / "agi-bitrix.yaml"
    config.write_text(BASE)
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases: []\n" + "#" * MAX_FILE_BYTES + "\n")
    result = agi_bitrix("test", "-c", str(config), str(cases))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{cases}: larger than 4 MiB; refused unread"]


def test_quoted_values_are_cut_and_long_keys_too():
    found = problems(BASE.replace("support", "q" * 100_000) + "? " + "z" * 100_000 + "\n: 1\n")
    assert found == [
        "test.yaml:4: routing.fallback_queue: '" + "q" * 79 + "… must be letters, digits, '_', '.', '-'",
        "test.yaml:5: " + "z" * 160 + "…: unknown key; expected one of: server, bitrix, phones, variables,"
        " routing, cache, metrics, call_log, callcard, users",
    ]


def test_a_big_value_is_quoted_in_brief():
    found = problems(BASE + "  rules: [{name: x, route: [{queue: [" + ", ".join(["abc"] * 10_000) + "]}]}]\n")
    assert found == [("test.yaml:5: routing.rules[x].route[0]: queue name ['abc', 'abc', 'abc', 'abc', 'abc', 'abc',"
                     " 'abc', 'abc', ...] must be letters, digits, '_', '.', '-'")]


def test_at_most_a_hundred_problems_are_shown_and_all_are_counted(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "  rules:\n    - name: x\n      route: [queue]\n      match:\n        owner:\n"
                   + "".join(f"          - bad{n}\n" for n in range(150)))
    with pytest.raises(ConfigError) as error:
        load_config(bad, environ={})
    shown = [str(p) for p in error.value.problems]
    assert error.value.count == 150 and len(shown) == 101
    assert shown[0] == f"{bad}:10: routing.rules[x].match.owner[0]: 'bad0' is not a Bitrix24 user id (a number)"
    assert shown[-1] == f"{bad}: 50 more problem(s) not shown"
    result = agi_bitrix("check", "-c", str(bad))
    assert result.stderr.splitlines()[-1] == f"{bad}: 150 problem(s); nothing was started"
