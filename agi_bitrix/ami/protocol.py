"""The client side of one AMI connection as a state machine that never touches a socket.

Strategy (as agi/protocol.py, after h11): feed whatever bytes arrived (`receive_data`, `b""` at
EOF) and pull messages (`next_event`) until NEED_DATA. Asterisk first sends one banner line,
`Asterisk Call Manager/<version>` (main/manager.c, session_do: "welcome prompt"), then
messages: `Key: Value` lines ended by an empty line. A message with an `Event` field is an
Event, even when it also carries `Response` (OriginateResponse does); one with `Response` and no
`Event` is the answer to the action its `ActionID` names. `Response: Follows` (Command on
Asterisk before 14) carries free text after its fields up to `--END COMMAND--`; on 20 and 22 the
output comes as repeated `Output:` fields instead, which any message may repeat.

Hostile input is bounded here and only here: a line, a message and the number of fields each
have a named limit; anything else that is not AMI is a ProtocolViolation, after which the
connection refuses to go on. Serializing an action refuses any field that could end a line or
a message (CR, LF, every other control character): a value that comes from the CRM must never
become an AMI header of its own.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from agi_bitrix.ami.errors import ProtocolViolation, UnsafeAction
from agi_bitrix.sansio import NEED_DATA as NEED_DATA  # what its users test next_event against
from agi_bitrix.sansio import NeedData

BANNER_PREFIX = "Asterisk Call Manager/"
# The banner is ~30 bytes ("Asterisk Call Manager/9.0.0").
MAX_BANNER_BYTES = 256
# Asterisk's longest lines are channel variables and command output, well under a few KiB.
MAX_LINE_BYTES = 16 * 1024
# The largest message we read: an event is a few dozen fields; Command output runs longer.
MAX_MESSAGE_BYTES = 256 * 1024
MAX_FIELDS = 4096
# Asterisk reads an action into a 1025-byte buffer per line (main/manager.c, struct
# mansession_session, `char inbuf[1025]`) and drops a longer line: refuse to send one.
MAX_ACTION_LINE_BYTES = 1024
END_COMMAND = "--END COMMAND--"

# What Asterisk's header names look like: visible ASCII without the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# What we send as a field name or action name.
_ACTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Unicode categories that end or break a line somewhere: C0/C1 controls and DEL, the line and
# paragraph separators, and lone surrogates (which cannot be encoded at all).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


@dataclass(frozen=True, slots=True)
class Banner:
    version: str  # the AMI version, e.g. 9.0.0 (Asterisk 22), 7.0.3 (Asterisk 20)


class _Field:
    """One field of a message read as an attribute (its first value, "" when absent)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __get__(self, message: AmiMessage, owner: type[AmiMessage] | None = None) -> str:
        return message.get(self._name)


@dataclass(frozen=True, slots=True)
class AmiMessage:
    """One message: its fields in order (names may repeat), and a Follows body's lines."""

    fields: tuple[tuple[str, str], ...]
    output: tuple[str, ...] = ()

    def get(self, name: str, default: str = "") -> str:
        """The first value of a field; names are case-insensitive as in Asterisk."""
        wanted = name.lower()
        return next((value for key, value in self.fields if key.lower() == wanted), default)

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.fields if key.lower() == wanted]

    action_id = _Field("ActionID")


@dataclass(frozen=True, slots=True)
class Response(AmiMessage):
    """The answer to an action: Success, Error, Follows, Goodbye."""

    status = _Field("Response")
    message = _Field("Message")


