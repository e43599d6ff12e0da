"""Recordings with telephony.externalCall.attachRecord: the whole server over real TCP, the portal
emulator over real HTTP, the outbox in a real SQLite file and the recording as a real file that
is still being written when the call hangs up, as MixMonitor's is."""

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from agi_bitrix.bitrix.errors import BodyTooLarge, RequestRejected, refusal
from agi_bitrix.callcard import recording
from agi_bitrix.callcard.finish import recording_key
from agi_bitrix.callcard.outbox import Entry, Outbox, Outcome, RetryPolicy
from agi_bitrix.callcard.recording import MIB, _look, recordings_folder
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM, SAMPLE_USERS
from tests.conftest import TEST_RULES, until
from tests.filesystems import NOBODY, require_root
from tests.test_callcard import FINISH, Running, delivered_finishes
from tests.test_callcard_redis import serve, text_of

ATTACH = "telephony.externalcall.attachrecord"
UNIQUEID = "1700000000.1"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 40  # ~10 kB: a few frames of sound


def recording_config(webhook_url, tmp_path, recording="", deadline=1.0, record_url="", outbox=None):
    text = textwrap.dedent(f"""\
        bitrix: {{webhook_url: "{webhook_url}", deadline: {deadline}, rate_limit: {{per_second: 1000, burst: 1000}}}}
        routing:
          fallback_queue: support
          timezone: Europe/Moscow
          rules:
        """) + textwrap.indent(TEST_RULES, "    ") + textwrap.dedent(f"""\
        users: {{refresh: 600}}
        metrics: {{listen: "off"}}
        callcard:
          outbox: {outbox or tmp_path / "outbox.sqlite3"}
          finish:
            {record_url}
            retry: {{first: 0.05, max: 0.2}}
            recording:
              file: "{tmp_path}/monitor/{{uniqueid}}.wav"
        """) + textwrap.indent(textwrap.dedent(recording), "      ")
    return parse_config(text, "recording-test.yaml")


def write_closed(path, content=WAV, age=60.0):
    """A recording MixMonitor closed `age` seconds ago."""
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    then = time.time() - age
    os.utime(path, (then, then))


async def answered_call(running, uniqueid=UNIQUEID):
    call_id = (await running.register(linkedid=uniqueid))["B24_CALL_ID"]
    await running.finish(call_id, dialstatus="ANSWER", answered_at="100.0", answered_by="101", hangup_at="130.0",
                         uniqueid=uniqueid)
    return call_id


def attached(portal, call_id):
    return portal.calls[call_id].record


async def test_an_answered_calls_recording_is_attached_after_its_finish(portal, tmp_path):
    write_closed(tmp_path / "monitor" / f"{UNIQUEID}.wav")
    running = await Running(recording_config(portal.webhook_url, tmp_path, "settle: 0.1\n")).start()
    try:
        call_id = await answered_call(running)
        await until(lambda: attached(portal, call_id), what="the recording")
        # The portal has it; the outbox writes down the delivery once the answer is read.
        await until(lambda: running.app.outbox.waiting_of("recording") == 0, what="the row's delivery")
        row = await running.app.outbox.row(f"{call_id}/recording")
        callcard = running.app.health()[1]["callcard"]
    finally:
        await running.stop()
    record = attached(portal, call_id)
    assert (record.filename, record.content) == (f"{UNIQUEID}.wav", WAV)
    # After the finish, as the docs ask: the portal attaches records to finished calls only.
    requests = [r.method for r in portal.requests if r.method in (FINISH, ATTACH)]
    assert requests == [FINISH, ATTACH]
    assert "RECORD_URL" not in delivered_finishes(portal)[0]
    assert (row["state"], row["kind"], row["attempts"]) == ("delivered", "recording", 1)
    assert (callcard["recordings_waiting"], callcard["recordings_failed"]) == (0, 0)


