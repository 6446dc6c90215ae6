"""Group commit of SendMessage: concurrent sends share one transaction and keep every
guarantee of a single send.

Batches are made deterministic without timing: the test holds a conversation's
SEND advisory lock from its own session, so the committer's first batch waits on
it inside its transaction; the sends that arrive meanwhile queue (watched through
logic's `im_logic_send_queued` gauge) and form the next batch once the lock is
released. Real PostgreSQL, seqsvc, NATS and logic processes throughout.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence

import grpc
import psycopg
import pytest
from logic_support import FanoutDriver, LogicClient, query, table_counts, wait_for
from send_batch_support import batches, blocked_committer, outcome, published, with_metrics

from im.logic.v1 import logic_pb2 as pb
from imcommon.config import load_settings
from imdev.servers import NatsServer, PostgresServer, ServiceProcess
from logic import repo
from logic.config import Settings
from logic.errors import SequenceRegression
from logic.events import TriggerPublisher
from logic.faults import CRASH_EXIT_CODE, Faults
from logic.ids import LOCK_CONV_SEND, lock_key
from logic.outbox import OutboxCleaner
from logic.send import Sender, SendRequest
from logic.seq import SeqClientSource
from logic.store import open_database
from seqsvc.client import SeqClient


async def make_group(client: LogicClient, owner: str, members: list[str]) -> str:
    resp = await client.stub.CreateGroup(
        pb.CreateGroupRequest(creator_id=owner, name="g", member_ids=members)
    )
    return str(resp.conversation.conversation_id)


async def test_concurrent_senders_share_batches_and_keep_order(
    spawn: Callable[..., ServiceProcess], logic_env: dict[str, str], pg_dsn: str
) -> None:
    """12 senders (each one send at a time, as a gateway connection sends) into
    direct conversations and one group, plus identical sends racing each other:
    per conversation the conv_seqs are exactly 1..N (gap-free, one order), each
    sender's seqs increase in its send order, every (sender, client_msg_id) is
    stored once, and fewer transactions than sends ran."""
    env, mport = with_metrics(logic_env)
    client = LogicClient(spawn("logic", env).address)
    users = [f"u{i:02d}" for i in range(12)]
    group = await make_group(client, users[0], users[:6])
    before_batches = await batches(mport)

    acks: dict[str, list[tuple[str, str, pb.SendMessageResponse]]] = defaultdict(list)

    async def sender(i: int) -> None:
        me = users[i]
        peers = [users[(i + 1) % 12], users[(i + 5) % 12]]
        for j in range(15):
            if i < 6 and j % 3 == 0:
                conv = group
            else:
                a, b = sorted((me, peers[j % 2]))
                conv = f"d:{a}:{b}"
            cmid = f"{me}-{j}"
            if j % 5 == 4:  # a retransmit racing the original
                got = await asyncio.gather(*(client.send(me, conv, b"x", cmid) for _ in range(3)))
                assert len({g.msg_id for g in got}) == 1
                assert sum(not g.duplicate for g in got) == 1
                ack = next(g for g in got if not g.duplicate)
            else:
                ack = await client.send(me, conv, b"x", cmid)
            acks[me].append((conv, cmid, ack))

    try:
        async with blocked_committer(pg_dsn, client, mport) as until_queued:
            tasks = [asyncio.create_task(sender(i)) for i in range(12)]
            await until_queued(12)  # every sender's first send waits in the queue
        await asyncio.gather(*tasks)
        sends = 1 + sum(len(v) for v in acks.values()) + 12 * 3 * 2  # blocker + racers
        assert await batches(mport) - before_batches < sends

        for me, mine in acks.items():
            seqs = [a.seq for _, _, a in mine]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), me
            timeline = await client.timeline(me)
            own = [m.client_msg_id for _, m in timeline if m.sender_id == me]
            assert own == [cmid for _, cmid, _ in mine]

        rows = await query(
            pg_dsn, "SELECT conversation_id, conv_seq, sender_id, client_msg_id FROM messages"
        )
        assert len(rows) == len({(r[2], r[3]) for r in rows}) == sends - 12 * 3 * 2
        by_conv: dict[str, list[int]] = defaultdict(list)
        for conv, conv_seq, _, _ in rows:
            by_conv[conv].append(conv_seq)
        for conv, seqs in by_conv.items():
            assert sorted(seqs) == list(range(1, len(seqs) + 1)), conv
        # Each sender's messages keep their send order in every conversation.
        for mine in acks.values():
            per_conv: dict[str, list[int]] = defaultdict(list)
            for conv, _, a in mine:
                per_conv[conv].append(a.conv_seq)
            for seqs in per_conv.values():
                assert seqs == sorted(seqs)
        counts = await table_counts(pg_dsn)
        assert counts["send_dedup"] == counts["messages"] == counts["timeline"]
    finally:
        await client.close()


async def test_one_batch_answers_each_caller_for_itself(
    spawn: Callable[..., ServiceProcess], logic_env: dict[str, str], pg_dsn: str
) -> None:
    """Valid sends, a non-member, an unknown group, a stored duplicate and two
    identical new sends, all in ONE transaction: each caller gets its own answer,
    only the valid ones are stored, and one trigger per conversation is published."""
    env, mport = with_metrics(logic_env)
    client = LogicClient(spawn("logic", env).address)
    group = await make_group(client, "ann", ["ann", "ben"])
    stored = await client.send("ann", "d:ann:ben", b"earlier", "ann-0")
    before = await batches(mport)
    published_before = await published(mport)

    calls = {
        "valid-direct": client.send("ann", "d:ann:ben", b"1", "ann-1"),
        "valid-group": client.send("ben", group, b"2", "ben-1"),
        "twin-a": client.send("cat", "d:ann:cat", b"3", "cat-1"),
        "twin-b": client.send("cat", "d:ann:cat", b"3", "cat-1"),
        "non-member": client.send("cat", group, b"4", "cat-2"),
        "unknown-group": client.send("ann", "g:nope", b"5", "ann-2"),
        "stored-dup": client.send("ann", "d:ann:ben", b"earlier", "ann-0"),
        "valid-direct-2": client.send("ann", "d:ann:ben", b"6", "ann-3"),
    }
    async with blocked_committer(pg_dsn, client, mport) as until_queued:
        tasks = {}
        for name, call in calls.items():
            tasks[name] = asyncio.create_task(outcome(call))
            await until_queued(len(tasks))  # queue order = this order
    got = {name: await t for name, t in tasks.items()}
    assert await batches(mport) - before == 2  # the blocker's, then all eight at once

    assert got["non-member"] == grpc.StatusCode.PERMISSION_DENIED
    assert got["unknown-group"] == grpc.StatusCode.NOT_FOUND
    dup = got["stored-dup"]
    assert isinstance(dup, pb.SendMessageResponse) and dup.duplicate
    assert (dup.msg_id, dup.seq, dup.conv_seq) == (stored.msg_id, stored.seq, stored.conv_seq)
    a, b = got["twin-a"], got["twin-b"]
    assert isinstance(a, pb.SendMessageResponse) and isinstance(b, pb.SendMessageResponse)
    assert (a.msg_id, a.seq, a.conv_seq, a.server_time_ms) == (
        b.msg_id,
        b.seq,
        b.conv_seq,
        b.server_time_ms,
    )
    assert (a.duplicate, b.duplicate) == (False, True)
    v1, v2 = got["valid-direct"], got["valid-direct-2"]
    assert isinstance(v1, pb.SendMessageResponse) and isinstance(v2, pb.SendMessageResponse)
    assert not v1.duplicate and not v2.duplicate
    # Queue order within one conversation and one sender.
    assert stored.conv_seq < v1.conv_seq < v2.conv_seq and stored.seq < v1.seq < v2.seq

    rows = await query(pg_dsn, "SELECT sender_id, client_msg_id FROM messages")
    assert {(s, c) for s, c in rows if s != "block"} == {
        ("ann", "ann-0"),
        ("ann", "ann-1"),
        ("ann", "ann-3"),
        ("ben", "ben-1"),
        ("cat", "cat-1"),
    }
    # One trigger per conversation of the batch (three), not one per message.
    assert await published(mport) - published_before == 1 + 3

    async def drained() -> bool:
        return (await table_counts(pg_dsn))["outbox"] == 0

    await wait_for(drained, what="published outbox rows deleted")
    for conv in ("d:ann:ben", group, "d:ann:cat"):
        await client.fanout_all(conv)
    ben = [m.client_msg_id for _, m in await client.timeline("ben")]
    assert ben == ["ben-1", "ann-0", "ann-1", "ann-3"]
    await client.close()


@pytest.mark.parametrize("dependency", ["seqsvc", "postgres"])
async def test_dependency_down_mid_batch_fails_the_batch_and_writes_nothing(
    spawn: Callable[..., ServiceProcess],
    logic_env: dict[str, str],
    seqsvc: ServiceProcess,
    postgres_factory: Callable[..., PostgresServer],
    dependency: str,
) -> None:
    """A batch is inside its transaction (waiting for a lock) with more sends
    queued when seqsvc or PostgreSQL goes away: every send fails UNAVAILABLE,
    nothing is written; the same sends retried afterwards are each stored once."""
    pg = postgres_factory()
    dsn = pg.create_database("logic")
    env, mport = with_metrics(
        logic_env,
        IM_LOGIC_DATABASE_URL=dsn,
        IM_LOGIC_SEQSVC_MAX_RETRIES="1",
        IM_LOGIC_DB_POOL_TIMEOUT_S="1",
    )
    client = LogicClient(spawn("logic", env).address)
    await client.send("ann", "d:ann:ben", b"before", "before")
    sends = [("ann", "d:ann:ben", f"a-{i}") for i in range(3)] + [
        ("ben", "d:ben:cat", f"b-{i}") for i in range(3)
    ]
    async with blocked_committer(dsn, client, mport) as until_queued:
        tasks = [asyncio.create_task(outcome(client.send(u, c, b"x", m))) for u, c, m in sends]
        await until_queued(len(sends))
        if dependency == "seqsvc":
            await asyncio.to_thread(seqsvc.stop)
        else:
            await asyncio.to_thread(pg.stop)
    got = [await t for t in tasks]
    assert got == [grpc.StatusCode.UNAVAILABLE] * len(sends)

    if dependency == "seqsvc":
        await asyncio.to_thread(seqsvc.start)
    else:
        await asyncio.to_thread(pg.start)
    # Nothing of either batch (the blocked one included) was written.
    assert await query(dsn, "SELECT client_msg_id FROM messages") == [("before",)]

    async def retried() -> bool:
        results = await asyncio.gather(*(outcome(client.send(u, c, b"x", m)) for u, c, m in sends))
        if any(isinstance(r, grpc.StatusCode) for r in results):
            assert all(
                r == grpc.StatusCode.UNAVAILABLE for r in results if isinstance(r, grpc.StatusCode)
            )
            return False
        return True

    await wait_for(retried, timeout=30, what="the retried sends succeed")
    rows = await query(dsn, "SELECT sender_id, client_msg_id FROM messages")
    stored = [(s, c) for s, c in rows if c.startswith(("a-", "b-"))]
    assert sorted(stored) == sorted((u, m) for u, _, m in sends)  # each exactly once
    # Concurrent retries reach logic in no fixed order: each once, after "before".
    ann = [m.client_msg_id for _, m in await client.timeline("ann")]
    assert ann[0] == "before" and sorted(ann[1:]) == ["a-0", "a-1", "a-2"]
    await client.close()


async def test_crash_after_a_batch_commit_relays_every_conversation(
    spawn: Callable[..., ServiceProcess],
    logic_env: dict[str, str],
    nats_server: NatsServer,
    key_prefix: str,
    subject_prefix: str,
    pg_dsn: str,
) -> None:
    """A batch of sends into three conversations commits, then the process dies
    before publishing: the outbox holds one row per conversation, the relay
    publishes them after the restart, and every message reaches every timeline."""
    env, mport = with_metrics(
        logic_env, IM_LOGIC_TEST_FAULT_SKIP_REPAIR="1", IM_LOGIC_TEST_FAULT_CRASH_AFTER_COMMIT="1"
    )
    proc = spawn("logic", env)
    client = LogicClient(proc.address)
    members = ["ann", "ben", "cat", "dan"]
    group = await make_group(client, "ann", members)
    sends = [
        ("ann", group, "g-1"),
        ("ben", group, "g-2"),
        ("cat", "d:cat:dan", "d-1"),
        ("dan", "d:cat:dan", "d-2"),
        ("ann", "d:ann:ben", "p-1"),
    ]
    # The blocked batch (a send to an unknown group) stores nothing, so it does not
    # crash; the next batch holds all five sends, commits them, and crashes.
    async with blocked_committer(pg_dsn, client, mport, conv="g:nope") as until_queued:
        tasks = [asyncio.create_task(outcome(client.send(u, c, b"x", m))) for u, c, m in sends]
        await until_queued(len(sends))
    got = [await t for t in tasks]
    assert got == [grpc.StatusCode.UNAVAILABLE] * len(sends)
    assert proc.wait(timeout=10) == CRASH_EXIT_CODE
    await client.close()

    # Committed, not published: the five messages, one outbox row per conversation
    # (its last message in the batch).
    rows = await query(
        pg_dsn, "SELECT msg_id, conversation_id, conv_seq, client_msg_id FROM messages"
    )
    assert sorted(r[3] for r in rows) == sorted(m for _, _, m in sends)
    last = {}
    for msg_id, conv, _, _ in sorted(rows, key=lambda r: r[2]):
        last[conv] = msg_id
    outbox = await query(pg_dsn, "SELECT msg_id FROM outbox")
    assert sorted(r[0] for r in outbox) == sorted(last.values())

    del proc.extra_env["IM_LOGIC_TEST_FAULT_CRASH_AFTER_COMMIT"]
    proc.start()
    client = LogicClient(proc.address)
    async with FanoutDriver(nats_server.url(), key_prefix, subject_prefix, [proc.address]) as d:
        for user, convs in [
            ("ann", {group, "d:ann:ben"}),
            ("ben", {group, "d:ann:ben"}),
            ("cat", {group, "d:cat:dan"}),
            ("dan", {group, "d:cat:dan"}),
        ]:
            want = {r[0] for r in rows if r[1] in convs}

            async def has(user: str = user, want: set[int] = want) -> bool:
                return {m.msg_id for _, m in await client.timeline(user)} >= want

            await wait_for(has, what=f"{user} has every message")
        relayed = {(t.msg_id, h.get("Nats-Msg-Id")) for t, h in d.triggers}
        assert relayed == {(m, str(m)) for m in last.values()}

    async def outbox_empty() -> bool:
        return (await table_counts(pg_dsn))["outbox"] == 0

    await wait_for(outbox_empty, what="outbox rows deleted by the relay")
    # The clients, which never got their ACKs, retransmit: the stored ACKs, no copies.
    again = await asyncio.gather(*(client.send(u, c, b"x", m) for u, c, m in sends))
    assert all(a.duplicate for a in again)
    assert sorted(a.msg_id for a in again) == sorted(r[0] for r in rows)
    await client.close()


class RewindingSeq:
    """The real seqsvc's values, minus `rewind[key]` for the keys the test picks."""

    def __init__(self, inner: SeqClientSource) -> None:
        self.inner = inner
        self.rewind: dict[str, int] = {}

    async def next_batch(self, keys: Sequence[str]) -> list[int]:
        values = await self.inner.next_batch(keys)
        return [v - self.rewind.get(k, 0) for k, v in zip(keys, values, strict=True)]


