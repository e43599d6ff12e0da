"""Two servers, one portal, one Redis: the budget, answers and breaker they share, and what
happens when Redis goes away. Against a real redis-server on a free port (Debian's; scripts/test
installs it) and the portal emulator enforcing its bucket."""

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from agi_bitrix.app import Application
from agi_bitrix.bitrix.breaker import OPEN
from agi_bitrix.bitrix.settings import RedisSettings
from agi_bitrix.bitrix.shared import RedisLink, SharedAnswers, SharedOperatingBudget, SharedRequestBudget
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM
from tests.conftest import TEST_RULES, until
from tests.network import free_port

KNOWN_OWNER = SAMPLE_CRM["79161234567"]
SEARCH = "telephony.externalCall.searchCrmEntities"


def server_config(portal, redis_url, *, deadline=1.0, rate=(2.0, 40), breaker="{failures: 3, cool_down: 1.0}",
                  redis_extra="", redis_timeout=0.2):
    text = f"""\
http: {{listen: off}}
server: {{listen: "127.0.0.1:4573", header_timeout: 1.0}}
bitrix:
  webhook_url: "{portal.webhook_url}"
  deadline: {deadline}
  rate_limit: {{per_second: {rate[0]}, burst: {rate[1]}}}
  breaker: {breaker}
redis: {{url: "{redis_url}", servers: 2, retry_every: 0.2, timeout: {redis_timeout} {redis_extra}}}
routing:
  fallback_queue: support
  timezone: Europe/Moscow
  rules:
""" + "\n".join("  " + line for line in TEST_RULES.splitlines())
    return parse_config(text, "test-config.yaml")


async def two_servers(portal, redis_url, **options):
    servers = []
    for _ in range(2):
        app = Application(server_config(portal, redis_url, **options))
        host, port = await app.start("127.0.0.1", 0)
        servers.append((app, host, port))
    return servers


async def stop(servers):
    for app, _, _ in servers:
        await app.stop()


def known_callers(portal, count):
    numbers = [f"7903{n:07d}" for n in range(count)]
    for number in numbers:
        portal.set_client(number, KNOWN_OWNER)
    return numbers


async def call(server, number):
    _, host, port = server
    return (await fake_call(host, port, callerid=number, extension="74950000000")).variables


def reached_owner(variables) -> bool:
    owner = KNOWN_OWNER[0]["ASSIGNED_BY"]["ID"]
    return variables.get("B24_STATUS") == "FOUND" and variables.get("B24_USER_ID") == owner


async def test_a_burst_split_between_two_servers_stays_within_the_portals_one_bucket(redis_server):
    """300 new known callers within 1.5 s, half to each server; the portal's bucket (here 8/s·10)
    is one for both. Each server alone believes it has 8 requests to burst and 8 a second: without
    Redis the portal refuses some (checked by hand: the same run with the section removed)."""
    async with PortalEmulator(SAMPLE_CRM, rate_limit=(8.0, 10), round_trip=0.05, search_time=0.002) as portal:
        servers = await two_servers(portal, redis_server.url, rate=(8.0, 8))
        try:
            numbers = known_callers(portal, 300)
            calls = []
            started = time.monotonic()
            for index, number in enumerate(numbers):  # 200 a second: each server sends every 50 ms
                await asyncio.sleep(max(0.0, started + index / 200 - time.monotonic()))
                calls.append(asyncio.create_task(call(servers[index % 2], number)))
            answers = await asyncio.gather(*calls)
            requests = len(portal.requests)
        finally:
            await stop(servers)
    assert portal.refusals == {}, requests
    reached = sum(reached_owner(variables) for variables in answers)
    assert reached >= 0.95 * len(numbers), (reached, {v.get("B24_ERROR") for v in answers})
    assert requests > 10  # more than the bucket holds: the shared pace, not luck, kept it


