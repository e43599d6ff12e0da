"""`agi-bitrix events bind` and `events status`: click-to-call's subscription, through the configured
application (agi_bitrix.bitrix.event_subscription), said in a few lines."""

from __future__ import annotations

from typing import TextIO

from agi_bitrix.bitrix.client import make_session
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.bitrix.event_subscription import Subscription, bind, subscription, unbind_other
from agi_bitrix.bitrix.oauth import portal_client
from agi_bitrix.config import Config


def _said(found: Subscription) -> str:
    state = "bound" if found.complete else f"not bound: {', '.join(found.missing)}"
    other = "".join(f"; also bound: {b.event} {'offline' if b.offline else 'to ' + b.handler}" for b in found.other)
    return f"events: {found.mode}, {state}{other}"


async def events_command(config: Config, action: str, *, out: TextIO, err: TextIO) -> bool:
    """`bind` or `status`; whether the portal now sends both events the configured way."""
    events = config.events
    url = events.public_url if events.mode == "handler" else ""
    async with make_session() as session:
        portal = portal_client(config.bitrix, session)
        try:
            if action == "status":
                found = await subscription(portal, events.mode, url)
            else:
                found, done = await bind(portal, events.mode, url)
                if done:
                    print(f"bound {', '.join(done)} ({events.mode})", file=out)
                if found.other:  # the other mode's, or a former URL: the portal would send events there too
                    print(f"removed {await unbind_other(portal, found)} binding(s) events.mode does not use",
                          file=out)
                    found = await subscription(portal, events.mode, url)
        except BitrixError as error:
            print(f"agi-bitrix events {action}: the portal did not answer as asked ({error.reason}: {error.detail})",
                  file=err)
            return False
    print(_said(found), file=out)
    return found.complete and not found.other
