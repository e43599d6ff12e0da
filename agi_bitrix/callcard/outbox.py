"""A durable outbox for requests that must reach the portal exactly once, such as finishes.

One SQLite row per key (the portal's CALL_ID): a second add with the same key is ignored, so a
dialplan that runs finish twice for one call sends it once. A background task delivers due
rows one at a time. Each attempt is counted in the database before the request leaves, so a
crash in the middle is retried after the backoff, like any other attempt whose outcome is
unknown; the sender decides what a retry that finds the work already done means. Rows whose
delivery failed for good are kept (state `failed`) and logged, never retried forever.

SQLite runs in one thread of its own, so the event loop never waits for the disk; WAL with
synchronous=FULL makes an acknowledged add survive a crash and a power cut.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar, TypeVarTuple

from agi_bitrix import background

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")

log = logging.getLogger("agi_bitrix.outbox")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

# A duplicate add arrives seconds after the first; delivered rows are kept well beyond that.
DELIVERED_RETENTION = 2 * 86400.0
# Failed rows are kept for an admin to read (and replay by hand) for a month.
FAILED_RETENTION = 30 * 86400.0
PURGE_EVERY = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT PRIMARY KEY,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    done_at REAL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
"""


class OutboxError(Exception):
    """The outbox cannot be opened (path, permissions, another process holds it)."""


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
    """What one attempt achieved: `delivered`, `retry` (a passing failure) or `failed` (for good)."""

    kind: str
    detail: str = ""


@dataclass(frozen=True)
class Entry:
    key: str
    params: dict[str, Any]
    attempt: int  # 1 for the first attempt
    queued_at: float


Sender = Callable[[Entry], Awaitable[Outcome]]