async def test_a_recording_still_being_written_is_sent_once_whole(portal, tmp_path):
    path = tmp_path / "monitor" / f"{UNIQUEID}.wav"
    path.parent.mkdir()
    path.write_bytes(WAV[:100])  # MixMonitor has just begun
    running = await Running(recording_config(portal.webhook_url, tmp_path, "settle: 0.4\n")).start()
    try:
        call_id = await answered_call(running)
        await until(lambda: delivered_finishes(portal), what="the finish, which does not wait for the file")
        for start in range(100, len(WAV), 2000):  # still flushing after the hangup, then the header
            await asyncio.sleep(0.15)
            with path.open("r+b") as file:
                file.seek(start)
                file.write(WAV[start:start + 2000])
        assert attached(portal, call_id) is None
        await until(lambda: attached(portal, call_id), what="the recording once it stopped changing")
        await asyncio.sleep(0.3)
    finally:
        await running.stop()
    assert attached(portal, call_id).content == WAV
    assert len(portal.requests_for(ATTACH)) == 1 and portal.calls[call_id].records_attached == 1


async def test_a_recording_that_never_appears_fails_clearly(portal, tmp_path, caplog):
    running = await Running(recording_config(portal.webhook_url, tmp_path, "settle: 0.1\nwait: 0.5\n")).start()
    try:
        call_id = await answered_call(running)
        key = f"{call_id}/recording"
        await until(lambda: running.app.outbox.failed_of("recording") == 1, what="the recording to be given up")
        row = await running.app.outbox.row(key)
        callcard = running.app.health()[1]["callcard"]
    finally:
        await running.stop()
    assert row["state"] == "failed"
    assert row["last_error"] == (f"recording {tmp_path}/monitor/{UNIQUEID}.wav did not appear within 0.5 s of the"
                                 " hangup (callcard.finish.recording.wait)")
    assert (callcard["recordings_failed"], callcard["recordings_waiting"], callcard["finishes_failed"]) == (1, 0, 0)
    assert portal.requests_for(ATTACH) == [] and delivered_finishes(portal)
    assert any(r.levelno == logging.ERROR and r.getMessage().startswith(f"recording {key} will not be delivered")
               for r in caplog.records)


async def recording_row_given_up(config):
    """One answered call whose recording fails for good: its outbox row."""
    running = await Running(config).start()
    try:
        call_id = await answered_call(running)
        await until(lambda: running.app.outbox.failed_of("recording") == 1)
        return await running.app.outbox.row(f"{call_id}/recording")
    finally:
        await running.stop()


async def test_a_recording_over_the_size_limit_is_not_read(portal, tmp_path):
    write_closed(tmp_path / "monitor" / f"{UNIQUEID}.wav")  # ~10 kB
    row = await recording_row_given_up(recording_config(portal.webhook_url, tmp_path, "settle: 0.1\nmax_size: 0.005\n"))
    assert "MiB, over callcard.finish.recording.max_size (0.005 MiB)" in row["last_error"]
    assert portal.requests_for(ATTACH) == []


async def test_a_body_over_the_portals_limit_says_what_to_do(tmp_path):
    portal = PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS, max_body=8000)
    await portal.start()
    write_closed(tmp_path / "monitor" / f"{UNIQUEID}.wav")
    try:
        row = await recording_row_given_up(recording_config(portal.webhook_url, tmp_path, "settle: 0.1\n"))
    finally:
        await portal.stop()
    assert row["last_error"].startswith("http_413: ")
    assert "lower callcard.finish.recording.max_size, or publish the recordings and use record_url" in row["last_error"]
    assert len(portal.requests_for(ATTACH)) == 0  # nginx refused it before the portal saw it


def test_a_body_too_large_is_a_class_of_its_own_among_this_requests_refusals():
    # Decided by class, not by comparing "http_413": a refusal of this request, the portal is up.
    error = refusal("http_413", "413 Request Entity Too Large")
    assert isinstance(error, BodyTooLarge) and isinstance(error, RequestRejected)
    assert not isinstance(refusal("http_400", ""), BodyTooLarge)


async def test_the_upload_has_its_own_timeout_beyond_the_lookup_deadline(portal, tmp_path):
    write_closed(tmp_path / "monitor" / f"{UNIQUEID}.wav")
    config = recording_config(portal.webhook_url, tmp_path, "settle: 0.1\ntimeout: 5\n", deadline=0.5)
    running = await Running(config).start()
    portal.fail("slow", method=ATTACH, delay=1.0, times=1)  # a big body on a slow uplink
    try:
        call_id = await answered_call(running)
        await until(lambda: attached(portal, call_id), timeout=5, what="the slow upload")
        row = await running.app.outbox.row(f"{call_id}/recording")
    finally:
        await running.stop()
    assert row["attempts"] == 1 and len(portal.requests_for(ATTACH)) == 1


