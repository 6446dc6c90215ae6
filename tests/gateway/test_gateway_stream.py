"""The Connect stream with raw frames, against a real gateway process and Redis.

No logic runs here (its address is a port nothing listens on): these tests cover
what the gateway decides alone, plus how it reports logic being unavailable.
Sends that logic stores are in test_gateway_with_logic.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import grpc
import pytest
import redis.asyncio as aioredis
from gwkit import (
    RawStream,
    deliver,
    expired_token,
    ping_frame,
    send_frame,
    token_for,
    wait_for,
)

from gateway.routes import RouteTable
from im.gateway.v1 import gateway_internal_pb2, gateway_pb2, gateway_pb2_grpc
from imdev.servers import RedisServer, ServiceProcess, free_port

Code = gateway_pb2.SendErrorCode
WRITTEN = gateway_internal_pb2.DeliveryStatus.DELIVERY_STATUS_WRITTEN
NOT_CONNECTED = gateway_internal_pb2.DeliveryStatus.DELIVERY_STATUS_NOT_CONNECTED
CONV = "d:alice:bob"


async def test_welcome_then_ping_pong(start_gateway: Callable[..., ServiceProcess]) -> None:
    gw = start_gateway(IM_GATEWAY_SEND_WINDOW="7", IM_GATEWAY_MAX_BODY_BYTES="1000")
    s = RawStream(gw.address, token_for("alice", "phone"))
    try:
        welcome = await s.welcome()
        assert (welcome.user_id, welcome.device_id) == ("alice", "phone")
        assert welcome.next_client_id == 1
        assert (welcome.send_window, welcome.max_body_bytes) == (7, 1000)
        assert welcome.connection_id and abs(welcome.server_time_ms / 1000 - time.time()) < 60
        await s.write(ping_frame(42))
        assert (await s.next_of("pong")).nonce == 42
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("token", "expect"),
    [
        (None, "missing metadata"),
        ("not-a-token", "malformed token"),
        ("expired", "expired"),
        ("forged", "signature does not match"),
    ],
)
async def test_bad_tokens_are_refused(
    start_gateway: Callable[..., ServiceProcess], token: str | None, expect: str
) -> None:
    gw = start_gateway()
    if token == "expired":
        token = expired_token("alice")
    elif token == "forged":
        token = token_for("alice", secret="someone-elses-secret-0123456789abcd")
    s = RawStream(gw.address, token)
    try:
        ended = await s.end()
        assert ended.code == grpc.StatusCode.UNAUTHENTICATED
        assert expect in ended.details
        assert not s.frames  # not even a Welcome
    finally:
        await s.close()
    # Unary calls are refused the same way.
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        md = [("authorization", f"Bearer {token}")] if token else None
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Sync(gateway_pb2.SyncRequest(after_seq=0), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListConversations(
                gateway_pb2.ListConversationsRequest(), metadata=md, timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_out_of_order_client_id(start_gateway: Callable[..., ServiceProcess]) -> None:
    gw = start_gateway()
    s = RawStream(gw.address, token_for("alice"))
    try:
        await s.welcome()
        await s.write(send_frame(3, CONV, client_msg_id="m3"))
        err = await s.next_of("send_error")
        assert (err.client_id, err.client_msg_id) == (3, "m3")
        assert err.code == Code.SEND_ERROR_CODE_OUT_OF_ORDER
        assert err.expected_client_id == 1 and not err.retryable
        assert "expected client_id 1" in err.reason
    finally:
        await s.close()


async def test_logic_down_is_retryable_and_does_not_consume_the_client_id(
    start_gateway: Callable[..., ServiceProcess],
) -> None:
    """Three pipelined sends while logic is down: 1 fails UNAVAILABLE (retryable),
    2 and 3 must not be stored before it, so they are refused OUT_OF_ORDER with
    expected 1; resending 1 is processed again (not treated as a duplicate)."""
    gw = start_gateway()
    s = RawStream(gw.address, token_for("alice"))
    try:
        await s.welcome()
        for cid in (1, 2, 3):
            await s.write(send_frame(cid, CONV, client_msg_id=f"m{cid}"))
        errors = [await s.next_of("send_error") for _ in range(3)]
        by_id = {e.client_id: e for e in errors}
        assert by_id[1].code == Code.SEND_ERROR_CODE_UNAVAILABLE and by_id[1].retryable
        for cid in (2, 3):
            assert by_id[cid].code == Code.SEND_ERROR_CODE_OUT_OF_ORDER
            assert by_id[cid].expected_client_id == 1
        await s.write(send_frame(1, CONV, client_msg_id="m1"))
        again = await s.next_of("send_error")
        assert (again.client_id, again.code) == (1, Code.SEND_ERROR_CODE_UNAVAILABLE)
    finally:
        await s.close()


async def test_oversized_and_invalid_sends_keep_the_stream_usable(
    start_gateway: Callable[..., ServiceProcess],
) -> None:
    gw = start_gateway(IM_GATEWAY_MAX_BODY_BYTES="1024")
    s = RawStream(gw.address, token_for("alice"))
    try:
        await s.welcome()
        cases = [
            (send_frame(1, CONV, body=b"x" * 1025), "1025 bytes; the limit is 1024"),
            (send_frame(1, CONV, body=b""), "body is empty"),
            (send_frame(1, "", body=b"x"), "conversation_id is empty"),
            (send_frame(1, CONV, client_msg_id="x" * 200), "client_msg_id is longer"),
            (send_frame(0, CONV), "client_id must be >= 1"),
        ]
        for frame, reason in cases:
            await s.write(frame)
            err = await s.next_of("send_error")
            assert err.code == Code.SEND_ERROR_CODE_INVALID_ARGUMENT, err
            assert not err.retryable
            assert reason in err.reason
        # Still usable, and client_id 1 was never consumed: a body of exactly the
        # limit goes on to logic (down here: UNAVAILABLE, not OUT_OF_ORDER).
        await s.write(ping_frame(1))
        assert (await s.next_of("pong")).nonce == 1
        await s.write(send_frame(1, CONV, body=b"x" * 1024))
        err = await s.next_of("send_error")
        assert (err.client_id, err.code) == (1, Code.SEND_ERROR_CODE_UNAVAILABLE)
    finally:
        await s.close()


async def test_frame_over_the_grpc_limit_ends_only_that_stream(
    start_gateway: Callable[..., ServiceProcess],
) -> None:
    gw = start_gateway(IM_GATEWAY_MAX_MESSAGE_BYTES="65536")
    other = RawStream(gw.address, token_for("carol"))
    s = RawStream(gw.address, token_for("alice"))
    try:
        await other.welcome()
        await s.welcome()
        await s.write(send_frame(1, CONV, body=b"x" * 70_000))
        ended = await s.end()
        assert ended.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await other.write(ping_frame(9))
        assert (await other.next_of("pong")).nonce == 9
    finally:
        await s.close()
        await other.close()


async def test_garbage_bytes_end_only_that_stream(
    start_gateway: Callable[..., ServiceProcess],
) -> None:
    gw = start_gateway()
    other = RawStream(gw.address, token_for("carol"))
    channel = grpc.aio.insecure_channel(gw.address)
    try:
        await other.welcome()
        raw = channel.stream_stream(
            "/im.gateway.v1.Gateway/Connect", request_serializer=None, response_deserializer=None
        )
        call = raw(metadata=[("authorization", f"Bearer {token_for('alice')}")])
        first = gateway_pb2.ServerFrame.FromString(await call.read())
        assert first.WhichOneof("frame") == "welcome"
        await call.write(b"\xff\xff\xff\xff\x0f garbage")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                if await call.read() is grpc.aio.EOF:
                    break
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid im.gateway.v1.ClientFrame" in (err.value.details() or "")
        # The gateway keeps serving: the other stream and a new one.
        await other.write(ping_frame(5))
        assert (await other.next_of("pong")).nonce == 5
        fresh = RawStream(gw.address, token_for("alice"))
        try:
            await fresh.welcome()
        finally:
            await fresh.close()
    finally:
        await other.close()
        await channel.close()


async def test_send_window_and_rate_limit(start_gateway: Callable[..., ServiceProcess]) -> None:
    """Logic is down and the gateway keeps retrying it for a while, so accepted
    sends stay in flight: the window fills; meanwhile the reader still answers
    pings (sends never block it)."""
    gw = start_gateway(IM_GATEWAY_SEND_WINDOW="2", IM_GATEWAY_LOGIC_RETRY_S="30")
    s = RawStream(gw.address, token_for("alice"))
    try:
        await s.welcome()
        await s.write(send_frame(1, CONV))
        await s.write(send_frame(2, CONV))
        await s.write(send_frame(3, CONV, client_msg_id="m3"))
        err = await s.next_of("send_error")
        assert (err.client_id, err.code, err.retryable) == (
            3,
            Code.SEND_ERROR_CODE_RATE_LIMITED,
            True,
        )
        assert "window of 2" in err.reason
        await s.write(ping_frame(77))
        assert (await s.next_of("pong", timeout=2)).nonce == 77
        # Still expected: 3 (the refused one did not consume its id).
        await s.write(send_frame(4, CONV))
        err = await s.next_of("send_error")
        assert (err.code, err.expected_client_id) == (Code.SEND_ERROR_CODE_OUT_OF_ORDER, 3)
    finally:
        await s.close()

    gw2 = start_gateway(
        IM_GATEWAY_SEND_RATE_PER_S="0.01", IM_GATEWAY_SEND_BURST="2", IM_GATEWAY_LOGIC_RETRY_S="30"
    )
    s = RawStream(gw2.address, token_for("alice"))
    try:
        await s.welcome()
        for cid in (1, 2, 3):
            await s.write(send_frame(cid, CONV))
        err = await s.next_of("send_error")
        assert (err.client_id, err.code, err.retryable) == (
            3,
            Code.SEND_ERROR_CODE_RATE_LIMITED,
            True,
        )
        assert "sends/s" in err.reason
    finally:
        await s.close()


@pytest.fixture
async def routes(redis_server: RedisServer, key_prefix: str):  # type: ignore[no-untyped-def]
    redis = aioredis.from_url(redis_server.url())
    yield RouteTable(redis, f"{key_prefix}:", ttl_s=30), redis
    await redis.aclose()


async def test_route_lifecycle(
    start_gateway: Callable[..., ServiceProcess], routes: tuple[RouteTable, aioredis.Redis]
) -> None:
    table, redis = routes
    gw = start_gateway(IM_GATEWAY_ROUTE_TTL_S="30")
    s = RawStream(gw.address, token_for("alice", "phone"))
    try:
        welcome = await s.welcome()
        found = await wait_for(lambda: table.lookup("alice"), what="route of alice")
        assert [(r.device_id, r.connection_id, r.gateway) for r in found] == [
            ("phone", welcome.connection_id, gw.address)
        ]
        ttl_ms = await redis.pttl(table.key("alice"))
        assert 20_000 < ttl_ms <= 30_000
    finally:
        await s.close()
    await wait_for(lambda: _empty(table.lookup("alice")), what="route removed")
    assert not await redis.exists(table.key("alice"))


async def _empty(lookup: object) -> bool:
    return not await lookup  # type: ignore[misc]


async def test_second_connection_of_a_device_kicks_the_first(
    start_gateway: Callable[..., ServiceProcess], routes: tuple[RouteTable, aioredis.Redis]
) -> None:
    table, _ = routes
    gw = start_gateway()
    first = RawStream(gw.address, token_for("alice", "phone"))
    laptop = RawStream(gw.address, token_for("alice", "laptop"))
    await first.welcome()
    await laptop.welcome()
    second = RawStream(gw.address, token_for("alice", "phone"))
    try:
        w2 = await second.welcome()
        kick = await first.next_of("kick")
        assert "replaced" in kick.reason
        assert (await first.end()).code == grpc.StatusCode.OK
        # The old stream's disconnect did not remove the new route (compare-and-delete).
        found = await wait_for(lambda: table.lookup("alice"))
        assert {r.device_id: r.connection_id for r in found}["phone"] == w2.connection_id
        await second.write(ping_frame(1))
        assert (await second.next_of("pong")).nonce == 1
        assert not any(f.WhichOneof("frame") == "kick" for f in laptop.frames)
    finally:
        for s in (first, second, laptop):
            await s.close()


async def test_connection_at_another_gateway_kicks_the_first(
    start_gateway: Callable[..., ServiceProcess], routes: tuple[RouteTable, aioredis.Redis]
) -> None:
    table, _ = routes
    g1, g2 = start_gateway(), start_gateway()
    first = RawStream(g1.address, token_for("alice", "phone"))
    try:
        await first.welcome()
        await wait_for(lambda: table.lookup("alice"))
        second = RawStream(g2.address, token_for("alice", "phone"))
        w2 = await second.welcome()
        assert "replaced" in (await first.next_of("kick", timeout=5)).reason
        assert (await first.end()).code == grpc.StatusCode.OK
        found = await wait_for(lambda: table.lookup("alice"))
        assert [(r.connection_id, r.gateway) for r in found] == [(w2.connection_id, g2.address)]
        await second.close()
    finally:
        await first.close()


async def test_deliver_writes_pushes_and_refuses_when_the_queue_is_full(
    start_gateway: Callable[..., ServiceProcess],
) -> None:
    """A client that does not read: once HTTP/2 flow control and the outbound
    queue (4 frames) are full, Deliver answers NOT_CONNECTED instead of blocking.
    What it answered WRITTEN is exactly what the client then reads."""
    gw = start_gateway(IM_GATEWAY_OUTBOUND_QUEUE="4")
    s = RawStream(gw.address, token_for("bob"), read=False)
    try:
        assert (await s.call.read()).WhichOneof("frame") == "welcome"
        assert await deliver(gw.address, [("nobody", "d1", 1, b"x")]) == [NOT_CONNECTED]
        big = b"x" * 60_000
        started = time.monotonic()
        statuses = await deliver(gw.address, [("bob", "d1", seq, big) for seq in range(1, 41)])
        assert time.monotonic() - started < 5
        assert WRITTEN in statuses and NOT_CONNECTED in statuses
        written = [seq for seq, st in zip(range(1, 41), statuses, strict=True) if st == WRITTEN]
        s.start_reading()
        got = [(await s.next_of("push")).seq for _ in written]
        assert got == written
    finally:
        await s.close()


async def test_sigterm_sends_goaway_and_removes_routes(
    start_gateway: Callable[..., ServiceProcess], routes: tuple[RouteTable, aioredis.Redis]
) -> None:
    table, _ = routes
    gw = start_gateway(IM_GATEWAY_GOAWAY_RECONNECT_MS="1234")
    streams = [RawStream(gw.address, token_for(u)) for u in ("alice", "bob")]
    try:
        for s in streams:
            await s.welcome()
        await wait_for(lambda: table.lookup("bob"))
        gw.signal(signal.SIGTERM)
        for s in streams:
            goaway = await s.next_of("go_away")
            assert goaway.reconnect_after_ms == 1234
            assert (await s.end()).code == grpc.StatusCode.OK
        assert await asyncio.to_thread(gw.wait, 10) == 0
        assert await table.lookup("alice") == [] and await table.lookup("bob") == []
    finally:
        for s in streams:
            await s.close()


async def test_redis_down_then_back_heals_routes(
    spawn: Callable[..., ServiceProcess],
    gateway_env: dict[str, str],
    redis_factory: Callable[[], RedisServer],
) -> None:
    """Streams work while Redis is down; once Redis is back (empty), every open
    stream's route is registered again (within about a second: hub.py)."""
    server = redis_factory()
    server.kill()
    env = {
        **gateway_env,
        "IM_GATEWAY_REDIS_URL": server.url(),
        "IM_GATEWAY_ROUTE_TTL_S": "3",
        "IM_GATEWAY_ROUTE_REFRESH_S": "0.3",
    }
    gw = spawn("gateway", env)
    s = RawStream(gw.address, token_for("alice", "phone"))
    try:
        await s.welcome()
        await s.write(ping_frame(3))
        assert (await s.next_of("pong")).nonce == 3
        server.start()
        redis = aioredis.from_url(server.url())
        table = RouteTable(redis, gateway_env["IM_GATEWAY_REDIS_PREFIX"], ttl_s=3)
        found = await wait_for(lambda: table.lookup("alice"), timeout=10, what="route healed")
        assert found[0].gateway == gw.address
        # A flush is healed the same way.
        await redis.flushall()
        await wait_for(lambda: table.lookup("alice"), timeout=10, what="route after flush")
        await redis.aclose()
    finally:
        await s.close()


