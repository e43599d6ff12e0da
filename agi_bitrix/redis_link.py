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

`RedisLink` is a kept connection with its health: a failed command marks it down (logged once),
a ping every `retry_every` brings it back (logged once), and while it is up the exchanges its
users registered run every `sync_every`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["LinkHealth", "RedisError", "RedisLink", "RedisUnavailable", "RedisUrl", "RedisUrlError", "parse_redis_url",
           "redacted_redis_url"]

log = logging.getLogger("agi_bitrix.redis")
_T = TypeVar("_T")

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


class RedisUnavailable(Exception):
    """Redis did not answer in time, or not at all: the caller goes on without it."""


class RedisLink:
    """A connection to Redis kept up, its health, and the exchanges run on it while it is up.

    `while_down` and `when_back` finish the log lines of the two changes: what the users do."""

    def __init__(self, url: str, *, timeout: float, retry_every: float, sync_every: float, max_connections: int,
                 while_down: str, when_back: str) -> None:
        self.url = parse_redis_url(url)
        self.timeout = timeout
        self.retry_every = retry_every
        self.sync_every = sync_every
        self.client = self.url.client(timeout=timeout, max_connections=max_connections)
        self.status = LinkHealth()  # up until a command says otherwise; the first exchange checks it
        self._while_down = while_down
        self._when_back = when_back
        self._exchanges: list[Callable[[], Awaitable[None]]] = []
        self._scripts: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def up(self) -> bool:
        """Whether the last exchange with Redis went through (its health is `status`)."""
        return self.status.up

    def script(self, source: str) -> Any:
        """A Lua script run by its SHA (loaded on start and on every return of Redis, and by the
        client itself should Redis have lost it meanwhile)."""
        self._scripts.append(source)
        return self.client.register_script(source)

    async def run(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """Run one command within the timeout; RedisUnavailable while Redis is down or on any
        failure (which marks it down until a ping succeeds)."""
        if not self.up:
            raise RedisUnavailable(self.status.problem)
        try:
            async with asyncio.timeout(self.timeout):
                return await command()
        except TimeoutError:
            self._down(f"no answer within {self.timeout:g} s")
        except (RedisError, OSError) as error:
            self._down(self.url.describe(error))
        raise RedisUnavailable(self.status.problem)

    def on_exchange(self, exchange: Callable[[], Awaitable[None]]) -> None:
        """Run `exchange` every sync_every while Redis is up (it calls `run`)."""
        self._exchanges.append(exchange)

    def wake(self) -> None:
        """Exchange now."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep())

    async def close(self) -> None:
        self._closed = True  # besides the cancel: Python 3.11's asyncio.timeout can swallow one
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Bounded: a stop must not wait on a Redis that does not answer.
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            async with asyncio.timeout(1.0):
                await self.client.aclose()

    def health(self) -> dict[str, Any]:
        return {"state": "up" if self.up else "down", "url": self.url.redacted, "problem": self.status.problem or None,
                "since_seconds": round(time.monotonic() - self.status.changed_at, 1)}

    def _down(self, problem: str) -> None:
        if self.up:
            log.error("Redis at %s is not answering (%s): %s", self.url.redacted, problem, self._while_down)
        self.status.failed(problem)

    async def _prepare(self) -> None:
        """Connections open and scripts loaded before callers need them: a burst of calls should not
        pay for that within the timeout."""
        async with asyncio.timeout(max(1.0, self.timeout)):
            await asyncio.gather(*(self.client.ping() for _ in range(4)))
            for source in self._scripts:
                await self.client.script_load(source)

    async def _keep(self) -> None:
        try:
            await self._prepare()
        except (TimeoutError, RedisError, OSError) as error:
            self._down(self.url.describe(error))
        while not self._closed:
            if self.up:
                await self._exchange_all()
                continue
            await asyncio.sleep(self.retry_every)
            try:
                await self._prepare()
            except (TimeoutError, RedisError, OSError):
                continue
            log.warning("Redis at %s answers again: %s", self.url.redacted, self._when_back)
            self.status.recovered()

    async def _exchange_all(self) -> None:
        for exchange in self._exchanges:
            try:
                await exchange()
            except RedisUnavailable:
                break
            except Exception:
                log.exception("exchange with Redis failed unexpectedly")
        # A timer, not asyncio.timeout: a cancel at the moment it fires must not be lost.
        timer = asyncio.get_running_loop().call_later(self.sync_every, self._wake.set)
        await self._wake.wait()
        timer.cancel()
        self._wake.clear()
