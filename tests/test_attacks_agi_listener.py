"""Attacks on the AGI listener (server.listen) that no other file tries; see docs/security.md."""

import asyncio
import logging
import socket
import time
from ipaddress import ip_network

from agi_bitrix.testing.fake_asterisk import asterisk_header, fake_call
from tests.conftest import call_requests, make_config
from tests.test_cli import SHIPPED, agi_bitrix_async
from tests.test_operations import closed_at_once, started, with_server


async def test_a_header_sent_a_byte_at_a_time_is_cut_off_at_the_header_timeout(portal):
    """Slowloris on FastAGI: server.header_timeout runs from the connection's start, and bytes that
    do not finish the header do not move it, so a trickle holds a session no longer than a silence."""
    app, host, port = await started(make_config(portal.webhook_url, header_timeout=0.5))
    try:
        reader, writer = await asyncio.open_connection(host, port)
        started_at = time.monotonic()
        header = asterisk_header(callerid="89161234567")[:-1]  # everything but the closing empty line
        received = b""
        for byte in header:
            if reader.at_eof() or writer.is_closing():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)
            try:
                received += await asyncio.wait_for(reader.read(100), 0.001)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if reader.at_eof():
                break
        closed_after = time.monotonic() - started_at
        assert received == b"" and closed_after < 1.5, (received, closed_after)
        assert not app.server.sessions
        writer.close()
        # Meanwhile and afterwards, a real call is answered.
        assert (await fake_call(host, port, callerid="89161234567")).variables["B24_TARGET"] == "101"
    finally:
        await app.stop()


async def test_serve_on_a_port_another_process_holds_says_so_in_one_line(portal):
    """Two servers at once (a second unit, a forgotten `serve` in a terminal): the second does not
    share the port or crash with a traceback; it says in one line that it cannot listen."""
    holder = socket.create_server(("127.0.0.1", 0))
    try:
        port = holder.getsockname()[1]
        result = await agi_bitrix_async("serve", "-c", str(SHIPPED), "--listen", f"127.0.0.1:{port}",
                                        env={"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
    finally:
        holder.close()
    assert result.returncode == 1, result.stderr
    problem = [line for line in result.stderr.splitlines() if "cannot listen" in line]
    assert len(problem) == 1 and f"127.0.0.1:{port}" in problem[0], result.stderr
    assert "Traceback" not in result.stderr and portal.code not in result.stderr


async def test_a_flood_from_outside_the_allowed_clients_is_counted_and_logged_once(portal, caplog):
    """A scanner or a hostile peer outside server.allowed_clients cannot flood the log: every
    connection is counted, and one line per 10 s says so with the count."""
    caplog.set_level(logging.WARNING, logger="agi_bitrix.server")
    app, host, port = await started(with_server(make_config(portal.webhook_url),
                                                allowed_clients=(ip_network("10.0.0.0/8"),)))
    try:
        for _ in range(30):
            assert await closed_at_once(host, port)
        assert app.server.refused == 30 and call_requests(portal) == []
    finally:
        await app.stop()
    lines = [record.getMessage() for record in caplog.records if "refused connection from" in record.getMessage()]
    assert len(lines) == 1 and "address not in server.allowed_clients (1 refused so far)" in lines[0], lines
