"""The call card's outbox in Redis (callcard/redis_outbox.py), against a real redis-server: two
outboxes on one Redis are two servers. Then the whole thing: two `agi-bitrix serve` processes,
one killed (SIGKILL) after accepting a finish the portal could not take yet; the other delivers
it, once."""

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from agi_bitrix.callcard.outbox import Entry, Outcome, RetryPolicy
from agi_bitrix.callcard.redis_outbox import RedisOutbox
from agi_bitrix.config import parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM, SAMPLE_USERS
from tests.conftest import TEST_RULES, until
from tests.network import free_port
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
FINISH = "telephony.externalcall.finish"
RETRY = RetryPolicy(first_delay=0.2, max_delay=1.0, give_up_after=60)


class Sender:
    """Answers each attempt with the next scripted outcome (then `delivered`), recording it."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.attempts: list[Entry] = []

    async def __call__(self, entry):
        self.attempts.append(entry)
        return self.outcomes.pop(0) if self.outcomes else Outcome("delivered")

    def keys(self):
        return [entry.key for entry in self.attempts]


async def started(url, sender, claim_after=60.0):
    outbox = RedisOutbox(url, sender, RETRY, claim_after=claim_after)
    await outbox.open_or_retry_later()
    outbox.start()
    return outbox


async def test_a_finish_added_on_two_servers_is_delivered_once(redis_server):
    first_sender, second_sender = Sender(), Sender()
    first = await started(redis_server.url, first_sender)
    second = await started(redis_server.url, second_sender)
    try:
        assert await first.add("call.1", {"CALL_ID": "call.1"}) == "stored"
        assert await second.add("call.1", {"CALL_ID": "call.1"}) == "duplicate"
        await until(lambda: first_sender.attempts or second_sender.attempts)
        await until(lambda: first.waiting_of("finish") == 0 and not first._held)
        await asyncio.sleep(0.3)
        row = await second.row("call.1")
    finally:
        await first.close()
        await second.close()

    assert first_sender.keys() + second_sender.keys() == ["call.1"]
    assert (row["state"], row["attempts"], row["params"]) == ("delivered", 1, {"CALL_ID": "call.1"})


async def test_a_delivered_finish_is_kept_as_long_as_in_sqlite_and_then_forgotten(redis_server):
    import redis.asyncio as aioredis
    outbox = await started(redis_server.url, Sender())
    try:
        await outbox.add("call.2", {"CALL_ID": "call.2"})
        await until(lambda: outbox.waiting_of("finish") == 0)
        await until(lambda: not outbox._held)
    finally:
        await outbox.close()
    client = aioredis.from_url(redis_server.url)
    try:
        ttl = await client.ttl("agi-bitrix:outbox:row:call.2")
        entries = await client.xlen("agi-bitrix:outbox:stream")
    finally:
        await client.aclose()
    assert 2 * 86400 - 10 < ttl <= 2 * 86400
    assert entries == 0  # acknowledged and deleted from the stream


async def test_a_recording_waits_for_its_finish_and_fails_with_it(redis_server):
    sender = Sender(Outcome("failed", "WRONG_AUTH_TYPE: not an application"))
    outbox = await started(redis_server.url, sender)
    try:
        await outbox.add("call.3", {"CALL_ID": "call.3"})
        await outbox.add("call.3/recording", {"CALL_ID": "call.3"}, kind="recording", after="call.3")
        await until(lambda: outbox.failed_of("finish") == 1 and outbox.failed_of("recording") == 1)
        recording = await outbox.row("call.3/recording")
    finally:
        await outbox.close()

    assert sender.keys() == ["call.3"]
    assert recording["state"] == "failed"
    assert recording["last_error"].startswith("not sent: call.3 was not delivered")


async def test_a_recording_goes_once_its_finish_is_delivered(redis_server):
    sender = Sender(Outcome("retry", "portal down"))
    outbox = await started(redis_server.url, sender)
    try:
        await outbox.add("call.4", {"CALL_ID": "call.4"})
        await outbox.add("call.4/recording", {"CALL_ID": "call.4"}, kind="recording", after="call.4")
        await until(lambda: outbox.waiting_of("finish") == 0 and outbox.waiting_of("recording") == 0, timeout=10)
    finally:
        await outbox.close()

    assert sender.keys() == ["call.4", "call.4", "call.4/recording"]


async def test_a_finish_held_by_a_server_that_stopped_is_taken_over_and_delivered_once(redis_server):
    """The first server took the finish (its attempt counted) and stopped without delivering it:
    after claim_after the second takes the entry over and sends attempt 2."""
    portal_down = Sender(*[Outcome("retry", "http_503: portal down")] * 100)
    first = await started(redis_server.url, portal_down, claim_after=1.0)
    await first.add("call.5", {"CALL_ID": "call.5"})
    await until(lambda: portal_down.attempts)
    await first.close()  # nothing acknowledged: the entry stays in its pending list
    survivor_sender = Sender()
    survivor = await started(redis_server.url, survivor_sender, claim_after=1.0)
    try:
        await until(lambda: survivor_sender.attempts, timeout=10, what="the survivor to take the finish over")
        await until(lambda: survivor.waiting_of("finish") == 0)
        row = await survivor.row("call.5")
        await asyncio.sleep(1.5)  # a further takeover round finds nothing to take
    finally:
        await survivor.close()

    assert portal_down.keys() == ["call.5"]
    assert [(entry.key, entry.attempt) for entry in survivor_sender.attempts] == [("call.5", 2)]
    assert row["state"] == "delivered"


async def test_while_redis_is_down_finishes_wait_in_memory_and_are_delivered_once_it_is_back(tmp_path):
    redis_server = RedisServer(tmp_path / "redis")
    sender = Sender()
    outbox = await started(redis_server.url, sender)
    try:
        assert "cannot use outbox redis://127.0.0.1" in outbox.problem
        assert await outbox.add("call.6", {"CALL_ID": "call.6"}) == "kept"
        assert outbox.kept_of("finish") == 1
        redis_server.start()
        await until(lambda: sender.attempts, timeout=10, what="the kept finish to be delivered")
        await until(lambda: outbox.problem == "" and outbox.waiting_of("finish") == 0)
    finally:
        await outbox.close()
        redis_server.stop()

    assert sender.keys() == ["call.6"]
    assert outbox.lost == 0


@pytest.mark.parametrize("outbox, problem", [
    ("redis://:6379/0", "the Redis URL needs a host"),
    ("redis://10.0.0.5:63x9/0", "port is not a number"),
    ("outbox.sqlite3", "must be an absolute path to the SQLite file, a redis:// URL, or redis"),
    ("redis", "redis names the redis section's Redis, but there is no redis section"),
])
def test_check_refuses_an_outbox_it_cannot_use(outbox, problem):
    text = (f'bitrix: {{webhook_url: "https://portal.example.com/rest/1/abc/"}}\n'
            f"routing: {{fallback_queue: support}}\ncallcard: {{outbox: '{outbox}'}}\n")
    with pytest.raises(Exception, match=problem):
        parse_config(text, "redis-outbox.yaml")


async def test_outbox_redis_uses_the_redis_sections_url_and_prefix(redis_server):
    """`callcard.outbox: redis`: one Redis for the shared state and the outbox, its URL given once
    (AGI_BITRIX_REDIS_URL overriding it, so a password stays out of the file)."""
    import redis.asyncio as aioredis

    from agi_bitrix.app import Application

    text = ('bitrix: {webhook_url: "https://portal.example.com/rest/1/abc/"}\n'
            'metrics: {listen: "off"}\nrouting: {fallback_queue: support}\n'
            'redis: {url: "redis://unused.example.com/0", key_prefix: "office1:"}\ncallcard: {outbox: redis}\n')
    config = parse_config(text, "redis-outbox.yaml", {"AGI_BITRIX_REDIS_URL": redis_server.url})
    app = Application(config)
    try:
        await app.start("127.0.0.1", 0)
        assert isinstance(app.outbox, RedisOutbox) and await app.outbox.add("externalCall.1.1", {"CALL_ID": "x"})
        client = aioredis.from_url(redis_server.url)
        try:
            assert [key async for key in client.scan_iter("office1:outbox:*")]
        finally:
            await client.aclose()
    finally:
        await app.stop()


# -- Redis restarted empty ------------------------------------------------------------------------

def outbox_errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "agi_bitrix.outbox"]


async def test_after_redis_is_flushed_the_stream_and_group_are_made_again_and_finishes_delivered(
        redis_server, caplog):
    """The group was made once per process: after FLUSHALL every later finish failed (NOGROUP),
    the card flipped up and down with an ERROR each second, until agi-bitrix restarted."""
    import redis.asyncio as aioredis
    sender = Sender()
    outbox = await started(redis_server.url, sender)
    client = aioredis.from_url(redis_server.url)
    try:
        await outbox.add("call.20", {"CALL_ID": "call.20"})
        await until(lambda: sender.keys() == ["call.20"])
        await client.flushall()
        for key in ("call.21", "call.22", "call.23"):
            assert await outbox.add(key, {"CALL_ID": key}) == "stored"
        await until(lambda: len(sender.keys()) == 4, timeout=5, what="the finishes after the flush")
        await asyncio.sleep(0.5)  # the loop goes round a few more times
        problem = outbox.problem
    finally:
        await client.aclose()
        await outbox.close()

    assert sender.keys() == ["call.20", "call.21", "call.22", "call.23"]
    assert problem == ""
    errors = outbox_errors(caplog)
    assert len(errors) == 1 and "Redis had lost the outbox's stream" in errors[0], errors


async def test_after_redis_is_killed_and_restarted_empty_waiting_finishes_are_delivered(tmp_path, caplog):
    redis_server = RedisServer(tmp_path / "redis").start()
    sender = Sender()
    outbox = await started(redis_server.url, sender)
    try:
        await outbox.add("call.30", {"CALL_ID": "call.30"})
        await until(lambda: sender.keys() == ["call.30"])
        assert redis_server.process is not None
        redis_server.process.kill()
        redis_server.process.wait()
        for path in (tmp_path / "redis").iterdir():  # restarted empty: no AOF to replay
            if path.name != "redis.log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for key in ("call.31", "call.32", "call.33"):  # kept in memory while Redis is away
            assert await outbox.add(key, {"CALL_ID": key}) in ("stored", "kept")
        redis_server.start()
        await until(lambda: len(sender.keys()) == 4, timeout=10, what="the finishes kept while Redis was down")
        await until(lambda: outbox.problem == "" and outbox.waiting_of("finish") == 0)
        await asyncio.sleep(0.5)
    finally:
        await outbox.close()
        redis_server.stop()

    assert sorted(sender.keys()) == ["call.30", "call.31", "call.32", "call.33"]
    errors = outbox_errors(caplog)
    # Once down (the connection), once for what Redis lost; not once a second.
    assert sum("call card is DOWN" in error for error in errors) == 1, errors
    assert sum("Redis had lost the outbox's stream" in error for error in errors) <= 1, errors


async def test_a_password_in_the_query_shows_nowhere(redis_server, caplog):
    """?password= (redis-py's form for unix sockets, also taken on TCP) was shown whole in /healthz
    (callcard.outbox), on the admin page (which shows that body) and in the "outbox … open" line."""
    import redis.asyncio as aioredis

    from agi_bitrix.app import Application

    caplog.set_level(logging.INFO)
    secret = "Qu3ry/Pass"
    admin = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    await admin.config_set("requirepass", secret)
    await admin.aclose()
    url = f"redis://127.0.0.1:{redis_server.port}/0?password=Qu3ry%2FPass"
    text = ('bitrix: {webhook_url: "https://portal.example.com/rest/1/abc/"}\n'
            f'metrics: {{listen: "off"}}\nrouting: {{fallback_queue: support}}\ncallcard: {{outbox: "{url}"}}\n')
    app = Application(parse_config(text, "redis-outbox.yaml"))
    try:
        await app.start("127.0.0.1", 0)
        assert await app.outbox.add("externalCall.9.1", {"CALL_ID": "x"}) == "stored"
        _, body = app.health()
    finally:
        await app.stop()
    assert body["callcard"]["outbox"] == f"redis://:***@127.0.0.1:{redis_server.port}/0"
    assert body["callcard"]["state"] == "up"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "outbox redis://:***@" in logged
    assert "Qu3ry" not in logged and "Qu3ry" not in json.dumps(body)


# -- two real servers, one killed ------------------------------------------------------------------

def server_config(path: Path, webhook_url: str, redis_url: str) -> Path:
    path.write_text(textwrap.dedent(f"""\
        bitrix: {{webhook_url: "{webhook_url}", deadline: 1.0, rate_limit: {{per_second: 1000, burst: 1000}}}}
        metrics: {{listen: "off"}}
        routing:
          fallback_queue: support
          timezone: Europe/Moscow
          rules:
        """) + textwrap.indent(TEST_RULES, "    ") + textwrap.dedent(f"""\
        callcard:
          outbox: "{redis_url}"
          outbox_claim_after: 2
          finish:
            retry: {{first: 0.5, max: 1}}
        """))
    return path


def text_of(path: Path) -> str:
    return path.read_text(errors="replace")


async def serve(config: Path, webhook_url: str, log: Path) -> tuple[asyncio.subprocess.Process, int]:
    """`agi-bitrix serve` as an admin runs it, its output in `log`; once it listens."""
    port = free_port()
    output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agi_bitrix", "serve", "-c", str(config), "--listen", f"127.0.0.1:{port}",
            env={**os.environ, "AGI_BITRIX_WEBHOOK_URL": webhook_url}, cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT)
    finally:
        os.close(output)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            assert process.returncode is None, text_of(log)
            await asyncio.sleep(0.05)
    process.kill()
    raise AssertionError(f"agi-bitrix serve did not listen:\n{text_of(log)}")


async def test_a_finish_accepted_by_a_server_then_killed_is_delivered_by_the_other_once(redis_server, tmp_path):
    portal = PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS)
    await portal.start()
    config = server_config(tmp_path / "agi-bitrix.yaml", portal.webhook_url, redis_server.url)
    doomed, doomed_port = await serve(config, portal.webhook_url, tmp_path / "doomed.log")
    survivor, _ = await serve(config, portal.webhook_url, tmp_path / "survivor.log")
    try:
        registered = await fake_call("127.0.0.1", doomed_port, script="register",
                                     args=("79161234567", "1", "1700000000.1", "74950000000", "CONTACT", "12"),
                                     uniqueid="1700000000.1")
        call_id = registered.variables["B24_CALL_ID"]
        # The portal cannot take finishes: the doomed server accepts this one and keeps retrying it.
        portal.fail("html", method=FINISH, status=503)
        await fake_call("127.0.0.1", doomed_port, script="finish", args=(call_id, "1", "NOANSWER"),
                        uniqueid="1700000000.1")
        await until(lambda: f"finish {call_id} not delivered (attempt 1" in text_of(tmp_path / "doomed.log"),
                    what="the doomed server to try the finish")
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
        portal.reset_faults()
        await until(lambda: portal.calls[call_id].finish_params is not None, timeout=20,
                    what="the survivor to deliver the finish")
        await asyncio.sleep(3)  # another takeover round: nothing more is sent
        finishes = [request for request in portal.requests_for(FINISH) if request.params.get("CALL_ID") == call_id]
    finally:
        for process in (doomed, survivor):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await process.wait()
        await portal.stop()

    survivor_log = text_of(tmp_path / "survivor.log")
    assert f"finish {call_id} delivered" not in text_of(tmp_path / "doomed.log")
    assert "taken over from a server that stopped" in survivor_log, survivor_log
    assert portal.calls[call_id].finish_params["STATUS_CODE"] == "304"
    # The doomed server's refused attempts, then exactly one that went through.
    assert len(finishes) >= 2
    assert sum(1 for line in survivor_log.splitlines() if f"finish {call_id} delivered" in line) == 1
