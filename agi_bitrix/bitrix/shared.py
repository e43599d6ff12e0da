"""The state servers against one portal share through Redis: its request budget, each method's
operating time, the answers with single flight across servers, and the circuit breaker.

Two PBXs (or a pair for failover) against one Bitrix24 portal must not each believe they own its
2/s·50 bucket (limits.md: it counts per portal and source address) or a method's operating time
(per webhook or application): together they would be refused. So the bucket's one number (the
GCRA "theoretical arrival time", agi_bitrix.bitrix.ratelimit) lives in Redis and every request
of every server takes its slot in one Lua script, on Redis's clock; answers are stored there with
the same TTLs, and a number is asked by one server at a time (SET NX PX: the others read the
answer when it lands); the breaker's state and each method's operating time are exchanged every
`redis.sync_every`.

Redis never costs a call its route: each command has `redis.timeout`; a failure marks the link
down, and until a ping succeeds again (every `redis.retry_every`) each server works on its own
state with its 1/`redis.servers` share of the portal's budget, as /healthz and
agi_bitrix_redis_up say. The client is agi_bitrix.redis_link's (one URL parser and redactor, one
policy for timeouts, retries off: a caller is waiting, and the local state is the retry).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

from agi_bitrix import redis_link
from agi_bitrix.bitrix.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from agi_bitrix.bitrix.models import CrmAnswer, CrmEntity, Owner
from agi_bitrix.bitrix.operating import OperatingBudget
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.bitrix.settings import CacheSettings, RedisSettings
from agi_bitrix.redis_link import RedisUnavailable

log = logging.getLogger("agi_bitrix.redis")

# Connections to Redis at once: commands are short, a few cover hundreds of calls a second.
POOL_SIZE = 32
# How often a server waiting for another's answer looks for it.
POLL_EVERY = 0.02

# The same arithmetic as RateLimiter.reserve, on Redis's clock. KEYS: the bucket's arrival time.
# ARGV: interval, tolerance, max_wait, keep_free. The wait as text, or nil when over max_wait.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_wait, keep_free = tonumber(ARGV[3]), tonumber(ARGV[4])
local arrival = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local wait = math.max(0, arrival - math.max(0, tolerance - keep_free * interval) - now)
if wait > max_wait then return false end
arrival = arrival + interval
redis.call('SET', KEYS[1], string.format('%.6f', arrival), 'PX', math.ceil((arrival - now) * 1000) + 1000)
return string.format('%.6f', wait)
"""
# RateLimiter.back_off's second half: no slot before now + pause + tolerance. ARGV: that sum.
_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local arrival = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now + tonumber(ARGV[1]))
redis.call('SET', KEYS[1], string.format('%.6f', arrival), 'PX', math.ceil((arrival - now) * 1000) + 1000)
return 1
"""
# Each method's operating-time bucket (OperatingBudget's level, drained at `drain` per second)
# plus this server's spending since the last exchange, and the longest hold any server saw.
# KEYS: the hash. ARGV: drain, JSON {method: [seconds spent, seconds held from now]}, expiry in s.
# Returns JSON {method: [level, seconds held from now]} for every method any server used.
_OPERATING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local drain = tonumber(ARGV[1])
local changes = cjson.decode(ARGV[2])
local methods = {}
local stored = redis.call('HGETALL', KEYS[1])
for i = 1, #stored, 2 do methods[stored[i]] = cjson.decode(stored[i + 1]) end
for method, _ in pairs(changes) do
  if methods[method] == nil then methods[method] = {0, now, 0} end
end
local result = {}
for method, state in pairs(methods) do
  local level = math.max(0, state[1] - (now - state[2]) * drain)
  local held = state[3]
  local change = changes[method]
  if change then
    level = math.max(0, level + change[1])
    if change[2] > 0 then held = math.max(held, now + change[2]) end
  end
  redis.call('HSET', KEYS[1], method, cjson.encode({level, now, held}))
  result[method] = {level, math.max(0, held - now)}
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return cjson.encode(result)
"""
# The breaker: its state (open until reopen_at, or closed) and who probes. KEYS: the hash.
# ARGV: what this server saw (open, closed or ""), cool-down, this server's id, 1 to ask for the
# probe. Returns {state, seconds until the probe may go, 1 if the probe is this server's}.
_BREAKER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local action, cool_down, me, want = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local reopen_at = tonumber(redis.call('HGET', KEYS[1], 'reopen_at') or '0')
local prober = redis.call('HGET', KEYS[1], 'prober') or ''
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if action == 'open' then
  state, reopen_at, prober = 'open', now + cool_down, ''
elseif action == 'closed' then
  state, prober = 'closed', ''
