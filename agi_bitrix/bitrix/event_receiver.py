"""Handler mode: the portal POSTs each event to a path on the HTTP listener (beside the install
callback, agi_bitrix.bitrix.install), and the event goes to the click-to-call flow.

Anyone can POST here, so the request is judged before any work: its size (declared, and small:
an event is a few hundred bytes), its form, then the EventGate (token, portal, shape, age, first
time). Nothing on this path asks the portal, so a flood of forged POSTs costs no request of the
calls' budget, only this listener's time. What passes is handed to the handler in a task of its
own and answered at once: the portal's queue server slows down for handlers that answer slowly
and never sends an event again (api-reference/events/index.md, "Features of Operation", "No
retries"), so a handler that fails is logged and counted here, and the flow finishes the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from agi_bitrix.bitrix.event_gate import EventGate
from agi_bitrix.bitrix.events import (
    DuplicateEvent,
    Event,
    EventHandler,
    EventRefused,
    MalformedEvent,
    NotAuthentic,
    StaleEvent,
    TooLarge,
)

log = logging.getLogger("agi_bitrix.events")

# The largest event body taken: the documented events are well under 2 KiB; a callback's TEXT
# is at most 1000 characters, three times that when percent-encoded.
MAX_BODY = 16 * 1024
MAX_FIELDS = 64
# Events handed to the flow and not yet done; past it a POST is answered 503 and counted.
MAX_IN_FLIGHT = 200
FORM = "application/x-www-form-urlencoded"


def read_form(body: bytes) -> dict[str, str]:
    """The POST's fields; MalformedEvent for anything but a plain form with each key once."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                          max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise MalformedEvent("the body is not a form of at most 64 UTF-8 fields") from None
    form = dict(pairs)
    if len(form) != len(pairs):
        raise MalformedEvent("a field is repeated: which one to believe is not ours to guess")
    return form


def _status(error: EventRefused) -> int:
    if isinstance(error, TooLarge):
        return 413
    if isinstance(error, (NotAuthentic, StaleEvent)):
        return 403
    if isinstance(error, DuplicateEvent):
        return 200  # already taken: the portal has nothing to do about it
    return 400


class EventReceiver:
    """POST `path`: the portal's events, judged, then handed to `handler` in the background."""

    def __init__(self, gate: EventGate, handler: EventHandler, path: str) -> None:
        self.gate, self.path = gate, path
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self.handler_failures = 0
        self.busy_refusals = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(self.path, self.receive)

    async def receive(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        try:
            form = await self._read(request)
            event = await self.gate.admit_post(form, peer)
        except EventRefused as error:
            # Which proof failed is not told: that the token was right and the portal not would be news.
            said = "not authentic" if isinstance(error, NotAuthentic) else error.reason
            return web.json_response({"error": said}, status=_status(error))
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.busy_refusals += 1
            log.error("Bitrix24 event %s not handled: %d events are still being handled", event.key, len(self._tasks))
            await self.gate.seen.forget(event.key)
            return web.json_response({"error": "busy"}, status=503)
        task = asyncio.create_task(self._run(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response({"status": "accepted"})

    async def _read(self, request: web.Request) -> Mapping[str, str]:
        length = request.content_length
        if length is None or length > MAX_BODY:
            error = TooLarge(f"a body of {'undeclared length' if length is None else f'{length} bytes'}"
                             f" (at most {MAX_BODY} taken)")
            self.gate.refusals.refused(error, request.remote or "?")
            raise error
        try:
            if request.content_type != FORM:
                raise MalformedEvent(f"content type {request.content_type[:60]!r}, not {FORM}")
            return read_form(await request.read())
        except MalformedEvent as error:
            self.gate.refusals.refused(error, request.remote or "?")
            raise

    async def _run(self, event: Event) -> None:
        try:
            await self._handler(event)
        except Exception:
            self.handler_failures += 1
            # The portal sends no event twice: this one is gone, and says so once, with the cause.
            log.exception("Bitrix24 event %s (%s): the click-to-call handler failed; the portal will not send"
                          " it again", event.key, type(event).__name__)

    async def close(self, grace: float = 5.0) -> None:
        """Let the events in hand finish for `grace` seconds, then cancel the rest."""
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def health(self) -> dict[str, Any]:
        return {"in_flight": len(self._tasks), "handler_failures": self.handler_failures,
                "busy_refusals": self.busy_refusals}
