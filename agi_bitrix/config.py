"""The configuration file: the settings of each section, declared once, and the whole file read.

Each setting is a dataclass field declared with agi_bitrix.schema: its key, default, bounds and
any custom check stand on one line. agi_bitrix.checking reads the file and collects every
problem as `file:line: key: message`, so `agi-bitrix check` shows an admin all mistakes at once;
the `routing:` section is compiled by agi_bitrix.routing.compiler, and the portal's sections are
declared in agi_bitrix.bitrix.settings, the call card's in agi_bitrix.callcard_settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any, ClassVar

import phonenumbers

from agi_bitrix import schema
from agi_bitrix.ami.errors import SecretUnavailable
from agi_bitrix.ami.settings import AMI_SECRET_ENV, AmiSettings, read_secret
from agi_bitrix.bitrix.line_settings import Line, line_entry, numbered_lines
from agi_bitrix.bitrix.settings import (
    BitrixSettings,
    CacheSettings,
    OAuthSettings,
    RedisSettings,
    check_host,
    check_redis_url,
    portal_base,
)
from agi_bitrix.callback_settings import CallbackSettings
from agi_bitrix.callcard_settings import SHARED_REDIS_OUTBOX, CallCardSettings, OutgoingSettings
from agi_bitrix.checking import Checker, ConfigError, LocatedDict, Problem, quoted, read_file
from agi_bitrix.dialpolicy import ClickToCallSettings
from agi_bitrix.events_settings import EventsSettings
from agi_bitrix.phones import normalize_number
from agi_bitrix.routing.compiler import ROUTING_KEYS, compile_routing
from agi_bitrix.routing.rules import RoutingPolicy
from agi_bitrix.schema import anything, flag, integer, items, number, own, section, text

WEBHOOK_ENV = "AGI_BITRIX_WEBHOOK_URL"
CLIENT_SECRET_ENV = "AGI_BITRIX_CLIENT_SECRET"
REDIS_URL_ENV = "AGI_BITRIX_REDIS_URL"
DEFAULT_COUNTRY = "RU"  # phones.default_country when the file does not set it
LOOPBACK = (ip_network("127.0.0.0/8"), ip_network("::1/128"))
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,19}$")


def parse_listen(text: str) -> tuple[str, int]:
    """"127.0.0.1:4573" or "[::1]:4573" -> (host, port); ValueError with a readable message."""
    match = re.match(r"^\[?([^\[\]]+?)\]?:([0-9]{1,5})$", text.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"expected HOST:PORT, got {quoted(text)}")
    return match.group(1), int(match.group(2))


# -- custom checks: each takes the value in effect and returns it, or raises ValueError(message) --

def _network(value: Any) -> IPv4Network | IPv6Network:
    try:
        return ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"{quoted(value)} is not an address or network like 10.0.0.0/24") from None


def _http_listen(value: Any) -> tuple[str, int, bool]:
    """HOST:PORT, or off -> (host, port, enabled)."""
    if value in (None, False, "", "off"):  # YAML reads an unquoted off as false
        return HttpSettings.host, HttpSettings.port, False
    try:
        host, port = parse_listen(str(value))
    except ValueError as error:
        raise ValueError(f"{error}, or off") from None
    return host, port, True


def _token_file(value: str) -> str:
    if value and not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path")
    return value


def _log_format(value: str) -> str:
    chosen = (value or CallLogSettings.format).lower()
    if chosen not in ("plain", "json"):
        raise ValueError(f"{quoted(chosen)} is not plain or json")
    return chosen


def _region(value: str) -> str:
    country = (value or DEFAULT_COUNTRY).upper()
    if country not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"{quoted(country)} is not a region code like RU, KZ, BY")
    return country


def _variable_prefix(value: str) -> str:
    if not _PREFIX.fullmatch(value):  # with match, `$` would let "B24_\n" through
        raise ValueError(f"{quoted(value)} must be letters, digits and _ (at most 20), not starting with a digit")
    return value


# -- the sections --

@dataclass(frozen=True)
class ServerSettings:
    host: str = text("listen", "127.0.0.1", check=parse_listen, sets=("host", "port"), restart=True)  # HOST:PORT
    port: int = 4573
    header_timeout: float = number("header_timeout", 5.0, 0, 60)
    session_timeout: float = number("session_timeout", 30.0, 0, 3600)
    max_sessions: int = integer("max_sessions", 1000, 1, 100_000)
    allowed_clients: tuple[IPv4Network | IPv6Network, ...] = items("allowed_clients", LOOPBACK, check=_network)


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP listener (agi_bitrix.http_listener): /metrics, /healthz, admin page, install callback."""

    host: str = anything("listen", "127.0.0.1", check=_http_listen,  # listen: HOST:PORT or off
                         sets=("host", "port", "enabled"), restart=True)
    port: int = 9573
    enabled: bool = True
    # The admin page's access token (agi_bitrix.web.access); "" = none. Required off loopback.
    token_file: str = text("token_file", "", check=_token_file, restart=True)
    # A connection that sends no complete request header for this long (first or next) is closed.
    idle_timeout: float = number("idle_timeout", 15.0, 0, 3600, restart=True)
    # A request's body read and its answer made within this, or 408 and the connection closed.
    request_timeout: float = number("request_timeout", 30.0, 0, 3600, restart=True)
    max_connections: int = integer("max_connections", 100, 1, 10_000, restart=True)


