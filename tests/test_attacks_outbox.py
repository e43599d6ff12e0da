"""Attacks on the SQLite outbox's folder and files that no other file tries; see docs/security.md."""

import os

import pytest

from agi_bitrix.callcard.outbox import Outbox, OutboxError, RetryPolicy
from tests.test_callcard_outbox import ScriptedSender


async def test_a_link_planted_at_the_lock_file_is_refused_and_its_target_untouched(tmp_path):
    """A symbolic link at FILE.lock (to the OAuth token file, say) is never opened, created through
    or locked: the outbox does not open, and says so in one line (the call card is down, calls go on)."""
    target = tmp_path / "oauth.json"
    target.write_text('{"refresh_token": "refresh-secret"}')
    target.chmod(0o640)
    (tmp_path / "o.sqlite3.lock").symlink_to(target)
    dangling = tmp_path / "other"
    dangling.mkdir()
    (dangling / "o.sqlite3.lock").symlink_to(tmp_path / "created-through-the-link")
    for folder in (tmp_path, dangling):
        with pytest.raises(OutboxError, match=f"cannot open outbox {folder}/o.sqlite3: "):
            await Outbox(folder / "o.sqlite3", ScriptedSender(), RetryPolicy()).open()
    assert target.read_text() == '{"refresh_token": "refresh-secret"}' and os.stat(target).st_mode & 0o777 == 0o640
    assert not (tmp_path / "created-through-the-link").exists()


@pytest.mark.parametrize("name", ["o.sqlite3", "o.sqlite3-wal", "o.sqlite3-shm"])
async def test_a_link_planted_at_the_database_or_its_journal_is_refused_and_its_target_untouched(tmp_path, name):
    """Whoever can write in the folder (it must be 0700; an ERROR says when it is not) could plant a
    link there: the server must neither chmod the link's target nor create a database through it."""
    target = tmp_path / "elsewhere" / "file"
    target.parent.mkdir()
    target.write_text("not the outbox's")
    target.chmod(0o644)
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    (folder / name).symlink_to(target)
    with pytest.raises(OutboxError, match=f"cannot open outbox {folder}/o.sqlite3: "):
        await Outbox(folder / "o.sqlite3", ScriptedSender(), RetryPolicy()).open()
    assert target.read_text() == "not the outbox's" and os.stat(target).st_mode & 0o777 == 0o644
    target.unlink()  # dangling now: nothing may be created where it points
    with pytest.raises(OutboxError, match=f"cannot open outbox {folder}/o.sqlite3: "):
        await Outbox(folder / "o.sqlite3", ScriptedSender(), RetryPolicy()).open()
    assert not target.exists()
