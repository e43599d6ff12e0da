"""The outbox on its own: a real SQLite file, a scripted sender and a clock the test moves."""

import asyncio
import fcntl
import os
import shutil
import sqlite3
import stat
import tempfile
from pathlib import Path

import pytest

from agi_bitrix.callcard import delivery
from agi_bitrix.callcard.delivery import Verdict, judge
from agi_bitrix.callcard.outbox import (
    DELIVERED_RETENTION,
    Entry,
    Outbox,
    OutboxError,
    OutboxInUse,
    Outcome,
    RetryPolicy,
)
from tests.filesystems import NOBODY, require_root


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


class ScriptedSender:
    """Answers each attempt with the next scripted outcome (then `delivered`), recording it."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.attempts: list[Entry] = []
        self.sent = asyncio.Event()

    async def __call__(self, entry):
        self.attempts.append(entry)
        self.sent.set()
        outcome = self.outcomes.pop(0) if self.outcomes else Outcome("delivered")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


RETRY = RetryPolicy(first_delay=10, max_delay=40, give_up_after=100)


async def opened(path, sender, clock, retry=RETRY):
    outbox = Outbox(path, sender, retry, clock=clock)
    await outbox.open()
    outbox.start()
    return outbox


async def settle():
    for _ in range(20):
        await asyncio.sleep(0.01)


def test_backoff_doubles_up_to_the_maximum():
    retry = RetryPolicy(first_delay=5, max_delay=60)
    assert [retry.delay(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert retry.delay(10_000) == 60


async def test_an_added_entry_is_delivered_and_a_second_add_is_ignored(tmp_path):
    sender, clock = ScriptedSender(), Clock()
    outbox = await opened(tmp_path / "o.sqlite3", sender, clock)
    try:
        assert await outbox.add("call-1", {"CALL_ID": "call-1", "DURATION": 5}) == "stored"
        assert await outbox.add("call-1", {"CALL_ID": "call-1", "DURATION": 7}) == "duplicate"
        await settle()
        assert [(e.key, e.params, e.attempt) for e in sender.attempts] == [
            ("call-1", {"CALL_ID": "call-1", "DURATION": 5}, 1)]
        row = await outbox.row("call-1")
        assert (row["state"], row["attempts"], row["done_at"]) == ("delivered", 1, clock.now)
    finally:
        await outbox.close()


async def test_failures_are_retried_with_backoff_and_pause_the_whole_queue(tmp_path):
    sender, clock = ScriptedSender(Outcome("retry", "connect"), Outcome("retry", "timeout")), Clock()
    outbox = await opened(tmp_path / "o.sqlite3", sender, clock)
    try:
        await outbox.add("a", {})
        await outbox.add("b", {})
        await settle()
        # "a" failed: nothing else is tried until its backoff has passed.
        assert [e.key for e in sender.attempts] == ["a"]
        clock.now += 9.9
        await settle()
        assert len(sender.attempts) == 1
        clock.now += 0.2
        await outbox.add("c", {})  # wakes the loop, as any add does
        await settle()
        # "b" (due since the start) went next and failed; then the pause is 10 s again.
        assert [e.key for e in sender.attempts] == ["a", "b"]
        clock.now += 10.1
        await outbox.add("d", {})
        await settle()
        # Once the pause is over, every due entry goes, the longest waiting first.
        assert [(e.key, e.attempt) for e in sender.attempts] == [
            ("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2), ("d", 1)]
        assert await outbox.count("pending") == 0 and await outbox.count("delivered") == 4
        assert (await outbox.row("a"))["last_error"] == "connect"
    finally:
        await outbox.close()


async def test_a_permanent_failure_is_kept_and_not_retried(tmp_path, caplog):
    sender, clock = ScriptedSender(Outcome("failed", "ERROR_CORE: Call is not found")), Clock()
    outbox = await opened(tmp_path / "o.sqlite3", sender, clock)
    try:
        await outbox.add("x", {"CALL_ID": "x"})
        await settle()
        clock.now += 1000
        await outbox.add("y", {})
        await settle()
        assert [e.key for e in sender.attempts] == ["x", "y"]
        row = await outbox.row("x")
        assert (row["state"], row["last_error"]) == ("failed", "ERROR_CORE: Call is not found")
        assert "finish x will not be delivered: ERROR_CORE: Call is not found" in caplog.text
    finally:
        await outbox.close()


async def test_retrying_stops_after_give_up_after(tmp_path):
    sender, clock = ScriptedSender(*[Outcome("retry", "connect")] * 10), Clock()
    outbox = await opened(tmp_path / "o.sqlite3", sender, clock)
    try:
        await outbox.add("x", {})
        for _ in range(8):
            await settle()
            clock.now += 40
            await outbox.add(f"wake-{clock.now}", {})
        row = await outbox.row("x")
        assert row["state"] == "failed" and row["last_error"].startswith("gave up after 3 attempts in 120 s: connect")
    finally:
        await outbox.close()


async def test_a_pending_entry_survives_a_restart_and_is_delivered_once(tmp_path):
    path, clock = tmp_path / "o.sqlite3", Clock()
    first = ScriptedSender(Outcome("retry", "http_502"))
    outbox = await opened(path, first, clock)
    await outbox.add("x", {"CALL_ID": "x"})
    await settle()
    await outbox.close()

    clock.now += 10
    second = ScriptedSender()
    outbox = await opened(path, second, clock)
    try:
        await settle()
        assert [(e.key, e.params, e.attempt) for e in second.attempts] == [("x", {"CALL_ID": "x"}, 2)]
        await outbox.close()
        third = ScriptedSender()
        outbox = await opened(path, third, clock)
        await settle()
        assert third.attempts == []
    finally:
        await outbox.close()


async def test_an_attempt_cut_short_by_a_crash_is_counted_and_retried_after_the_backoff(tmp_path):
    path, clock = tmp_path / "o.sqlite3", Clock()

    class Hanging:
        async def __call__(self, entry):
            await asyncio.Event().wait()

    outbox = await opened(path, Hanging(), clock)
    await outbox.add("x", {})
    await settle()
    await outbox.close()  # the request was in flight: its outcome is unknown

    sender = ScriptedSender()
    outbox = await opened(path, sender, clock)
    try:
        await settle()
        assert sender.attempts == []  # not before the backoff of the unknown attempt
        clock.now += 10
        await outbox.add("wake", {})
        await settle()
        assert [(e.key, e.attempt) for e in sender.attempts] == [("x", 2), ("wake", 1)]
    finally:
        await outbox.close()


async def test_a_sender_bug_keeps_the_entry(tmp_path):
    sender, clock = ScriptedSender(RuntimeError("bug")), Clock()
    outbox = await opened(tmp_path / "o.sqlite3", sender, clock)
    try:
        await outbox.add("x", {})
        await settle()
        row = await outbox.row("x")
        assert (row["state"], row["last_error"]) == ("pending", "internal: RuntimeError")
    finally:
        await outbox.close()


async def test_a_second_process_cannot_use_the_same_outbox(tmp_path):
    path = tmp_path / "o.sqlite3"
    outbox = await opened(path, ScriptedSender(), Clock())
    try:
        with pytest.raises(OutboxError, match="in use by another agi-bitrix process"):
            await Outbox(path, ScriptedSender(), RetryPolicy()).open()
    finally:
        await outbox.close()
    other = Outbox(path, ScriptedSender(), RetryPolicy())
    await other.open()  # free again once the first one closed
    await other.close()


async def test_an_unusable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutboxError, match=f"cannot open outbox {blocker}/o.sqlite3"):
        await Outbox(blocker / "o.sqlite3", ScriptedSender(), RetryPolicy()).open()


async def test_the_file_is_wal_and_old_delivered_rows_are_purged(tmp_path):
    path, clock = tmp_path / "o.sqlite3", Clock()
    sender = ScriptedSender(Outcome("failed", "ERROR_ARGUMENT"))
    outbox = await opened(path, sender, clock)
    try:
        await outbox.add("failed-one", {})
        await outbox.add("old", {})
        await settle()
    finally:
        await outbox.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    clock.now += DELIVERED_RETENTION + 1
    outbox = await opened(path, ScriptedSender(), clock)
    try:
        await settle()
        assert await outbox.row("old") is None
        assert (await outbox.row("failed-one"))["state"] == "failed"  # kept for the admin
    finally:
        await outbox.close()


# -- privacy: the rows name calls, users and recording URLs ----------------------------------


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def outbox_files(path):
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")]


@pytest.fixture
def umask_022():
    """The usual umask, under which the outbox used to come out 0644 in a 0755 folder."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


