"""The floor: a FastAGI server with no logic at all. It reads the header block and answers
each session with one command, as agi-bitrix does, then closes. No server can do less.

The command is a constant: the same 17 variables agi-bitrix sets, in one EXEC MSet, so that
Asterisk's own cost of storing them (measurable: ~0.3 ms of its CPU per call) is on both
sides of the comparison and the difference is what the server itself does.
"""

import asyncio
import resource
import sys

ANSWER = (
    'EXEC MSet "B24_STATUS=FOUND,B24_ROUTE=extension,B24_TARGET=101,B24_QUEUE=support,'
    "B24_EXTENSION=101,B24_MOBILE=79161110101,B24_WORK_PHONE=,B24_PERSONAL_PHONE=,"
    "B24_USER_ID=1,B24_ENTITY_TYPE=CONTACT,B24_ENTITY_ID=12,B24_TIMEMAN=OPENED,"
    'B24_PHONE=79161234567,B24_RULE=owner-at-work,B24_ERROR=,B24_CACHE=hit,B24_NAME=Иван Петров"\n'
).encode()


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.readline() not in (b"\n", b""):
            pass
        writer.write(ANSWER)
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
