"""The running product, wired together; started, reloaded and stopped as one.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Gauge

from agi_bitrix import __version__
from agi_bitrix.bitrix.breaker import CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.install import InstallCallback
from agi_bitrix.bitrix.lines import LineSync
from agi_bitrix.bitrix.lookup import CrmLookup, LookupMemory
from agi_bitrix.bitrix.oauth import OAuthTokens, portal_client
from agi_bitrix.bitrix.settings import OPERATING_WINDOW
from agi_bitrix.bitrix.shared import SharedState
from agi_bitrix.bitrix.users import UserDirectory, directory_health
from agi_bitrix.callcard.cards import CardService
from agi_bitrix.callcard.finish import RECORDING, FinishService, send_finish
from agi_bitrix.callcard.follow_up import FOLLOW_UP, send_follow_up
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.outbox import FINISH, Entry, Outbox, OutboxStore, Outcome, RetryPolicy
from agi_bitrix.callcard.outgoing import OutgoingService
from agi_bitrix.callcard.recording import send_recording
from agi_bitrix.callcard.redis_outbox import RedisOutbox
from agi_bitrix.callcard.register import RegisterService
from agi_bitrix.callcard.transfers import TransferFollower
from agi_bitrix.calllog import CallLog
from agi_bitrix.checking import ConfigError
from agi_bitrix.clicktocall_service import ClickToCallService, CurrentLookup
from agi_bitrix.config import SHARED_REDIS_OUTBOX, Config, is_url, load_config
from agi_bitrix.http_listener import HttpListener
from agi_bitrix.monitoring import Metrics, seconds_since
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
        self.metrics = Metrics()
        self.call_log = CallLog(config.call_log)
        self.started_at = time.monotonic()
        self.config_loaded_at = time.monotonic()
        self.reloads = {"success": 0, "failure": 0}
        self._reload_lock = asyncio.Lock()
        self._reloading: set[asyncio.Task[bool]] = set()
        self.recent = RecentCalls()  # the last calls, for the admin page
        self.session: aiohttp.ClientSession = make_session(pool_size=config.bitrix.pool_size)
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
        self.outbox: OutboxStore | None = None
        if config.callcard.enabled:
            retry = config.callcard.finish
            policy = RetryPolicy(retry.retry_first, retry.retry_max, retry.give_up_after)
            if config.callcard.outbox == SHARED_REDIS_OUTBOX and config.redis is not None:
                self.outbox = RedisOutbox(config.redis.url, self._send, policy,
                                          claim_after=config.callcard.outbox_claim_after,
                                          prefix=f"{config.redis.key_prefix}outbox:")
            elif is_url(config.callcard.outbox):
                self.outbox = RedisOutbox(config.callcard.outbox, self._send, policy,
                                          claim_after=config.callcard.outbox_claim_after)
            else:
                self.outbox = Outbox(config.callcard.outbox, self._send, policy)
        self.runtime = self._build(config, previous=None)
        self.server = AgiServer(lambda: self.runtime.endpoint, on_refused=self.metrics.count_refused)
        oauth = config.bitrix.oauth
        # The portal's install POST, on the HTTP listener (its path takes effect after a restart).
        install = InstallCallback(lambda: self.runtime.portal, self.session,
                                  count_refusal=self.metrics.count_install_refused)
        forms = {oauth.install_path: install.handle} if oauth is not None and oauth.install_path else {}
        # The configured DIDs as the portal's external lines, synced in the background.
        self.lines = LineSync(config.lines, lambda: self.runtime.portal, default_country=config.policy.default_country)
        # Click-to-call: AMI, the portal's events and the flow, each on with its section.
        self.clicktocall = ClickToCallService(
            config, current_portal=lambda: self.runtime.portal, users=self.users, outbox=self.outbox,
            names=CurrentLookup(lambda: self.runtime.lookup), link=None if self.shared is None else self.shared.link,
            ami_observer=self.metrics, event_observer=self.metrics)
        if self.clicktocall.ami is not None and config.callcard.enabled:
            # The card follows blind and attended transfers (AMI's transfer events, read = call).
            self.clicktocall.ami.add_listener(
                TransferFollower(self.card_holders, self.users, lambda: self.runtime.cards))
        self.pages = pages = AdminPages(lambda: self.runtime, self.health, self.recent, config.http)

        def routes(app: web.Application) -> None:
            pages.add_routes(app)
            self.clicktocall.add_routes(app)  # handler mode's events POST (its path takes effect after a restart)

        self.http_listener = (HttpListener(config.http, self.metrics, self.health, forms, routes)
                              if config.http.enabled else None)

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def portal(self) -> PortalClient:
        return self.runtime.portal

    @property
    def lookup(self) -> CrmLookup:
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
        config = self.config
        try:
            if self.outbox is not None:
                # Only another process holding the outbox stops the start: the call card must
                # not take routing down, and an outbox that cannot be used now is retried.
                await self.outbox.open_or_retry_later()
                self.outbox.start()
                self._watch_outbox(self.outbox)
            if self.shared is not None:
                self.shared.link.start()
            address = await self.server.start(
                config.server.host if host is None else host, config.server.port if port is None else port)
            await self._start_monitoring(config)
        except BaseException:
            await self._stop_background()
            await self.session.close()
            raise
        if self.users is not None:
            self.users.start()
        self.lines.start()
        await self.clicktocall.start()
        log.info("agi-bitrix %s listening on %s:%s, portal %s, config %s (sha256 %s)", __version__,
                 address[0], address[1], self.portal.redacted_url, config.path, config.digest[:12])
        return address

    def _watch_outbox(self, outbox: OutboxStore) -> None:
        registry = self.metrics.registry
        Gauge("agi_bitrix_finishes_waiting", "Finishes not yet accepted by the portal (stored, or kept in memory).",
              registry=registry).set_function(lambda: outbox.waiting_of(FINISH))
        Gauge("agi_bitrix_finishes_failed", "Finishes the portal refused for good, kept in the outbox.",
              registry=registry).set_function(lambda: outbox.failed_of(FINISH))
        Gauge("agi_bitrix_recordings_waiting", "Recordings not yet attached (waiting for the file, the finish or"
              " the portal).", registry=registry).set_function(lambda: outbox.waiting_of(RECORDING))
        Gauge("agi_bitrix_recordings_failed", "Recordings given up (no file, too large, refused), kept in the"
              " outbox.", registry=registry).set_function(lambda: outbox.failed_of(RECORDING))
        Gauge("agi_bitrix_callcard_up", "1 while the outbox stores finishes, 0 while it cannot (see /healthz).",
              registry=registry).set_function(lambda: 0 if outbox.problem else 1)
        Gauge("agi_bitrix_finishes_kept_in_memory", "Finishes the outbox could not store yet; lost on a restart.",
              registry=registry).set_function(lambda: outbox.kept_of(FINISH))
        Gauge("agi_bitrix_finishes_lost", "Finishes lost since the start: neither stored nor kept (memory full).",
              registry=registry).set_function(lambda: outbox.lost)

    async def _start_monitoring(self, config: Config) -> None:
        memory, server = self.memory, self.server
        self.metrics.watch(sessions=lambda: len(server.sessions), breaker_state=lambda: memory.breaker.state,
                           cache_entries=lambda: len(memory.cache))
        if self.shared is not None:
            link = self.shared.link
            Gauge("agi_bitrix_redis_up", "1 while the state shared with the other servers answers; 0 while this"
                  " server works alone on its share of the portal's budget (see /healthz).",
                  registry=self.metrics.registry).set_function(lambda: 1 if link.up else 0)
        if self.http_listener is None:
            return
        try:
            host, port = await self.http_listener.start(config.http.host, config.http.port)
        except OSError as error:
            # Calls matter more than graphs: keep routing, say loudly what is missing.
            log.error("metrics, /healthz and the admin page are OFF: cannot listen on %s:%s: %s",
                      config.http.host, config.http.port, error.strerror)
            self.http_listener = None
            return
        log.info("metrics on http://%s:%s/metrics, health on /healthz, admin page on /", host, port)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether calls can be routed by the CRM now, and why, for /healthz."""
        memory = self.memory
        breaker = memory.breaker.state
        failing = memory.last_failure is not None and (
            memory.last_success is None or memory.last_failure > memory.last_success)
        misconfigured = memory.misconfigured if failing else None
        if misconfigured is not None:
            portal = f"refuses REST: {misconfigured.reason} ({misconfigured.advice})"
        elif breaker == "open":
            portal = "circuit open: not asked until the cool-down ends"
        elif failing:
            portal = "failing: the last request failed"
        elif memory.last_success is None:
            portal = "not asked yet"
        else:
            portal = "answering"
        auth_ok, auth = self._auth_health()
        healthy = breaker != "open" and not failing and auth_ok
        config = self.config
        return healthy, {
            "status": "ok" if healthy else "degraded",
            "portal": {
                "state": portal,
                "breaker": breaker,
                "last_success_seconds_ago": seconds_since(memory.last_success),
                "last_failure_seconds_ago": seconds_since(memory.last_failure),
                "last_failure_reason": memory.last_failure_reason or None,
            },
            "auth": auth,
            "users": directory_health(self.users),  # shown, not in the status: calls are routed either way
            "config": {"path": config.path, "sha256": config.digest, "rules": len(config.policy.rules),
                       "loaded_seconds_ago": seconds_since(self.config_loaded_at)},
            # Shown, but not in the status: a broken call card does not stop calls being routed.
            "callcard": self._callcard_health(),
            # Shown, but not in the status either: without Redis each server routes on its own share.
            "redis": {"state": "off"} if self.shared is None else self.shared.link.health(),
            # Shown, not in the status: incoming calls are routed without lines, AMI or click-to-call.
            "lines": self.lines.health(),
            **self.clicktocall.health(),
            "sessions_in_flight": len(self.server.sessions),
            "cache_entries": len(memory.cache),
            "uptime_seconds": seconds_since(self.started_at),
            "version": __version__,
        }

    def _callcard_health(self) -> dict[str, Any]:
        outbox = self.outbox
        if outbox is None:
            return {"state": "off"}
        health = {"state": "down" if outbox.problem else "up", "problem": outbox.problem or None,
                  "outbox": str(outbox.path), "finishes_waiting": outbox.waiting_of(FINISH),
                  "finishes_kept_in_memory": outbox.kept_of(FINISH), "finishes_failed": outbox.failed_of(FINISH),
                  "finishes_lost": outbox.lost}
        if self.config.callcard.finish.recording_file:
            health.update(recordings_waiting=outbox.waiting_of(RECORDING),
                          recordings_failed=outbox.failed_of(RECORDING))
        return health

    def _auth_health(self) -> tuple[bool, dict[str, Any]]:
        tokens = self.portal.auth
        if isinstance(tokens, OAuthTokens):
            return tokens.state()
        return True, {"mode": "webhook"}

    async def _stop_background(self) -> None:
        await self.clicktocall.close()  # first: a click still being placed finishes through the outbox
        await self.lines.close()
        if self.outbox is not None:
            await self.outbox.close()
        if self.shared is not None:
            await self.shared.link.close()
        if self.users is not None:
            await self.users.close()

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
        self.memory.cache.settings = new.cache
        self.memory.breaker.threshold = new.bitrix.breaker_failures
        self.memory.breaker.cool_down = new.bitrix.breaker_cool_down
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

    @staticmethod
    def _warn_restart_only(old: Config, new: Config) -> None:
        if (new.server.host, new.server.port) != (old.server.host, old.server.port):
            log.warning("server.listen changed to %s:%s; it takes effect after a restart",
                        new.server.host, new.server.port)
        if new.bitrix.pool_size != old.bitrix.pool_size:
            log.warning("bitrix.pool_size changed; it takes effect after a restart")
        if new.http != old.http:
            log.warning("the http section (listen, token_file, ...) changed; it takes effect after a restart")
        if (new.callcard.enabled, new.callcard.outbox) != (old.callcard.enabled, old.callcard.outbox):
            log.warning("callcard section or callcard.outbox changed; it takes effect after a restart")
        if new.users.refresh != old.users.refresh:
            log.warning("users.refresh changed; it takes effect after a restart")
        if (new.ami, new.events, new.clicktocall) != (old.ami, old.events, old.clicktocall):
            log.warning("the ami, events or clicktocall section changed; it takes effect after a restart")
        if new.redis != old.redis or (new.redis is not None and _portal_identity(new) != _portal_identity(old)):
            log.warning("the redis section or the portal changed; the shared state follows after a restart")

    async def stop(self) -> None:
        """Stop accepting calls, let those in flight finish (up to server.session_timeout), close."""
        await self.server.close(grace=self.config.server.session_timeout)
        await self.runtime.cards.close()
        await self._stop_background()
        if self.http_listener is not None:
            await self.http_listener.close()
        await self.session.close()
        self.call_log.close()


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