async def test_the_folder_and_every_file_are_private(tmp_path, umask_022):
    path = tmp_path / "state" / "o.sqlite3"
    outbox = await opened(path, ScriptedSender(), Clock())
    try:
        await outbox.add("x", {"RECORD_URL": "https://pbx.example.com/r.wav?token=secret"})
        assert mode(path.parent) == 0o700
        assert {file.name: mode(file) for file in outbox_files(path)} == {
            file.name: 0o600 for file in outbox_files(path)}
    finally:
        await outbox.close()


async def test_an_outbox_left_open_to_others_is_made_private_and_its_lock_cannot_be_held_against_us(
        tmp_path, umask_022, caplog):
    # As an older version left it: 0644 files in a 0755 folder. A local user opened the lock
    # file back then and keeps it open (simulated by this process: a second open file of it).
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    path = folder / "o.sqlite3"
    sqlite3.connect(path).close()
    (folder / "o.sqlite3.lock").touch(mode=0o644)
    other_users_file = os.open(folder / "o.sqlite3.lock", os.O_RDONLY)
    try:
        outbox = await opened(path, ScriptedSender(), Clock())
        await outbox.close()
        assert {file.name: mode(file) for file in outbox_files(path) if file.exists()} == {
            "o.sqlite3": 0o600, "o.sqlite3.lock": 0o600}
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any(f"outbox folder {folder} is open to other users (mode 0755)" in e for e in errors), errors
        assert any(f"outbox file {path} was open to other users (mode 0644); made it 0600" in e for e in errors)
        assert any(f"outbox lock file {path}.lock was open to other users (mode 0644)" in e for e in errors)
        # The user now takes a shared lock on what they hold: the server still starts.
        fcntl.flock(other_users_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        outbox = await opened(path, ScriptedSender(), Clock())
        await outbox.close()
    finally:
        os.close(other_users_file)


async def test_a_lock_held_while_the_lock_file_is_open_to_others_names_both_causes(tmp_path, umask_022):
    path = tmp_path / "o.sqlite3"
    lock = tmp_path / "o.sqlite3.lock"
    lock.touch(mode=0o644)
    holder = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH | fcntl.LOCK_NB)
        with pytest.raises(OutboxInUse, match=f"is locked by another process: another agi-bitrix, or any local"
                                              f" user, since {lock} is open to other users .mode 0644.; if no"
                                              " agi-bitrix uses this outbox, delete that file"):
            await Outbox(path, ScriptedSender(), RetryPolicy()).open()
    finally:
        os.close(holder)


