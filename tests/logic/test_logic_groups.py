"""Groups: membership by conv_seq range, permissions, History, ListConversations;
Fanout paging for big groups and big bodies; concurrent Fanout calls."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from logic_support import LogicClient

from im.common.v1 import common_pb2
from im.logic.v1 import logic_pb2 as pb
from imdev.servers import ServiceProcess


async def members_of(client: LogicClient, actor: str, conv: str, add: list[str]) -> list[str]:
    resp = await client.stub.AddMembers(
        pb.AddMembersRequest(actor_id=actor, conversation_id=conv, member_ids=add)
    )
    return list(resp.conversation.member_ids)


async def remove(
    client: LogicClient, actor: str, conv: str, who: list[str]
) -> common_pb2.Conversation:
    resp = await client.stub.RemoveMembers(
        pb.RemoveMembersRequest(actor_id=actor, conversation_id=conv, member_ids=who)
    )
    return resp.conversation


async def history(
    client: LogicClient, user: str, conv: str, before: int = 0, limit: int = 0
) -> pb.HistoryResponse:
    return await client.stub.History(
        pb.HistoryRequest(user_id=user, conversation_id=conv, before_conv_seq=before, limit=limit)
    )


async def test_membership_ranges_decide_who_receives_what(client: LogicClient) -> None:
    """Fan-out runs only at the end, after every change: recipients are the members
    at the time of each message, not the current ones."""
    created = await client.stub.CreateGroup(
        pb.CreateGroupRequest(creator_id="o", name="ranges", member_ids=["a", "b"])
    )
    conv = created.conversation
    assert (conv.kind, conv.owner_id, list(conv.member_ids)) == (
        common_pb2.CONVERSATION_KIND_GROUP,
        "o",
        ["a", "b", "o"],
    )
    g = conv.conversation_id
    m = {}
    m[1] = await client.send("o", g, b"1")
    assert await members_of(client, "a", g, ["c"]) == ["a", "b", "c", "o"]
    m[2] = await client.send("o", g, b"2")
    await remove(client, "o", g, ["b"])  # the owner removes b
    m[3] = await client.send("o", g, b"3")
    await remove(client, "a", g, ["a"])  # a leaves
    m[4] = await client.send("o", g, b"4")
    await remove(client, "o", g, ["c"])
    m[5] = await client.send("o", g, b"5")
    assert await members_of(client, "o", g, ["c"]) == ["c", "o"]  # c is back
    m[6] = await client.send("c", g, b"6")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.send("b", g, b"after removal")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    await client.fanout_all(g)
    expected = {"o": [1, 2, 3, 4, 5, 6], "a": [1, 2, 3], "b": [1, 2], "c": [2, 3, 4, 6]}
    for user, numbers in expected.items():
        # By conv_seq, the order every member displays: a sender's own row is written
        # by its send, so c's m6 precedes in c's timeline the m2-m4 fanned out later.
        rows = sorted((msg.conv_seq, msg.msg_id) for _, msg in await client.timeline(user))
        assert [i for _, i in rows] == [m[n].msg_id for n in numbers], user

    # History shows a member what it received, newest first, paged by conv_seq.
    page = await history(client, "c", g, limit=3)
    assert [x.msg_id for x in page.messages] == [m[6].msg_id, m[4].msg_id, m[3].msg_id]
    assert page.has_more
    rest = await history(client, "c", g, before=page.messages[-1].conv_seq)
    assert [x.msg_id for x in rest.messages] == [m[2].msg_id] and not rest.has_more
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await history(client, "b", g)  # no longer a member
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The owner leaves: the longest-standing member (c, back since m5) takes over
    # and may now remove others.
    left = await remove(client, "o", g, ["o"])
    assert (left.owner_id, list(left.member_ids)) == ("c", ["c"])


async def test_list_conversations(client: LogicClient) -> None:
    g = (
        await client.stub.CreateGroup(
            pb.CreateGroupRequest(creator_id="u1", name="team", member_ids=["u2"])
        )
    ).conversation.conversation_id
    sent = await client.send("u2", g, b"x")
    await client.send("u2", g, b"y")
    direct = await client.send("u3", "d:u1:u3", b"z")
    resp = await client.stub.ListConversations(pb.ListConversationsRequest(user_id="u1"))
    got = {c.conversation_id: c for c in resp.conversations}
    assert set(got) == {g, "d:u1:u3"}
    assert got[g].kind == common_pb2.CONVERSATION_KIND_GROUP and got[g].name == "team"
    assert list(got[g].member_ids) == ["u1", "u2"] and got[g].owner_id == "u1"
    assert got[g].last_conv_seq > sent.conv_seq
    assert got["d:u1:u3"].kind == common_pb2.CONVERSATION_KIND_DIRECT
    assert list(got["d:u1:u3"].member_ids) == ["u1", "u3"]
    assert got["d:u1:u3"].last_conv_seq == direct.conv_seq
    # u2 is in the group only; a stranger in nothing.
    u2 = await client.stub.ListConversations(pb.ListConversationsRequest(user_id="u2"))
    assert [c.conversation_id for c in u2.conversations] == [g]
    none = await client.stub.ListConversations(pb.ListConversationsRequest(user_id="nobody"))
    assert list(none.conversations) == []


async def test_fanout_pages_big_groups_and_big_bodies(
    spawn: Callable[..., ServiceProcess], logic_env: dict[str, str]
) -> None:
    """A page holds at most fanout_max_rows rows (the user locks of one
    transaction) and fits the response budget; a message split over pages continues
    where it stopped; every (member, message) row comes exactly once, in conv_seq
    then user order. Sync pages by the capped limit and by bytes the same way."""
    logic = spawn(
        "logic",
        {
            **logic_env,
            "IM_LOGIC_FANOUT_MAX_ROWS": "50",
            "IM_LOGIC_MAX_BODY_BYTES": "4096",
            "IM_LOGIC_MAX_RESPONSE_BYTES": "65536",
            "IM_LOGIC_SYNC_MAX_LIMIT": "40",
            "IM_LOGIC_SYNC_DEFAULT_LIMIT": "20",
        },
    )
    client = LogicClient(logic.address)
    try:
        members = [f"u{i:03d}" for i in range(120)]
        g = (
            await client.stub.CreateGroup(
                pb.CreateGroupRequest(creator_id="u000", member_ids=members)
            )
        ).conversation.conversation_id
        acks = [await client.send("u000", g, f"m{i}".encode()) for i in range(3)]
        pages = []
        while True:
            resp = await client.stub.Fanout(pb.FanoutRequest(conversation_id=g))
            pages.append(resp)
            if not resp.has_more:
                break
        assert [len(p.deliveries) for p in pages] == [50] * 7 + [10]
        # The watermark moves only when a message is complete.
        c1, c2, c3 = (a.conv_seq for a in acks)
        assert [p.watermark for p in pages] == [0, 0, c1, c1, c2, c2, c2, c3]
        rows = [(d.message.conv_seq, d.user_id) for p in pages for d in p.deliveries]
        assert rows == sorted(rows) and len(set(rows)) == 360
        assert Counter(d.message.msg_id for p in pages for d in p.deliveries) == {
            a.msg_id: 120 for a in acks
        }
        again = await client.stub.Fanout(pb.FanoutRequest(conversation_id=g))
        assert list(again.deliveries) == [] and not again.has_more

        # Big bodies: the response budget cuts the page before the row limit does.
        body = b"b" * 3000
        for _ in range(30):
            await client.send("x", "d:x:y", body)
        sizes = []
        while True:
            resp = await client.stub.Fanout(pb.FanoutRequest(conversation_id="d:x:y"))
            sizes.append(len(resp.deliveries))
            assert resp.ByteSize() <= 65536
            if not resp.has_more:
                break
        assert sum(sizes) == 60 and max(sizes) < 50 and len(sizes) > 2

        # Sync: limit capped at 40 rows, and cut by bytes too.
        page = await client.stub.SyncMessages(
            pb.SyncMessagesRequest(user_id="u005", after_seq=0, limit=10_000)
        )
        assert len(page.entries) == 3 and not page.has_more
        page = await client.stub.SyncMessages(
            pb.SyncMessagesRequest(user_id="y", after_seq=0, limit=10_000)
        )
        assert 0 < len(page.entries) < 30 and page.has_more and page.ByteSize() <= 65536
        assert len(await client.timeline("y", page=10_000)) == 30
    finally:
        await client.close()


async def test_concurrent_fanouts_serialise_and_the_others_find_nothing(
    client: LogicClient,
) -> None:
    members = [f"v{i}" for i in range(10)]
    g = (
        await client.stub.CreateGroup(pb.CreateGroupRequest(creator_id="v0", member_ids=members))
    ).conversation.conversation_id
    for i in range(20):
        await client.send(members[i % 10], g, f"{i}".encode())
    results = await asyncio.gather(
        *(
            client.stub.Fanout(pb.FanoutRequest(conversation_id=g, max_messages=1000))
            for _ in range(5)
        )
    )
    sizes = sorted(len(r.deliveries) for r in results)
    assert sizes == [0, 0, 0, 0, 200]
    assert len({r.watermark for r in results}) == 1
    rows = {(d.user_id, d.message.msg_id) for r in results for d in r.deliveries}
    assert len(rows) == 200
