"""Fixtures shared by the tests that run the real server against the portal emulator."""

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from agi_bitrix.app import Application
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.config import parse_config
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM, SAMPLE_USERS
from tests.network import free_port
from tests.redis_server import RedisServer

TEST_RULES = """\
  - name: sales-did
    match: {did: ["74951112233"]}
    route: {queue: sales}
  - name: owner-on-break
    match: {timeman: [PAUSED]}
    route: [queue]
  - name: owner-at-work
    match: {timeman: [OPENED, UNAVAILABLE, NOT_INSTALLED, ""]}
    route: [extension, mobile, queue]
  - name: owner-day-over
    match: {timeman: [CLOSED, EXPIRED]}
    route: [mobile, queue]
"""


async def until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01,
                what: str = "the condition") -> None:
    """Polls `predicate` until it holds; fails the test, naming `what`, once `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout} s"
        await asyncio.sleep(interval)


def oauth_section(portal_url: str, client_id: str, token_file: object, token_url: str,
                  client_secret: str | None = None, deadline: float | None = None) -> str:
    """A config's `bitrix:` section for an OAuth application, as YAML at column 0."""
    lines = ["bitrix:", *([f"  deadline: {deadline:g}"] if deadline is not None else []), "  oauth:",
             f'    portal_url: "{portal_url}"', f'    client_id: "{client_id}"',
             *([f'    client_secret: "{client_secret}"'] if client_secret is not None else []),
             f'    token_file: "{token_file}"', f'    token_url: "{token_url}"']
    return "\n".join(lines) + "\n"


def ample_budget() -> RateLimiter:
    """A request budget that never holds a test's requests back (the portal client needs one)."""
    return RateLimiter(per_second=1000, burst=1000)


# The user directory's own requests (at start, then every users.refresh): on by default, they
# are no call's.
DIRECTORY_METHODS = ("scope", "user.get")


def call_requests(portal) -> list:
    """What the calls (and the admin page's dry runs) asked the portal: all but the directory's."""
    return [request for request in portal.requests if request.method not in DIRECTORY_METHODS]


def make_config(webhook_url: str, deadline: float = 1.0, header_timeout: float = 1.0,
                metrics: str = "off", extra: str = ""):
    text = textwrap.dedent(f"""\
        metrics: {{listen: {metrics}}}
        {extra}
        server: {{listen: "127.0.0.1:4573", header_timeout: {header_timeout}}}
        bitrix: {{webhook_url: "{webhook_url}", deadline: {deadline}}}
        routing:
          fallback_queue: support
          timezone: Europe/Moscow
          rules:
        """) + textwrap.indent(TEST_RULES, "    ")
    return parse_config(text, "test-config.yaml")


PortalFactory = Callable[..., Awaitable[PortalEmulator]]


@pytest.fixture
async def make_portal() -> AsyncIterator[PortalFactory]:
    """Starts portal emulators for one test and stops them all after it: `await make_portal()` is the
    sample portal (the demo's CRM and users); keywords go to `PortalEmulator` (crm=, code=,
    rate_limit=, round_trip=, application_only=, ...), so a test names only what it changes."""
    started: list[PortalEmulator] = []

    async def make(**options: Any) -> PortalEmulator:
        options.setdefault("crm", SAMPLE_CRM)
        options.setdefault("users", SAMPLE_USERS)
        emulator = PortalEmulator(**options)
        await emulator.start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in reversed(started):
        await emulator.stop()


@pytest.fixture
async def portal(make_portal: PortalFactory) -> PortalEmulator:
    """The sample portal. Its users (names, a fired owner) matter only where a config turns on `users:`."""
    return await make_portal()


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A real redis-server for the test, on a free port, in its own folder (tests/redis_server.py)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
async def monitored(portal):
    """The application with its monitoring listener on a free port, against the sample portal;
    yields (app, AGI host, AGI port, the listener's base URL, an HTTP session)."""
    metrics_port = free_port()
    app = Application(make_config(portal.webhook_url, metrics=f'"127.0.0.1:{metrics_port}"'))
    host, port = await app.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as http:
        yield app, host, port, f"http://127.0.0.1:{metrics_port}", http
    await app.stop()


@pytest.fixture
async def agi_server(portal):
    """The whole application on a free port, against the emulator; yields (host, port, app)."""
    app = Application(make_config(portal.webhook_url))
    host, port = await app.start("127.0.0.1", 0)
    yield host, port, app
    await app.stop()
