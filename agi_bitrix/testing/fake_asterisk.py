"""The Asterisk side of a FastAGI session, for the demo, the tests and the benchmark.

It sends the header block exactly as Asterisk 22 does (same keys, same order, "unknown" for
what is not known), answers every command with `200 result=0` and reads variables out of
`EXEC MSet` / `SET VARIABLE` the way Asterisk's parsers would. It is a model of Asterisk:
the real-Asterisk tests are what prove that model right.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


def asterisk_header(*, script: str = "route", host: str = "127.0.0.1", port: int = 4573,
                    callerid: str = "unknown", extension: str = "s", uniqueid: str = "1700000000.1",
                    channel: str = "Local/s@incoming-00000001;2", context: str = "incoming",
                    args: tuple[str, ...] = ()) -> bytes:
    env = [
        ("agi_network", "yes"),
        ("agi_network_script", script),
        ("agi_request", f"agi://{host}:{port}/{script}"),
        ("agi_channel", channel),
        ("agi_language", "en"),
        ("agi_type", "Local"),
        ("agi_uniqueid", uniqueid),
        ("agi_version", "22.5.2"),
        ("agi_callerid", callerid or "unknown"),
        ("agi_calleridname", "unknown"),
        ("agi_callingpres", "0"),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", "unknown"),
        ("agi_rdnis", "unknown"),
        ("agi_context", context),
        ("agi_extension", extension),
        ("agi_priority", "1"),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", ""),
        ("agi_threadid", "140000000000000"),
    ]
    env += [(f"agi_arg_{i}", arg) for i, arg in enumerate(args, start=1)]
    return "".join(f"{key}: {value}\n" for key, value in env).encode() + b"\n"


def command_words(line: str) -> list[str]:
    """Split a command line into words like res_agi's parse_args: quotes group, `\\` escapes."""
    words: list[str] = []
    current: list[str] | None = None
    quoted = escaped = False
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if current is None:
                current = []
            continue
        if ch in " \t" and not quoted and not escaped:
            if current is not None:
                words.append("".join(current))
                current = None
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if current is None:
            current = []
        current.append(ch)
        escaped = False
    if current is not None:
        words.append("".join(current))
    return words


def mset_pairs(argument: str) -> dict[str, str]:
    """Split MSet's argument like Asterisk's standard app-argument parser, then at the first `=`."""
    pairs: list[str] = []
    current: list[str] = []
    # Open parentheses and brackets: a comma inside either does not split.
    open_count = {"(": 0, "[": 0}
    opener_of = {")": "(", "]": "["}
    quoted = False
    chars = iter(argument)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == '"':
            quoted = not quoted
        elif quoted:
            current.append(ch)
        elif ch in open_count:
            open_count[ch] += 1
            current.append(ch)
        elif ch in opener_of and open_count[opener_of[ch]]:
            open_count[opener_of[ch]] -= 1
            current.append(ch)
        elif ch == "," and not any(open_count.values()):
            pairs.append("".join(current))
            current = []
        else:
            current.append(ch)
    pairs.append("".join(current))
    result = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        result[name] = value
    return result


@dataclass
class FakeCallResult:
    variables: dict[str, str] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


async def fake_call(host: str, port: int, *, timeout: float = 10.0, full_variable: str | None = None,
                    **header) -> FakeCallResult:
    """Run one FastAGI session like Asterisk would; returns the variables the server set.
    `full_variable`: what GET FULL VARIABLE evaluates to (else "200 result=0", nothing set)."""
    result = FakeCallResult()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(timeout):
            writer.write(asterisk_header(host=host, port=port, **header))
            await writer.drain()
            while line := await reader.readline():
                text = line.decode("utf-8", errors="replace").rstrip("\n")
                result.commands.append(text)
                words = command_words(text)
                if len(words) >= 3 and words[0].upper() == "EXEC" and words[1].lower() == "mset":
                    result.variables.update(mset_pairs(words[2]))
                elif len(words) >= 4 and [w.upper() for w in words[:2]] == ["SET", "VARIABLE"]:
                    result.variables[words[2]] = words[3]
                elif full_variable is not None and [w.upper() for w in words[:3]] == ["GET", "FULL", "VARIABLE"]:
                    writer.write(f"200 result=1 ({full_variable})\n".encode())
                    await writer.drain()
                    continue
                writer.write(b"200 result=0\n")
                await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return result
