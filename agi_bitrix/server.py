"""The asyncio FastAGI server: accepts connections and moves bytes; the protocol and the
decisions live elsewhere.

Per connection: read the header block within `header_timeout` (bounded in size by the
protocol layer), hand the request to the handler registered for its script path (`route`,
...), which talks to the channel through an AgiChannel — one round trip per command — and
close. A client that stalls, sends junk or vanishes costs one coroutine until its own timeout
and nothing else. What the server serves (settings, handlers) is read once per connection from
the current Endpoint, so a config reload swaps it without touching the sessions in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from agi_bitrix.agi.channel import Handler
from agi_bitrix.agi.protocol import (
    NEED_DATA,
    AgiRequest,
    CommandReply,
    EndOfStream,
    Event,
    PeerError,
    ServerConnection,
    loggable,
)
from agi_bitrix.agi.quoting import mset_commands
from agi_bitrix.config import ServerSettings

log = logging.getLogger("agi_bitrix.server")

READ_SIZE = 4096


@dataclass(frozen=True)
class Endpoint:
    """What the server serves under one config."""

    settings: ServerSettings
    handlers: Mapping[str, Handler]
    unknown_script: Handler  # for a script path no handler is registered for


class StreamChannel:
    """The channel behind one FastAGI session, over its socket (implements AgiChannel)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: ServerConnection) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn

    async def command(self, line: bytes) -> CommandReply | None:
        """Send one command line and return Asterisk's reply (None if the session ended)."""
        self._writer.write(self._conn.send(line))
        await self._writer.drain()
        return await self._next_reply()

    async def set_variables(self, variables: Mapping[str, str]) -> bool:
        """Set channel variables in as few commands as possible (normally one EXEC MSet)."""
        for line in mset_commands(variables):
            reply = await self.command(line)
            if reply is None or not reply.ok:
                if reply is not None:
                    log.warning("Asterisk refused the variables: %s %s", reply.code, loggable(reply.text))
                return False
        return True

    async def _next_reply(self) -> CommandReply | None:
        # A HANGUP notice from Asterisk is no reply: the loop reads on to the reply.
        while True:
            event = await next_event(self._reader, self._conn)
            if isinstance(event, CommandReply):
                return event
            if isinstance(event, EndOfStream):
                return None


class AgiServer:
    def __init__(self, endpoint: Callable[[], Endpoint],
                 on_refused: Callable[[str], None] = lambda reason: None) -> None:
        """`endpoint` gives what to serve now; `on_refused` counts a dropped connection by reason."""
        self.endpoint = endpoint
        self.on_refused = on_refused
        self.sessions: set[asyncio.Task[None]] = set()
        self.refused = 0
        self._last_refusal_log = 0.0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        # A PBX opens many sessions at once during a burst; the default backlog (100) drops SYNs.
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True, backlog=1024)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; give the sessions in flight up to `grace` seconds to finish."""
        if self._server is None:
            return
        self._server.close()
        if self.sessions and grace > 0:
            log.info("waiting up to %.0f s for %d call(s) in flight", grace, len(self.sessions))
            await asyncio.wait(set(self.sessions), timeout=grace)
        for task in list(self.sessions):
            task.cancel()
        if self.sessions:
            await asyncio.wait(set(self.sessions))
        await self._server.wait_closed()

    def _refuse(self, peer: Any, reason: str, why: str) -> None:
        # One log line per 10 s at most: a scan or a flood must not also flood the log.
        self.refused += 1
        self.on_refused(reason)
        now = time.monotonic()
        if now - self._last_refusal_log >= 10.0:
            self._last_refusal_log = now
            log.warning("refused connection from %s: %s (%d refused so far)", peer, why, self.refused)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        endpoint = self.endpoint()
        settings = endpoint.settings
        if not _allowed(peer, settings.allowed_clients):
            self._refuse(peer, "not_allowed", "address not in server.allowed_clients")
            writer.transport.abort()
            return
        if len(self.sessions) >= settings.max_sessions:
            self._refuse(peer, "max_sessions", f"{settings.max_sessions} sessions already open (server.max_sessions)")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None  # start_server runs each connection in a task of its own
        self.sessions.add(task)
        # One timer per session: first the header deadline, then moved to the session deadline.
        deadline = asyncio.get_running_loop().time() + settings.session_timeout
        phase = "header"
        try:
            async with asyncio.timeout(min(settings.header_timeout, settings.session_timeout)) as timer:
                conn = ServerConnection()
                request = await next_event(reader, conn)
                if isinstance(request, AgiRequest):
                    phase = "call"
                    timer.reschedule(deadline)
                    handler = endpoint.handlers.get(request.script, endpoint.unknown_script)
                    await handler(request, StreamChannel(reader, writer, conn))
        except TimeoutError:
            if phase == "header":
                log.info("client %s sent no complete AGI header in %.1f s; closed", peer, settings.header_timeout)
            else:
                log.warning("session from %s exceeded server.session_timeout (%.0f s); closed",
                            peer, settings.session_timeout)
        except PeerError as error:
            log.info("client %s broke the AGI protocol: %s", peer, error)
        except (ConnectionError, OSError) as error:
            log.info("client %s connection lost: %s", peer, error)
        except Exception:
            log.exception("unexpected failure serving %s", peer)
        finally:
            self.sessions.discard(task)
            writer.close()


Networks = tuple[IPv4Network | IPv6Network, ...]


def _allowed(peer: Any, networks: Networks) -> bool:
    if not peer:
        return False  # not an IP peer (a Unix socket is never configured here)
    return _host_allowed(peer[0], networks)


@functools.lru_cache(maxsize=4096)
def _host_allowed(host: str, networks: Networks) -> bool:
    try:
        address = ip_address(host.split("%")[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


async def next_event(reader: asyncio.StreamReader, conn: ServerConnection) -> Event:
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ_SIZE))
