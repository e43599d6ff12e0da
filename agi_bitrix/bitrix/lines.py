"""The configured lines made Bitrix24 external lines: telephony.externalLine.get, then add and update.

So that register's LINE_NUMBER names a line the portal knows (its reports split calls by line),
each DID of the `lines:` list (agi_bitrix.bitrix.line_settings) must be one of the application's
external lines, with the admin's name. A sync asks the portal for the application's lines
(`get`), adds the missing ones (`add`) and renames those whose name changed (`update`). It never
deletes a line: one that is not in the file (another server's, an admin's, one taken out of the
file) is left as it is.

The three methods work only in an application's context (api-reference/telephony/
telephony-external-line-{add,get,update}.md: WRONG_AUTH_TYPE through a webhook). Each request
takes a request slot only while half the burst stays free for the lookups, like user.get, and a
failure is logged and counted, never more: calls are routed and registered whatever the lines do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agi_bitrix import background
from agi_bitrix.bitrix.client import PortalClient, make_session
from agi_bitrix.bitrix.errors import BadResponse, BitrixError, NotPermitted, WrongAuthType
from agi_bitrix.bitrix.line_settings import Line
from agi_bitrix.bitrix.oauth import OAUTH_DOCS, portal_client
from agi_bitrix.bitrix.settings import BitrixSettings
from agi_bitrix.phones import normalize_number

log = logging.getLogger("agi_bitrix.lines")

LINE_GET = "telephony.externalLine.get"
LINE_ADD = "telephony.externalLine.add"
LINE_UPDATE = "telephony.externalLine.update"
# A request waits at most this long for a slot that leaves the lookups their half of the burst.
SLOT_WAIT = 5.0
# The portal's old NAME in a log line is cut to this: the portal's answer is not ours to trust.
_SHOWN_NAME = 100
# After a sync with failures, the next try; a sync that went through is not repeated.
RETRY_AFTER_FAILURE = 300.0

WEBHOOK_REFUSAL = ("telephony.externalLine.get/.add/.update work only in the context of an application"
                   " (Bitrix24's REST docs; through an inbound webhook the portal answers WRONG_AUTH_TYPE),"
                   " so the lines are not made known to the portal; use a local application in bitrix.oauth"
                   f" ({OAUTH_DOCS}). Calls are registered with their LINE_NUMBER anyway.")


@dataclass
class SyncResult:
    """One sync: what the portal had and what changed; `error` is the reason of a sync that could
    not even read the portal's lines ("" when it could)."""

    unchanged: int = 0  # configured lines the portal had already, with their name
    added: list[str] = field(default_factory=list)  # numbers
    renamed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # numbers whose add or update failed
    foreign: int = 0  # the application's lines that are not in the file: left alone
    error: str = ""
    wrong_auth_type: bool = False
    changes: list[str] = field(default_factory=list)  # one line per change or failure, as logged

    @property
    def known(self) -> int:
        """Configured lines the portal has now, with their name."""
        return self.unchanged + len(self.added) + len(self.renamed)

    @property
    def ok(self) -> bool:
        return not self.error and not self.failed

    def summary(self, configured: int) -> str:
        if self.error:
            return f"{configured} configured; the portal's lines could not be read ({self.error})"
        return (f"{configured} configured: {self.unchanged} unchanged, {len(self.added)} added,"
                f" {len(self.renamed)} renamed, {len(self.failed)} failed; {self.foreign} other line(s)"
                " of the application left alone")


