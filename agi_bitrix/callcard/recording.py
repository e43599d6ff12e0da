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
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.callcard.finish import RETRYABLE
from agi_bitrix.callcard.outbox import Entry, Outcome
from agi_bitrix.config import FinishSettings

log = logging.getLogger("agi_bitrix.callcard")

ATTACH_RECORD = "telephony.externalCall.attachRecord"
EXTENSIONS = (".wav", ".mp3")  # what attachRecord takes
MIB = 1024 * 1024


@dataclass(frozen=True)
class _Look:
    """What the file looks like now: missing, still being written, too large, or read."""

    state: str  # "missing", "writing", "too_large", "ready"
    size: int = 0
    quiet_since: float = 0.0  # its modification time
    content: str = ""  # base64, when ready


def _look(path: str, settle: float, max_bytes: int, now: float) -> _Look:
    """Runs in a worker thread: reading megabytes must not hold the event loop."""
    try:
        before = os.stat(path)
    except FileNotFoundError:
        return _Look("missing")
    if before.st_size > max_bytes:
        return _Look("too_large", before.st_size)
    if now - before.st_mtime < settle:
        return _Look("writing", before.st_size, before.st_mtime)
    with open(path, "rb") as file:
        data = file.read(max_bytes + 1)
        after = os.fstat(file.fileno())
    if len(data) > max_bytes:
        return _Look("too_large", len(data))
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(data) != after.st_size:
        return _Look("writing", after.st_size, after.st_mtime)  # written to while we read it
    return _Look("ready", len(data), before.st_mtime, base64.b64encode(data).decode("ascii"))


async def send_recording(portal: PortalClient, entry: Entry, settings: FinishSettings,
                         clock: Callable[[], float] = time.time) -> Outcome:
    """Upload one queued recording once its file is complete; tell the outbox what came of it."""
    params: dict[str, Any] = entry.params
    path, call_id, hangup_at = str(params["path"]), str(params["CALL_ID"]), float(params["hangup_at"])
    filename = os.path.basename(path)
    if not filename.lower().endswith(EXTENSIONS):
        return Outcome("failed", f"{filename}: attachRecord takes only .wav and .mp3 recordings")
    max_bytes = int(settings.recording_max_size * MIB)
    now = clock()
    try:
        look = await asyncio.to_thread(_look, path, settings.recording_settle, max_bytes, now)
    except OSError as error:
        # Unreadable (permissions) is for an admin to fix: held like a portal refusal, until given up.
        return Outcome("retry", f"cannot read recording {path}: {error.strerror or error}")
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
        if isinstance(error, RETRYABLE):
            return Outcome("retry", detail)
        if error.reason == "http_413":
            detail += (f"; the portal takes no body this large ({look.size / MIB:.1f} MiB, a third more in base64):"
                       " lower callcard.finish.recording.max_size, or publish the recordings and use record_url")
        return Outcome("failed", detail)
    log.info("recording %s attached to %s (%.1f MiB, attempt %d)", filename, call_id, look.size / MIB, entry.attempt)
    return Outcome("delivered")
