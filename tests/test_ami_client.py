"""agi_bitrix.ami.client against a hostile AMI server in the test (asyncio): a refused login, a
connection dropped mid-action, an event flood, an oversized message, a banner that never comes,
a peer that stops answering. Each time the client says why in health(), fails what waits at
once, never sends an action twice, and comes back by itself."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agi_bitrix.ami.client import AmiClient
from agi_bitrix.ami.errors import (
    ActionFailed,
    ActionTimeout,
    AmiUnavailable,
    ConnectionLost,
    OriginateOutcomeUnknown,
    UnsafeAction,
)
from agi_bitrix.ami.originate import OriginateReason, OriginateRequest, originate
from agi_bitrix.ami.settings import AmiSettings
from agi_bitrix.monitoring import Metrics
from tests.conftest import until

SECRET = "s3cret-for-the-test"
BANNER = b"Asterisk Call Manager/9.0.0\r\n"
CLOSE = b"<close>"  # an answer that closes the connection instead

Answer = Callable[[dict[str, str]], Awaitable[bytes | None]]


def reply(action: dict[str, str], status: str = "Success", **fields: str) -> bytes:
    lines = [f"Response: {status}", f"ActionID: {action['ActionID']}", *(f"{k}: {v}" for k, v in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def plain_asterisk(action: dict[str, str]) -> bytes | None:
    """Logs in the right secret, answers Ping; anything else "queued"."""
    if action["Action"] == "Login":
        ok = action.get("Secret") == SECRET
        return reply(action, "Success" if ok else "Error",
                     Message="Authentication accepted" if ok else "Authentication failed")
    return reply(action, Message="Pong" if action["Action"] == "Ping" else "Originate successfully queued")


class FakeAmi:
    """An AMI server as hostile as the test makes it: `answer` decides each action's reply
    (bytes, None for silence, CLOSE to hang up); `greeting` is what it says first."""

    def __init__(self, answer: Answer = plain_asterisk, greeting: bytes | None = BANNER) -> None:
        self.answer = answer
        self.greeting = greeting
        self.connections = 0
        self.actions: list[dict[str, str]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def actions_named(self, name: str) -> list[dict[str, str]]:
        return [action for action in self.actions if action["Action"] == name]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()

    async def send_all(self, data: bytes) -> None:
        """To every open connection (events)."""
        for writer in self.writers:
            if not writer.is_closing():
                writer.write(data)
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        if self.greeting is not None:
            writer.write(self.greeting)
        try:
            while (action := await self._read_action(reader)) is not None:
                self.actions.append(action)
                answer = await self.answer(action)
                if answer == CLOSE:
                    break
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read_action(reader: asyncio.StreamReader) -> dict[str, str] | None:
        action: dict[str, str] = {}
        while line := (await reader.readline()).decode():
            if line == "\r\n":
                return action
            name, _, value = line.rstrip("\r\n").partition(": ")
            action[name] = value
        return None


def settings(port: int, **overrides) -> AmiSettings:
    values = {"host": "127.0.0.1", "port": port, "username": "agi-bitrix", "secret_file": "", "connect_timeout": 0.5,
              "action_timeout": 2.0, "ping_interval": 3600.0, "reconnect_first": 0.05, "reconnect_max": 0.2,
              "event_queue": 100}
    return AmiSettings(**{**values, **overrides})


@pytest.fixture
async def fake() -> AsyncIterator[FakeAmi]:
    server = FakeAmi()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def client(fake: FakeAmi, metrics: Metrics) -> AsyncIterator[AmiClient]:
    client = AmiClient(settings(fake.port), lambda: SECRET, observer=metrics)
    client.start()
    assert await client.wait_up(5), client.health()
    yield client
    await client.stop()


def metric(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


# -- login ----------------------------------------------------------------------------------------

async def test_logs_in_with_the_secret_and_reports_up(client, fake, metrics):
    (login,) = fake.actions_named("Login")
    assert (login["Username"], login["Secret"], login["Events"]) == ("agi-bitrix", SECRET, "on")
    health = client.health()
    assert (health["up"], health["reason"], health["ami_version"]) == (True, "", "9.0.0")
    assert metric(metrics, "agi_bitrix_ami_up") == 1


async def test_a_refused_login_keeps_it_down_says_why_retries_with_backoff_and_logs_once(fake, caplog):
    caplog.set_level(logging.INFO, "agi_bitrix.ami")
    client = AmiClient(settings(fake.port), lambda: "wrong-secret-value")
    client.start()
    try:
        await until(lambda: len(fake.actions_named("Login")) >= 4, what="four login attempts")
        health = client.health()
        assert health["up"] is False
        assert "refused the login of AMI user 'agi-bitrix'" in str(health["reason"])
        assert "Authentication failed" in str(health["reason"])
        with pytest.raises(AmiUnavailable, match="refused the login"):
            await client.send("Ping")
        down = [record for record in caplog.records if "AMI down" in record.getMessage()]
        assert len(down) == 1  # once per change, not once per attempt
        assert "wrong-secret-value" not in caplog.text + str(health)
    finally:
        await client.stop()
    # Backoff: 0.05 s doubling up to 0.2 s, not a tight loop.
    assert len(fake.actions_named("Login")) < 40


async def test_a_peer_that_sends_no_banner_is_given_up_after_the_connect_timeout(fake):
    fake.greeting = None
    client = AmiClient(settings(fake.port, connect_timeout=0.3), lambda: SECRET)
    client.start()
    try:
        await until(lambda: "no AMI banner" in str(client.health()["reason"]), what="the banner timeout")
        assert fake.actions == []  # the secret is never sent to what did not say it is AMI
    finally:
        await client.stop()


async def test_a_peer_that_is_not_ami_is_told_apart_and_gets_no_secret(fake):
    fake.greeting = b"SSH-2.0-OpenSSH_9.2\r\n"
    client = AmiClient(settings(fake.port), lambda: SECRET)
    client.start()
    try:
        await until(lambda: "not an AMI banner" in str(client.health()["reason"]), what="the refusal")
        assert fake.actions == []
    finally:
        await client.stop()


async def test_nothing_listening_is_said_plainly(fake):
    await fake.close()
    client = AmiClient(settings(fake.port), lambda: SECRET)
    client.start()
    try:
        await until(lambda: "cannot connect to 127.0.0.1" in str(client.health()["reason"]), what="the refusal")
    finally:
        await client.stop()


# -- actions and lost connections -----------------------------------------------------------------

async def test_a_connection_lost_mid_action_fails_it_at_once_and_it_is_never_sent_again(client, fake, metrics):
    async def drop_the_originate(action):
        return CLOSE if action["Action"] == "Originate" else await plain_asterisk(action)
    fake.answer = drop_the_originate

    started = time.monotonic()
    with pytest.raises(OriginateOutcomeUnknown):  # Asterisk may have read it: it may ring
        await originate(client, OriginateRequest("Local/101@phones", context="out", exten="74951234567"))
    assert time.monotonic() - started < 0.5  # not the action timeout (2 s)

    assert await client.wait_up(5), client.health()
    fake.answer = plain_asterisk
    assert (await client.send("Ping")).message == "Pong"
    assert len(fake.actions_named("Originate")) == 1
    assert client.health()["reconnects"] == 1
    assert metric(metrics, "agi_bitrix_ami_reconnects_total") == 1


async def test_any_action_waiting_when_the_connection_ends_fails_with_connection_lost(client, fake):
    async def drop_on_status(action):
        return CLOSE if action["Action"] == "Status" else await plain_asterisk(action)
    fake.answer = drop_on_status
    started = time.monotonic()
    with pytest.raises(ConnectionLost):
        await client.send("Status")
    assert time.monotonic() - started < 0.5 and not client.up


async def test_a_connection_lost_while_an_originate_rings_fails_it_at_once(client, fake):
    ringing = asyncio.create_task(originate(client, OriginateRequest("Local/101@phones", application="Wait",
                                                                     data="1", timeout=30)))
    await until(lambda: fake.actions_named("Originate"), what="the Originate")
    await asyncio.sleep(0.05)  # "queued" is answered; now it waits for OriginateResponse
    for writer in fake.writers:
        writer.close()
    with pytest.raises(OriginateOutcomeUnknown):
        await asyncio.wait_for(ringing, 1)


async def test_an_action_nobody_answers_times_out_and_the_connection_stays(client, fake):
    async def silent_to_status(action):
        return None if action["Action"] == "Status" else await plain_asterisk(action)
    fake.answer = silent_to_status
    with pytest.raises(ActionTimeout):
        await client.send("Status", timeout=0.2)
    assert client.up and client.health()["waiting_actions"] == 0


async def test_an_error_response_is_action_failed_with_asterisks_message(client, fake):
    async def forbid(action):
        if action["Action"] == "Originate":
            return reply(action, "Error", Message="Originate Access Forbidden: app or data blacklisted")
        return await plain_asterisk(action)
    fake.answer = forbid
    with pytest.raises(ActionFailed, match="Originate Access Forbidden"):
        await originate(client, OriginateRequest("Local/1@x", application="System", data="true"))


async def test_a_peer_that_stops_answering_pings_is_dropped_and_connected_again(fake):
    async def deaf_after_login(action):
        return None if action["Action"] == "Ping" else await plain_asterisk(action)
    fake.answer = deaf_after_login
    client = AmiClient(settings(fake.port, ping_interval=0.1, action_timeout=0.2), lambda: SECRET)
    client.start()
    try:
        await until(lambda: fake.connections >= 2, what="a new connection")
        assert client.health()["reconnects"] >= 1
    finally:
        await client.stop()


async def test_an_action_while_down_is_refused_at_once_and_not_sent_later(fake):
    await fake.close()
    client = AmiClient(settings(fake.port), lambda: SECRET)
    client.start()
    try:
        with pytest.raises(AmiUnavailable):
            await client.send("Originate", [("Channel", "Local/1@x")])
    finally:
        await client.stop()
    assert fake.actions == []


# -- hostile input --------------------------------------------------------------------------------

async def test_an_event_flood_is_dropped_and_counted_and_memory_stays_bounded(client, fake, metrics):
    delivered: list[str] = []
    client.add_listener(lambda event: delivered.append(event.get("N")))
    flood = b"".join(b"Event: Newexten\r\nN: %d\r\n\r\n" % n for n in range(20_000))
    await fake.send_all(flood)

    await until(lambda: len(delivered) + client.health()["dropped_events"] == 20_000, what="every event seen")
    dropped = client.health()["dropped_events"]
    assert dropped > 0 and len(delivered) <= 20_000 - dropped
    assert client._events.qsize() <= 100  # the queue never grew past event_queue
    assert metric(metrics, "agi_bitrix_ami_dropped_events_total") == dropped
    assert (await client.send("Ping")).message == "Pong"  # answers are never among the dropped


async def test_an_originate_response_in_a_flood_is_never_dropped(client, fake):
    async def outcome_in_a_flood(action):
        if action["Action"] != "Originate":
            return await plain_asterisk(action)
        flood = b"".join(b"Event: Newexten\r\nN: %d\r\n\r\n" % n for n in range(5_000))
        return (reply(action, Message="Originate successfully queued") + flood
                + f"Event: OriginateResponse\r\nActionID: {action['ActionID']}\r\nResponse: Failure\r\n"
                  "Channel: Local/1@x\r\nReason: 5\r\nUniqueid: 1.2\r\n\r\n".encode())
    fake.answer = outcome_in_a_flood
    client.add_listener(lambda event: None)
    result = await originate(client, OriginateRequest("Local/1@x", context="c", exten="s"))
    assert (result.success, result.reason, result.uniqueid) == (False, OriginateReason.BUSY, "1.2")


async def test_an_oversized_message_drops_the_connection_with_the_reason_and_it_comes_back(client, fake):
    await fake.send_all(b"Event: Huge\r\nValue: " + b"A" * 100_000)
    await until(lambda: fake.connections >= 2 and client.up, what="the connection made again")
    assert client.health()["reconnects"] == 1


async def test_a_header_injection_is_refused_before_anything_is_sent(client, fake):
    sent = len(fake.actions)
    with pytest.raises(UnsafeAction):
        await originate(client, OriginateRequest("Local/101@phones", context="out", exten="s",
                                                 caller_id="Ivan\r\nAction: Command\r\nCommand: core stop now"))
    with pytest.raises(UnsafeAction):
        await originate(client, OriginateRequest("Local/101@phones", context="out", exten="s",
                                                 variables={"__B24_CALL_ID": "x,SECRET_OTHER=1"}))
    assert len(fake.actions) == sent and client.up
