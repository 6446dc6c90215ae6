"""Logic.SendMessages: several sends in one call, each item validated and stored
exactly as SendMessage would (same status code and message for a refused one, the
same ACK for a stored one), one result per item in request order; the call fails
as a whole only when malformed. Real PostgreSQL, seqsvc, NATS and logic processes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest
from logic_support import TEXT, LogicClient, table_counts

from im.logic.v1 import logic_pb2 as pb
from imdev.servers import ServiceProcess


def request(
    sender: str, conversation: str, body: bytes = b"hi", client_msg_id: str | None = None
) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        sender_id=sender,
        sender_device_id="d1",
        client_msg_id=client_msg_id or uuid.uuid4().hex,
        conversation_id=conversation,
        content_type=TEXT,
        body=body,
    )


async def single(client: LogicClient, req: pb.SendMessageRequest) -> tuple[int, str, object]:
    """(status code number, details, response or None) of one SendMessage."""
    try:
        resp = await client.stub.SendMessage(req, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().value[0], exc.details() or "", None
    return 0, "", resp


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def test_each_item_gets_what_send_message_would_answer(client: LogicClient) -> None:
    alice, bob, carol = uid("a"), uid("b"), uid("c")
    direct = f"d:{alice}:{bob}"
    group = (
        await client.stub.CreateGroup(
            pb.CreateGroupRequest(creator_id=alice, name="g", member_ids=[bob]), timeout=10
        )
    ).conversation.conversation_id
    first = await client.send(alice, direct, client_msg_id="dup-1")
    items = [
        request(alice, direct, b"new"),  # valid
        request(alice, direct, b"again", client_msg_id="dup-1"),  # duplicate
        request(carol, group, b"not a member"),  # PERMISSION_DENIED
        request(alice, "g:nosuchgroup123", b"unknown group"),  # NOT_FOUND
        request("bad id!", direct, b"invalid sender"),  # INVALID_ARGUMENT
        request(alice, "x:what", b"invalid conversation"),  # INVALID_ARGUMENT
        request(alice, direct, b"x" * (64 * 1024 + 1)),  # oversized: INVALID_ARGUMENT
        request(bob, group, b"group send"),  # valid
    ]
    resp = await client.stub.SendMessages(pb.SendMessagesRequest(items=items), timeout=20)
    assert len(resp.results) == len(items)
    codes = [r.error_code for r in resp.results]
    assert codes == [
        0,
        0,
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        0,
    ], resp
    # The duplicate is the first send's ACK.
    dup = resp.results[1].response
    assert dup.duplicate and (dup.msg_id, dup.seq, dup.conv_seq) == (
        first.msg_id,
        first.seq,
        first.conv_seq,
    )
    for item, result in zip(items, resp.results, strict=True):
        code, details, again = await single(client, item)
        if result.error_code:
            # A refused item: SendMessage refuses it with the same code and message.
            assert (code, details) == (result.error_code, result.error_message), item
            assert not result.HasField("response")
        else:
            # A stored item: SendMessage finds it stored (same ids), nothing new.
            assert code == 0 and isinstance(again, pb.SendMessageResponse)
            assert again.duplicate
            got = result.response
            assert (again.msg_id, again.seq, again.conv_seq) == (
                got.msg_id,
                got.seq,
                got.conv_seq,
            )
    # Exactly the two new messages (and the first one) were stored.
    timeline = await client.timeline(alice)
    assert [m.body for _, m in timeline] == [b"hello", b"new"]
    assert [m.body for _, m in await client.timeline(bob)] == [b"group send"]


async def test_an_empty_call_is_fine(client: LogicClient) -> None:
    resp = await client.stub.SendMessages(pb.SendMessagesRequest(), timeout=10)
    assert list(resp.results) == []


async def test_malformed_calls_fail_as_a_whole_and_store_nothing(
    spawn: Callable[..., ServiceProcess], logic_env: dict[str, str], pg_dsn: str
) -> None:
    client = LogicClient(
        spawn("logic", {**logic_env, "IM_LOGIC_SEND_MESSAGES_MAX_ITEMS": "3"}).address
    )
    try:
        alice, bob = uid("a"), uid("b")
        direct = f"d:{alice}:{bob}"
        before = await table_counts(pg_dsn)
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await client.stub.SendMessages(
                pb.SendMessagesRequest(items=[request(alice, direct) for _ in range(4)]),
                timeout=10,
            )
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 3" in (too_many.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as mismatched:
            await client.stub.SendMessages(
                pb.SendMessagesRequest(
                    items=[request(alice, direct) for _ in range(2)], traceparents=[""]
                ),
                timeout=10,
            )
        assert mismatched.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "traceparents" in (mismatched.value.details() or "")
        assert await table_counts(pg_dsn) == before
        # At the limit, with traceparents (one malformed: ignored), all are stored.
        ok = await client.stub.SendMessages(
            pb.SendMessagesRequest(
                items=[request(alice, direct, f"m{i}".encode()) for i in range(3)],
                traceparents=[
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "garbage",
                    "",
                ],
            ),
            timeout=10,
        )
        assert [r.error_code for r in ok.results] == [0, 0, 0]
        assert sorted(m.body for _, m in await client.timeline(alice)) == [b"m0", b"m1", b"m2"]
        seqs = [r.response.seq for r in ok.results]
        assert len(set(seqs)) == 3
    finally:
        await client.close()
