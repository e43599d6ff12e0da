"""The emulated portal's events: bindings, the offline queue, and events sent as the portal sends them.

Sources (bitrix24/b24restdocs): event.bind, event.get, event.unbind
(api-reference/events/event-bind.md, event-get.md, event-unbind.md); the offline queue
(api-reference/events/offline-events.md, event-offline-get.md, event-offline-clear.md,
event-offline-error.md); the POST a handler receives (api-reference/events/index.md, "What Comes
to the Handler": form-encoded `event`, `event_handler_id`, `data[...]`, `ts`, `auth[...]`; the
telephony events' fields in api-reference/telephony/events/on-external-call-start.md and
on-external-call-back-start.md).

Guessed where the docs say nothing, and marked GUESS below: the error code for binding the same
handler twice; what an offline record's EVENT_DATA holds for a telephony event (here: the same
`data` object the handler would get; the docs' examples show only `false`); that a get with a
known `process_id` returns only that reservation's records still open; MESSAGE_ID's value.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from agi_bitrix.testing.portal_wire import ErrorAnswer

EVENT_BIND, EVENT_GET, EVENT_UNBIND = "event.bind", "event.get", "event.unbind"
OFFLINE_GET, OFFLINE_CLEAR, OFFLINE_ERROR = "event.offline.get", "event.offline.clear", "event.offline.error"
# The events this emulated portal knows (what the `events` method would list); others are
# ERROR_EVENT_NOT_FOUND (event-bind.md).
KNOWN_EVENTS = frozenset({"ONEXTERNALCALLSTART", "ONEXTERNALCALLBACKSTART", "ONAPPINSTALL", "ONCRMDEALUPDATE"})


@dataclass
class OfflineRecord:
    id: int
    event_name: str
    data: dict[str, Any]
    at: float  # unix time, TIMESTAMP_X
    message_id: str
    process_id: str = ""
    error: bool = False

    def shown(self) -> dict[str, Any]:
        """As event.offline.get lists it (event-offline-get.md, "Response Handling")."""
        return {"ID": str(self.id), "TIMESTAMP_X": datetime.fromtimestamp(self.at, UTC).astimezone().isoformat(),
                "EVENT_NAME": self.event_name, "EVENT_DATA": self.data, "EVENT_ADDITIONAL": False,
                "MESSAGE_ID": self.message_id}


@dataclass
class PortalEvents:
    """One application's bindings and offline queue on the emulated portal, and what its events'
    `auth` carries (set `domain`, `member_id`, `application_token` from the OAuth stand-in)."""

    domain: str = "portal.example"
    member_id: str = "a223c6b9410f85df78e9377d6c4f7213"
    application_token: str = field(default_factory=lambda: secrets.token_hex(16))
    bindings: list[dict[str, Any]] = field(default_factory=list)
    queue: list[OfflineRecord] = field(default_factory=list)
    cleared: list[OfflineRecord] = field(default_factory=list)  # confirmed by event.offline.clear
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def methods(self) -> dict[str, Any]:
        return {EVENT_BIND: self._bind, EVENT_GET: self._get, EVENT_UNBIND: self._unbind,
                OFFLINE_GET: self._offline_get, OFFLINE_CLEAR: self._offline_clear, OFFLINE_ERROR: self._offline_error}

    # -- the portal sends an event ----------------------------------------------------------

    def event_form(self, event: str, data: dict[str, str], *, ts: float | None = None,
                   handler_id: int = 1, **auth: str) -> dict[str, str]:
        """The handler's form for `event` (api-reference/events/index.md); `auth` overrides fields
        of `auth[...]` (a forgery's)."""
        fields = {"access_token": secrets.token_hex(16), "expires_in": "3600", "scope": "telephony",
                  "domain": self.domain, "server_endpoint": "https://oauth.bitrix.info/rest/", "status": "L",
                  "client_endpoint": f"https://{self.domain}/rest/", "member_id": self.member_id,
                  "application_token": self.application_token, **auth}
        form = {"event": event, "event_handler_id": str(handler_id),
                **{f"data[{key}]": value for key, value in data.items()},
                "ts": str(int(time.time() if ts is None else ts))}
        form.update({f"auth[{key}]": value for key, value in fields.items()})
        return form

    async def trigger(self, event: str, data: dict[str, str], session: aiohttp.ClientSession) -> list[int]:
        """The event happens: each online binding gets the POST (the HTTP statuses are returned),
        each offline binding a record in the queue."""
        statuses = []
        for index, binding in enumerate(self.bindings):
            if binding["event"] != event:
                continue
            if binding["offline"]:
                self.enqueue(event, data)
                continue
            form = self.event_form(event, data, handler_id=index + 1)
            async with session.post(binding["handler"], data=form) as answer:
                statuses.append(answer.status)
        return statuses

    def enqueue(self, event: str, data: dict[str, str], at: float | None = None) -> OfflineRecord:
        record_id = next(self._ids)
        # GUESS: a message id per change; the docs call it the record's MESSAGE_ID, no more.
        record = OfflineRecord(record_id, event, dict(data), time.time() if at is None else at,
                               message_id=secrets.token_hex(16))
        self.queue.append(record)
        return record

    # -- methods ----------------------------------------------------------------------------

    def _bind(self, params: dict[str, Any]) -> dict[str, Any]:
        event = str(params.get("event", "")).upper()
        if event not in KNOWN_EVENTS:
            raise ErrorAnswer(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
        offline = params.get("event_type") == "offline"
        handler = "" if offline else str(params.get("handler", ""))
        if not offline and not handler:
            raise ErrorAnswer(400, "ERROR_CORE", "Handler is required")
        if any(b["event"] == event and b["offline"] == offline and b["handler"] == handler for b in self.bindings):
            # GUESS: the portal refuses a second identical binding; the code is not documented.
            raise ErrorAnswer(400, "ERROR_CORE", "Handler already binded")
        self.bindings.append({"event": event, "handler": handler, "auth_type": "0", "offline": offline})
        return {"result": True}

    def _get(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"result": [{**binding, "offline": int(binding["offline"])} for binding in self.bindings]}

    def _unbind(self, params: dict[str, Any]) -> dict[str, Any]:
        event = str(params.get("event", "")).upper()
        offline = params.get("event_type") == "offline"
        handler = str(params.get("handler", ""))
        kept = [b for b in self.bindings if not (b["event"] == event and b["offline"] == offline
                                                 and (offline or b["handler"] == handler))]
        count = len(self.bindings) - len(kept)
        self.bindings = kept
        return {"result": {"count": count}}

    def _offline_get(self, params: dict[str, Any]) -> dict[str, Any]:
        """event-offline-get.md: `clear` (default 1), `process_id`, `limit` (default 50), `error`."""
        clear = str(params.get("clear", "1")) != "0"
        limit = int(params.get("limit", 50) or 50)
        process_id = str(params.get("process_id", "") or "")
        with_errors = str(params.get("error", "0")) == "1"
        if process_id:  # GUESS: that reservation's records still open, no new ones
            chosen = [r for r in self.queue if r.process_id == process_id][:limit]
        else:  # hidden from other requests once reserved (offline-events.md)
            chosen = sorted((r for r in self.queue if not r.process_id and r.error == with_errors),
                            key=lambda r: r.at)[:limit]
            process_id = secrets.token_hex(16) if chosen and not clear else ""
        if clear:
            self.queue = [r for r in self.queue if r not in chosen]
        else:
            for record in chosen:
                record.process_id = process_id
        return {"result": {"process_id": process_id or None, "events": [r.shown() for r in chosen]}}

    def _offline_clear(self, params: dict[str, Any]) -> dict[str, Any]:
        """event-offline-clear.md: `process_id` (required), `id` or else `message_id`; by default
        every record of the reservation."""
        process_id = str(params.get("process_id", "") or "")
        if not process_id:
            raise ErrorAnswer(400, "ERROR_CORE", "process_id is required")
        chosen = self._chosen(process_id, params)
        self.cleared.extend(chosen)
        self.queue = [r for r in self.queue if r not in chosen]
        return {"result": True}

    def _offline_error(self, params: dict[str, Any]) -> dict[str, Any]:
        """event-offline-error.md: `process_id` and `message_id`: those records marked erroneous."""
        process_id = str(params.get("process_id", "") or "")
        for record in self._chosen(process_id, {"message_id": params.get("message_id") or []}):
            record.error, record.process_id = True, ""
        return {"result": True}

    def _chosen(self, process_id: str, params: dict[str, Any]) -> list[OfflineRecord]:
        ids, messages = _listed(params.get("id")), _listed(params.get("message_id"))
        mine = [r for r in self.queue if r.process_id == process_id]
        if ids:
            return [r for r in mine if str(r.id) in ids]
        if messages:
            return [r for r in mine if r.message_id in messages]
        return mine


def _listed(value: Any) -> set[str]:
    """An array parameter as JSON sends it (a list) or a form does (KEY[0]=..., read as a dict)."""
    if isinstance(value, dict):
        value = list(value.values())
    return {str(item) for item in value} if isinstance(value, list) else set()
