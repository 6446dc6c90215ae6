"""Hub route bookkeeping against a real Redis, with the interleavings that matter
forced deterministically (a stand-in for the stream object: the hub only uses its
key, connection id, closing flag, kick and log fields), and the repair of routes
Redis lost (flush, restart, kill -9, an outage) against a private redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from gwkit import wait_for
from redis.exceptions import RedisError

from gateway.connection import Connection
from gateway.hub import Hub
from gateway.routes import RouteTable
from imcommon.redisconn import redis_client
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


# -- Redis losing the routes --------------------------------------------------
#
# The hub runs its keeper loop (`refresh_loop`) against a private redis-server,
# through one pooled client made the way the gateway makes it. The refresh round
# is 10 s apart, so a route back within RESTORE_S was put back by the repair,
# not by the round.

#: How soon after Redis lost the routes (or answers again) they must be back.
RESTORE_S = 2.0
GATEWAY = "127.0.0.1:1"


@dataclass
class KeptHub:
    hub: Hub
    server: RedisServer
    prefix: str
    restored: list[Connection]

    def stream(self, user: str, connection_id: str) -> FakeStream:
        return FakeStream((user, "phone"), connection_id)

    async def attach(self, *streams: FakeStream) -> None:
        for stream in streams:
            await self.hub.attach(cast(Connection, stream))

    async def routed(self, *streams: FakeStream) -> bool:
        """Whether Redis holds each stream's route (read with a fresh client, so
        the check itself never depends on the hub's pool or retry policy)."""
        try:
            async with aioredis.from_url(self.server.url(), socket_timeout=1) as client:
                table = RouteTable(client, self.prefix, ttl_s=30)
                for s in streams:
                    found = {
                        (r.device_id, r.connection_id, r.gateway)
                        for r in await table.lookup(s.key[0])
                    }
                    if (s.key[1], s.connection_id, GATEWAY) not in found:
                        return False
        except RedisError:
            return False
        return True

    async def flushall(self) -> None:
        async with aioredis.from_url(self.server.url()) as client:
            await client.flushall()

    def restored_set(self) -> set[object]:
        return set(map(id, self.restored))


def ids(*streams: FakeStream) -> set[object]:
    return set(map(id, streams))


@pytest.fixture
async def kept(redis_factory: Callable[[], RedisServer], key_prefix: str) -> AsyncIterator[KeptHub]:
    server = redis_factory()
    client = redis_client(server.url(), timeout_s=0.5)
    prefix = key_prefix + ":"
    restored: list[Connection] = []
    hub = Hub(
        RouteTable(client, prefix, ttl_s=30),
        cast(Any, None),
        lambda: GATEWAY,
        refresh_interval_s=10,
        check_interval_s=1.0,
        on_routes_restored=restored.extend,
    )
    keeper = asyncio.create_task(hub.refresh_loop())
    yield KeptHub(hub, server, prefix, restored)
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    await client.aclose()


async def test_flushall_brings_every_route_back_at_once(kept: KeptHub) -> None:
    streams = [kept.stream(f"u{i}", f"c{i}") for i in range(3)]
    await kept.attach(*streams)
    await wait_for(lambda: kept.routed(*streams), what="routes registered")
    await kept.flushall()
    flushed = time.monotonic()
    late = kept.stream("late", "c9")  # connects after the flush: never lost its route
    await kept.attach(late)
    await wait_for(lambda: kept.routed(*streams, late), timeout=RESTORE_S, what="routes back")
    log_elapsed("routes back after FLUSHALL", flushed)
    # Exactly the streams whose routes were lost, each once.
    await wait_for(lambda: kept.restored_set() == ids(*streams), timeout=1, what="callback")
    assert len(kept.restored) == len(streams)


@pytest.mark.parametrize("hard", [False, True], ids=["restart", "kill-9"])
async def test_redis_restart_brings_every_route_back_at_once(kept: KeptHub, hard: bool) -> None:
    streams = [kept.stream(f"u{i}", f"c{i}") for i in range(3)]
    await kept.attach(*streams)
    await wait_for(lambda: kept.routed(*streams), what="routes registered")
    await asyncio.to_thread(kept.server.restart, hard=hard)  # no persistence: comes back empty
    back = time.monotonic()
    await wait_for(lambda: kept.routed(*streams), timeout=RESTORE_S, what="routes back")
    log_elapsed("routes back after the restart", back)
    await wait_for(lambda: kept.restored_set() == ids(*streams), timeout=1, what="callback")
    assert len(kept.restored) == len(streams)


