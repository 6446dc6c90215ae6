"""Routes in Redis: which gateway holds the stream of each online device.

Key layout (the contract with pusher, whose `pusher/routes.py` reads it):

    <prefix>route:<user_id>           HASH    device_id -> "<expires_ms>|<connection_id>|<gateway>"
    <prefix>routes-alive:<gateway>    STRING  "1", the gateway's sentinel (below)
    <prefix>lastseen:<user_id>        STRING  Redis time (ms) a route of the user was last
                                              written or removed (presence's "last seen")

- one hash per user, so "all online devices of user U and their gateway" is one
  HGETALL (no SCAN), and every script touches exactly one key (cluster-safe);
- `expires_ms` is Redis server time (TIME inside the scripts, so gateway and pusher
  clocks never matter); readers ignore expired fields, writers prune them;
- the hash itself has a PEXPIRE of at least the route TTL, refreshed with the
  fields, so a user whose gateways all died disappears entirely;
- `connection_id` makes removal a compare-and-delete: a closing stream removes the
  route only if it is still its own, never a newer connection's;
- every REGISTER, REFRESH and UNREGISTER is pipelined with a STAMP of the user's
  `lastseen` key (Redis TIME, only forward, a long TTL), in the same round trip.
  So for a user with no live route, `lastseen` is when a device of theirs last
  disconnected cleanly, or, if its gateway died, its route's last refresh (its
  `expires_ms - ttl`, the last moment a live gateway vouched for it). STAMP is a
  script of its own on its own key: every script still touches exactly one key,
  so route and lastseen keys may live in different cluster slots.

Presence is a cache: losing Redis (flush, restart, outage) loses no message. A
gateway notices the loss within about a second and re-registers every open stream's
route at once (gateway/hub.py): each gateway writes its sentinel key before each
refresh round, and checks every second that it is still there and that Redis still
knows the check script (`mark_alive`, `alive`).

Every write here is safe to retry (redis-py re-sends a command after a connection
error or timeout): REGISTER and REFRESH write the same value again, UNREGISTER is a
compare-and-delete. A retried REGISTER whose first attempt did run reports no
replaced route (the replaced stream is then kicked by its own gateway's next
refresh, which finds its route taken, instead of at once).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_WRITE = """
redis.call('HSET', KEYS[1], ARGV[1], (now + ttl) .. '|' .. ARGV[2] .. '|' .. ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp = tonumber(string.match(all[i + 1], '^(%d+)|'))
  if exp == nil or exp <= now then redis.call('HDEL', KEYS[1], all[i]) end
end
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
"""

# KEYS[1] route key; ARGV device, connection_id, gateway, ttl_ms.
# Sets the route unconditionally; returns the previous live value, if any.
REGISTER = (
    _NOW
    + """
local ttl = tonumber(ARGV[4])
local prev = redis.call('HGET', KEYS[1], ARGV[1])
"""
    + _WRITE
    + """
if prev then
  local exp, id = string.match(prev, '^(%d+)|([^|]*)|')
  if exp and tonumber(exp) > now and id ~= ARGV[2] then return prev end
end
return false
"""
)

# Same arguments. Returns 0 without writing if a live route of another connection
# replaced ours; else extends the route if it is live and ours (1), or re-creates
# it if it is gone (2: Redis flushed or restarted, or it expired).
REFRESH = (
    _NOW
    + """
local ttl = tonumber(ARGV[4])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local missing = 1
if cur then
  local exp, id = string.match(cur, '^(%d+)|([^|]*)|')
  if exp and tonumber(exp) > now then
    if id ~= ARGV[2] then return 0 end
    missing = 0
  end
end
"""
    + _WRITE
    + """
return 1 + missing
"""
)

# KEYS[1] route key; ARGV device, connection_id. Compare-and-delete.
UNREGISTER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.match(cur, '^%d+|([^|]*)|') == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS[1] route key. Live routes as a flat list: device, connection_id, gateway, ...
LOOKUP = (
    _NOW
    + """
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp, id, gw = string.match(all[i + 1], '^(%d+)|([^|]*)|(.*)$')
  if exp and tonumber(exp) > now then
    out[#out + 1] = all[i]
    out[#out + 1] = id
    out[#out + 1] = gw
  end
end
return out
"""
)

# KEYS[1] a user's lastseen key; ARGV ttl_ms. Sets it to Redis time unless it
# holds a later one (a clock step back never moves it backwards); returns it.
STAMP = (
    _NOW
    + """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if now > cur then
  redis.call('SET', KEYS[1], now, 'PX', ARGV[1])
  return now
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return cur
"""
)

# KEYS[1] a gateway's sentinel key: 1 if it exists. Run by its SHA only (EVALSHA),
# so NOSCRIPT tells that Redis emptied its script cache: it restarted (perhaps
# from a snapshot older than some routes), failed over to a replica that does not
# know the script, or ran SCRIPT FLUSH.
CHECK = "return redis.call('EXISTS', KEYS[1])"
_CHECK_SHA = hashlib.sha1(CHECK.encode()).hexdigest()


def route_key(prefix: str, user_id: str) -> str:
    return f"{prefix}route:{user_id}"


def last_seen_key(prefix: str, user_id: str) -> str:
    return f"{prefix}lastseen:{user_id}"


def sentinel_key(prefix: str, gateway: str) -> str:
    return f"{prefix}routes-alive:{gateway}"


class Refreshed(enum.IntEnum):
    """What REFRESH did to one route."""

    #: A live route of another connection replaced it; nothing written.
    TAKEN = 0
    #: It was live and this connection's: its expiry moved.
    EXTENDED = 1
    #: It was gone (Redis flushed or restarted, or it expired): written again.
    RECREATED = 2


@dataclass(frozen=True, slots=True)
class Route:
    """Where one device of a user is connected."""

    device_id: str
    connection_id: str
    gateway: str


def parse_route(device_id: str, value: str | bytes) -> Route:
    """A route from a stored hash value (`<expires_ms>|<connection_id>|<gateway>`)."""
    text = value.decode() if isinstance(value, bytes) else value
    _expires, connection_id, gateway = text.split("|", 2)
    return Route(device_id=device_id, connection_id=connection_id, gateway=gateway)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RouteTable:
    """The gateway's writes to the route hash (and a reader, for tests and tools).

    Every route method is a single Lua script on a single key: atomic, one round
    trip. Methods raise redis exceptions; callers decide how much a failure matters
    (for the gateway: the hub retries until Redis answers, then re-registers).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        ttl_s: float,
        last_seen_ttl_s: float = 30 * 86400.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._last_seen_ttl_ms = max(1, int(last_seen_ttl_s * 1000))
        self._register = redis.register_script(REGISTER)
        self._refresh = redis.register_script(REFRESH)
        self._unregister = redis.register_script(UNREGISTER)
        self._lookup = redis.register_script(LOOKUP)
        self._stamp = redis.register_script(STAMP)

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    def key(self, user_id: str) -> str:
        return route_key(self._prefix, user_id)

    def last_seen_key(self, user_id: str) -> str:
        return last_seen_key(self._prefix, user_id)

    async def _stamp_in(self, pipe: Any, user_id: str) -> None:
        await self._stamp(
            keys=[self.last_seen_key(user_id)], args=[self._last_seen_ttl_ms], client=pipe
        )

    def sentinel_key(self, gateway: str) -> str:
        return sentinel_key(self._prefix, gateway)

    async def mark_alive(self, gateway: str) -> None:
        """Writes `gateway`'s sentinel (expiring after the route TTL) and loads the
        check script, in one round trip. Write it before the routes it vouches for:
        a loss after this write takes the sentinel with it."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.script_load(CHECK)
            pipe.set(self.sentinel_key(gateway), b"1", px=self._ttl_ms)
            await pipe.execute()

    async def alive(self, gateway: str) -> bool:
        """False if Redis may have lost routes written since `gateway`'s last
        `mark_alive`: the sentinel is gone (flush, restart without persistence,
        eviction, expiry) or Redis forgot the check script (restart, failover,
        SCRIPT FLUSH). One EVALSHA."""
        try:
            return bool(await self._redis.evalsha(_CHECK_SHA, 1, self.sentinel_key(gateway)))
        except NoScriptError:
            return False

    async def register(
        self, user_id: str, device_id: str, connection_id: str, gateway: str
    ) -> Route | None:
        """Points the device's route at `gateway`/`connection_id`; returns the
        live route it replaced, if it belonged to another connection."""
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._register(
                keys=[self.key(user_id)],
                args=[device_id, connection_id, gateway, self._ttl_ms],
                client=pipe,
            )
            await self._stamp_in(pipe, user_id)
            prev, _stamped = await pipe.execute()
        return parse_route(device_id, prev) if prev else None

    async def refresh_many(self, entries: list[tuple[str, str, str, str]]) -> list[Refreshed]:
        """Refreshes (user, device, connection_id, gateway) routes in one pipeline
        (re-creating lost ones), and says what it did to each."""
        if not entries:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id, device_id, connection_id, gateway in entries:
                await self._refresh(
                    keys=[self.key(user_id)],
                    args=[device_id, connection_id, gateway, self._ttl_ms],
                    client=pipe,
                )
            # One stamp per user, not per device: last seen is per user.
            for user_id in dict.fromkeys(e[0] for e in entries):
                await self._stamp_in(pipe, user_id)
            results = await pipe.execute()
        return [Refreshed(int(r)) for r in results[: len(entries)]]

    async def unregister(self, user_id: str, device_id: str, connection_id: str) -> bool:
        """Removes the device's route if it is still `connection_id`'s, and stamps
        the user's last seen (also when the route was another connection's: this
        one was connected until now either way)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._unregister(
                keys=[self.key(user_id)], args=[device_id, connection_id], client=pipe
            )
            await self._stamp_in(pipe, user_id)
            removed, _stamped = await pipe.execute()
        return bool(int(removed))

    async def lookup_many(self, user_ids: list[str]) -> dict[str, list[Route]]:
        """Live routes of every device of each user, in one pipeline (users without
        one are absent)."""
        users = list(dict.fromkeys(user_ids))
        if not users:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id in users:
                await self._lookup(keys=[self.key(user_id)], args=[], client=pipe)
            results = await pipe.execute()
        out: dict[str, list[Route]] = {}
        for user_id, flat in zip(users, results, strict=True):
            if flat:
                out[user_id] = _routes(flat)
        return out

    async def lookup(self, user_id: str) -> list[Route]:
        """Live routes of every device of `user_id`."""
        flat = await self._lookup(keys=[self.key(user_id)], args=[])
        return _routes(flat)


def _routes(flat: list[Any]) -> list[Route]:
    """Routes from LOOKUP's flat list (device, connection_id, gateway, ...)."""
    return [
        Route(
            device_id=_text(flat[i]),
            connection_id=_text(flat[i + 1]),
            gateway=_text(flat[i + 2]),
        )
        for i in range(0, len(flat), 3)
    ]
