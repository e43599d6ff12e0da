"""The FastAGI wire protocol, without sockets: bytes in, events out; commands in, bytes out."""

from agi_bitrix.agi.protocol import (
    NEED_DATA,
    AgiRequest,
    CommandReply,
    EndOfStream,
    HangUp,
    PeerError,
    ServerConnection,
)
from agi_bitrix.agi.quoting import MAX_COMMAND_BYTES, agi_command, mset_commands

__all__ = [
    "MAX_COMMAND_BYTES",
    "NEED_DATA",
    "AgiRequest",
    "CommandReply",
    "EndOfStream",
    "HangUp",
    "PeerError",
    "ServerConnection",
    "agi_command",
    "mset_commands",
]
