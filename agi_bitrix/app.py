"""The running product: one HTTP session, the portal client, the lookup, the routing service
and the FastAGI server, wired together; started, reloaded and stopped as one."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Gauge

from agi_bitrix import __version__
from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.lookup import CrmLookup
from agi_bitrix.bitrix.oauth import portal_client
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.bitrix.users import UserDirectory
from agi_bitrix.callcard.finish import FinishSender, FinishService
from agi_bitrix.callcard.outbox import Outbox, RetryPolicy
from agi_bitrix.callcard.register import RegisterService
from agi_bitrix.calllog import CallLog
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import Config, load_config
from agi_bitrix.monitoring import Metrics, MonitoringServer, seconds_since
from agi_bitrix.server import AgiServer
from agi_bitrix.service import RoutingService

log = logging.getLogger("agi_bitrix")


class Application:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.session = None
        self.portal: PortalClient | None = None
        self.lookup: CrmLookup | None = None
        self.service: RoutingService | None = None
        self.users: UserDirectory | None = None
        self.register: RegisterService | None = None
        self.finish_sender: FinishSender | None = None
        self.outbox: Outbox | None = None
        self.finish: FinishService | None = None
        self.server: AgiServer | None = None
        self.address: tuple[str, int] | None = None
        self.reloads = {"success": 0, "failure": 0}
        self.metrics = Metrics()
        self.call_log = CallLog(config.call_log)
        self.monitoring: MonitoringServer | None = None
        self.started_at = time.monotonic()
        self.config_loaded_at = time.monotonic()

    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        config = self.config
        self.session = make_session(pool_size=config.bitrix.pool_size)
        try:
            self.portal = portal_client(config.bitrix, self.session)
            self.lookup = CrmLookup(self.portal, config.bitrix, config.cache, metrics=self.metrics)
            if config.users.refresh > 0:
                self.users = UserDirectory(self.portal, refresh=config.users.refresh,
                                           default_country=config.policy.default_country)
            self.service = RoutingService(config, self.lookup, users=self.users, metrics=self.metrics,
                                          call_log=self.call_log)
            await self._start_callcard(config)
            handlers = {"route": self.service.handle_route, "": self.service.handle_route,
                        "register": self.register.handle_register, "finish": self.finish.handle_finish}
            self.server = AgiServer(handlers, self.service.handle_unknown_script, config.server, self.metrics)
            self.address = await self.server.start(
                config.server.host if host is None else host, config.server.port if port is None else port)
            await self._start_monitoring(config)
        except BaseException:
            await self._stop_background()
            await self.session.close()
            raise
        if self.users is not None:
            self.users.start()
        log.info("agi-bitrix %s listening on %s:%s, portal %s, config %s (sha256 %s)", __version__,
                 self.address[0], self.address[1], self.portal.redacted_url, config.path, config.digest[:12])
        return self.address

    async def _start_callcard(self, config: Config) -> None:
        self.register = RegisterService(config, self.portal, limiter=self._request_budget)
        if config.callcard.enabled:
            finish = config.callcard.finish
            self.finish_sender = FinishSender(self.portal, limiter=self._request_budget)
            self.outbox = Outbox(config.callcard.outbox, self.finish_sender,
                                 RetryPolicy(finish.retry_first, finish.retry_max, finish.give_up_after))
            await self.outbox.open()
            self.outbox.start()
            outbox, registry = self.outbox, self.metrics.registry
            Gauge("agi_bitrix_finishes_waiting", "Finishes stored and not yet accepted by the portal.",
                  registry=registry).set_function(lambda: outbox.waiting)
            Gauge("agi_bitrix_finishes_failed", "Finishes the portal refused for good, kept in the outbox.",
                  registry=registry).set_function(lambda: outbox.failed)
        self.finish = FinishService(config, self.outbox, self.users)

    async def _start_monitoring(self, config: Config) -> None:
        lookup, server = self.lookup, self.server
        self.metrics.watch(sessions=lambda: len(server.sessions), breaker_state=lambda: lookup.breaker.state,
                           cache_entries=lambda: len(lookup.cache))
        if not config.metrics.enabled:
            return
        self.monitoring = MonitoringServer(self.metrics, self.health)
        try:
            host, port = await self.monitoring.start(config.metrics.host, config.metrics.port)
        except OSError as error:
            # Calls matter more than graphs: keep routing, say loudly what is missing.
            log.error("metrics and /healthz are OFF: cannot listen on %s:%s: %s",
                      config.metrics.host, config.metrics.port, error.strerror)
            self.monitoring = None
            return
        log.info("metrics on http://%s:%s/metrics, health on /healthz", host, port)

    def health(self) -> tuple[bool, dict]:
        """Whether calls can be routed by the CRM now, and why, for /healthz."""
        lookup = self.lookup
        breaker = lookup.breaker.state
        failing = lookup.last_failure is not None and (
            lookup.last_success is None or lookup.last_failure > lookup.last_success)
        if breaker == "open":
            portal = "circuit open: not asked until the cool-down ends"
        elif failing:
            portal = "failing: the last request failed"
        elif lookup.last_success is None:
            portal = "not asked yet"
        else:
            portal = "answering"
        healthy = breaker != "open" and not failing
        config = self.config
        return healthy, {
            "status": "ok" if healthy else "degraded",
            "portal": {
                "state": portal,
                "breaker": breaker,
                "last_success_seconds_ago": seconds_since(lookup.last_success),
                "last_failure_seconds_ago": seconds_since(lookup.last_failure),
            },
            "config": {"path": config.path, "sha256": config.digest, "rules": len(config.policy.rules),
                       "loaded_seconds_ago": seconds_since(self.config_loaded_at)},
            "sessions_in_flight": len(self.server.sessions),
            "uptime_seconds": seconds_since(self.started_at),
            "version": __version__,
        }

    def _request_budget(self) -> RateLimiter:
        """The portal counts every request: register and finish spend the lookups' budget.
        Asked each time, because a reload may replace the lookup's limiter."""
        return self.lookup.limiter

    async def _stop_background(self) -> None:
        if self.outbox is not None:
            await self.outbox.close()
        if self.users is not None:
            await self.users.close()

    def reload(self, path: str | Path | None = None) -> bool:
        """Load the config again; a broken one is refused and the running one keeps serving."""
        path = path or self.config.path
        try:
            new = load_config(path)
        except ConfigError as error:
            self.reloads["failure"] += 1
            self.metrics.reloads.labels("failure").inc()
            for problem in error.problems:
                log.error("reload refused: %s", problem)
            log.error("reload refused: %d problem(s) in %s; still serving with sha256 %s",
                      len(error.problems), path, self.config.digest[:12])
            return False
        old = self.config
        if (new.server.host, new.server.port) != (old.server.host, old.server.port):
            log.warning("server.listen changed to %s:%s; it takes effect after a restart",
                        new.server.host, new.server.port)
        if new.bitrix.pool_size != old.bitrix.pool_size:
            log.warning("bitrix.pool_size changed; it takes effect after a restart")
        self.portal = portal_client(new.bitrix, self.session, previous=self.portal)
        self.lookup.portal = self.portal
        self.lookup.configure(new.bitrix, new.cache)
        if new.bitrix.webhook_url != old.bitrix.webhook_url:
            self.lookup.cache.clear()  # answers of another portal
        self.service.config = new
        self._reload_callcard(old, new)
        self.server.settings = new.server
        self.config = new
        self.reloads["success"] += 1
        self.metrics.reloads.labels("success").inc()
        self.call_log.configure(new.call_log)
        self.config_loaded_at = time.monotonic()
        if new.metrics != old.metrics:
            log.warning("metrics.listen changed; it takes effect after a restart")
        log.info("config reloaded from %s (sha256 %s, %d rules)", path, new.digest[:12], len(new.policy.rules))
        return True

    def _reload_callcard(self, old: Config, new: Config) -> None:
        if (new.callcard.enabled, new.callcard.outbox) != (old.callcard.enabled, old.callcard.outbox):
            log.warning("callcard section or callcard.outbox changed; it takes effect after a restart")
        if new.users.refresh != old.users.refresh:
            log.warning("users.refresh changed; it takes effect after a restart")
        for holder in (self.register, self.finish_sender, self.users):
            if holder is not None:
                holder.portal = self.portal
        self.register.config = new
        self.finish.config = new

    async def stop(self) -> None:
        """Stop accepting calls, let those in flight finish (up to server.session_timeout), close."""
        if self.server is not None:
            await self.server.close(grace=self.config.server.session_timeout)
        await self._stop_background()
        if self.monitoring is not None:
            await self.monitoring.close()
        if self.session is not None:
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