LEGACY_HTTP_SECTION = "metrics"  # the http section's old name: still read, with a deprecation note


@dataclass(frozen=True)
class CallLogSettings:
    format: str = text("format", "plain", check=_log_format)  # plain | json
    mask_numbers: bool = flag("mask_numbers", False)


@dataclass(frozen=True)
class UsersSettings:
    # Seconds between user.get loads; 0 = no user directory.
    refresh: float = number("refresh", 600.0, 0, 86400, zero_is_off=True, restart=True)
    # No users section: the directory is on only while the credentials carry the user scope
    # (bitrix/users.py asks), so that a deactivated owner's calls never ring his mobile by default.
    automatic: bool = False
    WITHOUT_THE_SECTION: ClassVar[str] = ("on while the credentials carry the `user` scope (asked at start);"
                                          " present (even empty): the defaults below")


def _not_kept(declared: Any) -> Any:
    """A declared key that parse_config reads and hands on instead of keeping on Config: still a
    field, so the file's keys, default and check come from Config's declarations like any other,
    but not set by __init__ and not compared (the class attribute is removed below the class)."""
    return dataclasses.field(default=declared.default, init=False, repr=False, compare=False,
                             metadata=declared.metadata)


@dataclass(frozen=True, kw_only=True)
class Config:
    path: str
    digest: str  # sha256 of the file, to tell which version is loaded
    server: ServerSettings = section("server", ServerSettings, absent=ServerSettings())
    bitrix: BitrixSettings = section("bitrix", BitrixSettings)
    # Compiled into the routing policy, the one place the country is kept: read it as
    # `config.policy.default_country`.
    default_country: str = _not_kept(text("phones.default_country", DEFAULT_COUNTRY, check=_region))
    variable_prefix: str = text("variables.prefix", "B24_", check=_variable_prefix)
    policy: RoutingPolicy = own("routing")
    cache: CacheSettings = section("cache", CacheSettings, absent=CacheSettings())
    http: HttpSettings = section("http", HttpSettings, absent=HttpSettings())
    call_log: CallLogSettings = section("call_log", CallLogSettings, absent=CallLogSettings())
    # The call card is on when its section is there, even empty; the user directory too, and
    # without its section whenever the credentials carry the user scope.
    callcard: CallCardSettings = section("callcard", CallCardSettings, absent=CallCardSettings(enabled=False),
                                         restart=True)
    users: UsersSettings = section("users", UsersSettings, absent=UsersSettings(automatic=True), restart=True)
    # Click-to-call (ONEXTERNALCALLSTART over AMI): on with its section, declared in dialpolicy.py.
    clicktocall: ClickToCallSettings = section("clicktocall", ClickToCallSettings,
                                               absent=ClickToCallSettings(enabled=False), restart=True)
    # Callback requests (ONEXTERNALCALLBACKSTART over AMI): on with its section, declared in callback_settings.py.
    callback: CallbackSettings = section("callback", CallbackSettings, absent=CallbackSettings(enabled=False),
                                        restart=True)
    # State shared with the other servers of one portal; off (all in this process) without the section.
    redis: RedisSettings | None = section("redis", RedisSettings, absent=None, restart=True)
    # Click-to-call's events: off without the section.
    events: EventsSettings = section("events", EventsSettings, absent=EventsSettings())
    # Asterisk's manager interface, for the calls the server starts itself; off without the section.
    ami: AmiSettings | None = section("ami", AmiSettings, absent=None, restart=True)
    # The DIDs the portal knows as external lines (agi_bitrix.bitrix.line_settings), each DID in digits.
    lines: tuple[Line, ...] = items("lines", (), check=line_entry)
    # Keys that still work as before but are deprecated: `check` prints them, `serve` logs each
    # at WARNING when it starts.
    deprecated: tuple[Problem, ...] = dataclasses.field(default=(), compare=False)


