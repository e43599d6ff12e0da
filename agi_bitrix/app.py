"""The running product, wired together; started, reloaded and stopped as one.

Wiring only: each part keeps its own job (the /healthz body: agi_bitrix.health; the gauges:
Metrics; which outbox: callcard.stores; what a reload cannot apply: the settings declared
`restart` in the schema). Started in order on one stack, each part pushing its own close, so a
stop, or a start that fails half-way, closes exactly what was opened, in reverse order.

Two lifetimes meet here. What lives as long as the process — the HTTP session, the listening
server, the call-card outbox, the user directory, what the lookups learned (answer cache,
circuit breaker) — is made once. Everything that depends on the loaded config — the portal
client, the lookup, the routing, register and finish services and the handlers the server
dispatches to — is one immutable Runtime. A reload builds a complete new Runtime beside the
running one and swaps one reference; a config that does not load leaves the old one untouched,
and calls in flight finish on the Runtime they started with.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from agi_bitrix import __version__, schema
from agi_bitrix.bitrix.breaker import CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.install import InstallCallback
from agi_bitrix.bitrix.lines import LineSync
from agi_bitrix.bitrix.lookup import CrmLookup, LookupMemory
from agi_bitrix.bitrix.oauth import portal_client
from agi_bitrix.bitrix.settings import OPERATING_WINDOW
from agi_bitrix.bitrix.shared import SharedState
from agi_bitrix.bitrix.users import UserDirectory
from agi_bitrix.callcard.cards import CardService
from agi_bitrix.callcard.finish import RECORDING, FinishService, send_finish
from agi_bitrix.callcard.follow_up import FOLLOW_UP, send_follow_up
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.outbox import FINISH, Entry, Outcome
from agi_bitrix.callcard.outgoing import OutgoingService
from agi_bitrix.callcard.recording import send_recording
from agi_bitrix.callcard.register import RegisterService
from agi_bitrix.callcard.stores import make_outbox
from agi_bitrix.callcard.transfers import TransferFollower
from agi_bitrix.calllog import CallLog
from agi_bitrix.checking import ConfigError
from agi_bitrix.clicktocall_service import ClickToCallService, CurrentLookup
from agi_bitrix.config import Config, load_config
from agi_bitrix.health import Health
from agi_bitrix.http_listener import HttpListener
from agi_bitrix.monitoring import Metrics
from agi_bitrix.server import AgiServer, Endpoint
from agi_bitrix.service import Router, RouteScript
from agi_bitrix.web.pages import AdminPages
from agi_bitrix.web.recent import RecentCalls

log = logging.getLogger("agi_bitrix")


@dataclass(frozen=True)
class Runtime:
    """Everything that depends on one loaded config."""

    config: Config
    portal: PortalClient
    lookup: CrmLookup
    router: Router
    register: RegisterService
    finish: FinishService
    cards: CardService
    endpoint: Endpoint


class Application:
    def __init__(self, config: Config) -> None:
        """Builds the whole product for `config` without starting anything; call inside the loop."""
        # What is opened is closed in reverse order, by stop() or by a start that fails half-way:
        # each part pushes its own close here when it is made or started.
        self._opened = AsyncExitStack()
        self.metrics = Metrics()
        self.call_log = CallLog(config.call_log)
        self._opened.callback(self.call_log.close)
        self.started_at = time.monotonic()
        self.config_loaded_at = time.monotonic()
        self.reloads = {"success": 0, "failure": 0}
        self._reload_lock = asyncio.Lock()
        self._reloading: set[asyncio.Task[bool]] = set()
        self.recent = RecentCalls()  # the last calls, for the admin page
        self.session: aiohttp.ClientSession = make_session(pool_size=config.bitrix.pool_size)
        self._opened.push_async_callback(self._close_session)
        # With a redis section, the budget, answers and breaker are those of every server of the portal.
        self.shared = (SharedState.connect(config.redis, *_portal_identity(config))
                       if config.redis is not None else None)
        self.memory = LookupMemory(
            AnswerCache(config.cache),
            CircuitBreaker(config.bitrix.breaker_failures, config.bitrix.breaker_cool_down) if self.shared is None
            else self.shared.breaker(config.bitrix.breaker_failures, config.bitrix.breaker_cool_down),
            shared=None if self.shared is None else self.shared.answers)
        self.users = (UserDirectory(lambda: self.runtime.portal, refresh=config.users.refresh,
                                    default_country=config.policy.default_country, automatic=config.users.automatic)
                      if config.users.refresh > 0 else None)
        self.card_holders = CardHolders()  # who sees each call's card, across reloads
        self.outbox = make_outbox(config, self._send)
        self.runtime = self._build(config, previous=None)
        self.server = AgiServer(lambda: self.runtime.endpoint, on_refused=self.metrics.count_refused)
        # The configured DIDs as the portal's external lines, synced in the background.
        self.lines = LineSync(config.lines, lambda: self.runtime.portal, default_country=config.policy.default_country)
        self.clicktocall = self._click_to_call(config)
        self.health = Health(self.memory, lambda: self.config, lambda: self.portal.auth,
                             lambda: len(self.server.sessions), lambda: self.config_loaded_at, self.started_at,
                             self.outbox, None if self.shared is None else self.shared.link, users=self.users,
                             lines=self.lines, clicktocall=self.clicktocall)
        self._watch()
        self.pages = AdminPages(lambda: self.runtime, self.health, self.recent, config.http)
        self.http_listener = self._http_listener(config)

    def _click_to_call(self, config: Config) -> ClickToCallService:
        """AMI, the portal's events and the flow, each on with its section."""
        clicktocall = ClickToCallService(
            config, current_portal=lambda: self.runtime.portal, users=self.users, outbox=self.outbox,
            names=CurrentLookup(lambda: self.runtime.lookup), link=None if self.shared is None else self.shared.link,
            ami_observer=self.metrics, event_observer=self.metrics)
        if clicktocall.ami is not None and config.callcard.enabled:
            # The card follows blind and attended transfers (AMI's transfer events, read = call).
            clicktocall.ami.add_listener(TransferFollower(self.card_holders, self.users, lambda: self.runtime.cards))
        return clicktocall

    def _http_listener(self, config: Config) -> HttpListener | None:
        """/metrics, /healthz, the admin page, the install callback and the events' handler: each
        path takes effect after a restart, with the listener."""
        if not config.http.enabled:
            return None
        oauth = config.bitrix.oauth
        install = InstallCallback(lambda: self.runtime.portal, self.session,
                                  count_refusal=self.metrics.count_install_refused)
        forms = {oauth.install_path: install.handle} if oauth is not None and oauth.install_path else {}
        pages = self.pages

        def routes(app: web.Application) -> None:
            pages.add_routes(app)
            self.clicktocall.add_routes(app)  # handler mode's events POST

        return HttpListener(config.http, self.metrics, self.health, forms, routes)

    def _watch(self) -> None:
        """The gauges, read from the long-lived parts at scrape time."""
        memory, server = self.memory, self.server
        self.metrics.watch(sessions=lambda: len(server.sessions), breaker_state=lambda: memory.breaker.state,
                           cache_entries=lambda: len(memory.cache))
        if self.outbox is not None:
            self.metrics.watch_outbox(self.outbox, FINISH, RECORDING)
        if self.shared is not None:
            self.metrics.watch_redis(self.shared.link)

    @property
    def config(self) -> Config:
        """The config in force: the current Runtime's (a reload swaps the Runtime whole)."""
        return self.runtime.config

    @property
    def portal(self) -> PortalClient:
        """The current Runtime's portal client, with its request budget and tokens."""
        return self.runtime.portal

    @property
    def lookup(self) -> CrmLookup:
        """The current Runtime's CRM lookup (its memory outlives reloads)."""
        return self.runtime.lookup

    def _build(self, config: Config, previous: Runtime | None) -> Runtime:
        """A Runtime for `config`; it only constructs, so the running one is untouched."""
        shared = self.shared
        budgets = None if shared is None else (
            shared.request_budget(config.bitrix.rate_per_second, config.bitrix.rate_burst),
            shared.operating_budget(config.bitrix.operating_limit, OPERATING_WINDOW))
        portal = portal_client(config.bitrix, self.session, previous=previous.portal if previous else None,
                               budgets=budgets)
        lookup = CrmLookup(portal, self.memory, deadline=config.bitrix.deadline, observer=self.metrics)
        router = Router(config, lookup, users=self.users)
        route = RouteScript(router, self.metrics, self.call_log, self.recent)
        register = RegisterService(config, portal, self.card_holders)
        cards = CardService(config, portal, self.users, self.card_holders, self.metrics.count_card)
        finish = FinishService(config, self.outbox, self.users, self.card_holders, hide_cards=cards.hide_at_finish)
        # The AGI scripts, by their path in AGI(agi://HOST:PORT/PATH,...): a new one goes here.
        handlers = {"route": route.handle_route, "": route.handle_route,
                    "register": register.handle_register, "finish": finish.handle_finish,
                    "ringing": cards.handle_ringing, "answered": cards.handle_answered,
                    "outgoing": OutgoingService(config, register, self.users).handle_outgoing}
        endpoint = Endpoint(config.server, handlers, route.handle_unknown_script)
        return Runtime(config, portal, lookup, router, register, finish, cards, endpoint)

    async def _send(self, entry: Entry) -> Outcome:
        # Through the portal client and settings of the config in force when the outbox gets to it.
        if entry.kind == RECORDING:
            return await send_recording(self.runtime.portal, entry, self.config.callcard.finish)
        if entry.kind == FOLLOW_UP:
            return await send_follow_up(self.runtime.portal, entry)
        await self.runtime.cards.settled(entry.key)  # the hide at finish first: the portal ignores it after
        return await send_finish(self.runtime.portal, entry)

    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Start the parts in order, each pushing its close as it starts: a start that fails closes
        exactly what was opened, in reverse order, and raises; stop() closes it all the same way."""
        config = self.config
        try:
            if self.outbox is not None:
                # Only another process holding the outbox stops the start: the call card must
                # not take routing down, and an outbox that cannot be used now is retried.
                self._opened.push_async_callback(self.outbox.close)
                await self.outbox.open_or_retry_later()
                self.outbox.start()
            if self.shared is not None:
                self._opened.push_async_callback(self.shared.link.close)
                self.shared.link.start()
            if self.http_listener is not None:
                # Closed after the calls, so /healthz answers while they finish; started after the
                # AGI listener, so a server that cannot take calls says only that.
                self._opened.push_async_callback(self.http_listener.close)
            self._opened.push_async_callback(self._stop_calls)
            address = await self.server.start(
                config.server.host if host is None else host, config.server.port if port is None else port)
            await self._start_http_listener(config)
            await self._start_background()
        except BaseException:
            await self._opened.aclose()
            raise
        log.info("agi-bitrix %s listening on %s:%s, portal %s, config %s (sha256 %s)", __version__,
                 address[0], address[1], self.portal.redacted_url, config.path, config.digest[:12])
        return address

    async def _start_background(self) -> None:
        """What asks the portal in the background starts once calls are served (their requests first)."""
        if self.users is not None:
            self._opened.push_async_callback(self.users.close)
            self.users.start()
        self._opened.push_async_callback(self.lines.close)
        self.lines.start()
        # Closed before the outbox: a click still being placed finishes through it.
        self._opened.push_async_callback(self.clicktocall.close)
        await self.clicktocall.start()

    async def _start_http_listener(self, config: Config) -> None:
        if self.http_listener is None:
            return
        try:
            host, port = await self.http_listener.start(config.http.host, config.http.port)
        except OSError as error:
            # Calls matter more than graphs: keep routing, say loudly what is missing.
            log.error("metrics, /healthz and the admin page are OFF: cannot listen on %s:%s: %s",
                      config.http.host, config.http.port, error.strerror)
            self.http_listener = None  # what it set up is closed with the rest, by the stack
            return
        log.info("metrics on http://%s:%s/metrics, health on /healthz, admin page on /", host, port)

    async def _close_session(self) -> None:
        await self.session.close()  # the one in use then (a test may put another in its place)

    async def _stop_calls(self) -> None:
        """Stop accepting calls, let those in flight finish (up to server.session_timeout), then the
        card shows and hides they started."""
        await self.server.close(grace=self.config.server.session_timeout)
        await self.runtime.cards.close()

    def reload_soon(self) -> None:
        """Start a reload without waiting for it (the SIGHUP handler). The task is kept until it
        ends, so it is neither collected mid-way nor left with an unseen exception."""
        task = asyncio.create_task(self.reload())
        self._reloading.add(task)
        task.add_done_callback(self._reloading.discard)

    async def reload(self, path: str | Path | None = None) -> bool:
        """Load the config again; a broken one is refused and the running one keeps serving.

        Reading, parsing, checking and compiling run in a thread: a config of tens of thousands
        of rules takes seconds, and calls must be answered meanwhile. Building the Runtime and
        the swap stay on the loop (they are quick, and the running parts are not thread-safe).
        Reloads run one at a time: a SIGHUP during a reload waits for it, then reads the file
        again, so the last signal always sees the file as it was when it was sent or later."""
        async with self._reload_lock:
            return await self._reload(path)

    async def _reload(self, path: str | Path | None) -> bool:
        old = self.config
        path = path or old.path
        try:
            new = await asyncio.to_thread(load_config, path)
            runtime = self._build(new, previous=self.runtime)
        except ConfigError as error:
            return self._refused(path, error.problems, error.count)
        except ValueError as error:
            return self._refused(path, [f"{path}: {error}"])
        except Exception as error:
            # A bug, not the file: still a refused reload the admin sees, never a callback error.
            log.exception("reload of %s failed unexpectedly", path)
            return self._refused(path, [f"{path}: unexpected {type(error).__name__} (logged above)"])
        self._warn_restart_only(old, new)
        self.runtime = runtime
        # The long-lived parts take the new settings that are theirs.
        self.memory.reconfigure(new.cache, new.bitrix)
        if new.bitrix.webhook_url != old.bitrix.webhook_url:
            self.memory.cache.clear()  # answers of another portal
        self.call_log.configure(new.call_log)
        await self.lines.reload(new.lines)
        self.reloads["success"] += 1
        self.metrics.reloads.labels("success").inc()
        self.config_loaded_at = time.monotonic()
        log.info("config reloaded from %s (sha256 %s, %d rules)", path, new.digest[:12], len(new.policy.rules))
        return True

    def _refused(self, path: str | Path, problems: Sequence[object], count: int | None = None) -> bool:
        """Count and log a refused reload; `count` when `problems` shows only the first of them."""
        self.reloads["failure"] += 1
        self.metrics.reloads.labels("failure").inc()
        for problem in problems:
            log.error("reload refused: %s", problem)
        log.error("reload refused: %d problem(s) in %s; still serving with sha256 %s",
                  len(problems) if count is None else count, path, self.config.digest[:12])
        return False

    def _warn_restart_only(self, old: Config, new: Config) -> None:
        """Once per key declared `restart` that changed: the reload applies the rest."""
        for key in schema.restart_changes(Config, old, new):
            log.warning("%s changed; it takes effect after a restart", key)
        if self.shared is not None and _portal_identity(new) != _portal_identity(old):
            # Its keys in Redis name the portal it was connected for.
            log.warning("the portal changed; the state shared through Redis follows it after a restart")

    async def stop(self) -> None:
        """Stop accepting calls, let those in flight finish (up to server.session_timeout), then
        close the other parts in the reverse order of their start."""
        await self._opened.aclose()


async def until_stopped(on_sighup: Callable[[], object] | None = None) -> None:
    """Wait for SIGINT or SIGTERM; call `on_sighup` (the config reload) on SIGHUP."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = [signal.SIGINT, signal.SIGTERM]
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    if on_sighup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        signals.append(signal.SIGHUP)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _portal_identity(config: Config) -> tuple[str, str]:
    """The portal's REST URL and what identifies the webhook or application to the portal (hashed
    before it names a key in Redis)."""
    oauth = config.bitrix.oauth
    if oauth is None:
        return config.bitrix.webhook_url, config.bitrix.webhook_url
    return oauth.portal_url, f"{oauth.portal_url} {oauth.client_id}"
