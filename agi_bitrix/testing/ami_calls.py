"""Test calls through a real Asterisk, placed and watched over AMI (panoramisk's Manager), for
the real-Asterisk tests and the Asterisk benchmark.

A call is an AMI Originate of a Local channel into the test dialplan's caller context, which
sets the caller ID the test chose and enters the context the test names. Every call carries a
unique TEST_CALL_ID (inherited by the channels it dials); manager.conf lists it in
`channelvars`, so each AMI event says which test call it belongs to.
"""

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from panoramisk import Manager
from panoramisk.message import Message

CALLER_CONTEXT = "agi-bitrix-test-caller"
_call_numbers = itertools.count(1)


@dataclass
class PlacedCall:
    call_id: str
    originated_at: float  # time.monotonic() when the Originate was sent
    # Resolves when Asterisk reports how the Originate ended (answered or not); for errors.
    originate_outcome: asyncio.Future
    events: list[Message] = field(default_factory=list)


def event_name_of(event: Message) -> str:
    """The event's name; for a UserEvent, the name the dialplan gave it."""
    return event.get("UserEvent") if event.event == "UserEvent" else event.event


def _call_id_of(event: Message) -> str | None:
    chanvars = event.get("ChanVariable")
    for chanvar in chanvars if isinstance(chanvars, list) else [chanvars]:
        if chanvar and chanvar.startswith("TEST_CALL_ID="):
            return chanvar.partition("=")[2] or None
    return None


class CallDriver:
    """One AMI connection: places test calls and files every event under the call it names."""

    def __init__(self, manager: Manager):
        self.manager = manager
        self.calls: dict[str, PlacedCall] = {}
        self._changed = asyncio.Condition()
        manager.register_event("*", self._on_event)

    @classmethod
    async def connect(cls, port: int, username: str, secret: str) -> "CallDriver":
        manager = Manager(host="127.0.0.1", port=port, username=username, secret=secret,
                          ping_delay=3600, loop=asyncio.get_running_loop())
        await manager.connect()
        # connect() returns once TCP is up; the login answer follows.
        for _ in range(100):
            if manager.authenticated:
                return cls(manager)
            await asyncio.sleep(0.05)
        manager.close()
        raise ConnectionError(f"AMI login to 127.0.0.1:{port} failed")

    def close(self) -> None:
        self.manager.close()

    async def _on_event(self, manager: Manager, event: Message) -> None:
        call_id = _call_id_of(event)
        call = self.calls.get(call_id) if call_id is not None else None
        if call is not None:
            call.events.append(event)
            async with self._changed:
                self._changed.notify_all()

    def originate(self, dialled: str, callerid: str, entry_context: str,
                  variables: dict[str, str] | None = None) -> PlacedCall:
        """Places a call from `callerid` to `dialled` that enters `entry_context`.

        `variables` become channel variables of the call (AMI splits them on commas, so
        values must not contain any)."""
        call_id = f"{os.getpid()}-{next(_call_numbers)}"
        variables = {"__TEST_CALL_ID": call_id, "TEST_CALLERID": callerid,
                     "TEST_ENTRY_CONTEXT": entry_context, **(variables or {})}
        for name, value in variables.items():
            assert "," not in value, f"AMI would split {name}={value!r} at its comma"
        originated_at = time.monotonic()
        outcome = self.manager.send_action({
            "Action": "Originate",
            "Channel": f"Local/{dialled}@{CALLER_CONTEXT}",
            # What the originating side does once answered; the test's interest is the
            # dialplan side (the ;2 channel), which runs the contexts.
            "Application": "Wait",
            "Data": "30",
            "Timeout": "60000",
            "Async": "true",
            "Variable": [f"{name}={value}" for name, value in variables.items()],
        })
        self.calls[call_id] = PlacedCall(call_id, originated_at, outcome)
        return self.calls[call_id]

    async def wait_for(self, call: PlacedCall, event_name: str, timeout: float,
                       where: Callable[[Message], bool] = lambda event: True, **headers: str) -> Message:
        """The first event of `call` named `event_name` (for UserEvent: its UserEvent name)
        whose headers have the given values and for which `where` holds."""
        def match() -> Message | None:
            for event in call.events:
                if (event_name_of(event) == event_name and where(event)
                        and all(event.get(k) == v for k, v in headers.items())):
                    return event
            return None

        async def wait() -> Message:
            async with self._changed:
                await self._changed.wait_for(match)
            return match()

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no {event_name} {headers or ''} within {timeout} s; {self.describe(call)}") from None

    def describe(self, call: PlacedCall) -> str:
        """What AMI told about the call: for messages of failed tests."""
        seen = [event_name_of(event) for event in call.events]
        agi_status = [event["Value"] for event in call.events
                      if event.event == "VarSet" and event["Variable"] == "AGISTATUS"]
        outcome = call.originate_outcome.result() if call.originate_outcome.done() else "pending"
        return f"call {call.call_id}: AGISTATUS {agi_status}, events {seen}, originate {outcome}"

    async def hangup(self, channel: str) -> None:
        await self.manager.send_action({"Action": "Hangup", "Channel": channel})

    async def getvar(self, channel: str, name: str) -> str:
        reply = await self.manager.send_action({"Action": "Getvar", "Channel": channel, "Variable": name})
        return reply.get("Value", "")