end
local mine = 0
if state == 'open' and now >= reopen_at and want == '1' then
  if prober == '' or prober == me or probe_until < now then
    prober, probe_until = me, now + math.max(cool_down, 1)
  end
  if prober == me then mine = 1 end
end
redis.call('HSET', KEYS[1], 'state', state, 'reopen_at', string.format('%.6f', reopen_at),
           'prober', prober, 'probe_until', string.format('%.6f', probe_until))
redis.call('EXPIRE', KEYS[1], 86400)
return {state, string.format('%.6f', math.max(0, reopen_at - now)), mine}
"""
# One number: its fresh answer; else the right to ask the portal for it (or that another server
# has it). KEYS: the answer, the claim. ARGV: found TTL, not-found TTL, this server, claim ms.
# Returns {fresh|ours|busy, stored answer or false, its age in seconds}.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stored = redis.call('GET', KEYS[1])
local age = 0
local status, at = string.match(stored or '', '^(%u+)|([%d.]+)|')
if status and tonumber(at) then  -- another version's shape: no answer here, the caller decides
  age = now - tonumber(at)
  local ttl = tonumber(status == 'FOUND' and ARGV[1] or ARGV[2])
  if age < ttl then return {'fresh', stored, string.format('%.6f', age)} end
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
  return {'ours', stored or false, string.format('%.6f', age)}
end
return {'busy', stored or false, string.format('%.6f', age)}
"""
# Store an answer on Redis's clock, release this server's claim. KEYS: answer, claim.
# ARGV: STATUS, entities JSON, keep ms, this server.
_STORE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. string.format('%.6f', now) .. '|' .. ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
return 1
"""
# Release this server's claim without an answer (its request failed). KEYS: claim. ARGV: server.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


# What the lookup catches: Redis did not answer in time, or not at all; it uses this server's own state.
SharedStateUnavailable = RedisUnavailable


class RedisLink(redis_link.RedisLink):
    """The shared state's link to Redis (agi_bitrix.redis_link), with the redis section's settings:
    while it is down each server takes 1/`servers` of the portal's budget."""

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__(
            settings.url, timeout=settings.timeout, retry_every=settings.retry_every,
            sync_every=settings.sync_every, max_connections=POOL_SIZE,
            while_down=f"each server uses its own state and 1/{settings.servers} of the portal's budget until it"
                       " is back",
            when_back="sharing the portal's budget, answers and breaker again")
        self.settings = settings
        self.server_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

    def key(self, *parts: str) -> str:
        return self.settings.key_prefix + ":".join(parts)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "budget_share": 1.0 if self.up else round(1 / self.settings.servers, 4)}


def portal_keys(rest_url: str, identity: str, source_address: str) -> tuple[str, str]:
    """(the portal's request bucket, the webhook's or application's operating time), as key parts.

    The bucket is the portal's (host) and, when servers leave through different addresses, the
    address's; the operating time is per webhook or application: a hash, never the secret itself."""
    host = rest_url.split("//", 1)[-1].split("/", 1)[0].lower()
    bucket = f"{host}@{source_address}" if source_address else host
    return bucket, hashlib.sha256(identity.encode()).hexdigest()[:16]


