"""Turning values into AGI command lines that Asterisk reads back byte for byte.

Two parsers stand between us and the channel variable:
1. res_agi's `parse_args` splits the command line into words: double quotes group, a
   backslash makes the next character literal, and the line ends at the first newline (a NUL
   ends it too). A line longer than res_agi's 2048-byte buffer is cut and the remainder is
   read as a NEW command, so no line we send may reach that size.
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

import re
from collections.abc import Iterable, Mapping

# res_agi reads commands into a 2048-byte buffer (AGI_BUF_LEN); keep well inside it.
MAX_COMMAND_BYTES = 2000
# One variable's value is capped so that a single hostile CRM field cannot push its
# neighbours out of the command.
MAX_VALUE_CHARS = 256

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Characters that Asterisk's standard argument parser treats specially inside MSet's argument.
_MSET_SPECIAL = set('\\,"()[]=' + "'{}$")  # see tests/asterisk/ESCAPING.md for the proof


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


def _mset_pair(name: str, value: str) -> str:
    if not _VARIABLE_NAME.match(name):
        raise ValueError(f"not a channel variable name: {name!r}")
    escaped = "".join("\\" + ch if ch in _MSET_SPECIAL else ch for ch in clean_value(value))
    return f"{name}={escaped}"


def mset_commands(variables: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[bytes]:
    """`EXEC MSet` lines setting all variables, as few as fit under MAX_COMMAND_BYTES (normally one)."""
    items = variables.items() if isinstance(variables, Mapping) else variables
    commands: list[bytes] = []
    batch: list[str] = []
    for name, value in items:
        pair = _mset_pair(name, value)
        if batch and len(_mset_line(batch + [pair])) > MAX_COMMAND_BYTES:
            commands.append(_mset_line(batch))
            batch = []
        batch.append(pair)
    if batch:
        commands.append(_mset_line(batch))
    return commands


def _mset_line(pairs: list[str]) -> bytes:
    return ("EXEC MSet " + _agi_quote(",".join(pairs)) + "\n").encode("utf-8")
