"""Reads device routes written by the gateways.

Key layout (defined in gateway/routes.py; kept in step by
tests/pusher/test_pusher_routes.py):

    <prefix>route:<user_id>   HASH  device_id -> "<expires_ms>|<connection_id>|<gateway>"

Expired fields are skipped using Redis server time, inside one Lua script per
user; the lookups for many users go in one pipeline (one round trip, no SCAN). The
script is called by its SHA1 (EVALSHA); only if Redis does not know it (NOSCRIPT:
first use, restart, SCRIPT FLUSH) does the pipeline go again with the script body
(EVAL, which also caches it). Unlike redis-py's registered scripts this sends no
SCRIPT EXISTS before every pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

# KEYS[1] route key. Live routes as a flat list: device, gateway, ...
LOOKUP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp, gw = string.match(all[i + 1], '^(%d+)|[^|]*|(.*)$')
  if exp and tonumber(exp) > now then
    out[#out + 1] = all[i]
    out[#out + 1] = gw
  end
end
return out
"""
_LOOKUP_SHA = hashlib.sha1(LOOKUP.encode()).hexdigest()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RouteReader:
    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    def key(self, user_id: str) -> str:
        return f"{self._prefix}route:{user_id}"

    async def devices(self, user_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """{user: {device: gateway address}} for the online devices of each user
        (users with none are absent). Raises redis errors."""
        users = list(dict.fromkeys(user_ids))
        if not users:
            return {}
        keys = [self.key(user) for user in users]
        results = await self._lookup(keys, by_sha=True)
        if any(isinstance(r, NoScriptError) for r in results):
            results = await self._lookup(keys, by_sha=False)
        out: dict[str, dict[str, str]] = {}
        for user, flat in zip(users, results, strict=True):
            if isinstance(flat, Exception):
                raise flat
            if flat:
                out[user] = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return out

    async def _lookup(self, keys: list[str], *, by_sha: bool) -> list[Any]:
        """One pipeline of LOOKUP calls, one per key; errors come back in the list."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                if by_sha:
                    pipe.evalsha(_LOOKUP_SHA, 1, key)
                else:
                    pipe.eval(LOOKUP, 1, key)
            return await pipe.execute(raise_on_error=False)
