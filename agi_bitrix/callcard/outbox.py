"""A durable outbox for requests that must reach the portal exactly once, such as finishes.

One SQLite row per key (the portal's CALL_ID): a second add with the same key is ignored, so a
dialplan that runs finish twice for one call sends it once. A row has a kind (a finish, a
recording) and may wait for another row (`after`): a recording is attached only to a call whose
finish was delivered, and fails with it when that finish fails for good. A background task delivers due
rows one at a time. Each attempt is counted in the database before the request leaves, so a
crash in the middle is retried after the backoff, like any other attempt whose outcome is
unknown; the sender decides what a retry that finds the work already done means. Rows whose
delivery failed for good are kept (state `failed`) and logged, never retried forever.

SQLite runs in one thread of its own, so the event loop never waits for the disk; WAL with
synchronous=FULL makes an acknowledged add survive a crash and a power cut.

The call card must never take routing down, nor lose a finish quietly. When the file cannot be
opened (a folder the server cannot write) or written (a full disk), a finish is kept in memory,
bounded, and the background task tries the file again every `retry.first` seconds; once it
works the kept finishes are stored and delivered like the others. `problem` says why the outbox
is down, for /healthz and the metrics.

The rows name calls, users and recording URLs, and a lock file that others can open lets any
local user hold a shared flock on it and keep the server from starting: everything is created
private (folder 0700, files 0600) and a lock file left readable by an older version is replaced.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import sqlite3
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Protocol, TypeVar, TypeVarTuple

from agi_bitrix.callcard.delivery import (
    FINISH,
    MAX_KEPT,
    Added,
    Counts,
    DeliveryLoop,
    Entry,
    KeptRow,
    OutboxCounts,
    OutboxError,
    OutboxInUse,
    Outcome,
    RetryPolicy,
    Sender,
    Verdict,
)

# What the call card, the application and the Redis outbox import from here.
__all__ = ["DELIVERED", "DELIVERED_RETENTION", "FAILED", "FAILED_RETENTION", "FINISH", "MAX_KEPT", "PENDING",
           "PURGE_EVERY", "Added", "Entry", "Outbox", "OutboxCounts", "OutboxError", "OutboxInUse", "OutboxStore",
           "Outcome", "RetryPolicy", "Sender"]

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")

log = logging.getLogger("agi_bitrix.outbox")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

# A duplicate add arrives seconds after the first; delivered rows are kept well beyond that.
DELIVERED_RETENTION = 2 * 86400.0
# Failed rows are kept for an admin to read (and replay by hand) for a month.
FAILED_RETENTION = 30 * 86400.0
PURGE_EVERY = 3600.0
# Group and others: none of them may read, write or even list the outbox's files.
_OPEN_TO_OTHERS = 0o077

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT PRIMARY KEY,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    done_at REAL,
    last_error TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'finish',
    after_key TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
"""
# Columns added since the first version, for outbox files written by it.
_ADDED_COLUMNS = {"kind": "TEXT NOT NULL DEFAULT 'finish'", "after_key": "TEXT NOT NULL DEFAULT ''"}
# A row is due when its time has come and the row it waits for (if any) is not pending.
_DUE = ("state = ? AND next_attempt_at <= ? AND NOT EXISTS"
        " (SELECT 1 FROM outbox AS first WHERE first.key = outbox.after_key AND first.state = 'pending')")


class OutboxStore(Protocol):
    """What the call card and the application use of an outbox: this SQLite one, or the one in
    Redis that several servers share (redis_outbox.py)."""

    problem: str  # why the outbox cannot store finishes now, "" while it can
    lost: int

    @property
    def path(self) -> Path | str: ...  # where it is, shown in /healthz and the log (no password)

    def waiting_of(self, kind: str) -> int: ...
    def failed_of(self, kind: str) -> int: ...
    def kept_of(self, kind: str) -> int: ...
    async def open_or_retry_later(self) -> None: ...
    def start(self) -> None: ...
    async def close(self) -> None: ...
    async def add(self, key: str, params: dict[str, Any], *, kind: str = FINISH, after: str = "",
                  not_before: float | None = None) -> Added: ...


