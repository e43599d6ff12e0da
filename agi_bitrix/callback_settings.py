"""The `callback:` section: how a CRM callback request (ONEXTERNALCALLBACKSTART) is called back.

On when the section is there. Which numbers may be dialled is click-to-call's dial policy
(`clicktocall.dial_policy`, dialpolicy.py), whether or not click-to-call itself is on: a callback
form on a website is the easiest way to make a PBX dial a premium-rate number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agi_bitrix.checking import quoted
from agi_bitrix.dialpolicy import channel_template, context_name
from agi_bitrix.schema import anything, integer, number, text

_QUEUE = re.compile(r"^[A-Za-z0-9_-]{1,79}$")
# Relative to Asterisk's sounds folder (custom/callback-request), or a full path; no extension.
_SOUND = re.compile(r"^/?[A-Za-z0-9_][A-Za-z0-9_/.-]{0,199}$")


def _queue(value: Any) -> str:
    name = str(value).strip()
    if name and not _QUEUE.fullmatch(name):
        raise ValueError(f"{quoted(value)} is not a queue name (letters, digits, _ and -)")
    return name


def _sound(value: Any) -> str:
    name = str(value).strip()
    if name and (not _SOUND.fullmatch(name) or ".." in name):
        raise ValueError(f"{quoted(value)} is not a sound file name for Playback() (like custom/callback-request,"
                         " or a full path without the extension)")
    return name


def _line_queues(value: Any) -> tuple[tuple[str, str], ...]:
    """`line_queues:` maps a line's number (as the portal names it in LINE_NUMBER) to a queue."""
    if value in (None, (), []):
        return ()
    if not isinstance(value, dict):
        raise ValueError("must map a line's number to a queue, like 74951230000: sales")
    pairs = []
    for line, queue in value.items():
        digits = str(line).strip().removeprefix("+")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 32):
            raise ValueError(f"{quoted(line)} is not a line's number")
        if not _queue(queue):
            raise ValueError(f"line {quoted(line)}: {quoted(queue)} is not a queue name")
        pairs.append((digits, str(queue).strip()))
    return tuple(pairs)


@dataclass(frozen=True)
class CallbackSettings:
    enabled: bool = True
    # The queue's agents are rung through this channel ({queue}); the sample's context runs Queue().
    queue_channel: str = text("queue_channel", "Local/{queue}@agi-bitrix-callback-agents",
                              check=lambda value: channel_template(value, "queue"), restart=True)
    # The owner's phone when routing sends the client to the owner at work ({extension}).
    owner_channel: str = text("owner_channel", "PJSIP/{extension}", check=channel_template, restart=True)
    # Where the agent's answered channel goes: the announcement, then the client is dialled.
    context: str = text("context", "agi-bitrix-callback", check=context_name, restart=True)
    # The queue of each line (LINE_NUMBER); a line not listed gets `queue`, then routing's fallback queue.
    line_queues: tuple[tuple[str, str], ...] = anything("line_queues", (), check=_line_queues, restart=True)
    queue: str = text("queue", "", check=_queue, restart=True)
    # What the agent hears before the client is dialled (Playback(); empty: nothing).
    announcement: str = text("announcement", "beep", check=_sound, restart=True)
    # Seconds the agent's phone (or the queue) rings for one attempt.
    ring: float = number("ring", 60.0, 0, 600, restart=True)
    # Attempts in all, the pause between them, and the talk time that counts as reaching the client.
    attempts: int = integer("attempts", 3, 1, 10, restart=True)
    interval: float = number("interval", 120.0, 0, 86400, restart=True)
    min_talk: float = number("min_talk", 5.0, 0, 3600, restart=True)
    # The longest one attempt may take, talk included, before its outcome counts as unknown.
    max_call: float = number("max_call", 4 * 3600.0, 0, 86400, restart=True)
