"""The HTTP listener (/metrics, /healthz, the admin page, the install callback) under clients that
hold on to it: silent, trickling, too many, in a process short of file descriptors; and its
section's old name `metrics`, still read with a deprecation note."""

import asyncio
import json
import os
import resource
import select
import signal
import socket
import sys
import textwrap
import time

import aiohttp
import pytest

from agi_bitrix.app import Application
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import parse_config
from agi_bitrix.http_listener import RESERVE_MIN, free_descriptors
from agi_bitrix.testing.fake_asterisk import fake_call
from tests.conftest import TEST_RULES, until
from tests.test_cli import ROOT, agi_bitrix, free_port


def config_text(webhook_url: str, http: str, section: str = "http") -> str:
    return textwrap.dedent(f"""\
        {section}: {{{http}}}
        bitrix: {{webhook_url: "{webhook_url}", deadline: 1.0}}
        routing:
          fallback_queue: support
          rules:
        """) + textwrap.indent(TEST_RULES, "    ")


async def get(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.get(url) as response:
            return response.status, await response.json()


def silent_connections(port: int, count: int, wait: float = 0.5) -> list[socket.socket]:
    """Up to `count` connections that never send a byte: all are started at once, and those not
    made within `wait` seconds (their SYN dropped by a full accept queue, to be tried again by
    the kernel for many seconds) are given up, so the flood ends here. (A connection the server
    never took may still look made from here: only the server can tell what it holds.)"""
    started = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        started.append(s)
    time.sleep(wait)
    poll = select.poll()
    for s in started:
        poll.register(s, select.POLLOUT)
    made = {fd for fd, events in poll.poll(0) if events == select.POLLOUT}
    for s in started:
        if s.fileno() not in made:
            s.close()
    return [s for s in started if s.fileno() != -1]


async def closed_at_once(port: int) -> bool:
    """Whether a new connection is closed by the server without a request sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(1), 2) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


@pytest.fixture
async def bounded_site(portal):
    port = free_port()
    app = Application(parse_config(config_text(
        portal.webhook_url, f"listen: '127.0.0.1:{port}', idle_timeout: 1, request_timeout: 1, max_connections: 3")))
    await app.start("127.0.0.1", 0)
    yield app, port
    await app.stop()


async def test_past_max_connections_a_new_one_is_closed_and_counted(bounded_site):
    app, port = bounded_site
    held = await asyncio.to_thread(silent_connections, port, 3)
    assert await closed_at_once(port)
    assert app.http_listener.refused["max_connections"] >= 1
    # The silent ones are dropped after http.idle_timeout; then /healthz answers and says what it refused.
    assert len(held) == 3 and app.http_listener.connections() == 3
    health = await health_once_idle(port, timeout=3)
    assert health["http"]["refused"]["max_connections"] >= 1
    assert health["http"]["max_connections"] == 3
    metrics = app.metrics.exposition().decode()
    assert 'agi_bitrix_http_refused_connections_total{reason="max_connections"}' in metrics


async def test_a_header_sent_a_byte_at_a_time_does_not_hold_the_connection(bounded_site):
    _app, port = bounded_site
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    try:
        while not reader.at_eof() and time.monotonic() - started < 5:
            writer.write(b"X")  # one byte of a header line every 0.2 s, never finished
            await writer.drain()
            await asyncio.sleep(0.2)
    except ConnectionError:
        pass
    assert time.monotonic() - started < 2.5  # http.idle_timeout is 1 s
    writer.close()


async def test_a_body_that_never_arrives_gets_408_and_the_connection_closed(bounded_site):
    app, port = bounded_site
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: 1000\r\n\r\ntoken=abc")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 3)  # read() to EOF: the server closes
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert app.http_listener.refused["request_timeout"] == 1
    writer.close()


def low_descriptor_limit(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return preexec


async def test_silent_connections_never_take_the_descriptors_the_calls_need(portal, tmp_path):
    """The issue's server: 1,104 silent connections on a 1,024 limit left no descriptor for the
    next AGI call. Here a real `agi-bitrix serve` with a limit of 256 and no connection cap to
    speak of gets 600 at once; the HTTP listener leaves a reserve, the call is answered, and /healthz
    answers again once the silent ones are dropped."""
    agi_port, http_port = free_port(), free_port()
    path = tmp_path / "agi-bitrix.yaml"
    path.write_text(config_text(portal.webhook_url, f"listen: '127.0.0.1:{http_port}', idle_timeout: 3,"
                                                    " max_connections: 10000"))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", "serve", "-c", str(path), "--listen", f"127.0.0.1:{agi_port}",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        preexec_fn=low_descriptor_limit(256))
    held: list[socket.socket] = []
    try:
        await until(lambda: _answers(http_port), timeout=10, what="the HTTP listener")
        held = silent_connections(http_port, 600, wait=1.5)
        call = await fake_call("127.0.0.1", agi_port, callerid="89161234567", timeout=3)
        assert call.variables["B24_TARGET"] == "101"
        assert len(os.listdir(f"/proc/{process.pid}/fd")) > 60  # the flood was held while the call was answered
        health = await health_once_idle(http_port, timeout=10)
        assert health["http"]["refused"]["descriptors"] > 0
    finally:
        for s in held:
            s.close()
        process.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(process.communicate(), 15))[0].decode()
    assert process.returncode == 0, output
    assert "file descriptors left, under the 128 kept for the calls" in output
    assert output.count("HTTP listener closed a connection unserved") == 1  # not once per connection


async def health_once_idle(port: int, timeout: float) -> dict:
    """/healthz once it answers 200 with no connection open but its own (the silent ones dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, health = await get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            if status == 200 and health["http"]["connections"] <= 1:
                return health
        except (aiohttp.ClientError, TimeoutError):
            pass  # refused while the descriptors are short
        assert time.monotonic() < deadline, f"/healthz not answering with the silent ones dropped after {timeout} s"
        await asyncio.sleep(0.2)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


# -- the section's old name ----------------------------------------------------------------------

def test_the_old_section_name_is_read_with_a_deprecation_note():
    config = parse_config(config_text("https://x.bitrix24.ru/rest/1/abc/", "listen: '0.0.0.0:9600',"
                                      " token_file: /etc/agi-bitrix/admin-token", section="metrics"), "a.yaml")
    assert (config.http.host, config.http.port, config.http.token_file) == (
        "0.0.0.0", 9600, "/etc/agi-bitrix/admin-token")
    assert [str(note) for note in config.deprecated] == [
        ("a.yaml:1: metrics: deprecated: this section also serves the admin page and the install callback and is"
         " now called http (same keys: listen, token_file, ...); rename it, the old name will go")]
    assert parse_config(config_text("https://x.bitrix24.ru/rest/1/abc/", "listen: off")).deprecated == ()


def test_both_names_at_once_are_refused():
    text = config_text("https://x.bitrix24.ru/rest/1/abc/", "listen: off") + "metrics: {listen: off}\n"
    with pytest.raises(ConfigError) as error:
        parse_config(text, "a.yaml")
    assert [str(p) for p in error.value.problems] == [
        "a.yaml:18: metrics: is the old name of the http section, which is also here; move its keys into http"]


async def test_check_and_serve_warn_about_the_old_name(portal, tmp_path):
    path = tmp_path / "agi-bitrix.yaml"
    http_port, agi_port = free_port(), free_port()
    path.write_text(config_text(portal.webhook_url, f"listen: '127.0.0.1:{http_port}'", section="metrics"))
    result = await asyncio.to_thread(agi_bitrix, "check", "-c", str(path))
    assert result.returncode == 0 and f"warning: {path}:1: metrics: deprecated:" in result.stderr
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", "serve", "-c", str(path), "--listen", f"127.0.0.1:{agi_port}",
        cwd=ROOT, env=os.environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await until(lambda: _answers(http_port), timeout=10, what="the HTTP listener")
        status, health = await get(f"http://127.0.0.1:{http_port}/healthz")
        assert status == 200 and json.dumps(health)
    finally:
        process.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(process.communicate(), 15))[0].decode()
    assert f"WARNING agi_bitrix: {path}:1: metrics: deprecated:" in output


def test_with_no_descriptor_left_to_count_them_none_is_free():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    limit = used - 5
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))  # listdir itself cannot open one
    try:
        free = free_descriptors()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # The reserve follows the limit: in a long test run this process may hold hundreds of descriptors.
    assert free == (0, max(RESERVE_MIN, limit // 4))
