"""The Redis client every service uses (imcommon.redisconn): connection errors and
timeouts are retried, within a bounded time, against a real redis-server."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from imcommon.redisconn import MAX_CONNECTIONS, RETRY_BUDGET_S, redis_client
from imdev.servers import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]


async def test_a_short_outage_is_bridged_by_the_retries(
    redis_factory: Callable[[], RedisServer],
) -> None:
    """Redis refuses connections for a moment (a restart): a call made meanwhile
    waits it out instead of failing."""
    server = redis_factory()
    client = redis_client(server.url(), timeout_s=1.0)
    try:
        await client.set("k", "v")
        server.stop()

        def come_back() -> None:
            time.sleep(0.3)  # the outage's length, not a synchronisation
            server.start()

        restart = asyncio.ensure_future(asyncio.to_thread(come_back))
        assert await client.set("k", "v2")
        await restart
        assert await client.get("k") == b"v2"
    finally:
        await client.aclose()


async def _connections_named(server: RedisServer, name: str) -> int:
    """Connections Redis holds for clients named `name` (CLIENT LIST)."""
    admin = redis_client(server.url(), timeout_s=1.0)
    try:
        clients = await admin.client_list(_type="normal")
    finally:
        await admin.aclose()
    return sum(1 for c in clients if c.get("name") == name)


@pytest.mark.parametrize("max_connections", [None, 3])
async def test_a_burst_larger_than_the_pool_waits_for_pooled_connections(
    redis_server: RedisServer, max_connections: int | None
) -> None:
    """More calls at once than the pool holds (a connect or disconnect storm's route
    writes on a gateway): every call succeeds, the extra ones once a pooled
    connection is free, and Redis never holds more than the bound of connections
    from the client. (redis-py's own pool opens up to 100 and fails every call
    beyond that with "Too many connections", which the gateway took for Redis
    being down.)"""
    bound = max_connections or MAX_CONNECTIONS
    name = f"burst-{uuid.uuid4().hex[:8]}"
    kwargs = {} if max_connections is None else {"max_connections": max_connections}
    client = redis_client(redis_server.url(), timeout_s=1.0, client_name=name, **kwargs)
    key = f"burst:{name}"
    calls = max(300, 4 * bound)
    try:
        got = await asyncio.gather(*(client.incr(key) for _ in range(calls)))
        assert sorted(got) == list(range(1, calls + 1))
        # Idle pooled connections stay open: what Redis holds now is the most the
        # client ever opened.
        assert 1 <= await _connections_named(redis_server, name) <= bound
    finally:
        await client.aclose()
    assert await _connections_named(redis_server, name) == 0


@pytest.fixture
async def mute_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers (a hung Redis)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    port = free_port()
    server = await asyncio.start_server(accept, "127.0.0.1", port)
    yield port
    server.close()
    for writer in held:
        writer.close()
    with contextlib.suppress(Exception):
        await server.wait_closed()


async def test_a_hung_redis_fails_a_call_within_the_retry_budget(mute_server: int) -> None:
    """redis-py nests retries (the connect inside a command's retry, the health
    check inside a send): the budget bounds the whole call, not each level."""
    timeout_s = 0.2
    client = redis_client(f"redis://127.0.0.1:{mute_server}/0", timeout_s=timeout_s)
    try:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await client.get("k")
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    # At least one retry happened; no new attempt began after the budget, and one
    # attempt is at most a connect timeout plus a command timeout.
    assert 2 * timeout_s <= elapsed <= RETRY_BUDGET_S + 2 * timeout_s + 0.5, elapsed


def test_every_service_builds_its_redis_clients_with_the_helper() -> None:
    """A client built any other way would silently have no retry policy
    (redis-py's from_url retries 0 times)."""
    offenders = []
    for path in (ROOT / "services").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = getattr(func, "attr", None) or getattr(func, "id", None)
            if name in {"from_url", "from_pool", "Redis", "StrictRedis", "ConnectionPool"}:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
