"""Recordings: telephony.externalCall.attachRecord with the file MixMonitor wrote, through the outbox.

Bitrix24's REST docs (api-reference/telephony/telephony-external-call-attach-record.md) mark
finish's RECORD_URL as superseded by attachRecord, which takes the file itself (FILENAME and
FILE_CONTENT in base64) and only for a call that was finished: the portal looks the call up in
the statistics finish writes. So a recording is an outbox row of its own, queued with the finish
and sent only once that finish is delivered (and failed with it). Calling attachRecord again
replaces the call's record, so an attempt repeated after a lost answer does no harm.

When is the file complete? The finish runs in the caller's hangup handler, while MixMonitor may
still be writing: it flushes its last frames and, for WAV, rewrites the header when it closes the
file, a moment after the hangup (later still when MixMonitor's own command converts it to MP3).
The finish (callcard/finish.py) queues the row, with the file's path from
callcard.finish.recording.file. The file counts as closed once it has not been modified for
`recording.settle` seconds. Every write, the header's included, moves the modification time,
so one look at the file says it, without a second process (a watch needs inotify; asking
whether Asterisk holds the file open needs its rights), and it survives a restart. A file that
has not appeared, or is still being written, `recording.wait` seconds after the hangup fails the
row: logged, counted and kept in the outbox.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import BitrixError, BodyTooLarge
from agi_bitrix.callcard.outbox import Entry, Outcome
from agi_bitrix.callcard_settings import FinishSettings

log = logging.getLogger("agi_bitrix.callcard")

ATTACH_RECORD = "telephony.externalCall.attachRecord"
EXTENSIONS = (".wav", ".mp3")  # what attachRecord takes
MIB = 1024 * 1024
# A look at the file (open, stat, read up to recording.max_size) that takes longer than this is
# abandoned and tried again later: a local disk reads 200 MiB in a second or two, only a hung
# network file system takes this long.
READ_TIMEOUT = 30.0
# Reads still stuck past READ_TIMEOUT (threads cannot be stopped) before no new one is started:
# retries on a hung file system must not pile up threads.
MAX_STUCK_READS = 4
_READ_THREAD = "recording-read"
# O_NONBLOCK: opening a FIFO must not wait for a writer (a FIFO at the path stalled the outbox for
# good). O_NOFOLLOW: a symbolic link at the path is refused, not followed to whatever it names (the
# OAuth token file, uploaded to the portal). O_NOCTTY: a terminal device never becomes ours.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
T = TypeVar("T")


@dataclass(frozen=True)
class _Look:
    """What the file looks like now: missing, still being written, too large, not a recording
    we may read (`refused`, with why), or read."""

    state: str  # "missing", "writing", "too_large", "refused", "ready"
    size: int = 0
    quiet_since: float = 0.0  # its modification time
    content: str = ""  # base64, when ready
    why: str = ""  # when refused


def recordings_folder(template: str) -> str:
    """The folder callcard.finish.recording.file names before its first {field}: every recording
    must be a file in it (or below it), whatever links are on the way."""
    return os.path.dirname(template.split("{", 1)[0])


def _look(path: str, folder: str, settle: float, max_bytes: int, now: float) -> _Look:
    """Runs in a worker thread: reading megabytes must not hold the event loop."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return _Look("missing")
    except OSError as error:
        if error.errno == errno.ELOOP:
            return _Look("refused", why="it is a symbolic link; a recording is read only as a file of its own")
        if error.errno == errno.ENXIO:
            return _Look("refused", why="it is a socket, not a regular file")
        raise
    try:
        before = os.fstat(fd)
        why = _refusal(fd, before, folder)
        if why:
            return _Look("refused", why=why)
        if before.st_size > max_bytes:
            return _Look("too_large", before.st_size)
        if now - before.st_mtime < settle:
            return _Look("writing", before.st_size, before.st_mtime)
        data = _read(fd, max_bytes + 1)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        return _Look("too_large", len(data))
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(data) != after.st_size:
        return _Look("writing", after.st_size, after.st_mtime)  # written to while we read it
    return _Look("ready", len(data), before.st_mtime, base64.b64encode(data).decode("ascii"))


def _refusal(fd: int, opened: os.stat_result, folder: str) -> str:
    """Why the opened file is not a recording this server may send to the portal, or ""."""
    if not stat.S_ISREG(opened.st_mode):
        return f"it is not a regular file (mode {stat.filemode(opened.st_mode)}); a FIFO or device is never read"
    if opened.st_nlink != 1:
        # A hard link is another name for a file that may be anything (fs.protected_hardlinks
        # is not set everywhere); MixMonitor's files have one name.
        return f"it has {opened.st_nlink} names (hard links); a recording has one"
    real_folder = os.path.realpath(folder)
    real_path = _real_path(fd)
    if real_path is not None and not real_path.startswith(real_folder.rstrip(os.sep) + os.sep):
        return f"it is {real_path}, outside the recordings folder {real_folder} (a linked folder on the way?)"
    owners = {0, os.geteuid(), os.stat(real_folder).st_uid}
    if opened.st_uid not in owners:
        return (f"it belongs to uid {opened.st_uid}, neither this server's user, root, nor the owner of"
                f" {real_folder}")
    return ""


