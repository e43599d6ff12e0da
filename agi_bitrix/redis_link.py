"""The one way agi-bitrix reaches Redis: its URL read once, shown without secrets, and the client
made with one policy for timeouts and retries. The shared state (bitrix/shared.py) and the outbox
in Redis (callcard/redis_outbox.py) both connect through here; `agi-bitrix check` reads the URL
with the same parser `serve` uses, so a URL that passes the check also starts the server.

URLs as redis-py documents them (redis.asyncio.Redis.from_url): redis://[[USER]:PASSWORD@]HOST
[:PORT][/DB], rediss://… for TLS, unix://[[USER]:PASSWORD@]/PATH/TO.sock; options after `?`
(`db`, `password`, `username`, and for rediss the TLS files and checks). The client itself is
built from the parsed parts, never from the text, so no other parser sees the URL: a password
holding `/` (common in generated ones) must be written percent-encoded (%2F), and is refused with
a message saying so, which never repeats the password.

The client's policy: each command and connect within `timeout`, and no retries inside the client
(a caller is waiting; what to do on a failure is the caller's: the shared state falls back to
this server's own state, the outbox keeps a finish in memory and tries again).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["LinkHealth", "RedisError", "RedisUrl", "RedisUrlError", "parse_redis_url", "redacted_redis_url"]

SCHEMES = ("redis", "rediss", "unix")
EXAMPLE = "redis://HOST:6379/0, rediss://… (TLS) or unix:///run/redis.sock"
# Query options read from the URL (as redis-py names them); any other is refused, not passed on.
OPTIONS = ("db", "password", "username")
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS = ("none", "optional", "required")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# An option's name is repeated in a refusal only when it looks like one (a typo, not a secret).
_OPTION_NAME = re.compile(r"[a-z_]{1,30}")
_HIDDEN = "***"


class RedisUrlError(ValueError):
    """A Redis URL that cannot be used; the message never holds its password."""


@dataclass(frozen=True)
class RedisUrl:
    """A Redis URL read into its parts. `password` never appears in repr, logs or /healthz."""

    scheme: str
    host: str = ""
    port: int = 6379
    socket: str = ""  # unix:// only
    db: int = 0
    username: str = ""
    password: str = field(default="", repr=False)
    tls: tuple[tuple[str, str], ...] = ()  # rediss:// options, as given

    @property
    def redacted(self) -> str:
        """The URL as the log, /healthz and the admin page show it: any password is `***`."""
        user = self.username
        if self.password:
            user = f"{quote(user, safe='')}:{_HIDDEN}@"
        elif user:
            user = f"{quote(user, safe='')}@"
        where = self.socket if self.scheme == "unix" else f"{_bracketed(self.host)}:{self.port}/{self.db}"
        query = "&".join(f"{name}={quote(value, safe='/')}" for name, value in self.tls)
        if self.scheme == "unix" and self.db:
            query = "&".join(part for part in (f"db={self.db}", query) if part)
        return f"{self.scheme}://{user}{where}" + (f"?{query}" if query else "")

    def hide(self, text: str) -> str:
        """`text` (an error from the client, say) with the password, raw or encoded, as `***`."""
        if not self.password:
            return text
        for form in {self.password, quote(self.password, safe=""), quote(self.password)}:
            text = text.replace(form, _HIDDEN)
        return text

    def describe(self, error: BaseException) -> str:
        """An error of the client in one line, the password hidden."""
        return self.hide(f"{type(error).__name__}: {error}" if str(error) else f"{type(error).__name__}: no answer")

    def client(self, *, timeout: float, max_connections: int, decode_responses: bool = False) -> aioredis.Redis:
        """A client with the one policy: `timeout` on every connect and command, no retries inside,
        at most `max_connections` at once (a command waits up to `timeout` for one)."""
        options: dict[str, Any] = {
            "db": self.db, "username": self.username or None, "password": self.password or None,
            "socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0),
            "decode_responses": decode_responses,
        }
        if self.scheme == "unix":
            options.update(connection_class=UnixDomainSocketConnection, path=self.socket)
        else:
            options.update(host=self.host, port=self.port)
        if self.scheme == "rediss":
            options["connection_class"] = SSLConnection
            for name, value in self.tls:
                options[name] = _BOOLEANS[value.lower()] if name == "ssl_check_hostname" else value
        pool = aioredis.BlockingConnectionPool(max_connections=max_connections, timeout=timeout, **options)
        return aioredis.Redis(connection_pool=pool)


def parse_redis_url(text: str) -> RedisUrl:
    """Read a Redis URL, or say in one line (without its password) why it cannot be used."""
    scheme, separator, rest = text.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in SCHEMES:
        raise RedisUrlError(f"expected a URL like {EXAMPLE}")
    if "#" in rest:
        raise RedisUrlError("a Redis URL has no #fragment; write a # in the password as %23")
    parts = urlsplit(f"{scheme}://{rest}")
    if "@" in parts.path or "@" in parts.query:
        # The userinfo ends at the first "/" or "?": a password holding one was cut there.
        raise RedisUrlError("the Redis URL's password (or user) holds a '/' or '?': percent-encode it"
                            " (/ as %2F, ? as %3F, @ as %40, % as %25)")
    options = _query_options(parts.query, scheme)
    username = _credential("username", unquote(parts.username or ""), options)
    password = _credential("password", unquote(parts.password or ""), options)
    tls = tuple((name, value) for name, value in options.items() if name in TLS_OPTIONS)
    db_option = options.get("db")
    if scheme == "unix":
        if parts.hostname or not parts.path.startswith("/"):
            raise RedisUrlError("a unix:// Redis URL names the socket by its absolute path:"
                                " unix:///run/redis/redis.sock")
        return RedisUrl(scheme, socket=unquote(parts.path), db=_db(db_option or "0"), username=username,
                        password=password)
    return RedisUrl(scheme, host=_host(parts.hostname), port=_port(parts), db=_db(_path_db(parts.path, db_option)),
                    username=username, password=password, tls=tls)


def redacted_redis_url(text: str) -> str:
    """What may be shown of a Redis URL: the redacted form, or a placeholder for one that cannot
    be read (its text may hold a password anywhere)."""
    try:
        return parse_redis_url(text).redacted
    except RedisUrlError:
        return "(a Redis URL that cannot be read)"


def _query_options(query: str, scheme: str) -> dict[str, str]:
    known = OPTIONS + (TLS_OPTIONS if scheme == "rediss" else ())
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise RedisUrlError("the Redis URL's options after '?' are not NAME=VALUE pairs joined by '&'") from None
    for name, value in pairs:
        if name not in known:
            shown = f"{name!r} " if _OPTION_NAME.fullmatch(name) else ""
            raise RedisUrlError(f"the Redis URL's option {shown}is not known here (known: {', '.join(known)})")
        if name in options:
            raise RedisUrlError(f"the Redis URL gives the option {name!r} twice")
        if name == "ssl_cert_reqs" and value.lower() not in _CERT_REQS:
            raise RedisUrlError(f"ssl_cert_reqs in the Redis URL is one of {', '.join(_CERT_REQS)}")
        if name == "ssl_check_hostname" and value.lower() not in _BOOLEANS:
            raise RedisUrlError("ssl_check_hostname in the Redis URL is true or false")
        options[name] = value
    return options


def _credential(name: str, in_userinfo: str, options: dict[str, str]) -> str:
    if name not in options:
        return in_userinfo
    if in_userinfo:
        raise RedisUrlError(f"the Redis URL gives its {name} twice: in the userinfo and in ?{name}=")
    return options.pop(name)


def _host(hostname: str | None) -> str:
    if not hostname:
        raise RedisUrlError("the Redis URL needs a host, like redis://10.0.0.5:6379/0")
    return unquote(hostname)


def _port(parts: Any) -> int:
    try:
        port: int | None = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise RedisUrlError("the Redis URL's port is not a number from 1 to 65535")
    return 6379 if port is None else port


def _path_db(path: str, option: str | None) -> str:
    in_path = path.strip("/")
    if in_path and option is not None and in_path != option:
        raise RedisUrlError("the Redis URL names two databases: one in its path, another in ?db=")
    return option if option is not None else in_path or "0"


def _db(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text):
        raise RedisUrlError("the Redis URL's database is a number, like redis://HOST:6379/0")
    return int(text)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class LinkHealth:
    """Whether a Redis link works, why not, and since when: the one state /healthz and the log show
    for it. `failed` and `recovered` say whether this was a change (so it is logged once)."""

    up: bool = True
    problem: str = ""
    changed_at: float = field(default_factory=time.monotonic)

    def failed(self, problem: str) -> bool:
        changed = self.up or problem != self.problem
        if self.up:
            self.changed_at = time.monotonic()
        self.up, self.problem = False, problem
        return changed

    def recovered(self) -> bool:
        if self.up:
            return False
        self.up, self.problem, self.changed_at = True, "", time.monotonic()
        return True