async def test_many_calls_from_few_numbers_over_two_servers_cost_one_request_per_number(redis_server):
    async with PortalEmulator(SAMPLE_CRM, round_trip=0.02) as portal:
        # 200 calls at once in this one process: Redis is given the most time a 1 s deadline allows,
        # so a loaded machine does not take a slow answer for Redis down (each server then asks alone).
        servers = await two_servers(portal, redis_server.url, redis_timeout=0.45)
        try:
            numbers = known_callers(portal, 10)
            answers = []
            for round_ in range(10):  # 1,000 calls, 100 at a time, both servers at once
                batch = [numbers[(round_ + n) % 10] for n in range(100)]
                answers += await asyncio.gather(*(call(servers[n % 2], number) for n, number in enumerate(batch)))
        finally:
            await stop(servers)
    assert all(reached_owner(variables) for variables in answers)
    searched = [r.params["PHONE_NUMBER"] for r in portal.requests_for(SEARCH)]
    searched += [c for r in portal.requests_for("batch") for c in r.params["cmd"].values()]
    assert len(portal.requests) <= 10 and len(searched) <= 10, searched


async def test_one_servers_breaker_opening_is_seen_by_the_other_and_one_probes(redis_server):
    async with PortalEmulator(SAMPLE_CRM) as portal:
        servers = await two_servers(portal, redis_server.url, deadline=0.5)
        (first, *_), (second, *_) = servers
        try:
            portal.fail("html", status=502)
            for n in range(3):
                variables = await call(servers[0], f"7990000000{n}")
                assert variables["B24_STATUS"] == "ERROR"
            assert first.memory.breaker.state == OPEN
            await until(lambda: second.memory.breaker.state == OPEN, timeout=1.0, what="the other server's breaker")
            asked = len(portal.requests)
            variables = await call(servers[1], "79990000009")
            assert (variables["B24_STATUS"], variables["B24_ERROR"]) == ("ERROR", "circuit_open")
            assert len(portal.requests) == asked  # routed by fallback at once, the portal not asked
            assert second.health()[1]["portal"]["breaker"] == "open"
            # After the cool-down, calls to both servers: one probe, which closes it for both.
            portal.reset_faults()
            await asyncio.sleep(1.2)
            await asyncio.gather(*(call(servers[n % 2], f"7990000001{n}") for n in range(6)))
            await until(lambda: first.memory.breaker.state == second.memory.breaker.state == "closed",
                        timeout=2.0, what="both breakers closed")
        finally:
            await stop(servers)


async def test_redis_killed_mid_run_every_call_is_still_routed_and_it_rejoins(redis_server):
    async with PortalEmulator(SAMPLE_CRM, rate_limit=(8.0, 50), round_trip=0.01) as portal:
        servers = await two_servers(portal, redis_server.url, rate=(8.0, 40))
        (first, *_), (second, *_) = servers
        try:
            numbers = known_callers(portal, 120)
            answers = await asyncio.gather(*(call(servers[n % 2], number) for n, number in enumerate(numbers[:40])))
            redis_server.kill()
            answers += await asyncio.gather(*(call(servers[n % 2], number) for n, number in enumerate(numbers[40:80])))
            assert not first.shared.link.up and not second.shared.link.up
            health = first.health()[1]["redis"]
            assert health["state"] == "down" and health["budget_share"] == 0.5
            redis_server.start()
            await until(lambda: first.shared.link.up and second.shared.link.up, timeout=3.0, what="Redis rejoined")
            answers += await asyncio.gather(*(call(servers[n % 2], number) for n, number in enumerate(numbers[80:])))
        finally:
            await stop(servers)
    assert portal.refusals == {}
    assert all(variables.get("B24_STATUS") in ("FOUND", "ERROR") and variables.get("B24_ROUTE")
               for variables in answers)
    assert sum(reached_owner(variables) for variables in answers) >= 0.95 * len(answers)


