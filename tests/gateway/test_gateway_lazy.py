"""The per-connection parts that start on demand (docs/benchmarks.md, "Idle
connections"): an idle stream holds no task of its own; the writer, the sender
and the ACK forwarder start when there is work and end when it is done; and
everything still works when they start late.

The gateway runs in the test process (the real servicers, Hub, Peers and gRPC
server options, on the shared Redis) so a test can look at a Connection's state
instead of guessing from timing. The pusher is a small grpc.aio server in the
test process that records the ACKs it receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import redis.asyncio as aioredis
from gwkit import SECRET, RawStream, ack_frame, deliver, ping_frame, send_frame, token_for, wait_for

from gateway.config import Settings
from gateway.connection import Connection
from gateway.hub import Hub
from gateway.routes import RouteTable
from gateway.servicer import GatewayInternalServicer, GatewayServicer, add_authenticated_gateway
from gateway.upstream import LogicClient, Peers
from im.gateway.v1 import gateway_internal_pb2_grpc, gateway_pb2
from im.pusher.v1 import pusher_pb2
from imcommon.metrics import Metrics
from imcommon.server import EXCLUSIVE_PORT, server_options
from imdev.servers import RedisServer, free_port


class RecordingPusher:
    """A pusher's AckDelivery/AckDeliveries, recording (user, device, seq)."""

    def __init__(self) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.acks: list[tuple[str, str, int]] = []
        self.server = grpc.aio.server(options=[EXCLUSIVE_PORT])

    async def ack_one(
        self, request: pusher_pb2.AckDeliveryRequest, context: grpc.aio.ServicerContext
    ) -> pusher_pb2.AckDeliveryResponse:
        self.acks.append((request.user_id, request.device_id, request.seq))
        return pusher_pb2.AckDeliveryResponse(cancelled=1)

    async def ack_many(
        self, request: pusher_pb2.AckDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> pusher_pb2.AckDeliveriesResponse:
        self.acks.extend((a.user_id, a.device_id, a.seq) for a in request.acks)
        return pusher_pb2.AckDeliveriesResponse(cancelled=len(request.acks))

    async def start(self) -> RecordingPusher:
        handlers = {
            "AckDelivery": grpc.unary_unary_rpc_method_handler(
                self.ack_one,
                request_deserializer=pusher_pb2.AckDeliveryRequest.FromString,
                response_serializer=pusher_pb2.AckDeliveryResponse.SerializeToString,
            ),
            "AckDeliveries": grpc.unary_unary_rpc_method_handler(
                self.ack_many,
                request_deserializer=pusher_pb2.AckDeliveriesRequest.FromString,
                response_serializer=pusher_pb2.AckDeliveriesResponse.SerializeToString,
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("im.pusher.v1.Pusher", handlers),)
        )
        self.server.add_insecure_port(self.address)
        await self.server.start()
        return self


@dataclass
class InProcessGateway:
    address: str
    hub: Hub
    settings: Settings
    routes: RouteTable

    async def connection(self, user: str, device: str = "d1") -> Connection:
        conn = await wait_for(lambda: self.hub.get(user, device), what=f"{user}'s stream")
        assert isinstance(conn, Connection)
        return conn


@pytest.fixture
async def gateway(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[InProcessGateway]:
    """Client and internal services on one port, logic unreachable (a free port)."""
    settings = Settings(
        token_secret=SECRET,
        redis_url=redis_server.url(),
        redis_prefix=f"{key_prefix}:",
        logic_address=f"127.0.0.1:{free_port()}",
        logic_retry_s=0,
        logic_timeout_s=2,
    )
    metrics = Metrics("gateway-test")
    redis = aioredis.from_url(settings.redis_url)
    logic_channel = grpc.aio.insecure_channel(settings.logic_address)
    peers = Peers(metrics, settings.internal_timeout_s, ack_batch_s=settings.ack_batch_ms / 1000)
    routes = RouteTable(redis, settings.redis_prefix, settings.route_ttl_s)
    hub = Hub(
        routes,
        peers,
        lambda: address,
        settings.refresh_interval_s,
    )
    logic = LogicClient(logic_channel, settings.logic_timeout_s, settings.logic_retry_s)
    server = grpc.aio.server(options=server_options(settings))
    add_authenticated_gateway(
        GatewayServicer(settings, hub, logic, peers, metrics), server, settings.token_secret
    )
    gateway_internal_pb2_grpc.add_GatewayInternalServicer_to_server(
        GatewayInternalServicer(hub, metrics), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    await server.start()
    yield InProcessGateway(address, hub, settings, routes)
    await server.stop(0)
    await peers.acks.close(0.5)
    await peers.close()
    await logic_channel.close()
    await redis.aclose()


@pytest.fixture
async def pusher() -> AsyncIterator[RecordingPusher]:
    p = await RecordingPusher().start()
    yield p
    await p.server.stop(0)


async def idle(conn: Connection) -> bool:
    return conn.running_tasks() == []


async def test_an_idle_stream_has_no_task_and_starts_one_only_for_work(
    gateway: InProcessGateway,
) -> None:
    stream = RawStream(gateway.address, token_for("lazy-idle"))
    try:
        await stream.welcome()
        conn = await gateway.connection("lazy-idle")
        # The Welcome was written by the handler itself: nothing else ever started.
        assert conn.running_tasks() == []
        assert (conn.writer_runs, conn.sender_runs, conn.forwarder_runs) == (0, 0, 0)

        await stream.write(ping_frame(7))
        pong = await stream.next_of("pong")
        assert pong.nonce == 7
        assert conn.writer_runs == 1
        await wait_for(lambda: idle(conn), what="the writer to end once the queue is empty")

        # The writer starts again for the next frame, and frames keep their order.
        for nonce in range(8, 13):
            await stream.write(ping_frame(nonce))
        nonces = [(await stream.next_of("pong")).nonce for _ in range(5)]
        assert nonces == [8, 9, 10, 11, 12]
        await wait_for(lambda: idle(conn), what="the writer to end again")
        assert conn.sender_runs == 0 and conn.forwarder_runs == 0
    finally:
        await stream.close()


async def test_pushes_without_acks_never_start_the_forwarder_and_a_late_ack_is_forwarded(
    gateway: InProcessGateway, pusher: RecordingPusher
) -> None:
    user = "lazy-acks"
    stream = RawStream(gateway.address, token_for(user))
    try:
        await stream.welcome()
        conn = await gateway.connection(user)
        statuses = await deliver(
            gateway.address,
            [(user, "d1", seq, f"m{seq}".encode()) for seq in range(1, 101)],
            ack_to=pusher.address,
        )
        assert set(statuses) == {1}  # DELIVERY_STATUS_WRITTEN
        seqs = [(await stream.next_of("push")).seq for _ in range(100)]
        assert seqs == list(range(1, 101))
        await wait_for(lambda: idle(conn), what="the writer to end")
        assert conn.forwarder_runs == 0  # 100 pushes, no ACK: no forwarder ever ran
        assert pusher.acks == []

        # The first ACK, after all those pushes, reaches the pusher that pushed.
        await stream.write(ack_frame(100))
        await wait_for(lambda: pusher.acks, what="the ACK at the pusher")
        assert pusher.acks[-1] == (user, "d1", 100)
        assert conn.forwarder_runs == 1
        await wait_for(lambda: idle(conn), what="the forwarder to end")

        # And the next one, by a new forwarder run, is forwarded too.
        await deliver(gateway.address, [(user, "d1", 101, b"m101")], ack_to=pusher.address)
        assert (await stream.next_of("push")).seq == 101
        await stream.write(ack_frame(101))
        await wait_for(lambda: (user, "d1", 101) in pusher.acks, what="the second ACK")
        assert conn.forwarder_runs == 2
    finally:
        await stream.close()


async def test_an_ack_with_no_pusher_to_tell_starts_nothing(gateway: InProcessGateway) -> None:
    stream = RawStream(gateway.address, token_for("lazy-noack"))
    try:
        await stream.welcome()
        conn = await gateway.connection("lazy-noack")
        await stream.write(ack_frame(5))
        await stream.write(ping_frame(1))  # frames are read in order: once Pong is
        await stream.next_of("pong")  # back, the ACK has been handled
        assert conn.forwarder_runs == 0
    finally:
        await stream.close()


async def test_a_send_starts_the_sender_which_ends_after_answering(
    gateway: InProcessGateway,
) -> None:
    stream = RawStream(gateway.address, token_for("lazy-send"))
    try:
        await stream.welcome()
        conn = await gateway.connection("lazy-send")
        assert conn.sender_runs == 0
        await stream.write(send_frame(1, "d:lazy-send:zed"))
        error = await stream.next_of("send_error")  # logic is unreachable
        assert error.client_id == 1
        assert error.code == gateway_pb2.SEND_ERROR_CODE_UNAVAILABLE and error.retryable
        assert conn.sender_runs == 1
        await wait_for(lambda: idle(conn), what="the sender and writer to end")
        # The failed send did not consume client_id 1: the retry is accepted again.
        await stream.write(send_frame(1, "d:lazy-send:zed"))
        assert (await stream.next_of("send_error")).client_id == 1
        assert conn.sender_runs == 2
    finally:
        await stream.close()


async def test_kick_ends_an_idle_stream_with_ok_after_the_final_frame(
    gateway: InProcessGateway,
) -> None:
    stream = RawStream(gateway.address, token_for("lazy-kick"))
    await stream.welcome()
    conn = await gateway.connection("lazy-kick")
    assert gateway.hub.kick("lazy-kick", "d1", conn.connection_id, "test kick")
    kick = await stream.next_of("kick")
    assert kick.reason == "test kick"
    ended = await stream.end()
    assert ended.code == grpc.StatusCode.OK
    await asyncio.wait_for(conn.done.wait(), 5)
    assert conn.running_tasks() == []
    await stream.close()


async def test_half_close_ends_an_idle_stream(gateway: InProcessGateway) -> None:
    stream = RawStream(gateway.address, token_for("lazy-halfclose"))
    await stream.welcome()
    conn = await gateway.connection("lazy-halfclose")
    await stream.call.done_writing()
    ended = await stream.end()
    assert ended.code == grpc.StatusCode.OK
    await asyncio.wait_for(conn.done.wait(), 5)
    await stream.close()


async def test_max_size_frames_pass_both_ways(gateway: InProcessGateway) -> None:
    """The server options in use take a push close to max_message_bytes, and a
    Send whose body is exactly max_body_bytes reaches the send path (it gets
    UNAVAILABLE from the missing logic, not INVALID_ARGUMENT)."""
    user = "lazy-big"
    stream = RawStream(gateway.address, token_for(user))
    try:
        await stream.welcome()
        body = bytes(range(256)) * ((gateway.settings.max_message_bytes - 4096) // 256)
        statuses = await deliver(gateway.address, [(user, "d1", 1, body)])
        assert statuses == [1]
        push = await stream.next_of("push", timeout=20)
        assert push.seq == 1 and push.message.body == body

        big_send = send_frame(1, f"d:{user}:zed", body=b"x" * gateway.settings.max_body_bytes)
        await stream.write(big_send)
        error = await stream.next_of("send_error")
        assert error.code == gateway_pb2.SEND_ERROR_CODE_UNAVAILABLE
    finally:
        await stream.close()


async def test_a_cancellation_during_detach_still_removes_the_route(
    gateway: InProcessGateway,
) -> None:
    """gRPC cancels the handler when the client goes away, which can land while
    the stream is already ending and removing its route. The removal must finish
    anyway, or pushes keep going to a closed stream until the route's TTL (seen as
    stray give-ups in tests/pusher)."""
    user = "lazy-detach"
    entered = asyncio.Event()
    release = asyncio.Event()
    real_unregister = gateway.routes.unregister

    async def slow_unregister(user_id: str, device_id: str, connection_id: str) -> bool:
        entered.set()
        await release.wait()
        return await real_unregister(user_id, device_id, connection_id)

    gateway.routes.unregister = slow_unregister  # type: ignore[method-assign]
    stream = RawStream(gateway.address, token_for(user))
    await stream.welcome()
    conn = await gateway.connection(user)
    handler = conn._handler
    assert handler is not None
    assert [r.connection_id for r in await gateway.routes.lookup(user)] == [conn.connection_id]
    await stream.call.done_writing()  # the stream ends: detach starts and waits
    await asyncio.wait_for(entered.wait(), 5)
    handler.cancel()  # what gRPC does when the client goes away now
    release.set()  # runs after the cancellation reached the handler (FIFO callbacks)
    await wait_for(lambda: handler.done(), what="the handler to end")
    assert await gateway.routes.lookup(user) == []
    assert gateway.hub.get(user, "d1") is None
    await stream.close()
