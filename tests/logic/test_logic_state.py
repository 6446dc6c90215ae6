"""Conversation state in logic (state.py, conversations.py): events stored like
messages with their own conv_seq, who receives them, their effects and refusals;
the paged conversation list with unread counts; receipts; members; shared users."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
from logic_support import LogicClient, query, wait_for

from im.common.v1 import common_pb2 as cpb
from im.logic.v1 import logic_pb2 as pb
from imdev.servers import ServiceProcess

READ = cpb.MESSAGE_KIND_READ
DELIVERED = cpb.MESSAGE_KIND_DELIVERED
EDIT = cpb.MESSAGE_KIND_EDIT
RECALL = cpb.MESSAGE_KIND_RECALL
DELETE = cpb.MESSAGE_KIND_DELETE_FOR_ME


async def event(
    client: LogicClient,
    sender: str,
    conv: str,
    kind: int,
    target: int,
    body: bytes = b"",
    client_msg_id: str | None = None,
) -> pb.SendMessageResponse:
    return await client.stub.SendMessage(
        pb.SendMessageRequest(
            sender_id=sender,
            sender_device_id="d1",
            client_msg_id=client_msg_id or uuid.uuid4().hex,
            conversation_id=conv,
            content_type=cpb.CONTENT_TYPE_TEXT,
            body=body,
            kind=kind,  # type: ignore[arg-type]
            target_conv_seq=target,
        ),
        timeout=10,
    )


async def refused(coro: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro  # type: ignore[misc]
    return err.value


async def conversations(client: LogicClient, user: str) -> dict[str, cpb.Conversation]:
    out: dict[str, cpb.Conversation] = {}
    token = ""
    while True:
        resp = await client.stub.ListConversations(
            pb.ListConversationsRequest(user_id=user, page_size=2, page_token=token), timeout=10
        )
        out.update({c.conversation_id: c for c in resp.conversations})
        token = resp.next_page_token
        if not token:
            return out


async def group(client: LogicClient, owner: str, members: list[str]) -> str:
    resp = await client.stub.CreateGroup(
        pb.CreateGroupRequest(creator_id=owner, name="g", member_ids=members), timeout=10
    )
    return resp.conversation.conversation_id


async def kinds(client: LogicClient, user: str, conv: str) -> list[tuple[int, int, int]]:
    """(kind, conv_seq, target) of the user's timeline entries of conv, in seq order."""
    return [
        (m.kind, m.conv_seq, m.target_conv_seq)
        for _, m in await client.timeline(user)
        if m.conversation_id == conv
    ]


async def test_read_positions_move_forward_and_reach_the_right_timelines(
    client: LogicClient,
) -> None:
    d = "d:alice:bob"
    m1 = await client.send("alice", d, b"1")
    m2 = await client.send("alice", d, b"2")
    r = await event(client, "bob", d, READ, m1.conv_seq)
    assert r.msg_id > 0 and r.conv_seq > m2.conv_seq  # an event has its own conv_seq
    # At or below the current position: nothing stored, the current position back.
    same = await event(client, "bob", d, READ, m1.conv_seq)
    assert (same.msg_id, same.seq, same.conv_seq) == (0, 0, m1.conv_seq)
    # Above the head: refused, nothing changed.
    err = await refused(event(client, "bob", d, READ, 10**9))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "above" in (err.details() or "")
    # A retransmit of the stored READ (same client_msg_id) is a duplicate.
    cmid = uuid.uuid4().hex
    first = await event(client, "bob", d, READ, m2.conv_seq, client_msg_id=cmid)
    again = await event(client, "bob", d, READ, m2.conv_seq, client_msg_id=cmid)
    assert again.duplicate and again.msg_id == first.msg_id
    await client.fanout_all(d)
    # Direct: both users get the READs (bob's other devices, alice's receipt).
    for user in ("alice", "bob"):
        reads = [(k, t) for k, _, t in await kinds(client, user, d) if k == READ]
        assert reads == [(READ, m1.conv_seq), (READ, m2.conv_seq)], user
    convs = await conversations(client, "alice")
    assert convs[d].peer_read_conv_seq == m2.conv_seq
    assert convs[d].peer_delivered_conv_seq == m2.conv_seq  # read implies received
    assert (await conversations(client, "bob"))[d].read_conv_seq == m2.conv_seq
    # A direct conversation's receipts: "read by 1 of 1", the peer.
    resp = await client.stub.GetReceipts(
        pb.GetReceiptsRequest(user_id="alice", conversation_id=d, conv_seq=m2.conv_seq)
    )
    assert (resp.member_count, resp.read_count, resp.delivered) == (1, 1, True)


