"""What the dialplan gives register and finish: AGI arguments, or, for a bare
AGI(agi://HOST:PORT/register), the same values read from the channel in one round trip."""

from __future__ import annotations

from agi_bitrix.agi.channel import AgiChannel
from agi_bitrix.agi.protocol import AgiRequest
from agi_bitrix.agi.quoting import agi_command

# Every value read this way is a number, an id, a status or a channel name, none of which holds
# a comma; only the last one (a file name) may, and it is split off last.
SEPARATOR = ","


async def dialplan_values(request: AgiRequest, channel: AgiChannel, expressions: tuple[str, ...]) -> list[str]:
    """The AGI arguments; without any, `expressions` evaluated on the channel (GET FULL VARIABLE)."""
    if request.args:
        return [arg.strip() for arg in request.args]
    reply = await channel.command(agi_command("GET FULL VARIABLE", SEPARATOR.join(expressions)))
    if reply is None or not reply.ok or reply.data is None:
        return []
    return [value.strip() for value in reply.data.split(SEPARATOR, len(expressions) - 1)]
