"""Routes in Redis: which gateway holds the stream of each online device.

Key layout (the contract with pusher, whose `pusher/routes.py` reads it):

    <prefix>route:<user_id>   HASH  device_id -> "<expires_ms>|<connection_id>|<gateway>"

- one hash per user, so "all online devices of user U and their gateway" is one
  HGETALL (no SCAN), and every script touches exactly one key (cluster-safe);
- `expires_ms` is Redis server time (TIME inside the scripts, so gateway and pusher
  clocks never matter); readers ignore expired fields, writers prune them;
- the hash itself has a PEXPIRE of at least the route TTL, refreshed with the
  fields, so a user whose gateways all died disappears entirely;
- `connection_id` makes removal a compare-and-delete: a closing stream removes the
  route only if it is still its own, never a newer connection's.

Presence is a cache: losing Redis (flush, restart, outage) loses no message. Devices
heal by sync; every open stream re-registers on its next refresh.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

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

# Same arguments. Extends the route if it is still ours, or re-creates it if it is
# gone (Redis flushed or restarted, or it expired); returns 0 without writing if a
# live route of another connection replaced it, else 1.
REFRESH = (
    _NOW
    + """
local ttl = tonumber(ARGV[4])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local exp, id = string.match(cur, '^(%d+)|([^|]*)|')
  if id ~= ARGV[2] and exp and tonumber(exp) > now then return 0 end
end
"""
    + _WRITE
    + """
return 1
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


def route_key(prefix: str, user_id: str) -> str:
    return f"{prefix}route:{user_id}"


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

    Every method is a single Lua script on a single key: atomic, one round trip.
    Methods raise redis exceptions; callers decide how much a failure matters
    (for the gateway: log it, the next refresh repairs it).
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

    async def register(
        self, user_id: str, device_id: str, connection_id: str, gateway: str
    ) -> Route | None:
        """Points the device's route at `gateway`/`connection_id`; returns the
        live route it replaced, if it belonged to another connection."""
        prev = await self._register(
            keys=[self.key(user_id)], args=[device_id, connection_id, gateway, self._ttl_ms]
        )
        return parse_route(device_id, prev) if prev else None

    async def refresh_many(self, entries: list[tuple[str, str, str, str]]) -> list[bool]:
        """Refreshes (user, device, connection_id, gateway) routes in one pipeline;
        False for each one that another live connection has taken over."""
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
        return [bool(int(r)) for r in results]

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
