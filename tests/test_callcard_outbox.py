"""The outbox on its own: a real SQLite file, a scripted sender and a clock the test moves."""

import asyncio
import sqlite3

import pytest

from agi_bitrix.callcard.outbox import DELIVERED_RETENTION, Entry, Outbox, OutboxError, Outcome, RetryPolicy


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
        assert await outbox.add("call-1", {"CALL_ID": "call-1", "DURATION": 5}) is True
        assert await outbox.add("call-1", {"CALL_ID": "call-1", "DURATION": 7}) is False
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
