"""The floor: a FastAGI server with no logic at all. It reads the header block and answers
each session with one command, as agi-bitrix does, then closes. No server can do less."""

import asyncio
import resource
import sys


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (line := await reader.readline()) not in (b"\n", b""):
            pass
        writer.write(b'EXEC MSet "B24_STATUS=FOUND,B24_ROUTE=extension,B24_TARGET=101"\n')
        await writer.drain()
        await reader.readline()
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(session, "127.0.0.1", port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