async def test_internal_port_keeps_deliver_and_kick_off_the_client_port(
    start_gateway: Callable[..., ServiceProcess], routes: tuple[RouteTable, aioredis.Redis]
) -> None:
    """With IM_GATEWAY_INTERNAL_PORT set, clients cannot call GatewayInternal on
    the client port; routes name the internal address, which pushers and other
    gateways use (here: Deliver, and a cross-gateway Kick)."""
    table, _ = routes
    i1, i2 = free_port(), free_port()
    g1 = start_gateway(IM_GATEWAY_INTERNAL_PORT=str(i1))
    g2 = start_gateway(IM_GATEWAY_INTERNAL_PORT=str(i2))
    first = RawStream(g1.address, token_for("alice", "phone"))
    try:
        await first.welcome()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await deliver(g1.address, [("alice", "phone", 1, b"fake")])
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        found = await wait_for(lambda: table.lookup("alice"))
        assert found[0].gateway == f"127.0.0.1:{i1}"
        assert await deliver(f"127.0.0.1:{i1}", [("alice", "phone", 1, b"real")]) == [WRITTEN]
        assert (await first.next_of("push")).message.body == b"real"
        second = RawStream(g2.address, token_for("alice", "phone"))
        await second.welcome()
        assert "replaced" in (await first.next_of("kick", timeout=5)).reason
        await second.close()
    finally:
        await first.close()
