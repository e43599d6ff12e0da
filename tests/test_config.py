import dataclasses
import os
import tempfile
import textwrap
from pathlib import Path

import pytest

from agi_bitrix.checking import ConfigError
from agi_bitrix.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "agi-bitrix.yaml"

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


def test_shipped_config_is_valid_and_is_the_packaged_default():
    config = load_config(SHIPPED, environ={})
    assert [r.name for r in config.policy.rules] == ["owner-on-break", "owner-at-work", "owner-day-over"]
    assert (config.server.host, config.server.port) == ("127.0.0.1", 4573)
    assert config.bitrix.deadline == 2.0
    assert config.policy.default_country == "RU"
    assert config.variable_prefix == "B24_"
    assert config.bitrix.is_placeholder
    assert SHIPPED.resolve() == (ROOT / "agi_bitrix" / "default-config.yaml").resolve()


def test_minimal_config_gets_defaults():
    config = parse_config(BASE)
    assert config.policy.rules == ()
    assert config.policy.fallback_queue == "support"
    assert str(config.policy.timezone) == "UTC"


def test_environment_overrides_webhook_url():
    config = parse_config(BASE, environ={"AGI_BITRIX_WEBHOOK_URL": "https://other.example/rest/2/zzz"})
    assert config.bitrix.webhook_url == "https://other.example/rest/2/zzz"
    config = parse_config("routing: {fallback_queue: q}\n", environ={"AGI_BITRIX_WEBHOOK_URL": "https://x.example/rest/1/c/"})
    assert config.bitrix.webhook_url.startswith("https://x.example")


def test_missing_required_values():
    assert problems("server: {listen: '127.0.0.1:4573'}\n") == [
        "test.yaml: bitrix.webhook_url: missing; set it here or in the environment variable AGI_BITRIX_WEBHOOK_URL",
        "test.yaml: routing.fallback_queue: missing; every call that no rule decides goes to this queue",
    ]


def test_bad_webhook_is_reported_without_the_secret():
    found = problems("bitrix:\n  webhook_url: ftp://portal/rest/1/topsecret/\nrouting: {fallback_queue: q}\n")
    assert found == ["test.yaml:2: bitrix.webhook_url: expected an http(s) URL like https://PORTAL/rest/USER_ID/CODE/"]
    assert "topsecret" not in "".join(found)


def test_every_problem_is_reported_with_line_and_key():
    found = problems(BASE + """\
  timezone: Mars/Olympus
  time_intervals:
    office:
      - weekdays: [mon-fri, funday]
        times: ["09:00-18:00", "25:00-26:00", 18:00]
  rules:
    - name: vip
      match:
        timeman: [OPEND]
        owner: [42, abc]
        did: [not-a-number]
        caller_regex: "([0-9"
        during: [ofice]
        hass: [mobile]
      route: [mobile, {queue: "bad queue"}, teleport]
    - name: vip
      route: queue
    - match: {status: [FOUND]}
server:
  listen: localhost
  header_timeout: -1
phones:
  default_country: NO
variables:
  prefix: "1bad"
""")
    assert found == [
        "test.yaml:5: routing.timezone: unknown time zone 'Mars/Olympus' (expected a name like Europe/Moscow)",
        "test.yaml:8: routing.time_intervals.office[0].weekdays[1]: 'funday' is not a weekday or range like mon-fri",
        ("test.yaml:9: routing.time_intervals.office[0].times[1]: '25:00-26:00' is not a time range"
         " like \"09:00-18:00\""),
        "test.yaml:9: routing.time_intervals.office[0].times[2]: write time ranges in quotes, like \"09:00-18:00\"",
        ("test.yaml:13: routing.rules[vip].match.timeman[0]: 'OPEND' is not one of: OPENED, PAUSED,"
         " CLOSED, EXPIRED, UNAVAILABLE, NOT_INSTALLED, \"\""),
        "test.yaml:14: routing.rules[vip].match.owner[1]: 'abc' is not a Bitrix24 user id (a number)",
        "test.yaml:15: routing.rules[vip].match.did[0]: 'not-a-number' is not a phone number",
        ("test.yaml:16: routing.rules[vip].match.caller_regex: bad regular expression '([0-9':"
         " unterminated character set at position 1"),
        "test.yaml:17: routing.rules[vip].match.during[0]: no time interval 'ofice' in routing.time_intervals (office)",
        "test.yaml:18: routing.rules[vip].match.hass: unknown key; did you mean 'has'?",
        "test.yaml:19: routing.rules[vip].route[1]: queue name 'bad queue' must be letters, digits, '_', '.', '-'",
        ("test.yaml:19: routing.rules[vip].route[2]: 'teleport': expected extension, mobile,"
         " work_phone, personal_phone, queue, {queue: NAME}, {extension: NUMBER} or {number: PHONE}"),
        "test.yaml:20: routing.rules[1].name: 'vip' is already used (line 11)",
        "test.yaml:22: routing.rules[2].name: missing; every rule needs a name (it is B24_RULE)",
        "test.yaml:22: routing.rules[2].route: missing; say what to dial, e.g. [extension, mobile, queue]",
        "test.yaml:24: server.listen: expected HOST:PORT, got 'localhost'",
        "test.yaml:25: server.header_timeout: expected a number of seconds above 0 and at most 60, got -1",
        "test.yaml:27: phones.default_country: YAML read this as False; put the value in quotes",
        "test.yaml:29: variables.prefix: '1bad' must be letters, digits and _ (at most 20), not starting with a digit",
    ]


