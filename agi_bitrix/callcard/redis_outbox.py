"""The call card's outbox in Redis, shared by several agi-bitrix servers (`callcard.outbox:
redis://HOST:PORT/DB`): a finish one server accepted is delivered by another if that one dies.

The same contract as the SQLite outbox (outbox.py), which stays the default, and the same
delivery policy and loop (delivery.py); Redis is reached through agi_bitrix.redis_link: one row per key
(the portal's CALL_ID), a second add of the key is ignored; rows of a kind may wait for another
row (`after`: a recording for its finish) and fail with it; each attempt is counted before the
request leaves, so an attempt whose outcome is unknown (a crash, a kill) is retried after the
backoff, and the sender decides what a retry that finds the work done means; rows given up are
kept (`failed`) for a month; while Redis cannot take a finish it is kept in memory, bounded.

In Redis (all names under PREFIX):
- `row:KEY`, a hash: the row, as in SQLite. Created only if absent (the dedupe: an add is
  "SET NX" of the row, in the same script as the rest), expiring DELIVERED_RETENTION after
  delivery and FAILED_RETENTION after giving up, like the SQLite rows.
- `stream`, with the consumer group GROUP (both made again whenever missing: a Redis restarted
  empty or flushed loses them, and the outbox says so once): one entry per row, naming its key. A server reads new
  entries (XREADGROUP), which puts them in its pending list; it acknowledges and deletes an
  entry once its row is delivered or given up. It touches its pending entries every third of
  `claim_after` (XCLAIM to itself), so an entry idle longer than that belongs to a server that
  stopped: any server takes it over (XAUTOCLAIM) and goes on with the row.
- Which server sends an attempt is decided by the row, not the entry: `take` (one Lua script)
  counts the attempt and moves the row's next attempt past the backoff, atomically, so two
  servers holding one entry for a moment (a slow one's heartbeat racing a takeover) never both
  send it within one backoff.
- `STATE:KIND`, sorted sets of the keys pending, delivered and failed (scored by time): the
  counts for /healthz and the metrics, the same on every server.

Durability is Redis's: see docs/call-card.md (AOF, appendfsync). One Redis (a replica for
failover at most), not Redis Cluster: the scripts touch keys they derive from the row.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from agi_bitrix.callcard.delivery import Counts, DeliveryLoop, Entry, KeptRow, RetryPolicy, Sender, Verdict
from agi_bitrix.callcard.outbox import (
    DELIVERED,
    DELIVERED_RETENTION,
    FAILED,
    FAILED_RETENTION,
    PENDING,
    PURGE_EVERY,
)
from agi_bitrix.redis_link import LinkHealth, RedisError, parse_redis_url

log = logging.getLogger("agi_bitrix.outbox")

PREFIX = "agi-bitrix:outbox:"
GROUP = "agi-bitrix"
# A Redis request that takes longer fails: the finish is then kept in memory, the call goes on.
REDIS_TIMEOUT = 2.0
# The loop's commands run one after another; an add may run beside them.
_CONNECTIONS = 4
# A consumer (one run of one server) with nothing pending, not seen for this long, is forgotten.
FORGET_CONSUMER_AFTER = 86400.0
_READ_BATCH = 100

# The stream and its consumer group, made when missing: a Redis restarted empty (no AOF), flushed,
# or new has neither, and every read and acknowledgement would fail (NOGROUP) until they exist.
# From the stream's start: entries added before the group count too. pcall: an existing group
# answers an error (BUSYGROUP), which is the case where nothing is to be done.
_ENSURE_GROUP = """
local made = redis.pcall('XGROUP', 'CREATE', ARGV[1] .. 'stream', ARGV[2], '0', 'MKSTREAM')
if type(made) == 'table' and made.err then return 0 end
return 1
"""

# KEYS: none (one Redis; the keys follow from the prefix and the row's key).
# ARGV: prefix, key, params, kind, after, queued_at, next_attempt_at, group.
# 1 = added, 0 = duplicate; plus 2 when the stream and its group had to be made.
_ADD = """
local p, key = ARGV[1], ARGV[2]
local row = p .. 'row:' .. key
if redis.call('EXISTS', row) == 1 then return 0 end
local made = redis.pcall('XGROUP', 'CREATE', p .. 'stream', ARGV[8], '0', 'MKSTREAM')
local group_made = (type(made) == 'table' and made.err) and 0 or 2
redis.call('HSET', row, 'params', ARGV[3], 'kind', ARGV[4], 'after', ARGV[5], 'queued_at', ARGV[6],
           'next_attempt_at', ARGV[7], 'attempts', 0, 'state', 'pending', 'last_error', '')
