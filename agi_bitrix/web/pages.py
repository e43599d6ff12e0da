"""The admin pages, served by the HTTP listener: Now, Recent calls, Try a number, Rules.

Everything is rendered by the server with Jinja2, autoescape on: every value from the CRM, the
caller or the AGI header reaches the page as text, never as markup. No page shows a secret: the
portal is named by its redacted URL and the trace is the one `agi-bitrix route` prints. The
pages read only what the process already holds, so they work while the portal is down; only
"Try a number" asks the portal, through the running Router, so it takes its slots from the same
request budget as the calls and sees the same cache and breaker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

import jinja2
from aiohttp import web
from yarl import URL

from agi_bitrix import __version__
from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.calllog import mask_number
from agi_bitrix.callrecord import RoutedCall
from agi_bitrix.config import Config, HttpSettings
from agi_bitrix.routing.rules import Match, Rule
from agi_bitrix.service import Router, call_info
from agi_bitrix.trace import render
from agi_bitrix.web.access import COOKIE, Gate, LoginThrottle, SlidingWindow, access_policy, local_path
from agi_bitrix.web.chart import calls_per_minute
from agi_bitrix.web.recent import RecentCall, RecentCalls

log = logging.getLogger("agi_bitrix.web")

TRIES_PER_MINUTE = 5  # "Try a number": each may cost a portal request, from the calls' own budget
WRONG_TOKENS_PER_MINUTE = 10  # from one source (an address, an IPv6 /64)
MAX_FIELD = 64  # characters of a number or DID typed into the form
REFRESH_SECONDS = 10  # Now and Recent calls reload themselves (a meta refresh: no script runs here)
# What an admin does when the OAuth token server refused the application's tokens, by the reason
# /healthz shows (agi_bitrix.bitrix.oauth.OAuthTokens.state); the words only, the state decides.
AUTH_ADVICE = {
    "refresh_token_rejected": "run \"agi-bitrix oauth login -c {config}\" as the service's user: it stores new"
                              " tokens in {token_file}, and the server takes them up by itself",
    "oauth_client_rejected": "check bitrix.oauth.client_id and the client secret against the application's"
                             " card in the portal, then reload the config (systemctl reload agi-bitrix)",
    "oauth_token_file": "the token file {token_file} cannot be read or holds no refresh token: run"
                        " \"agi-bitrix oauth login -c {config}\" as the service's user",
}
# No script may run and nothing may be loaded from elsewhere, even if a value slipped through.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self';"
                               " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form's Origin null
    "Cache-Control": "no-store",
}


class Running(Protocol):
    """The parts of the Runtime in force that the pages read (agi_bitrix.app.Runtime)."""

    @property
    def config(self) -> Config: ...

    @property
    def portal(self) -> PortalClient: ...

    @property
    def router(self) -> Router: ...


def _templates() -> jinja2.Environment:
    # autoescape is off by default in Jinja2: on here for every template; StrictUndefined makes a
    # misspelt name an error instead of an empty cell.
    return jinja2.Environment(loader=jinja2.PackageLoader("agi_bitrix.web", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def trace_text(routed: RoutedCall, portal_url: str, mask: bool) -> str:
    """The trace as `agi-bitrix route` prints it; with masking on, the caller's number masked
    wherever it appears (the number line, rule reasons, B24_PHONE)."""
    text = render(routed, portal_url)
    phone = routed.call.phone
    return text.replace(phone, mask_number(phone)) if mask and phone else text


def conditions(match: Match) -> list[str]:
    """A rule's conditions as the admin wrote them, one per line."""
    shown = []
    for name in ("status", "did", "caller", "entity_type", "owner", "timeman", "has"):
        values = getattr(match, name)
        if values is not None and (values or name != "has"):
            listed = ", ".join(repr(v) if v == "" else v for v in sorted(values))
            shown.append(f"{name}: {listed}")
    for name in ("did_regex", "caller_regex"):
        pattern = getattr(match, name)
        if pattern is not None:
            shown.append(f"{name}: /{pattern.pattern}/")
    shown.extend(f"{name}: {', '.join(getattr(match, name))}" for name in ("during", "outside")
                 if getattr(match, name))
    return shown


def rule_row(rule: Rule) -> dict[str, Any]:
    objects = "first object" if rule.objects == "first" else "all objects"
    if rule.prefer:
        objects += f", preferring {', '.join(rule.prefer)}"
    return {"name": rule.name, "line": rule.line, "conditions": conditions(rule.match) or ["always"],
            "objects": objects if rule.uses_crm_object else "", "targets": [t.describe() for t in rule.route]}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _crm_object(call: RecentCall) -> str:
    """The CRM object the call was routed by: its name and type/id, as the portal sent them."""
    entity = call.routed.decision.entity if call.routed is not None else None
    if entity is None:
        return ""
    label = f"{entity.entity_type} {entity.entity_id}"
    return f"{entity.name} ({label})" if entity.name else label


