"""Running it for real: client filtering, session caps and timeouts, graceful stop, reload."""

import asyncio
import dataclasses
import time
from ipaddress import ip_network

from agi_bitrix.app import Application
from agi_bitrix.config import load_config
from agi_bitrix.server import _allowed
from agi_bitrix.testing.fake_asterisk import asterisk_header, fake_call
from tests.conftest import call_requests, make_config, until


def with_server(config, **changes):
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **changes))


async def started(config):
    app = Application(config)
    host, port = await app.start("127.0.0.1", 0)
    return app, host, port


async def started_from_file(path, text):
    """The application started from a config file at `path` holding `text`; a test rewrites it to reload."""
    path.write_text(text)
    return await started(load_config(path))


def config_up_to_the_rules(portal) -> str:
    """A config file's text for `portal`, ending where its rules begin: a test appends them."""
    return (f'bitrix: {{webhook_url: "{portal.webhook_url}", deadline: 1.0}}\n'
            "routing:\n  fallback_queue: support\n  rules:\n")


EVERYONE_TO_SALES = "    - {name: everyone-to-sales, route: {queue: sales}}\n"


async def closed_at_once(host, port) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(asterisk_header(callerid="89161234567"))
    try:
        data = await asyncio.wait_for(reader.read(), 2)
    except ConnectionError:
        data = b""
    writer.close()
    return data == b""


def test_allowed_addresses():
    loopback = (ip_network("127.0.0.0/8"), ip_network("::1/128"))
    assert _allowed(("127.0.0.1", 5000), loopback)
    assert _allowed(("::1", 5000, 0, 0), loopback)
    assert _allowed(("::ffff:127.0.0.1", 5000, 0, 0), loopback)
    assert not _allowed(("10.1.2.3", 5000), loopback)
    assert not _allowed(("fe80::1%eth0", 5000, 0, 2), loopback)
    assert not _allowed(None, loopback)


async def test_clients_outside_allowed_networks_are_refused(portal):
    app, host, port = await started(with_server(make_config(portal.webhook_url),
                                                allowed_clients=(ip_network("10.0.0.0/8"),)))
    try:
        assert await closed_at_once(host, port)
        assert app.server.refused == 1 and call_requests(portal) == []
    finally:
        await app.stop()


