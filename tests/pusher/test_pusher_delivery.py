"""Pushes through the whole stack with raw device streams that decide when (and
whether) to send DeliverAcks: the pusher retransmits until it gets one, stops
after it, gives up after max attempts, and follows a device to another gateway.

The stack's pusher retransmits after 400 ms, 4 deliveries at most (gwkit.PUSHER_ENV).
Skipped (with the reason) while services/logic/server.py does not exist.
"""

from __future__ import annotations

from typing import Any

import grpc
import nats
from gwkit import (
    RawStream,
    ack_frame,
    direct,
    metric,
    send_frame,
    token_for,
    unique_users,
    wait_for,
)

from imcommon.jetstream import stream_config

MAX_ATTEMPTS = 4


def pushes_of(stream: RawStream, seq: int) -> int:
    return sum(1 for f in stream.frames if f.WhichOneof("frame") == "push" and f.push.seq == seq)


async def next_push_after(stream: RawStream, seq: int) -> Any:
    """The next push with a seq above `seq` (skipping retransmits of older ones)."""
    while True:
        push = await stream.next_of("push")
        if push.seq > seq:
            return push


async def _send_one(address: str, sender: str, conv: str, body: bytes) -> Any:
    s = RawStream(address, token_for(sender, "phone"))
    try:
        await s.welcome()
        await s.write(send_frame(1, conv, body=body))
        return await s.next_of("send_ack")
    finally:
        await s.close()


async def test_retransmits_until_the_device_acks_then_stops(delivery_stack: Any) -> None:
    alice, bob = unique_users(2)
    g0 = delivery_stack.gateway_addresses[0]
    port = delivery_stack.pusher_metrics_port
    bob_phone = RawStream(g0, token_for(bob, "phone"))
    try:
        await bob_phone.welcome()
        await _send_one(g0, alice, direct(alice, bob), b"hello")
        first = await bob_phone.next_of("push")
        assert first.message.body == b"hello" and first.message.sender_id == alice
        # No ACK: the same push comes again.
        await wait_for(lambda: pushes_of(bob_phone, first.seq) >= 2, what="a retransmit")
        cancelled_before = metric(port, "im_pusher_acks_cancelled_total")
        await bob_phone.write(ack_frame(first.seq))
        # The gateway forwarded the ACK to the pusher, which cancelled the timer
        # (and with no timer left, no further retransmit can happen).
        await wait_for(
            lambda: metric(port, "im_pusher_acks_cancelled_total") > cancelled_before,
            what="ACK forwarded to the pusher",
        )
        seen = pushes_of(bob_phone, first.seq)
        assert seen < MAX_ATTEMPTS
        # A later message is pushed normally; the acked one never comes back.
        await _send_one(g0, alice, direct(alice, bob), b"again")
        second = await next_push_after(bob_phone, first.seq)
        assert second.message.body == b"again"
        await bob_phone.write(ack_frame(second.seq))
        await wait_for(
            lambda: metric(port, "im_pusher_acks_cancelled_total") > cancelled_before + 1,
            what="second ACK",
        )
        assert pushes_of(bob_phone, first.seq) == seen
    finally:
        await bob_phone.close()


async def test_gives_up_after_max_attempts(delivery_stack: Any) -> None:
    alice, bob = unique_users(2)
    g0 = delivery_stack.gateway_addresses[0]
    port = delivery_stack.pusher_metrics_port
    bob_phone = RawStream(g0, token_for(bob, "phone"))
    try:
        await bob_phone.welcome()
        gave_up_before = metric(port, "im_pusher_gave_up_total")
        await _send_one(g0, alice, direct(alice, bob), b"never acked")
        push = await bob_phone.next_of("push")
        await wait_for(
            lambda: metric(port, "im_pusher_gave_up_total") > gave_up_before,
            timeout=15,
            what="give-up",
        )
        # Exactly max_attempts deliveries, and the timer is gone: no more ever.
        assert pushes_of(bob_phone, push.seq) == MAX_ATTEMPTS
    finally:
        await bob_phone.close()


async def test_retransmit_follows_the_device_to_another_gateway(delivery_stack: Any) -> None:
    alice, bob = unique_users(2)
    g0, g1 = delivery_stack.gateway_addresses
    port = delivery_stack.pusher_metrics_port
    old = RawStream(g0, token_for(bob, "phone"))
    new: RawStream | None = None
    try:
        await old.welcome()
        await _send_one(g0, alice, direct(alice, bob), b"moving")
        push = await old.next_of("push")
        # bob's phone reconnects at the other gateway before ACKing.
        new = RawStream(g1, token_for(bob, "phone"))
        await new.welcome()
        assert "replaced" in (await old.next_of("kick")).reason
        assert (await old.end()).code == grpc.StatusCode.OK
        again = await new.next_of("push", timeout=10)
        assert again.seq == push.seq and again.message.msg_id == push.message.msg_id
        # The ACK on the new gateway reaches the pusher (ack_to learned from the push).
        before = metric(port, "im_pusher_acks_cancelled_total")
        await new.write(ack_frame(push.seq))
        await wait_for(
            lambda: metric(port, "im_pusher_acks_cancelled_total") > before, what="ACK via g1"
        )
    finally:
        await old.close()
        if new is not None:
            await new.close()


