"""Routes in Redis: which gateway holds the stream of each online device.

Key layout (the contract with pusher, whose `pusher/routes.py` reads it):

    <prefix>route:<user_id>           HASH    device_id -> "<expires_ms>|<connection_id>|<gateway>"
    <prefix>routes-alive:<gateway>    STRING  "1", the gateway's sentinel (below)

- one hash per user, so "all online devices of user U and their gateway" is one
  HGETALL (no SCAN), and every script touches exactly one key (cluster-safe);
- `expires_ms` is Redis server time (TIME inside the scripts, so gateway and pusher
  clocks never matter); readers ignore expired fields, writers prune them;
- the hash itself has a PEXPIRE of at least the route TTL, refreshed with the
  fields, so a user whose gateways all died disappears entirely;
- `connection_id` makes removal a compare-and-delete: a closing stream removes the
  route only if it is still its own, never a newer connection's.

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

# KEYS[1] a gateway's sentinel key: 1 if it exists. Run by its SHA only (EVALSHA),
# so NOSCRIPT tells that Redis emptied its script cache: it restarted (perhaps
# from a snapshot older than some routes), failed over to a replica that does not
# know the script, or ran SCRIPT FLUSH.
CHECK = "return redis.call('EXISTS', KEYS[1])"
_CHECK_SHA = hashlib.sha1(CHECK.encode()).hexdigest()


def route_key(prefix: str, user_id: str) -> str:
    return f"{prefix}route:{user_id}"


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

    def __init__(self, redis: aioredis.Redis, prefix: str, ttl_s: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._register = redis.register_script(REGISTER)
        self._refresh = redis.register_script(REFRESH)
        self._unregister = redis.register_script(UNREGISTER)
        self._lookup = redis.register_script(LOOKUP)

    def key(self, user_id: str) -> str:
        return route_key(self._prefix, user_id)

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
        prev = await self._register(
            keys=[self.key(user_id)], args=[device_id, connection_id, gateway, self._ttl_ms]
        )
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
            results = await pipe.execute()
        return [Refreshed(int(r)) for r in results]

    async def unregister(self, user_id: str, device_id: str, connection_id: str) -> bool:
        """Removes the device's route if it is still `connection_id`'s."""
        return bool(
            int(await self._unregister(keys=[self.key(user_id)], args=[device_id, connection_id]))
        )

    async def lookup(self, user_id: str) -> list[Route]:
        """Live routes of every device of `user_id`."""
        flat = await self._lookup(keys=[self.key(user_id)], args=[])
        return [
            Route(
                device_id=_text(flat[i]),
                connection_id=_text(flat[i + 1]),
                gateway=_text(flat[i + 2]),
            )
            for i in range(0, len(flat), 3)
        ]
