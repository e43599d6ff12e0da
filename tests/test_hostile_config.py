"""Config files written to hurt: alias bombs, huge files and values, URLs the portal client
refuses, look-alike digits, regexes that backtrack forever. Each is refused at load, quickly,
with a short message; what loads is what `serve` runs."""

import asyncio
import textwrap
import time

import pytest

from agi_bitrix.agi.protocol import AgiRequest
from agi_bitrix.app import Application
from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.settings import REST_BASE_SHAPE, WEBHOOK_SHAPE
from agi_bitrix.bitrix.users import parse_user
from agi_bitrix.callcard.register import register_arguments
from agi_bitrix.checking import MAX_FILE_BYTES, ConfigError
from agi_bitrix.config import load_config, parse_config
from agi_bitrix.phones import normalize_number
from agi_bitrix.routing.engine import CallInfo
from agi_bitrix.service import call_info
from agi_bitrix.testing.fake_asterisk import fake_call
from tests.conftest import ample_budget
from tests.test_cli import agi_bitrix
from tests.test_config import BASE, problems


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
        " routing, cache, http, call_log, callcard, users, clicktocall, callback, redis, events, ami, lines",
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


# -- webhook and portal URLs: one check for `check`, `serve`, reload and `route` --

SECRET = "s3cr3tc0de"
BAD_HOST_NAME = "the host name is not valid (a part between dots is empty or over 63 characters)"
# Each URL, and what is wrong with it, as `check` says it.
BAD_WEBHOOKS = [
    (f"https://x.bitrix24.ru/rest/1/{SECRET}/profile.json", WEBHOOK_SHAPE),
    (f"https://x.bitrix24.ru/rest/1/{SECRET}/?x=1", WEBHOOK_SHAPE),
    (f"https://x.bitrix24.ru/rest/1/{SECRET}/#frag", WEBHOOK_SHAPE),
    (f"https://x.bitrix24.ru/rest/1/{SECRET} /", WEBHOOK_SHAPE),
    (f"ftp://x.bitrix24.ru/rest/1/{SECRET}/", WEBHOOK_SHAPE),
    (f"http://[::1/rest/1/{SECRET}/", "the host or port cannot be read (an [IPv6] address needs both brackets)"),
    (f"https://x.bitrix24.ru:99999/rest/1/{SECRET}/",
     "the host or port cannot be read (an [IPv6] address needs both brackets)"),
    (f"http://portal..bitrix24.ru/rest/1/{SECRET}/", BAD_HOST_NAME),
    (f"https://{'a' * 64}.ru/rest/1/{SECRET}/", BAD_HOST_NAME),
    (f"https://:443/rest/1/{SECRET}/", "the URL has no host name"),
]
GOOD_WEBHOOKS = [f"https://x.bitrix24.ru/rest/1/{SECRET}/", f"https://x.bitrix24.ru/rest/1/{SECRET}",
                 f"http://[::1]:8080/rest/12/{SECRET}/", f"https://портал.рф/rest/1/{SECRET}/"]


@pytest.mark.parametrize(("url", "message"), BAD_WEBHOOKS)
def test_a_webhook_the_portal_client_refuses_is_a_config_problem(url, message):
    assert problems(BASE.replace("https://portal.example/rest/1/secretcode/", url)) == [
        f"test.yaml:2: bitrix.webhook_url: {message}"]
    assert problems(BASE, environ={"AGI_BITRIX_WEBHOOK_URL": url}) == [
        f"test.yaml:2: environment AGI_BITRIX_WEBHOOK_URL: {message}"]
    with pytest.raises(ValueError, match="webhook URL: ") as refused:
        PortalClient(url, object(), timeout=1, budget=ample_budget())
    assert str(refused.value) == f"webhook URL: {message}"


@pytest.mark.parametrize("url", GOOD_WEBHOOKS)
def test_a_webhook_the_config_accepts_the_portal_client_accepts(url):
    config = parse_config(BASE, environ={"AGI_BITRIX_WEBHOOK_URL": url})
    client = PortalClient(config.bitrix.webhook_url, object(), timeout=1, budget=ample_budget())
    assert client.redacted_url.endswith("/rest/1/***/") or client.redacted_url.endswith("/rest/12/***/")