async def test_group_reads_go_to_the_reader_only_and_receipts_are_queried(
    client: LogicClient,
) -> None:
    g = await group(client, "o", ["a", "b", "c"])
    m = await client.send("o", g, b"hello")
    # (A device reads what it received: the message is in its timeline first. A
    # sender's own rows are written at once, so a timeline is in commit order.)
    await client.fanout_all(g)
    await event(client, "a", g, READ, m.conv_seq)
    await event(client, "b", g, READ, m.conv_seq)
    await client.fanout_all(g)
    assert [k for k, _, _ in await kinds(client, "a", g)] == [cpb.MESSAGE_KIND_MESSAGE, READ]
    assert [k for k, _, _ in await kinds(client, "c", g)] == [cpb.MESSAGE_KIND_MESSAGE]
    assert [k for k, _, _ in await kinds(client, "o", g)] == [cpb.MESSAGE_KIND_MESSAGE]
    await event(client, "o", g, READ, m.conv_seq)  # the sender's own read never counts

    resp = await client.stub.GetReceipts(
        pb.GetReceiptsRequest(
            user_id="o", conversation_id=g, conv_seq=m.conv_seq, list_readers=True, page_size=1
        )
    )
    # "Read by 2 of 3": the sender o counts in neither.
    assert (resp.member_count, resp.read_count, list(resp.reader_ids)) == (3, 2, ["a"])
    nxt = await client.stub.GetReceipts(
        pb.GetReceiptsRequest(
            user_id="o",
            conversation_id=g,
            conv_seq=m.conv_seq,
            list_readers=True,
            page_size=1,
            page_token=resp.next_page_token,
        )
    )
    assert list(nxt.reader_ids) == ["b"] and nxt.next_page_token == ""
    err = await refused(
        client.stub.GetReceipts(
            pb.GetReceiptsRequest(user_id="stranger", conversation_id=g, conv_seq=m.conv_seq)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # DELIVERED is for direct conversations only.
    err = await refused(event(client, "a", g, DELIVERED, m.conv_seq))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_edit_and_recall_rules_and_effects(client: LogicClient, pg_dsn: str) -> None:
    g = await group(client, "owner", ["alice", "bob"])
    m = await client.send("alice", g, b"secret v1")
    e = await event(client, "alice", g, EDIT, m.conv_seq, b"secret v2")
    assert e.conv_seq > m.conv_seq
    err = await refused(event(client, "bob", g, EDIT, m.conv_seq, b"not mine"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(event(client, "bob", g, RECALL, m.conv_seq))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(event(client, "alice", g, RECALL, 10**6))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(event(client, "alice", g, RECALL, e.conv_seq))  # an event, not a message
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(event(client, "alice", g, RECALL, m.conv_seq, b"body"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    hist = await client.stub.History(pb.HistoryRequest(user_id="bob", conversation_id=g))
    assert [(x.body, x.edited_at_ms > 0) for x in hist.messages] == [(b"secret v2", True)]

    # The group's owner may recall anyone's message.
    await event(client, "owner", g, RECALL, m.conv_seq)
    err = await refused(event(client, "alice", g, RECALL, m.conv_seq))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = await refused(event(client, "alice", g, EDIT, m.conv_seq, b"v3"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Gone from the database: the message's body and its edit's.
    rows = await query(pg_dsn, "SELECT count(*) FROM messages WHERE body LIKE '%%secret%%'")
    assert rows == [(0,)]
    hist = await client.stub.History(pb.HistoryRequest(user_id="bob", conversation_id=g))
    assert [(x.body, x.recalled) for x in hist.messages] == [(b"", True)]
    await client.fanout_all(g)
    for user in ("owner", "alice", "bob"):
        # The owner's own RECALL row was written by its send, before the fan-out
        # of the message: by conv_seq (the display order) all three agree.
        entries = [m for _, m in await client.timeline(user) if m.conversation_id == g]
        entries.sort(key=lambda x: x.conv_seq)
        assert [x.kind for x in entries] == [cpb.MESSAGE_KIND_MESSAGE, EDIT, RECALL], user
        assert all(x.body == b"" for x in entries), user


async def test_windows_close(
    spawn: Callable[..., ServiceProcess], logic_env: dict[str, str]
) -> None:
    logic = spawn("logic", {**logic_env, "IM_LOGIC_EDIT_WINDOW_S": "0.5"})
    c = LogicClient(logic.address)
    try:
        m = await c.send("a", "d:a:b", b"x")
        await event(c, "a", "d:a:b", EDIT, m.conv_seq, b"y")
        await asyncio.sleep(0.7)
        err = await refused(event(c, "a", "d:a:b", EDIT, m.conv_seq, b"z"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "IM_LOGIC_EDIT_WINDOW_S" in (err.details() or "")
        await event(c, "a", "d:a:b", RECALL, m.conv_seq)  # its own window (default: a day)
    finally:
        await c.close()


async def test_a_recall_after_its_window_is_refused_and_changes_nothing(
    spawn: Callable[..., ServiceProcess], logic_env: dict[str, str], pg_dsn: str
) -> None:
    window_s = 2.0
    logic = spawn("logic", {**logic_env, "IM_LOGIC_RECALL_WINDOW_S": str(window_s)})
    c = LogicClient(logic.address)
    d = "d:a:b"
    rows = (
        "SELECT conv_seq, kind, body, recalled FROM messages "
        "WHERE conversation_id = %s ORDER BY conv_seq"
    )
    try:
        early = await c.send("a", d, b"recalled in time")
        recall = await event(c, "a", d, RECALL, early.conv_seq)  # inside the window
        late = await c.send("a", d, b"kept")
        await c.fanout_all(d)
        before = await query(pg_dsn, rows, (d,))
        # Until logic's clock is past the window: it compares its own time with
        # the stored server_time_ms, and the test runs on the same host.
        deadline_ms = late.server_time_ms + window_s * 1000 + 50
        await wait_for(_clock_past(deadline_ms), timeout=10, what="the recall window to pass")

        err = await refused(event(c, "a", d, RECALL, late.conv_seq))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.details() or ""
        assert "RECALL" in details and "IM_LOGIC_RECALL_WINDOW_S" in details, details
        assert f"allowed for {window_s:g} s" in details, details

        # Nothing changed: no new row, the body in place, nothing to fan out;
        # History and Sync still serve it to both users.
        after = await query(pg_dsn, rows, (d,))
        assert after == before
        assert [(s, k, bytes(b), r) for s, k, b, r in after] == [
            (early.conv_seq, cpb.MESSAGE_KIND_MESSAGE, b"", True),
            (recall.conv_seq, RECALL, b"", False),
            (late.conv_seq, cpb.MESSAGE_KIND_MESSAGE, b"kept", False),
        ]
        assert await c.fanout_all(d) == []
        for user in ("a", "b"):
            hist = await c.stub.History(pb.HistoryRequest(user_id=user, conversation_id=d))
            assert [(x.conv_seq, x.body, x.recalled) for x in hist.messages] == [
                (late.conv_seq, b"kept", False),
                (early.conv_seq, b"", True),
            ], user
            timeline = [m for _, m in await c.timeline(user) if m.conversation_id == d]
            assert [(x.conv_seq, x.kind, x.body, x.recalled) for x in timeline] == [
                (early.conv_seq, cpb.MESSAGE_KIND_MESSAGE, b"", True),
                (recall.conv_seq, RECALL, b"", False),
                (late.conv_seq, cpb.MESSAGE_KIND_MESSAGE, b"kept", False),
            ], user
    finally:
        await c.close()


def _clock_past(time_ms: float) -> Callable[[], Awaitable[bool]]:
    async def past() -> bool:
        return time.time() * 1000 > time_ms

    return past


async def test_delete_for_me_hides_for_that_user_only(client: LogicClient) -> None:
    d = "d:carol:dave"
    m = await client.send("carol", d, b"embarrassing")
    await client.fanout_all(d)
    err = await refused(event(client, "dave", d, DELETE, 999_999))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    await event(client, "dave", d, DELETE, m.conv_seq)
    await client.fanout_all(d)
    dave = [x for _, x in await client.timeline("dave") if x.conversation_id == d]
    assert [(x.kind, x.body, x.deleted_for_me) for x in dave] == [
        (cpb.MESSAGE_KIND_MESSAGE, b"", True),
        (DELETE, b"", False),
    ]
    carol = [x for _, x in await client.timeline("carol") if x.conversation_id == d]
    assert [(x.kind, x.body) for x in carol] == [(cpb.MESSAGE_KIND_MESSAGE, b"embarrassing")]
    hist = await client.stub.History(pb.HistoryRequest(user_id="dave", conversation_id=d))
    assert [(x.body, x.deleted_for_me) for x in hist.messages] == [(b"", True)]


async def test_unread_counts_under_concurrent_sends_and_paging_by_activity(
    client: LogicClient,
) -> None:
    g = await group(client, "u", ["p1", "p2"])
    d = "d:p1:u"
    await client.send("p1", d, b"old")
    # Concurrent sends by others and by u itself, and reads by u in between.
    sends = [client.send(f"p{1 + i % 2}", g, f"{i}".encode()) for i in range(30)]
    sends += [client.send("u", g, b"mine") for _ in range(5)]
    results = await asyncio.gather(*sends)
    mid = sorted(r.conv_seq for r in results)[10]
    await event(client, "u", g, READ, mid)
    await client.send("p2", g, b"late")
    await client.fanout_all(g)
    timeline = [m for _, m in await client.timeline("u") if m.conversation_id == g]
    expected = sum(
        1
        for m in timeline
        if m.kind == cpb.MESSAGE_KIND_MESSAGE and m.sender_id != "u" and m.conv_seq > mid
    )
    convs = await conversations(client, "u")
    assert convs[g].unread_count == expected and convs[g].read_conv_seq == mid
    assert convs[d].unread_count == 1
    # Newest activity first: the group (its last message is newer) before d.
    first = await client.stub.ListConversations(
        pb.ListConversationsRequest(user_id="u", page_size=1)
    )
    assert [c.conversation_id for c in first.conversations] == [g] and first.next_page_token
    assert list(first.conversations[0].member_ids) == ["p1", "p2", "u"]
    err = await refused(
        client.stub.ListConversations(pb.ListConversationsRequest(user_id="u", page_token="zz%"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_members_and_shared_users(client: LogicClient) -> None:
    g = await group(client, "m1", ["m2"])
    await client.send("m1", "d:m1:x", b"hi")
    resp = await client.stub.GetMembers(pb.GetMembersRequest(user_id="m2", conversation_id=g))
    assert list(resp.member_ids) == ["m1", "m2"]
    err = await refused(
        client.stub.GetMembers(pb.GetMembersRequest(user_id="zz", conversation_id=g))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    shared = await client.stub.SharedUsers(
        pb.SharedUsersRequest(user_id="m1", user_ids=["m2", "x", "stranger", "m1"])
    )
    assert list(shared.user_ids) == ["m2", "x", "m1"]


async def test_receipts_in_a_500_member_group_cost_one_row_per_read(
    client: LogicClient, pg_dsn: str
) -> None:
    """Every member reads: each READ is one timeline row (the reader's), never one
    per member (no N-squared fan-out); "read by N of M" and who read come from one
    query, paged."""
    members = [f"r{i:03}" for i in range(499)]
    g = await group(client, "boss", members)
    m = await client.send("boss", g, b"all hands")
    await client.fanout_all(g)
    readers = members[:450]
    sem = asyncio.Semaphore(32)

    async def read(user: str) -> None:
        async with sem:
            await event(client, user, g, READ, m.conv_seq)

    await asyncio.gather(*(read(u) for u in readers))
    await client.fanout_all(g)
    rows = await query(
        pg_dsn,
        "SELECT count(*) FROM timeline t JOIN messages x ON x.msg_id = t.msg_id "
        "WHERE x.conversation_id = %s AND x.kind = 4",
        (g,),
    )
    assert rows == [(len(readers),)]
    seen: list[str] = []
    token = ""
    while True:
        resp = await client.stub.GetReceipts(
            pb.GetReceiptsRequest(
                user_id="boss",
                conversation_id=g,
                conv_seq=m.conv_seq,
                list_readers=True,
                page_size=200,
                page_token=token,
            )
        )
        assert (resp.member_count, resp.read_count) == (499, len(readers))
        seen += resp.reader_ids
        token = resp.next_page_token
        if not token:
            break
    assert seen == sorted(readers)


async def test_concurrent_reads_share_batches_and_never_go_back(
    client: LogicClient, pg_dsn: str
) -> None:
    """Reads share the messages' group commit: many at once, from two users, in
    any order. Whatever batches they land in, each user's stored READ positions
    strictly increase in conv_seq order, the final position is the highest, and a
    position at or below the current one stores nothing."""
    d = "d:rx:ry"
    sent = [await client.send("rx", d, f"{i}".encode()) for i in range(12)]
    await client.fanout_all(d)
    positions = [m.conv_seq for m in sent]
    order = positions[::2] + positions[1::2]  # out of order on purpose
    acks = await asyncio.gather(
        *(event(client, u, d, READ, p) for p in order for u in ("ry", "rx")),
        *(event(client, "ry", d, DELIVERED, p) for p in positions[:6]),
    )
    assert all(a.msg_id == 0 or a.conv_seq > max(positions) for a in acks)
    rows = await query(
        pg_dsn,
        "SELECT sender_id, kind, target_conv_seq FROM messages "
        "WHERE conversation_id = %s AND kind IN (4, 5) ORDER BY conv_seq",
        (d,),
    )
    for user in ("rx", "ry"):
        reads = [t for s, k, t in rows if s == user and k == READ]
        assert reads == sorted(set(reads)) and reads[-1] == max(positions), (user, reads)
    convs = await conversations(client, "ry")
    assert convs[d].read_conv_seq == max(positions)
    assert (await conversations(client, "rx"))[d].peer_delivered_conv_seq == max(positions)
