"""The outbox's delivery policy, whatever stores its rows (SQLite: outbox.py; Redis: redis_outbox.py).

Two parts. `judge` is pure: from one attempt's outcome, the clock and the retry policy it says
what becomes of the row (delivered, looked at again without counting the attempt, retried after
a backoff, or given up). `DeliveryLoop` is the loop around it: it stores a row or keeps it in
memory while the store cannot take it, sends an attempt (a sender's bug is retried, never loses
a row), applies the verdict, says the store is down once per change and tries it again every
`retry.first_delay`. A store (`Rows`) keeps only what is its own: how a row is inserted, taken,
marked, and when the next one is due.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

from agi_bitrix import background

log = logging.getLogger("agi_bitrix.outbox")

FINISH = "finish"  # the kind of a row added without one
# Finishes kept in memory while the store cannot take them (a few hundred bytes each); past
# this, a finish is lost, logged at ERROR and counted.
MAX_KEPT = 10_000

# What add() did with a finish.
Added = Literal["stored", "kept", "duplicate", "lost"]


@dataclass(frozen=True)
class RetryPolicy:
    first_delay: float = 5.0  # seconds before the second attempt; doubles with each failure
    max_delay: float = 600.0
    give_up_after: float = 86400.0  # counted from the add

    def delay(self, attempts: int) -> float:
        """The wait after the `attempts`-th failed attempt."""
        return min(self.max_delay, self.first_delay * 2 ** min(attempts - 1, 60))


@dataclass(frozen=True)
class Outcome:
    """What one attempt achieved: `delivered`, `retry` (a passing failure), `failed` (for good), or
    `wait`: nothing was sent, the row is not ready (a recording still being written) and is looked
    at again at `retry_at`, without holding the other rows back."""

    kind: str
    detail: str = ""
    retry_at: float = 0.0


@dataclass(frozen=True)
class Entry:
    key: str
    params: dict[str, Any]
    attempt: int  # 1 for the first attempt
    queued_at: float
    kind: str = FINISH


Sender = Callable[[Entry], Awaitable[Outcome]]


@dataclass(frozen=True)
class KeptRow:
    """A row the store could not take yet, as it will be stored."""

    params: str  # JSON
    queued_at: float
    kind: str
    after: str
    not_before: float


@dataclass(frozen=True)
class Verdict:
    """What becomes of a row after an attempt: `delivered`; `wait` (not sent, not counted, looked at
    again `at`); `retry` (again `at`, after `delay`; the other rows wait too, the portal being
    unwell); `failed` (given up, with the rows that wait for it)."""

    action: Literal["delivered", "wait", "retry", "failed"]
    detail: str
    at: float = 0.0
    delay: float = 0.0


def judge(entry: Entry, outcome: Outcome, now: float, retry: RetryPolicy) -> Verdict:
    """The verdict on one attempt of `entry` that ended in `outcome` at `now`."""
    if outcome.kind == "delivered":
        return Verdict("delivered", outcome.detail)
    if outcome.kind == "wait":
        return Verdict("wait", outcome.detail, at=outcome.retry_at)
    if outcome.kind == "retry" and now - entry.queued_at < retry.give_up_after:
        delay = retry.delay(entry.attempt)
        return Verdict("retry", outcome.detail, at=now + delay, delay=delay)
    if outcome.kind == "retry":
        return Verdict("failed", f"gave up after {entry.attempt} attempts in {now - entry.queued_at:.0f} s:"
                                 f" {outcome.detail}")
    return Verdict("failed", outcome.detail)


class OutboxCounts:
    """What the metrics and /healthz read of an outbox, whatever stores its rows: rows waiting and
    given up by kind (as last seen in the store), rows kept in memory, rows lost."""

    def __init__(self) -> None:
        # Kept in memory for /metrics, which is read without waiting for the store, by kind.
        self._waiting: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        # Rows the store could not take, oldest first, by key.
        self._kept: dict[str, KeptRow] = {}
        self.lost = 0  # neither stored nor kept: memory full, or still kept when the server stopped
        # Why the outbox cannot store finishes now, "" while it can (for /healthz and metrics).
        self.problem = ""

    @property
    def waiting(self) -> int:
        """Rows stored and not yet delivered (or given up)."""
        return sum(self._waiting.values())

    @property
    def failed(self) -> int:
        """Rows given up, kept in the store."""
        return sum(self._failed.values())

    @property
    def kept(self) -> int:
        """Rows waiting in memory for the store to take them."""
        return len(self._kept)

    def waiting_of(self, kind: str) -> int:
        """Rows of `kind` not yet delivered: stored, or kept in memory."""
        return self._waiting[kind] + self.kept_of(kind)

    def failed_of(self, kind: str) -> int:
        return self._failed[kind]

    def kept_of(self, kind: str) -> int:
        return sum(1 for row in self._kept.values() if row.kind == kind)

    def _keep_in_memory(self, key: str, row: KeptRow) -> Added:
        """Keep a row the store cannot take now (up to MAX_KEPT); every one said at ERROR."""
        if len(self._kept) >= MAX_KEPT:
            self.lost += 1
            log.error("%s %s is LOST: the outbox cannot store it (%s) and %d rows already wait in memory",
                      row.kind, key, self.problem, MAX_KEPT)
            return "lost"
        self._kept[key] = row
        log.error("%s %s kept in memory (%d there now): %s; it is stored and delivered once the outbox works",
                  row.kind, key, len(self._kept), self.problem)
        return "kept"

    def _lose_kept(self) -> None:
        """The server stops with rows still in memory: each is lost, and said so."""
        for key, row in self._kept.items():
            log.error("%s %s is LOST: kept in memory when the server stopped (%s)", row.kind, key, self.problem)
        self.lost += len(self._kept)
        self._kept.clear()


class OutboxError(Exception):
    """The outbox cannot be opened (path, permissions, another process holds it)."""


class OutboxInUse(OutboxError):
    """Another process holds the outbox's store: starting would deliver its finishes twice."""


