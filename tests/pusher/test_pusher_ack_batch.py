"""Pusher.AckDeliveries: per-item validation and the bound per call on a pusher
process, and end to end (gateway batching on): many devices ACKing many pushes
cost far fewer AckDeliveries calls than ACKs, and every retransmit timer is
cancelled.

The stack here retransmits only after 20 s, so in a healthy run no retransmit
happens at all and the counts are exact; its gateways batch for 100 ms (far under
that first retransmit), so the number of calls does not depend on how fast this
machine reads the ACK frames.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from gwkit import (
    LOGIC_READY,
    NEEDS_LOGIC,
    SECRET,
    RawStream,
    ack_frame,
    direct,
    metric,
    send_frame,
    token_for,
    unique_users,
    wait_for,
)
from test_pusher_consumer import pusher_env

from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
from imdev.servers import NatsServer, RedisServer, ServiceProcess, free_port

ACK_DELIVERIES = "/im.pusher.v1.Pusher/AckDeliveries"
ACK_DELIVERY = "/im.pusher.v1.Pusher/AckDelivery"


def item(user: str, device: str, seq: int) -> pusher_pb2.AckDeliveryRequest:
    return pusher_pb2.AckDeliveryRequest(user_id=user, device_id=device, seq=seq)


async def test_ack_deliveries_rejects_bad_items_and_oversized_calls(
    spawn: Callable[..., ServiceProcess],
    nats_server: NatsServer,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    env = {**pusher_env(nats_server.url(), redis_server, key_prefix)}
    env["IM_PUSHER_MAX_ACKS_PER_CALL"] = "3"
    proc = spawn("pusher", env)
    async with grpc.aio.insecure_channel(proc.address) as channel:
        stub = pusher_pb2_grpc.PusherStub(channel)
        empty = await stub.AckDeliveries(pusher_pb2.AckDeliveriesRequest(), timeout=5)
        assert (empty.cancelled, empty.rejected, list(empty.rejected_indexes)) == (0, 0, [])
        resp = await stub.AckDeliveries(
            pusher_pb2.AckDeliveriesRequest(
                acks=[item("u", "", 5), item("u", "d", 5), item("", "d", 5)]
            ),
            timeout=5,
        )
        assert resp.cancelled == 0 and resp.rejected == 2
        assert list(resp.rejected_indexes) == [0, 2]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AckDeliveries(
                pusher_pb2.AckDeliveriesRequest(acks=[item("u", f"d{i}", 1) for i in range(4)]),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "IM_PUSHER_MAX_ACKS_PER_CALL" in (err.value.details() or "")
        # AckDelivery still works beside it.
        single = await stub.AckDelivery(item("u", "d", 5), timeout=5)
        assert single.cancelled == 0
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 10) == 0


# -- end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_stack() -> Iterator[Any]:
    """The whole system, one gateway batching ACKs for 100 ms, a pusher that
    retransmits only after 20 s, both with metrics ports."""
    if not LOGIC_READY:
        pytest.skip(NEEDS_LOGIC)
    from imdev.stack import Stack

    workdir = Path(tempfile.mkdtemp(prefix="imackb-"))
    workdir.chmod(0o755)
    pusher_port, gateway_port = free_port(), free_port()
    stack = Stack(
        workdir,
        gateways=1,
        token_secret=SECRET,
        env={
            "pusher": {
                "IM_PUSHER_RETRANSMIT_SCHEDULE_MS": "20000",
                "IM_PUSHER_MAX_ATTEMPTS": "3",
                "IM_PUSHER_WHEEL_TICK_MS": "50",
                "IM_PUSHER_METRICS_PORT": str(pusher_port),
            },
            "gateway": {
                "IM_GATEWAY_ACK_BATCH_MS": "100",
                "IM_GATEWAY_METRICS_PORT": str(gateway_port),
            },
        },
    )
    stack.pusher_metrics_port = pusher_port  # type: ignore[attr-defined]
    stack.gateway_metrics_port = gateway_port  # type: ignore[attr-defined]
    try:
        stack.start()
        yield stack
    finally:
        stack.kill()
        if not os.environ.get("IM_KEEP_TEST_DIRS"):
            shutil.rmtree(workdir, ignore_errors=True)


def pushed_seqs(stream: RawStream) -> set[int]:
    return {f.push.seq for f in stream.frames if f.WhichOneof("frame") == "push"}


def rpcs(port: int, method: str) -> float:
    return metric(port, "im_rpc_server_handled_total", method=method)


async def send_all(sender: RawStream, conversations: list[str]) -> None:
    """Sends one message per entry, in windows well under the send window."""
    client_id = 0
    for start in range(0, len(conversations), 32):
        chunk = conversations[start : start + 32]
        for conv in chunk:
            client_id += 1
            await sender.write(send_frame(client_id, conv, body=b"m"))
        for _ in chunk:
            await sender.next_of("send_ack", timeout=30)


async def test_many_device_acks_cost_few_ack_deliveries_and_cancel_every_timer(
    batch_stack: Any,
) -> None:
    n, m = 10, 10
    users = unique_users(n + 1)
    sender_id, recipients = users[0], users[1:]
    gw = batch_stack.gateway_addresses[0]
    pport = batch_stack.pusher_metrics_port
    before = {
        "batches": rpcs(pport, ACK_DELIVERIES),
        "singles": rpcs(pport, ACK_DELIVERY),
        "cancelled": metric(pport, "im_pusher_acks_cancelled_total"),
        "retransmits": metric(pport, "im_pusher_pushes_total", kind="retransmit"),
        "gave_up": metric(pport, "im_pusher_gave_up_total"),
    }
    sender = RawStream(gw, token_for(sender_id, "phone"))
    devices = [RawStream(gw, token_for(r, "phone")) for r in recipients]
    everyone = [sender, *devices]
    try:
        for s in everyone:
            await s.welcome()
        await send_all(sender, [direct(sender_id, r) for _ in range(m) for r in recipients])
        # Each recipient holds M pushes, the sender its own N*M; nobody ACKed yet.
        await wait_for(
            lambda: (
                all(len(pushed_seqs(d)) == m for d in devices) and len(pushed_seqs(sender)) == n * m
            ),
            timeout=30,
            what="every push at every device",
        )
        await wait_for(lambda: metric(pport, "im_pusher_timers") >= 2 * n * m, what="timers armed")

        async def ack_each(s: RawStream) -> None:
            for seq in sorted(pushed_seqs(s)):
                await s.write(ack_frame(seq))

        await asyncio.gather(*(ack_each(s) for s in everyone))
        await wait_for(
            lambda: (
                metric(pport, "im_pusher_acks_cancelled_total") - before["cancelled"] == 2 * n * m
            ),
            timeout=20,
            what="every timer cancelled by an ACK",
        )
        assert metric(pport, "im_pusher_timers") == 0
        calls = rpcs(pport, ACK_DELIVERIES) - before["batches"]
        assert 1 <= calls <= (2 * n * m) / 10, calls  # 200 device ACKs, a handful of calls
        assert rpcs(pport, ACK_DELIVERY) - before["singles"] == 0
        assert metric(pport, "im_pusher_pushes_total", kind="retransmit") == before["retransmits"]
        assert metric(pport, "im_pusher_gave_up_total") == before["gave_up"]
        gport = batch_stack.gateway_metrics_port
        assert metric(gport, "im_gateway_ack_batches_total", result="ok") >= calls
        assert metric(gport, "im_gateway_acks_queued") == 0
    finally:
        for s in everyone:
            await s.close()


async def test_bad_items_never_cancel_another_devices_timers(batch_stack: Any) -> None:
    alice, bob = unique_users(2)
    gw = batch_stack.gateway_addresses[0]
    pport = batch_stack.pusher_metrics_port
    pusher = f"127.0.0.1:{batch_stack.ports.pusher[0]}"
    phone = RawStream(gw, token_for(bob, "phone"))
    sender = RawStream(gw, token_for(alice, "phone"))
    try:
        await phone.welcome()
        await sender.welcome()
        await send_all(sender, [direct(alice, bob)])
        push = await phone.next_of("push")
        own = await sender.next_of("push")
        await sender.write(ack_frame(own.seq))
        # alice's own copy is ACKed: bob's phone's is the one timer left.
        await wait_for(lambda: metric(pport, "im_pusher_timers") == 1, what="bob's timer alone")
        cancelled = metric(pport, "im_pusher_acks_cancelled_total")
        async with grpc.aio.insecure_channel(pusher) as channel:
            stub = pusher_pb2_grpc.PusherStub(channel)
            resp = await stub.AckDeliveries(
                pusher_pb2.AckDeliveriesRequest(
                    acks=[
                        item(bob, "", push.seq + 100),  # no device: rejected
                        item("", "phone", push.seq + 100),  # no user: rejected
                        item(bob, "laptop", push.seq + 100),  # another device of bob's
                        item(alice, "phone", push.seq + 100),  # another user's phone
                    ]
                ),
                timeout=5,
            )
        assert resp.rejected == 2 and list(resp.rejected_indexes) == [0, 1]
        assert resp.cancelled == 0
        # bob's phone's timer is still armed: only its own ACK cancels it.
        assert metric(pport, "im_pusher_timers") == 1
        assert metric(pport, "im_pusher_acks_cancelled_total") == cancelled
        await phone.write(ack_frame(push.seq))
        await wait_for(lambda: metric(pport, "im_pusher_timers") == 0, what="bob's own ACK")
        assert metric(pport, "im_pusher_acks_cancelled_total") == cancelled + 1
    finally:
        await phone.close()
        await sender.close()
