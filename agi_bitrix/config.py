"""Loading and checking the YAML configuration.

Every problem is collected (not just the first) and reported as `file:line: key: message`,
so `agi-bitrix check` shows an admin all mistakes at once. Unknown keys are errors, with a
suggestion when a known key is close: a typo must never silently switch a rule off.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import time
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from agi_bitrix.phones import normalize_extension, normalize_number
from agi_bitrix.routing.rules import (
    CALL_STATUSES,
    ENTITY_TYPES,
    OWNER_PHONES,
    TIMEMAN_STATUSES,
    WEEKDAYS,
    Match,
    Rule,
    RoutingPolicy,
    Target,
    TimeInterval,
    TimeRange,
)
from agi_bitrix.yamlsource import LocatedDict, LocatedList, YamlProblem, load_located

WEBHOOK_ENV = "AGI_BITRIX_WEBHOOK_URL"
CLIENT_SECRET_ENV = "AGI_BITRIX_CLIENT_SECRET"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,19}$")
_TIME_RANGE = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")
_PLACEHOLDER_CODE = "your-webhook-code"


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


LOOPBACK = (ip_network("127.0.0.0/8"), ip_network("::1/128"))


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 4573
    header_timeout: float = 5.0
    session_timeout: float = 30.0
    max_sessions: int = 1000
    allowed_clients: tuple[IPv4Network | IPv6Network, ...] = LOOPBACK


@dataclass(frozen=True)
class OAuthSettings:
    portal_url: str  # https://PORTAL/rest/
    client_id: str
    client_secret: str
    token_file: str  # JSON with the refresh token; rewritten on every refresh
    token_url: str = "https://oauth.bitrix.info/oauth/token/"


@dataclass(frozen=True)
class BitrixSettings:
    webhook_url: str
    deadline: float = 2.0
    # The portal's leaky bucket drains 2 requests/s and blocks at 50 (Enterprise: 5 and 250);
    # the default burst leaves room for the portal's other integrations.
    rate_per_second: float = 2.0
    rate_burst: int = 40
    pool_size: int = 10
    breaker_failures: int = 5
    breaker_cool_down: float = 10.0
    oauth: OAuthSettings | None = None  # an OAuth application instead of the webhook

    @property
    def is_placeholder(self) -> bool:
        return _PLACEHOLDER_CODE in self.webhook_url


@dataclass(frozen=True)
class CacheSettings:
    found_ttl: float = 60.0
    not_found_ttl: float = 30.0
    stale_for: float = 3600.0  # on a portal failure, an answer up to this old is used instead
    max_entries: int = 100_000


@dataclass(frozen=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    port: int = 9573
    enabled: bool = True


@dataclass(frozen=True)
class CallLogSettings:
    format: str = "plain"  # plain | json
    mask_numbers: bool = False


@dataclass(frozen=True)
class RegisterSettings:
    deadline: float = 2.0
    default_user: str = ""  # Bitrix24 user id for calls without an (active) owner; "" = skip them
    crm_create: bool = False
    crm_source: str = ""
    show: bool = True
    line_number: str = ""  # "" = the dialled number (DID)


@dataclass(frozen=True)
class FinishSettings:
    record_url: str = ""  # template with {call_id}, {uniqueid}, {recording}; "" = no RECORD_URL
    retry_first: float = 5.0
    retry_max: float = 600.0
    give_up_after: float = 86400.0


@dataclass(frozen=True)
class CallCardSettings:
    enabled: bool = False  # on when the config has a callcard section
    outbox: str = "/var/lib/agi-bitrix/outbox.sqlite3"
    register: RegisterSettings = RegisterSettings()
    finish: FinishSettings = FinishSettings()


@dataclass(frozen=True)
class UsersSettings:
    # Seconds between user.get loads; 0 = no user directory (the default without a users section).
    refresh: float = 0.0


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerSettings
    bitrix: BitrixSettings
    variable_prefix: str
    policy: RoutingPolicy
    digest: str  # sha256 of the file, to tell which version is loaded
    cache: CacheSettings = CacheSettings()
    metrics: MetricsSettings = MetricsSettings()
    call_log: CallLogSettings = CallLogSettings()
    callcard: CallCardSettings = CallCardSettings()
    users: UsersSettings = UsersSettings()


def parse_listen(text: str) -> tuple[str, int]:
    """"127.0.0.1:4573" or "[::1]:4573" -> (host, port); ValueError with a readable message."""
    match = re.match(r"^\[?([^\[\]]+?)\]?:(\d{1,5})$", text.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return match.group(1), int(match.group(2))


class _Checker:
    """Walks the located YAML, collecting problems instead of stopping at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, line: int, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, line, key, message))

    def section(self, parent: Any, key: str, path: str, allowed: tuple[str, ...]) -> LocatedDict:
        """A mapping under `key` (empty when absent), with unknown keys reported."""
        value = parent.get(key) if isinstance(parent, Mapping) else None
        if value is None:
            empty = LocatedDict()
            present = isinstance(parent, LocatedDict) and key in parent
            empty.line = _line(parent, key) if present else 0
            return empty
        if not isinstance(value, LocatedDict):
            self.problem(_line(parent, key), path, f"expected a mapping of {', '.join(allowed)}")
            return LocatedDict()
        self.unknown_keys(value, path, allowed)
        return value

    def unknown_keys(self, mapping: LocatedDict, path: str, allowed: tuple[str, ...]) -> None:
        for key in mapping:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                advice = f"did you mean {hint[0]!r}?" if hint else f"expected one of: {', '.join(allowed)}"
                self.problem(mapping.lines.get(key, mapping.line), _join(path, key), f"unknown key; {advice}")

    def number(self, mapping: LocatedDict, key: str, path: str, default: float,
               low: float, high: float, unit: str = "seconds", zero_allowed: bool = False) -> float:
        """A number in (low, high]; with zero_allowed, 0 too (it switches something off)."""
        if key not in mapping:
            return default
        value = mapping[key]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not (low < value <= high or (zero_allowed and value == 0)):
            bounds = f"from {low:g} to {high:g}" if zero_allowed else f"above {low:g} and at most {high:g}"
            self.problem(mapping.lines[key], _join(path, key),
                         f"expected a number of {unit} {bounds}, got {value!r}")
            return default
        return float(value)

    def integer(self, mapping: LocatedDict, key: str, path: str, default: int, low: int, high: int) -> int:
        if key not in mapping:
            return default
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.problem(mapping.lines[key], _join(path, key),
                         f"expected a whole number from {low} to {high}, got {value!r}")
            return default
        return value

    def flag(self, mapping: LocatedDict, key: str, path: str, default: bool) -> bool:
        if key not in mapping:
            return default
        value = mapping[key]
        if not isinstance(value, bool):
            self.problem(mapping.lines[key], _join(path, key), f"expected true or false, got {value!r}")
            return default
        return value

    def text(self, mapping: LocatedDict, key: str, path: str, default: str | None = None) -> str | None:
        if key not in mapping:
            return default
        value = mapping[key]
        if isinstance(value, bool):
            self.problem(mapping.lines[key], _join(path, key),
                         f"YAML read this as {value!r}; put the value in quotes")
            return default
        if isinstance(value, (int, float)) or isinstance(value, str):
            return str(value)
        self.problem(mapping.lines[key], _join(path, key), f"expected text, got {_kind(value)}")
        return default

    def items(self, mapping: LocatedDict, key: str, path: str) -> list[tuple[int, str, Any]] | None:
        """A list (or a single value, read as a list of one) as (line, path, item) triples."""
        if key not in mapping:
            return None
        value = mapping[key]
        line = mapping.lines[key]
        if isinstance(value, LocatedList):
            return [(value.lines[i], f"{_join(path, key)}[{i}]", item) for i, item in enumerate(value)]
        if isinstance(value, LocatedDict):
            self.problem(line, _join(path, key), "expected a list or a single value, got a mapping")
            return []
        return [(line, _join(path, key), value)]

    def choices(self, mapping: LocatedDict, key: str, path: str,
                allowed: tuple[str, ...], upper: bool = True) -> frozenset[str] | None:
        items = self.items(mapping, key, path)
        if items is None:
            return None
        chosen = set()
        for line, item_path, item in items:
            text = "" if item is None else str(item)
            text = text.upper() if upper else text
            if isinstance(item, (LocatedDict, LocatedList, bool)) or text not in allowed:
                shown = ", ".join(a or '""' for a in allowed)
                self.problem(line, item_path, f"{item!r} is not one of: {shown}")
            else:
                chosen.add(text)
        return frozenset(chosen)