class Outbox:
    def __init__(self, path: str | os.PathLike[str], send: Sender, retry: RetryPolicy, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._send = send
        self.retry = retry
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._lock_file: TextIO | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._paused_until = 0.0
        self._purged_at = 0.0
        # Kept in memory for /metrics, which is read without waiting for the database.
        self.waiting = 0
        self.failed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self.waiting = await self.count(PENDING)
        self.failed = await self.count(FAILED)
        log.info("outbox %s open; %d finish(es) waiting for delivery", self.path, self.waiting)

    def start(self) -> None:
        """Start delivering in the background (after open)."""
        self._task = asyncio.create_task(self._deliver_forever(), name=f"outbox {self.path}")

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
        if self._executor is not None:
            await self._run(self._close)
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- the API -----------------------------------------------------------------------------

    async def add(self, key: str, params: dict[str, Any]) -> bool:
        """Queue `params` under `key`, durably; False when the key was already there."""
        added = await self._run(self._insert, key, json.dumps(params, ensure_ascii=False))
        if added:
            self.waiting += 1
            self._wake.set()
        return added

    async def count(self, state: str) -> int:
        return await self._run(self._count, state)

    async def row(self, key: str) -> dict[str, Any] | None:
        """One row as a dict (for tests and diagnostics), or None."""
        return await self._run(self._row, key)

    # -- the delivery loop -------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        while True:
            try:
                await self._deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug or a broken disk: keep the loop alive, and do not spin.
                log.exception("outbox delivery failed unexpectedly; trying again in %.0f s",
                              self.retry.first_delay)
                self._paused_until = self._clock() + self.retry.first_delay
            await self._sleep()

    async def _deliver_due(self) -> None:
        while self._clock() >= self._paused_until:
            now = self._clock()
            if now - self._purged_at >= PURGE_EVERY:
                await self._run(self._purge, now)
                self.failed = await self.count(FAILED)
                self._purged_at = now
            entry = await self._run(self._take_due, now)
            if entry is None:
                return
            try:
                outcome = await self._send(entry)
            except Exception as error:  # a sender bug must not lose the row: retry it
                log.exception("sending %s failed unexpectedly", entry.key)
                outcome = Outcome("retry", f"internal: {type(error).__name__}")
            await self._record(entry, outcome)

    async def _record(self, entry: Entry, outcome: Outcome) -> None:
        now = self._clock()
        if outcome.kind == "delivered":
            await self._run(self._finish_row, entry.key, DELIVERED, now, outcome.detail)
            self.waiting -= 1
            return
        if outcome.kind == "retry" and now - entry.queued_at < self.retry.give_up_after:
            delay = self.retry.delay(entry.attempt)
            await self._run(self._note_error, entry.key, outcome.detail)
            # The portal is unwell: the other rows would fail the same way, so all wait.
            self._paused_until = now + delay
            log.warning("finish %s not delivered (attempt %d: %s); next attempt in %.0f s",
                        entry.key, entry.attempt, outcome.detail, delay)
            return
        if outcome.kind == "retry":
            detail = f"gave up after {entry.attempt} attempts in {now - entry.queued_at:.0f} s: {outcome.detail}"
        else:
            detail = outcome.detail
        await self._run(self._finish_row, entry.key, FAILED, now, detail)
        self.waiting -= 1
        self.failed += 1
        log.error("finish %s will not be delivered: %s (kept in %s)", entry.key, detail, self.path)

    async def _sleep(self) -> None:
        # Cleared before looking: a row added from here on wakes us, one added before is seen.
        self._wake.clear()
        now = self._clock()
        next_due = await self._run(self._next_due)
        wake_at = max(self._paused_until, next_due if next_due is not None else now + PURGE_EVERY)
        if wake_at <= now:
            return
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancel that races with the wake-up,
            # and close() would then wait forever.
            async with asyncio.timeout(wake_at - now):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _run(self, function: Callable[[*_Args], _T], *args: *_Args) -> _T:
        if self._executor is None:
            raise OutboxError(f"outbox {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- in the SQLite thread ----------------------------------------------------------------

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Held open until _release_lock: the flock lives as long as the file.
            lock_file = open(f"{self.path}.lock", "a")  # noqa: SIM115
        except OSError as error:
            raise OutboxError(f"cannot open outbox {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            # Two processes delivering the same rows would send finishes twice.
            raise OutboxError(f"outbox {self.path} is in use by another agi-bitrix process") from None
        self._lock_file = lock_file
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            self._release_lock()
            raise OutboxError(f"cannot open outbox {self.path}: {error}") from None
        db.row_factory = sqlite3.Row
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the flock
            self._lock_file = None

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"outbox {self.path} is not open")
        return self._db

    def _insert(self, key: str, params: str) -> bool:
        now = self._clock()
        cursor = self._connection.execute(
            "INSERT OR IGNORE INTO outbox (key, params, state, queued_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?)", (key, params, PENDING, now, now))
        return cursor.rowcount == 1

    def _take_due(self, now: float) -> Entry | None:
        with self._transaction():
            row = self._connection.execute(
                "SELECT key, params, attempts, queued_at FROM outbox WHERE state = ? AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at LIMIT 1", (PENDING, now)).fetchone()
            if row is None:
                return None
            attempt = row["attempts"] + 1
            # Counted before the request leaves: after a crash mid-request this row waits out
            # the backoff and is retried as an attempt whose outcome is unknown.
            self._connection.execute("UPDATE outbox SET attempts = ?, next_attempt_at = ? WHERE key = ?",
                                     (attempt, now + self.retry.delay(attempt), row["key"]))
        return Entry(row["key"], json.loads(row["params"]), attempt, row["queued_at"])

    def _note_error(self, key: str, detail: str) -> None:
        self._connection.execute("UPDATE outbox SET last_error = ? WHERE key = ?", (detail, key))

    def _finish_row(self, key: str, state: str, now: float, detail: str) -> None:
        # A delivery without a note keeps the error of the attempt before it, for the record.
        self._connection.execute(
            "UPDATE outbox SET state = ?, done_at = ?, last_error = COALESCE(NULLIF(?, ''), last_error)"
            " WHERE key = ?", (state, now, detail, key))

    def _next_due(self) -> float | None:
        row = self._connection.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE state = ?", (PENDING,)).fetchone()
        return row[0]

    def _count(self, state: str) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (state,)).fetchone()[0]

    def _row(self, key: str) -> dict[str, Any] | None:
        row = self._connection.execute("SELECT * FROM outbox WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        found = dict(row)
        found["params"] = json.loads(found["params"])
        return found

    def _purge(self, now: float) -> None:
        self._connection.execute(
            "DELETE FROM outbox WHERE (state = ? AND done_at < ?) OR (state = ? AND done_at < ?)",
            (DELIVERED, now - DELIVERED_RETENTION, FAILED, now - FAILED_RETENTION))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._connection)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
