"""The install callback: the portal's POST with an application's first tokens, when it is installed.

A local application saved with "Uses API only" has no page; the portal POSTs the tokens to its
"Initial installation path" instead (bitrix24/b24restdocs:
settings/app-installation/local-apps/installation-callback.md). The body is a form with the
ONAPPINSTALL event's fields, nested as `auth[access_token]`, `auth[refresh_token]`,
`auth[expires_in]`, `auth[client_endpoint]`, `auth[member_id]`, `auth[domain]`, `auth[scope]`,
`auth[application_token]` (api-reference/common/events/on-app-install.md,
settings/oauth/simple-way.md "Tokens for an Application Without an Interface"). An install page
gets the same in the shape of settings/oauth/simple-way.md: `AUTH_ID`, `AUTH_EXPIRES`,
`REFRESH_ID`, `SERVER_ENDPOINT`, `member_id`, `APPLICATION_TOKEN`, `APPLICATION_SCOPE` in the body
and `DOMAIN`, `PROTOCOL`, `APP_SID` in the query string; both are read.

Who may call it: `application_token` is the portal's proof on every later call
(api-reference/events/safe-event-handlers.md). Once one is stored, a call without the same one is
refused (403). The first install, with none stored yet, is checked the way that page advises: the
portal it names must be the configured one, and the portal must accept the access token it
brought (`app.info`), so a stranger cannot plant tokens.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import AuthRejected, BitrixError, TokenExpired, TokenFileError
from agi_bitrix.bitrix.oauth import OAuthTokens, same_portal
from agi_bitrix.bitrix.tokenfile import Tokens

log = logging.getLogger("agi_bitrix.oauth")

APP_INFO = "app.info"


# An answer to the portal: the HTTP status and a JSON body.
InstallAnswer = tuple[int, dict[str, str]]


@dataclass(frozen=True)
class _InstallEvent:
    event: str
    tokens: Tokens
    domain: str
    application_token: str


def _read(form: Mapping[str, str]) -> _InstallEvent | None:
    """The install event in either documented shape, or None when the tokens are not all there."""
    if "auth[access_token]" in form or "auth[application_token]" in form:
        def auth(key: str) -> str:
            return form.get(f"auth[{key}]", "")
        access, refresh, expires_in = auth("access_token"), auth("refresh_token"), auth("expires_in")
        domain, endpoint, scope = auth("domain"), auth("client_endpoint"), auth("scope")
        member_id, application_token, event = auth("member_id"), auth("application_token"), form.get("event", "")
    else:
        access, refresh, expires_in = form.get("AUTH_ID", ""), form.get("REFRESH_ID", ""), form.get("AUTH_EXPIRES", "")
        domain, scope, member_id = form.get("DOMAIN", ""), form.get("APPLICATION_SCOPE", ""), form.get("member_id", "")
        application_token, event = form.get("APPLICATION_TOKEN", ""), "ONAPPINSTALL"
        # The page's form names no REST address; the portal's own is https://DOMAIN/rest/ (PROTOCOL 1).
        scheme = "http" if form.get("PROTOCOL") == "0" else "https"
        endpoint = f"{scheme}://{domain}/rest/" if domain else ""
    if not (access and refresh):
        return None
    lifetime = float(expires_in) if expires_in.isdigit() and int(expires_in) > 0 else 3600.0
    # The event lists scopes with spaces, the token server with commas: kept as the token server does.
    tokens = Tokens(access, refresh, time.time() + lifetime, client_endpoint=endpoint, member_id=member_id,
                    scope=",".join(scope.replace(",", " ").split()), application_token=application_token)
    return _InstallEvent(event.upper(), tokens, domain, application_token)


class _OneToken:
    """The install event's own access token, to ask the portal whether it is genuine."""

    def __init__(self, token: str, base: str) -> None:
        self._token, self._base = token, base

    async def access_token(self) -> str:
        return self._token

    async def refresh(self, rejected: str) -> str:
        raise TokenExpired("expired_token", "the install event's access token has expired")

    def secrets(self) -> tuple[str, ...]:
        return (self._token,)

    def rest_base(self) -> str:
        return self._base


class InstallCallback:
    """Answers the portal's install POSTs for the application configured now."""

    def __init__(self, current: Callable[[], PortalClient], session: aiohttp.ClientSession, *,
                 timeout: float = 10.0) -> None:
        self._current = current  # the running portal client: its tokens and its request budget
        self._session = session
        self._timeout = timeout

    async def handle(self, form: Mapping[str, str], peer: str) -> InstallAnswer:
        portal = self._current()
        tokens = portal.auth
        if not isinstance(tokens, OAuthTokens):
            return (404, {"error": "no OAuth application is configured"})
        stored = tokens.token_file.load_if_present()
        expected = stored.application_token if stored is not None else ""
        event = _read(form)
        given = event.application_token if event is not None else form.get("auth[application_token]", "")
        if expected and not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("OAuth install callback from %s refused: its application_token %s the one stored in"
                        " %s", peer, "does not match" if given else "is missing, unlike", tokens.token_file.path)
            return (403, {"error": "application_token does not match"})
        if event is None:
            log.warning("OAuth install callback from %s refused: no access and refresh token in the request", peer)
            return (400, {"error": "auth data is required"})
        if event.event != "ONAPPINSTALL":
            log.info("OAuth install callback: event %s ignored", event.event[:40] or "(none)")
            return (200, {"status": "ignored"})
        if not expected:
            refused = await self._verify(event, tokens, portal)
            if refused is not None:
                return refused
        try:
            await tokens.install(event.tokens, first=False)
        except (OSError, TokenFileError) as error:
            detail = error.detail if isinstance(error, TokenFileError) else error.strerror
            log.error("OAuth install callback: cannot save the tokens to %s (%s)", tokens.token_file.path, detail)
            return (500, {"error": "the tokens could not be saved"})
        log.info("OAuth: application installed on %s (member_id %s, scopes %s); tokens saved in %s",
                 event.domain or tokens.settings.portal_url, event.tokens.member_id or "-",
                 event.tokens.scope or "-", tokens.token_file.path)
        return (200, {"status": "success"})

    async def _verify(self, event: _InstallEvent, tokens: OAuthTokens, portal: PortalClient) -> InstallAnswer | None:
        """The first install: is this the configured portal, and does it accept the token it sent?"""
        configured = tokens.settings.portal_url
        endpoint = event.tokens.client_endpoint
        if not endpoint or not same_portal(endpoint, configured):
            log.warning("OAuth install callback refused: it names another portal than bitrix.oauth.portal_url"
                        " (%s)", configured)
            return (403, {"error": "not the configured portal"})
        checker = PortalClient(configured, self._session, timeout=self._timeout, budget=portal.budget,
                               auth=_OneToken(event.tokens.access_token, configured))
        try:
            await checker.call(APP_INFO, {}, max_wait=self._timeout)
        except AuthRejected as error:
            log.warning("OAuth install callback refused: the portal did not accept the access token it came with"
                        " (%s: %s)", error.reason, error.detail)
            return (403, {"error": "the portal does not accept these tokens"})
        except BitrixError as error:
            log.error("OAuth install callback: cannot check its tokens with the portal (%s: %s); not saved",
                      error.reason, error.detail)
            return (502, {"error": "the portal could not be asked"})
        return None
