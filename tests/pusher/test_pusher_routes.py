"""The Redis route layout: the gateway's writes (gateway.routes) and the pusher's
reads (pusher.routes) against a real Redis, so the two sides cannot drift."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from gateway.routes import Refreshed, RouteTable
from imcommon.redisconn import redis_client
from imdev.servers import RedisServer
from pusher.routes import RouteReader


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _no_device(reader: RouteReader, user: str, device: str) -> bool:
    return device not in (await reader.devices([user])).get(user, {})


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url())
    yield client
    await client.aclose()


async def test_register_lookup_unregister(redis: aioredis.Redis, key_prefix: str) -> None:
    table = RouteTable(redis, key_prefix, ttl_s=30)
    reader = RouteReader(redis, key_prefix)
    assert await table.register("alice", "phone", "c1", "gw-a:1") is None
    assert await table.register("alice", "laptop", "c2", "gw-b:1") is None
    assert await table.register("bob", "phone", "c3", "gw-a:1") is None
    assert await reader.devices(["alice", "bob", "carol"]) == {
        "alice": {"phone": "gw-a:1", "laptop": "gw-b:1"},
        "bob": {"phone": "gw-a:1"},
    }
    # Compare-and-delete: only the owner's connection id removes the route.
    assert not await table.unregister("alice", "phone", "someone-else")
    assert await table.unregister("alice", "phone", "c1")
    assert await reader.devices(["alice"]) == {"alice": {"laptop": "gw-b:1"}}


async def test_replacing_returns_the_previous_connection(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    table = RouteTable(redis, key_prefix, ttl_s=30)
    await table.register("alice", "phone", "c1", "gw-a:1")
    prev = await table.register("alice", "phone", "c2", "gw-b:1")
    assert prev is not None and (prev.connection_id, prev.gateway) == ("c1", "gw-a:1")
    # Re-registering the same connection is not a replacement.
    assert await table.register("alice", "phone", "c2", "gw-b:1") is None
    # The replaced connection's refresh reports it lost the route, and writes nothing.
    assert await table.refresh_many([("alice", "phone", "c1", "gw-a:1")]) == [Refreshed.TAKEN]
    assert [r.connection_id for r in await table.lookup("alice")] == ["c2"]


async def test_refresh_recreates_a_flushed_route(redis: aioredis.Redis, key_prefix: str) -> None:
    table = RouteTable(redis, key_prefix, ttl_s=30)
    await table.register("alice", "phone", "c1", "gw-a:1")
    assert await table.refresh_many([("alice", "phone", "c1", "gw-a:1")]) == [Refreshed.EXTENDED]
    await redis.delete(table.key("alice"))
    assert await table.refresh_many([("alice", "phone", "c1", "gw-a:1")]) == [Refreshed.RECREATED]
    assert [r.connection_id for r in await table.lookup("alice")] == ["c1"]


async def test_expired_routes_are_invisible_and_pruned(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    short = RouteTable(redis, key_prefix, ttl_s=0.2)
    long = RouteTable(redis, key_prefix, ttl_s=30)
    reader = RouteReader(redis, key_prefix)
    await short.register("alice", "old-phone", "c1", "gw-a:1")
    await long.register("alice", "laptop", "c2", "gw-a:1")
    # The hash lives as long as its longest route.
    assert await redis.pttl(short.key("alice")) > 20_000
    deadline_fields = await redis.hlen(short.key("alice"))
    assert deadline_fields == 2
    # Wait (by Redis's own clock) until the short one has expired.
    await until(lambda: _no_device(reader, "alice", "old-phone"))
    assert await reader.devices(["alice"]) == {"alice": {"laptop": "gw-a:1"}}
    # An expired route of another connection does not block a refresh, and the
    # next write prunes dead fields.
    assert await long.refresh_many([("alice", "old-phone", "c9", "gw-b:1")]) == [
        Refreshed.RECREATED
    ]
    await long.unregister("alice", "old-phone", "c9")
    assert await redis.hkeys(short.key("alice")) == [b"laptop"]


async def test_whole_user_expires(redis: aioredis.Redis, key_prefix: str) -> None:
    table = RouteTable(redis, key_prefix, ttl_s=0.2)
    await table.register("alice", "phone", "c1", "gw-a:1")
    assert 0 < await redis.pttl(table.key("alice")) <= 200
    await until(lambda: _gone(redis, table.key("alice")))
    assert await RouteReader(redis, key_prefix).devices(["alice"]) == {}


async def test_a_lookup_right_after_a_redis_restart_succeeds(
    redis_factory: Callable[[], RedisServer], key_prefix: str
) -> None:
    """The pusher's pooled connection dies with the Redis it was connected to; its
    first lookup after the restart must still answer (the retry policy reconnects),
    not fail and leave the pushes of that batch to sync."""
    server = redis_factory()
    client = redis_client(server.url(), timeout_s=1.0)  # as pusher/server.py makes it
    try:
        reader = RouteReader(client, key_prefix)
        assert await reader.devices(["alice"]) == {}  # the pool now holds a connection
        await asyncio.to_thread(server.restart)
        async with aioredis.from_url(server.url()) as gateway_side:
            await RouteTable(gateway_side, key_prefix, ttl_s=30).register(
                "alice", "phone", "c1", "gw-a:1"
            )
        assert await reader.devices(["alice"]) == {"alice": {"phone": "gw-a:1"}}
    finally:
        await client.aclose()
