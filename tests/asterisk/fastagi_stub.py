"""A minimal FastAGI server that the tests script, and a reader of channel variables built on it.

The product's server is under test elsewhere; this one lets a test say exactly which bytes go
to Asterisk (to find out how Asterisk parses them) and read variables back byte for byte with
`GET VARIABLE`, whose reply `200 result=1 (VALUE)` carries the stored value verbatim.
"""

import asyncio
from collections.abc import Awaitable, Callable, Iterable


class AgiSession:
    """One FastAGI connection from Asterisk, after the header block."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 headers: dict[str, str]):
        self.reader = reader
        self.writer = writer
        self.headers = headers

    @property
    def args(self) -> list[str]:
        return [self.headers[f"agi_arg_{n}"] for n in range(1, 100) if f"agi_arg_{n}" in self.headers]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> bytes:
        """The next final reply line, without its newline."""
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("Asterisk closed the session")
            # 100 = still working; 520- starts a multi-line usage text ended by "520 ".
            if line.startswith((b"100 ", b"520-", b"HANGUP")) or not line[:3].isdigit():
                continue
            return line.rstrip(b"\n")

    async def command(self, line: bytes) -> bytes:
        """Sends one command line (newline included) and returns its reply line."""
        await self.send(line)
        return await self.reply()

    async def get_variable(self, name: str) -> bytes | None:
        """The variable's value, or None when it is not set."""
        reply = await self.command(f"GET VARIABLE {name}\n".encode())
        if reply == b"200 result=0":
            return None
        prefix = b"200 result=1 ("
        if not (reply.startswith(prefix) and reply.endswith(b")")):
            raise ValueError(f"unexpected GET VARIABLE reply {reply!r}")
        return reply[len(prefix):-1]


SessionHandler = Callable[[AgiSession], Awaitable[None]]


class FastAgiStub:
    """Accepts FastAGI sessions on 127.0.0.1 and runs `handler(session)` for each."""

    def __init__(self, handler: SessionHandler):
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.errors: list[BaseException] = []

    def url(self, script: str = "") -> str:
        return f"agi://127.0.0.1:{self.port}/{script}"

    async def start(self) -> "FastAgiStub":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            headers = {}
            while (line := await reader.readline()) not in (b"\n", b""):
                name, _, value = line.decode(errors="replace").rstrip("\n").partition(": ")
                headers[name] = value
            await self.handler(AgiSession(reader, writer, headers))
        except Exception as error:  # kept for the test to report; Asterisk just sees a close
            self.errors.append(error)
        finally:
            writer.close()


class VariableReader:
    """Reads the named variables of each call that runs AGI(reader.url, CALL_ID).

    `await reader.result(call_id)` gives {name: bytes or None (not set)}."""

    def __init__(self, names: Iterable[str]):
        self.names = tuple(names)
        self.stub = FastAgiStub(self._read)
        self._results: dict[str, asyncio.Future] = {}

    @property
    def url(self) -> str:
        return self.stub.url("read")

    def _future(self, call_id: str) -> asyncio.Future:
        return self._results.setdefault(call_id, asyncio.get_running_loop().create_future())

    async def _read(self, session: AgiSession) -> None:
        values = {name: await session.get_variable(name) for name in self.names}
        self._future(session.args[0]).set_result(values)

    async def result(self, call_id: str, timeout: float) -> dict[str, bytes | None]:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future(call_id)), timeout)
        finally:
            if self._results[call_id].done():
                del self._results[call_id]