class Counts(NamedTuple):
    """The rows a store holds, by kind."""

    waiting: Counter[str]
    failed: Counter[str]


class Rows(Protocol):
    """Where an outbox keeps its rows (SQLite: outbox.py; Redis: redis_outbox.py): storage only.

    It inserts, takes (counting the attempt before the request leaves) and marks rows; what an
    attempt's outcome means, the backoff, the memory kept while the store is down and the loop
    are the DeliveryLoop's."""

    # The failures of the store itself (not of a delivery): the outbox is down while they last.
    errors: ClassVar[tuple[type[Exception], ...]]

    @property
    def path(self) -> Path | str: ...  # where the rows are, as the log and /healthz show it (no password)

    @property
    def is_open(self) -> bool: ...  # takes rows now

    async def open(self) -> Counts: ...  # raises OutboxInUse when another process holds it
    async def close(self) -> None: ...

    async def insert(self, key: str, row: KeptRow, now: float) -> bool:
        """Store a row; False when its key is there already."""
        ...

    async def tidy(self, now: float) -> tuple[Counter[str] | None, Counter[str]] | None:
        """The store's upkeep when due (old rows purged, new ones read); the counts (waiting, failed)
        when it read them, waiting None where the loop's own count is the store's (one server)."""
        ...

    async def take(self, now: float, retry: RetryPolicy) -> Entry | None:
        """A row due now, its attempt counted and its next one set `retry.delay` later; None when none is."""
        ...

    async def due_at(self) -> tuple[float | None, float]:
        """When a row is next due (None: none waits), and when the next upkeep is."""
        ...

    async def mark(self, entry: Entry, verdict: Verdict, now: float) -> list[tuple[str, str]]:
        """Apply the verdict on an attempt; a row given up takes the rows waiting for it along:
        those, as (key, kind)."""
        ...

    def describe(self, error: Exception) -> str: ...  # why the store cannot be used, in one line
    async def count(self, state: str) -> int: ...  # for tests and diagnostics
    async def row(self, key: str) -> dict[str, Any] | None: ...  # one row as a dict, or None


