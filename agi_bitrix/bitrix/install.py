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
(api-reference/events/safe-event-handlers.md). A token file present means "not the first
install": a call must carry the application_token stored in it (403 otherwise), and a file
without one (written by `oauth login` or an admin) takes no install call at all: to install
again, the admin removes the file first (docs/call-card.md, "Installing again"). The first
install, with no token file yet, is checked the way that page advises: the portal it names must
be the configured one, and the portal must accept the access token it brought and name our
application for it (`app.info`'s CODE is the application's client_id: training.bitrix24.com
rest_help/general/app_info.php shows "local.56017020f07e17.98523769"), so a stranger cannot plant
tokens, not even another application's.

Anyone can POST here, so nothing is asked of the portal before the cheap local checks pass, and
the `app.info` questions have an allowance of their own (VERIFY_BURST, then one per
VERIFY_INTERVAL seconds), refused at once when spent: a flood of forged installs cannot spend the
request budget the calls' lookups need. Refusals are logged at once, then at most once a minute
per kind with a count, and each is reported to `count_refusal` with one of InstallRefusal (the
Application counts them in agi_bitrix_install_refused_total{reason}; this module knows no metrics).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import aiohttp

from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import AuthRejected, BitrixError, TokenExpired, TokenFileError
from agi_bitrix.bitrix.oauth import OAuthTokens, same_portal
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.bitrix.refusals import REFUSAL_LOG_INTERVAL, QuietLog
from agi_bitrix.bitrix.tokenfile import Tokens

log = logging.getLogger("agi_bitrix.oauth")