class Outbox(DeliveryLoop):
    """The outbox in a SQLite file: the delivery loop (delivery.py) around SqliteRows."""

    def __init__(self, path: str | os.PathLike[str], send: Sender, retry: RetryPolicy, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(SqliteRows(Path(path)), send, retry, clock)


class SqliteRows:
    """The rows in one SQLite file, behind delivery.Rows; every query runs in a thread of its own."""

    errors: ClassVar[tuple[type[Exception], ...]] = (OutboxError, sqlite3.Error)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._purged_at = 0.0
        self._warned_open_to_others: set[str] = set()

    @property
    def is_open(self) -> bool:
        return self._db is not None

    async def open(self) -> Counts:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        counts = await self._run(self._open)
        log.info("outbox %s open; %s waiting for delivery", self.path,
                 ", ".join(f"{count} {kind}(s)" for kind, count in sorted(counts.waiting.items())) or "nothing")
        return counts

    async def close(self) -> None:
        if self._executor is not None:
            await self._run(self._close)
            self._executor.shutdown(wait=True)
            self._executor = None

    async def count(self, state: str) -> int:
        return await self._run(self._count, state)

    async def row(self, key: str) -> dict[str, Any] | None:
        return await self._run(self._row, key)

    async def insert(self, key: str, row: KeptRow, now: float) -> bool:
        return await self._run(self._insert_row, key, row, now)

    async def tidy(self, now: float) -> tuple[Counter[str] | None, Counter[str]] | None:
        if now - self._purged_at < PURGE_EVERY:
            return None
        await self._run(self._purge, now)
        self._purged_at = now
        # Only the failed are counted again (some were purged): the loop counts what waits, and a
        # count read here could miss a row being added meanwhile.
        return None, await self._run(self._count_by_kind, FAILED)

    async def take(self, now: float, retry: RetryPolicy) -> Entry | None:
        return await self._run(self._take_due, now, retry)

    async def due_at(self) -> tuple[float | None, float]:
        return await self._run(self._next_due), self._purged_at + PURGE_EVERY

    async def mark(self, entry: Entry, verdict: Verdict, now: float) -> list[tuple[str, str]]:
        if verdict.action == "delivered":
            await self._run(self._finish_row, entry.key, DELIVERED, now, verdict.detail)
        elif verdict.action == "wait":
            await self._run(self._reschedule, entry.key, verdict.at, verdict.detail)
        elif verdict.action == "retry":
            # The row's next attempt was set when it was taken (each attempt is counted first).
            await self._run(self._note_error, entry.key, verdict.detail)
        else:
            return await self._run(self._fail_row, entry.key, now, verdict.detail)
        return []

    def describe(self, error: Exception) -> str:
        """Why the outbox cannot store finishes, in one line."""
        if isinstance(error, OutboxError):
            return str(error)
        return f"cannot write outbox {self.path}: {error}"

    async def _run(self, function: Callable[[*_Args], _T], *args: *_Args) -> _T:
        if self._executor is None:
            raise OutboxError(f"outbox {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- in the SQLite thread ----------------------------------------------------------------

    def _open(self) -> Counts:
        """Open the file, private to this user; the rows waiting and failed in it, by kind."""
        folder = self.path.parent
        try:
            # The mode applies only to a folder made here; an existing one is checked instead.
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._check_folder(folder)
            self._lock_fd = self._take_lock()
        except OSError as error:
            raise OutboxError(f"cannot open outbox {self.path}: {error.strerror or error}") from None
        try:
            # SQLite gives the -wal and -shm files the database file's mode: create it 0600. Never
            # through a link: it would make (or chmod, below) a file wherever the link points.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
            for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                self._make_private(path)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as error:
            self._release_lock()
            detail = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise OutboxError(f"cannot open outbox {self.path}: {detail}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            for column, declaration in _ADDED_COLUMNS.items():
                if column not in present:  # a file of the first version: its rows are finishes
                    db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {declaration}")
            db.row_factory = sqlite3.Row
            counts: dict[str, Counter[str]] = {PENDING: Counter(), FAILED: Counter()}
            for state, kind, count in db.execute(
                    "SELECT state, kind, COUNT(*) FROM outbox WHERE state IN (?, ?) GROUP BY state, kind",
                    (PENDING, FAILED)):
                counts[state][kind] = count
        except sqlite3.Error as error:
            db.close()
            self._release_lock()
            raise OutboxError(f"cannot open outbox {self.path}: {error}") from None
        self._db = db
        return Counts(counts[PENDING], counts[FAILED])

    def _take_lock(self) -> int:
        """An exclusive flock on the lock file, which no other user can open (0600)."""
        lock_path = f"{self.path}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if mode & _OPEN_TO_OTHERS:
                    raise OutboxInUse(
                        f"outbox {self.path} is locked by another process: another agi-bitrix, or any local user,"
                        f" since {lock_path} is open to other users (mode {mode:04o}); if no agi-bitrix uses this"
                        " outbox, delete that file") from None
                # Two processes delivering the same rows would send finishes twice.
                raise OutboxInUse(f"outbox {self.path} is in use by another agi-bitrix process") from None
            if _identity(os.fstat(fd)) != _identity(os.stat(lock_path)):
                # Replaced (see below) by a process that now holds the new file.
                raise OutboxInUse(f"outbox {self.path} is in use by another agi-bitrix process")
            if mode & _OPEN_TO_OTHERS:
                fd = self._replace_lock(fd, lock_path, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _replace_lock(self, fd: int, lock_path: str, mode: int) -> int:
        """A private lock file in place of one other users can open, locked before anyone sees it.

        chmod would not do: a user who opened the old file keeps it open, and could take a shared
        flock on it whenever the server is not running."""
        new_fd, new_path = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.name}.lock.")
        try:
            fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(new_path, lock_path)
        except BaseException:
            os.close(new_fd)
            os.unlink(new_path)
            raise
        os.close(fd)
        log.error("outbox lock file %s was open to other users (mode %04o): any local user could keep the server"
                  " from starting; replaced it with a private one (0600)", lock_path, mode)
        return new_fd

    def _check_folder(self, folder: Path) -> None:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & _OPEN_TO_OTHERS and str(folder) not in self._warned_open_to_others:
            self._warned_open_to_others.add(str(folder))
            log.error("outbox folder %s is open to other users (mode %04o): they can see or replace the outbox's"
                      " files; make it 0700 (systemd: StateDirectoryMode=0700)", folder, mode)

    def _make_private(self, path: Path) -> None:
        try:
            status = path.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISLNK(status.st_mode):  # SQLite would open the journal through it
            raise OSError(errno.ELOOP, f"{path.name} is a symbolic link; refused")
        mode = stat.S_IMODE(status.st_mode)
        if not mode & _OPEN_TO_OTHERS:
            return
        try:
            path.chmod(0o600)
        except OSError as error:
            if str(path) not in self._warned_open_to_others:
                self._warned_open_to_others.add(str(path))
                log.error("outbox file %s is open to other users (mode %04o) and cannot be made private (%s):"
                          " its calls, users and recording URLs can be read; chmod 600 it", path, mode, error.strerror)
            return
        log.error("outbox file %s was open to other users (mode %04o); made it 0600. The calls, users and"
                  " recording URLs in it may have been read", path, mode)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the file drops the flock
            self._lock_fd = None

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"outbox {self.path} is not open")
        return self._db

    def _insert_row(self, key: str, row: KeptRow, now: float) -> bool:
        cursor = self._connection.execute(
            "INSERT OR IGNORE INTO outbox (key, params, state, queued_at, next_attempt_at, kind, after_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, row.params, PENDING, row.queued_at, max(row.not_before, now), row.kind, row.after))
        return cursor.rowcount == 1

    def _take_due(self, now: float, retry: RetryPolicy) -> Entry | None:
        with self._transaction():
            row = self._connection.execute(
                f"SELECT key, params, attempts, queued_at, kind FROM outbox WHERE {_DUE}"
                " ORDER BY next_attempt_at LIMIT 1", (PENDING, now)).fetchone()
            if row is None:
                return None
            attempt = row["attempts"] + 1
            # Counted before the request leaves: after a crash mid-request this row waits out
            # the backoff and is retried as an attempt whose outcome is unknown.
            self._connection.execute("UPDATE outbox SET attempts = ?, next_attempt_at = ? WHERE key = ?",
                                     (attempt, now + retry.delay(attempt), row["key"]))
        return Entry(row["key"], json.loads(row["params"]), attempt, row["queued_at"], row["kind"])

    def _note_error(self, key: str, detail: str) -> None:
        self._connection.execute("UPDATE outbox SET last_error = ? WHERE key = ?", (detail, key))

    def _reschedule(self, key: str, at: float, detail: str) -> None:
        self._connection.execute("UPDATE outbox SET attempts = attempts - 1, next_attempt_at = ?, last_error = ?"
                                 " WHERE key = ?", (at, detail, key))

    def _fail_row(self, key: str, now: float, detail: str) -> list[tuple[str, str]]:
        """Give a row up, and with it the pending rows that wait for it; those (key, kind)."""
        with self._transaction():
            self._finish_row(key, FAILED, now, detail)
            followers = [(row["key"], row["kind"]) for row in self._connection.execute(
                "SELECT key, kind FROM outbox WHERE after_key = ? AND state = ?", (key, PENDING))]
            self._connection.execute(
                "UPDATE outbox SET state = ?, done_at = ?, last_error = ? WHERE after_key = ? AND state = ?",
                (FAILED, now, f"not sent: {key} was not delivered ({detail})", key, PENDING))
        return followers

    def _finish_row(self, key: str, state: str, now: float, detail: str) -> None:
        # A delivery without a note keeps the error of the attempt before it, for the record.
        self._connection.execute(
            "UPDATE outbox SET state = ?, done_at = ?, last_error = COALESCE(NULLIF(?, ''), last_error)"
            " WHERE key = ?", (state, now, detail, key))

    def _next_due(self) -> float | None:
        # Rows waiting for another row are left out: they are due once it is delivered, and that
        # delivery happens in this loop, which then looks again.
        row = self._connection.execute(
            f"SELECT MIN(next_attempt_at) FROM outbox WHERE {_DUE}", (PENDING, float("inf"))).fetchone()
        return row[0]

    def _count(self, state: str) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (state,)).fetchone()[0]

    def _count_by_kind(self, state: str) -> Counter[str]:
        return Counter(dict(self._connection.execute(
            "SELECT kind, COUNT(*) FROM outbox WHERE state = ? GROUP BY kind", (state,)).fetchall()))

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


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
