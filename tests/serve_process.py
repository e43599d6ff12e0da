"""A real `agi-bitrix serve` subprocess for the tests that go through one (signals, the log an admin
reads, what a restart keeps), started and stopped the same way everywhere."""

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

from tests.network import free_port

ROOT = Path(__file__).resolve().parents[1]


async def wait_listening(port: int) -> None:
    """Until 127.0.0.1:port takes a connection, for up to about ten seconds; the caller's next call
    says what went wrong if it never does."""
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            await asyncio.sleep(0.1)


async def start_serve(config: Path, env: dict[str, str] | None = None, port: int | None = None,
                      ) -> tuple[asyncio.subprocess.Process, int]:
    """`agi-bitrix serve -c CONFIG` listening on `port` (a free one by default), `env` added to
    ours, stdout and stderr in one pipe; returned once it listens."""
    port = free_port() if port is None else port
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", "serve", "-c", str(config), "--listen", f"127.0.0.1:{port}",
        env={**os.environ, **(env or {})}, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    await wait_listening(port)
    return process, port


async def stop_serve(process: asyncio.subprocess.Process) -> str:
    """SIGTERM, as systemd stops it; what it wrote."""
    process.send_signal(signal.SIGTERM)
    return (await asyncio.wait_for(process.communicate(), 10))[0].decode()