async def test_the_recording_waits_for_a_held_finish_and_fails_with_a_failed_one(portal, tmp_path, caplog):
    write_closed(tmp_path / "monitor" / f"{UNIQUEID}.wav")
    write_closed(tmp_path / "monitor" / "1700000000.2.wav")
    running = await Running(recording_config(portal.webhook_url, tmp_path, "settle: 0.05\n")).start()
    try:
        portal.fail("error", method=FINISH, code="INTERNAL_SERVER_ERROR", times=3)
        held = await answered_call(running)
        await until(lambda: len(portal.requests_for(FINISH)) >= 2)
        assert portal.requests_for(ATTACH) == []  # never before its finish
        await until(lambda: attached(portal, held), what="the recording after the finish went through")

        # A finish the portal refuses for good takes its recording with it.
        portal.fail("error", method=FINISH, status=400, code="ERROR_CORE", description="User is not found or is"
                    " not active")
        refused = await answered_call(running, uniqueid="1700000000.2")
        await until(lambda: running.app.outbox.failed_of("recording") == 1)
        row = await running.app.outbox.row(f"{refused}/recording")
    finally:
        await running.stop()
    assert row["state"] == "failed" and row["last_error"].startswith(f"not sent: {refused} was not delivered (")
    assert attached(portal, refused) is None and len(portal.requests_for(ATTACH)) == 1
    assert f"recording {refused}/recording will not be delivered either: it waited for finish {refused}" in caplog.text


async def test_a_recording_waiting_for_its_file_survives_a_restart(portal, tmp_path):
    config = recording_config(portal.webhook_url, tmp_path, "settle: 0.1\n")
    running = await Running(config).start()
    call_id = await answered_call(running)
    await until(lambda: running.app.outbox.waiting_of("finish") == 0, what="the finish delivered")
    await running.stop()
    write_closed(tmp_path / "monitor" / f"{UNIQUEID}.wav")
    running = await Running(config).start()
    try:
        await until(lambda: attached(portal, call_id), what="the recording after the restart")
    finally:
        await running.stop()
    assert len(portal.requests_for(ATTACH)) == 1 and len(portal.requests_for(FINISH)) == 1


async def test_only_answered_calls_are_uploaded_and_record_url_stays_an_option(portal, tmp_path):
    write_closed(tmp_path / "monitor" / f"{UNIQUEID}.wav")
    running = await Running(recording_config(portal.webhook_url, tmp_path, "settle: 0.05\n")).start()
    try:
        call_id = (await running.register())["B24_CALL_ID"]
        await running.finish(call_id, dialstatus="NOANSWER")
        await until(lambda: delivered_finishes(portal))
        await asyncio.sleep(0.2)
        assert await running.app.outbox.row(f"{call_id}/recording") is None
    finally:
        await running.stop()
    assert portal.requests_for(ATTACH) == []
    with pytest.raises(ConfigError) as raised:
        recording_config(portal.webhook_url, tmp_path, record_url='record_url: "https://pbx/r/{recording}"')
    assert [p.key for p in raised.value.problems] == ["callcard.finish.recording.file"]
    assert "not both" in raised.value.problems[0].message


@pytest.mark.parametrize("template, message", [
    ("monitor/{uniqueid}.wav", "must be an absolute path"),
    ("/var/spool/asterisk/monitor/{uniqueid}.ogg", "must name a .wav or .mp3 file"),
    ("/var/spool/asterisk/monitor/{linkedid}.wav", "unknown field {linkedid}"),
])
def test_a_recording_path_template_is_checked(template, message):
    with pytest.raises(ConfigError) as raised:
        parse_config(textwrap.dedent(f"""\
            bitrix: {{webhook_url: "https://x.bitrix24.ru/rest/1/abc/"}}
            routing: {{fallback_queue: support}}
            callcard:
              finish:
                recording: {{file: "{template}"}}
            """), "c.yaml")
    assert message in str(raised.value.problems[0])


