"""The one way an event reaches the click-to-call flow: judged (agi_bitrix.bitrix.events), then
seen for the first time by this server and, with the `redis` section, by every server of the
portal. Both receivers (the handler's POST, the offline poller) go through `EventGate`.

First time: remembered here (bounded, for `ttl` seconds) and, with Redis, `SET NX` with the same
TTL on a key of its own, so two servers behind one load balancer never both act on one CALL_ID.
While Redis does not answer, each server judges by its own memory alone (and says so in its
health): the portal sends an event once (api-reference/events/index.md, "No retries"), so
what reaches a second server then is a replay by whoever holds our application_token.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from agi_bitrix.bitrix.events import (
    DuplicateEvent,
    Event,
    EventRefused,
    MalformedEvent,
    PortalIdentity,
    RefusalCounter,
    check_authentic,
    check_fresh,
    data_fields,
    event_name,
    post_time,
    read_event,
    record_time,
)
from agi_bitrix.bitrix.shared import RedisLink, SharedStateUnavailable
from agi_bitrix.bitrix.tokenfile import TokenFile

# Event keys remembered in memory at most: a flood of genuine-looking keys cannot grow it further.
MEMORY_LIMIT = 100_000


class SeenEvents(Protocol):
    async def first_time(self, key: str) -> bool:
        """Whether `key` is new (and from now on remembered)."""
        ...

    async def forget(self, key: str) -> None:
        """The event was not handled: a retry of it is new again."""
        ...


class MemorySeen:
    """Keys seen in the last `ttl` seconds, at most `limit` of them (the oldest go first)."""

    def __init__(self, ttl: float, limit: int = MEMORY_LIMIT, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._limit, self._clock = ttl, limit, clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # key -> when it is forgotten

    async def first_time(self, key: str) -> bool:
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now:
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        self._seen[key] = now + self._ttl
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return True

    async def forget(self, key: str) -> None:
        self._seen.pop(key, None)


class RedisSeen:
    """Keys seen by any server: SET NX EX in the `redis` section's Redis, this server's memory
    in front (a repeat here costs no Redis command) and instead while Redis is down."""

    def __init__(self, link: RedisLink, ttl: float, memory: MemorySeen | None = None) -> None:
        self._link, self._ttl = link, max(1, round(ttl))
        self._memory = memory or MemorySeen(ttl)
        self.unshared = 0  # events judged by this server's memory alone, Redis being down

    async def first_time(self, key: str) -> bool:
        if not await self._memory.first_time(key):
            return False
        name = self._link.key("event", key)
        try:
            stored = await self._link.run(lambda: self._link.client.set(name, self._link.server_id, nx=True,
                                                                         ex=self._ttl))
        except SharedStateUnavailable:
            self.unshared += 1
            return True
        return bool(stored)

    async def forget(self, key: str) -> None:
        await self._memory.forget(key)
        name = self._link.key("event", key)
        # If Redis is down, its TTL lets it go; until then a retry of it is taken for a repeat and logged.
        with contextlib.suppress(SharedStateUnavailable):
            await self._link.run(lambda: self._link.client.delete(name))


class TokenFileIdentity:
    """Our portal's identity as events carry it: the application_token and member_id of the token
    file (read again only when the file changes: a flood of POSTs costs no reads), the domain of
    bitrix.oauth.portal_url."""

    def __init__(self, token_file: str, portal_url: str) -> None:
        self._file = TokenFile(token_file)
        self._domain = (urlsplit(portal_url).netloc or "").lower()
        self._stamp: tuple[int, int, int] | None = None
        self._identity = PortalIdentity("", "", self._domain)

    def __call__(self) -> PortalIdentity:
        stamp = self._file.stamp()
        if stamp != self._stamp:
            tokens = self._file.load_if_present()
            self._stamp = stamp
            self._identity = PortalIdentity(tokens.application_token if tokens else "",
                                            tokens.member_id if tokens else "", self._domain)
        return self._identity


class EventGate:
    """Judges each event once; only what passes reaches the handler. Refusals are counted by
    reason and logged once per reason a minute (RefusalCounter)."""

    def __init__(self, identity: Callable[[], PortalIdentity], seen: SeenEvents, *, country: str,
                 replay_window: float, clock: Callable[[], float] = time.time) -> None:
        self._identity, self.seen = identity, seen
        self._country, self._window, self._clock = country, replay_window, clock
        self.refusals = RefusalCounter()
        self.accepted = 0
        self.last_event_at: float | None = None  # unix time an event last passed

    async def admit_post(self, form: Mapping[str, str], peer: str) -> Event:
        """A handler POST's fields -> the event, or EventRefused (counted and logged)."""
        try:
            name = event_name(form)
            check_authentic(form, self._identity())
            event = read_event(name, data_fields(form), post_time(form), "handler", self._country)
            return await self._admit(event)
        except EventRefused as error:
            self.refusals.refused(error, peer)
            raise

    async def admit_record(self, record: Any) -> Event:
        """An offline queue record (event-offline-get.md: EVENT_NAME, EVENT_DATA, TIMESTAMP_X)."""
        try:
            if not isinstance(record, Mapping):
                raise MalformedEvent("an offline record is not an object")
            name = event_name({"event": str(record.get("EVENT_NAME", ""))})
            data = record.get("EVENT_DATA")
            if not isinstance(data, Mapping):
                raise MalformedEvent("EVENT_DATA is not an object")
            event = read_event(name, data, record_time(record.get("TIMESTAMP_X")), "offline", self._country)
            return await self._admit(event)
        except EventRefused as error:
            self.refusals.refused(error, "the offline queue")
            raise

    async def _admit(self, event: Event) -> Event:
        check_fresh(event.sent_at, self._clock(), self._window)
        if not await self.seen.first_time(event.key):
            raise DuplicateEvent(f"{event.key} was already taken")
        self.accepted += 1
        self.last_event_at = self._clock()
        return event