@dataclass(frozen=True, slots=True)
class Event(AmiMessage):
    name = _Field("Event")


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Asterisk closed the connection between messages."""


Message: TypeAlias = Banner | Response | Event | EndOfStream


class AmiConnection:
    """Bytes from Asterisk in, messages out (the client's side of one AMI connection)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0  # start of the unread part of _buffer
        self._scanned = 0  # how far past _pos we already know there is no newline
        self._eof = False
        self._banner_seen = False
        self._broken: str | None = None
        self._fields: list[tuple[str, str]] = []
        self._output: list[str] = []
        self._in_body = False  # inside a Follows message's free text
        self._message_bytes = 0

    def receive_data(self, data: bytes) -> None:
        """Bytes as they arrived; b"" when Asterisk closed its side."""
        if self._eof and data:
            raise RuntimeError("data after EOF")
        if not data:
            self._eof = True
        self._buffer += data

    def next_event(self) -> Message | NeedData:
        """The next whole message, NEED_DATA, or ProtocolViolation (for good)."""
        if self._broken is not None:
            raise ProtocolViolation(self._broken)
        try:
            # Asterisk's first line is its banner; everything after it is messages.
            return self._next_message() if self._banner_seen else self._banner()
        except ProtocolViolation as error:
            self._broken = str(error)
            raise

    def _next_message(self) -> Message | NeedData:
        while True:
            line = self._line(MAX_LINE_BYTES)
            if line is None:
                if not self._eof:
                    return NEED_DATA
                if self._fields or self._output:
                    raise ProtocolViolation("the connection ended in the middle of a message")
                return EndOfStream()
            self._message_bytes += len(line) + 2
            if self._message_bytes > MAX_MESSAGE_BYTES:
                raise ProtocolViolation(f"a message longer than {MAX_MESSAGE_BYTES} bytes")
            message = self._take_line(line.decode("utf-8", "replace"))
            if message is not None:
                return message

    def _banner(self) -> Banner | EndOfStream | NeedData:
        line = self._line(MAX_BANNER_BYTES)
        if line is None:
            if self._eof:
                raise ProtocolViolation("the connection ended before the AMI banner")
            return NEED_DATA
        text = line.decode("utf-8", "replace")
        if not text.startswith(BANNER_PREFIX):
            raise ProtocolViolation("the peer's first line is not an AMI banner (Asterisk Call Manager/...)")
        self._banner_seen = True
        return Banner(text[len(BANNER_PREFIX):].strip())

    def _take_line(self, text: str) -> Response | Event | None:
        if self._in_body:
            if text == END_COMMAND:
                self._in_body = False
            else:
                self._output.append(text)
            return None
        if text == "":
            return self._finish() if self._fields else None  # blank lines between messages: nothing
        name, colon, value = text.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            if self._fields and self._fields[0] == ("Response", "Follows"):
                self._in_body = True  # the Follows body starts at its first line that is no field
                return self._take_line(text)
            raise ProtocolViolation("a line that is not `Name: value` inside a message")
        if len(self._fields) >= MAX_FIELDS:
            raise ProtocolViolation(f"a message with more than {MAX_FIELDS} fields")
        self._fields.append((name, value[1:] if value.startswith(" ") else value))
        return None

    def _finish(self) -> Response | Event:
        fields, output = tuple(self._fields), tuple(self._output)
        self._fields, self._output, self._message_bytes = [], [], 0
        names = {name.lower() for name, _ in fields}
        if "event" in names:
            return Event(fields, output)
        if "response" in names:
            return Response(fields, output)
        raise ProtocolViolation("a message with neither Event nor Response")

    def _line(self, limit: int) -> bytes | None:
        """The next line without its CR LF (a lone LF is taken too), or None until one is whole."""
        end = self._buffer.find(b"\n", self._pos + self._scanned)
        if end < 0:
            self._scanned = len(self._buffer) - self._pos
            if self._scanned > limit:
                raise ProtocolViolation(f"a line longer than {limit} bytes")
            self._compact()
            return None
        line = bytes(self._buffer[self._pos:end])
        if len(line) > limit + 1:
            raise ProtocolViolation(f"a line longer than {limit} bytes")
        self._pos, self._scanned = end + 1, 0
        return line[:-1] if line.endswith(b"\r") else line

    def _compact(self) -> None:
        if self._pos:
            del self._buffer[:self._pos]
            self._pos = 0


def serialize_action(action: str, action_id: str, fields: Iterable[tuple[str, str]] = ()) -> bytes:
    """One action as AMI bytes: `Action`, `ActionID`, then the fields in order (a name may repeat,
    as Variable does). UnsafeAction, naming the field but never its value (a Login's value is the
    secret), when a name is not a plain token or a value holds a character that could end a line."""
    lines = [("Action", action), ("ActionID", action_id), *fields]
    out = bytearray()
    for index, (name, value) in enumerate(lines):
        if not _ACTION_NAME.fullmatch(name):
            raise UnsafeAction(f"field #{index + 1} has a name that is not letters, digits, '-' or '_'")
        if index >= 2 and name.lower() in ("action", "actionid"):
            raise UnsafeAction(f"{name} is set by the client, not by a field")
        if any(unicodedata.category(char) in _UNSAFE_CATEGORIES for char in value):
            raise UnsafeAction(f"the value of {name} holds a control or line-break character")
        if index == 0 and not _ACTION_NAME.fullmatch(value):
            raise UnsafeAction("the action name is not letters, digits, '-' or '_'")
        line = f"{name}: {value}".encode()
        if len(line) > MAX_ACTION_LINE_BYTES:
            raise UnsafeAction(f"the {name} line is longer than the {MAX_ACTION_LINE_BYTES} bytes Asterisk reads")
        out += line + b"\r\n"
    return bytes(out + b"\r\n")