class LineSync:
    def __init__(self, lines: Sequence[Line], portal: Callable[[], PortalClient], *, default_country: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`portal` gives the portal client in use (a reload may replace it)."""
        self.lines = tuple(lines)
        self.portal_source = portal
        self.default_country = default_country
        self._clock = clock
        self.last: SyncResult | None = None
        self.synced_at: float | None = None
        self.running = False
        self._task: asyncio.Task[None] | None = None

    # -- one sync ----------------------------------------------------------------------------

    async def sync(self) -> SyncResult:
        """Read the application's lines, add the missing, rename the changed; never raises a
        BitrixError: each failure is logged and in the result."""
        result = SyncResult()
        self.running = True
        try:
            try:
                present = await self._present()
            except BitrixError as error:
                result.error, result.wrong_auth_type = error.reason, isinstance(error, WrongAuthType)
                self._log_failure(LINE_GET, "", error)
                return result
            mine = {line.number for line in self.lines}
            result.foreign = sum(1 for number in present if number not in mine)
            for line in self.lines:
                await self._one(line, present.get(line.number), result)
            return result
        except Exception:
            result.error = "internal"  # a bug: its health must not say "synced"
            raise
        finally:
            self.running = False
            self.last, self.synced_at = result, self._clock()
            log.info("lines: %s", result.summary(len(self.lines)))

    async def _present(self) -> dict[str, Mapping[str, Any]]:
        """The application's lines, by their NUMBER in international digits."""
        answer = await self._call(LINE_GET, {})
        if not isinstance(answer, list):
            # Read as "no lines", it would have every line added again; the page documents a list.
            raise BadResponse("bad_result", f"{LINE_GET}: result is {type(answer).__name__}, expected a list")
        present: dict[str, Mapping[str, Any]] = {}
        for item in answer:
            if isinstance(item, Mapping):
                number = normalize_number(str(item.get("NUMBER") or ""), self.default_country)
                if number is not None:
                    present.setdefault(number, item)
        return present

    async def _one(self, line: Line, present: Mapping[str, Any] | None, result: SyncResult) -> None:
        if present is None:
            params = {"NUMBER": line.number, **({"NAME": line.name} if line.name else {})}
            method, done = LINE_ADD, result.added
            change = f"added {line.number}" + (f" ({line.name!r})" if line.name else "")
        elif line.name and str(present.get("NAME") or "") != line.name:
            # The NUMBER as the portal keeps it: update finds the line by it.
            params = {"NUMBER": str(present.get("NUMBER")), "NAME": line.name}
            method, done = LINE_UPDATE, result.renamed
            change = f"renamed {line.number} from {_shown(present.get('NAME'))} to {line.name!r}"
        else:
            result.unchanged += 1
            return
        try:
            await self._call(method, params)
        except BitrixError as error:
            result.failed.append(line.number)
            result.wrong_auth_type = result.wrong_auth_type or isinstance(error, WrongAuthType)
            result.changes.append(f"{method} {line.number} failed: {error.reason}")
            self._log_failure(method, line.number, error)
            return
        done.append(line.number)
        result.changes.append(change)
        log.info("lines: %s", change)

    async def _call(self, method: str, params: Mapping[str, Any]) -> Any:
        portal = self.portal_source()
        # Only a slot that leaves half the burst to the lookups: no caller waits for a line.
        slot = await portal.take_slot(SLOT_WAIT, can_wait=True)
        return await portal.call(method, params, slot=slot)

    def _log_failure(self, method: str, number: str, error: BitrixError) -> None:
        what = f"{method} {number}".strip()
        if isinstance(error, WrongAuthType):
            log.error("lines: %s refused: %s", what, WEBHOOK_REFUSAL)
        elif isinstance(error, NotPermitted):
            log.error("lines: %s refused (%s): the application needs the 'telephony' scope", what, error.reason)
        else:
            log.warning("lines: %s failed: %s", what, error)

    # -- in the background -------------------------------------------------------------------

    def start(self) -> None:
        """Sync once in the background, and again after a failure until one goes through;
        WRONG_AUTH_TYPE is not retried: only another kind of credentials (bitrix.oauth) fixes it.
        Without lines nothing is asked: the portal's lines are left alone."""
        if self.lines:
            self._task = asyncio.create_task(self._until_synced(), name="external lines")

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None

    async def reload(self, lines: Sequence[Line]) -> None:
        """A reloaded config's lines: synced again in the background when they changed."""
        if tuple(lines) == self.lines:
            return
        await self.close()
        self.lines, self.last, self.synced_at = tuple(lines), None, None
        self.start()

    async def _until_synced(self) -> None:
        while True:
            try:
                result = await self.sync()
                if result.ok or result.wrong_auth_type:
                    return
            except Exception:  # a bug must not end the retries unseen, nor the server's stop
                log.exception("lines: the sync failed unexpectedly; next try in %.0f s", RETRY_AFTER_FAILURE)
            await asyncio.sleep(RETRY_AFTER_FAILURE)

    def health(self) -> dict[str, Any]:
        """The lines' part of /healthz: shown, never in the status (calls do not need the lines)."""
        last = self.last
        if not self.lines:
            return {"state": "off"}
        if last is None:
            return {"state": "syncing" if self.running else "not synced yet", "configured": len(self.lines)}
        state = ("synced" if last.ok else "application only: WRONG_AUTH_TYPE" if last.wrong_auth_type
                 else "failed")
        return {"state": state, "configured": len(self.lines), "known": last.known, "added": len(last.added),
                "renamed": len(last.renamed), "failed": len(last.failed), "others_left_alone": last.foreign,
                "error": last.error or None,
                "synced_seconds_ago": None if self.synced_at is None else round(self._clock() - self.synced_at, 1)}


def _shown(name: Any) -> str:
    text = str(name or "")
    return repr(text[:_SHOWN_NAME]) + ("..." if len(text) > _SHOWN_NAME else "")


async def sync_once(bitrix: BitrixSettings, lines: Sequence[Line], default_country: str) -> SyncResult:
    """One sync with a portal client of its own (`agi-bitrix lines sync`)."""
    async with make_session(pool_size=1) as session:
        portal = portal_client(bitrix, session)
        return await LineSync(lines, lambda: portal, default_country=default_country).sync()
