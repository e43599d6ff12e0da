"""Who may see the admin page, and what a form may do.

- Loopback only by default: with `http.listen` on a loopback address and no token, the pages
  are open to local clients (and to an SSH tunnel), but only under a loopback Host name, so a web
  page elsewhere cannot reach them by pointing its own domain at 127.0.0.1 (DNS rebinding).
- Elsewhere an access token is required (`http.token_file`, or the environment variable
  AGI_BITRIX_ADMIN_TOKEN), sent once through the login form and then carried by a cookie, or as
  `Authorization: Bearer TOKEN`; compared in constant time. Without one, the pages are refused
  to everyone and say why. /metrics and /healthz stay open either way (they hold no secret and
  no caller's number), so Prometheus and load balancers need nothing new.
- Forms that POST carry a per-process CSRF token, and a POST whose Origin is another site is refused.
- "Try a number" is rate-limited for the whole process (each try may cost a portal request). Wrong
  tokens are counted per source (an IPv4 address, an IPv6 /64): a source that sent too many
  waits, and nobody else does, so a right token is never refused for another's mistakes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path
from urllib.parse import unquote

from agi_bitrix.config import HttpSettings

ADMIN_TOKEN_ENV = "AGI_BITRIX_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16
COOKIE = "agi_bitrix_admin"
_COOKIE_CONTEXT = b"agi-bitrix admin page session"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """"127.0.0.1:9573" -> 127.0.0.1, "[::1]:9573" -> ::1, "localhost" -> localhost."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


@dataclass(frozen=True)
class AccessPolicy:
    token: str  # "" when none is set
    refusal: str  # why the pages are refused to everyone; "" when they are not
    where: str  # where the token came from, for the log

    @property
    def open_locally(self) -> bool:
        return not self.token and not self.refusal


def access_policy(settings: HttpSettings, environ: Mapping[str, str]) -> AccessPolicy:
    """What the pages require, from the listen address and the token's source."""
    token, where = environ.get(ADMIN_TOKEN_ENV, "").strip(), f"the environment variable {ADMIN_TOKEN_ENV}"
    if not token and settings.token_file:
        where = f"http.token_file {settings.token_file}"
        try:
            token = Path(settings.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            return AccessPolicy("", f"the access token cannot be read from {where}: {reason}", where)
        if not token:
            return AccessPolicy("", f"the access token file {settings.token_file} is empty", where)
    if token and len(token) < MIN_TOKEN_LENGTH:
        return AccessPolicy("", f"the access token from {where} is shorter than {MIN_TOKEN_LENGTH} characters", where)
    if not token and not is_loopback(settings.host):
        return AccessPolicy("", f"http.listen is {settings.host}, not a loopback address, and no access token"
                                f" is set (http.token_file or {ADMIN_TOKEN_ENV})", "")
    return AccessPolicy(token, "", where if token else "")


# A path on this site as RFC 3986 writes one (unreserved, sub-delims, ':', '@', '/', '%', and a
# query): no space, no control character, no backslash, nothing outside ASCII.
_LOCAL_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*")
_DECODE_ROUNDS = 3  # "%252F" is "%2F" once decoded, "/" twice; a third layer is refused


def local_path(target: str, default: str = "/") -> str:
    """`target` when it can only name a path on this site, else `default`.

    Browsers drop tabs and newlines from a URL and read a backslash as a slash, so "/\t/evil" and
    "/\\evil" both go to another host ("//evil"); encoded forms ("/%2F/evil") reach the same end
    through a proxy that decodes. So: ASCII path characters only, one leading "/" not followed by
    another "/" or "\", and the same again after each round of percent-decoding."""
    if not _LOCAL_PATH.fullmatch(target):
        return default
    text = target
    for _ in range(_DECODE_ROUNDS):
        if not (text.startswith("/") and text[1:2] not in ("/", "\\") and "\\" not in text
                and text.isascii() and text.isprintable()):
            return default
        decoded = unquote(text)
        if decoded == text:
            return target
        text = decoded
    return default


class Gate:
    """Checks one request against the policy; the cookie holds a value derived from the token,
    never the token itself."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy
        self.csrf = secrets.token_urlsafe(32)
        self._cookie = (hmac.new(policy.token.encode(), _COOKIE_CONTEXT, hashlib.sha256).hexdigest()
                        if policy.token else "")

    @property
    def cookie_value(self) -> str:
        return self._cookie

    def refusal(self, host_header: str, cookie: str, authorization: str) -> str:
        """Why this request may not see the pages ("" when it may): "login" when it should
        present the token, otherwise a sentence."""
        if self.policy.refusal:
            return self.policy.refusal
        if self.policy.open_locally:
            if not is_loopback(_host_name(host_header)):
                return (f"the page is open only under a loopback name (127.0.0.1, localhost, [::1]);"
                        f" this request named host {host_header!r}")
            return ""
        if cookie and hmac.compare_digest(cookie.encode(), self._cookie.encode()):
            return ""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(given.strip()):
            return ""
        return "login"

    def token_matches(self, given: str) -> bool:
        return bool(self.policy.token) and hmac.compare_digest(given.encode(), self.policy.token.encode())

    def csrf_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf.encode())


class SlidingWindow:
    """At most `limit` events in any `period` seconds, for the whole process."""

    def __init__(self, limit: int, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.period = period
        self._times: deque[float] = deque()
        self._clock = clock

    def allow(self) -> float:
        """0 when the event may happen now (and counts it); else seconds until it may."""
        wait = self.blocked()
        if not wait:
            self._times.append(self._clock())
        return wait

    @property
    def count(self) -> int:
        """Events in the period up to now."""
        self.blocked()
        return len(self._times)

    def blocked(self) -> float:
        """0 when an event may happen now (without counting one); else seconds until it may."""
        now = self._clock()
        while self._times and self._times[0] <= now - self.period:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return self._times[0] + self.period - now
        return 0.0


class LoginThrottle:
    """At most `limit` wrong tokens from one source in any `period` seconds; its next attempts,
    right or wrong, wait (a guesser learns nothing from them), while other sources are untouched.
    An IPv6 source counts by its /64, which one host usually holds whole. The sources remembered
    are bounded: past `max_sources`, the one that failed least recently is forgotten."""

    def __init__(self, limit: int, period: float, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = 4096) -> None:
        self.limit = limit
        self.period = period
        self.max_sources = max_sources
        self._clock = clock
        self._failures: OrderedDict[str, SlidingWindow] = OrderedDict()

    def wait(self, peer: str) -> float:
        """0 when `peer` may try a token now; else seconds until it may."""
        window = self._failures.get(source_of(peer))
        return window.blocked() if window is not None else 0.0

    def failed(self, peer: str) -> int:
        """Counts a wrong token from `peer`; returns how many its source sent in the period."""
        source = source_of(peer)
        window = self._failures.pop(source, None) or SlidingWindow(self.limit, self.period, self._clock)
        self._failures[source] = window  # the most recent failure last
        window.allow()
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)
        return window.count


def source_of(peer: str) -> str:
    """Who is counted for a wrong token: the IPv4 address, or the IPv6 /64 (an IPv4-mapped
    IPv6 address is its IPv4 one); a peer without an address counts as itself."""
    try:
        address = ip_address(peer.split("%")[0])
    except ValueError:
        return peer
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ip_network(f"{address}/64", strict=False)) if address.version == 6 else str(address)