@pytest.mark.parametrize(("url", "message"), [
    ("https://x.bitrix24.ru/rest/?x=1", REST_BASE_SHAPE),
    ("https://x.bitrix24.ru/rest/app.json", REST_BASE_SHAPE),
    ("http://portal..bitrix24.ru/rest/", BAD_HOST_NAME),
    ("http://[::1/rest/", "the host or port cannot be read (an [IPv6] address needs both brackets)"),
])
def test_an_oauth_portal_url_the_client_refuses_is_a_config_problem(url, message, tmp_path):
    text = textwrap.dedent(f"""\
        bitrix:
          oauth: {{portal_url: "{url}", client_id: local.1, client_secret: s, token_file: /t.json,
                   token_url: "https://oauth..bitrix.info/oauth/token/"}}
        routing: {{fallback_queue: support}}
        """)
    assert problems(text) == [
        f"test.yaml:2: bitrix.oauth.portal_url: {message}",
        f"test.yaml:3: bitrix.oauth.token_url: {BAD_HOST_NAME}",
    ]


@pytest.mark.parametrize(("url", "message"), BAD_WEBHOOKS)
def test_check_refuses_each_such_webhook_with_its_line_and_without_the_code(url, message, tmp_path):
    path = tmp_path / "agi-bitrix.yaml"
    path.write_text(BASE.replace("https://portal.example/rest/1/secretcode/", url))
    result = agi_bitrix("check", "-c", str(path), env={"AGI_BITRIX_WEBHOOK_URL": ""})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}:2: bitrix.webhook_url: {message}",
                                          f"{path}: 1 problem(s); nothing was started"]
    assert SECRET not in result.stdout + result.stderr


async def test_a_reload_with_such_a_webhook_is_refused_as_a_config_problem(portal, tmp_path, caplog):
    path = tmp_path / "agi-bitrix.yaml"
    path.write_text(BASE.replace("https://portal.example/rest/1/secretcode/", portal.webhook_url))
    app = Application(load_config(path, environ={}))
    host, port = await app.start("127.0.0.1", 0)
    try:
        for count, (url, message) in enumerate(BAD_WEBHOOKS, 1):
            path.write_text(BASE.replace("https://portal.example/rest/1/secretcode/", url))
            assert not await app.reload()
            assert app.reloads == {"success": 0, "failure": count}
            assert f"reload refused: {path}:2: bitrix.webhook_url: {message}" in caplog.text
        assert SECRET not in caplog.text
        v = (await fake_call(host, port, callerid="89161234567")).variables
        assert (v["B24_STATUS"], v["B24_TARGET"]) == ("FOUND", "support")  # still the portal that worked
    finally:
        await app.stop()


# -- digits: only ASCII 0-9 (str.isdigit() and re's \d also take fullwidth, Arabic-Indic, superscripts) --

FULLWIDTH_42 = "\uff14\uff12"  # what isdigit() passes and int() reads as 42
ARABIC_INDIC_9 = "\u0669"


def test_a_user_id_in_other_digits_is_refused():
    found = problems(BASE + textwrap.indent(textwrap.dedent(f"""\
        rules:
          - {{name: x, match: {{owner: ["{FULLWIDTH_42}", "4\u00b2"]}}, route: [queue]}}
        """), "  ") + f'callcard:\n  register: {{default_user: "{FULLWIDTH_42}"}}\n')
    assert found == [
        f"test.yaml:6: routing.rules[x].match.owner[0]: '{FULLWIDTH_42}' is not a Bitrix24 user id (a number)",
        "test.yaml:6: routing.rules[x].match.owner[1]: '4\u00b2' is not a Bitrix24 user id (a number)",
        f"test.yaml:8: callcard.register.default_user: '{FULLWIDTH_42}' is not a Bitrix24 user id (a number)",
    ]


def test_ports_and_times_in_other_digits_are_refused():
    listen = f'server: {{listen: "127.0.0.1:{FULLWIDTH_42}73"}}\n'
    found = problems(listen + BASE + f'  time_intervals:\n    office: [{{times: ["0{ARABIC_INDIC_9}:00-18:00"]}}]\n')
    assert found == [
        f"test.yaml:1: server.listen: expected HOST:PORT, got '127.0.0.1:{FULLWIDTH_42}73'",
        (f"test.yaml:7: routing.time_intervals.office[0].times[0]: '0{ARABIC_INDIC_9}:00-18:00'"
         " is not a time range like \"09:00-18:00\""),
    ]