del Config.default_country  # so `config.default_country` fails instead of giving the declared default


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, check and build the configuration; raises ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    text, raw = read_file(os.fspath(path))
    return parse_config(text, str(path), environ, digest=hashlib.sha256(raw).hexdigest())


def parse_config(text: str, file: str = "<config>", environ: Mapping[str, str] | None = None,
                 digest: str = "") -> Config:
    environ = {} if environ is None else environ
    check = Checker(file)
    data = check.load(text)
    if data is None:
        data = LocatedDict()
    if not isinstance(data, LocatedDict):
        raise ConfigError([Problem(file, 1, "", "the file must be a mapping of sections")])
    check.unknown_keys(_without(data, LEGACY_HTTP_SECTION), "", schema.keys(Config))  # read, not offered

    def read(name: str) -> Any:
        return check.field(Config, name, data)

    # Sections are read in this order, which problems on one line keep.
    server = read("server")
    bitrix = _bitrix(check, check.section(data, "bitrix", "bitrix", schema.keys(BitrixSettings)), environ)
    cache, call_log = read("cache"), read("call_log")
    http, http_name, http_notes = _http(check, data)
    country = read("default_country")
    prefix = read("variable_prefix")
    policy = compile_routing(check, check.section(data, "routing", "routing", ROUTING_KEYS), country)
    callcard, users = read("callcard"), read("users")
    callcard = _responsible_numbers(check, data, callcard, country)
    callcard, cards_notes = _cards_deadline(file, data, callcard)
    # Outgoing calls rely on the directory: an explicit users section, not one the scope may switch off.
    if callcard.outgoing != OutgoingSettings() and (users.refresh == 0 or users.automatic):
        outgoing_section = data["callcard"]  # a mapping: outgoing was read from it
        check.problem(outgoing_section.lines.get("outgoing", outgoing_section.line), "callcard.outgoing",
                      "needs a users section: the user directory turns the caller's extension into a Bitrix24 user")
    read("lines")  # each entry's problems
    lines = numbered_lines(data.get("lines"), country, check.problem)
    redis = _redis(check, data, environ, bitrix)
    ami = _ami(check, data, environ)
    clicktocall, callback = read("clicktocall"), read("callback")
    _needs(check, data, "clicktocall", clicktocall.enabled, [
        (not callcard.enabled, "needs the callcard section: a click-to-call is finished through its outbox"),
        (ami is None, "needs the ami section: a click rings the agent's phone through Asterisk's manager (Originate)"),
        (users.refresh == 0 or users.automatic,
         "needs the users section (with refresh above 0): the user directory gives each user's extension")])
    _needs(check, data, "callback", callback.enabled, [
        (not callcard.enabled, "needs the callcard section: a callback is registered and finished through it"),
        (ami is None, "needs the ami section: a callback rings the agents through Asterisk's manager (Originate)")])
    if callcard.enabled and callcard.outbox == SHARED_REDIS_OUTBOX and redis is None:
        section = data["callcard"]  # a mapping: outbox was read from it
        check.problem(section.lines.get("outbox", section.line), "callcard.outbox",
                      "redis names the redis section's Redis, but there is no redis section")
    if bitrix.oauth is not None and bitrix.oauth.install_path and not http.enabled:
        oauth_section = data["bitrix"]["oauth"]  # a mapping: install_path was read from it
        check.problem(oauth_section.lines.get("install_path", oauth_section.line), "bitrix.oauth.install_path",
                      f"is served on {http_name}.listen, which is off")
    events = _events(check, data, read("events"), bitrix, http, http_name)
    check.raise_problems()
    return Config(path=file, digest=digest, server=server, bitrix=bitrix, variable_prefix=prefix, policy=policy,
                  cache=cache, http=http, call_log=call_log, callcard=callcard, users=users, redis=redis,
                  events=events, ami=ami, lines=lines, clicktocall=clicktocall, callback=callback,
                  deprecated=http_notes + cards_notes)


