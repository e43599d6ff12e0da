"""Click-to-call's events behind a load balancer: two servers, one real redis-server, and each
CALL_ID acted on by one of them only (agi_bitrix.bitrix.event_gate.RedisSeen)."""

import asyncio

import aiohttp
import pytest

from agi_bitrix.bitrix.event_gate import RedisSeen
from agi_bitrix.bitrix.settings import RedisSettings
from agi_bitrix.bitrix.shared import RedisLink
from agi_bitrix.testing.portal_events import PortalEvents
from tests.conftest import until
from tests.redis_server import RedisServer
from tests.test_events import CALL_START, CLICK, start_receiving, write_tokens


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
async def two_servers(redis_server, tmp_path):
    """Two receivers, as two servers would have them: each its own Redis link and memory."""
    portal_events = PortalEvents()
    write_tokens(tmp_path / "oauth.json", portal_events)
    links = [RedisLink(RedisSettings(url=redis_server.url, timeout=0.5)) for _ in range(2)]
    servers = [await start_receiving(portal_events, tmp_path / "oauth.json", seen=RedisSeen(link, 120.0))
               for link in links]
    yield portal_events, servers, links
    for receiving, link in zip(servers, links, strict=True):
        await receiving.receiver.close()
        await receiving.server.close()
        await link.close()


async def test_the_same_call_id_at_two_servers_is_acted_on_by_one(two_servers):
    portal_events, servers, _ = two_servers
    clicks = [{**CLICK, "CALL_ID": f"externalCall.lb.{n}"} for n in range(20)]
    async with aiohttp.ClientSession() as http:
        async def both(data):
            form = portal_events.event_form(CALL_START, data)
            async def one(url):
                async with http.post(url, data=form) as answer:
                    return await answer.json()
            return await asyncio.gather(*(one(s.url) for s in servers))

        for answers in await asyncio.gather(*(both(data) for data in clicks)):
            assert sorted(answers, key=str) == [{"error": "duplicate"}, {"status": "accepted"}]
    await until(lambda: sum(len(s.handled) for s in servers) == 20, what="twenty events handled")
    await asyncio.sleep(0.05)
    handled = [event.call_id for s in servers for event in s.handled]
    assert sorted(handled) == sorted(data["CALL_ID"] for data in clicks)


async def test_with_redis_gone_each_server_still_takes_events_by_its_own_memory(two_servers, redis_server):
    portal_events, servers, links = two_servers
    redis_server.stop()
    first = portal_events.event_form(CALL_START, CLICK)
    assert await servers[0].post(first) == 200
    assert await servers[0].post(first) == 200  # its own memory still refuses the repeat
    await until(lambda: servers[0].handled, what="the event taken without Redis")
    await asyncio.sleep(0.05)
    assert len(servers[0].handled) == 1 and servers[0].refused == {"duplicate": 1}
    assert not links[0].up and servers[0].receiver.gate.seen.unshared == 1
