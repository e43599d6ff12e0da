"""Recent portal answers per normalised number.

A fresh answer (younger than its TTL: found and not-found have their own) spares the portal a
request. An older one, up to `stale_for`, is kept for the day the portal fails: routing by
what the CRM said ten minutes ago beats sending every caller to the queue. The number of
entries is bounded; the least recently used go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.bitrix.settings import CacheSettings


class AnswerCache:
    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._entries: OrderedDict[str, tuple[CrmAnswer, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def reconfigure(self, settings: CacheSettings) -> None:
        """New cache settings on reload; the answers are kept (a smaller max_entries evicts on the next store)."""
        self.settings = settings

    def fresh(self, phone: str, max_age: float | None = None) -> CrmAnswer | None:
        """A fresh answer; with `max_age`, only one stored at most that long ago (a near-cache in
        front of the answers shared by servers, agi_bitrix.bitrix.shared)."""
        entry = self._entries.get(phone)
        if entry is None:
            return None
        answer, stored_at = entry
        ttl = self.settings.found_ttl if answer.status == "FOUND" else self.settings.not_found_ttl
        if max_age is not None:
            ttl = min(ttl, max_age)
        if self._clock() - stored_at >= ttl:
            return None
        self._entries.move_to_end(phone)
        return answer

    def stale(self, phone: str) -> CrmAnswer | None:
        """An answer of any age up to `stale_for`, for when the portal cannot be asked."""
        entry = self._entries.get(phone)
        if entry is None:
            return None
        answer, stored_at = entry
        if self._clock() - stored_at > self.settings.stale_for:
            del self._entries[phone]
            return None
        return answer

    def store(self, phone: str, answer: CrmAnswer, age: float = 0.0) -> None:
        """Keep `answer`, given `age` seconds ago (by another server: its TTL counts from then)."""
        if self.settings.max_entries == 0 or answer.status not in ("FOUND", "NOT_FOUND"):
            return
        self._entries[phone] = (answer, self._clock() - age)
        self._entries.move_to_end(phone)
        while len(self._entries) > self.settings.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