class AdminPages:
    def __init__(self, running: Callable[[], Running], health: Callable[[], tuple[bool, dict[str, Any]]],
                 recent: RecentCalls, settings: HttpSettings, environ: Mapping[str, str] | None = None) -> None:
        self.running = running
        self.health = health
        self.recent = recent
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        self.templates = _templates()
        self.tries = SlidingWindow(TRIES_PER_MINUTE, 60.0)
        self.logins = LoginThrottle(WRONG_TOKENS_PER_MINUTE, 60.0)
        self.gate: Gate | None = None
        self.refresh_seconds = REFRESH_SECONDS

    def add_routes(self, app: web.Application) -> None:
        """Called by HttpListener.start: reads the token now, so a fixed file needs a restart."""
        policy = access_policy(self.settings, self.environ)
        self.gate = Gate(policy)
        if policy.refusal:
            log.error("admin page is OFF: %s; /metrics and /healthz are served", policy.refusal)
        elif policy.token:
            log.info("admin page needs the access token from %s", policy.where)
        app.router.add_get("/", self._guarded(self._now))
        app.router.add_get("/calls", self._guarded(self._calls))
        app.router.add_get("/calls/{number:[0-9]{1,18}}", self._guarded(self._call))
        app.router.add_get("/try", self._guarded(self._try_form))
        app.router.add_post("/try", self._guarded(self._try))
        app.router.add_get("/rules", self._guarded(self._rules))
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._login)

    # -- rendering and access --

    def _page(self, template: str, status: int = 200, page: str = "", nav: bool = True, refresh: bool = False,
              **context: Any) -> web.Response:
        """`page`: which tab of the menu is this one ("" for none); `nav`: whether the menu leads
        anywhere (not when every page would answer the same refusal); `refresh`: whether the page
        reloads itself every `refresh_seconds`."""
        running = self.running()
        html = self.templates.get_template(template).render(
            page=page, version=__version__, config_path=running.config.path, csrf=self._gate.csrf,
            needs_login=bool(self._gate.policy.token), nav=nav,
            refresh_seconds=self.refresh_seconds if refresh else 0, **context)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

    @property
    def _gate(self) -> Gate:
        assert self.gate is not None, "add_routes() reads the access policy first"
        return self.gate

    def _guarded(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            refusal = self._gate.refusal(request.host, request.cookies.get(COOKIE, ""),
                                         request.headers.get("Authorization", ""))
            if refusal == "login":
                if request.method == "GET":
                    raise web.HTTPSeeOther(URL("/login").with_query(next=request.path))
                return self._page("refused.html", status=401, reason="log in first: the access token is required")
            if refusal:
                # The same refusal answers every page: a menu would only lead back here.
                return self._page("refused.html", status=403, nav=False, reason=refusal)
            if request.method == "POST" and not self._same_origin(request):
                return self._page("refused.html", status=403, reason="the form was sent from another site")
            response: web.StreamResponse = await handler(request)
            return response
        return guarded

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        """No Origin (an older client), or this server's host. The scheme is not compared: behind
        a TLS proxy the browser says https while this listener sees http."""
        origin = request.headers.get("Origin")
        return origin is None or origin.partition("://")[2] == request.host

    def _when(self, call: RecentCall) -> datetime:
        return datetime.fromtimestamp(call.at, self.running().config.policy.timezone)

    def _shown_phone(self, phone: str) -> str:
        if not phone:
            return "-"
        return mask_number(phone) if self.running().config.call_log.mask_numbers else phone

    # -- the pages --

    async def _now(self, request: web.Request) -> web.Response:
        healthy, health = self.health()
        portal, auth = health["portal"], health["auth"]
        return self._page(
            "now.html", page="now", refresh=True, healthy=healthy, health=health, portal=portal, auth=auth,
            auth_advice=self._auth_advice(auth),
            last_success=_duration(portal["last_success_seconds_ago"]),
            last_failure=_duration(portal["last_failure_seconds_ago"]),
            uptime=_duration(health["uptime_seconds"]),
            loaded=_duration(health["config"]["loaded_seconds_ago"]),
            callcard=health["callcard"], portal_url=self.running().portal.redacted_url,
            chart=calls_per_minute(self.recent.per_minute()))

    def _auth_advice(self, auth: Mapping[str, Any]) -> str:
        advice = AUTH_ADVICE.get(str(auth.get("state", "")))
        return "" if advice is None else advice.format(config=self.running().config.path,
                                                       token_file=auth.get("token_file", "?"))

    async def _calls(self, request: web.Request) -> web.Response:
        rows = [{"number": c.number, "when": self._when(c), "phone": self._shown_phone(c.phone), "call": c,
                 "did": c.routed.call.did if c.routed is not None else "", "crm": _crm_object(c)}
                for c in self.recent.newest_first()]
        return self._page("calls.html", page="calls", refresh=True, rows=rows, kept=self.recent.size,
                          timezone=str(self.running().config.policy.timezone))

    async def _call(self, request: web.Request) -> web.Response:
        call = self.recent.find(int(request.match_info["number"]))
        if call is None:
            return self._page("refused.html", status=404, page="calls",
                              reason="that call is no longer in memory (only the last calls are kept)")
        running = self.running()
        trace = (trace_text(call.routed, running.portal.redacted_url, running.config.call_log.mask_numbers)
                 if call.routed is not None else None)
        return self._page("call.html", page="calls", call=call, when=self._when(call),
                          phone=self._shown_phone(call.phone), trace=trace, crm=_crm_object(call),
                          did=call.routed.call.did if call.routed is not None else "")

    async def _try_form(self, request: web.Request) -> web.Response:
        return self._page("try.html", page="try", number="", did="", trace=None, problem="",
                          per_minute=TRIES_PER_MINUTE)

    async def _try(self, request: web.Request) -> web.Response:
        form = await request.post()
        number, did = str(form.get("number", ""))[:MAX_FIELD], str(form.get("did", ""))[:MAX_FIELD]

        def answer(status: int, problem: str = "", trace: str | None = None) -> web.Response:
            return self._page("try.html", status=status, page="try", number=number, did=did, trace=trace,
                              problem=problem, per_minute=TRIES_PER_MINUTE)

        if not self._gate.csrf_matches(str(form.get("csrf", ""))):
            return answer(403, "the form is out of date (the server restarted?): load the page again and retry")
        wait = self.tries.allow()
        if wait:
            return answer(429, f"at most {TRIES_PER_MINUTE} tries a minute (each may cost a portal request"
                               f" from the calls' budget); try again in {wait:.0f} s")
        running = self.running()
        try:
            routed = await running.router.route(call_info(number, did, running.config.policy.default_country),
                                                uniqueid="admin-page")
        except Exception:
            log.exception("admin page: the dry run of a number failed")
            return answer(500, "the dry run failed inside the server (see the log)")
        # The admin typed this number, so it is shown as typed, not masked.
        return answer(200, trace=render(routed, running.portal.redacted_url))

    async def _rules(self, request: web.Request) -> web.Response:
        policy = self.running().config.policy
        return self._page("rules.html", page="rules", rules=[rule_row(r) for r in policy.rules],
                          fallback_queue=policy.fallback_queue, timezone=str(policy.timezone))

    # -- the token, when one is required --

    async def _login_form(self, request: web.Request) -> web.Response:
        if self._gate.policy.refusal:
            return self._page("refused.html", status=403, nav=False, reason=self._gate.policy.refusal)
        return self._login_page(local_path(request.query.get("next", "/")), "", 200)

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        target = local_path(str(form.get("next", "/")))
        if self._gate.policy.refusal:
            return self._page("refused.html", status=403, nav=False, reason=self._gate.policy.refusal)
        if not self._same_origin(request):
            return self._login_page(target, "the form was sent from another site", 403)
        peer = request.remote or "?"
        wait = self.logins.wait(peer)
        if wait:
            return self._login_page(target, f"at most {WRONG_TOKENS_PER_MINUTE} wrong tokens a minute from one"
                                            f" address; try again in {wait:.0f} s", 429)
        if not self._gate.token_matches(str(form.get("token", "")).strip()):
            # Logged when a source starts and when it is made to wait, not at every guess.
            failures = self.logins.failed(peer)
            if failures == 1:
                log.warning("admin page: a wrong access token from %s", peer)
            elif failures == WRONG_TOKENS_PER_MINUTE:
                log.warning("admin page: %d wrong access tokens from %s in a minute; its logins wait", failures, peer)
            return self._login_page(target, "wrong token", 403)
        response = web.HTTPSeeOther(target)
        response.set_cookie(COOKIE, self._gate.cookie_value, httponly=True, samesite="Strict", path="/")
        raise response

    def _login_page(self, target: str, problem: str, status: int) -> web.Response:
        return self._page("login.html", status=status, page="login", next=target, problem=problem)
