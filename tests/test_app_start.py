"""Start and stop as one ordered stack (Application.start/stop): a start that fails at any step
closes exactly what was opened, in reverse order, and raises; nothing is left listening or running.

Checked with real sockets and a real other process: right after the failed start the AGI and HTTP
ports can be bound again by anyone, the outbox's lock can be taken, and no asyncio task is left.
"""

import asyncio
import contextlib
import fcntl
import os
import socket
import sys
import textwrap

import pytest

from agi_bitrix.app import Application
from agi_bitrix.bitrix.lines import LineSync
from agi_bitrix.bitrix.shared import RedisLink
from agi_bitrix.bitrix.users import UserDirectory
from agi_bitrix.callcard.outbox import OutboxInUse
from agi_bitrix.clicktocall_service import ClickToCallService
from agi_bitrix.config import parse_config
from agi_bitrix.http_listener import HttpListener
from tests.network import free_port

# Another process holding the outbox's lock, as a second agi-bitrix on the same file would.
HOLD_THE_LOCK = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


class Ports:
    def __init__(self):
        self.agi, self.http = free_port(), free_port()


def every_part(tmp_path, ports):
    """A config with every long-lived part: outbox, Redis link and AMI client (to closed ports:
    they keep retrying in the background), user directory, external lines, click-to-call, the
    HTTP listener and the AGI listener."""
    return parse_config(textwrap.dedent(f"""\
        server: {{listen: "127.0.0.1:{ports.agi}"}}
        bitrix: {{webhook_url: "http://127.0.0.1:{free_port()}/rest/1/code/"}}
        http: {{listen: "127.0.0.1:{ports.http}"}}
        callcard: {{outbox: {tmp_path / "outbox.sqlite3"}}}
        users: {{refresh: 600}}
        redis: {{url: "redis://127.0.0.1:{free_port()}/0"}}
        ami: {{username: agi-bitrix, port: {free_port()}}}
        clicktocall: {{}}
        lines: [{{did: "+7 495 111-22-33", name: Sales}}]
        routing: {{fallback_queue: support}}
        """), str(tmp_path / "agi-bitrix.yaml"), {"AGI_BITRIX_AMI_SECRET": "a-secret-of-sixteen+"})


def assert_nothing_left(app, tmp_path, ports):
    for port in (ports.agi, ports.http):
        with socket.socket() as probe:  # no SO_REUSEADDR: a listener left behind makes this fail
            probe.bind(("127.0.0.1", port))
            probe.listen()
    lock = os.open(f"{tmp_path / 'outbox.sqlite3'}.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the outbox let its lock go
    finally:
        os.close(lock)
    assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []
    assert app.session.closed


def fail_after(monkeypatch, cls, name):
    """`cls.name` does its work, then fails as a bug would: what it opened must still be closed."""
    real = getattr(cls, name)

    def failing(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if asyncio.iscoroutine(result):
            async def then_fail():
                await result
                raise RuntimeError(f"{cls.__name__}.{name} broke")
            return then_fail()
        raise RuntimeError(f"{cls.__name__}.{name} broke")

    monkeypatch.setattr(cls, name, failing)


@pytest.mark.parametrize("step", [RedisLink, HttpListener, UserDirectory, LineSync, ClickToCallService])
async def test_a_part_that_fails_to_start_closes_everything_opened_before_it(tmp_path, monkeypatch, step):
    ports = Ports()
    fail_after(monkeypatch, step, "start")
    app = Application(every_part(tmp_path, ports))
    with pytest.raises(RuntimeError, match=f"{step.__name__}.start broke"):
        await app.start()
    assert_nothing_left(app, tmp_path, ports)


@contextlib.contextmanager
def taken(port):
    """`port` listened on by someone else."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        yield


async def test_an_agi_port_taken_closes_the_parts_started_before_it(tmp_path):
    ports = Ports()
    app = Application(every_part(tmp_path, ports))
    with taken(ports.agi):
        with pytest.raises(OSError, match="address already in use"):
            await app.start()
    assert_nothing_left(app, tmp_path, ports)


async def test_an_outbox_held_by_another_process_stops_the_start_before_anything_opens(tmp_path):
    ports = Ports()
    app = Application(every_part(tmp_path, ports))
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_THE_LOCK, f"{tmp_path / 'outbox.sqlite3'}.lock",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 10) == b"held\n"
        with pytest.raises(OutboxInUse):
            await app.start()
    finally:
        holder.stdin.close()
        await asyncio.wait_for(holder.wait(), 10)
    assert_nothing_left(app, tmp_path, ports)


async def test_an_http_port_taken_keeps_calls_and_stop_closes_everything(tmp_path):
    ports = Ports()
    app = Application(every_part(tmp_path, ports))
    with taken(ports.http):
        assert await app.start() == ("127.0.0.1", ports.agi)  # calls matter more than graphs
        assert app.http_listener is None
        await app.stop()
    assert_nothing_left(app, tmp_path, ports)


async def test_a_stop_after_a_full_start_closes_everything(tmp_path):
    ports = Ports()
    app = Application(every_part(tmp_path, ports))
    assert await app.start() == ("127.0.0.1", ports.agi)
    await app.stop()
    assert_nothing_left(app, tmp_path, ports)
    await app.stop()  # a second stop has nothing left to close
