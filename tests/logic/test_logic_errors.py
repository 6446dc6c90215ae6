"""Bad input of every kind gets the documented status code and an actionable
message, and writes nothing (I7)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from logic_support import TEXT, LogicClient, table_counts, wait_for

from im.logic.v1 import logic_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def send_req(**kw: Any) -> pb.SendMessageRequest:
    fields: dict[str, Any] = {
        "sender_id": "alice",
        "sender_device_id": "phone",
        "client_msg_id": "c-1",
        "conversation_id": "d:alice:bob",
        "content_type": TEXT,
        "body": b"hello",
    }
    fields.update(kw)
    return pb.SendMessageRequest(**fields)


async def expect(call: Awaitable[Any], code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    assert fragment in (err.value.details() or ""), err.value.details()


async def test_bad_input_gets_the_documented_error_and_writes_nothing(
    client: LogicClient, pg_dsn: str
) -> None:
    stub = client.stub
    group = (
        await stub.CreateGroup(
            pb.CreateGroupRequest(creator_id="owner", name="team", member_ids=["alice", "mia"])
        )
    ).conversation.conversation_id
    await client.send("alice", group, client_msg_id="seed")

    async def outbox_empty() -> bool:
        return (await table_counts(pg_dsn))["outbox"] == 0

    await wait_for(outbox_empty, what="the seed's outbox row deleted")
    before = await table_counts(pg_dsn)

    send, sync, history = "SendMessage", "SyncMessages", "History"
    add, remove, create = "AddMembers", "RemoveMembers", "CreateGroup"
    H, A, C = pb.HistoryRequest, pb.AddMembersRequest, pb.CreateGroupRequest
    cases: list[tuple[str, Any, grpc.StatusCode, str]] = [
        (send, send_req(body=b"x" * (64 * 1024 + 1)), INVALID, "limit is 65536"),
        (send, send_req(body=b""), INVALID, "body is empty"),
        (send, send_req(sender_id="al ice"), INVALID, "sender_id"),
        (send, send_req(sender_id=""), INVALID, "sender_id"),
        (send, send_req(sender_device_id=""), INVALID, "device id"),
        (send, send_req(client_msg_id=""), INVALID, "client_msg_id"),
        (send, send_req(client_msg_id="a b"), INVALID, "client_msg_id"),
        (send, send_req(client_msg_id="x" * 129), INVALID, "client_msg_id"),
        (send, send_req(content_type=99), INVALID, "content_type"),
        (send, send_req(conversation_id=""), INVALID, "d:<user_a>:<user_b>"),
        (send, send_req(conversation_id="x:1"), INVALID, "g:<id>"),
        (send, send_req(conversation_id="d:bob:alice"), INVALID, "use d:alice:bob"),
        (send, send_req(conversation_id="d:alice:alice"), INVALID, "two users"),
        (send, send_req(conversation_id="d:bob:carl"), DENIED, "not one of"),
        (send, send_req(conversation_id="g:nope"), NOT_FOUND, "CreateGroup"),
        (send, send_req(sender_id="eve", conversation_id=group), DENIED, "not a member"),
        (sync, pb.SyncMessagesRequest(user_id=""), INVALID, "user_id"),
        (sync, pb.SyncMessagesRequest(user_id="a", after_seq=-1), INVALID, "after_seq"),
        (sync, pb.SyncMessagesRequest(user_id="a", limit=-5), INVALID, "limit"),
        # History is for members only: a foreign conversation is refused.
        (history, H(user_id="eve", conversation_id=group), DENIED, "not a member"),
        (history, H(user_id="eve", conversation_id="d:alice:bob"), DENIED, "not part of"),
        (history, H(user_id="eve", conversation_id="g:nope"), NOT_FOUND, "does not exist"),
        (history, H(user_id="alice", conversation_id=group, before_conv_seq=-1), INVALID, "before"),
        ("Fanout", pb.FanoutRequest(conversation_id="nonsense"), INVALID, "conversation_id"),
        (create, C(creator_id="x y"), INVALID, "creator_id"),
        (create, C(creator_id="o", member_ids=["ok", "n o"]), INVALID, "member_ids"),
        (create, C(creator_id="o", name="x" * 200), INVALID, "name"),
        (create, C(creator_id="o", member_ids=[f"u{i}" for i in range(2000)]), INVALID, "2000"),
        (add, A(actor_id="eve", conversation_id=group, member_ids=["eve"]), DENIED, "not a member"),
        (add, A(actor_id="al", conversation_id="g:nope", member_ids=["x"]), NOT_FOUND, "not exist"),
        (add, A(actor_id="alice", conversation_id=group), INVALID, "member_ids is empty"),
        (
            add,
            A(actor_id="alice", conversation_id="d:alice:bob", member_ids=["x"]),
            INVALID,
            "direct",
        ),
        (
            remove,
            pb.RemoveMembersRequest(actor_id="alice", conversation_id=group, member_ids=["mia"]),
            DENIED,
            "only the owner",
        ),
        ("ListConversations", pb.ListConversationsRequest(user_id=""), INVALID, "user_id"),
    ]
    for method, req, code, fragment in cases:
        await expect(getattr(stub, method)(req), code, fragment)

    # Bytes that do not parse (a string field that is not UTF-8): INVALID_ARGUMENT,
    # not grpc's INTERNAL.
    raw = client.channel.unary_unary(
        "/im.logic.v1.Logic/SendMessage",
        request_serializer=lambda b: b,
        response_deserializer=pb.SendMessageResponse.FromString,
    )
    await expect(raw(b"\x0a\x02\xff\xfe"), INVALID, "UTF-8")

    assert await table_counts(pg_dsn) == before


async def test_a_full_group_refuses_more_members(
    spawn: Callable[..., Any], logic_env: dict[str, str], pg_dsn: str
) -> None:
    logic = spawn("logic", {**logic_env, "IM_LOGIC_MAX_GROUP_SIZE": "3"})
    client = LogicClient(logic.address)
    try:
        stub = client.stub
        conv = (
            await stub.CreateGroup(pb.CreateGroupRequest(creator_id="o", member_ids=["a", "b"]))
        ).conversation
        assert conv.member_ids == ["a", "b", "o"]
        before = await table_counts(pg_dsn)
        await expect(
            stub.AddMembers(
                pb.AddMembersRequest(
                    actor_id="a", conversation_id=conv.conversation_id, member_ids=["c"]
                )
            ),
            PRECONDITION,
            "limit of 3",
        )
        assert await table_counts(pg_dsn) == before
        # Adding a current member is a no-op, not an error.
        again = await stub.AddMembers(
            pb.AddMembersRequest(
                actor_id="a", conversation_id=conv.conversation_id, member_ids=["b"]
            )
        )
        assert again.conversation.member_ids == ["a", "b", "o"]
    finally:
        await client.close()