def test_unknown_top_level_key_and_duplicates():
    found = problems(BASE + "routng: {}\nbitrix: {deadline: 1}\n")
    assert "test.yaml:5: routng: unknown key; did you mean 'routing'?" in found
    assert any("key 'bitrix' appears twice (first on line 1)" in p for p in found)


def test_yaml_syntax_error_has_a_line():
    found = problems("bitrix:\n  webhook_url: [unclosed\nrouting: {}\n")
    assert len(found) == 1 and found[0].startswith("test.yaml:3: YAML syntax")


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"routing: {fallback_queue: \xe9}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_rule_forms():
    config = parse_config(BASE + """\
  timezone: Europe/Moscow
  time_intervals:
    nights: [{times: ["22:00-06:00"]}]
  rules:
    - name: sales-did
      match: {did: "+7 (495) 111-22-33", status: [found, NOT_FOUND]}
      route: {queue: sales}
    - name: contacts-first
      objects: all
      prefer: [CONTACT, LEAD]
      match: {entity_type: [contact, lead], has: [extension], owner: 42}
      route: [extension, {extension: "100"}, {number: "8 800 555-35-35"}]
""")
    did_rule, contacts = config.policy.rules
    assert did_rule.match.did == frozenset({"74951112233"})
    assert did_rule.match.status == frozenset({"FOUND", "NOT_FOUND"})
    assert contacts.prefer == ("CONTACT", "LEAD")
    assert contacts.match.owner == frozenset({"42"})
    assert [t.kind for t in contacts.route] == ["owner", "extension", "number"]
    assert contacts.route[2].value == "78005553535"


def test_prefer_needs_objects_all():
    assert problems(BASE + "  rules:\n    - {name: a, prefer: [LEAD], route: queue}\n") == [
        "test.yaml:6: routing.rules[a].prefer: only makes sense with objects: all"]


def test_operational_settings():
    config = parse_config(BASE + textwrap.dedent("""\
        server:
          session_timeout: 20
          max_sessions: 500
          allowed_clients: [10.0.0.5, "192.168.1.0/24", "::1"]
        cache: {found_ttl: 0, not_found_ttl: 10, stale_for: 600, max_entries: 1000}
        metrics: {listen: off}
        call_log: {format: json, mask_numbers: true}
        """))
    assert [str(n) for n in config.server.allowed_clients] == ["10.0.0.5/32", "192.168.1.0/24", "::1/128"]
    assert (config.server.session_timeout, config.server.max_sessions) == (20.0, 500)
    assert (config.cache.found_ttl, config.cache.not_found_ttl, config.cache.stale_for) == (0.0, 10.0, 600.0)
    assert not config.http.enabled
    assert (config.call_log.format, config.call_log.mask_numbers) == ("json", True)
    defaults = parse_config(BASE)
    assert [str(n) for n in defaults.server.allowed_clients] == ["127.0.0.0/8", "::1/128"]
    assert (defaults.bitrix.rate_per_second, defaults.bitrix.rate_burst) == (2.0, 40)
    assert (defaults.http.host, defaults.http.port) == ("127.0.0.1", 9573)


