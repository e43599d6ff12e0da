"""The HTTP listener: /metrics (Prometheus), /healthz (a load balancer's check), the admin page
(agi_bitrix.web) and the form POSTs the portal sends (the OAuth install callback).

Anyone who can reach its port can open connections, and each holds a file descriptor of the
process that also answers the calls. So it is bounded like the AGI listener (agi_bitrix.server):

- a connection that sends no complete request header within `http.idle_timeout` (its first
  request or the next one) is closed: silent and trickling clients let go of their descriptor;
- a request whose body is not read and answer not made within `http.request_timeout` gets 408
  and the connection is closed;
- at most `http.max_connections` are open; past that a new one is closed at once;
- it never takes the descriptors the calls need: a new connection is closed at once when fewer
  than a reserve (a quarter of the open-files limit, at least RESERVE_MIN) would be left free.

A refused connection is counted (agi_bitrix_http_refused_connections{reason}), shown in /healthz
under "http" and logged at most once per LOG_EVERY seconds, so a flood does not flood the log.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agi_bitrix.config import HttpSettings
from agi_bitrix.monitoring import Metrics

log = logging.getLogger("agi_bitrix.http")

RESERVE_MIN = 128
# Connections accepted in one go before any is checked (asyncio accepts up to `backlog` per
# wake-up, then runs the protocol factory): the most the reserve can be overdrawn by, so well under it.
ACCEPT_BATCH = 64
LOG_EVERY = 10.0
# Why a connection was closed unserved (the metric's labels).
REFUSALS = ("max_connections", "descriptors", "request_timeout")

# A handler of form POSTs: (the request's text fields, the peer's address) -> (HTTP status, JSON body).
FormHandler = Callable[[Mapping[str, str], str], Awaitable[tuple[int, dict[str, str]]]]


def free_descriptors() -> tuple[int, int] | None:
    """(descriptors free, the reserve to keep) for this process; None where it cannot be told
    (no /proc), and then only the connection cap bounds the listener."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    reserve = max(RESERVE_MIN, soft // 4)
    try:
        used = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself held
    except OSError as error:
        # Not even one descriptor to list them with: none is left.
        return (0, reserve) if error.errno in (errno.EMFILE, errno.ENFILE) else None
    # The limit bounds descriptor numbers, not their count: with holes below it, more may be open
    # than the limit and listdir still succeed. None is free then.
    return max(0, soft - used), reserve


class _Refused(asyncio.Protocol):
    """A connection closed as soon as it is made: its descriptor is given back at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a TCP server's transports are
        transport.abort()


class HttpListener:
    """Serves /metrics, /healthz (JSON; 503 when calls cannot be routed by CRM), the form POSTs
    in `forms`, by path, and the routes `pages` adds (the admin page)."""

    def __init__(self, settings: HttpSettings, metrics: Metrics, health: Callable[[], tuple[bool, dict]],
                 forms: Mapping[str, FormHandler] | None = None,
                 pages: Callable[[web.Application], None] | None = None,
                 descriptors: Callable[[], tuple[int, int] | None] = free_descriptors) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.forms = dict(forms or {})
        self.pages = pages
        self.descriptors = descriptors
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._last_refusal_log = -LOG_EVERY

    async def start(self, host: str, port: int) -> tuple[str, int]:
        app = web.Application(middlewares=[self._bounded])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        for path, handler in self.forms.items():
            app.router.add_post(path, functools.partial(self._form, handler))
        if self.pages is not None:
            self.pages(app)
        # aiohttp closes a connection waiting for a request header longer than keepalive_timeout,
        # from the connection's start too (web_protocol.RequestHandler.connection_made).
        # lingering_time=0: a body left unread (a request timed out) closes the connection, not waited for.
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.settings.idle_timeout,
                                     lingering_time=0)
        await self._runner.setup()
        # Our own server in place of a TCPSite: each connection passes _connection's checks first.
        self._server = await asyncio.get_running_loop().create_server(self._connection, host, port,
                                                                      reuse_address=True, backlog=ACCEPT_BATCH)
        self.address = self._server.sockets[0].getsockname()[:2]
        for reason in REFUSALS:
            self.metrics.http_refused.labels(reason)
        Gauge("agi_bitrix_http_connections", "Connections open to the HTTP listener.",
              registry=self.metrics.registry).set_function(self.connections)
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def connections(self) -> int:
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    def state(self) -> dict[str, Any]:
        """The listener's part of /healthz."""
        return {"connections": self.connections(), "max_connections": self.settings.max_connections,
                "refused": dict(self.refused)}

    def _connection(self) -> asyncio.Protocol:
        assert self._runner is not None and self._runner.server is not None  # started before serving
        if self.connections() >= self.settings.max_connections:
            return self._refuse("max_connections", f"{self.settings.max_connections} connections already open"
                                                   " (http.max_connections)")
        free = self.descriptors()
        if free is not None and free[0] < free[1]:
            return self._refuse("descriptors", f"{free[0]} file descriptors left, under the {free[1]} kept"
                                               " for the calls")
        return self._runner.server()

    def _refuse(self, reason: str, why: str) -> asyncio.Protocol:
        self._count(reason, why)
        return _Refused()

    def _count(self, reason: str, why: str) -> None:
        self.refused[reason] += 1
        self.metrics.count_http_refused(reason)
        now = time.monotonic()
        if now - self._last_refusal_log >= LOG_EVERY:
            self._last_refusal_log = now
            log.warning("HTTP listener closed a connection unserved: %s (%d closed so far: %s)", why,
                        sum(self.refused.values()), ", ".join(f"{k} {v}" for k, v in self.refused.items() if v))

    @web.middleware
    async def _bounded(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            async with asyncio.timeout(self.settings.request_timeout) as timer:
                return await handler(request)
        except TimeoutError:
            if not timer.expired():
                raise
        self._count("request_timeout", f"a request to {request.path[:100]!r} took over"
                                       f" {self.settings.request_timeout:g} s (http.request_timeout)")
        response = web.Response(status=408, text="request timeout\n")
        response.force_close()
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        healthy, body = self.health()
        return web.json_response({**body, "http": self.state()}, status=200 if healthy else 503)

    async def _form(self, handler: FormHandler, request: web.Request) -> web.Response:
        fields = dict(request.query.items())
        fields.update((key, value) for key, value in (await request.post()).items() if isinstance(value, str))
        status, body = await handler(fields, request.remote or "?")
        return web.json_response(body, status=status)
