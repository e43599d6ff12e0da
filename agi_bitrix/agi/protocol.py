"""Server side of one FastAGI connection as a state machine that never touches a socket.

Strategy (after h11): the caller feeds whatever bytes arrived (`receive_data`, `b""` for EOF)
and pulls events (`next_event`) until it gets NEED_DATA. The connection goes through two
phases: the header block Asterisk sends first (`agi_*: value` lines ended by an empty line),
then replies to the commands we send. Asterisk may write `HANGUP` on its own at any moment
after the header; it is reported as an event and never mistaken for a reply.

Hostile input is bounded here and only here: the header block and every reply line have a
named size limit. Anything that is not FastAGI becomes a PeerError, after which the
connection refuses to go on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypeAlias
from urllib.parse import SplitResult, parse_qsl, urlsplit

from agi_bitrix.sansio import NEED_DATA as NEED_DATA  # what its users test next_event against
from agi_bitrix.sansio import NeedData

# Asterisk 22 sends ~25 header lines of well under 100 bytes each; arguments and long
# channel names push a real header to a couple of KiB. 16 KiB leaves ample room while a
# client streaming junk without a blank line is cut off early.
MAX_HEADER_BYTES = 16 * 1024
# Asterisk passes at most 128 arguments (res_agi's MAX_ARGS); a longer argument number is not
# Asterisk, and Python refuses to read an integer of more than 4300 digits at all.
MAX_ARG_NUMBER_DIGITS = 4
# A reply line is "200 result=N (data)"; the longest legitimate ones carry a variable's
# value (GET VARIABLE), bounded by Asterisk's own buffers of a few KiB.
MAX_REPLY_LINE_BYTES = 8 * 1024
# A 520 usage text is a few dozen lines; bound it so a peer cannot keep us reading forever.
MAX_USAGE_LINES = 200


class PeerError(Exception):
    """The client broke the protocol (or went away too early); the connection is finished."""


@dataclass(frozen=True, slots=True)
class AgiRequest:
    """The header block: what Asterisk tells us about the channel before any command."""

    env: dict[str, str]
    args: tuple[str, ...] = ()

    @property
    def script(self) -> str:
        """Script path without leading slash and without query: `route` for agi://h:p/route?x=y."""
        raw = self.env.get("agi_network_script", "")
        if raw.isidentifier():  # the usual `route`: nothing in it for a URL parser to take apart
            return raw
        return self._script_url.path.strip("/")

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self._script_url.query))

    @property
    def _script_url(self) -> SplitResult:
        # A leading "//" would make urlsplit read the path as a host name.
        return urlsplit("/" + self.env.get("agi_network_script", "").lstrip("/"))

    def get(self, key: str) -> str:
        """A header value, with Asterisk's "unknown" placeholder read as empty."""
        value = self.env.get(key, "")
        return "" if value == "unknown" else value


@dataclass(frozen=True, slots=True)
class CommandReply:
    """Asterisk's answer to one command: `200 result=1 (data)`, `510 ...`, a multi-line 520."""

    code: int
    result: str | None = None
    data: str | None = None
    text: str = ""
    usage: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.code == 200 and self.result is not None and not self.result.startswith("-")


@dataclass(frozen=True)
class HangUp:
    """Asterisk says the channel hung up (it sends this line whenever it happens)."""


@dataclass(frozen=True)
class EndOfStream:
    """The client closed its side cleanly after the header."""


# Everything next_event() can return besides NEED_DATA.
Event: TypeAlias = AgiRequest | CommandReply | HangUp | EndOfStream


_REPLY_LINE = re.compile(r"^(\d{3})([ -])(.*)$")
_RESULT = re.compile(r"^result=(\S*)(?:\s+\((.*)\))?")


# One header line: `agi_` and an ASCII name with a letter or digit, a colon, one optional
# space, the value. Matched over the whole block at once: the header is the bulk of what a
# session reads, and one C-level pass costs a third of walking it line by line in Python.
_HEADER_LINE = re.compile(r"^(agi_\w*[^\W_]\w*): ?(.*)$", re.MULTILINE | re.ASCII)
_ARG_LINE = re.compile(r"^agi_arg_([0-9]+): ?(.*)$", re.MULTILINE)


# Longest peer value a log line carries: a uniqueid is ~25 characters, a channel name ~60.
MAX_LOGGED_VALUE = 120


def loggable(value: str, limit: int = MAX_LOGGED_VALUE) -> str:
    """A peer's value (uniqueid, caller ID, channel, reply text) fit for one log line: control
    characters (CR, LF, ESC, ...) and other unprintables become "?", so an allowed client cannot
    forge log lines or drive a terminal; cut at `limit` characters."""
    cut = value[:limit]
    if not cut.isprintable():
        cut = "".join(char if char.isprintable() else "?" for char in cut)
    return cut + ("..." if len(value) > limit else "")


def _decode(raw: bytes) -> str:
    # Caller names and CRM-fed values may be in any encoding; never let bytes kill a call.
    return raw.decode("utf-8", errors="replace").rstrip("\r")


