"""The test servers themselves: real, restartable, isolated."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import nats
import psycopg
import redis.asyncio as aioredis

from imdev.servers import NatsServer, PostgresServer, RedisServer


async def test_postgres_database_per_test(pg_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t VALUES (1)")
        cur = await conn.execute("SELECT count(*) FROM t")
        assert await cur.fetchone() == (1,)


async def test_redis_restart(redis_factory: Callable[[], RedisServer]) -> None:
    server = redis_factory()
    client = aioredis.from_url(server.url())
    await client.set("k", "v")
    assert await client.get("k") == b"v"
    await client.aclose()
    server.restart(hard=True)
    client = aioredis.from_url(server.url())
    # No persistence configured: a restart forgets everything, as presence may.
    assert await client.get("k") is None
    await client.aclose()


async def test_postgres_survives_kill9(postgres_factory: Callable[..., PostgresServer]) -> None:
    server = postgres_factory()
    dsn = server.create_database("k9")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t VALUES (42)")
    server.restart(hard=True)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT x FROM t")
        assert await cur.fetchall() == [(42,)]


async def test_jetstream_message_survives_nats_kill9(
    nats_factory: Callable[[], NatsServer],
) -> None:
    server = nats_factory()
    nc = await nats.connect(server.url())
    js = nc.jetstream()
    await js.add_stream(name="S", subjects=["s.>"], storage="file")
    ack = await js.publish("s.1", b"hello", headers={"Nats-Msg-Id": "m1"})
    assert ack.seq == 1
    await nc.close()

    server.restart(hard=True)

    nc = await nats.connect(server.url())
    js = nc.jetstream()
    sub = await js.pull_subscribe("s.>", durable="d")
    msgs = await sub.fetch(1, timeout=5)
    assert [m.data for m in msgs] == [b"hello"]
    await msgs[0].ack()
    # The dedup window outlives the restart too: the same Nats-Msg-Id is dropped.
    again = await js.publish("s.1", b"hello", headers={"Nats-Msg-Id": "m1"})
    assert again.duplicate
    await nc.close()
    await asyncio.sleep(0)