def test_operational_mistakes():
    bad_bitrix = "bitrix:\n  rate_limit: {per_second: 0, burst: 2.5}\n  breaker: {failures: 0}\n"
    text = BASE.replace("bitrix:\n", bad_bitrix) + textwrap.dedent("""\
        server: {allowed_clients: [everyone], max_sessions: 0}
        cache: {found_ttl: -1}
        metrics: {listen: nowhere}
        call_log: {format: xml, mask_numbers: "yes"}
        """)
    assert problems(text) == [
        ("test.yaml:2: bitrix.rate_limit.per_second: expected a number of requests per second above 0"
         " and at most 10000, got 0"),
        "test.yaml:2: bitrix.rate_limit.burst: expected a whole number from 1 to 100000, got 2.5",
        "test.yaml:3: bitrix.breaker.failures: expected a whole number from 1 to 1000, got 0",
        "test.yaml:7: server.max_sessions: expected a whole number from 1 to 100000, got 0",
        "test.yaml:7: server.allowed_clients[0]: 'everyone' is not an address or network like 10.0.0.0/24",
        "test.yaml:8: cache.found_ttl: expected a number of seconds from 0 to 86400, got -1",
        "test.yaml:9: metrics.listen: expected HOST:PORT, got 'nowhere', or off",
        "test.yaml:10: call_log.format: 'xml' is not plain or json",
        "test.yaml:10: call_log.mask_numbers: expected true or false, got 'yes'",
    ]


# -- the schema: each setting declared once ---------------------------------------------------

import yaml  # noqa: E402

from agi_bitrix import schema  # noqa: E402
from agi_bitrix.bitrix.settings import BitrixSettings  # noqa: E402
from agi_bitrix.callcard_settings import CallCardSettings  # noqa: E402
from agi_bitrix.config import Config, UsersSettings  # noqa: E402


def declared_sections(settings=Config, path=""):
    """(YAML path, settings class) of every declared section, Config's own sections included."""
    for _name, setting in schema.declared(settings):
        if setting.kind == schema.SECTION:
            where = f"{path}.{setting.key}" if path else setting.key
            yield where, setting.settings
            yield from declared_sections(setting.settings, where)


def yaml_of_defaults(settings):
    """A mapping holding every declared key of `settings` with its default, as YAML would."""
    mapping = {}
    for name, setting in schema.declared(settings):
        value = schema.default(settings, name)
        if setting.kind in (schema.SECTION, schema.OWN) or value is dataclasses.MISSING:
            continue
        if setting.sets:
            value = ":".join(str(schema.default(settings, field)) for field in setting.sets[:2])
        elif setting.kind == schema.ITEMS:
            value = [str(item) for item in value]
        *parents, key = setting.key.split(".")
        holder = mapping
        for parent in parents:
            holder = holder.setdefault(parent, {})
        holder[key] = value
    return mapping


OAUTH = {"portal_url": "https://p.example/rest/", "client_id": "c", "client_secret": "s", "token_file": "/t.json"}


def _ami_secret_file() -> str:
    """A private secret file for the `ami` section (its secret must be usable for the file to pass)."""
    path = Path(tempfile.gettempdir()) / f"agi-bitrix-test-ami-{os.getpid()}.secret"
    if not path.exists():
        path.write_text("secret\n")
        path.chmod(0o600)
    return str(path)


def config_with(path, mapping):
    """BASE as a dict with `mapping` at the section `path`; an OAuth section replaces the webhook."""
    data = yaml.safe_load(BASE)
    if path == "bitrix.oauth":
        data["bitrix"] = {"oauth": dict(OAUTH)}
    if path == "redis":
        data["redis"] = {"url": "redis://127.0.0.1:6379/0"}
    if path == "ami":
        data["ami"] = {"username": "agi-bitrix", "secret_file": _ami_secret_file()}
    # Finished through the call card's outbox; extensions from the user directory; the agent's phone rung through AMI.
    if path in ("clicktocall", "callback"):
        data["callcard"] = data["users"] = {}
        data["ami"] = {"username": "agi-bitrix", "secret_file": _ami_secret_file()}
    holder = data
    for part in path.split("."):
        holder = holder.setdefault(part, {})
    holder.update(mapping)
    return yaml.safe_dump(data, sort_keys=False)