class ServerConnection:
    """Protocol state for the server end of one FastAGI connection."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._header_done = False
        self._pending_replies = 0
        self._usage: list[str] | None = None  # inside a multi-line 520
        self._failed = False

    # -- bytes in -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._eof and data:
            raise RuntimeError("data received after EOF")
        if data:
            self._buffer += data
        else:
            self._eof = True

    # -- commands out ---------------------------------------------------------------------

    def send(self, command_line: bytes) -> bytes:
        """Account for one command being sent; returns the bytes to write."""
        if not self._header_done:
            raise RuntimeError("cannot send a command before the AGI header block is complete")
        if self._failed:
            raise RuntimeError("connection already failed")
        if not command_line.endswith(b"\n") or b"\n" in command_line[:-1]:
            raise ValueError("a command is exactly one line ending in a newline")
        self._pending_replies += 1
        return command_line

    @property
    def awaiting_reply(self) -> bool:
        return self._pending_replies > 0

    # -- events out -----------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        if self._failed:
            raise RuntimeError("connection already failed")
        try:
            return self._next_event()
        except PeerError:
            self._failed = True
            raise

    def _next_event(self) -> Event | NeedData:
        if not self._header_done:
            return self._next_header_event()
        while True:
            line = self._take_line(MAX_REPLY_LINE_BYTES)
            if line is None:
                if self._eof and not self._buffer:
                    if self._pending_replies:
                        raise PeerError("connection closed while a command was waiting for its reply")
                    return EndOfStream()
                if self._eof:
                    raise PeerError("connection closed in the middle of a line")
                return NEED_DATA
            text = _decode(line)
            event = self._reply_event(text)
            if event is not None:
                return event

    def _next_header_event(self) -> AgiRequest | NeedData:
        # The block ends at the first empty line. It is cut out whole and decoded in one go: the
        # header is the bulk of what a session reads, so it is worth not walking it line by line.
        buffer = self._buffer
        if buffer[:1] == b"\n" or buffer[:2] == b"\r\n":
            raise PeerError("empty AGI header block")
        # The whole block, its empty line included, must end within MAX_HEADER_BYTES: the same
        # limit whether the bytes come at once or one by one.
        ends = [i for i in (buffer.find(b"\n\n", 0, MAX_HEADER_BYTES),
                            buffer.find(b"\n\r\n", 0, MAX_HEADER_BYTES)) if i >= 0]
        if not ends:
            if len(buffer) >= MAX_HEADER_BYTES:
                raise PeerError(f"header block longer than {MAX_HEADER_BYTES} bytes")
            if self._eof:
                raise PeerError("connection closed before the end of the AGI header block")
            return NEED_DATA
        end = min(ends)
        block = bytes(buffer[:end])
        del buffer[: end + (2 if buffer[end + 1:end + 2] == b"\n" else 3)]
        self._header_done = True
        return _build_request(_decode(block))

    def _reply_event(self, text: str) -> CommandReply | HangUp | None:
        if self._usage is not None:
            # Inside "520-...": collect until the closing "520 End of proper usage."
            if text.startswith("520 "):
                usage = tuple(self._usage)
                self._usage = None
                return self._complete_reply(CommandReply(code=520, text=text[4:], usage=usage))
            if len(self._usage) >= MAX_USAGE_LINES:
                raise PeerError("520 usage text is too long")
            self._usage.append(text)
            return None
        if text == "HANGUP":
            return HangUp()
        match = _REPLY_LINE.match(text)
        if match is None:
            raise PeerError(f"not an AGI reply: {text[:60]!r}")
        code, separator, rest = int(match.group(1)), match.group(2), match.group(3)
        if code == 100:
            # "100 result=0 Trying..." precedes the real reply of some commands.
            return None
        if not self._pending_replies:
            raise PeerError(f"reply without a command: {text[:60]!r}")
        if separator == "-":
            if code != 520:
                raise PeerError(f"unexpected multi-line reply: {text[:60]!r}")
            self._usage = []
            return None
        result = _RESULT.match(rest)
        if result:
            return self._complete_reply(CommandReply(code, result.group(1), result.group(2), rest))
        return self._complete_reply(CommandReply(code, text=rest))

    def _complete_reply(self, reply: CommandReply) -> CommandReply:
        # _reply_event saw a command waiting before it took this reply (or its first 520- line).
        self._pending_replies -= 1
        return reply

    def _take_line(self, limit: int) -> bytes | None:
        end = self._buffer.find(b"\n", 0, limit + 1)
        if end < 0:
            if len(self._buffer) > limit:
                raise PeerError(f"reply line longer than {limit} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line


def _build_request(block: str) -> AgiRequest:
    if "\r" in block:
        block = "\n".join(line.rstrip("\r") for line in block.split("\n"))
    pairs = _HEADER_LINE.findall(block)
    if len(pairs) != block.count("\n") + 1:
        bad = next(line for line in block.split("\n") if not _HEADER_LINE.fullmatch(line))
        raise PeerError(f"not an AGI header line: {bad[:60]!r}")
    found = _ARG_LINE.findall(block) if "agi_arg_" in block else []
    for number, _value in found:
        if len(number) > MAX_ARG_NUMBER_DIGITS:
            raise PeerError(f"argument number too long: agi_arg_{number[:20]}...")
    args = {int(number): value for number, value in found}
    return AgiRequest(env=dict(pairs), args=tuple(args[n] for n in sorted(args)))