class SharedRequestBudget:
    """The portal's request bucket, one for every server (a RequestBudget)."""

    def __init__(self, link: RedisLink, bucket: str, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = burst
        self._link = link
        self._key = link.key("budget", bucket)
        self._interval = 1.0 / per_second
        self._tolerance = (burst - 1) * self._interval
        # While Redis is down: this server's share of the portal's budget.
        servers = link.settings.servers
        self.local = RateLimiter(per_second / servers, max(1, burst // servers))
        self._on_local = False
        self._reserve = link.script(_RESERVE)
        self._hold = link.script(_HOLD)
        self._backoff = 0.0

    async def take(self, max_wait: float, keep_free: int = 0) -> float | None:
        try:
            wait = await self._link.run(lambda: self._reserve(
                keys=[self._key], args=[self._interval, self._tolerance, max_wait, keep_free]))
        except SharedStateUnavailable:
            if not self._on_local:
                # The shared bucket may be full right now: every server granting its share's burst on
                # top of it is what the portal would refuse.
                self.local.spend_burst()
                self._on_local = True
            return self.local.reserve(max_wait, math.ceil(keep_free / self._link.settings.servers))
        self._on_local = False
        return None if wait is None else float(wait)

    async def refused(self) -> float:
        pause = self.local.back_off()
        self._backoff = pause
        # Without Redis the local bucket holds back this server; the others see the refusal themselves.
        with contextlib.suppress(SharedStateUnavailable):
            await self._link.run(lambda: self._hold(keys=[self._key], args=[pause + self._tolerance]))
        return pause

    def succeeded(self) -> None:
        self.local.succeeded()
        self._backoff = 0.0


class SharedOperatingBudget(OperatingBudget):
    """Each method's operating time, counted here and exchanged with the other servers every
    redis.sync_every: the pace's bucket holds a fifth of the limit, so that lag costs nothing."""

    def __init__(self, link: RedisLink, identity: str, limit: float, window: float) -> None:
        super().__init__(limit, window)
        self._link = link
        self._key = link.key("operating", identity)
        self._script = link.script(_OPERATING)
        self._unsent: dict[str, float] = {}
        self._holds: dict[str, float] = {}
        link.on_exchange(self._exchange)

    def spend(self, method: str, seconds: float) -> None:
        super().spend(method, seconds)
        self._unsent[method] = self._unsent.get(method, 0.0) + seconds

    def reported(self, method: str, time_block: Any) -> None:
        super().reported(method, time_block)
        self._note_hold(method)

    def blocked(self, method: str) -> float:
        held = super().blocked(method)
        self._note_hold(method)
        return held

    def _note_hold(self, method: str) -> None:
        held = self.held_for(method)
        if held > 0:
            self._holds[method] = held

    async def _exchange(self) -> None:
        sent, holds = self._unsent, self._holds
        self._unsent, self._holds = {}, {}
        changes = {method: [sent.get(method, 0.0), holds.get(method, 0.0)] for method in {*sent, *holds}}
        try:
            answer = await self._link.run(lambda: self._script(
                keys=[self._key], args=[self.drain, json.dumps(changes), math.ceil(2 * self.window)]))
        except SharedStateUnavailable:
            for method, seconds in sent.items():  # counted here already; sent with the next exchange
                self._unsent[method] = self._unsent.get(method, 0.0) + seconds
            raise
        for method, (level, held) in json.loads(answer).items():
            state = self._state(method)
            state.level = max(0.0, level + self._unsent.get(method, 0.0))  # plus what was spent meanwhile
            state.held_until = max(state.held_until, state.updated + held)


class SharedBreaker(CircuitBreaker):
    """The breaker of every server: one that opens it opens it for all (within redis.sync_every),
    and after the cool-down one server, whichever asks first, sends the probe."""

    def __init__(self, failures: int, cool_down: float, link: RedisLink, portal: str) -> None:
        super().__init__(failures, cool_down)
        self._link = link
        self._key = link.key("breaker", portal)
        self._script = link.script(_BREAKER)
        self._news = ""  # what this server saw and has not told yet: open or closed
        link.on_exchange(self._exchange)

    def allow(self) -> bool:
        if self._link.up and self.state == OPEN:
            return False  # the probe is handed out by the shared state (see _exchange)
        return super().allow()

    def succeeded(self) -> None:
        if self.state != CLOSED:
            self._tell("closed")
        super().succeeded()

    def failed(self) -> None:
        was_open = self.state == OPEN
        super().failed()
        if self.state == OPEN and not was_open:
            self._tell("open")

    def trip(self) -> None:
        super().trip()
        self._tell("open")

    def _tell(self, news: str) -> None:
        self._news = news
        self._link.wake()

    async def _exchange(self) -> None:
        news, self._news = self._news, ""
        want = "1" if self.state != CLOSED else "0"
        try:
            state, wait, mine = await self._link.run(lambda: self._script(
                keys=[self._key], args=[news, self.cool_down, self._link.server_id, want]))
        except SharedStateUnavailable:
            self._news = self._news or news
            raise
        state = state.decode() if isinstance(state, bytes) else state
        now = self._clock()
        if state == "closed":
            if self.state != CLOSED and not self._news:
                log.warning("another server saw the portal answer again; circuit closed")
                super().succeeded()
            return
        if self.state == CLOSED:
            log.warning("another server found the portal failing; not asking it for %.0f s (circuit open)",
                        float(wait))
        if mine and self.state == OPEN:
            self.state, self._probing = HALF_OPEN, False  # this server's allow() lets the probe through
        elif not mine and not (self.state == HALF_OPEN and self._probing):
            self.state, self._probing = OPEN, False
            self._opened_at = now - self.cool_down + float(wait)


@dataclass(frozen=True, slots=True)
class Claim:
    """What Redis holds for a number: `answer` (fresh, or older for stale use) with its `age`, and
    whether this server is to ask the portal (`ours`) or another server is asking (`busy`).
    `unreadable`: a value was there that this version cannot decode (another version wrote it);
    it counts as no answer, and this server asks the portal and overwrites it."""

    answer: CrmAnswer | None
    age: float
    fresh: bool
    ours: bool
    unreadable: bool = False


class SharedAnswers:
    """Answers of every server, with the cache's TTLs, and one server asking per number at a time."""

    def __init__(self, link: RedisLink, portal: str) -> None:
        self.link = link
        self._portal = portal
        self._claim = link.script(_CLAIM)
        self._store = link.script(_STORE)
        self._release = link.script(_RELEASE)

    @property
    def near_cache(self) -> float | None:
        """How old a local answer may be and still be used without asking Redis (None: any age
        within its TTL, while Redis is down)."""
        return self.link.settings.near_cache if self.link.up else None

    def _keys(self, phone: str) -> list[str]:
        return [self.link.key("answer", self._portal, phone), self.link.key("asking", self._portal, phone)]

    async def claim(self, phone: str, cache: CacheSettings, claim_for: float) -> Claim:
        kind, stored, age = await self.link.run(lambda: self._claim(
            keys=self._keys(phone), args=[cache.found_ttl, cache.not_found_ttl, self.link.server_id,
                                          max(1, math.ceil(claim_for * 1000))]))
        kind = kind.decode() if isinstance(kind, bytes) else kind
        answer = _decode(stored) if stored else None
        if stored and answer is None:  # a miss; fresh or not, no other server is asking for it
            return Claim(None, 0.0, fresh=False, ours=kind != "busy", unreadable=True)
        return Claim(answer, float(age), kind == "fresh", kind == "ours")

    async def store(self, phone: str, answer: CrmAnswer, cache: CacheSettings) -> None:
        keep = max(cache.found_ttl, cache.not_found_ttl, cache.stale_for)
        if keep <= 0:
            await self.release(phone)
            return
        entities = json.dumps([_entity_row(entity) for entity in answer.entities], separators=(",", ":"))
        await self.link.run(lambda: self._store(
            keys=self._keys(phone), args=[answer.status, entities, math.ceil(keep * 1000), self.link.server_id]))

    async def release(self, phone: str) -> None:
        await self.link.run(lambda: self._release(keys=self._keys(phone)[1:], args=[self.link.server_id]))


def _entity_row(entity: CrmEntity) -> list[Any]:
    owner = entity.owner
    return [entity.entity_type, entity.entity_id, None if owner is None else [
        owner.user_id, owner.timeman_status, owner.inner_phone, owner.work_phone, owner.personal_phone,
        owner.personal_mobile]]


def _decode(stored: bytes | str) -> CrmAnswer | None:
    """The answer `_STORE` wrote, or None for a value of another shape (another version's: a field
    more or less, another status): guessing at it could route a call to the wrong owner."""
    try:
        text = stored.decode() if isinstance(stored, bytes) else stored
        status, _, rest = text.split("|", 2)
        rows = json.loads(rest)
        if status not in ("FOUND", "NOT_FOUND") or not isinstance(rows, list):
            return None
        entities = tuple(CrmEntity(kind, entity_id, None if owner is None else Owner(*owner))
                         for kind, entity_id, owner in rows)
    except (ValueError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
        return None
    return CrmAnswer(status, entities, cache="hit")


@dataclass
class SharedState:
    """Everything one server shares through Redis, made once per process (agi_bitrix.app)."""

    link: RedisLink
    host: str  # the portal's: the answers' and the breaker's key part
    portal: str  # the bucket's key part: the portal's host (and source address)
    identity: str  # the webhook's or application's hashed key part
    answers: SharedAnswers
    _budgets: dict[tuple[float, int], SharedRequestBudget]
    _operating: dict[float, SharedOperatingBudget]

    @classmethod
    def connect(cls, settings: RedisSettings, rest_url: str, credential: str) -> SharedState:
        link = RedisLink(settings)
        portal, identity = portal_keys(rest_url, credential, settings.source_address)
        host = portal.split("@", 1)[0]
        return cls(link, host, portal, identity, SharedAnswers(link, host), {}, {})

    def breaker(self, failures: int, cool_down: float) -> SharedBreaker:
        return SharedBreaker(failures, cool_down, self.link, self.host)

    def request_budget(self, per_second: float, burst: int) -> SharedRequestBudget:
        key = (per_second, burst)
        if key not in self._budgets:
            self._budgets[key] = SharedRequestBudget(self.link, self.portal, per_second, burst)
        return self._budgets[key]

    def operating_budget(self, limit: float, window: float) -> SharedOperatingBudget:
        if limit not in self._operating:
            self._operating[limit] = SharedOperatingBudget(self.link, self.identity, limit, window)
        return self._operating[limit]

