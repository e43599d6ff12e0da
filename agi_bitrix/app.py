"""The running product: one HTTP session, the portal client, the routing service and the
FastAGI server, wired together and started or stopped as one."""

from __future__ import annotations

import asyncio
import logging
import signal

from agi_bitrix import __version__
from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.lookup import CrmLookup
from agi_bitrix.config import Config
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
        self.server: AgiServer | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        config = self.config
        self.session = make_session(pool_size=config.bitrix.pool_size)
        try:
            self.portal = PortalClient(config.bitrix.webhook_url, self.session, timeout=config.bitrix.deadline)
            self.lookup = CrmLookup(self.portal, config.bitrix, config.cache)
            self.service = RoutingService(config, self.lookup)
            handlers = {"route": self.service.handle_route, "": self.service.handle_route}
            self.server = AgiServer(handlers, self.service.handle_unknown_script,
                                    header_timeout=config.server.header_timeout)
            self.address = await self.server.start(
                config.server.host if host is None else host, config.server.port if port is None else port)
        except BaseException:
            await self.session.close()
            raise
        log.info("agi-bitrix %s listening on %s:%s, portal %s, config %s (sha256 %s)", __version__,
                 self.address[0], self.address[1], self.portal.redacted_url, config.path, config.digest[:12])
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.session is not None:
            await self.session.close()


async def until_stopped() -> None:
    """Wait for SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
