"""Subscribing to the click-to-call events (`agi-bitrix events bind`), and whether we are.

`event.bind` (api-reference/events/event-bind.md) with the event's name and the handler URL, or,
for the offline queue, `event_type=offline` without a handler (offline-events.md, "Registering
the Handler"); `event.get` (event-get.md) lists what is bound: `event`, `handler`, `auth_type`,
`offline`. Both work only in an application's context; the offline queue needs an
administrator's tokens. The docs also say an application's bindings are removed when it is
updated or deleted (event-bind.md), so `check`/`/healthz` say whether they are still there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.bitrix.event_gate import EventGate
from agi_bitrix.bitrix.events import EVENT_NAMES, HANDLER, OFFLINE

EVENT_BIND, EVENT_GET, EVENT_UNBIND = "event.bind", "event.get", "event.unbind"
# Seconds a command waits for a slot of the request budget.
SLOT_WAIT = 10.0


@dataclass(frozen=True)
class Binding:
    event: str  # upper case
    handler: str
    offline: bool


@dataclass(frozen=True)
class Subscription:
    """What event.get says about our two events in `mode`."""

    mode: str
    bound: tuple[str, ...]  # our events bound the way `mode` needs
    missing: tuple[str, ...]
    other: tuple[Binding, ...]  # our events bound otherwise (the other mode, another URL)

    @property
    def complete(self) -> bool:
        return not self.missing


def wanted(binding: Binding, mode: str, handler_url: str) -> bool:
    return binding.offline if mode == OFFLINE else (not binding.offline and binding.handler == handler_url)


async def _call(portal: PortalClient, method: str, params: dict[str, Any]) -> Any:
    slot = await portal.take_slot(SLOT_WAIT, can_wait=True)
    return await portal.call(method, params, slot=slot)


async def subscription(portal: PortalClient, mode: str, handler_url: str) -> Subscription:
    """event.get, read for our events (BitrixError when the portal cannot tell)."""
    answer = await _call(portal, EVENT_GET, {})
    bindings = [Binding(str(item.get("event", "")).upper(), str(item.get("handler", "") or ""),
                        str(item.get("offline", "0")) == "1")
                for item in (answer if isinstance(answer, list) else []) if isinstance(item, dict)]
    ours = [binding for binding in bindings if binding.event in EVENT_NAMES]
    bound = tuple(name for name in EVENT_NAMES if any(b.event == name and wanted(b, mode, handler_url) for b in ours))
    return Subscription(mode, bound, tuple(name for name in EVENT_NAMES if name not in bound),
                        tuple(b for b in ours if not wanted(b, mode, handler_url)))


async def bind(portal: PortalClient, mode: str, handler_url: str) -> tuple[Subscription, list[str]]:
    """Bind what is missing for `mode`; (the subscription after, the events bound now)."""
    before = await subscription(portal, mode, handler_url)
    done = []
    for name in before.missing:
        params = ({"event": name, "event_type": "offline"} if mode == OFFLINE
                  else {"event": name, "handler": handler_url})
        await _call(portal, EVENT_BIND, params)
        done.append(name)
    return await subscription(portal, mode, handler_url), done


async def unbind_other(portal: PortalClient, current: Subscription) -> int:
    """Remove our events' bindings that `mode` does not use (a former handler URL, the other mode)."""
    removed = 0
    for binding in current.other:
        params = ({"event": binding.event, "event_type": "offline"} if binding.offline
                  else {"event": binding.event, "handler": binding.handler})
        answer = await _call(portal, EVENT_UNBIND, params)
        removed += int(answer.get("count", 0)) if isinstance(answer, dict) else 0
    return removed


class EventsStatus:
    """What /healthz says about click-to-call's events: the mode, whether event.get showed them
    bound (None until asked), the last event taken, refusals by reason, the receiver's counters."""

    def __init__(self, mode: str, handler_url: str, gate: EventGate, part: Any) -> None:
        self.mode, self._handler_url, self.gate, self._part = mode, handler_url, gate, part
        self.subscribed: bool | None = None
        self.problem = ""

    async def refresh(self, portal: PortalClient) -> None:
        """Ask event.get once (a request that can wait); at start and after a reload."""
        try:
            found = await subscription(portal, self.mode, self._handler_url)
        except BitrixError as error:
            self.subscribed, self.problem = None, f"event.get: {error.reason}"
            return
        self.subscribed, self.problem = found.complete, "" if found.complete else (
            f"not bound: {', '.join(found.missing)} (run `agi-bitrix events bind`)")

    def health(self) -> dict[str, Any]:
        last = self.gate.last_event_at
        return {"mode": self.mode, "subscribed": self.subscribed, "problem": self.problem or None,
                "accepted": self.gate.accepted,
                "last_event_seconds_ago": None if last is None else round(time.time() - last, 1),
                "refused": dict(self.gate.refusals.counts),
                HANDLER if self.mode == HANDLER else OFFLINE: self._part.health()}