async def test_session_cap_refuses_extra_connections_and_recovers(portal):
    app, host, port = await started(with_server(make_config(portal.webhook_url, header_timeout=0.5),
                                                max_sessions=5))
    try:
        silent = [await asyncio.open_connection(host, port) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert await closed_at_once(host, port)
        await asyncio.sleep(0.6)  # the silent ones hit the header timeout and free their places
        assert (await fake_call(host, port, callerid="89161234567")).variables["B24_TARGET"] == "101"
        for _, writer in silent:
            writer.close()
    finally:
        await app.stop()


async def test_session_timeout_bounds_a_client_that_never_replies(portal):
    app, host, port = await started(with_server(make_config(portal.webhook_url), session_timeout=0.5))
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(asterisk_header(callerid="89161234567"))
        assert (await reader.readline()).startswith(b"EXEC MSet")
        # No "200 result=0": without session_timeout the server would wait REPLY_TIMEOUT (10 s).
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        assert not app.server.sessions
    finally:
        await app.stop()


async def test_graceful_stop_finishes_calls_in_flight(portal):
    app, host, port = await started(make_config(portal.webhook_url))
    portal.fail("slow", delay=0.4)
    calls = [asyncio.create_task(fake_call(host, port, callerid=c, uniqueid=str(i)))
             for i, c in enumerate(["89161234567", "89262345678", "84957654321"] * 3)]
    await asyncio.sleep(0.1)
    assert len(app.server.sessions) == 9
    await app.stop()
    results = await asyncio.gather(*calls)
    assert [r.variables["B24_STATUS"] for r in results] == ["FOUND"] * 9
    try:
        await asyncio.open_connection(host, port)
        raise AssertionError("still accepting after stop")
    except OSError:
        pass


async def test_reload_applies_a_good_config_and_refuses_a_bad_one(portal, tmp_path):
    path = tmp_path / "agi-bitrix.yaml"
    text = config_up_to_the_rules(portal)
    app, host, port = await started_from_file(path, text + EVERYONE_TO_SALES)
    try:
        assert (await fake_call(host, port, callerid="89161234567")).variables["B24_TARGET"] == "sales"
        path.write_text(text + "    - {name: everyone-to-desk, route: {extension: '100'}}\n")
        assert await app.reload()
        v = (await fake_call(host, port, callerid="89161234567")).variables
        assert (v["B24_TARGET"], v["B24_RULE"], v["B24_CACHE"]) == ("100", "everyone-to-desk", "hit")
        path.write_text(text + "    - {name: broken, route: [teleport]}\n")
        assert not await app.reload()
        assert (await fake_call(host, port, callerid="89161234567")).variables["B24_TARGET"] == "100"
        assert app.reloads == {"success": 1, "failure": 1}
    finally:
        await app.stop()


async def test_reload_swaps_the_whole_runtime_and_keeps_what_outlives_it(portal, tmp_path, caplog):
    path = tmp_path / "agi-bitrix.yaml"
    base = (f'bitrix: {{webhook_url: "{portal.webhook_url}", deadline: 1.0,'
            ' rate_limit: {per_second: 2, burst: 40}}\n'
            "routing:\n  fallback_queue: support\n  rules: []\n")
    app, host, port = await started_from_file(path, base)
    try:
        first = app.runtime
        path.write_text(base.replace("fallback_queue: support", "fallback_queue: sales"))
        assert await app.reload()
        second = app.runtime
        # Everything made from the config is new; what the lookups learned and the budget are not.
        assert second is not first and second.config.policy.fallback_queue == "sales"
        assert (second.portal is not first.portal and second.lookup is not first.lookup
                and second.endpoint is not first.endpoint)
        assert second.lookup.memory is first.lookup.memory
        assert second.portal.budget is first.portal.budget
        assert second.portal.operating is first.portal.operating  # each method's operating time spent
        assert first.config.policy.fallback_queue == "support"  # the old runtime is left as it was
        path.write_text(base.replace("per_second: 2", "per_second: 4"))
        assert await app.reload() and app.runtime.portal.budget is not second.portal.budget
        assert app.runtime.portal.operating is second.portal.operating
        # A URL the portal client cannot use: the config check refuses it, as `agi-bitrix check` does.
        third = app.runtime
        path.write_text(base.replace(portal.webhook_url, "https://x.bitrix24.ru/rest/1/code/profile.json"))
        assert not await app.reload()
        assert app.runtime is third and app.reloads == {"success": 2, "failure": 1}
        assert "reload refused" in caplog.text and "/code/" not in caplog.text
        v = (await fake_call(host, port, callerid="89161234567")).variables
        assert (v["B24_STATUS"], v["B24_TARGET"]) == ("FOUND", "support")  # the portal still asked
    finally:
        await app.stop()


async def test_many_stalled_sockets_do_not_delay_calls(portal):
    app, host, port = await started(make_config(portal.webhook_url, header_timeout=2.0))
    try:
        stalled = [await asyncio.open_connection(host, port) for _ in range(300)]
        results = await asyncio.gather(*(fake_call(host, port, callerid="89161234567", uniqueid=str(i))
                                         for i in range(30)))
        assert all(r.variables["B24_TARGET"] == "101" for r in results)
        for _, writer in stalled:
            writer.close()
    finally:
        await app.stop()


async def test_calls_are_answered_while_a_big_config_reloads(portal, tmp_path):
    """Parsing and checking thousands of rules takes seconds; it must not stop the event loop."""
    path = tmp_path / "agi-bitrix.yaml"
    head = config_up_to_the_rules(portal)
    app, host, port = await started_from_file(path, head + EVERYONE_TO_SALES)
    rules = "".join(f"    - {{name: did-{n}, match: {{did: ['7495{n:07d}'], caller_regex: '7916{n % 1000:03d}.*'}},"
                    f" route: {{queue: q{n % 50}}}}}\n" for n in range(4000))
    path.write_text(head + rules + "    - {name: everyone-to-desk, route: {extension: '100'}}\n")
    latencies, targets = [], set()
    try:
        reload = asyncio.create_task(app.reload())
        started_at = time.monotonic()
        while not reload.done():
            began = time.monotonic()
            result = await fake_call(host, port, callerid="89161234567")
            latencies.append(time.monotonic() - began)
            targets.add(result.variables["B24_TARGET"])
            await asyncio.sleep(0.02)
        reloading = time.monotonic() - started_at
        assert await reload and app.config.policy.rules[-1].name == "everyone-to-desk"
    finally:
        await app.stop()
    assert reloading > 0.5, f"the reload took {reloading:.2f} s: too quick to show anything"
    # Answered all along, each within the deadline, by the old config until the swap.
    assert len(latencies) >= reloading / 0.2 and max(latencies) < 1.0, (reloading, max(latencies))
    assert targets <= {"sales", "100"}


async def test_two_reloads_in_a_row_run_one_after_the_other_and_any_failure_is_a_refused_reload(portal, tmp_path,
                                                                                                caplog):
    path = tmp_path / "agi-bitrix.yaml"
    head = config_up_to_the_rules(portal)
    app, host, port = await started_from_file(path, head + "    - {name: first, route: {queue: sales}}\n")
    try:
        path.write_text(head + "    - {name: second, route: {queue: sales}}\n")
        app.reload_soon()
        app.reload_soon()  # the second waits for the first, then reads the file again
        path.write_text(head + "    - {name: third, route: {queue: sales}}\n")
        await until(lambda: app.reloads["success"] == 2, what="both reloads")
        assert app.config.policy.rules[0].name == "third"
        # Nesting deeper than the YAML parser can recurse: a RecursionError, which no config
        # check expects; it must still be a refused reload, logged and counted.
        path.write_text("routing: " + "[" * 3000)
        app.reload_soon()
        await until(lambda: app.reloads["failure"] == 1, what="the refused reload")
        assert app.config.policy.rules[0].name == "third"
        assert "reload refused: " in caplog.text
        assert "Exception in callback" not in caplog.text and "never retrieved" not in caplog.text
        assert (await fake_call(host, port, callerid="89161234567")).variables["B24_RULE"] == "third"
    finally:
        await app.stop()