async def test_every_online_device_gets_the_push(delivery_stack: Any) -> None:
    """Both of bob's devices (on different gateways) and alice's other device."""
    alice, bob = unique_users(2)
    g0, g1 = delivery_stack.gateway_addresses
    devices = {
        "bob-phone": RawStream(g0, token_for(bob, "phone")),
        "bob-laptop": RawStream(g1, token_for(bob, "laptop")),
        "alice-laptop": RawStream(g1, token_for(alice, "laptop")),
    }
    try:
        for d in devices.values():
            await d.welcome()
        ack = await _send_one(g0, alice, direct(alice, bob), b"to everyone")
        for name, d in devices.items():
            push = await d.next_of("push")
            assert push.message.msg_id == ack.msg_id, name
            await d.write(ack_frame(push.seq))
        alice_push = devices["alice-laptop"].frames[-1].push
        assert alice_push.seq == ack.seq  # the sender's own timeline entry
    finally:
        for d in devices.values():
            await d.close()


async def test_triggers_are_acked_after_fanout(delivery_stack: Any) -> None:
    """After traffic settles, the durable consumer holds nothing unacked, and it
    is configured for explicit acks and unlimited redelivery."""
    alice, bob = unique_users(2)
    await _send_one(delivery_stack.gateway_addresses[0], alice, direct(alice, bob), b"x")
    nc = await nats.connect(delivery_stack.nats.url())
    try:
        js = nc.jetstream()
        stream = stream_config(delivery_stack.stream, delivery_stack.subject_prefix).name

        async def drained() -> bool:
            info = await js.consumer_info(stream, "pusher")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await wait_for(drained, what="consumer drained")
        info = await js.consumer_info(stream, "pusher")
        assert info.config.max_deliver == -1
        assert str(getattr(info.config.ack_policy, "value", info.config.ack_policy)) == "explicit"
        assert (
            info.delivered.stream_seq >= 1
            and info.ack_floor.stream_seq == info.delivered.stream_seq
        )
    finally:
        await nc.close()


async def test_a_retransmit_after_the_recall_carries_no_body(delivery_stack: Any) -> None:
    """bob never ACKs: the pusher retransmits the message and its recall. Every
    push of the message that follows the push of its recall has no body (the timer
    held the body from before the recall)."""
    from im.common.v1 import common_pb2
    from im.gateway.v1 import gateway_pb2

    alice, bob = unique_users(2)
    g0 = delivery_stack.gateway_addresses[0]
    bob_phone = RawStream(g0, token_for(bob, "phone"))
    alice_phone = RawStream(g0, token_for(alice, "phone"))
    try:
        await bob_phone.welcome()
        await alice_phone.welcome()
        await alice_phone.write(send_frame(1, direct(alice, bob), body=b"oops secret"))
        ack = await alice_phone.next_of("send_ack")
        first = await bob_phone.next_of("push")
        assert first.message.body == b"oops secret"
        recall = gateway_pb2.ClientFrame(
            send=gateway_pb2.Send(
                client_id=2,
                client_msg_id="recall-" + first.message.client_msg_id,
                conversation_id=direct(alice, bob),
                kind=common_pb2.MESSAGE_KIND_RECALL,
                target_conv_seq=ack.conv_seq,
            )
        )
        await alice_phone.write(recall)
        assert (await alice_phone.next_of("send_ack")).conv_seq > ack.conv_seq
        # The original comes again (no ACK), after the recall's push.
        await wait_for(
            lambda: any(
                f.WhichOneof("frame") == "push"
                and f.push.message.kind == common_pb2.MESSAGE_KIND_RECALL
                for f in bob_phone.frames
            ),
            what="the recall pushed",
        )
        seen_recall = len(bob_phone.frames)
        await wait_for(
            lambda: any(
                f.WhichOneof("frame") == "push" and f.push.seq == first.seq
                for f in bob_phone.frames[seen_recall:]
            ),
            what="a retransmit of the original after the recall",
        )
        for f in bob_phone.frames[seen_recall:]:
            if f.WhichOneof("frame") == "push" and f.push.seq == first.seq:
                assert f.push.message.body == b"" and f.push.message.recalled
    finally:
        await bob_phone.close()
        await alice_phone.close()