async def test_a_sequence_regression_fails_the_whole_batch(
    pg_dsn: str, seqsvc: ServiceProcess, nats_server: NatsServer, key_prefix: str
) -> None:
    """seqsvc goes back for ONE key of a batch (in-process Sender, real seqsvc
    behind a rewinding wrapper): every send of the batch fails, nothing is written;
    with seqsvc sane again the same sends are stored once each."""
    settings = load_settings(
        Settings,
        {
            "IM_LOGIC_DATABASE_URL": pg_dsn,
            "IM_LOGIC_SEQSVC_ADDRESS": seqsvc.address,
            "IM_LOGIC_NATS_URL": nats_server.url(),
        },
    )
    await repo.migrate(pg_dsn)
    async with (
        open_database(settings) as db,
        SeqClient(seqsvc.address) as seq_client,
        TriggerPublisher(nats_server.url(), key_prefix, key_prefix.lower()) as publisher,
    ):
        seq = RewindingSeq(SeqClientSource(seq_client))
        sender = Sender(
            db,
            seq,
            publisher,
            OutboxCleaner(db, batch=100, delay_s=0),
            max_body_bytes=1024,
            repair_after_s=60,
            faults=Faults(),
        )

        def req(user: str, conv: str, cmid: str) -> SendRequest:
            return SendRequest(user, "d1", cmid, conv, 1, b"x")

        try:
            await sender.send(req("bob", "d:bob:cat", "bob-0"))  # bob's last seq > 0
            before = await table_counts(pg_dsn)
            seq.rewind["u:bob"] = 10**12
            batch = [req("ann", "d:ann:cat", "ann-1"), req("bob", "d:bob:cat", "bob-1")]
            async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
                await conn.execute(
                    "SELECT pg_advisory_lock(%s, %s)", (LOCK_CONV_SEND, lock_key("d:x:y"))
                )
                blocker = asyncio.create_task(sender.send(req("x", "d:x:y", "x-1")))

                async def waiting() -> bool:
                    cur = await conn.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    )
                    row = await cur.fetchone()
                    return row is not None and row[0] >= 1

                await wait_for(waiting, what="the committer waits for the held lock")
                tasks = [asyncio.create_task(sender.send(r)) for r in batch]
                await wait_for(lambda: _true(sender.queued == 2), what="two sends queued")
                await conn.execute(
                    "SELECT pg_advisory_unlock(%s, %s)", (LOCK_CONV_SEND, lock_key("d:x:y"))
                )
            await blocker
            for task in tasks:
                with pytest.raises(SequenceRegression, match="u:bob"):
                    await task
            after = await table_counts(pg_dsn)
            assert after["messages"] == before["messages"] + 1  # the blocker only
            assert await query(
                pg_dsn, "SELECT client_msg_id FROM messages WHERE client_msg_id <> 'x-1'"
            ) == [("bob-0",)]

            seq.rewind.clear()
            acks = await asyncio.gather(*(sender.send(r) for r in batch))
            assert not any(a.duplicate for a in acks)
            assert len(await query(pg_dsn, "SELECT 1 FROM messages")) == 4
        finally:
            await sender.close()


async def _true(value: bool) -> bool:
    return value