def test_every_declared_key_is_accepted_and_its_default_is_what_an_absent_key_gives():
    for path, settings in declared_sections():
        written = parse_config(config_with(path, yaml_of_defaults(settings)))
        absent = parse_config(config_with(path, {}))
        assert written == dataclasses.replace(absent, path=written.path), path
    top_level = yaml_of_defaults(Config)  # phones.default_country, variables.prefix, lines
    assert parse_config(BASE + yaml.safe_dump(top_level)) == dataclasses.replace(parse_config(BASE), path="<config>")
    assert set(top_level) == {"phones", "variables", "lines"}
    defaults = parse_config(BASE + "callcard:\nusers:\n")
    assert defaults.callcard == CallCardSettings() and defaults.users == UsersSettings()
    assert defaults.bitrix.deadline == schema.default(BitrixSettings, "deadline")


def test_unknown_keys_are_matched_against_the_declared_keys():
    for path, settings in declared_sections():
        within = {""} | {s.key.rpartition(".")[0] for _, s in schema.declared(settings)}  # rate_limit, retry, ...
        for under in within:
            where = f"{path}.{under}" if under else path
            for key in schema.keys(settings, under):
                typo = key[:-1] + "_"
                found = problems(config_with(where, {typo: 1}))
                assert f"{where}.{typo}: unknown key; did you mean {key!r}?" in "\n".join(found), (where, found)


def test_the_allowed_keys_of_a_section_come_from_its_declarations():
    assert schema.keys(BitrixSettings) == ("webhook_url", "deadline", "rate_limit", "operating_limit", "pool_size",
                                           "breaker", "oauth")
    assert schema.keys(BitrixSettings, "rate_limit") == ("per_second", "burst")
    assert schema.keys(Config) == ("server", "bitrix", "phones", "variables", "routing", "cache", "http",
                                   "call_log", "callcard", "users", "clicktocall", "callback", "redis", "events", "ami",
                                   "lines")
    assert problems(BASE + "cache: {colour: 1}\n") == [
        "test.yaml:5: cache.colour: unknown key; expected one of: found_ttl, not_found_ttl, stale_for, max_entries"]
    assert problems(BASE + "cache: 5\n") == [
        "test.yaml:5: cache: expected a mapping of found_ttl, not_found_ttl, stale_for, max_entries"]


def test_the_user_directory_is_on_by_scope_without_its_section_and_on_at_the_declared_default_with_it():
    # Without the section: on while the credentials carry the user scope (bitrix/users.py asks).
    assert parse_config(BASE).users == UsersSettings(refresh=600.0, automatic=True)
    assert not parse_config(BASE + "users: {}\n").users.automatic
    assert parse_config(BASE + "users: {}\n").users.refresh == schema.default(UsersSettings, "refresh") == 600.0
    assert parse_config(BASE + "users: {refresh: 0}\n").users.refresh == 0.0


def test_a_variable_prefix_with_a_trailing_newline_is_refused():
    # `^...$` with re.match accepted "B24_\n"; every call would then fail to set its variables.
    assert problems(BASE + 'variables: {prefix: "B24_\\n"}\n') == [
        ("test.yaml:5: variables.prefix: 'B24_\\n' must be letters, digits and _ (at most 20),"
        " not starting with a digit")]


def test_the_country_is_kept_once_in_the_routing_policy():
    """phones.default_country is declared on Config like every key but kept only where it is read."""
    config = parse_config(BASE + "phones: {default_country: kz}\n", "test.yaml")
    assert config.policy.default_country == "KZ"
    assert not hasattr(config, "default_country")
    assert schema.default(Config, "default_country") == "RU" and "phones" in schema.keys(Config)
    assert problems(BASE + "phones: {default_country: XX}\n") == [
        "test.yaml:5: phones.default_country: 'XX' is not a region code like RU, KZ, BY"]
