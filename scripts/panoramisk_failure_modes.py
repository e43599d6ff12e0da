"""The experiments behind docs/ami.md's "Why not panoramisk's Manager": panoramisk's Manager (the
installed version) against a hostile fake AMI server, and against a real Asterisk 22 that is
killed and started again. Run as root from a checkout (the real-Asterisk part uses
agi_bitrix.testing.pbx_harness): `.venv/bin/python scripts/panoramisk_failure_modes.py [NAME ...]`.

Each experiment prints one line of what it saw; none asserts: they describe a third party.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path

from panoramisk import Manager

from agi_bitrix.testing.pbx_harness import ASTERISK_22, AsteriskPbx

BANNER = b"Asterisk Call Manager/9.0.0\r\n"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_block(reader: asyncio.StreamReader) -> list[str] | None:
    lines = []
    while line := await reader.readline():
        if line in (b"\r\n", b"\n"):
            return lines
        lines.append(line.decode().strip())
    return None


def action_id(block: list[str] | None) -> str:
    return next(line.split(": ", 1)[1] for line in block or [] if line.lower().startswith("actionid"))


async def accept_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(BANNER)
    block = await read_block(reader)
    writer.write(f"Response: Success\r\nActionID: {action_id(block)}\r\nMessage: Authentication accepted\r\n\r\n"
                 .encode())


def manager(port: int, **options: object) -> Manager:
    return Manager(host="127.0.0.1", port=port, username="u", secret="s", ping_delay=3600, reconnect_timeout=1,
                   loop=asyncio.get_running_loop(), **options)


async def login_refused() -> None:
    attempts = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        writer.write(BANNER)
        block = await read_block(reader)
        attempts += 1
        writer.write(f"Response: Error\r\nActionID: {action_id(block)}\r\nMessage: Authentication failed\r\n\r\n"
                     .encode())
        writer.close()  # as Asterisk does after a failed login (main/manager.c, action_login)

    server, port = await serve(refuse)
    client = manager(port)
    connected = client.connect()
    await connected
    await asyncio.sleep(3.5)
    print(f"login refused: connect() raised {connected.exception()!r}; {attempts} logins in 3.5 s;"
          f" authenticated={client.authenticated}")
    client.close()
    server.close()


async def drop_mid_action() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_login(reader, writer)
        await read_block(reader)  # the action: never answered
        writer.close()

    server, port = await serve(drop)
    client = manager(port)
    await client.connect()
    await asyncio.sleep(0.2)
    pending = client.send_action({"Action": "Originate", "Channel": "Local/1@x", "Async": "true"})
    await asyncio.sleep(5)
    later = client.send_action({"Action": "Ping"})
    await asyncio.sleep(1)
    print(f"drop mid-action: the action's future done after 5 s: {pending.done()}; waiting to be re-sent:"
          f" {len(client.awaiting_actions)}; an action sent after the drop done after 1 s: {later.done()}")
    client.close()
    server.close()


async def flood_and_huge_message() -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_login(reader, writer)
        events = b"Event: Newexten\r\nChannel: Local/1@x\r\n\r\n" * 1000
        for _ in range(200):
            writer.write(events)
            await writer.drain()
        line = b"X-Junk: " + b"A" * 65536 + b"\r\n"
        for _ in range(1000):  # 64 MiB without a blank line
            writer.write(line)
            await writer.drain()
        await asyncio.sleep(3600)

    server, port = await serve(flood)
    tracemalloc.start()
    client = manager(port)

    async def slow_listener(_: Manager, __: object) -> None:
        await asyncio.sleep(10)

    client.register_event("*", slow_listener)
    await client.connect()
    await asyncio.sleep(8)
    current, peak = tracemalloc.get_traced_memory()
    print(f"flood: 200,000 events -> {len(asyncio.all_tasks())} tasks at once; 64 MiB without a blank line ->"
          f" Python heap {current / 2**20:.0f} MiB (peak {peak / 2**20:.0f} MiB)")
    client.close()
    server.close()


async def injection() -> None:
    received: list[list[str] | None] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_login(reader, writer)
        received.extend([await read_block(reader), await read_block(reader)])

    server, port = await serve(record)
    client = manager(port)
    await client.connect()
    await asyncio.sleep(0.2)
    client.send_action({"Action": "Originate", "Channel": "Local/100@ctx",
                        "CallerID": "Ivan\r\n\r\nAction: Command\r\nCommand: core stop now"})
    await asyncio.sleep(0.5)
    print(f"injection: the server read these actions: {received}")
    client.close()
    server.close()


async def asterisk_restart() -> None:
    dialplan = "[general]\n[ami-slow]\nexten => s,1,Wait(30)\n"
    pbx = AsteriskPbx(Path("/var/cache/agi-bitrix/asterisk-root"), "panoramisk", ASTERISK_22)
    pbx.write_config(dialplan)
    pbx.start()
    try:
        client = Manager(host="127.0.0.1", port=pbx.ami_port, username=pbx.ami_username, secret=pbx.ami_secret,
                         ping_delay=3600, reconnect_timeout=1, loop=asyncio.get_running_loop())
        await client.connect()
        await asyncio.sleep(0.5)
        # A synchronous Originate: answered only when the Local channel answers (never, here).
        ringing = client.send_action({"Action": "Originate", "Channel": "Local/s@ami-slow", "Application": "Wait",
                                      "Data": "1", "Timeout": "20000"})
        await asyncio.sleep(0.5)
        pbx.kill()
        await asyncio.sleep(0.5)
        while_down = client.send_action({"Action": "Ping"})
        await asyncio.sleep(1.5)
        print(f"Asterisk killed: the pending Originate done: {ringing.done()}; a Ping sent while down done:"
              f" {while_down.done()}; authenticated={client.authenticated}")
        await asyncio.to_thread(pbx.start)
        await asyncio.sleep(3)
        ping = client.send_action({"Action": "Ping"})
        try:
            answered = (await asyncio.wait_for(ping, 3)).get("Response")
        except TimeoutError:
            answered = "no answer within 3 s"
        # A channel of the Originate on the restarted Asterisk means it was sent again.
        channels = [line for line in pbx.cli("core show channels concise").splitlines() if "ami-slow" in line]
        print(f"Asterisk started again: authenticated={client.authenticated}; a new Ping: {answered};"
              f" the Originate's channels on the new Asterisk: {channels}")
        client.close()
    finally:
        pbx.stop()


EXPERIMENTS = {f.__name__: f for f in (login_refused, drop_mid_action, flood_and_huge_message, injection,
                                       asterisk_restart)}

if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)  # panoramisk logs every reconnect at ERROR
    print(f"panoramisk {version('panoramisk')}")
    for name in sys.argv[1:] or list(EXPERIMENTS):
        asyncio.run(EXPERIMENTS[name]())