class DeliveryLoop(OutboxCounts):
    """The loop and the policy both stores share, around the rows of one store."""

    def __init__(self, rows: Rows, send: Sender, retry: RetryPolicy, clock: Callable[[], float]) -> None:
        self._rows = rows
        super().__init__()
        self._send = send
        self.retry = retry
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._opened = False  # open was tried: the store has something to close
        self._stopping = False
        self._paused_until = 0.0
        self._storage_retry_at = 0.0

    @property
    def path(self) -> Path | str:
        return self._rows.path

    # -- the API -----------------------------------------------------------------------------

    async def open(self) -> None:
        self._opened = True
        self._waiting, self._failed = await self._rows.open()

    async def open_or_retry_later(self) -> None:
        """Open; when the store cannot be used now, say why and let the background task retry.

        Only a store held by another process is raised (OutboxInUse): two servers delivering
        the same rows would finish calls twice."""
        try:
            await self.open()
        except OutboxInUse:
            raise
        except self._rows.errors as error:
            self._storage_failed(self._rows.describe(error))

    def start(self) -> None:
        """Start delivering in the background (after open or open_or_retry_later)."""
        self._stopping = False
        self._task = asyncio.create_task(self._deliver_forever(), name=f"outbox {self.path}")

    async def close(self) -> None:
        # Asked to stop by a flag as well as by the cancel: a cancel that lands inside a redis-py
        # command can be lost (seen with redis 8.1: the loop went on, and close waited for it).
        self._stopping = True
        self._wake.set()
        await background.stop(self._task)
        self._task = None
        if self._opened:
            if self._kept:
                try:  # a last chance for the finishes kept in memory
                    await self._reopen()
                except self._rows.errors as error:
                    self.problem = self._rows.describe(error)
            await self._rows.close()
            self._opened = False
        self._lose_kept()

    async def count(self, state: str) -> int:
        return await self._rows.count(state)

    async def row(self, key: str) -> dict[str, Any] | None:
        """One row as a dict (for tests and diagnostics), or None."""
        return await self._rows.row(key)

    async def add(self, key: str, params: dict[str, Any], *, kind: str = FINISH, after: str = "",
                  not_before: float | None = None) -> Added:
        """Queue `params` under `key`: durably, or in memory while the store cannot take it.

        `after`: the key of a row that must be delivered first (and whose failure fails this one);
        `not_before`: the clock time of the first attempt (default: at once)."""
        if key in self._kept:
            return "duplicate"
        now = self._clock()
        first_at = now if not_before is None else not_before
        row = KeptRow(json.dumps(params, ensure_ascii=False), now, kind, after, first_at)
        if self._rows.is_open:
            try:
                added = await self._rows.insert(key, row, now)
            except self._rows.errors as error:  # a full disk, a broken file, Redis gone
                self._storage_failed(self._rows.describe(error))
            else:
                if not added:
                    return "duplicate"
                self._waiting[kind] += 1
                self._wake.set()
                return "stored"
        return self._keep_in_memory(key, row)

    # -- the loop ----------------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        while not self._stopping:
            try:
                if not self.problem:
                    await self._deliver_due()
                elif self._clock() >= self._storage_retry_at:
                    await self._reopen()
                    await self._deliver_due()  # delivery writes too: each attempt is counted first
                    log.warning("call card is up again: outbox %s stores finishes", self.path)
                    self.problem = ""
            except asyncio.CancelledError:
                raise
            except self._rows.errors as error:
                self._storage_failed(self._rows.describe(error))
            except Exception:
                # A bug: keep the loop alive, and do not spin.
                log.exception("outbox delivery failed unexpectedly; trying again in %.0f s", self.retry.first_delay)
                self._paused_until = self._clock() + self.retry.first_delay
            await self._sleep()

    async def _deliver(self, entry: Entry) -> None:
        """One attempt of a row taken (and counted) by the store; its verdict applied."""
        try:
            outcome = await self._send(entry)
        except Exception as error:  # a sender bug must not lose the row: retry it
            log.exception("sending %s %s failed unexpectedly", entry.kind, entry.key)
            outcome = Outcome("retry", f"internal: {type(error).__name__}")
        now = self._clock()
        verdict = judge(entry, outcome, now, self.retry)
        followers = await self._rows.mark(entry, verdict, now)
        if verdict.action == "delivered":
            self._waiting[entry.kind] -= 1
        elif verdict.action == "retry":
            self._paused_until = verdict.at  # the portal is unwell: the other rows would fail alike
            log.warning("%s %s not delivered (attempt %d: %s); next attempt in %.0f s",
                        entry.kind, entry.key, entry.attempt, verdict.detail, verdict.delay)
        elif verdict.action == "failed":
            self._count_failed(entry.key, entry.kind, verdict.detail, followers)

    def _count_failed(self, key: str, kind: str, detail: str, followers: list[tuple[str, str]]) -> None:
        self._waiting[kind] -= 1
        self._failed[kind] += 1
        log.error("%s %s will not be delivered: %s (kept in %s)", kind, key, detail, self.path)
        for follower, follower_kind in followers:
            self._waiting[follower_kind] -= 1
            self._failed[follower_kind] += 1
            log.error("%s %s will not be delivered either: it waited for %s %s", follower_kind, follower, kind, key)

    async def _deliver_due(self) -> None:
        """The store's upkeep, then the rows due now, one at a time, until none is or the loop is paused."""
        counts = await self._rows.tidy(self._clock())
        if counts is not None:
            waiting, self._failed = counts
            if waiting is not None:
                self._waiting = waiting
        while self._clock() >= self._paused_until:
            entry = await self._rows.take(self._clock(), self.retry)
            if entry is None:
                return
            await self._deliver(entry)

    async def _reopen(self) -> None:
        """Make the store usable again after a failure, and store the rows kept in memory."""
        if not self._rows.is_open:
            await self.open()
        await self._store_kept()

    async def _store_kept(self) -> None:
        """Store the rows kept in memory, oldest first; raises while the store cannot."""
        while self._kept:
            key, row = next(iter(self._kept.items()))
            if await self._rows.insert(key, row, self._clock()):
                self._waiting[row.kind] += 1
            del self._kept[key]

    def _storage_failed(self, problem: str) -> None:
        """The store cannot take finishes: note why (logged once per change), try again later."""
        self._storage_retry_at = self._clock() + self.retry.first_delay
        if not self.problem:
            log.error("call card is DOWN: %s; calls are routed as usual, finishes are kept in memory until the"
                      " outbox works (tried every %.0f s)", problem, self.retry.first_delay)
        elif problem != self.problem:
            # Still down, for another reason (a restarting Redis answers "closed", then "reset"): said,
            # but the change that matters, down, was said at ERROR once.
            log.warning("call card is still down: %s", problem)
        self.problem = problem
        self._wake.set()  # the loop sleeps until the retry from now on

    async def _sleep(self) -> None:
        # Cleared before looking: a row added from here on wakes us, one added before is seen.
        self._wake.clear()
        if self._stopping:
            return
        now = self._clock()
        wake_at = self._storage_retry_at if self.problem else await self._wake_at()
        if self.problem:  # _wake_at may have found the store broken
            wake_at = self._storage_retry_at
        if wake_at <= now:
            return
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancel that races with the wake-up,
            # and close() would then wait forever.
            async with asyncio.timeout(wake_at - now):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _wake_at(self) -> float:
        """When a row is next due (not before a pause ends), or the store's upkeep is."""
        try:
            next_due, upkeep_at = await self._rows.due_at()
        except self._rows.errors as error:
            self._storage_failed(self._rows.describe(error))
            return self._storage_retry_at
        return min(max(self._paused_until, float("inf") if next_due is None else next_due), upkeep_at)
