"""What the portal client, the lookup and its cache are told: the `bitrix:` and `cache:` sections.

Declared with agi_bitrix.schema (key, default, bounds in one place); agi_bitrix.config reads them
from the file, with its own checks for the webhook URL and the OAuth application. Those checks are
the portal client's own (`portal_base`, `check_host`), so `check` refuses exactly what `serve` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from agi_bitrix.redis_link import parse_redis_url
from agi_bitrix.schema import integer, number, section, text

_PLACEHOLDER_CODE = "your-webhook-code"
# The cloud's operating-time budget: seconds of execution per method per application or webhook,
# over ten one-minute baskets (limits.md in bitrix24/b24restdocs; 480 s is its example).
OPERATING_LIMIT = 480.0
OPERATING_WINDOW = 600.0
_MONITORING_PATHS = ("/metrics", "/healthz")


def _install_path(value: str) -> str:
    if value and (not value.startswith("/") or value in _MONITORING_PATHS or any(c.isspace() for c in value)):
        raise ValueError(f"{value!r} must be a URL path like /bitrix/install, other than /metrics and /healthz")
    return value


# Nothing may follow: the client appends METHOD.json, so a query, a fragment or a file name
# would end up in the middle of every request's URL.
_WEBHOOK_PATH = re.compile(r"^(?P<prefix>https?://[^?#\s]*/rest/[^/?#\s]+/)(?P<code>[^/?#\s]+)/?$")
_REST_BASE = re.compile(r"^(?P<prefix>https?://[^?#\s]*/rest/)$")
WEBHOOK_SHAPE = "expected an http(s) URL like https://PORTAL/rest/USER_ID/CODE/"
REST_BASE_SHAPE = "expected a URL like https://PORTAL/rest/"


def portal_base(url: str, *, oauth: bool = False) -> tuple[str, str]:
    """The URL that methods are appended to, and the webhook's secret code ("" with `oauth`).

    `url` is an inbound webhook, https://PORTAL/rest/USER_ID/CODE/ (the last slash optional), or
    with `oauth` the portal's REST URL, https://PORTAL/rest/. ValueError otherwise, with a message
    that never quotes the URL: it holds the secret code.
    """
    match = (_REST_BASE if oauth else _WEBHOOK_PATH).match(url)
    if match is None:
        raise ValueError(REST_BASE_SHAPE if oauth else WEBHOOK_SHAPE)
    check_host(url)
    if oauth:
        return match["prefix"], ""
    return match["prefix"] + match["code"] + "/", match["code"]


def check_host(url: str) -> None:
    """ValueError unless a request can be addressed to the host and port of the http(s) URL `url`.

    The resolver encodes host names with Python's IDNA codec, which refuses an empty part or
    one over 63 characters (`portal..bitrix24.ru`); found here, such a host is a config problem
    instead of an exception on every call.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # reading it checks it: a number from 0 to 65535
    except ValueError:
        raise ValueError("the host or port cannot be read (an [IPv6] address needs both brackets)") from None
    if not parts.hostname:
        raise ValueError("the URL has no host name")
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ValueError("the host name is not valid (a part between dots is empty or over 63 characters)") from None


@dataclass(frozen=True)
class OAuthSettings:
    """An OAuth application instead of the webhook; the fields without a default are required."""

    portal_url: str = text("portal_url")  # https://PORTAL/rest/
    client_id: str = text("client_id")
    client_secret: str = text("client_secret")
    token_file: str = text("token_file")  # JSON with the refresh token; rewritten on every refresh
    token_url: str = text("token_url", "https://oauth.bitrix.info/oauth/token/")
    # Where metrics.listen takes the portal's POST when the application is installed; "" = off.
    install_path: str = text("install_path", "", check=_install_path)


@dataclass(frozen=True)
class BitrixSettings:
    webhook_url: str = text("webhook_url")  # "" with oauth
    deadline: float = number("deadline", 2.0, 0, 30)
    # The portal's leaky bucket drains 2 requests/s and blocks at 50 (Enterprise: 5 and 250);
    # the default burst leaves room for the portal's other integrations.
    rate_per_second: float = number("rate_limit.per_second", 2.0, 0, 10_000, unit="requests per second")
    rate_burst: int = integer("rate_limit.burst", 40, 1, 100_000)
    # Each method's execution time per ten minutes that the portal allows (a self-hosted portal
    # that enables the limit defaults to 420); we pace each method to stay well under it.
    operating_limit: float = number("operating_limit", OPERATING_LIMIT, 1, 1_000_000, unit="seconds")
    pool_size: int = integer("pool_size", 10, 1, 1000)
    breaker_failures: int = integer("breaker.failures", 5, 1, 1000)
    breaker_cool_down: float = number("breaker.cool_down", 10.0, 0, 3600)
    oauth: OAuthSettings | None = section("oauth", OAuthSettings, absent=None)

    @property
    def is_placeholder(self) -> bool:
        return _PLACEHOLDER_CODE in self.webhook_url


@dataclass(frozen=True)
class CacheSettings:
    # 0 switches that part of the cache off.
    found_ttl: float = number("found_ttl", 60.0, 0, 86400, zero_is_off=True)
    not_found_ttl: float = number("not_found_ttl", 30.0, 0, 86400, zero_is_off=True)
    # On a portal failure, an answer up to this old is used instead.
    stale_for: float = number("stale_for", 3600.0, 0, 7 * 86400, zero_is_off=True)
    max_entries: int = integer("max_entries", 100_000, 0, 10_000_000)


def check_redis_url(value: str) -> str:
    """The URL read as `serve` reads it (agi_bitrix.redis_link); the message never quotes it: it may
    hold a password."""
    if value:
        parse_redis_url(value)
    return value


def _redis_prefix(value: str) -> str:
    if not value or any(char.isspace() for char in value):
        raise ValueError(f"{value!r} must be non-empty text without spaces, like agi-bitrix:")
    return value


@dataclass(frozen=True)
class RedisSettings:
    """The state servers against one portal share (agi_bitrix.bitrix.shared): its request budget,
    each method's operating time, the answers, single flight and the breaker. Off without the section."""

    # redis://[:PASSWORD@]HOST:PORT/DB; AGI_BITRIX_REDIS_URL overrides it (keeps the password out of the file).
    url: str = text("url")  # required; checked with check_redis_url
    key_prefix: str = text("key_prefix", "agi-bitrix:", check=_redis_prefix)
    # Each Redis command's deadline: well inside the lookup's, since a call waits for it.
    timeout: float = number("timeout", 0.1, 0, 1)
    # While Redis is down, how often it is tried again.
    retry_every: float = number("retry_every", 1.0, 0, 60)
    # While Redis is down each server takes this many-th part of the portal's budget on its own.
    servers: int = integer("servers", 2, 1, 1000)
    # Servers that leave through different addresses: the portal counts each address on its own,
    # so each names its address here and gets a bucket of its own ("" = all share one address).
    source_address: str = text("source_address", "")
    # A fresh answer read from Redis is used from this server's memory for this long without asking Redis.
    near_cache: float = number("near_cache", 1.0, 0, 60, zero_is_off=True)
    # How often the breaker and the operating time are exchanged with the other servers.
    sync_every: float = number("sync_every", 0.1, 0, 5)
