"""Hub route bookkeeping against a real Redis, with the interleavings that matter
forced deterministically (a stand-in for the stream object: the hub only uses its
key, connection id, closing flag, kick and log fields)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from gateway.connection import Connection
from gateway.hub import Hub
from gateway.routes import RouteTable
from imdev.servers import RedisServer


@dataclass(eq=False)
class FakeStream:
    key: tuple[str, str]
    connection_id: str
    closing: bool = False
    kicked: list[str] = field(default_factory=list)

    def kick(self, reason: str) -> None:
        self.kicked.append(reason)
        self.closing = True

    def log_extra(self) -> dict[str, object]:
        return {"user": self.key[0], "device": self.key[1]}


@pytest.fixture
async def routes(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[RouteTable]:
    client = aioredis.from_url(redis_server.url())
    yield RouteTable(client, key_prefix + ":", ttl_s=30)
    await client.aclose()


async def test_a_refresh_racing_a_disconnect_leaves_no_route(routes: RouteTable) -> None:
    """The stream ends while a refresh round is in Redis: detach's compare-and-delete
    runs first, then the refresh re-creates the route. The hub must remove it
    again, or pushes go to a closed stream until the TTL (30 s) runs out."""
    hub = Hub(routes, cast(Any, None), lambda: "127.0.0.1:1", refresh_interval_s=10)
    stream = FakeStream(("alice", "phone"), "c1")
    conn = cast(Connection, stream)
    await hub.attach(conn)
    assert [r.connection_id for r in await routes.lookup("alice")] == ["c1"]

    real_refresh = routes.refresh_many

    async def refresh_after_detach(entries: list[tuple[str, str, str, str]]) -> list[bool]:
        stream.closing = True
        await hub.detach(conn)  # the stream ends mid-round
        assert await routes.lookup("alice") == []
        return await real_refresh(entries)  # ...and the refresh re-creates the route

    routes.refresh_many = refresh_after_detach  # type: ignore[method-assign]
    await hub.refresh_routes()
    assert await routes.lookup("alice") == []
    assert stream.kicked == []
