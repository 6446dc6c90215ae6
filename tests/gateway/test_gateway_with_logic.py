"""The gateway with the real stack behind it (PostgreSQL, seqsvc, logic, NATS,
pusher): SendAcks mean stored, duplicates get the same ACK, logic's refusals map
to SendErrors, and a token only ever acts as its own user.

Skipped (with the reason) while services/logic/server.py does not exist.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from gwkit import (
    RawStream,
    bearer,
    direct,
    send_frame,
    token_for,
    unique_users,
)

from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc

Code = gateway_pb2.SendErrorCode


async def _sync_all(address: str, token: str) -> list[Any]:
    entries: list[Any] = []
    after = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        while True:
            resp = await stub.Sync(
                gateway_pb2.SyncRequest(after_seq=after, limit=50),
                metadata=bearer(token),
                timeout=10,
            )
            entries += resp.entries
            if resp.entries:
                after = resp.entries[-1].seq
            if not resp.has_more:
                return entries


async def test_send_ack_means_stored_and_duplicates_get_the_same_ack(delivery_stack: Any) -> None:
    alice, bob = unique_users(2)
    conv = direct(alice, bob)
    gw = delivery_stack.gateway_addresses[0]
    token = token_for(alice, "phone")
    s = RawStream(gw, token)
    try:
        await s.welcome()
        for cid in (1, 2, 3):
            await s.write(send_frame(cid, conv, body=f"m{cid}".encode(), client_msg_id=f"cm{cid}"))
        acks = [await s.next_of("send_ack") for _ in range(3)]
        assert [a.client_id for a in acks] == [1, 2, 3]
        assert [a.client_msg_id for a in acks] == ["cm1", "cm2", "cm3"]
        assert not any(a.duplicate for a in acks)
        assert acks[0].seq < acks[1].seq < acks[2].seq
        assert acks[0].conv_seq < acks[1].conv_seq < acks[2].conv_seq
        assert len({a.msg_id for a in acks}) == 3
        # Every ACKed message is already in the sender's timeline (I3: committed).
        timeline = {e.seq: e.message for e in await _sync_all(gw, token)}
        for a in acks:
            assert timeline[a.seq].msg_id == a.msg_id
            assert timeline[a.seq].sender_id == alice
            assert timeline[a.seq].sender_device_id == "phone"
        # A retransmit of client_id 2 gets the very same ACK, and stores nothing.
        await s.write(send_frame(2, conv, body=b"m2", client_msg_id="cm2"))
        assert await s.next_of("send_ack") == acks[1]
        assert len(await _sync_all(gw, token)) == 3
    finally:
        await s.close()
    # After a reconnect (client_id starts again at 1), the same client_msg_id is
    # deduplicated by logic: the original message, not a second one.
    s = RawStream(delivery_stack.gateway_addresses[1], token)
    try:
        await s.welcome()
        await s.write(send_frame(1, conv, body=b"m3", client_msg_id="cm3"))
        again = await s.next_of("send_ack")
        assert (again.client_id, again.msg_id, again.seq) == (1, acks[2].msg_id, acks[2].seq)
        assert again.duplicate  # the server says it had this client_msg_id already
        assert len(await _sync_all(gw, token)) == 3
    finally:
        await s.close()


async def test_out_of_order_with_a_live_backend(delivery_stack: Any) -> None:
    alice, bob = unique_users(2)
    s = RawStream(delivery_stack.gateway_addresses[0], token_for(alice))
    try:
        await s.welcome()
        await s.write(send_frame(1, direct(alice, bob)))
        assert (await s.next_of("send_ack")).client_id == 1
        await s.write(send_frame(3, direct(alice, bob)))
        err = await s.next_of("send_error")
        assert (err.code, err.expected_client_id, err.retryable) == (
            Code.SEND_ERROR_CODE_OUT_OF_ORDER,
            2,
            False,
        )
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("conversation", "code"),
    [
        ("d:{b}:{c}", Code.SEND_ERROR_CODE_PERMISSION_DENIED),
        ("g:doesnotexist{a}", Code.SEND_ERROR_CODE_NOT_FOUND),
        ("nonsense", Code.SEND_ERROR_CODE_INVALID_ARGUMENT),
    ],
)
async def test_refusals_map_to_send_errors_and_keep_the_client_id(
    delivery_stack: Any, conversation: str, code: int
) -> None:
    alice, bob, carol = unique_users(3)
    conv = conversation.format(a=alice, b=bob, c=carol)
    s = RawStream(delivery_stack.gateway_addresses[0], token_for(alice))
    try:
        await s.welcome()
        await s.write(send_frame(1, conv))
        err = await s.next_of("send_error")
        assert (err.client_id, err.code, err.retryable) == (1, code, False), err
        assert err.reason
        # Not consumed: the next send reuses client_id 1.
        await s.write(send_frame(1, direct(alice, bob)))
        assert (await s.next_of("send_ack")).client_id == 1
    finally:
        await s.close()


async def test_a_token_acts_only_as_its_own_user(delivery_stack: Any) -> None:
    alice, bob, carol = unique_users(3)
    conv = direct(alice, bob)
    gw = delivery_stack.gateway_addresses[0]
    s = RawStream(gw, token_for(alice))
    try:
        await s.welcome()
        await s.write(send_frame(1, conv, body=b"for bob only"))
        ack = await s.next_of("send_ack")
    finally:
        await s.close()

    async with grpc.aio.insecure_channel(gw) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        # Sync returns only the caller's own timeline: carol sees nothing.
        assert await _sync_all(gw, token_for(carol)) == []
        assert [e.message.msg_id for e in await _sync_all(gw, token_for(alice))] == [ack.msg_id]
        # History of a conversation the caller is not in: PERMISSION_DENIED.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.History(
                gateway_pb2.HistoryRequest(conversation_id=conv),
                metadata=bearer(token_for(carol)),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for member in (alice, bob):
            hist = await stub.History(
                gateway_pb2.HistoryRequest(conversation_id=conv),
                metadata=bearer(token_for(member)),
                timeout=10,
            )
            assert [m.msg_id for m in hist.messages] == [ack.msg_id]
            assert hist.messages[0].sender_id == alice
        # carol cannot send as alice into alice's conversation either.
        c = RawStream(gw, token_for(carol))
        try:
            await c.welcome()
            await c.write(send_frame(1, conv))
            assert (await c.next_of("send_error")).code == Code.SEND_ERROR_CODE_PERMISSION_DENIED
        finally:
            await c.close()
        # Groups are created as the caller, who is owner and member.
        created = await stub.CreateGroup(
            gateway_pb2.CreateGroupRequest(name="team", member_ids=[bob]),
            metadata=bearer(token_for(carol)),
            timeout=10,
        )
        group = created.conversation
        assert group.owner_id == carol and set(group.member_ids) == {carol, bob}
        listed = await stub.ListConversations(
            gateway_pb2.ListConversationsRequest(), metadata=bearer(token_for(carol)), timeout=10
        )
        ids = {c.conversation_id for c in listed.conversations}
        assert group.conversation_id in ids and conv not in ids
        # Only the owner may remove others: alice (not even a member) cannot.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RemoveMembers(
                gateway_pb2.RemoveMembersRequest(
                    conversation_id=group.conversation_id, member_ids=[bob]
                ),
                metadata=bearer(token_for(alice)),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