APP_INFO = "app.info"
# The portal's questions a first install may cost: a genuine install needs one; a few more let an
# admin retry at once. Then one per VERIFY_INTERVAL seconds.
VERIFY_BURST = 3
VERIFY_INTERVAL = 20.0
REINSTALL_DOCS = 'docs/call-card.md, section "Installing again"'
# Why an install POST was not taken: a closed set (mypy holds every call to it), so a flood of
# forged POSTs cannot grow a metric's labels.
InstallRefusal = Literal[
    "no_oauth",                    # 404: the config has no OAuth application (a reload turned it off)
    "no_tokens",                   # 400: no access and refresh token in the request
    "no_application_token",        # 400: a first install without the portal's proof for later calls
    "other_portal",                # 403: it names another portal than bitrix.oauth.portal_url
    "allowance_spent",             # 429: more first installs than the portal is asked about
    "portal_rejected_token",       # 403: the portal does not accept the access token it came with
    "other_application",           # 403: app.info names another application
    "portal_unreachable",          # 502: the portal could not be asked
    "tokens_already_stored",       # 403: a token file without application_token (oauth login)
    "application_token_mismatch",  # 403: a later call without the stored application_token
    "stored_meanwhile",            # 409: a token file appeared while the install was checked
    "not_saved",                   # 500: the token file could not be written
]
INSTALL_REFUSALS: tuple[InstallRefusal, ...] = get_args(InstallRefusal)


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
                 timeout: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 count_refusal: Callable[[InstallRefusal], None] = lambda reason: None) -> None:
        self._current = current  # the running portal client: its tokens and its request budget
        self._session = session
        self._timeout = timeout
        self._allowance = RateLimiter(1 / VERIFY_INTERVAL, VERIFY_BURST, clock)
        self._refusals = QuietLog(log, "like it", REFUSAL_LOG_INTERVAL, clock)
        self._count_refusal = count_refusal  # called with one of InstallRefusal

    def _refuse(self, reason: InstallRefusal, status: int, error: str) -> InstallAnswer:
        """Every answer but success goes through here, so each is counted with its bounded reason."""
        self._count_refusal(reason)
        return (status, {"error": error})

    async def handle(self, form: Mapping[str, str], peer: str) -> InstallAnswer:
        portal = self._current()
        tokens = portal.auth
        if not isinstance(tokens, OAuthTokens):
            return self._refuse("no_oauth", 404, "no OAuth application is configured")
        event = _read(form)
        if event is None:
            self._refusals.warning("OAuth install callback from %s refused: no access and refresh token in the"
                                   " request", peer)
            return self._refuse("no_tokens", 400, "auth data is required")
        first = tokens.token_file.stamp() is None
        refused = (self._first_install_refused(event, tokens, peer) if first
                   else self._later_call_refused(event, tokens, peer))
        if refused is not None:
            return refused
        if event.event != "ONAPPINSTALL":
            log.info("OAuth install callback: event %s ignored", event.event[:40] or "(none)")
            return (200, {"status": "ignored"})
        if first:
            refused = await self._verify(event, tokens, portal)
            if refused is not None:
                return refused
        try:
            await tokens.install(event.tokens, first=first)
        except FileExistsError:
            log.warning("OAuth install callback: %s appeared while this install was checked; not replaced",
                        tokens.token_file.path)
            return self._refuse("stored_meanwhile", 409, "tokens were stored meanwhile")
        except (OSError, TokenFileError) as error:
            detail = error.detail if isinstance(error, TokenFileError) else error.strerror
            log.error("OAuth install callback: cannot save the tokens to %s (%s)", tokens.token_file.path, detail)
            return self._refuse("not_saved", 500, "the tokens could not be saved")
        log.info("OAuth: application installed on %s (member_id %s, scopes %s); tokens saved in %s",
                 event.domain or tokens.settings.portal_url, event.tokens.member_id or "-",
                 event.tokens.scope or "-", tokens.token_file.path)
        return (200, {"status": "success"})

    def _later_call_refused(self, event: _InstallEvent, tokens: OAuthTokens, peer: str) -> InstallAnswer | None:
        """A token file is there: only the application_token stored in it proves the portal."""
        stored = tokens.token_file.load_if_present()
        expected = stored.application_token if stored is not None else ""
        if not expected:
            self._refusals.warning(
                "OAuth install callback from %s refused: %s already holds tokens but no application_token (written"
                " by `agi-bitrix oauth login` or by hand), so no install call can be proven to come from the"
                " portal. To install the application again, remove that file first: %s",
                peer, tokens.token_file.path, REINSTALL_DOCS)
            return self._refuse("tokens_already_stored", 403,
                                "tokens are already stored; remove the token file to install again")
        given = event.application_token
        if not hmac.compare_digest(given.encode(), expected.encode()):
            self._refusals.warning(
                f"OAuth install callback from %s refused: its application_token"
                f" {'does not match' if given else 'is missing, unlike'} the one stored in %s",
                peer, tokens.token_file.path)
            return self._refuse("application_token_mismatch", 403, "application_token does not match")
        return None

    def _first_install_refused(self, event: _InstallEvent, tokens: OAuthTokens, peer: str) -> InstallAnswer | None:
        """No token file yet: the local checks, then the allowance, before the portal is asked."""
        if event.event != "ONAPPINSTALL":
            return None  # answered "ignored"; nothing is stored
        if not event.application_token:
            self._refusals.warning("OAuth install callback from %s refused: no application_token, so the portal's"
                                   " later calls could not be told from anyone's", peer)
            return self._refuse("no_application_token", 400, "application_token is required")
        configured = tokens.settings.portal_url
        endpoint = event.tokens.client_endpoint
        if not endpoint or not same_portal(endpoint, configured):
            self._refusals.warning("OAuth install callback from %s refused: it names another portal than"
                                   " bitrix.oauth.portal_url (%s)", peer, configured)
            return self._refuse("other_portal", 403, "not the configured portal")
        if self._allowance.reserve(0.0) is None:
            self._refusals.warning("OAuth install callback from %s refused: more first installs than the portal"
                                   " is asked about (%d, then one per %g s); try again later",
                                   peer, VERIFY_BURST, VERIFY_INTERVAL)
            return self._refuse("allowance_spent", 429, "too many installation attempts; try again later")
        return None

    async def _verify(self, event: _InstallEvent, tokens: OAuthTokens, portal: PortalClient) -> InstallAnswer | None:
        """The first install: does the configured portal accept the token it sent, for our application?"""
        configured = tokens.settings.portal_url
        # The calls' request budget, as a request that can wait: it leaves half the burst to lookups.
        checker = PortalClient(configured, self._session, timeout=self._timeout, budget=portal.budget,
                               auth=_OneToken(event.tokens.access_token, configured))
        try:
            info = await checker.call(APP_INFO, {}, max_wait=self._timeout)
        except AuthRejected as error:
            log.warning("OAuth install callback refused: the portal did not accept the access token it came with"
                        " (%s: %s)", error.reason, error.detail)
            return self._refuse("portal_rejected_token", 403, "the portal does not accept these tokens")
        except BitrixError as error:
            log.error("OAuth install callback: cannot check its tokens with the portal (%s: %s); not saved",
                      error.reason, error.detail)
            return self._refuse("portal_unreachable", 502, "the portal could not be asked")
        code = _application_code(info)
        if code != tokens.settings.client_id:
            log.warning("OAuth install callback refused: its access token is another application's (app.info"
                        " CODE %r, bitrix.oauth.client_id %s)", code[:64], tokens.settings.client_id)
            return self._refuse("other_application", 403, "the tokens belong to another application")
        return None


def _application_code(info: Any) -> str:
    """app.info's CODE: for a local application, its client_id (see the module's docstring)."""
    code = info.get("CODE") if isinstance(info, dict) else None
    return code if isinstance(code, str) else ""
