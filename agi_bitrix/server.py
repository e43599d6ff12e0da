"""The asyncio FastAGI server: accepts connections and moves bytes; the protocol and the
routing decisions live elsewhere.

Per connection: read the header block within `header_timeout` (bounded in size by the
protocol layer), route the call (bounded by the lookup deadline inside the service), send the
variables in as few commands as possible (normally one `EXEC MSet`), wait for Asterisk's
reply, close. A client that stalls, sends junk or vanishes costs one coroutine until its own
timeout and nothing else.
"""

from __future__ import annotations

import asyncio
import logging

from agi_bitrix.agi.protocol import NEED_DATA, AgiRequest, CommandReply, EndOfStream, HangUp, PeerError, ServerConnection
from agi_bitrix.agi.quoting import mset_commands
from agi_bitrix.service import RoutingService

log = logging.getLogger("agi_bitrix.server")

READ_SIZE = 4096
# Asterisk answers MSet in microseconds; a reply that takes longer than this means the PBX is
# wedged or the peer is not Asterisk, and holding the socket open helps nobody.
REPLY_TIMEOUT = 10.0
ROUTE_SCRIPTS = ("route", "")


class AgiServer:
    def __init__(self, service: RoutingService, *, header_timeout: float) -> None:
        self.service = service
        self.header_timeout = header_timeout
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = ServerConnection()
        try:
            try:
                request = await asyncio.wait_for(_next_event(reader, conn), self.header_timeout)
            except TimeoutError:
                log.info("client %s sent no complete AGI header in %.1fs; closing", peer, self.header_timeout)
                return
            if not isinstance(request, AgiRequest):
                return
            await self._serve_request(request, reader, writer, conn)
        except PeerError as error:
            log.info("client %s broke the AGI protocol: %s", peer, error)
        except (ConnectionError, OSError) as error:
            log.info("client %s connection lost: %s", peer, error)
        except Exception:
            log.exception("unexpected failure serving %s", peer)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _serve_request(self, request: AgiRequest, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter, conn: ServerConnection) -> None:
        script = request.script
        uniqueid = request.get("agi_uniqueid")
        if script in ROUTE_SCRIPTS:
            try:
                routed = await self.service.route(request)
                variables = routed.variables
                _log_call(uniqueid, routed)
            except Exception:
                log.exception("call %s: routing failed; sending the fallback route", uniqueid)
                variables = self.service.fallback_variables("internal")
        else:
            log.warning("call %s asked for unknown script %r; sending the fallback route", uniqueid, script)
            variables = self.service.fallback_variables("unknown_script")
        for command in mset_commands(variables):
            writer.write(conn.send(command))
            await writer.drain()
            reply = await asyncio.wait_for(_next_reply(reader, conn), REPLY_TIMEOUT)
            if reply is None:
                log.info("call %s: channel went away before the variables were set", uniqueid)
                return
            if not reply.ok:
                log.warning("call %s: Asterisk refused the variables: %s %s", uniqueid, reply.code, reply.text)


async def _next_event(reader: asyncio.StreamReader, conn: ServerConnection):
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ_SIZE))


async def _next_reply(reader: asyncio.StreamReader, conn: ServerConnection) -> CommandReply | None:
    """The reply to the command just sent; HANGUP lines on the way are skipped. None at EOF."""
    while True:
        event = await _next_event(reader, conn)
        if isinstance(event, CommandReply):
            return event
        if isinstance(event, EndOfStream):
            return None
        if isinstance(event, HangUp):
            continue


def _log_call(uniqueid: str, routed) -> None:
    d = routed.decision
    log.info(
        "call %s phone=%s status=%s route=%s target=%s rule=%s error=%s latency_ms=%.0f",
        uniqueid or "-", d.phone or "-", d.status, d.route, d.target, d.rule, d.error or "-",
        routed.seconds * 1000,
    )