def _line(parent: Any, key: str) -> int:
    if isinstance(parent, LocatedDict):
        return parent.lines.get(key, parent.line)
    return 0


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value: Any) -> str:
    if isinstance(value, LocatedDict):
        return "a mapping"
    if isinstance(value, LocatedList):
        return "a list"
    return type(value).__name__


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, check and build the configuration; raises ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError([Problem(file, 0, "", f"cannot read: {error.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([Problem(file, 0, "", f"not UTF-8 text ({error.reason} at byte {error.start})")]) from None
    return parse_config(text, file, environ, digest=hashlib.sha256(raw).hexdigest())


def parse_config(text: str, file: str = "<config>", environ: Mapping[str, str] | None = None,
                 digest: str = "") -> Config:
    environ = {} if environ is None else environ
    try:
        data, duplicates = load_located(text)
    except YamlProblem as problem:
        raise ConfigError([Problem(file, problem.line, "", problem.message)]) from None
    check = _Checker(file)
    check.problems.extend(Problem(file, d.line, "", d.message) for d in duplicates)
    if data is None:
        data = LocatedDict()
    if not isinstance(data, LocatedDict):
        raise ConfigError([Problem(file, 1, "", "the file must be a mapping of sections")])
    check.unknown_keys(data, "", _SECTIONS)

    server = _server(check, check.section(data, "server", "server", (
        "listen", "header_timeout", "session_timeout", "max_sessions", "allowed_clients")))
    bitrix = _bitrix(check, check.section(data, "bitrix", "bitrix", (
        "webhook_url", "deadline", "rate_limit", "pool_size", "breaker", "oauth")), environ)
    cache = _cache(check, check.section(data, "cache", "cache", (
        "found_ttl", "not_found_ttl", "stale_for", "max_entries")))
    metrics = _metrics(check, check.section(data, "metrics", "metrics", ("listen",)))
    call_log = _call_log(check, check.section(data, "call_log", "call_log", ("format", "mask_numbers")))
    phones = check.section(data, "phones", "phones", ("default_country",))
    country = (check.text(phones, "default_country", "phones") or "RU").upper()
    if country not in phonenumbers.SUPPORTED_REGIONS:
        check.problem(phones.lines.get("default_country", phones.line), "phones.default_country",
                      f"{country!r} is not a region code like RU, KZ, BY")
        country = "RU"
    variables = check.section(data, "variables", "variables", ("prefix",))
    prefix = check.text(variables, "prefix", "variables", "B24_") or ""
    if not _PREFIX.match(prefix):
        check.problem(variables.lines.get("prefix", variables.line), "variables.prefix",
                      f"{prefix!r} must be letters, digits and _ (at most 20), not starting with a digit")
        prefix = "B24_"
    routing = check.section(
        data, "routing", "routing", ("timezone", "fallback_queue", "time_intervals", "rules"))
    policy = _routing(check, routing, country)
    callcard = _callcard(check, data)
    users = check.section(data, "users", "users", ("refresh",))
    users_refresh = check.number(users, "refresh", "users", USERS_REFRESH, 0, 86400,
                                 zero_allowed=True) if "users" in data else 0.0
    if check.problems:
        # In file order, as an admin reads the file; the sort is stable within a line.
        raise ConfigError(sorted(check.problems, key=lambda p: p.line))
    return Config(file, server, bitrix, prefix, policy, digest, cache, metrics, call_log, callcard,
                  UsersSettings(users_refresh))


_SECTIONS = ("server", "bitrix", "phones", "variables", "routing", "cache", "metrics", "call_log",
             "callcard", "users")


def _server(check: _Checker, section: LocatedDict) -> ServerSettings:
    host, port = ServerSettings.host, ServerSettings.port
    listen = check.text(section, "listen", "server")
    if listen is not None:
        try:
            host, port = parse_listen(listen)
        except ValueError as error:
            check.problem(section.lines["listen"], "server.listen", str(error))
    header_timeout = check.number(section, "header_timeout", "server", 5.0, 0, 60)
    session_timeout = check.number(section, "session_timeout", "server", 30.0, 0, 3600)
    max_sessions = check.integer(section, "max_sessions", "server", 1000, 1, 100_000)
    allowed: list[IPv4Network | IPv6Network] = []
    items = check.items(section, "allowed_clients", "server")
    for line, item_path, value in items or []:
        try:
            allowed.append(ip_network(str(value).strip(), strict=False))
        except ValueError:
            check.problem(line, item_path, f"{value!r} is not an address or network like 10.0.0.0/24")
    return ServerSettings(host, port, header_timeout, session_timeout, max_sessions,
                          tuple(allowed) if items is not None else LOOPBACK)


def _bitrix(check: _Checker, section: LocatedDict, environ: Mapping[str, str]) -> BitrixSettings:
    url = environ.get(WEBHOOK_ENV) or check.text(section, "webhook_url", "bitrix")
    where = "environment AGI_BITRIX_WEBHOOK_URL" if environ.get(WEBHOOK_ENV) else "bitrix.webhook_url"
    oauth = _oauth(check, section, environ) if "oauth" in section else None
    if oauth is not None and url:
        check.problem(section.lines.get("webhook_url", section.lines["oauth"]), where,
                      "set either a webhook or bitrix.oauth (an application), not both")
    if oauth is not None:
        url = ""
    elif not url:
        check.problem(section.line, "bitrix.webhook_url",
                      f"missing; set it here or in the environment variable {WEBHOOK_ENV}")
        url = ""
    else:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Do not echo the value: it holds the webhook's secret code.
            check.problem(section.lines.get("webhook_url", section.line), where,
                          "expected an http(s) URL like https://PORTAL/rest/USER_ID/CODE/")
    deadline = check.number(section, "deadline", "bitrix", 2.0, 0, 30)
    rate = check.section(section, "rate_limit", "bitrix.rate_limit", ("per_second", "burst"))
    per_second = check.number(rate, "per_second", "bitrix.rate_limit", 2.0, 0, 10_000, "requests per second")
    burst = check.integer(rate, "burst", "bitrix.rate_limit", 40, 1, 100_000)
    pool_size = check.integer(section, "pool_size", "bitrix", 10, 1, 1000)
    breaker = check.section(section, "breaker", "bitrix.breaker", ("failures", "cool_down"))
    failures = check.integer(breaker, "failures", "bitrix.breaker", 5, 1, 1000)
    cool_down = check.number(breaker, "cool_down", "bitrix.breaker", 10.0, 0, 3600)
    return BitrixSettings(url, deadline, per_second, burst, pool_size, failures, cool_down, oauth)


def _oauth(check: _Checker, bitrix: LocatedDict, environ: Mapping[str, str]) -> OAuthSettings:
    path = "bitrix.oauth"
    section = check.section(bitrix, "oauth", path, (
        "portal_url", "client_id", "client_secret", "token_file", "token_url"))
    values = {}
    for key in ("portal_url", "client_id", "client_secret", "token_file"):
        value = check.text(section, key, path) or ""
        if key == "client_secret":
            value = environ.get(CLIENT_SECRET_ENV) or value
        if not value:
            extra = f" (or the environment variable {CLIENT_SECRET_ENV})" if key == "client_secret" else ""
            check.problem(section.line, f"{path}.{key}", f"missing; an OAuth application needs it{extra}")
        values[key] = value
    token_url = check.text(section, "token_url", path, OAuthSettings.token_url) or ""
    for key, url, example in (("portal_url", values["portal_url"], "https://PORTAL/rest/"),
                              ("token_url", token_url, OAuthSettings.token_url)):
        parts = urlsplit(url)
        if url and (parts.scheme not in ("http", "https") or not parts.hostname
                    or (key == "portal_url" and not parts.path.endswith("/rest/"))):
            check.problem(section.lines.get(key, section.line), f"{path}.{key}", f"expected a URL like {example}")
    if values["token_file"] and not values["token_file"].startswith("/"):
        check.problem(section.lines["token_file"], f"{path}.token_file", "must be an absolute path")
    return OAuthSettings(values["portal_url"], values["client_id"], values["client_secret"],
                         values["token_file"], token_url)


def _cache(check: _Checker, section: LocatedDict) -> CacheSettings:
    # 0 switches that part of the cache off.
    found = check.number(section, "found_ttl", "cache", 60.0, 0, 86400, zero_allowed=True)
    not_found = check.number(section, "not_found_ttl", "cache", 30.0, 0, 86400, zero_allowed=True)
    stale = check.number(section, "stale_for", "cache", 3600.0, 0, 7 * 86400, zero_allowed=True)
    entries = check.integer(section, "max_entries", "cache", 100_000, 0, 10_000_000)
    return CacheSettings(found, not_found, stale, entries)


def _metrics(check: _Checker, section: LocatedDict) -> MetricsSettings:
    listen = section.get("listen", "127.0.0.1:9573")
    if listen in (None, False, "", "off"):  # YAML reads an unquoted off as false
        return MetricsSettings(enabled=False)
    try:
        host, port = parse_listen(str(listen))
    except ValueError as error:
        check.problem(section.lines.get("listen", section.line), "metrics.listen", f"{error}, or off")
        return MetricsSettings()
    return MetricsSettings(host, port)


def _call_log(check: _Checker, section: LocatedDict) -> CallLogSettings:
    log_format = (check.text(section, "format", "call_log", "plain") or "plain").lower()
    if log_format not in ("plain", "json"):
        check.problem(section.lines["format"], "call_log.format", f"{log_format!r} is not plain or json")
        log_format = "plain"
    return CallLogSettings(log_format, check.flag(section, "mask_numbers", "call_log", False))


USERS_REFRESH = 600.0
RECORD_URL_FIELDS = ("call_id", "uniqueid", "recording")
_CRM_SOURCE = re.compile(r"^[A-Za-z0-9_.|-]{1,50}$")
_LINE_NUMBER = re.compile(r"^[A-Za-z0-9_.+-]{1,50}$")


def _callcard(check: _Checker, data: LocatedDict) -> CallCardSettings:
    if "callcard" not in data:
        return CallCardSettings()
    section = check.section(data, "callcard", "callcard", ("outbox", "register", "finish"))
    outbox = check.text(section, "outbox", "callcard", CallCardSettings.outbox) or ""
    if not outbox.startswith("/"):
        check.problem(section.lines.get("outbox", section.line), "callcard.outbox",
                      f"{outbox!r} must be an absolute path to the SQLite file")
    path = "callcard.register"
    register = check.section(section, "register", path, (
        "deadline", "default_user", "crm_create", "crm_source", "show", "line_number"))
    default_user = check.text(register, "default_user", path, "") or ""
    if default_user and not default_user.isdigit():
        check.problem(register.lines["default_user"], f"{path}.default_user",
                      f"{default_user!r} is not a Bitrix24 user id (a number)")
    crm_source = check.text(register, "crm_source", path, "") or ""
    if crm_source and not _CRM_SOURCE.match(crm_source):
        check.problem(register.lines["crm_source"], f"{path}.crm_source",
                      f"{crm_source!r} is not a CRM source id like CALL")
    line_number = check.text(register, "line_number", path, "") or ""
    if line_number and not _LINE_NUMBER.match(line_number):
        check.problem(register.lines["line_number"], f"{path}.line_number",
                      f"{line_number!r} must be digits, letters, '+', '_', '.', '-'")
    register_settings = RegisterSettings(
        deadline=check.number(register, "deadline", path, RegisterSettings.deadline, 0, 30),
        default_user=default_user,
        crm_create=check.flag(register, "crm_create", path, RegisterSettings.crm_create),
        crm_source=crm_source,
        show=check.flag(register, "show", path, RegisterSettings.show),
        line_number=line_number,
    )
    path = "callcard.finish"
    finish = check.section(section, "finish", path, ("record_url", "retry"))
    record_url = check.text(finish, "record_url", path, "") or ""
    if record_url:
        problem = _record_url_problem(record_url)
        if problem:
            check.problem(finish.lines["record_url"], f"{path}.record_url", problem)
    retry = check.section(finish, "retry", f"{path}.retry", ("first", "max", "give_up_after"))
    first = check.number(retry, "first", f"{path}.retry", FinishSettings.retry_first, 0, 3600)
    most = check.number(retry, "max", f"{path}.retry", FinishSettings.retry_max, 0, 86400)
    if most < first:
        check.problem(retry.lines.get("max", retry.line), f"{path}.retry.max",
                      f"{most:g} is shorter than retry.first ({first:g})")
    give_up = check.number(retry, "give_up_after", f"{path}.retry", FinishSettings.give_up_after,
                           0, 30 * 86400)
    return CallCardSettings(True, outbox, register_settings,
                            FinishSettings(record_url, first, most, give_up))


def _record_url_problem(template: str) -> str:
    """Why a RECORD_URL template is unusable ("" when it is fine)."""
    parts = urlsplit(template)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{template!r} must be an http(s) URL"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        return f"bad template {template!r}: {error} (write a literal brace as {{{{ or }}}})"
    unknown = [name for name in names if name not in RECORD_URL_FIELDS]
    if unknown:
        return f"unknown field {{{unknown[0]}}}; expected {', '.join('{' + f + '}' for f in RECORD_URL_FIELDS)}"
    return ""


def _routing(check: _Checker, section: LocatedDict, country: str) -> RoutingPolicy:
    zone_name = check.text(section, "timezone", "routing", "UTC") or "UTC"
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        check.problem(section.lines.get("timezone", section.line), "routing.timezone",
                      f"unknown time zone {zone_name!r} (expected a name like Europe/Moscow)")
        zone = ZoneInfo("UTC")
    fallback = check.text(section, "fallback_queue", "routing")
    if fallback is None:
        check.problem(section.line, "routing.fallback_queue",
                      "missing; every call that no rule decides goes to this queue")
        fallback = ""
    elif not _NAME.match(fallback):
        check.problem(section.lines["fallback_queue"], "routing.fallback_queue",
                      f"{fallback!r} must be letters, digits, '_', '.', '-'")
    intervals = _time_intervals(check, section)
    rules = _rules(check, section, country, intervals)
    return RoutingPolicy(tuple(rules), fallback, zone, country, intervals)


def _time_intervals(check: _Checker, section: LocatedDict) -> dict[str, tuple[TimeInterval, ...]]:
    value = section.get("time_intervals")
    if value is None:
        return {}
    if not isinstance(value, LocatedDict):
        check.problem(section.lines["time_intervals"], "routing.time_intervals",
                      "expected a mapping of interval names to lists of {weekdays, times}")
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
                check.problem(item_line, item_path, "expected a mapping with weekdays and/or times")
                continue
            check.unknown_keys(item, item_path, ("weekdays", "times"))
            parsed.append(TimeInterval(_weekdays(check, item, item_path), _times(check, item, item_path)))
        result[str(name)] = tuple(parsed)
    return result


def _weekdays(check: _Checker, item: LocatedDict, path: str) -> frozenset[int]:
    days: set[int] = set()
    for line, item_path, value in check.items(item, "weekdays", path) or []:
        text = str(value).strip().lower()
        first, _, last = text.partition("-")
        try:
            start = _weekday(first)
            end = _weekday(last) if last else start
        except ValueError:
            check.problem(line, item_path, f"{value!r} is not a weekday or range like mon-fri")
            continue
        day = start
        days.add(day)
        while day != end:
            day = (day + 1) % 7
            days.add(day)
    return frozenset(days)


def _weekday(text: str) -> int:
    text = text.strip()[:3]
    if text not in WEEKDAYS:
        raise ValueError(text)
    return WEEKDAYS.index(text)


def _times(check: _Checker, item: LocatedDict, path: str) -> tuple[TimeRange, ...]:
    ranges = []
    for line, item_path, value in check.items(item, "times", path) or []:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 09:00 as the number 540 (base 60).
            check.problem(line, item_path, "write time ranges in quotes, like \"09:00-18:00\"")
            continue
        match = _TIME_RANGE.match(str(value).strip())
        try:
            if not match:
                raise ValueError
            h1, m1, h2, m2 = (int(g) for g in match.groups())
            start = time(h1, m1)
            end = time(0, 0) if (h2, m2) == (24, 0) else time(h2, m2)
        except ValueError:
            check.problem(line, item_path, f"{value!r} is not a time range like \"09:00-18:00\"")
            continue
        if start == end:
            check.problem(line, item_path, f"{value!r} is an empty range")
            continue
        ranges.append(TimeRange(start, end))
    return tuple(ranges)


_RULE_KEYS = ("name", "match", "route", "objects", "prefer")
_MATCH_KEYS = ("status", "did", "did_regex", "caller", "caller_regex", "during", "outside",
               "entity_type", "owner", "timeman", "has")


def _rules(check: _Checker, section: LocatedDict, country: str,
           intervals: dict[str, tuple[TimeInterval, ...]]) -> list[Rule]:
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for line, path, item in check.items(section, "rules", "routing") or []:
        if not isinstance(item, LocatedDict):
            check.problem(line, path, "a rule is a mapping with name, match and route")
            continue
        check.unknown_keys(item, path, _RULE_KEYS)
        name = check.text(item, "name", path)
        if name is None:
            check.problem(line, f"{path}.name", "missing; every rule needs a name (it is B24_RULE)")
            name = f"rule-{len(rules) + 1}"
        elif not _NAME.match(name):
            check.problem(item.lines["name"], f"{path}.name",
                          f"{name!r} must be letters, digits, '_', '.', '-' (at most 64)")
        elif name in seen or name == "fallback":
            check.problem(item.lines["name"], f"{path}.name",
                          f"{name!r} is already used (line {seen[name]})" if name in seen
                          else "'fallback' is reserved for calls no rule decides")
        seen.setdefault(name, item.lines.get("name", line))
        if "name" in item:
            path = f"routing.rules[{name}]"
        match = _match(check, item, path, country, intervals)
        route = _route(check, item, path, country)
        objects = (check.text(item, "objects", path, "first") or "first").lower()
        if objects not in ("first", "all"):
            check.problem(item.lines["objects"], f"{path}.objects",
                          f"{objects!r} is not 'first' (the portal's choice) or 'all'")
        prefer = check.choices(item, "prefer", path, ENTITY_TYPES)
        if prefer and objects != "all":
            check.problem(item.lines["prefer"], f"{path}.prefer", "only makes sense with objects: all")
        prefer_order = tuple(str(v).upper() for _, _, v in check.items(item, "prefer", path) or []
                             if str(v).upper() in ENTITY_TYPES)
        rules.append(Rule(name, match, route, objects, prefer_order, line))
    return rules


def _match(check: _Checker, rule: LocatedDict, path: str, country: str,
           intervals: dict[str, tuple[TimeInterval, ...]]) -> Match:
    section = check.section(rule, "match", f"{path}.match", _MATCH_KEYS)
    path = f"{path}.match"
    owners = None
    owner_items = check.items(section, "owner", path)
    if owner_items is not None:
        owners = set()
        for line, item_path, value in owner_items:
            text = str(value).strip()
            if isinstance(value, bool) or not text.isdigit():
                check.problem(line, item_path, f"{value!r} is not a Bitrix24 user id (a number)")
            else:
                owners.add(text)
        owners = frozenset(owners)
    names: dict[str, tuple[str, ...]] = {}
    for key in ("during", "outside"):
        found = []
        for line, item_path, value in check.items(section, key, path) or []:
            if str(value) not in intervals:
                known = ", ".join(intervals) or "none defined"
                check.problem(line, item_path,
                              f"no time interval {value!r} in routing.time_intervals ({known})")
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


def _numbers(check: _Checker, section: LocatedDict, key: str, path: str,
             country: str) -> frozenset[str] | None:
    items = check.items(section, key, path)
    if items is None:
        return None
    numbers = set()
    for line, item_path, value in items:
        number = None if isinstance(value, (bool, LocatedDict, LocatedList)) else normalize_number(str(value), country)
        if number is None:
            check.problem(line, item_path, f"{value!r} is not a phone number")
        else:
            numbers.add(number)
    return frozenset(numbers)


def _regex(check: _Checker, section: LocatedDict, key: str, path: str) -> re.Pattern[str] | None:
    text = check.text(section, key, path)
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as error:
        check.problem(section.lines[key], _join(path, key), f"bad regular expression {text!r}: {error}")
        return None


def _route(check: _Checker, rule: LocatedDict, path: str, country: str) -> tuple[Target, ...]:
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
            return Target("queue", text) if _NAME.match(text) else f"queue name {argument!r} must be letters, digits, '_', '.', '-'"
        if kind == "extension":
            extension = normalize_extension(text)
            return Target("extension", extension) if extension else f"extension {argument!r} must be digits"
        if kind == "number":
            number = normalize_number(text, country)
            return Target("number", number) if number else f"{argument!r} is not a phone number"
    return f"{value!r}: {_TARGET_HELP}"
