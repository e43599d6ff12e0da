"""Turning values into AGI command lines that Asterisk reads back byte for byte.

Two parsers stand between us and the channel variable:
1. res_agi's `parse_args` splits the command line into words: double quotes group, a
   backslash makes the next character literal, and the line ends at the first newline (a NUL
   ends it too). A line that is too long is cut and the remainder is read as a NEW command:
   the source declares a 2048-byte buffer, Asterisk 22 was measured cutting at 8191 bytes
   (tests/asterisk/ESCAPING.md); no line we send comes near either.
2. `MSet` splits its single argument with Asterisk's standard argument parser: commas
   separate pairs; quotes, backslashes, parentheses and brackets are special inside them.
   Each pair is split at its first `=`.

So a value is escaped twice: for MSet (backslash before every MSet-special character), then
the whole argument is quoted for parse_args (backslash before `\\` and `"`). Control
characters cannot be carried by either parser and are removed. Nothing here decides what a
value may contain for the dialplan's sake; that is the routing layer's job (a dial target is
digits only long before it gets here).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

# Below res_agi's declared AGI_BUF_LEN (2048) and far below the 8191 bytes measured on Asterisk 22.
MAX_COMMAND_BYTES = 2000
# One variable's value is capped so that a single hostile CRM field cannot push its
# neighbours out of the command.
MAX_VALUE_CHARS = 256
# MSet splits at most 98 pairs; the 99th takes the rest of the argument as its value, commas
# and all (measured on Asterisk 22: tests/asterisk/ESCAPING.md).
MAX_MSET_PAIRS = 98

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: `$` would let "NAME\n" through
# Characters that Asterisk's standard argument parser treats specially inside MSet's argument.
_MSET_SPECIAL = set('\\,"()[]=' + "'{}$")  # see tests/asterisk/ESCAPING.md for the proof
_NEEDS_ESCAPE = re.compile("[" + re.escape("".join(sorted(_MSET_SPECIAL))) + "]")


def clean_value(value: str) -> str:
    """Remove what no AGI parser can carry (newlines, NUL, other control characters); cap the length."""
    return _CONTROL.sub("", value)[:MAX_VALUE_CHARS]


def _agi_quote(word: str) -> str:
    word = _CONTROL.sub("", word)
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agi_command(*words: str) -> bytes:
    """One AGI command line with every argument quoted: agi_command("VERBOSE", "hi", "1")."""
    if not words:
        raise ValueError("empty command")
    name, *args = words
    line = (" ".join([name, *(_agi_quote(arg) for arg in args)]) + "\n").encode("utf-8")
    if len(line) > MAX_COMMAND_BYTES:
        raise ValueError(f"AGI command of {len(line)} bytes exceeds {MAX_COMMAND_BYTES}")
    return line


# Most values repeat from call to call (statuses, routes, queues, the same owners), so the
# escaped pairs are remembered; the function is pure.
@functools.lru_cache(maxsize=8192)
def _mset_pair(name: str, value: str) -> bytes:
    """NAME=value escaped for MSet, then for parse_args (without the surrounding quotes)."""
    if not _VARIABLE_NAME.fullmatch(name):
        raise ValueError(f"not a channel variable name: {name!r}")
    value = clean_value(value)
    if not _NEEDS_ESCAPE.search(value):
        return f"{name}={value}".encode()  # the common case: digits and plain words
    escaped = "".join("\\" + ch if ch in _MSET_SPECIAL else ch for ch in value)
    return f"{name}={escaped}".replace("\\", "\\\\").replace('"', '\\"').encode()


def mset_commands(variables: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[bytes]:
    """`EXEC MSet` lines setting all variables, as few as fit under MAX_COMMAND_BYTES and
    MAX_MSET_PAIRS (normally one). A variable whose name is too long to fit a line is a ValueError.

    Both escapings work character by character, so the pairs are escaped once each and joined;
    a comma between pairs means nothing to parse_args.
    """
    items = variables.items() if isinstance(variables, Mapping) else variables
    pairs = [_mset_pair(name, value) for name, value in items]
    line = _MSET_HEAD + b",".join(pairs) + _MSET_TAIL
    if len(line) <= MAX_COMMAND_BYTES and len(pairs) <= MAX_MSET_PAIRS:
        return [line] if pairs else []
    commands: list[bytes] = []
    batch: list[bytes] = []
    size = len(_MSET_HEAD) + len(_MSET_TAIL)
    for pair in pairs:
        if len(_MSET_HEAD) + len(pair) + len(_MSET_TAIL) > MAX_COMMAND_BYTES:
            name = pair.partition(b"=")[0].decode()
            raise ValueError(f"variable {name[:40]!r} does not fit a command of {MAX_COMMAND_BYTES} bytes")
        if batch and (size + 1 + len(pair) > MAX_COMMAND_BYTES or len(batch) == MAX_MSET_PAIRS):
            commands.append(_MSET_HEAD + b",".join(batch) + _MSET_TAIL)
            batch, size = [], len(_MSET_HEAD) + len(_MSET_TAIL)
        size += len(pair) + (1 if batch else 0)
        batch.append(pair)
    if batch:
        commands.append(_MSET_HEAD + b",".join(batch) + _MSET_TAIL)
    return commands


_MSET_HEAD = b'EXEC MSet "'
_MSET_TAIL = b'"\n'
