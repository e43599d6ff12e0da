"""The channel behind one FastAGI session, as a script handler sees it.

The server (agi_bitrix.server) implements it over a socket; handlers (routing, register,
finish) depend only on this, so they can be driven without one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from agi_bitrix.agi.protocol import AgiRequest, CommandReply


class AgiChannel(Protocol):
    async def command(self, line: bytes) -> CommandReply | None:
        """Send one command line and return Asterisk's reply (None if the session ended)."""

    async def set_variables(self, variables: Mapping[str, str]) -> bool:
        """Set channel variables in as few commands as possible (normally one EXEC MSet); False
        when the channel went away or Asterisk refused them."""


# What serves one AGI script (`route`, `register`, `finish`): the request's header, the channel.
Handler = Callable[[AgiRequest, AgiChannel], Awaitable[None]]