redis.call('ZADD', p .. 'pending:' .. ARGV[4], ARGV[6], key)
redis.call('SADD', p .. 'kinds', ARGV[4])
if ARGV[5] ~= '' then redis.call('SADD', p .. 'followers:' .. ARGV[5], key) end
redis.call('XADD', p .. 'stream', '*', 'key', key)
return 1 + group_made
"""

# ARGV: prefix, key, now, first_delay, max_delay.
# {'gone'} | {'later', next_attempt_at} | {'blocked'} | {'take', params, attempt, queued_at, kind, after}
_TAKE = """
local p, key, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local row = p .. 'row:' .. key
local r = redis.call('HMGET', row, 'state', 'next_attempt_at', 'after', 'attempts', 'params', 'queued_at', 'kind')
if r[1] ~= 'pending' then return {'gone'} end
if tonumber(r[2]) > now then return {'later', r[2]} end
if r[3] ~= '' and redis.call('HGET', p .. 'row:' .. r[3], 'state') == 'pending' then return {'blocked'} end
local attempt = tonumber(r[4]) + 1
local delay = math.min(tonumber(ARGV[5]), tonumber(ARGV[4]) * 2 ^ math.min(attempt - 1, 60))
redis.call('HSET', row, 'attempts', attempt, 'next_attempt_at', tostring(now + delay))
return {'take', r[5], tostring(attempt), r[6], r[7], r[3]}
"""

# ARGV: prefix, key, state (delivered|failed), now, detail, retention, follower_detail,
# follower_retention. Returns the followers given up with it: key, kind, key, kind, ...
_DONE = """
local p, key, state, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local row = p .. 'row:' .. key
local kind = redis.call('HGET', row, 'kind')
if not kind or redis.call('HGET', row, 'state') ~= 'pending' then return {} end
redis.call('HSET', row, 'state', state, 'done_at', now)
if ARGV[5] ~= '' then redis.call('HSET', row, 'last_error', ARGV[5]) end
redis.call('EXPIRE', row, ARGV[6])
redis.call('ZREM', p .. 'pending:' .. kind, key)
redis.call('ZADD', p .. state .. ':' .. kind, now, key)
local given_up = {}
if state == 'failed' then
  for _, follower in ipairs(redis.call('SMEMBERS', p .. 'followers:' .. key)) do
    local frow = p .. 'row:' .. follower
    local fkind = redis.call('HGET', frow, 'kind')
    if fkind and redis.call('HGET', frow, 'state') == 'pending' then
      redis.call('HSET', frow, 'state', 'failed', 'done_at', now, 'last_error', ARGV[7])
      redis.call('EXPIRE', frow, ARGV[8])
      redis.call('ZREM', p .. 'pending:' .. fkind, follower)
      redis.call('ZADD', p .. 'failed:' .. fkind, now, follower)
      table.insert(given_up, follower)
      table.insert(given_up, fkind)
    end
  end
end
redis.call('DEL', p .. 'followers:' .. key)
return given_up
"""

# ARGV: prefix, key, at, detail: nothing was sent (a recording not ready); the attempt is not counted.
_RESCHEDULE = """
local row = ARGV[1] .. 'row:' .. ARGV[2]
if redis.call('HGET', row, 'state') ~= 'pending' then return 0 end
redis.call('HINCRBY', row, 'attempts', -1)
redis.call('HSET', row, 'next_attempt_at', ARGV[3], 'last_error', ARGV[4])
return 1
"""


@dataclass
class _Held:
    """A stream entry in this server's pending list, and when its row is worth looking at."""

    key: str
    due_at: float = 0.0
    after: str = ""


