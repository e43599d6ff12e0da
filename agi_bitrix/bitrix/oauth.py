"""OAuth for Bitrix24 applications, the alternative to an inbound webhook.

Requests go to https://PORTAL/rest/METHOD.json with the access token as `auth`. An access token
lives an hour; it is refreshed when it is about to expire, or when the portal says
`expired_token`, at https://oauth.bitrix.info/oauth/token/. Every refresh also replaces the
refresh token (it lives 180 days and works once), so the new pair is written to the token
file — atomically, before it is used — or a crash at the wrong moment would lock the server
out of the portal. Concurrent requests that all find the token expired share one refresh.

The tokens and the client secret are passwords: they never appear in a log line or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import (
    PORTAL_CODE,
    AuthRejected,
    BadResponse,
    LocalFault,
    PortalRefused,
    PortalTimeout,
    PortalUnreachable,
    TokenFileError,
)
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.bitrix.settings import BitrixSettings, OAuthSettings

log = logging.getLogger("agi_bitrix.oauth")

TOKEN_URL = "https://oauth.bitrix.info/oauth/token/"
# Refresh this long before the access token's stated expiry, so no request carries a token
# that expires on its way.
EXPIRY_MARGIN = 60.0
# The token server's answers when the refresh token itself is no good (expired after 180 days,
# already used, the application reinstalled or removed).
REFRESH_REJECTED = frozenset({"invalid_grant", "invalid_token", "expired_token", "NO_AUTH_FOUND"})
CLIENT_REJECTED = frozenset({"invalid_client", "invalid_request", "unauthorized_client"})


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_at: float  # unix time; 0 when unknown (refresh before the first request)


class TokenFile:
    """The token pair on disk, as JSON, readable only by its owner; replaced atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> Tokens:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as error:
            raise TokenFileError(f"cannot read token file {self.path}: {error.strerror}") from None
        except ValueError:
            raise TokenFileError(f"token file {self.path} is not JSON") from None
        refresh = data.get("refresh_token") if isinstance(data, dict) else None
        if not isinstance(refresh, str) or not refresh:
            raise TokenFileError(f"token file {self.path} has no refresh_token")
        access = data.get("access_token")
        expires_at = data.get("expires_at")
        return Tokens(access if isinstance(access, str) else "", refresh,
                      float(expires_at) if isinstance(expires_at, (int, float)) else 0.0)

    def save(self, tokens: Tokens) -> None:
        """Write a temporary file beside the real one, flush it to disk, rename it over."""
        text = json.dumps({"access_token": tokens.access_token, "refresh_token": tokens.refresh_token,
                           "expires_at": tokens.expires_at}, indent=2) + "\n"
        directory = self.path.parent
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:  # mkstemp: mode 0600
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        # The rename itself is durable only once the directory is flushed.
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


