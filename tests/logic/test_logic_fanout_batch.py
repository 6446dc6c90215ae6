"""FanoutBatch: several conversations fanned out in one transaction, with every
guarantee of a single Fanout per conversation (exactly the same rows, seqs
strictly increasing per user, conv_seq order, nothing duplicated or missing), no
deadlock against concurrent batches, single Fanouts and sends, a bad
conversation that never affects the others, paging of a big group inside a
batch, and clear errors for bad requests. Real PostgreSQL, seqsvc and logic."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable, Iterable

import grpc
import pytest
from logic_support import LogicClient, query

from im.logic.v1 import logic_pb2 as pb
from imdev.servers import ServiceProcess

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def direct(a: str, b: str) -> str:
    return f"d:{min(a, b)}:{max(a, b)}"


async def batch_all(
    client: LogicClient, convs: Iterable[str], max_messages: int = 0
) -> tuple[list[pb.FanoutBatchResponse], dict[str, list[pb.FanoutDelivery]]]:
    """FanoutBatch until no conversation has more; returns every response and the
    deliveries per conversation, in the order they came."""
    todo = list(convs)
    responses: list[pb.FanoutBatchResponse] = []
    got: dict[str, list[pb.FanoutDelivery]] = defaultdict(list)
    while todo:
        resp = await client.stub.FanoutBatch(
            pb.FanoutBatchRequest(conversation_ids=todo, max_messages=max_messages), timeout=30
        )
        responses.append(resp)
        assert [r.conversation_id for r in resp.results] == todo
        for r in resp.results:
            assert r.error_code == 0, r.error_message
            got[r.conversation_id].extend(r.deliveries)
        todo = [r.conversation_id for r in resp.results if r.has_more]
        assert len(responses) < 1000, "FanoutBatch makes no progress"
    return responses, got


async def check_timelines(
    client: LogicClient, expected: dict[str, set[int]], conv_seq_of: dict[int, tuple[str, int]]
) -> dict[str, list[tuple[int, int]]]:
    """Every user's timeline holds exactly the expected msg_ids, once each, seqs
    strictly increasing, each conversation's fanned-out messages (all but the
    user's own sends, whose rows the send wrote) in conv_seq order. Returns
    (seq, msg_id) per user."""
    out = {}
    for user, msg_ids in expected.items():
        rows = await client.timeline(user, page=500)
        seqs = [s for s, _ in rows]
        assert seqs == sorted(set(seqs)), f"{user}: seqs not strictly increasing"
        got = [m.msg_id for _, m in rows]
        assert len(got) == len(set(got)), f"{user}: duplicate rows"
        assert set(got) == msg_ids, (
            f"{user}: missing {msg_ids - set(got)}, extra {set(got) - msg_ids}"
        )
        last: dict[str, int] = {}
        for _, m in rows:
            if m.sender_id == user:  # the sender's own row is written by the send
                continue
            conv, cs = conv_seq_of[m.msg_id]
            assert cs > last.get(conv, 0), f"{user}: {conv} out of conv_seq order"
            last[conv] = cs
        out[user] = [(s, m.msg_id) for s, m in rows]
    return out


class World:
    """Users, direct conversations and groups sharing users, and what each user's
    timeline must hold."""

    def __init__(self, client: LogicClient, users: list[str]) -> None:
        self.client = client
        self.users = users
        self.convs: dict[str, list[str]] = {}  # conversation -> members
        self.expected: dict[str, set[int]] = {u: set() for u in users}
        self.conv_seq_of: dict[int, tuple[str, int]] = {}

    async def group(self, members: list[str]) -> str:
        resp = await self.client.stub.CreateGroup(
            pb.CreateGroupRequest(creator_id=members[0], member_ids=members)
        )
        g = resp.conversation.conversation_id
        self.convs[g] = members
        return g

    def direct(self, a: str, b: str) -> str:
        c = direct(a, b)
        self.convs[c] = [a, b]
        return c

    async def send(self, conv: str, sender: str | None = None) -> None:
        sender = sender or self.convs[conv][0]
        ack = await self.client.send(sender, conv, b"x")
        self.conv_seq_of[ack.msg_id] = (conv, ack.conv_seq)
        for u in self.convs[conv]:
            self.expected[u].add(ack.msg_id)


async def test_batch_gives_each_recipient_exactly_the_rows_of_single_fanout(
    client: LogicClient, pg_dsn: str
) -> None:
    """Two identical worlds: one fanned out by single Fanout calls, one by
    FanoutBatch over all its conversations. Both give every user the same
    messages in the same per-conversation order; the batch's deliveries are
    exactly the rows it wrote; a second batch finds nothing; no pending mark is
    left."""
    worlds = []
    for tag in ("s", "b"):
        users = [f"{tag}u{i:02d}" for i in range(12)]
        w = World(client, users)
        convs = [w.direct(users[i], users[(i + 1) % 12]) for i in range(12)]
        convs += [w.direct(users[i], users[(i + 5) % 12]) for i in range(6)]
        convs.append(await w.group(users[:8]))
        convs.append(await w.group(users[4:]))
        for n in range(60):
            conv = convs[n % len(convs)]
            await w.send(conv, w.convs[conv][n % len(w.convs[conv])])
        worlds.append((w, convs))

    (single, single_convs), (batched, batch_convs) = worlds
    for conv in single_convs:
        await client.fanout_all(conv)
    responses, got = await batch_all(client, batch_convs)
    assert len(responses) == 1  # 120+ rows fit one call (max_rows 500)

    single_rows = await check_timelines(client, single.expected, single.conv_seq_of)
    batch_rows = await check_timelines(client, batched.expected, batched.conv_seq_of)
    # The same shape: per user, the same number of messages from each conversation.
    shape = {
        u[1:]: sorted(single.conv_seq_of[m][1] for _, m in rows) for u, rows in single_rows.items()
    }
    assert shape == {
        u[1:]: sorted(batched.conv_seq_of[m][1] for _, m in rows) for u, rows in batch_rows.items()
    }
    # Each conversation's deliveries: in (conv_seq, user) order, the rows now in the
    # timelines, every (member, message) once.
    timeline = {(u, m): s for u, rows in batch_rows.items() for s, m in rows}
    for conv in batch_convs:
        ds = got[conv]
        keys = [(d.message.conv_seq, d.user_id) for d in ds]
        assert keys == sorted(set(keys))
        for d in ds:
            assert timeline[(d.user_id, d.message.msg_id)] == d.seq
        assert {(d.user_id, d.message.msg_id) for d in ds} == {
            (u, m)
            for m, (c, _) in batched.conv_seq_of.items()
            if c == conv
            for u in batched.convs[conv]
        }
    again = await client.stub.FanoutBatch(pb.FanoutBatchRequest(conversation_ids=batch_convs))
    assert all(not r.deliveries and not r.has_more for r in again.results)
    one = await client.stub.Fanout(pb.FanoutRequest(conversation_id=batch_convs[0]))
    assert not one.deliveries and one.watermark == again.results[0].watermark
    assert await query(pg_dsn, "SELECT conversation_id FROM fanout_pending") == []


async def test_concurrent_batches_single_fanouts_and_sends_never_deadlock(
    client: LogicClient, logic_env: dict[str, str], spawn: Callable[..., ServiceProcess]
) -> None:
    """6 tasks run FanoutBatch over random overlapping subsets of 50 conversations
    that share users (through two logic processes), 2 tasks run single Fanouts, and
    8 senders send to all of them meanwhile. Everything finishes within a deadline
    and every timeline ends exactly right."""
    other = LogicClient(spawn("logic", logic_env).address)
    users = [f"c{i:02d}" for i in range(20)]
    w = World(client, users)
    convs = [w.direct(users[i], users[(i + k) % 20]) for k in (1, 3) for i in range(20)]
    convs = sorted(set(convs))[:40]
    for i in range(10):
        convs.append(await w.group(random.Random(i).sample(users, 6)))
    assert len(convs) == 50
    sending = True
    rng = random.Random(7)

    async def sender(n: int) -> None:
        for j in range(40):
            conv = convs[(n * 40 + j) * 7 % len(convs)]
            await w.send(conv, rng.choice(w.convs[conv]))

    async def batcher(n: int) -> None:
        c = (client, other)[n % 2]
        r = random.Random(100 + n)
        while sending:
            await batch_all(c, r.sample(convs, r.randint(5, 30)))

    async def single(n: int) -> None:
        c = (client, other)[n % 2]
        r = random.Random(200 + n)
        while sending:
            await c.fanout_all(r.choice(convs))

    workers = [asyncio.create_task(batcher(n)) for n in range(6)]
    workers += [asyncio.create_task(single(n)) for n in range(2)]
    try:
        await asyncio.wait_for(asyncio.gather(*(sender(n) for n in range(8))), timeout=90)
    finally:
        sending = False
    await asyncio.wait_for(asyncio.gather(*workers), timeout=60)
    await batch_all(client, convs)
    await check_timelines(client, w.expected, w.conv_seq_of)
    await other.close()


async def test_a_bad_conversation_does_not_affect_the_others(client: LogicClient) -> None:
    await client.send("pa", "d:pa:pb", b"1")
    await client.send("pb", "d:pb:pc", b"2")
    ids = ["d:pa:pb", "not-a-conversation", "d:pc:pb", "g:nosuch", "d:pb:pc", "d:" + "x" * 200]
    resp = await client.stub.FanoutBatch(pb.FanoutBatchRequest(conversation_ids=ids))
    results = {r.conversation_id: r for r in resp.results}
    assert [r.conversation_id for r in resp.results] == ids
    for bad in ("not-a-conversation", "d:pc:pb", "d:" + "x" * 200):
        assert results[bad].error_code == INVALID_ARGUMENT
        assert "conversation_id" in results[bad].error_message
        assert not results[bad].deliveries
    assert "d:pb:pc" in results["d:pc:pb"].error_message  # says what to use instead
    # An unknown group is like a single Fanout of it: nothing to do, no error.
    assert results["g:nosuch"].error_code == 0 and not results["g:nosuch"].has_more
    for good, users in (("d:pa:pb", {"pa", "pb"}), ("d:pb:pc", {"pb", "pc"})):
        r = results[good]
        assert r.error_code == 0 and not r.has_more and r.watermark == 1
        assert {d.user_id for d in r.deliveries} == users
    assert len(await client.timeline("pb")) == 2


async def test_big_group_pages_by_max_rows_inside_a_batch(
    spawn: Callable[..., ServiceProcess], logic_env: dict[str, str]
) -> None:
    """With max_rows 50 a batch of a 120-member group (3 messages) and 20 direct
    conversations stops at 50 rows per call, the group continues where it stopped
    (cursor), later conversations get has_more with no rows when the call is
    full, and in the end every row exists exactly once."""
    logic = spawn("logic", {**logic_env, "IM_LOGIC_FANOUT_MAX_ROWS": "50"})
    client = LogicClient(logic.address)
    try:
        members = [f"m{i:03d}" for i in range(120)]
        w = World(client, members + [f"x{i:02d}" for i in range(21)])
        directs = [w.direct(f"x{i:02d}", f"x{i + 1:02d}") for i in range(20)]
        g = await w.group(members)
        for _ in range(3):
            await w.send(g)
        for c in directs:
            await w.send(c)
        convs = [directs[0], g, *directs[1:]]
        responses, got = await batch_all(client, convs)
        rows_per_call = [sum(len(r.deliveries) for r in resp.results) for resp in responses]
        assert max(rows_per_call) <= 50 and sum(rows_per_call) == 360 + 40
        assert len(responses) >= 8
        first = {r.conversation_id: r for r in responses[0].results}
        assert len(first[directs[0]].deliveries) == 2 and not first[directs[0]].has_more
        assert len(first[g].deliveries) == 48 and first[g].has_more and first[g].watermark == 0
        assert all(first[c].has_more and not first[c].deliveries for c in directs[1:])
        keys = [(d.message.conv_seq, d.user_id) for d in got[g]]
        assert keys == sorted(keys) and len(set(keys)) == 360
        await check_timelines(client, w.expected, w.conv_seq_of)
    finally:
        await client.close()


async def test_bad_requests_get_clear_errors(client: LogicClient) -> None:
    cases = [
        ([], "empty"),
        ([f"d:a:b{i:03d}" for i in range(257)], "at most 256"),
        (["d:a:b", "d:a:c", "d:a:b"], "more than once"),
    ]
    for ids, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.stub.FanoutBatch(pb.FanoutBatchRequest(conversation_ids=ids))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (err.value.details() or "")
    ok = await client.stub.FanoutBatch(
        pb.FanoutBatchRequest(conversation_ids=[f"d:a:b{i:03d}" for i in range(256)])
    )
    assert len(ok.results) == 256 and all(r.error_code == 0 for r in ok.results)