class RedisOutbox(DeliveryLoop):
    """The outbox in Redis: the delivery loop (delivery.py) around RedisRows."""

    _rows: RedisRows

    def __init__(self, url: str, send: Sender, retry: RetryPolicy, *, claim_after: float = 60.0,
                 prefix: str = PREFIX, clock: Any = time.time) -> None:
        # The counts are the cluster's, as last seen.
        super().__init__(RedisRows(url, claim_after=claim_after, prefix=prefix), send, retry, clock)

    @property
    def problem(self) -> str:
        """Why the outbox cannot use Redis now, "" while it can (/healthz, metrics)."""
        return self._rows.health.problem

    @problem.setter
    def problem(self, problem: str) -> None:
        if problem:
            self._rows.health.failed(problem)
        else:
            self._rows.health.recovered()

    @property
    def _held(self) -> dict[str, _Held]:
        """The stream entries this server holds (the tests wait for them to be released)."""
        return self._rows.held


class RedisRows:
    """The rows in Redis, behind delivery.Rows: one server's view of the stream they share."""

    errors: ClassVar[tuple[type[Exception], ...]] = (RedisError, OSError)

    def __init__(self, url: str, *, claim_after: float, prefix: str) -> None:
        # Whether Redis takes finishes: the link's health state, as the shared state keeps it.
        self.health = LinkHealth()
        self.url = parse_redis_url(url)  # checked by the config already, with the same parser
        self.path = self.url.redacted  # what /healthz, the admin page and the log show as the outbox
        self.claim_after = claim_after
        self._prefix = prefix
        # One run of one server: a takeover never mistakes a restarted server for the old one.
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        # Typed Any: redis-py's types cannot tell that decode_responses=True answers str, not bytes.
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._opened_once = False
        self.held: dict[str, _Held] = {}  # by stream entry id
        self._maintained_at = float("-inf")
        self._purged_at = 0.0

    @property
    def is_open(self) -> bool:
        return self._redis is not None and self.health.up

    async def open(self) -> Counts:
        if self._redis is None:
            self._redis = self.url.client(timeout=REDIS_TIMEOUT, max_connections=_CONNECTIONS, decode_responses=True)
            for name, script in (("add", _ADD), ("take", _TAKE), ("done", _DONE), ("reschedule", _RESCHEDULE),
                                 ("ensure_group", _ENSURE_GROUP)):
                self._scripts[name] = self._redis.register_script(script)
        await self._ensure_group()
        self._opened_once = True
        counts = await self._count()
        log.info("outbox %s open (consumer %s); %s waiting for delivery in it", self.path, self.consumer,
                 ", ".join(f"{count} {kind}(s)" for kind, count in sorted(counts.waiting.items()) if count)
                 or "nothing")
        return counts

    async def close(self) -> None:
        # What this server holds stays in its pending list: another server (or this one,
        # restarted) takes it over after claim_after. Nothing is lost by stopping.
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def count(self, state: str) -> int:
        redis = self._connection()
        kinds = await redis.smembers(self._key("kinds"))
        return sum([await redis.zcard(self._key(f"{state}:{kind}")) for kind in kinds])

    async def row(self, key: str) -> dict[str, Any] | None:
        found: dict[str, Any] = await self._connection().hgetall(self._key(f"row:{key}"))
        if not found:
            return None
        found["params"] = json.loads(found["params"])
        found["attempts"] = int(found["attempts"])
        return found

    async def insert(self, key: str, row: KeptRow, now: float) -> bool:
        added = int(await self._scripts["add"](args=[
            self._prefix, key, row.params, row.kind, row.after, repr(row.queued_at),
            repr(max(row.not_before, now)), GROUP]))
        if added & 2:
            self._group_made()
        return bool(added & 1)

    async def take(self, now: float, retry: RetryPolicy) -> Entry | None:
        due = sorted((held.due_at, entry_id) for entry_id, held in self.held.items() if held.due_at <= now)
        for _, entry_id in due:
            entry = await self._attempt(entry_id, now, retry)
            if entry is not None:
                return entry
        return None

    async def due_at(self) -> tuple[float | None, float]:
        next_due = min((held.due_at for held in self.held.values()), default=None)
        return next_due, self._maintained_at + self.claim_after / 3

    async def mark(self, entry: Entry, verdict: Verdict, now: float) -> list[tuple[str, str]]:
        if verdict.action == "delivered":
            await self._done(entry, DELIVERED, now, verdict.detail)
            await self._release(entry.key)
            for follower in self.held.values():  # its recording, if we hold it, may go now
                if follower.after == entry.key:
                    follower.due_at = now
        elif verdict.action == "wait":
            await self._scripts["reschedule"](args=[self._prefix, entry.key, repr(verdict.at), verdict.detail])
            self._due(entry.key, verdict.at)
        elif verdict.action == "retry":
            await self._connection().hset(self._key(f"row:{entry.key}"), "last_error", verdict.detail)
            self._due(entry.key, verdict.at)
        else:
            followers = await self._done(entry, FAILED, now, verdict.detail)
            await self._release(entry.key)
            return followers
        return []

    def describe(self, error: Exception) -> str:
        return f"cannot use outbox {self.path}: {self.url.describe(error)}"

    # -- the stream -------------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        if await self._scripts["ensure_group"](args=[self._prefix, GROUP]):
            self._group_made()

    def _group_made(self) -> None:
        """The stream and its group were missing and are made again: Redis lost the outbox."""
        if not self._opened_once:
            return  # a new Redis (or prefix): nothing was there to lose
        log.error("outbox %s: Redis had lost the outbox's stream (it restarted empty, was flushed or replaced);"
                  " made it again and goes on with the finishes added from now on. What was stored before is"
                  " lost: keep Redis's data with AOF (docs/call-card.md)", self.path)
        self.held.clear()  # their entries went with the stream
        self._maintained_at = float("-inf")

    async def tidy(self, now: float) -> Counts:
        """New entries; and every third of claim_after: keep ours, take over those of stopped servers."""
        redis = self._connection()
        stream = self._key("stream")
        await self._ensure_group()
        if now - self._maintained_at >= self.claim_after / 3:
            self._maintained_at = now
            await self._keep_held(redis, stream)
            await self._take_over(redis, stream)
            if now - self._purged_at >= PURGE_EVERY:
                await self._purge(redis, now)
                self._purged_at = now
        while True:
            answer = await redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=_READ_BATCH)
            entries = answer[0][1] if answer else []
            for entry_id, fields in entries:
                self.held[entry_id] = _Held(fields.get("key", ""))
            if len(entries) < _READ_BATCH:
                break
        return await self._count()

    async def _keep_held(self, redis: Any, stream: str) -> None:
        """Reset the idle time of the entries still ours; forget those another server took over."""
        pending = await redis.xpending_range(stream, GROUP, min="-", max="+", count=100_000,
                                             consumername=self.consumer)
        ours = {item["message_id"] for item in pending}
        for entry_id in [entry_id for entry_id in self.held if entry_id not in ours]:
            log.warning("outbox entry %s (%s) was taken over by another server", entry_id, self.held[entry_id].key)
            del self.held[entry_id]
        if ours:
            await redis.xclaim(stream, GROUP, self.consumer, 0, list(ours), justid=True)
        for entry_id in ours - self.held.keys():  # read, but the answer was lost (a timeout)
            for found_id, fields in await redis.xrange(stream, entry_id, entry_id):
                self.held[found_id] = _Held(fields["key"])

    async def _take_over(self, redis: Any, stream: str) -> None:
        """Entries idle past claim_after: their server stopped (or lost Redis) with them."""
        start = "0-0"
        min_idle = int(self.claim_after * 1000)
        while True:
            answer = await redis.xautoclaim(stream, GROUP, self.consumer, min_idle, start_id=start, count=_READ_BATCH)
            start, claimed = answer[0], answer[1]
            for entry_id, fields in claimed:
                if fields is None:  # deleted from the stream meanwhile
                    continue
                log.warning("outbox entry %s (%s) taken over from a server that stopped", entry_id, fields.get("key"))
                self.held[entry_id] = _Held(fields.get("key", ""))
            if start == "0-0":
                break
        for consumer in await redis.xinfo_consumers(stream, GROUP):
            if (consumer["pending"] == 0 and consumer["name"] != self.consumer
                    and consumer["idle"] > FORGET_CONSUMER_AFTER * 1000):
                await redis.xgroup_delconsumer(stream, GROUP, consumer["name"])

    async def _attempt(self, entry_id: str, now: float, retry: RetryPolicy) -> Entry | None:
        """The row of a held entry, taken, when it is due and not waiting for another row."""
        held = self.held.get(entry_id)
        if held is None:
            return None
        answer = await self._scripts["take"](args=[self._prefix, held.key, repr(now), retry.first_delay,
                                                   retry.max_delay])
        if answer[0] == "gone":  # delivered or given up (by whoever held it before), or expired
            await self._release_entry(entry_id)
            return None
        if answer[0] == "later":
            held.due_at = float(answer[1])
            return None
        if answer[0] == "blocked":  # the row it waits for is pending, maybe on another server
            held.due_at = now + retry.first_delay
            return None
        _, params, attempt, queued_at, kind, held.after = answer
        return Entry(held.key, json.loads(params), int(attempt), float(queued_at), kind)

    async def _done(self, entry: Entry, state: str, now: float, detail: str) -> list[tuple[str, str]]:
        retention = DELIVERED_RETENTION if state == DELIVERED else FAILED_RETENTION
        given_up = await self._scripts["done"](args=[
            self._prefix, entry.key, state, repr(now), detail, int(retention),
            f"not sent: {entry.key} was not delivered ({detail})", int(FAILED_RETENTION)])
        return list(zip(given_up[::2], given_up[1::2], strict=True))

    def _entry_id(self, key: str) -> str | None:
        """The stream entry this server holds for a row's key (the one just attempted)."""
        return next((entry_id for entry_id, held in self.held.items() if held.key == key), None)

    def _due(self, key: str, at: float) -> None:
        held = self.held.get(self._entry_id(key) or "")
        if held is not None:
            held.due_at = at

    async def _release(self, key: str) -> None:
        entry_id = self._entry_id(key)
        if entry_id is not None:
            await self._release_entry(entry_id)

    async def _release_entry(self, entry_id: str) -> None:
        """The entry's row is done: out of the pending list and the stream."""
        redis = self._connection()
        stream = self._key("stream")
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()
        self.held.pop(entry_id, None)

    # -- Redis ---------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return self._prefix + name

    def _connection(self) -> Any:
        if self._redis is None:
            raise RedisError(f"outbox {self.path} is not open")
        return self._redis

    async def _count(self) -> Counts:
        redis = self._connection()
        kinds = sorted(await redis.smembers(self._key("kinds")))
        async with redis.pipeline(transaction=False) as pipe:
            for kind in kinds:
                pipe.zcard(self._key(f"{PENDING}:{kind}"))
                pipe.zcard(self._key(f"{FAILED}:{kind}"))
            counts = await pipe.execute()
        return Counts(Counter(dict(zip(kinds, counts[::2], strict=True))),
                      Counter(dict(zip(kinds, counts[1::2], strict=True))))

    async def _purge(self, redis: Any, now: float) -> None:
        """The rows themselves expire; their names leave the sorted sets here."""
        for kind in await redis.smembers(self._key("kinds")):
            await redis.zremrangebyscore(self._key(f"{DELIVERED}:{kind}"), "-inf", now - DELIVERED_RETENTION)
            await redis.zremrangebyscore(self._key(f"{FAILED}:{kind}"), "-inf", now - FAILED_RETENTION)