HOLD_WHAT_YOU_CAN = """\
import fcntl, os, sys
held = []
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        continue
    held.append(path)
print(" ".join(held), flush=True)
sys.stdin.read()
"""


async def test_another_local_user_can_neither_read_nor_lock_the_outbox(umask_022):
    # A real other user (nobody) takes a shared flock on every outbox path it can open, as the
    # attack did; the folder is 0755 as systemd's StateDirectory makes it by default.
    require_root("running a process as another user")
    # The venv's interpreter lives where nobody may go; the system's is the one a local user has.
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python is not None, "no system python3 for the other user to run"
    base = Path(tempfile.mkdtemp(prefix="agi-bitrix-outbox-"))
    try:
        os.chmod(base, 0o755)
        folder = base / "state"
        folder.mkdir(mode=0o755)
        path = folder / "o.sqlite3"
        outbox = await opened(path, ScriptedSender(), Clock())
        await outbox.add("x", {})
        await outbox.close()
        paths = [str(folder), *(str(file) for file in outbox_files(path))]
        attacker = await asyncio.create_subprocess_exec(
            python, "-c", HOLD_WHAT_YOU_CAN, *paths, user=NOBODY, cwd="/",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        try:
            held = (await asyncio.wait_for(attacker.stdout.readline(), 10)).decode().split()
            assert held == [str(folder)]  # the folder only, which the server does not lock
            outbox = await opened(path, ScriptedSender(), Clock())
            await outbox.close()
        finally:
            attacker.kill()
            await attacker.wait()
    finally:
        shutil.rmtree(base)


# -- when the file cannot take a finish --------------------------------------------------------


async def test_finishes_are_kept_in_memory_while_the_folder_cannot_be_used_and_stored_once_it_can(tmp_path, caplog):
    blocker = tmp_path / "state"
    blocker.write_text("")  # a file where the folder should be
    sender, clock = ScriptedSender(), Clock()
    outbox = Outbox(blocker / "o.sqlite3", sender, RETRY, clock=clock)
    await outbox.open_or_retry_later()
    outbox.start()
    try:
        assert outbox.problem == f"cannot open outbox {blocker}/o.sqlite3: File exists"
        assert await outbox.add("a", {"n": 1}) == "kept"
        assert await outbox.add("a", {"n": 2}) == "duplicate"
        assert (outbox.kept, outbox.waiting, sender.attempts) == (1, 0, [])
        clock.now += 10
        await outbox.add("b", {"n": 3})
        await settle()
        assert outbox.kept == 2  # still down: tried again, not logged again
        down = [r for r in caplog.records if r.getMessage().startswith("call card is DOWN")]
        assert len(down) == 1 and down[0].levelname == "ERROR"
        blocker.unlink()
        clock.now += 10
        outbox._wake.set()  # the test's clock moved: wake the loop as time passing would
        await settle()
        assert (outbox.problem, outbox.kept) == ("", 0)
        assert [(e.key, e.params, e.attempt) for e in sender.attempts] == [("a", {"n": 1}, 1), ("b", {"n": 3}, 1)]
        assert (await outbox.row("a"))["queued_at"] == clock.now - 20  # when it was asked for
    finally:
        await outbox.close()


async def test_past_the_memory_bound_a_finish_is_lost_loudly_and_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(delivery, "MAX_KEPT", 2)
    blocker = tmp_path / "state"
    blocker.write_text("")
    outbox = Outbox(blocker / "o.sqlite3", ScriptedSender(), RETRY, clock=Clock())
    await outbox.open_or_retry_later()
    assert [await outbox.add(key, {}) for key in "abc"] == ["kept", "kept", "lost"]
    assert (outbox.kept, outbox.lost) == (2, 1)
    assert any(r.levelname == "ERROR" and r.getMessage().startswith("finish c is LOST") for r in caplog.records)
    await outbox.close()  # still down: the two kept are lost too, each logged
    assert (outbox.kept, outbox.lost) == (0, 3)
    assert sum(r.getMessage().startswith(("finish a is LOST", "finish b is LOST")) for r in caplog.records) == 2


# -- the delivery policy alone (callcard/delivery.py's judge: pure, shared by both stores) -----------

@pytest.mark.parametrize("outcome, now, verdict", [
    (Outcome("delivered", "note"), 100.0, Verdict("delivered", "note")),
    (Outcome("wait", "being written", retry_at=130.0), 100.0, Verdict("wait", "being written", at=130.0)),
    # The third attempt failed for now: 5 s doubled twice, and every row waits that long.
    (Outcome("retry", "timeout"), 100.0, Verdict("retry", "timeout", at=120.0, delay=20.0)),
    (Outcome("retry", "timeout"), 90.0 + 86400, Verdict("failed", "gave up after 3 attempts in 86400 s: timeout")),
    (Outcome("failed", "ERROR_CORE: bad"), 100.0, Verdict("failed", "ERROR_CORE: bad")),
])
def test_the_judge_of_an_attempt(outcome, now, verdict):
    entry = Entry("k", {}, attempt=3, queued_at=90.0)
    assert judge(entry, outcome, now, RetryPolicy(first_delay=5, max_delay=600, give_up_after=86400)) == verdict


def test_down_is_said_once_at_error_however_the_reason_changes_meanwhile(tmp_path, caplog):
    """A restarting Redis answers "closed by server", then "reset by peer": one change, one ERROR."""
    outbox = Outbox(tmp_path / "o.sqlite3", ScriptedSender(), RETRY, clock=Clock())
    outbox._storage_failed("cannot use outbox: ConnectionError: Connection closed by server.")
    outbox._storage_failed("cannot use outbox: ConnectionError: Connection reset by peer")
    outbox._storage_failed("cannot use outbox: ConnectionError: Connection reset by peer")
    assert [r.levelname for r in caplog.records if r.name == "agi_bitrix.outbox"] == ["ERROR", "WARNING"]
    assert outbox.problem.endswith("reset by peer")