async def test_a_stream_opened_while_redis_is_down_gets_its_route_once_redis_answers(
    kept: KeptHub,
) -> None:
    before = kept.stream("before", "c1")
    await kept.attach(before)
    await wait_for(lambda: kept.routed(before), what="route registered")
    await asyncio.to_thread(kept.server.stop)
    during = kept.stream("during", "c2")
    started = time.monotonic()
    await kept.attach(during)  # its Welcome waits for this: bounded by the retry policy
    assert time.monotonic() - started < 2.5
    # The outage lasts a few keeper attempts (the hub backs off meanwhile).
    await asyncio.sleep(1.5)  # the outage itself, not a synchronisation
    assert kept.restored == []
    await asyncio.to_thread(kept.server.start)
    back = time.monotonic()
    await wait_for(lambda: kept.routed(before, during), timeout=RESTORE_S, what="routes back")
    log_elapsed("routes back after the outage", back)
    await wait_for(lambda: kept.restored_set() == ids(before, during), timeout=1, what="callback")
    assert len(kept.restored) == 2


async def test_a_restart_from_a_snapshot_is_found_by_the_forgotten_check_script(
    kept: KeptHub,
) -> None:
    """Redis restarted from a snapshot taken after the sentinel was written but
    before one route was (simulated: that route deleted, the script cache flushed,
    the sentinel kept). Only that stream is reported restored."""
    streams = [kept.stream(f"u{i}", f"c{i}") for i in range(3)]
    await kept.attach(*streams)
    async with aioredis.from_url(kept.server.url()) as client:
        table = RouteTable(client, kept.prefix, ttl_s=30)
        await wait_for(lambda: client.exists(table.sentinel_key(GATEWAY)), what="sentinel")
        await wait_for(lambda: kept.routed(*streams), what="routes registered")
        await client.delete(table.key("u1"))
        await client.script_flush()
    lost = time.monotonic()
    await wait_for(lambda: kept.routed(*streams), timeout=RESTORE_S, what="route back")
    log_elapsed("route back after the simulated snapshot restart", lost)
    await wait_for(lambda: kept.restored_set() == ids(streams[1]), timeout=1, what="callback")
    assert len(kept.restored) == 1


async def test_between_rounds_an_idle_hub_sends_one_check_per_interval_whatever_its_streams(
    redis_factory: Callable[[], RedisServer], key_prefix: str
) -> None:
    server = redis_factory()
    client = redis_client(server.url(), timeout_s=0.5)
    hub = Hub(
        RouteTable(client, key_prefix + ":", ttl_s=30),
        cast(Any, None),
        lambda: GATEWAY,
        refresh_interval_s=20,  # no round inside the measured window
        check_interval_s=0.2,
    )
    for i in range(200):
        await hub.attach(cast(Connection, FakeStream((f"u{i}", "phone"), f"c{i}")))
    async with aioredis.from_url(server.url()) as admin:

        async def calls() -> dict[str, int]:
            stats = await admin.info("commandstats")
            return {
                name.removeprefix("cmdstat_"): int(stat["calls"])
                for name, stat in stats.items()
                if name not in {"cmdstat_info", "cmdstat_config|resetstat"}
            }

        keeper = asyncio.create_task(hub.refresh_loop())
        try:
            # The start-up round: one refresh per stream. Its scripts run TIME; the
            # checks' script does not. Counting EVALSHA alone could end the wait
            # early (the checks are EVALSHA too): wait for a window without TIME.
            await wait_for(lambda: _has(calls(), "evalsha", 200), what="the first round")

            async def round_over() -> bool:
                await admin.config_resetstat()
                await asyncio.sleep(0.5)
                return "time" not in await calls()

            await wait_for(round_over, what="the first round to end")
            await admin.config_resetstat()
            await wait_for(lambda: _has(calls(), "evalsha", 5), what="five checks")
            counted = await calls()
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await client.aclose()
    # Each check is one EVALSHA running one EXISTS; nothing per stream.
    checks = counted["evalsha"]
    assert counted == {"evalsha": checks, "exists": checks}, counted


async def _has(calls: Awaitable[dict[str, int]], command: str, at_least: int) -> bool:
    return (await calls).get(command, 0) >= at_least


def log_elapsed(what: str, since: float) -> None:
    print(f"{what}: {time.monotonic() - since:.2f} s")  # shown with -s or on failure