class OAuthTokens:
    """The current access token, refreshed when needed; shared by every request of the process."""

    def __init__(self, settings: OAuthSettings, session: aiohttp.ClientSession, *, timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.token_file = TokenFile(settings.token_file)
        self._session = session
        self._client_id = settings.client_id
        self._client_secret = settings.client_secret
        self._token_url = settings.token_url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._tokens: Tokens | None = None
        self._lock = asyncio.Lock()

    def secrets(self) -> tuple[str, ...]:
        """What must never be shown: the client secret and the tokens in use."""
        tokens = self._tokens
        values = (self._client_secret, *((tokens.access_token, tokens.refresh_token) if tokens else ()))
        return tuple(value for value in values if value)

    async def access_token(self) -> str:
        tokens = self._tokens
        if tokens is not None and tokens.access_token and self._clock() < tokens.expires_at - EXPIRY_MARGIN:
            return tokens.access_token
        return await self.refresh(rejected=tokens.access_token if tokens else "")

    async def refresh(self, rejected: str) -> str:
        """A new access token instead of `rejected`; one refresh however many callers ask at once."""
        async with self._lock:
            tokens = self._tokens
            if tokens is None:
                tokens = self._tokens = self.token_file.load()
            fresh = tokens.access_token and self._clock() < tokens.expires_at - EXPIRY_MARGIN
            if fresh and tokens.access_token != rejected:
                return tokens.access_token  # someone else refreshed while we waited
            self._tokens = await self._refresh(tokens.refresh_token)
            return self._tokens.access_token

    async def _refresh(self, refresh_token: str) -> Tokens:
        params = {"grant_type": "refresh_token", "client_id": self._client_id,
                  "client_secret": self._client_secret, "refresh_token": refresh_token}
        try:
            async with self._session.get(self._token_url, params=params, timeout=self._timeout,
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
            raise LocalFault("oauth_bad_url",
                             f"cannot build the OAuth token request: {type(error).__name__}") from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BadResponse("oauth_bad_answer", f"the OAuth token server answered HTTP {status} without JSON")
        refused = answer.get("error")
        if refused:
            raise self._refusal(str(refused), status)
        access, refresh = answer.get("access_token"), answer.get("refresh_token")
        if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
            raise BadResponse("oauth_bad_answer", f"the OAuth token server answered HTTP {status} without tokens")
        expires_in = answer.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 3600.0
        tokens = Tokens(access, refresh, self._clock() + lifetime)
        try:
            # Before the token is used: the old refresh token no longer works.
            self.token_file.save(tokens)
        except OSError as error:
            log.error("OAuth: the new refresh token could not be saved to %s (%s); it is kept in memory,"
                      " but after a restart this server cannot reach the portal until you put a fresh"
                      " refresh token there", self.token_file.path, error.strerror)
        log.info("OAuth: access token refreshed; the new refresh token is saved in %s", self.token_file.path)
        return tokens

    def _refusal(self, code: str, status: int) -> PortalRefused:
        # Becomes part of a reason (B24_ERROR): ASCII identifiers only, `oauth_` plus at most 57.
        safe_code = code if PORTAL_CODE.fullmatch(code) and len(code) <= 57 else "error"
        if safe_code in REFRESH_REJECTED:
            log.error("OAuth: Bitrix24 rejected the refresh token in %s (%s, HTTP %s). Every portal request"
                      " fails until you reinstall the application or write a fresh refresh_token into"
                      " that file.", self.token_file.path, safe_code, status)
            return AuthRejected("refresh_token_rejected", f"the refresh token was rejected ({safe_code})")
        if safe_code in CLIENT_REJECTED:
            log.error("OAuth: Bitrix24 rejected the application's client_id/client_secret (%s, HTTP %s);"
                      " check bitrix.oauth in the config", safe_code, status)
            return AuthRejected("oauth_client_rejected", f"client_id/client_secret rejected ({safe_code})")
        return PortalRefused(f"oauth_{safe_code}", f"the OAuth token server refused: {safe_code}, HTTP {status}")


def portal_client(bitrix: BitrixSettings, session: aiohttp.ClientSession,
                  previous: PortalClient | None = None) -> PortalClient:
    """The portal client the settings ask for: OAuth when bitrix.oauth is set, else the webhook.

    On a reload, pass the client in use as `previous`: when the application is the same, its
    tokens are kept, so two token holders never race to spend one refresh token; and the request
    budget is kept unless its rate changed, so a reload cannot grant a fresh burst the portal
    would refuse.
    """
    budget = previous.budget if previous is not None else None
    if budget is None or (budget.per_second, budget.burst) != (bitrix.rate_per_second, bitrix.rate_burst):
        budget = RateLimiter(bitrix.rate_per_second, bitrix.rate_burst)
    oauth = bitrix.oauth
    if oauth is None:
        return PortalClient(bitrix.webhook_url, session, timeout=bitrix.deadline, budget=budget)
    tokens = previous.auth if previous is not None else None
    if not isinstance(tokens, OAuthTokens) or tokens.settings != oauth:
        tokens = OAuthTokens(oauth, session)
    return PortalClient(oauth.portal_url, session, timeout=bitrix.deadline, budget=budget, auth=tokens)