def test_a_portal_user_or_a_crm_id_in_other_digits_is_not_taken():
    assert parse_user({"ID": FULLWIDTH_42, "ACTIVE": True}, "RU") is None
    request = AgiRequest({"agi_callerid": "79161234567", "agi_uniqueid": "1700000000.1", "agi_extension": "100"})
    arguments = register_arguments(["", FULLWIDTH_42, "", "", "CONTACT", FULLWIDTH_42], request, "RU")
    assert (arguments.owner, arguments.entity_type, arguments.entity_id) == ("", "", "")
    arguments = register_arguments(["", "42", "", "", "CONTACT", "12"], request, "RU")
    assert (arguments.owner, arguments.entity_type, arguments.entity_id) == ("42", "CONTACT", "12")


# -- regexes and numbers: no rule may make a call cost more than a few milliseconds --

BACKTRACKING = BASE + """\
  rules:
    - {name: sevens, match: {did_regex: "(7+)+8"}, route: {queue: sevens}}
    - {name: callers, match: {caller_regex: "(\\\\d*)*x"}, route: {queue: callers}}
"""


def test_a_regex_that_backtracks_in_python_is_matched_in_linear_time():
    policy = parse_config(BACKTRACKING).policy
    sevens, callers = (rule.match for rule in policy.rules)
    for text in ("7" * 27, "7" * 79, "7" * 100_000):  # Python's re: 4 s at 27, doubling per digit
        started = time.perf_counter()
        assert sevens.did_regex.fullmatch(text) is None and callers.caller_regex.fullmatch(text) is None
        # Python's re would take hours on 79 sevens; a linear matcher takes microseconds. The bound is
        # wide so a loaded machine cannot fail it, and still far below what backtracking costs.
        assert time.perf_counter() - started < 1.0
    assert sevens.did_regex.fullmatch("7778") is not None


@pytest.mark.parametrize(("regex", "reason"), [
    (r"(7)\1", r"invalid escape sequence: \1"),
    ("(?=7)7", "invalid perl operator: (?="),
    ("7{1001}", "invalid repetition size: {1001}"),
])
def test_a_regex_that_needs_backtracking_is_refused(regex, reason):
    found = problems(BASE + f"  rules: [{{name: r, match: {{did_regex: '{regex}'}}, route: [queue]}}]\n")
    assert found == [(f"test.yaml:5: routing.rules[r].match.did_regex: {regex!r}: {reason}; rules are matched by"
                      " RE2, which takes linear time and has no backreferences or lookaround")]


def test_a_dialled_number_or_caller_too_long_to_be_a_number_is_none():
    assert call_info("7" * 33, "7" * 33, "RU") == CallInfo(phone=None, did="")
    assert call_info(" +7 (916) 123-45-67 ", "+7 (495) 111-22-33", "RU") == CallInfo("79161234567", "74951112233")
    assert normalize_number("+" + " " * 40 + "79161234567", "RU") is None


async def test_a_call_that_would_backtrack_does_not_stall_the_others(portal):
    config = parse_config(BACKTRACKING.replace("https://portal.example/rest/1/secretcode/", portal.webhook_url)
                          + "server: {listen: '127.0.0.1:4573'}\nmetrics: {listen: off}\n")
    app = Application(config)
    host, port = await app.start("127.0.0.1", 0)
    try:
        await fake_call(host, port, callerid="89161234567")  # the answer cached: what is timed is routing
        started = time.perf_counter()
        results = await asyncio.gather(
            fake_call(host, port, callerid="89161234567", extension="7" * 27),
            fake_call(host, port, callerid="89161234567", extension="7" * 79),
            fake_call(host, port, callerid="89161234567", args=("89161234567", "7" * 5000)),
            *(fake_call(host, port, callerid="89161234567", extension="7778") for _ in range(20)))
        took = time.perf_counter() - started
        assert [r.variables["B24_TARGET"] for r in results] == ["support"] * 3 + ["sevens"] * 20
        assert took < 0.5, f"23 calls took {took:.2f} s"
    finally:
        await app.stop()