async def test_redis_down_at_start_and_the_password_stays_out_of_logs_and_health(caplog):
    async with PortalEmulator(SAMPLE_CRM) as portal:
        port = free_port()  # nobody listens
        app = Application(server_config(portal, f"redis://:s3cret-pass@127.0.0.1:{port}/0"))
        host, port_ = await app.start("127.0.0.1", 0)
        try:
            variables = await call((app, host, port_), "79161234567")
            assert variables["B24_STATUS"] == "FOUND"
            health = app.health()[1]["redis"]
            assert health["state"] == "down" and "s3cret" not in str(health)
        finally:
            await app.stop()
    assert "s3cret-pass" not in caplog.text and "Redis at redis://:***@127.0.0.1" in caplog.text


def redis_settings(url, **options):
    return RedisSettings(url=url, **{"timeout": 0.2, "sync_every": 0.05, **options})


async def test_two_servers_request_budgets_are_one_bucket_of_the_portals_size(redis_server):
    """The Lua script's arithmetic is RateLimiter's: two servers taking slots as fast as they can get
    exactly one bucket between them, and a refusal holds both back."""
    links = [RedisLink(redis_settings(redis_server.url)) for _ in range(2)]
    try:
        budgets = [SharedRequestBudget(link, "portal.example", per_second=2.0, burst=10) for link in links]
        granted = [await budgets[n % 2].take(max_wait=0) for n in range(30)]
        assert granted.count(0.0) == 10 and granted[10:] == [None] * 20
        assert await budgets[1].take(max_wait=1.0) == pytest.approx(0.5, abs=0.05)
        assert await budgets[0].take(max_wait=0.2, keep_free=5) is None  # leaves half the burst to lookups
        await budgets[0].refused()
        assert await budgets[1].take(max_wait=1.5) is None  # the refusal holds the other server too
    finally:
        for link in links:
            await link.close()


async def test_operating_time_spent_by_one_server_paces_the_other(redis_server):
    links = [RedisLink(redis_settings(redis_server.url)) for _ in range(2)]
    for link in links:
        link.start()
    try:
        budgets = [SharedOperatingBudget(link, "webhook", limit=100.0, window=600.0) for link in links]
        assert budgets[1].room("m") == pytest.approx(20.0)
        budgets[0].spend("m", 15.0)
        await until(lambda: budgets[1].room("m") < 6.0, timeout=1.0, what="the spending seen by the other server")
        budgets[1].reported("m", {"operating": 95.0, "operating_reset_at": time.time() + 30})
        await until(lambda: budgets[0].held_for("m") > 25, timeout=1.0, what="the portal's hold seen by the other")
    finally:
        for link in links:
            await link.close()


def test_the_redis_url_comes_from_the_environment_and_is_never_quoted():
    base = "bitrix: {webhook_url: \"https://p.example/rest/1/code/\", deadline: 1.0}\nrouting: {fallback_queue: q}\n"
    assert parse_config(base, "c.yaml").redis is None  # no section: everything stays in this process
    with_section = base + "redis: {url: \"redis://:in-file@10.0.0.5:6379/0\", timeout: 0.2}\n"
    environ = {"AGI_BITRIX_REDIS_URL": "redis://:from-env@10.0.0.5:6379/1"}
    assert parse_config(with_section, "c.yaml", environ).redis.url == environ["AGI_BITRIX_REDIS_URL"]
    assert parse_config(base + "redis: {}\n", "c.yaml", environ).redis.url == environ["AGI_BITRIX_REDIS_URL"]
    problems = []
    for text, env in ((base, environ), (base + "redis: {}\n", {}),
                      (base + "redis: {url: \"http://:secret@h/\"}\n", {}),
                      (base + "redis: {url: \"redis://h\", timeout: 0.6}\n", {})):
        with pytest.raises(ConfigError) as error:
            parse_config(text, "c.yaml", env)
        problems += [str(problem) for problem in error.value.problems]
    assert problems == [
        ("c.yaml:1: redis: the environment sets AGI_BITRIX_REDIS_URL but the file has no redis section;"
        " add `redis: {}` to share state through it"),
        "c.yaml:3: redis.url: missing; set it here or in the environment variable AGI_BITRIX_REDIS_URL",
        "c.yaml:3: redis.url: expected a URL like redis://HOST:6379/0, rediss://… (TLS) or unix:///run/redis.sock",
        ("c.yaml:3: redis.timeout: 0.6 s must be under half of bitrix.deadline (1 s): a call waits for Redis"
        " before the portal"),
    ]


