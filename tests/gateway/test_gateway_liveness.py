"""Liveness of open streams (I9, gateway/heads.py): a stream learns its timeline
head without waiting for the next message, and the gateway pushes what the push
path dropped.

The gateway runs in the test process with the real servicers, Hub and Liveness;
the timeline is an in-memory HeadSource (the same Protocol logic implements), so
a test can put an entry in a timeline that no pusher ever pushes: exactly what a
Redis flush, a pusher killed after its fan-out commit or a repaired fan-out leave.
The client is a raw stream that reads frames and ACKs nothing unless told to.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
import redis.asyncio as aioredis
from gwkit import SECRET, RawStream, ack_frame, deliver, ping_frame, token_for, unique_users

from gateway.config import Settings
from gateway.heads import Liveness
from gateway.hub import Hub
from gateway.routes import RouteTable
from gateway.servicer import GatewayInternalServicer, GatewayServicer, add_authenticated_gateway
from gateway.upstream import LogicClient, Peers
from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_internal_pb2_grpc, gateway_pb2
from imcommon.metrics import Metrics
from imcommon.server import server_options
from imdev.servers import RedisServer, free_port


@dataclass
class MemoryTimelines:
    """An in-memory HeadSource: per-user timelines, and a switch that makes the
    store unavailable."""

    rows: dict[str, list[common_pb2.TimelineEntry]] = field(default_factory=dict)
    down: bool = False
    head_calls: int = 0
    entry_calls: int = 0

    def append(self, user: str, text: str) -> int:
        rows = self.rows.setdefault(user, [])
        seq = (rows[-1].seq if rows else 0) + 1
        rows.append(
            common_pb2.TimelineEntry(
                seq=seq,
                message=common_pb2.Message(msg_id=1000 + seq, body=text.encode(), conv_seq=seq),
            )
        )
        return seq

    def _check(self) -> None:
        if self.down:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "store down (test)",
            )

    async def heads(self, user_ids: Sequence[str]) -> list[int]:
        self.head_calls += 1
        self._check()
        return [(r[-1].seq if (r := self.rows.get(u)) else 0) for u in user_ids]

    async def entries(
        self, user_id: str, after_seq: int, limit: int
    ) -> tuple[list[common_pb2.TimelineEntry], bool]:
        self.entry_calls += 1
        self._check()
        rest = [e for e in self.rows.get(user_id, []) if e.seq > after_seq]
        return rest[:limit], len(rest) > limit


@dataclass
class Gateway:
    address: str
    timelines: MemoryTimelines
    liveness: Liveness
    metrics: Metrics

    def stream(self, user: str, device: str = "d1") -> RawStream:
        return RawStream(self.address, token_for(user, device))

    def count(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(f"im_{name}_total")
        return value or 0.0


async def start_gateway(
    redis_url: str, prefix: str, timelines: MemoryTimelines, **overrides: object
) -> tuple[Gateway, grpc.aio.Server, list[object]]:
    settings = Settings(
        token_secret=SECRET,
        redis_url=redis_url,
        redis_prefix=prefix,
        logic_address=f"127.0.0.1:{free_port()}",
        logic_retry_s=0,
        logic_timeout_s=2,
        liveness_s=3,
        heads_interval_s=0.4,
        catchup_grace_s=0.3,
        **overrides,  # type: ignore[arg-type]
    )
    metrics = Metrics("gateway-test")
    redis = aioredis.from_url(settings.redis_url)
    logic_channel = grpc.aio.insecure_channel(settings.logic_address)
    peers = Peers(metrics, settings.internal_timeout_s, ack_batch_s=settings.ack_batch_ms / 1000)
    routes = RouteTable(redis, settings.redis_prefix, settings.route_ttl_s)
    hub = Hub(routes, peers, lambda: address, settings.refresh_interval_s)
    logic = LogicClient(logic_channel, settings.logic_timeout_s, settings.logic_retry_s)
    liveness = Liveness(settings, timelines, metrics)
    server = grpc.aio.server(options=server_options(settings))
    add_authenticated_gateway(
        GatewayServicer(settings, hub, logic, peers, metrics, liveness),
        server,
        settings.token_secret,
    )
    gateway_internal_pb2_grpc.add_GatewayInternalServicer_to_server(
        GatewayInternalServicer(hub, metrics), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    await server.start()
    runner = asyncio.create_task(liveness.run())
    return (
        Gateway(address, timelines, liveness, metrics),
        server,
        [runner, peers, logic_channel, redis],
    )


@pytest.fixture
async def gateway(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[Gateway]:
    gw, server, (runner, peers, channel, redis) = await start_gateway(
        redis_server.url(), f"{key_prefix}:", MemoryTimelines()
    )
    yield gw
    runner.cancel()  # type: ignore[attr-defined]
    await server.stop(0)
    await peers.close()  # type: ignore[attr-defined]
    await channel.close()  # type: ignore[attr-defined]
    await redis.aclose()  # type: ignore[attr-defined]


async def frames_until(
    stream: RawStream, done: object, timeout: float
) -> list[gateway_pb2.ServerFrame]:
    """Reads frames until `done(frames)` holds (fails after `timeout`)."""
    got: list[gateway_pb2.ServerFrame] = []
    deadline = time.monotonic() + timeout
    while not done(got):  # type: ignore[operator]
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"timed out; frames so far: {[f.WhichOneof('frame') for f in got]}"
            )
        try:
            got.append(await stream.next(left))
        except TimeoutError:
            continue
    return got


def pushes(frames: list[gateway_pb2.ServerFrame]) -> list[int]:
    return [f.push.seq for f in frames if f.WhichOneof("frame") == "push"]


def heads(frames: list[gateway_pb2.ServerFrame]) -> list[int]:
    return [f.head.seq for f in frames if f.WhichOneof("frame") == "head"]


async def test_welcome_carries_the_head_and_a_dropped_push_is_told_then_pushed(
    gateway: Gateway,
) -> None:
    (bob,) = unique_users(1)
    for text in ("old-1", "old-2"):
        gateway.timelines.append(bob, text)
    s = gateway.stream(bob)
    try:
        welcome = await s.welcome()
        assert welcome.head_seq == 2  # entries up to here are the client's own sync
        # Two entries reach bob's timeline and no pusher pushes them.
        gateway.timelines.append(bob, "new-3")
        gateway.timelines.append(bob, "new-4")
        started = time.monotonic()
        frames = await frames_until(s, lambda f: len(heads(f)) == 2, timeout=3)
        took = time.monotonic() - started
        # First the Head (a client that syncs would stop here), then, since this
        # client did not acknowledge it within the grace, the entries themselves,
        # in seq order, each once, and the Head again (for a client that lost
        # them); nothing at or below the Welcome head.
        kinds = [f.WhichOneof("frame") for f in frames]
        assert kinds == ["head", "push", "push", "head"], kinds
        assert heads(frames) == [4, 4] and pushes(frames) == [3, 4]
        assert [f.push.message.body for f in frames[1:3]] == [b"new-3", b"new-4"]
        assert took < 0.4 + 0.3 + 0.5 + 0.5  # interval + grace + two ticks, with slack
        await s.write(ack_frame(4))
        # Acknowledged: later checks stay silent.
        checks = gateway.count("gateway_head_checks")
        await asyncio.wait_for(_checks_beyond(gateway, checks + 2), 5)
        assert s.queue.empty()
    finally:
        await s.close()


async def _checks_beyond(gateway: Gateway, n: float) -> None:
    while gateway.count("gateway_head_checks") < n:
        await asyncio.sleep(0.05)


async def test_a_client_that_syncs_on_head_gets_no_catch_up(gateway: Gateway) -> None:
    (ann,) = unique_users(1)
    s = gateway.stream(ann)
    try:
        assert (await s.welcome()).head_seq == 0
        gateway.timelines.append(ann, "one")
        head = await s.next_of("head", timeout=3)
        assert head.seq == 1
        await s.write(ack_frame(1))  # what a client does after its sync
        catchups = gateway.count("gateway_catchups")
        checks = gateway.count("gateway_head_checks")
        await asyncio.wait_for(_checks_beyond(gateway, checks + 3), 5)
        assert gateway.count("gateway_catchups") == catchups
        assert s.queue.empty()
    finally:
        await s.close()


async def test_pushed_and_acknowledged_entries_cost_no_frame(gateway: Gateway) -> None:
    (cat,) = unique_users(1)
    s = gateway.stream(cat)
    try:
        await s.welcome()
        seq = gateway.timelines.append(cat, "pushed")
        # The normal path: the pusher's Deliver, and the client's ACK.
        assert await deliver(gateway.address, [(cat, "d1", seq, b"pushed")])
        push = await s.next_of("push", timeout=3)
        assert push.seq == seq
        await s.write(ack_frame(seq))
        checks = gateway.count("gateway_head_checks")
        await asyncio.wait_for(_checks_beyond(gateway, checks + 3), 5)
        assert s.queue.empty(), [f.WhichOneof("frame") for f in [s.queue.get_nowait()]]
    finally:
        await s.close()


async def test_a_pushed_but_unacknowledged_entry_is_pushed_again_then_a_head(
    gateway: Gateway,
) -> None:
    """A push the client never acknowledged (it got lost between gateway and app, or
    the app dropped it) is repeated by the catch-up, then a Head; no Head before,
    since it was pushed."""
    (dan,) = unique_users(1)
    s = gateway.stream(dan)
    try:
        await s.welcome()
        seq = gateway.timelines.append(dan, "pushed once")
        assert await deliver(gateway.address, [(dan, "d1", seq, b"pushed once")])
        frames = await frames_until(s, lambda f: heads(f) == [seq], timeout=4)
        assert [f.WhichOneof("frame") for f in frames] == ["push", "push", "head"]
        assert pushes(frames) == [seq, seq]
    finally:
        await s.close()


async def test_pong_carries_the_head(gateway: Gateway) -> None:
    (eve,) = unique_users(1)
    gateway.timelines.append(eve, "a")
    s = gateway.stream(eve)
    try:
        await s.welcome()
        gateway.timelines.append(eve, "b")
        await s.write(ping_frame(7))
        pong = await s.next_of("pong", timeout=3)
        assert (pong.nonce, pong.head_seq) == (7, 2)
    finally:
        await s.close()


async def test_store_down_at_connect_starts_the_cursor_at_the_first_head_read(
    gateway: Gateway,
) -> None:
    (fay,) = unique_users(1)
    gateway.timelines.append(fay, "before")
    gateway.timelines.down = True
    s = gateway.stream(fay)
    try:
        welcome = await s.welcome()
        assert welcome.head_seq == 0  # unknown
        # A Ping while the store is down: answered, head unknown.
        await s.write(ping_frame(1))
        assert (await s.next_of("pong", timeout=3)).head_seq == 0
        gateway.timelines.down = False
        # The first check sets the cursor at the head (1): nothing pushed for it.
        checks = gateway.count("gateway_head_checks")
        await asyncio.wait_for(_checks_beyond(gateway, checks + 2), 5)
        gateway.timelines.append(fay, "after")
        frames = await frames_until(s, lambda f: pushes(f) == [2], timeout=3)
        assert heads(frames) == [2]
    finally:
        await s.close()


async def test_a_catch_up_is_bounded_and_continues_on_the_next_check(
    redis_server: RedisServer, key_prefix: str
) -> None:
    gw, server, (runner, peers, channel, redis) = await start_gateway(
        redis_server.url(), f"{key_prefix}:", MemoryTimelines(), catchup_max_entries=3
    )
    (gus,) = unique_users(1)
    s = gw.stream(gus)
    try:
        await s.welcome()
        for i in range(7):
            gw.timelines.append(gus, f"m{i}")
        got: list[int] = []
        frames: list[gateway_pb2.ServerFrame] = []
        deadline = time.monotonic() + 10
        while len(got) < 7:
            assert time.monotonic() < deadline, got
            frame = await s.next(max(0.01, deadline - time.monotonic()))
            frames.append(frame)
            # An app that ACKs what it gets, in order.
            if frame.WhichOneof("frame") == "push" and frame.push.seq == len(got) + 1:
                got.append(frame.push.seq)
                await s.write(ack_frame(frame.push.seq))
        assert got == [1, 2, 3, 4, 5, 6, 7]
        # Rounds of at most 3 entries.
        assert gw.count("gateway_catchups") >= 3
    finally:
        await s.close()
        runner.cancel()  # type: ignore[attr-defined]
        await server.stop(0)
        await peers.close()  # type: ignore[attr-defined]
        await channel.close()  # type: ignore[attr-defined]
        await redis.aclose()  # type: ignore[attr-defined]


def test_the_bound_leaves_room_for_the_catch_up() -> None:
    with pytest.raises(ValueError, match="must leave"):
        Settings(liveness_s=5, heads_interval_s=3, catchup_grace_s=1)
    on = Settings()
    assert on.head_check_interval_s == pytest.approx(4.0)
    assert Settings(liveness_s=0).head_check_interval_s == 0
