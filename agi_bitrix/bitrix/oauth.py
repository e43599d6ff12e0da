"""OAuth for Bitrix24 applications, the alternative to an inbound webhook.

As Bitrix24's REST docs describe it (bitrix24/b24restdocs: settings/oauth/index.md,
settings/oauth/auto-renewal.md, settings/oauth/error-codes.md): requests go to the
`client_endpoint` the token server names (https://PORTAL/rest/) with the access token as `auth`.
An access token lives an hour; it is refreshed when it is about to expire, or when the portal says
`expired_token`, at https://oauth.bitrix.info/oauth/token/. Every refresh also replaces the
refresh token (it lives 180 days and works once), so the new pair is written to the token
file — atomically, before it is used — or a crash at the wrong moment would lock the server
out of the portal. Concurrent requests that all find the token expired share one refresh, and
processes sharing one token file (`serve`, `agi-bitrix route`, a second server) take turns: a
refresh holds an flock on a lock file beside the token file, and re-reads the token file once it
holds it, so the second process uses the pair the first one saved instead of spending a refresh
token that no longer works.

When the token server rejects the refresh token (expired, spent, the application removed) or the
application itself, asking again cannot help: the refusal is logged once, shown in /healthz, and
every request fails at once with its reason, without asking the token server, until the token
file changes (`agi-bitrix oauth login`, the install callback, an admin) or the config is reloaded.

The tokens and the client secret are passwords: they never appear in a log line or an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, NamedTuple
from urllib.parse import urlencode, urlsplit

import aiohttp

from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import (
    PORTAL_CODE,
    BadResponse,
    BitrixError,
    LocalFault,
    OAuthClientRejected,
    OAuthCodeRejected,
    PortalRefused,
    PortalTimeout,
    PortalUnreachable,
    RefreshTokenRejected,
    RequestNotSent,
    TokenFileError,
    TokensRevoked,
    refusal_class,
)
from agi_bitrix.bitrix.operating import OperatingBudget
from agi_bitrix.bitrix.ratelimit import RateLimiter, RequestBudget
from agi_bitrix.bitrix.settings import OPERATING_WINDOW, BitrixSettings, OAuthSettings

# Re-exported: the command line and callers name them here.
from agi_bitrix.bitrix.tokenfile import TokenFile as TokenFile
from agi_bitrix.bitrix.tokenfile import Tokens as Tokens

log = logging.getLogger("agi_bitrix.oauth")

TOKEN_URL = "https://oauth.bitrix.info/oauth/token/"
# Refresh this long before the access token's stated expiry, so no request carries a token
# that expires on its way.
EXPIRY_MARGIN = 60.0
# The token server's codes (settings/oauth/error-codes.md), by what they say of the token file:
# the grant itself is no good (a refresh token expired after 180 days or already used, a code
# older than 30 s, the application reinstalled), or the application is (a wrong
# client_id/client_secret, or not installed any more).
_TOKEN_SERVER_REFUSALS: dict[str, type[TokensRevoked]] = {
    **dict.fromkeys(("invalid_grant", "invalid_token", "expired_token", "NO_AUTH_FOUND"), RefreshTokenRejected),
    **dict.fromkeys(("invalid_client", "invalid_request", "unauthorized_client"), OAuthClientRejected),
}
# How long a process waits for another one's refresh (its request to the token server is bounded
# by the timeout) beyond that timeout, before it calls the lock stuck.
LOCK_SLACK = 5.0
OAUTH_DOCS = 'docs/call-card.md, section "OAuth applications"'


def same_portal(url: str, portal_url: str) -> bool:
    """Whether `url` is on the configured portal: same scheme, host and port."""
    ours, theirs = urlsplit(portal_url), urlsplit(url)
    return (theirs.scheme, (theirs.netloc or "").lower()) == (ours.scheme, (ours.netloc or "").lower())


def authorize_url(settings: OAuthSettings, state: str) -> str:
    """Where the admin's browser goes to let the application in (settings/oauth/index.md, step 1)."""
    parts = urlsplit(settings.portal_url)
    return f"{parts.scheme}://{parts.netloc}/oauth/authorize/?" + urlencode(
        {"client_id": settings.client_id, "state": state})


