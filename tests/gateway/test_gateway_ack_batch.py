"""Delivery ACKs batched per pusher (gateway side): coalescing, the per-pusher
queue bound, independence of pushers, the flush at shutdown, the fallback to
AckDelivery for a pusher without AckDeliveries, and ack_batch_ms=0.

The pushers here are small grpc.aio servers in the test process that record what
they receive (a real pusher has the same service; tests/pusher has the end-to-end
version). The batcher runs either in-process (deterministic: long windows, flushed
by size or close) or inside a real gateway process.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from gwkit import RawStream, ack_frame, deliver, metric, token_for, wait_for

from gateway.upstream import Peers
from im.pusher.v1 import pusher_pb2
from imcommon.metrics import Metrics
from imcommon.server import EXCLUSIVE_PORT
from imdev.servers import ServiceProcess, free_port

Ack = tuple[str, str, int]


class FakePusher:
    """Records AckDelivery / AckDeliveries calls. `batches=False` serves only
    AckDelivery, as a pusher built before AckDeliveries existed (the method is
    unknown to the server: UNIMPLEMENTED). `hold` makes AckDeliveries wait for
    the event before answering (a pusher that hangs)."""

    def __init__(self, batches: bool = True, hold: asyncio.Event | None = None) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.singles: list[Ack] = []
        self.batches: list[list[Ack]] = []
        self.started = 0
        self.hold = hold
        self._batches = batches
        self.server = grpc.aio.server(options=[EXCLUSIVE_PORT])

    async def AckDelivery(
        self, request: pusher_pb2.AckDeliveryRequest, context: grpc.aio.ServicerContext
    ) -> pusher_pb2.AckDeliveryResponse:
        self.singles.append((request.user_id, request.device_id, request.seq))
        return pusher_pb2.AckDeliveryResponse(cancelled=1)

    async def AckDeliveries(
        self, request: pusher_pb2.AckDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> pusher_pb2.AckDeliveriesResponse:
        self.started += 1
        if self.hold is not None:
            await self.hold.wait()
        self.batches.append([(a.user_id, a.device_id, a.seq) for a in request.acks])
        return pusher_pb2.AckDeliveriesResponse(cancelled=len(request.acks))

    @property
    def batched(self) -> list[Ack]:
        return [a for batch in self.batches for a in batch]

    async def start(self) -> FakePusher:
        handlers: dict[str, grpc.RpcMethodHandler] = {
            "AckDelivery": grpc.unary_unary_rpc_method_handler(
                self.AckDelivery,
                request_deserializer=pusher_pb2.AckDeliveryRequest.FromString,
                response_serializer=pusher_pb2.AckDeliveryResponse.SerializeToString,
            )
        }
        if self._batches:
            handlers["AckDeliveries"] = grpc.unary_unary_rpc_method_handler(
                self.AckDeliveries,
                request_deserializer=pusher_pb2.AckDeliveriesRequest.FromString,
                response_serializer=pusher_pb2.AckDeliveriesResponse.SerializeToString,
            )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("im.pusher.v1.Pusher", handlers),)
        )
        self.server.add_insecure_port(self.address)
        await self.server.start()
        return self


@pytest.fixture
async def pushers() -> AsyncIterator[Callable[..., Any]]:
    """pushers(batches=True, hold=None) -> a started FakePusher; all stopped at teardown."""
    started: list[FakePusher] = []

    async def make(batches: bool = True, hold: asyncio.Event | None = None) -> FakePusher:
        p = await FakePusher(batches, hold).start()
        started.append(p)
        return p

    yield make
    for p in started:
        if p.hold is not None:
            p.hold.set()
        await p.server.stop(0)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def batching_peers(
    batch_ms: float, batch_max: int = 500, queue_max: int = 10_000, timeout_s: float = 5.0
) -> tuple[Peers, Metrics]:
    metrics = Metrics("gateway")
    peers = Peers(
        metrics,
        timeout_s,
        ack_batch_s=batch_ms / 1000,
        ack_batch_max=batch_max,
        ack_queue_max=queue_max,
    )
    return peers, metrics


# -- the batcher in-process ------------------------------------------------


async def test_acks_of_a_device_coalesce_to_the_highest_seq_and_close_flushes(
    pushers: Callable[..., Any],
) -> None:
    p = await pushers()
    # A window far longer than the test: only close() can send these.
    peers, metrics = batching_peers(batch_ms=3_600_000)
    try:
        for seq in (5, 3, 7, 6):
            await peers.ack_delivery(p.address, "u", "phone", seq)
        await peers.ack_delivery(p.address, "u", "laptop", 2)
        await peers.ack_delivery(p.address, "v", "phone", 1)
        assert p.batches == [] and p.singles == []  # nothing sent before the window ends
        assert sample(metrics, "im_gateway_acks_queued") == 3
        assert sample(metrics, "im_gateway_acks_coalesced_total") == 3
        await peers.close()  # flushes what is queued
        assert p.batches == [[("u", "phone", 7), ("u", "laptop", 2), ("v", "phone", 1)]]
        assert p.singles == []
        assert sample(metrics, "im_gateway_ack_batches_total", result="ok") == 1
        assert (
            sample(metrics, "im_gateway_ack_forwards_total", rpc="AckDeliveries", result="ok") == 3
        )
        assert sample(metrics, "im_gateway_ack_batch_size_count") == 1
        assert sample(metrics, "im_gateway_ack_batch_size_sum") == 3
        assert sample(metrics, "im_gateway_acks_queued") == 0
    finally:
        await peers.close()


async def test_a_full_batch_is_sent_at_once(pushers: Callable[..., Any]) -> None:
    p = await pushers()
    peers, metrics = batching_peers(batch_ms=3_600_000, batch_max=4)
    try:
        for i in range(4):
            await peers.ack_delivery(p.address, "u", f"d{i}", 10 + i)
        await wait_for(lambda: p.batches, what="the full batch, long before the window ends")
        assert p.batches == [[("u", f"d{i}", 10 + i) for i in range(4)]]
        # One more waits for the window (or close), not sent on its own.
        await peers.ack_delivery(p.address, "u", "d9", 1)
        assert sample(metrics, "im_gateway_acks_queued") == 1
    finally:
        await peers.close()
    assert p.batches[-1] == [("u", "d9", 1)]


async def test_a_hanging_pusher_does_not_delay_another_and_its_queue_is_bounded(
    pushers: Callable[..., Any],
) -> None:
    release = asyncio.Event()
    stuck = await pushers(hold=release)
    up = await pushers()
    peers, metrics = batching_peers(batch_ms=10, queue_max=3, timeout_s=60)
    try:
        await peers.ack_delivery(stuck.address, "u", "d0", 1)
        await wait_for(lambda: stuck.started == 1, what="a call into the hanging pusher")
        # The other pusher gets its ACKs while the first call still hangs.
        await peers.ack_delivery(up.address, "v", "phone", 7)
        await wait_for(lambda: up.batched == [("v", "phone", 7)], what="ACK to the live pusher")
        await peers.ack_delivery(up.address, "v", "phone", 8)
        await wait_for(lambda: ("v", "phone", 8) in up.batched, what="a second ACK")
        assert stuck.started == 1 and stuck.batches == []  # still hanging

        # Behind the hanging call at most queue_max (3) devices wait: the oldest go.
        for i in range(1, 6):
            await peers.ack_delivery(stuck.address, "u", f"d{i}", 1)
        await peers.ack_delivery(stuck.address, "u", "d5", 2)  # coalesced, drops nothing
        assert sample(metrics, "im_gateway_acks_dropped_total", reason="queue_full") == 2
        assert sample(metrics, "im_gateway_acks_queued") == 3
        release.set()
        await wait_for(lambda: len(stuck.batches) == 2, what="the queued batch after release")
        assert stuck.batches == [[("u", "d0", 1)], [("u", "d3", 1), ("u", "d4", 1), ("u", "d5", 2)]]
    finally:
        await peers.close()


async def test_a_pusher_without_ack_deliveries_gets_one_ack_delivery_per_ack(
    pushers: Callable[..., Any],
) -> None:
    old = await pushers(batches=False)
    peers, metrics = batching_peers(batch_ms=10)
    try:
        await peers.ack_delivery(old.address, "u", "phone", 5)
        await peers.ack_delivery(old.address, "u", "laptop", 6)
        await wait_for(lambda: len(old.singles) == 2, what="the ACKs as AckDelivery calls")
        assert sorted(old.singles) == [("u", "laptop", 6), ("u", "phone", 5)]
        assert sample(metrics, "im_gateway_ack_batches_total", result="unimplemented") == 1
        # The address is remembered: the next ACK goes straight to AckDelivery.
        await peers.ack_delivery(old.address, "v", "phone", 9)
        await wait_for(lambda: len(old.singles) == 3, what="a later ACK")
        assert old.singles[-1] == ("v", "phone", 9)
        assert sample(metrics, "im_gateway_ack_batches_total", result="unimplemented") == 1
        assert sample(metrics, "im_gateway_ack_forwards_total", rpc="AckDelivery", result="ok") == 3
    finally:
        await peers.close()


async def test_failed_batches_are_counted_and_dropped(pushers: Callable[..., Any]) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # no pusher listens here
    up = await pushers()
    peers, metrics = batching_peers(batch_ms=10, timeout_s=2)
    try:
        await peers.ack_delivery(nobody, "u", "phone", 1)
        await peers.ack_delivery(up.address, "v", "phone", 1)
        await wait_for(lambda: up.batched, what="ACK to the live pusher")
        await wait_for(
            lambda: sample(metrics, "im_gateway_ack_batches_total", result="failed") == 1,
            what="the failed batch counted",
        )
        assert (
            sample(metrics, "im_gateway_ack_forwards_total", rpc="AckDeliveries", result="failed")
            == 1
        )
        assert sample(metrics, "im_gateway_acks_queued") == 0
    finally:
        await peers.close()


# -- inside a gateway process ----------------------------------------------


def _received(pusher: FakePusher, ack: Ack) -> Callable[[], bool]:
    return lambda: ack in pusher.singles + pusher.batched


async def _push_and_ack(gw: ServiceProcess, pusher: FakePusher, user: str, seqs: list[int]) -> None:
    s = RawStream(gw.address, token_for(user, "phone"))
    try:
        await s.welcome()
        for seq in seqs:
            statuses = await deliver(
                gw.address, [(user, "phone", seq, b"x")], ack_to=pusher.address
            )
            assert statuses == [1], statuses  # DELIVERY_STATUS_WRITTEN
            assert (await s.next_of("push")).seq == seq
            await s.write(ack_frame(seq))
            await wait_for(_received(pusher, (user, "phone", seq)), what=f"ACK {seq} at the pusher")
    finally:
        await s.close()


async def test_gateway_batches_acks_by_default(
    start_gateway: Callable[..., ServiceProcess], pushers: Callable[..., Any]
) -> None:
    p = await pushers()
    gw = start_gateway()
    await _push_and_ack(gw, p, "alice", [1, 2])
    assert p.singles == [] and p.batched == [("alice", "phone", 1), ("alice", "phone", 2)]


async def test_ack_batch_ms_0_sends_one_ack_delivery_per_ack(
    start_gateway: Callable[..., ServiceProcess], pushers: Callable[..., Any]
) -> None:
    p = await pushers()
    gw = start_gateway(IM_GATEWAY_ACK_BATCH_MS="0")
    await _push_and_ack(gw, p, "alice", [1, 2])
    assert p.batches == [] and p.started == 0
    assert p.singles == [("alice", "phone", 1), ("alice", "phone", 2)]


async def test_gateway_falls_back_to_ack_delivery_for_an_old_pusher(
    start_gateway: Callable[..., ServiceProcess], pushers: Callable[..., Any]
) -> None:
    old = await pushers(batches=False)
    gw = start_gateway()
    await _push_and_ack(gw, old, "alice", [1, 2, 3])
    assert old.singles == [("alice", "phone", 1), ("alice", "phone", 2), ("alice", "phone", 3)]


async def test_sigterm_flushes_queued_acks(
    start_gateway: Callable[..., ServiceProcess], pushers: Callable[..., Any]
) -> None:
    p = await pushers()
    metrics_port = free_port()
    # A window far longer than the test: the ACK can only leave through the flush.
    gw = start_gateway(IM_GATEWAY_ACK_BATCH_MS="10000", IM_GATEWAY_METRICS_PORT=str(metrics_port))
    s = RawStream(gw.address, token_for("alice", "phone"))
    try:
        await s.welcome()
        assert await deliver(gw.address, [("alice", "phone", 4, b"x")], ack_to=p.address) == [1]
        assert (await s.next_of("push")).seq == 4
        await s.write(ack_frame(4))
        await wait_for(
            lambda: metric(metrics_port, "im_gateway_acks_queued") == 1, what="ACK queued"
        )
        assert p.batches == [] and p.singles == []
        gw.signal(signal.SIGTERM)
        await s.next_of("go_away")
        assert await asyncio.to_thread(gw.wait, 15) == 0
        assert p.batched == [("alice", "phone", 4)]
    finally:
        await s.close()