async def test_a_uniqueid_that_would_climb_out_of_the_folder_is_not_used(portal, tmp_path, caplog):
    running = await Running(recording_config(portal.webhook_url, tmp_path, "settle: 0.05\n")).start()
    try:
        await answered_call(running, uniqueid="../../etc/passwd")
        await until(lambda: delivered_finishes(portal))
        assert running.app.outbox.waiting_of("recording") == 0
    finally:
        await running.stop()
    assert "no recording uploaded" in caplog.text


# -- the emulator's attachRecord, as the docs describe it -----------------------------------------

async def test_the_emulator_attaches_records_only_to_finished_calls_as_documented(portal):
    call_id = portal.call_method("telephony.externalcall.register", {
        "USER_ID": "1", "PHONE_NUMBER": "79161234567", "TYPE": "2"})["result"]["CALL_ID"]
    url = f"{portal.webhook_url}telephony.externalCall.attachRecord.json"
    content = base64.b64encode(WAV).decode()

    async def attach(**params):
        async with aiohttp.ClientSession() as http, http.post(url, json={"CALL_ID": call_id, **params}) as answer:
            return answer.status, await answer.json()

    async with aiohttp.ClientSession() as http:
        assert (await attach(FILENAME="a.wav", FILE_CONTENT=content))[1]["error_description"] == (
            "Call is not found in the statistic table. It looks like it is not finished yet.")
        portal.call_method("telephony.externalcall.finish", {"CALL_ID": call_id, "USER_ID": "1"})
        assert (await attach())[1]["error_description"].startswith("Required parameters are not set")
        assert (await attach(FILENAME="a.ogg", FILE_CONTENT=content))[1]["error_description"] == (
            "Wrong file extension. Only wav and mp3 are allowed")
        assert await attach(FILENAME="a.wav", FILE_CONTENT="not base64!") == (400, {
            "error": "ERROR_CORE",
            "error_description": "File content is not properly encoded. Base64 encoding is expected."})
        status, answer = await attach(FILENAME="a.mp3", FILE_CONTENT=content)
        assert status == 200 and isinstance(answer["result"]["FILE_ID"], int)
        await attach(FILENAME="b.wav", FILE_CONTENT=base64.b64encode(b"RIFF").decode())  # replaces it
        del http
    assert (portal.calls[call_id].record.filename, portal.calls[call_id].records_attached) == ("b.wav", 2)


# -- the outbox ------------------------------------------------------------------------------------

