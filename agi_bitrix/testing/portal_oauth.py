"""A Bitrix24 local application's OAuth side, for the emulator: authorize, token, REST with `auth`.

It follows Bitrix24's REST docs (bitrix24/b24restdocs):

- settings/oauth/index.md: GET /oauth/authorize/?client_id=&state= (the portal) sends the browser to
  the application's registered redirect URI with `code` (it works once, for 30 s), `state`,
  `domain`, `member_id`, `scope`, `server_domain`; an unknown client_id gets an error page and no
  redirect. The admin is taken as logged in, so no login form is shown (as when already logged in).
- settings/oauth/index.md step 2 and auto-renewal.md: GET /oauth/token/ (oauth.bitrix.info) with
  grant_type=authorization_code or refresh_token answers access_token (1 h), refresh_token (180
  days, spent by its use: every refresh gives a new one), expires, expires_in, client_endpoint,
  server_endpoint, member_id, scope, domain, status, user_id.
- settings/oauth/error-codes.md: `invalid_request`, `invalid_client` (wrong secret, or the
  application no longer installed), `invalid_grant` (a bad, spent or expired code or refresh
  token), and any other code a test asks for (PAYMENT_REQUIRED, invalid_scope...).
- settings/oauth/auto-renewal.md "Recommended token handling logic" and the general error list:
  POST /rest/METHOD with `auth` answers 401 `expired_token` for an access token past its hour and
  401 `invalid_token` for one the portal does not know; otherwise the request goes on to the
  portal emulator's webhook, so methods answer as they do there. `app.info` is answered here
  (api-reference/common/system/app-info.md): its CODE is the application the access token was
  issued to, for a local application its client_id (training.bitrix24.com
  rest_help/general/app_info.php shows CODE "local.56017020f07e17.98523769", STATUS "L"). Tokens
  of another application installed on the same portal are issued with `issue_tokens(client_id=...)`.
- api-reference/common/events/on-app-install.md and settings/oauth/simple-way.md: the install
  event, POSTed as a form with `event=ONAPPINSTALL`, `data[...]`, `ts` and `auth[...]` including
  `application_token`.

The same server stands for the portal (authorize, REST) and for oauth.bitrix.info (token); the
lifetimes and the clock are parameters so tests can pass 180 days in an instant. Tokens are
numbered by pair (access-0001-secret, refresh-0001-secret) so tests can follow them, and carry "secret" so
a test can spot one in a log.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web

from agi_bitrix.testing.portal import APPLICATION, AUTH_TYPE_HEADER, PortalEmulator
from agi_bitrix.testing.portal_faults import nginx_page
from agi_bitrix.testing.portal_wire import canonical_method, json_response

CODE_LIFETIME = 30.0
ACCESS_LIFETIME = 3600.0
REFRESH_LIFETIME = 180 * 86400.0
APP_INFO_METHOD = "app.info"


@dataclass
class _Grant:
    expires_at: float
    used: bool = False
    client_id: str = ""  # the application the token was issued to


class OAuthServer:
    """One local application installed on the emulated portal, and the token server that serves it."""

    def __init__(self, portal: PortalEmulator, *, client_id: str, client_secret: str, redirect_uri: str = "",
                 scope: str = "telephony,user", member_id: str = "a223c6b3710f85df22e9377d6c4f7553",
                 code_lifetime: float = CODE_LIFETIME, access_lifetime: float = ACCESS_LIFETIME,
                 refresh_lifetime: float = REFRESH_LIFETIME, clock: Callable[[], float] = time.time) -> None:
        """`redirect_uri` is what the admin registered as the application's handler path."""
        self.portal = portal
        self.client_id, self.client_secret = client_id, client_secret
        self.redirect_uri = redirect_uri
        self.scope, self.member_id = scope, member_id
        self.code_lifetime, self.access_lifetime, self.refresh_lifetime = (
            code_lifetime, access_lifetime, refresh_lifetime)
        self.clock = clock
        self.installed = True
        self.application_token = secrets.token_hex(16)
        # What tests look at: token requests that issued a pair, and the `auth` of every REST request.
        self.refreshes = 0
        self.codes_exchanged = 0
        self.token_requests = 0
        self.app_info_requests = 0
        self.seen_auth: list[str] = []
        self.refresh_delay = 0.0  # seconds the token server takes to refresh
        self.refresh_token = ""  # the newest refresh token issued
        self.url = ""
        self._generation = 0
        self._codes: dict[str, _Grant] = {}
        self._access: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}
        self._refusal: tuple[int, str, str] | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> OAuthServer:
        app = web.Application(client_max_size=self.portal.max_body + 1)
        app.router.add_get("/oauth/authorize/", self._authorize)
        app.router.add_route("*", "/oauth/token/", self._token)
        app.router.add_post("/rest/{method}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.url = f"http://{bound_host}:{bound_port}"
        self._http = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def client_endpoint(self) -> str:
        return f"{self.url}/rest/"

    @property
    def domain(self) -> str:
        return urlsplit(self.url).netloc

    # -- steering ---------------------------------------------------------------------------

    def issue_tokens(self, client_id: str = "") -> tuple[str, str]:
        """A new (access, refresh) pair, as the portal gives at installation: for this application, or
        for another one installed on the portal (`client_id`)."""
        now = self.clock()
        self._generation += 1
        access, refresh = f"access-{self._generation:04d}-secret", f"refresh-{self._generation:04d}-secret"
        application = client_id or self.client_id
        self._access[access] = _Grant(now + self.access_lifetime, client_id=application)
        self._refresh[refresh] = _Grant(now + self.refresh_lifetime, client_id=application)
        if application == self.client_id:
            self.refresh_token = refresh
        return access, refresh

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working with `expired_token`, as after its hour."""
        for grant in self._access.values():
            grant.expires_at = min(grant.expires_at, self.clock())

    def uninstall(self) -> None:
        """The application is removed: its tokens die and the token server no longer knows it."""
        self.installed = False
        self._access.clear()
        self._refresh.clear()

    def refuse_token_requests(self, code: str, description: str, status: int = 400) -> None:
        """Answer every token request with this error (PAYMENT_REQUIRED, invalid_scope...) from now on."""
        self._refusal = (status, code, description)

    def install_event(self, client_id: str = "") -> dict[str, str]:
        """The ONAPPINSTALL form for a fresh installation: new tokens and a new application_token (of
        another application on the portal with `client_id`: then ours stays as it was)."""
        if client_id:
            access, refresh = self.issue_tokens(client_id)
            return {**self._install_form(access, refresh), "auth[application_token]": secrets.token_hex(16)}
        self.installed = True
        self.application_token = secrets.token_hex(16)
        access, refresh = self.issue_tokens()
        return self._install_form(access, refresh)

    def _install_form(self, access: str, refresh: str) -> dict[str, str]:
        return {
            "event": "ONAPPINSTALL",
            "data[VERSION]": "1", "data[ACTIVE]": "Y", "data[INSTALLED]": "Y", "data[LANGUAGE_ID]": "en",
            "ts": str(int(self.clock())),
            "auth[domain]": self.domain, "auth[scope]": self.scope.replace(",", " "),
            "auth[access_token]": access, "auth[refresh_token]": refresh,
            "auth[expires_in]": str(int(self.access_lifetime)),
            "auth[server_endpoint]": f"{self.url}/rest/", "auth[status]": "L",
            "auth[client_endpoint]": self.client_endpoint, "auth[member_id]": self.member_id,
            "auth[application_token]": self.application_token,
        }

    async def post_install_event(self, url: str, form: dict[str, str] | None = None) -> tuple[int, Any]:
        """POST the install event (or `form`) to the application's install callback, as the portal does."""
        assert self._http is not None, "start() first"
        async with self._http.post(url, data=form if form is not None else self.install_event()) as answer:
            return answer.status, await answer.json(content_type=None)

    # -- HTTP -------------------------------------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.Response:
        query = request.query
        if query.get("client_id") != self.client_id or not self.installed or not self.redirect_uri:
            # settings/oauth/index.md: the error is shown on the portal's page; no redirect.
            return web.Response(status=400, text="The application was not found or is not installed.",
                                content_type="text/html")
        code = secrets.token_hex(16)
        self._codes[code] = _Grant(self.clock() + self.code_lifetime)
        location = self.redirect_uri + ("&" if "?" in self.redirect_uri else "?") + urlencode({
            "code": code, "state": query.get("state", ""), "domain": self.domain, "member_id": self.member_id,
            "scope": self.scope, "server_domain": "oauth.bitrix.info"})
        raise web.HTTPFound(location)

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        params = dict(request.query)
        if request.method == "POST":
            params.update((key, value) for key, value in (await request.post()).items() if isinstance(value, str))
        if self._refusal is not None:
            return self._error(*self._refusal)
        grant_type = params.get("grant_type")
        if not grant_type or not params.get("client_id"):
            return self._error(400, "invalid_request", "The grant type or client_id was not specified")
        if (params.get("client_id"), params.get("client_secret")) != (self.client_id, self.client_secret) \
                or not self.installed:
            return self._error(401, "invalid_client", "Invalid client")
        now = self.clock()
        if grant_type == "authorization_code":
            grant = self._codes.get(params.get("code", ""))
            if grant is None or grant.used or now >= grant.expires_at:
                return self._error(400, "invalid_grant", "Invalid authorization code")
            grant.used = True
            self.codes_exchanged += 1
        elif grant_type == "refresh_token":
            refresh_token = params.get("refresh_token", "")
            if not self._spendable(refresh_token, now):
                return self._error(400, "invalid_grant", "Invalid refresh token")
            await asyncio.sleep(self.refresh_delay)
            if not self._spendable(refresh_token, now):  # spent by a concurrent request meanwhile
                return self._error(400, "invalid_grant", "Invalid refresh token")
            self._refresh[refresh_token].used = True
            self.refreshes += 1
        else:
            return self._error(400, "invalid_request", "Unsupported grant type")
        access, refresh = self.issue_tokens()
        return json_response(200, {
            "access_token": access, "expires": int(now + self.access_lifetime),
            "expires_in": int(self.access_lifetime), "scope": self.scope, "domain": "oauth.bitrix.info",
            "server_endpoint": f"{self.url}/rest/", "status": "L", "client_endpoint": self.client_endpoint,
            "member_id": self.member_id, "user_id": 1, "refresh_token": refresh,
        })

    async def _rest(self, request: web.Request) -> web.Response:
        assert self._http is not None
        if (request.content_length or 0) > self.portal.max_body:
            return nginx_page(413)  # the portal's nginx, before any token is looked at
        # Lookups arrive as JSON, the call card's methods as forms: the portal reads both.
        is_json = request.content_type == "application/json"
        form: Any = await request.json() if is_json else await request.post()
        token = str(form.get("auth", "") or request.query.get("auth", ""))
        self.seen_auth.append(token)
        method = request.match_info["method"]
        if canonical_method(method) == APP_INFO_METHOD:
            self.app_info_requests += 1  # whatever its token: each is a request of the portal's budget
        grant = self._access.get(token)
        if grant is None:
            return self._error(401, "invalid_token", "The access token provided is invalid.")
        if self.clock() >= grant.expires_at:
            return self._error(401, "expired_token", "The access token provided has expired.")
        if canonical_method(method) == APP_INFO_METHOD:
            return json_response(200, {"result": {
                "ID": 1, "CODE": grant.client_id, "VERSION": 1, "STATUS": "L", "INSTALLED": True,
                "PAYMENT_EXPIRED": "N", "DAYS": None, "LANGUAGE_ID": "en", "LICENSE": "en_pro100",
                "LICENSE_TYPE": "pro100", "LICENSE_FAMILY": "pro"}})
        fields: Any = {key: value for key, value in form.items() if key != "auth"} if is_json else \
            [(key, value) for key, value in form.items() if key != "auth"]
        body = {"json": fields} if is_json else {"data": fields}
        # The portal knows a request came with an application's token (WRONG_AUTH_TYPE does not apply).
        async with self._http.post(f"{self.portal.webhook_url}{method}", headers={AUTH_TYPE_HEADER: APPLICATION},
                                   **body) as answer:
            return web.Response(status=answer.status, body=await answer.read(), content_type="application/json")

    def _spendable(self, refresh_token: str, now: float) -> bool:
        # Only this application's own refresh tokens (settings/oauth/error-codes.md: invalid_grant).
        grant = self._refresh.get(refresh_token)
        return grant is not None and grant.client_id == self.client_id and not grant.used and now < grant.expires_at

    @staticmethod
    def _error(status: int, code: str, description: str) -> web.Response:
        return json_response(status, {"error": code, "error_description": description})