async def request_tokens(settings: OAuthSettings, session: aiohttp.ClientSession, grant: Mapping[str, str], *,
                         timeout: float = 10.0, clock: Callable[[], float] = time.time) -> Tokens:
    """Ask the token server for a pair: `grant` is {"grant_type": "refresh_token", "refresh_token": ...}
    or {"grant_type": "authorization_code", "code": ...} (settings/oauth/auto-renewal.md, index.md)."""
    params = {"grant_type": grant["grant_type"], "client_id": settings.client_id,
              "client_secret": settings.client_secret,
              **{key: value for key, value in grant.items() if key != "grant_type"}}
    try:
        async with session.get(settings.token_url, params=params, timeout=aiohttp.ClientTimeout(total=timeout),
                               allow_redirects=False) as response:
            status = response.status
            body = await response.read()
    except TimeoutError:
        raise PortalTimeout("oauth_timeout", "the OAuth token server did not answer in time") from None
    except aiohttp.ClientError as error:
        # aiohttp's message may quote the URL with the secrets in its query: name the type only.
        raise PortalUnreachable("oauth_connect",
                                f"cannot reach the OAuth token server: {type(error).__name__}") from None
    except ValueError as error:
        # A token URL whose host the idna codec cannot encode: the request was never built.
        raise LocalFault("oauth_bad_url", f"cannot build the OAuth token request: {type(error).__name__}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise BadResponse("oauth_bad_answer", f"the OAuth token server answered HTTP {status} without JSON")
    refused = answer.get("error")
    if refused:
        raise _refusal(str(refused), status, grant["grant_type"])
    return _tokens_from(answer, status, clock)


def _tokens_from(answer: dict[str, Any], status: int, clock: Callable[[], float]) -> Tokens:
    access, refresh = answer.get("access_token"), answer.get("refresh_token")
    if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
        raise BadResponse("oauth_bad_answer", f"the OAuth token server answered HTTP {status} without tokens")
    expires_in = answer.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 3600.0
    extras = {name: answer[name] for name in ("client_endpoint", "member_id", "scope")
              if isinstance(answer.get(name), str)}
    return Tokens(access, refresh, clock() + lifetime, **extras)


def _refusal(code: str, status: int, grant_type: str) -> PortalRefused:
    # Becomes part of a reason (B24_ERROR): ASCII identifiers only, `oauth_` plus at most 57.
    safe_code = code if PORTAL_CODE.fullmatch(code) and len(code) <= 57 else "error"
    said = f"{safe_code}, HTTP {status}"
    revoked = _TOKEN_SERVER_REFUSALS.get(safe_code)
    if revoked is RefreshTokenRejected and grant_type == "authorization_code":
        return OAuthCodeRejected(said)
    if revoked is not None:
        return revoked(said)
    # PAYMENT_REQUIRED, invalid_scope...: classed like the portal's own codes (errors.py).
    return refusal_class(safe_code)(f"oauth_{safe_code}", f"the OAuth token server refused: {said}")


class _Advice(NamedTuple):
    do: str  # "{token_file}" is the token file's path
    login: bool  # the remedy is `agi-bitrix oauth login` (the admin page adds its config file)


# What an admin does about the error that put the tokens in their state, by its class (the most
# specific one listed wins); the error classes are errors.py's.
_ADVICE: dict[type[BitrixError], _Advice] = {
    RefreshTokenRejected: _Advice(login=True, do="the token server refused the refresh token (unused for 180"
                                  " days, already spent, or the application removed): log in again as the service's"
                                  " user; it stores new tokens in {token_file} and the server takes them up by itself"),
    OAuthClientRejected: _Advice(login=False, do="check bitrix.oauth.client_id and the client secret against the"
                                 " application's card in the portal, then reload the config (systemctl reload"
                                 " agi-bitrix)"),
    TokenFileError: _Advice(login=True, do="the token file {token_file} cannot be read or holds no refresh token:"
                            " log in again as the service's user"),
}
LOGIN_COMMAND = "agi-bitrix oauth login"


def advice_for(error: BitrixError, token_file: str) -> dict[str, str]:
    """/healthz's `advice` for the error behind the state (empty when an admin has nothing to do):
    `do`, and `run` when the remedy is logging in again."""
    for cls in type(error).__mro__:
        advice = _ADVICE.get(cls)
        if advice is not None:
            return {"do": advice.do.format(token_file=token_file), **({"run": LOGIN_COMMAND} if advice.login else {})}
    return {}


class OAuthTokens:
    """The current access token, refreshed when needed; shared by every request of the process."""

    def __init__(self, settings: OAuthSettings, session: aiohttp.ClientSession, *, timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.token_file = TokenFile(settings.token_file)
        self._session = session
        self._client_secret = settings.client_secret
        self._timeout = timeout
        self._clock = clock
        self._tokens: Tokens | None = None
        self._file_stamp: tuple[int, int, int] | None = None  # of the file as we last read or wrote it
        self._lock = asyncio.Lock()
        # The token server's refusal that stops asking it, and the token file as it was then.
        self._stopped: BitrixError | None = None
        self._stopped_stamp: tuple[int, int, int] | None = None
        self._problem: BitrixError | None = None  # the last failure to get a token, for /healthz
        self._ignored_endpoint = ""

    def secrets(self) -> tuple[str, ...]:
        """What must never be shown: the client secret and the tokens in use."""
        tokens = self._tokens
        values = (self._client_secret, *((tokens.access_token, tokens.refresh_token) if tokens else ()))
        return tuple(value for value in values if value)

    def rest_base(self) -> str:
        """Where requests go: the client_endpoint the token server named, when it is on the configured
        portal; otherwise bitrix.oauth.portal_url (see `_take`)."""
        tokens = self._tokens
        if tokens is not None and tokens.client_endpoint and same_portal(tokens.client_endpoint,
                                                                        self.settings.portal_url):
            return tokens.client_endpoint
        return self.settings.portal_url

    async def access_token(self) -> str:
        self._check_stopped()
        tokens = self._tokens
        if tokens is not None and tokens.access_token and self._clock() < tokens.expires_at - EXPIRY_MARGIN:
            return tokens.access_token
        return await self.refresh(rejected=tokens.access_token if tokens else "")

    async def refresh(self, rejected: str) -> str:
        """A new access token instead of `rejected`; one refresh however many callers ask at once,
        in this process and in the others that share the token file."""
        async with self._lock:
            self._check_stopped()
            tokens = self._tokens
            if tokens is None or self.token_file.stamp() != self._file_stamp:
                # First use, or someone wrote new tokens (oauth login, an admin): take theirs.
                tokens = self._load()
            if self._usable(tokens, rejected):
                return tokens.access_token  # someone else refreshed while we waited
            async with self.token_file.locked(self._timeout + LOCK_SLACK):
                return await self._refresh_holding_lock(rejected)

    async def _refresh_holding_lock(self, rejected: str) -> str:
        # Read again whatever the stamp says: another process may have refreshed while we waited
        # for the lock (a stamp can repeat when a replaced file's inode is reused at once).
        tokens = self._load()
        for _ in range(2):
            if self._usable(tokens, rejected):
                return tokens.access_token
            try:
                new = await request_tokens(self.settings, self._session,
                                           {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
                                           timeout=self._timeout, clock=self._clock)
            except TokensRevoked as error:
                # A writer that does not take the lock (an older version, an admin's script) may have
                # spent this refresh token and saved the next pair: that pair is not rejected.
                saved = self.token_file.load_if_present()
                if saved is None or saved.refresh_token == tokens.refresh_token:
                    self._problem = error
                    self._stop(error)
                    raise
                log.warning("OAuth: the token server refused the refresh token, but %s now holds another one"
                            " (written meanwhile by a process that does not take %s); using that one",
                            self.token_file.path, self.token_file.lock_path.name)
                tokens = self._load()
                continue
            except BitrixError as error:
                self._problem = error
                raise
            # The token server does not repeat what only the install event said.
            self._take(replace(new, application_token=tokens.application_token,
                               member_id=new.member_id or tokens.member_id, scope=new.scope or tokens.scope,
                               client_endpoint=new.client_endpoint or tokens.client_endpoint))
            log.info("OAuth: access token refreshed; the new refresh token is saved in %s", self.token_file.path)
            return new.access_token
        raise TokenFileError(f"{self.token_file.path} kept changing during a refresh")

    def _usable(self, tokens: Tokens, rejected: str) -> bool:
        return bool(tokens.access_token) and tokens.access_token != rejected and \
            self._clock() < tokens.expires_at - EXPIRY_MARGIN

    async def install(self, tokens: Tokens, *, first: bool) -> None:
        """New tokens from the install callback: saved (in turn with refreshes), then used; a stop
        is lifted. A `first` install raises FileExistsError if a token file appeared meanwhile."""
        async with self.token_file.locked(self._timeout + LOCK_SLACK):
            if first and self.token_file.stamp() is not None:
                raise FileExistsError(str(self.token_file.path))
            self.token_file.save(tokens)
            self._file_stamp = self.token_file.stamp()
        self._tokens = tokens
        self._stopped = self._problem = None
        self._note_endpoint(tokens)

    def resume(self) -> None:
        """A reload: ask the token server again even if it refused before."""
        self._stopped = None

    def state(self) -> tuple[bool, dict[str, Any]]:
        """Whether the application can get tokens, and what is known, for /healthz."""
        tokens = self._tokens
        stopped = self._stopped
        cause = stopped or self._problem
        if cause is not None:
            state = cause.reason
        elif tokens is None:
            state = "not used yet"
        else:
            state = "ok"
        body: dict[str, Any] = {
            "mode": "oauth application",
            "state": state,
            "token_file": str(self.token_file.path),
            "token_file_present": self.token_file.stamp() is not None,
            "rest_base": self.rest_base(),
        }
        if tokens is not None:
            body.update(member_id=tokens.member_id, scope=tokens.scope)
        if stopped is not None:
            body["detail"] = (f"{stopped.reason} ({stopped.detail}); the token server is not asked again until"
                              f" {self.token_file.path} changes (agi-bitrix oauth login) or the config is reloaded")
        elif self._problem is not None:
            body["detail"] = self._problem.detail
        if cause is not None and (advice := advice_for(cause, str(self.token_file.path))):
            body["advice"] = advice
        healthy = stopped is None and not isinstance(self._problem, TokenFileError)
        return healthy, body

    def _load(self) -> Tokens:
        stamp = self.token_file.stamp()
        try:
            tokens = self.token_file.load()
        except TokenFileError as error:
            self._problem = error
            raise
        self._file_stamp = stamp
        self._tokens = tokens
        self._note_endpoint(tokens)
        return tokens

    def _take(self, tokens: Tokens) -> None:
        self._tokens = tokens
        self._problem = None
        try:
            # Before the token is used: the old refresh token no longer works.
            self.token_file.save(tokens)
            self._file_stamp = self.token_file.stamp()
        except OSError as error:
            log.error("OAuth: the new refresh token could not be saved to %s (%s); it is kept in memory,"
                      " but after a restart this server cannot reach the portal until you run"
                      " `agi-bitrix oauth login`", self.token_file.path, error.strerror)
        self._note_endpoint(tokens)

    def _note_endpoint(self, tokens: Tokens) -> None:
        endpoint = tokens.client_endpoint
        if endpoint and not same_portal(endpoint, self.settings.portal_url) and endpoint != self._ignored_endpoint:
            # The access token would go to that host. The config names the portal this server
            # trusts; a renamed portal is the admin's call, not the token file's.
            self._ignored_endpoint = endpoint
            log.error("OAuth: the token server names %s as the portal's REST address, but bitrix.oauth.portal_url"
                      " is %s; requests keep going to portal_url. If the portal moved, set portal_url to the new"
                      " address and reload", endpoint, self.settings.portal_url)

    def _stop(self, error: BitrixError) -> None:
        self._stopped = error
        self._stopped_stamp = self.token_file.stamp()
        if isinstance(error, RefreshTokenRejected):
            # Expired (180 days unused), spent, or the application was removed or reinstalled.
            log.error("OAuth: Bitrix24 rejected the refresh token in %s (%s). Every portal request fails until"
                      " you run `agi-bitrix oauth login`, reinstall the application or write a fresh refresh_token"
                      " into that file; the token server is not asked again until that file changes or the"
                      " config is reloaded. See %s", self.token_file.path, error.detail, OAUTH_DOCS)
        else:
            log.error("OAuth: Bitrix24 rejected the application's client_id/client_secret (%s): check"
                      " bitrix.oauth in the config, and that the application is still installed on the portal."
                      " The token server is not asked again until %s changes or the config is reloaded. See %s",
                      error.detail, self.token_file.path, OAUTH_DOCS)

    def _check_stopped(self) -> None:
        stopped = self._stopped
        if stopped is None:
            return
        if self.token_file.stamp() == self._stopped_stamp:
            raise RequestNotSent(stopped.reason, f"rejected earlier ({stopped.detail}); not asking the token server"
                                 f" again until {self.token_file.path} changes or a reload")
        log.info("OAuth: %s changed; trying its tokens", self.token_file.path)
        self._stopped = None
        self._tokens = None


def portal_client(bitrix: BitrixSettings, session: aiohttp.ClientSession,
                  previous: PortalClient | None = None,
                  budgets: tuple[RequestBudget, OperatingBudget] | None = None) -> PortalClient:
    """The portal client the settings ask for: OAuth when bitrix.oauth is set, else the webhook.

    On a reload, pass the client in use as `previous`: when the application is the same, its
    tokens are kept, so two token holders never race to spend one refresh token; and the request
    budget is kept unless its rate changed, so a reload cannot grant a fresh burst the portal
    would refuse.
    """
    budget: RequestBudget | None = previous.budget if previous is not None else None
    if budget is None or (budget.per_second, budget.burst) != (bitrix.rate_per_second, bitrix.rate_burst):
        budget = RateLimiter(bitrix.rate_per_second, bitrix.rate_burst)
    # Likewise the operating time each method has spent, unless its limit changed.
    operating = previous.operating if previous is not None else None
    if operating is None or operating.limit != bitrix.operating_limit:
        operating = OperatingBudget(bitrix.operating_limit, OPERATING_WINDOW)
    if budgets is not None:  # shared by the servers of the portal (agi_bitrix.bitrix.shared)
        budget, operating = budgets
    oauth = bitrix.oauth
    if oauth is None:
        return PortalClient(bitrix.webhook_url, session, timeout=bitrix.deadline, budget=budget, operating=operating)
    tokens = previous.auth if previous is not None else None
    if not isinstance(tokens, OAuthTokens) or tokens.settings != oauth:
        tokens = OAuthTokens(oauth, session)
    else:
        tokens.resume()
    return PortalClient(oauth.portal_url, session, timeout=bitrix.deadline, budget=budget, auth=tokens,
                        operating=operating)