def _events(check: Checker, data: LocatedDict, events: EventsSettings, bitrix: BitrixSettings,
            http: HttpSettings, http_name: str) -> EventsSettings:
    """What the events' mode needs besides its own keys: an application (event.bind and the
    offline queue work only in an application's context), and for a handler its listener and URL."""
    if events.mode == "off":
        return events
    section = data["events"]  # a mapping: mode was read from it
    line = section.lines.get("mode", section.line)
    if bitrix.oauth is None:
        check.problem(line, "events.mode", f"{events.mode} needs bitrix.oauth: Bitrix24 sends events only to an"
                                           " application, never through a webhook")
    if events.mode == "handler":
        handler = section.get("handler")
        where = handler.line if isinstance(handler, LocatedDict) else line
        if not events.public_url and not (isinstance(handler, LocatedDict) and "public_url" in handler):
            check.problem(where, "events.handler.public_url", "missing; the https:// URL the portal POSTs events to")
        if not http.enabled:
            check.problem(where, "events.handler.path", f"is served on {http_name}.listen, which is off")
        if bitrix.oauth is not None and bitrix.oauth.install_path == events.handler_path:
            check.problem(where, "events.handler.path", "is bitrix.oauth.install_path's too; give each its own")
    return events


def _needs(check: Checker, data: LocatedDict, key: str, enabled: bool, needs: list[tuple[bool, str]]) -> None:
    """A section that is on and lacks what it works through: one problem per missing part."""
    if enabled:
        for missing, message in needs:
            if missing:
                check.problem(data.lines[key], key, message)


def _cards_deadline(file: str, data: LocatedDict, callcard: CallCardSettings) -> tuple[CallCardSettings,
                                                                                       tuple[Problem, ...]]:
    """callcard.register.deadline bounded the cards' show and hide too, before callcard.cards.deadline:
    a file that sets the first and not the second keeps that meaning, with a deprecation note."""
    section = data.get("callcard")
    register = section.get("register") if isinstance(section, LocatedDict) else None
    cards = section.get("cards") if isinstance(section, LocatedDict) else None
    if not isinstance(register, LocatedDict) or "deadline" not in register or (
            isinstance(cards, LocatedDict) and "deadline" in cards):
        return callcard, ()
    note = Problem(file, register.lines.get("deadline", register.line), "callcard.register.deadline",
                   "deprecated for the call cards: it bounds their show and hide too only while"
                   " callcard.cards.deadline is not set; set callcard.cards.deadline for them")
    cards_deadline = dataclasses.replace(callcard.cards, deadline=callcard.register.deadline)
    return dataclasses.replace(callcard, cards=cards_deadline), (note,)


def _without(mapping: LocatedDict, key: str) -> LocatedDict:
    rest = LocatedDict()
    rest.update((k, v) for k, v in mapping.items() if k != key)
    rest.line, rest.lines = mapping.line, mapping.lines
    return rest


def _http(check: Checker, data: LocatedDict) -> tuple[HttpSettings, str, tuple[Problem, ...]]:
    """The http section, or the same keys under its old name `metrics` with a deprecation note;
    also the name the file uses, for messages about it."""
    if LEGACY_HTTP_SECTION not in data:
        return check.field(Config, "http", data), "http", ()
    line = data.lines[LEGACY_HTTP_SECTION]
    if "http" in data:
        check.problem(line, LEGACY_HTTP_SECTION, "is the old name of the http section, which is also here;"
                                                 " move its keys into http")
        return check.field(Config, "http", data), "http", ()
    section = check.section(data, LEGACY_HTTP_SECTION, LEGACY_HTTP_SECTION, schema.keys(HttpSettings))
    note = Problem(check.file, line, LEGACY_HTTP_SECTION,
                   "deprecated: this section also serves the admin page and the install callback and is now"
                   " called http (same keys: listen, token_file, ...); rename it, the old name will go")
    return check.read(HttpSettings, section, LEGACY_HTTP_SECTION), LEGACY_HTTP_SECTION, (note,)


def _responsible_numbers(check: Checker, data: LocatedDict, callcard: CallCardSettings,
                         country: str) -> CallCardSettings:
    """callcard.register.responsible with each DID in international digits, read as match.did
    reads its numbers (phones.default_country); one that is no number is a problem."""
    register = callcard.register
    if not register.responsible:
        return callcard
    section = data["callcard"]["register"]  # the entries were read from there
    numbers = {}
    for _, path, item in check.items(section, "responsible", "callcard.register") or []:
        if isinstance(item, LocatedDict) and "did" in item:
            did = str(item["did"]).strip()
            number = normalize_number(did, country)
            if number is None:
                check.problem(item.lines["did"], f"{path}.did", f"{quoted(did)} is not a phone number")
            numbers[did] = number or ""
    entries = tuple(dataclasses.replace(entry, number=numbers.get(entry.did, "")) for entry in register.responsible)
    return dataclasses.replace(callcard, register=dataclasses.replace(register, responsible=entries))