async def test_an_outbox_file_of_the_first_version_is_read_and_extended(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE outbox (key TEXT PRIMARY KEY, params TEXT NOT NULL, state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, queued_at REAL NOT NULL, next_attempt_at REAL NOT NULL,
            done_at REAL, last_error TEXT NOT NULL DEFAULT '');
        """)
    old.execute("INSERT INTO outbox (key, params, state, queued_at, next_attempt_at) VALUES (?, ?, ?, ?, ?)",
                ("externalCall.a.1", json.dumps({"CALL_ID": "externalCall.a.1"}), "pending", 1.0, 1.0))
    old.commit()
    old.close()
    sent = []

    async def send(entry):
        sent.append((entry.kind, entry.key))
        return Outcome("delivered")

    outbox = Outbox(path, send, RetryPolicy(0.05, 0.1, 60))
    await outbox.open()
    assert outbox.waiting_of("finish") == 1
    outbox.start()
    await outbox.add("externalCall.a.1/recording", {"path": "/x.wav"}, kind="recording", after="externalCall.a.1")
    await until(lambda: len(sent) == 2)
    await outbox.close()
    assert sent == [("finish", "externalCall.a.1"), ("recording", "externalCall.a.1/recording")]


# -- files that are not a recording: a FIFO, links, another user's file -------------------------

def served_recording_config(path, webhook_url, tmp_path):
    """A config file for `agi-bitrix serve` uploading recordings from tmp_path/monitor."""
    path.write_text(textwrap.dedent(f"""\
        metrics: {{listen: "off"}}
        bitrix: {{webhook_url: "{webhook_url}", rate_limit: {{per_second: 1000, burst: 1000}}}}
        routing: {{fallback_queue: support}}
        users: {{refresh: 600}}
        callcard:
          outbox: {tmp_path / "outbox.sqlite3"}
          finish:
            retry: {{first: 0.1, max: 0.5}}
            recording: {{file: "{tmp_path}/monitor/{{uniqueid}}.wav", settle: 0.1}}
        """))
    return path


async def served_answered_call(port, uniqueid):
    """register then finish (answered, recorded) through the FastAGI server on `port`; the CALL_ID."""
    registered = await fake_call("127.0.0.1", port, script="register", uniqueid=uniqueid,
                                 args=("79161234567", "1", uniqueid, "74950000000", "CONTACT", "12"))
    call_id = registered.variables["B24_CALL_ID"]
    assert call_id, registered.variables
    await fake_call("127.0.0.1", port, script="finish", uniqueid=uniqueid,
                    args=(call_id, "1", "ANSWER", "100.0", "101", "130.0", ""))
    return call_id


async def test_a_fifo_at_the_recording_path_stalls_neither_the_outbox_nor_the_stop(portal, tmp_path):
    # A FIFO where MixMonitor's file should be: open() waited for a writer for ever, in a thread the
    # loop joins at shutdown, so the outbox delivered nothing more and SIGTERM logged "stopped" and
    # hung. Now only a regular file is read; the FIFO's recording fails, the others go on.
    (tmp_path / "monitor").mkdir()
    os.mkfifo(tmp_path / "monitor" / "1700000000.1.wav")
    config = served_recording_config(tmp_path / "agi-bitrix.yaml", portal.webhook_url, tmp_path)
    log = tmp_path / "serve.log"
    process, port = await serve(config, portal.webhook_url, log)
    try:
        fifo_call = await served_answered_call(port, "1700000000.1")
        later = []
        for index in (2, 3, 4):
            write_closed(tmp_path / "monitor" / f"1700000000.{index}.wav")
            later.append(await served_answered_call(port, f"1700000000.{index}"))
        await until(lambda: all(attached(portal, call_id) is not None for call_id in later), timeout=15,
                    what=f"the later calls' recordings:\n{text_of(log)}")
        assert len(delivered_finishes(portal)) == 4
    finally:
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            await asyncio.wait_for(process.wait(), 35)  # server.session_timeout (30 s) is the documented bound
        except TimeoutError:
            process.kill()
            raise AssertionError(f"SIGTERM did not stop the server:\n{text_of(log)}") from None
    assert time.monotonic() - started < 5  # nothing in flight: it stops at once
    assert process.returncode == 0, text_of(log)
    assert (f"recording {recording_key(fifo_call)} will not be delivered: recording {tmp_path}/monitor/"
            "1700000000.1.wav refused: it is not a regular file") in text_of(log)
    assert attached(portal, fifo_call) is None


@pytest.fixture
def shared_monitor():
    """A base folder others may enter, holding a recordings folder any local user may write in
    (root's, sticky, like /tmp) and a secret of root's beside it, as the OAuth token file is."""
    base = Path(tempfile.mkdtemp(prefix="agi-bitrix-recordings-"))
    os.chmod(base, 0o755)
    (base / "monitor").mkdir()
    os.chmod(base / "monitor", 0o1777)
    secret = base / "oauth.json"
    secret.write_text('{"refresh_token": "r-secret-token"}')
    os.chmod(secret, 0o600)
    yield base
    shutil.rmtree(base)


def as_nobody(*command):
    """Run `command` as the local user nobody, who cannot read root's secret."""
    require_root("running a process as another user")
    subprocess.run(command, user=NOBODY, cwd="/", check=True, capture_output=True)


async def failed_recording(portal, base, caplog, outbox):
    """An answered call whose recording is at base/monitor/UNIQUEID.wav: what the server logged of it."""
    running = await Running(recording_config(portal.webhook_url, base, "settle: 0.05\n", outbox=outbox)).start()
    try:
        call_id = await answered_call(running)
        await until(lambda: running.app.outbox.failed_of("recording") == 1, what="the recording refused")
        callcard = running.app.health()[1]["callcard"]
    finally:
        await running.stop()
    assert attached(portal, call_id) is None
    assert (callcard["recordings_failed"], callcard["finishes_failed"]) == (1, 0)  # shown in /healthz
    refused = [r for r in caplog.records if "will not be delivered" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.ERROR]
    return refused[0].getMessage()


async def test_a_link_another_user_made_at_the_recording_path_is_refused_not_followed(portal, shared_monitor,
                                                                                       tmp_path, caplog):
    # nobody cannot read the token file, but the server can: following the link uploaded it.
    as_nobody("ln", "-s", str(shared_monitor / "oauth.json"), str(shared_monitor / "monitor" / f"{UNIQUEID}.wav"))
    logged = await failed_recording(portal, shared_monitor, caplog, tmp_path / "outbox.sqlite3")
    assert logged.endswith(f"{UNIQUEID}.wav refused: it is a symbolic link; a recording is read only as a file"
                           f" of its own (kept in {tmp_path / 'outbox.sqlite3'})")
    assert "r-secret-token" not in caplog.text


async def test_a_file_another_user_wrote_at_the_recording_path_is_refused(portal, shared_monitor, tmp_path,
                                                                           caplog):
    as_nobody("sh", "-c", f"echo forged > {shared_monitor}/monitor/{UNIQUEID}.wav")
    os.utime(shared_monitor / "monitor" / f"{UNIQUEID}.wav", (time.time() - 60, time.time() - 60))
    logged = await failed_recording(portal, shared_monitor, caplog, tmp_path / "outbox.sqlite3")
    assert f"refused: it belongs to uid {NOBODY}, neither this server's user, root, nor the owner of" in logged


async def test_a_hard_link_at_the_recording_path_is_refused(portal, tmp_path, caplog):
    (tmp_path / "monitor").mkdir()
    secret = tmp_path / "oauth.json"
    secret.write_text('{"refresh_token": "r-secret-token"}')
    os.utime(secret, (time.time() - 60, time.time() - 60))
    os.link(secret, tmp_path / "monitor" / f"{UNIQUEID}.wav")
    logged = await failed_recording(portal, tmp_path, caplog, tmp_path / "outbox.sqlite3")
    assert "refused: it has 2 names (hard links); a recording has one" in logged


def test_a_recording_reached_through_a_linked_folder_is_refused(tmp_path):
    (tmp_path / "monitor").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write_closed(tmp_path / "elsewhere" / "x.wav")
    (tmp_path / "monitor" / "sub").symlink_to(tmp_path / "elsewhere")
    folder = recordings_folder(f"{tmp_path}/monitor/{{uniqueid}}.wav")
    look = _look(str(tmp_path / "monitor" / "sub" / "x.wav"), folder, settle=0.0, max_bytes=MIB, now=time.time())
    assert look.state == "refused"
    assert look.why == (f"it is {tmp_path}/elsewhere/x.wav, outside the recordings folder {tmp_path}/monitor"
                        " (a linked folder on the way?)")


async def test_a_hung_read_is_given_up_in_time_in_a_thread_the_stop_ignores_and_none_pile_up(monkeypatch, tmp_path):
    # A hung network file system: the look never returns. It must neither hold the outbox past
    # READ_TIMEOUT nor run in a thread that the loop's shutdown joins.
    release, threads = threading.Event(), []

    def hung_look(*args):
        threads.append(threading.current_thread())
        release.wait(10)
        raise OSError("released")

    monkeypatch.setattr(recording, "_look", hung_look)
    monkeypatch.setattr(recording, "READ_TIMEOUT", 0.2)
    settings = recording_config("https://portal.example/rest/1/code/", tmp_path).callcard.finish
    entry = Entry(recording_key("c.1"), {"path": f"{tmp_path}/monitor/1.wav", "CALL_ID": "c.1",
                                         "hangup_at": time.time()}, attempt=1, queued_at=time.time(), kind="recording")
    started = time.monotonic()
    try:
        outcome = await recording.send_recording(None, entry, settings)
        assert time.monotonic() - started < 2
        assert outcome.kind == "retry"
        assert outcome.detail == f"recording {tmp_path}/monitor/1.wav could not be read within 0.2 s"
        assert threads and threads[0].daemon
        for _ in range(recording.MAX_STUCK_READS - 1):  # retries: each read sticks as well
            await recording.send_recording(None, entry, settings)
        assert len(threads) == recording.MAX_STUCK_READS
        outcome = await recording.send_recording(None, entry, settings)
    finally:
        release.set()
    assert len(threads) == recording.MAX_STUCK_READS  # no thread more while those are stuck
    assert outcome.kind == "retry" and outcome.detail.endswith(
        f"not read: {recording.MAX_STUCK_READS} earlier reads of recordings are still stuck (a hung file system?)")