# -- answers this version cannot read, and lookup tasks that fail (issue 21, item 5) -----------------


# An owner with a field more than this version's six, as a later version might store it.
FOREIGN_ROWS = '[["CONTACT","1",["7","OPENED","101","","","","a 7th field"]]]'


async def foreign_answer(app, number, status="FOUND", rows=FOREIGN_ROWS):
    """Write `number`'s shared answer as another version might."""
    client = aioredis.from_url(app.config.redis.url)
    try:
        seconds, micros = await client.time()
        key = app.shared.link.key("answer", app.shared.host, number)
        await client.set(key, f"{status}|{seconds}.{micros:06d}|{rows}", px=60_000)
        return key
    finally:
        await client.aclose()


async def test_an_answer_this_version_cannot_read_is_a_miss_counted_and_logged_once(redis_server, caplog):
    """Before: the decoding error killed the lookup task and left the number's flight registered,
    so every later call from it waited the whole deadline for B24_ERROR=timeout, even after the key
    was deleted. Now it is a miss: the portal is asked, its answer replaces the foreign value."""
    async with PortalEmulator(SAMPLE_CRM) as portal:
        app = Application(server_config(portal, redis_server.url, deadline=1.0))
        host, port = await app.start("127.0.0.1", 0)
        server = (app, host, port)
        try:
            numbers = known_callers(portal, 3)
            await until(lambda: app.shared.link.up, what="Redis up")
            for number in numbers[:2]:
                await foreign_answer(app, number)
            await foreign_answer(app, numbers[2], status="v2;FOUND")  # a header of another shape too
            started = time.monotonic()
            first = await call(server, numbers[0])
            assert reached_owner(first), first
            assert time.monotonic() - started < 0.5  # a normal lookup, not the deadline
            app.lookup.cache.clear()
            assert reached_owner(await call(server, numbers[1]))
            assert reached_owner(await call(server, numbers[2]))
            assert app.shared.link.up  # the script reading it did not fail: Redis is not "down"
            again = await call(server, numbers[0])  # the portal's answer now stands in Redis
            assert reached_owner(again), again
            asked = [r.params["PHONE_NUMBER"] for r in portal.requests_for(SEARCH)]
            unreadable = app.metrics.shared_unreadable._value.get()
        finally:
            await app.stop()
    assert asked.count(numbers[0]) == 1, asked
    assert unreadable == 3
    warnings = [r for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_a_lookup_task_failing_unexpectedly_releases_its_number(redis_server, monkeypatch, caplog):
    """Whatever the exception in the task that asks Redis for a number, its callers get an answer
    at once (B24_ERROR=internal) and the next call from that number is looked up afresh."""
    async with PortalEmulator(SAMPLE_CRM) as portal:
        app = Application(server_config(portal, redis_server.url, deadline=1.0))
        host, port = await app.start("127.0.0.1", 0)
        server = (app, host, port)
        try:
            (number,) = known_callers(portal, 1)
            await until(lambda: app.shared.link.up, what="Redis up")
            real_claim = SharedAnswers.claim

            async def broken_once(self, *args, **kwargs):
                monkeypatch.setattr(SharedAnswers, "claim", real_claim)
                raise LookupError("a bug on the shared path")
            monkeypatch.setattr(SharedAnswers, "claim", broken_once)
            started = time.monotonic()
            failed = await call(server, number)
            assert (failed["B24_STATUS"], failed["B24_ERROR"]) == ("ERROR", "internal"), failed
            assert time.monotonic() - started < 0.5
            started = time.monotonic()
            assert reached_owner(await call(server, number))
            assert time.monotonic() - started < 0.5
        finally:
            await app.stop()
    assert "LookupError: a bug on the shared path" in caplog.text  # logged with its traceback