def _bitrix(check: Checker, section: LocatedDict, environ: Mapping[str, str]) -> BitrixSettings:
    """The portal's section: a webhook (from the file or the environment) or an OAuth application."""
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
        try:
            portal_base(url)  # what the portal client will accept; the message never quotes the URL
        except ValueError as error:
            check.problem(section.lines.get("webhook_url", section.line), where, str(error))
    return check.read(BitrixSettings, section, "bitrix", webhook_url=url, oauth=oauth)


def _redis(check: Checker, data: LocatedDict, environ: Mapping[str, str],
           bitrix: BitrixSettings) -> RedisSettings | None:
    """The `redis:` section, its URL from AGI_BITRIX_REDIS_URL when that is set (never quoted)."""
    from_environment = environ.get(REDIS_URL_ENV, "")
    if "redis" not in data:
        if from_environment:
            check.problem(1, "redis", f"the environment sets {REDIS_URL_ENV} but the file has no redis section;"
                                      " add `redis: {}` to share state through it")
        return None
    section = check.section(data, "redis", "redis", schema.keys(RedisSettings))
    url = from_environment or check.text(section, "url", "redis") or ""
    where = f"environment {REDIS_URL_ENV}" if from_environment else "redis.url"
    if not url:
        check.problem(section.line, "redis.url", f"missing; set it here or in the environment variable {REDIS_URL_ENV}")
    try:
        check_redis_url(url)
    except ValueError as error:
        check.problem(section.line if from_environment else section.lines.get("url", section.line), where, str(error))
    settings: RedisSettings = check.read(RedisSettings, section, "redis", url=url)
    if settings.timeout >= bitrix.deadline / 2:
        check.problem(section.lines.get("timeout", section.line), "redis.timeout",
                      f"{settings.timeout:g} s must be under half of bitrix.deadline ({bitrix.deadline:g} s):"
                      " a call waits for Redis before the portal")
    return settings


def _ami(check: Checker, data: LocatedDict, environ: Mapping[str, str]) -> AmiSettings | None:
    """The `ami:` section, its secret usable now; `secret` passes the unknown-key check only to be
    told where the secret goes instead (never quoting it)."""
    if "ami" not in data:
        return None
    section = check.section(data, "ami", "ami", (*schema.keys(AmiSettings), "secret"))
    if "secret" in section:
        check.problem(section.lines["secret"], "ami.secret", f"never in this file: use {AMI_SECRET_ENV} or secret_file")
    given = {name: check.text(section, name, "ami") or "" for name in ("username", "secret_file")}
    for name, value in given.items():  # required fields (no default), checked as declared
        declared_check = schema.declaration(AmiSettings, name).check
        try:
            if declared_check is not None:
                declared_check(value)
        except ValueError as error:
            check.problem(section.lines.get(name, section.line), f"ami.{name}", str(error))
    settings: AmiSettings = check.read(AmiSettings, section, "ami", **given)
    try:
        read_secret(settings, environ)
    except SecretUnavailable as error:
        check.problem(section.lines.get("secret_file", section.line), "ami", str(error))
    return settings


def _oauth(check: Checker, bitrix: LocatedDict, environ: Mapping[str, str]) -> OAuthSettings:
    path = "bitrix.oauth"
    section = check.section(bitrix, "oauth", path, schema.keys(OAuthSettings))
    values = {}
    for name, setting in schema.declared(OAuthSettings):
        if schema.default(OAuthSettings, name) is not dataclasses.MISSING:
            continue
        value = check.text(section, setting.key, path) or ""
        if name == "client_secret":
            value = environ.get(CLIENT_SECRET_ENV) or value
        if not value:
            extra = f" (or the environment variable {CLIENT_SECRET_ENV})" if name == "client_secret" else ""
            check.problem(section.line, f"{path}.{setting.key}", f"missing; an OAuth application needs it{extra}")
        values[name] = value
    token_url = check.field(OAuthSettings, "token_url", section, path)
    install_path = check.field(OAuthSettings, "install_path", section, path)
    for key, url in (("portal_url", values["portal_url"]), ("token_url", token_url)):
        if not url and key == "portal_url":
            continue  # reported above as missing
        try:
            if key == "portal_url":
                portal_base(url, oauth=True)  # what the portal client will accept
            elif not url.startswith(("http://", "https://")):
                raise ValueError(f"expected a URL like {OAuthSettings.token_url}")
            else:
                check_host(url)
        except ValueError as error:
            check.problem(section.lines.get(key, section.line), f"{path}.{key}", str(error))
    if values["token_file"] and not values["token_file"].startswith("/"):
        check.problem(section.lines["token_file"], f"{path}.token_file", "must be an absolute path")
    return OAuthSettings(token_url=token_url, install_path=install_path, **values)
