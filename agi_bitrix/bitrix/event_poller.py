"""Offline mode: for a server the internet cannot reach, the events wait in the portal's offline
queue and this poller takes them (api-reference/events/offline-events.md, "Retrieval with
Reservation").

Each round: `event.offline.get` with `clear=0` reserves up to `limit` records under a
`process_id` and hides them from every other request, so several servers polling one portal
get different records (event-offline-get.md: "each will receive a different set of records").
Each record goes through the EventGate and the handler, one after another; then
`event.offline.clear` with that `process_id` and the `id`s handled (event-offline-clear.md)
confirms them. A record whose handler raised is not confirmed: the next round asks again with
the same `process_id` ("to re-select any unprocessed records from the current process") and
tries it again; after `max_attempts` it is marked with `event.offline.error`, which keeps it in
the portal's queue as an erroneous record (event-offline-error.md), and logged as an ERROR.

Offline records carry no application_token: they are the answer to our own request, made with
our application's token over the configured portal's HTTPS address, and that is their proof.

Every request takes a slot of the portal's request budget as a request that can wait (like a
finish or user.get: it leaves half the burst to the lookups, agi_bitrix.bitrix.client); a round
without a slot within the poll interval is skipped, never queued behind the calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from agi_bitrix.background import stop
from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import BitrixError, RequestNotSent
from agi_bitrix.bitrix.event_gate import EventGate
from agi_bitrix.bitrix.events import DuplicateEvent, EventHandler, EventRefused

log = logging.getLogger("agi_bitrix.events")

OFFLINE_GET, OFFLINE_CLEAR, OFFLINE_ERROR = "event.offline.get", "event.offline.clear", "event.offline.error"
_NOT_ASKED = " (not sent)"
BATCH_LIMIT = 50  # event.offline.get's default `limit`
MAX_ATTEMPTS = 3
# While the portal refuses the queue (not an administrator's tokens, a plan without it), rounds
# come this far apart: each one is a request of the calls' budget.
PROBLEM_INTERVAL = 30.0


class OfflinePoller:
    """Takes the portal's offline events every `interval` seconds and confirms each one handled."""

    def __init__(self, current: Callable[[], PortalClient], gate: EventGate, handler: EventHandler, *,
                 interval: float, limit: int = BATCH_LIMIT, max_attempts: int = MAX_ATTEMPTS,
                 problem_interval: float = PROBLEM_INTERVAL) -> None:
        self._current = current  # the running portal client: its tokens and its request budget
        self.gate, self._handler = gate, handler
        self._interval, self._limit, self._max_attempts = interval, limit, max_attempts
        self._problem_interval = max(interval, problem_interval)
        self._process_id = ""  # records reserved and not all confirmed: asked for again first
        self._attempts: dict[str, int] = {}  # record ID -> handler failures
        self._task: asyncio.Task[None] | None = None
        self.problem = ""
        self.last_poll_at: float | None = None  # unix time of the last answered get
        self.confirmed = self.handler_failures = self.marked_erroneous = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                full = await self.poll_once()
            except Exception:  # the loop outlives any one round; the round says what failed
                log.exception("offline events: a round failed unexpectedly")
                full = False
            if not full:
                refused = self.problem and not self.problem.endswith(_NOT_ASKED)
                await asyncio.sleep(self._problem_interval if refused else self._interval)

    async def poll_once(self) -> bool:
        """One round; True when the queue gave a full batch (more may be waiting)."""
        params: dict[str, Any] = {"clear": 0, "limit": self._limit}
        if self._process_id:
            params["process_id"] = self._process_id
        answer = await self._ask(OFFLINE_GET, params)
        if answer is None:
            return False
        self.last_poll_at = time.time()
        process_id, records = _batch(answer)
        if not records:
            self._process_id = ""
            return False
        handled: list[str] = []
        failed: list[str] = []
        for record in records:
            (handled if await self._take(record) else failed).append(str(record.get("ID", "")))
        confirmed = await self._confirm(process_id, handled)
        await self._give_up(process_id, [record for record in records if str(record.get("ID", "")) in failed])
        # Records of this reservation still open are asked for again first, by its process_id.
        retry = not confirmed or any(self._attempts.get(record_id) for record_id in failed)
        self._process_id = process_id if retry else ""
        return len(records) >= self._limit and not retry

    async def _take(self, record: dict[str, Any]) -> bool:
        """Whether the record is done with: handled, or refused (counted and logged by the gate)."""
        try:
            event = await self.gate.admit_record(record)
        except DuplicateEvent:
            return True  # handled in an earlier round whose confirmation did not arrive
        except EventRefused:
            return True
        try:
            await self._handler(event)
        except Exception:
            record_id = str(record.get("ID", ""))
            self._attempts[record_id] = self._attempts.get(record_id, 0) + 1
            self.handler_failures += 1
            await self.gate.seen.forget(event.key)
            log.exception("offline event %s (record %s): the click-to-call handler failed (attempt %d of %d);"
                          " not confirmed", event.key, record_id[:20], self._attempts[record_id], self._max_attempts)
            return False
        return True

    async def _confirm(self, process_id: str, ids: list[str]) -> bool:
        """Whether the handled records are confirmed; if not, the next round gets them again, takes
        them for repeats (the gate remembers them) and confirms them then."""
        if not ids:
            return True
        if await self._ask(OFFLINE_CLEAR, {"process_id": process_id, "id": ids}) is None:
            return False
        self.confirmed += len(ids)
        for record_id in ids:
            self._attempts.pop(record_id, None)
        return True

    async def _give_up(self, process_id: str, records: list[dict[str, Any]]) -> None:
        """Records that failed `max_attempts` times: marked erroneous in the portal's queue."""
        spent = [record for record in records if self._attempts.get(str(record.get("ID", "")), 0) >= self._max_attempts]
        if not spent:
            return
        messages = [str(record.get("MESSAGE_ID", "")) for record in spent]
        if await self._ask(OFFLINE_ERROR, {"process_id": process_id, "message_id": messages}) is None:
            return  # tried again next round
        self.marked_erroneous += len(spent)
        for record in spent:
            self._attempts.pop(str(record.get("ID", "")), None)
        log.error("offline events: %d record(s) failed %d times and are marked erroneous in the portal's queue"
                  " (event.offline.list with ERROR=Y shows them); their calls were not made", len(spent),
                  self._max_attempts)

    async def _ask(self, method: str, params: dict[str, Any]) -> Any:
        """The method's result, or None when it was not asked or failed (logged once per change)."""
        portal = self._current()
        try:
            slot = await portal.take_slot(self._interval, can_wait=True)
            result = await portal.call(method, params, slot=slot)
        except BitrixError as error:
            # A round we did not send (no slot) is tried again soon; a refusal by the portal later.
            problem = f"{method}: {error.reason}" + (_NOT_ASKED if isinstance(error, RequestNotSent) else "")
            if problem != self.problem:
                log.error("offline events: %s (%s); trying again every %g s", problem, error.detail, self._interval)
            self.problem = problem
            return None
        if self.problem:
            log.info("offline events: the portal answers again")
            self.problem = ""
        return result

    def health(self) -> dict[str, Any]:
        return {"problem": self.problem or None, "last_poll_seconds_ago": _age(self.last_poll_at),
                "confirmed": self.confirmed, "handler_failures": self.handler_failures,
                "marked_erroneous": self.marked_erroneous, "reserved_process": bool(self._process_id)}


def _batch(answer: Any) -> tuple[str, list[dict[str, Any]]]:
    """event.offline.get's result: {"process_id": ..., "events": [...]} (event-offline-get.md)."""
    if not isinstance(answer, dict):
        return "", []
    events = answer.get("events")
    records = [record for record in events if isinstance(record, dict)] if isinstance(events, list) else []
    process_id = answer.get("process_id")
    return (process_id if isinstance(process_id, str) else ""), records


def _age(moment: float | None) -> float | None:
    return None if moment is None else round(time.time() - moment, 1)