def _real_path(fd: int) -> str | None:
    """Where the opened file really is (Linux names it in /proc); None where that cannot be told."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _read(fd: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, MIB))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


async def _in_own_thread(function: Callable[..., T], *args: Any, timeout: float) -> T:
    """`function(*args)` in a daemon thread of its own, waited for at most `timeout` seconds.
    Not asyncio.to_thread: the default executor's threads are joined when the loop shuts down,
    so one stuck in a read (a hung network file system) would keep the server from stopping.
    A stuck daemon thread is left behind and ends with the process."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if answer.done():  # given up on (timed out, or the server stopping)
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as raised:  # handed to the waiting coroutine, never lost here
            result, error = None, raised
        with contextlib.suppress(RuntimeError):  # the loop closed while this thread was stuck
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=_READ_THREAD, daemon=True).start()
    return await asyncio.wait_for(answer, timeout)


async def _look_in_time(path: str, settings: FinishSettings, now: float) -> _Look | Outcome:
    """A look at the file, or the retry for a look that could not be had (in time)."""
    stuck = sum(thread.name == _READ_THREAD for thread in threading.enumerate())
    if stuck >= MAX_STUCK_READS:
        return Outcome("retry", f"recording {path} not read: {stuck} earlier reads of recordings are still stuck"
                                " (a hung file system?)")
    try:
        return await _in_own_thread(_look, path, recordings_folder(settings.recording_file), settings.recording_settle,
                                    int(settings.recording_max_size * MIB), now, timeout=READ_TIMEOUT)
    except TimeoutError:  # before OSError, of which it is one
        return Outcome("retry", f"recording {path} could not be read within {READ_TIMEOUT:g} s")
    except OSError as error:
        # Unreadable (permissions) is for an admin to fix: held like a portal refusal, until given up.
        return Outcome("retry", f"cannot read recording {path}: {error.strerror or error}")


async def send_recording(portal: PortalClient, entry: Entry, settings: FinishSettings,
                         clock: Callable[[], float] = time.time) -> Outcome:
    """Upload one queued recording once its file is complete; tell the outbox what came of it."""
    params: dict[str, Any] = entry.params
    path, call_id, hangup_at = str(params["path"]), str(params["CALL_ID"]), float(params["hangup_at"])
    filename = os.path.basename(path)
    if not filename.lower().endswith(EXTENSIONS):
        return Outcome("failed", f"{filename}: attachRecord takes only .wav and .mp3 recordings")
    now = clock()
    look = await _look_in_time(path, settings, now)
    if isinstance(look, Outcome):
        return look
    if look.state == "refused":
        # Not MixMonitor's file: something a local user put there. Never read, never sent.
        return Outcome("failed", f"recording {path} refused: {look.why}")
    if look.state == "too_large":
        return Outcome("failed", f"recording {path} is {look.size / MIB:.1f} MiB, over callcard.finish.recording"
                                 f".max_size ({settings.recording_max_size:g} MiB)")
    if look.state != "ready":
        give_up_at = hangup_at + settings.recording_wait
        if now >= give_up_at:
            what = "did not appear" if look.state == "missing" else "was still being written"
            return Outcome("failed", f"recording {path} {what} within {settings.recording_wait:g} s of the hangup"
                                     " (callcard.finish.recording.wait)")
        if look.state == "missing":
            retry_at, detail = now + settings.recording_settle, f"waiting for recording {path} to appear"
        else:
            retry_at, detail = look.quiet_since + settings.recording_settle, f"recording {path} is being written"
        return Outcome("wait", detail, min(max(retry_at, now + 0.05), give_up_at))
    try:
        # Like a finish, it only takes a request slot that is free now; megabytes need more than
        # a lookup's deadline to travel.
        await portal.call(ATTACH_RECORD, {"CALL_ID": call_id, "FILENAME": filename, "FILE_CONTENT": look.content},
                          json_body=True, max_wait=0.0, timeout=settings.recording_timeout, large_body=True)
    except BitrixError as error:
        detail = f"{error.reason}: {error.detail}"
        if error.retry_later:
            return Outcome("retry", detail)
        if isinstance(error, BodyTooLarge):
            detail += (f"; the portal takes no body this large ({look.size / MIB:.1f} MiB, a third more in base64):"
                       " lower callcard.finish.recording.max_size, or publish the recordings and use record_url")
        return Outcome("failed", detail)
    log.info("recording %s attached to %s (%.1f MiB, attempt %d)", filename, call_id, look.size / MIB, entry.attempt)
    return Outcome("delivered")
