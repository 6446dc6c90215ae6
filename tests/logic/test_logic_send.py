"""SendMessage against real PostgreSQL, seqsvc and NATS: durable, idempotent, and
checked against what is committed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from logic_support import LogicClient, table_counts, wait_for
from send_batch_support import blocked_committer

from im.logic.v1 import logic_pb2 as pb
from imdev.servers import NatsServer, PostgresServer, ServiceProcess, free_port


async def test_send_fanout_sync_roundtrip(client: LogicClient, pg_dsn: str) -> None:
    ack = await client.send("alice", "d:alice:bob", b"hi bob", client_msg_id="m-1")
    assert ack.msg_id > 0 and ack.seq > 0 and ack.conv_seq > 0 and not ack.duplicate
    assert ack.server_time_ms > 1_600_000_000_000

    # The sender's own row is written by the send itself.
    mine = await client.timeline("alice")
    assert [(s, m.msg_id) for s, m in mine] == [(ack.seq, ack.msg_id)]
    assert await client.timeline("bob") == []

    deliveries = await client.fanout_all("d:alice:bob")
    assert sorted((d.user_id, d.message.msg_id) for d in deliveries) == [
        ("alice", ack.msg_id),
        ("bob", ack.msg_id),
    ]
    alice_row = next(d for d in deliveries if d.user_id == "alice")
    assert alice_row.seq == ack.seq  # found, not written again
    bob = await client.timeline("bob")
    assert len(bob) == 1
    bob_seq, msg = bob[0]
    assert bob_seq > 0
    assert msg.body == b"hi bob" and msg.sender_id == "alice" and msg.client_msg_id == "m-1"
    assert msg.conv_seq == ack.conv_seq and msg.sender_device_id == "d1"

    # A retransmit gets the stored ACK and writes nothing.
    before = await table_counts(pg_dsn)
    again = await client.send("alice", "d:alice:bob", b"hi bob", client_msg_id="m-1")
    assert (again.msg_id, again.seq, again.conv_seq, again.server_time_ms) == (
        ack.msg_id,
        ack.seq,
        ack.conv_seq,
        ack.server_time_ms,
    )
    assert again.duplicate
    assert await client.fanout_all("d:alice:bob") == []
    after = await table_counts(pg_dsn)
    assert {k: v for k, v in after.items() if k != "outbox"} == {
        k: v for k, v in before.items() if k != "outbox"
    }

    # The longest ids work end to end (the conversation's seqsvc key is hashed to
    # stay within seqsvc's 128-byte key limit).
    a, b = "a" * 64, "b" * 64
    long_ack = await client.send(
        a, f"d:{a}:{b}", b"x" * 65536, client_msg_id="c" * 128, device="d" * 64
    )
    await client.fanout_all(f"d:{a}:{b}")
    assert [m.msg_id for _, m in await client.timeline(b)] == [long_ack.msg_id]


@pytest.mark.parametrize("locks", ["locks", "no-locks", "no-locks-unbatched"])
async def test_ten_identical_concurrent_sends_store_one_message(
    spawn: Callable[..., ServiceProcess], logic_env: dict[str, str], pg_dsn: str, locks: str
) -> None:
    """With the locks, the sender's lock serialises the ten (or they share a batch)
    and the dedup lookup answers nine of them. Without (a test-only switch) and
    with one transaction per send, all ten race into the insert: the unique
    constraint decides and the losers answer with the winner's ACK, not an error."""
    env = dict(logic_env)
    if locks.startswith("no-locks"):
        env["IM_LOGIC_TEST_FAULT_SKIP_LOCKS"] = "1"
    if locks == "no-locks-unbatched":
        env["IM_LOGIC_SEND_BATCH_MAX"] = "1"
    client = LogicClient(spawn("logic", env).address)
    cmid = str(uuid.uuid4())
    try:
        acks = await asyncio.gather(
            *(client.send("carol", "d:carol:dave", b"once", client_msg_id=cmid) for _ in range(10))
        )
        keys = {(a.msg_id, a.seq, a.conv_seq, a.server_time_ms) for a in acks}
        assert len(keys) == 1
        assert sum(not a.duplicate for a in acks) == 1
        counts = await table_counts(pg_dsn)
        assert counts["messages"] == 1
        assert counts["timeline"] == 1
        await client.fanout_all("d:carol:dave")
        assert len(await client.timeline("dave")) == 1
        assert len(await client.timeline("carol")) == 1
    finally:
        await client.close()


async def test_statements_per_send_are_pinned(
    postgres_factory: Callable[..., PostgresServer],
    spawn: Callable[..., ServiceProcess],
    nats_server: NatsServer,
    key_prefix: str,
) -> None:
    """Counted by PostgreSQL itself (pg_stat_statements): a send transaction is
    exactly BEGIN, the locks, one read, one write, COMMIT, whether it stores one
    send or a batch of concurrent ones (group commit); a transaction of duplicates
    only is BEGIN, the locks, the read, COMMIT. Deleting the published outbox rows
    is batched off the send path: one statement for all of these sends. A Fanout
    call's statements do not grow with its recipients."""
    server = postgres_factory(
        settings={
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.max": "1000",
        }
    )
    dsn = server.create_database("logic")
    seqsvc = spawn("seqsvc", {"IM_SEQSVC_DATABASE_URL": server.create_database("seq")})
    metrics_port = free_port()
    logic = spawn(
        "logic",
        {
            "IM_LOGIC_DATABASE_URL": dsn,
            "IM_LOGIC_SEQSVC_ADDRESS": seqsvc.address,
            "IM_LOGIC_NATS_URL": nats_server.url(),
            "IM_LOGIC_NATS_STREAM": key_prefix,
            "IM_LOGIC_NATS_SUBJECT_PREFIX": key_prefix.lower(),
            "IM_LOGIC_OUTBOX_RELAY_INTERVAL_S": "3600",
            "IM_LOGIC_REPAIR_INTERVAL_S": "3600",
            "IM_LOGIC_OUTBOX_DELETE_DELAY_MS": "2000",
            "IM_LOGIC_METRICS_PORT": str(metrics_port),
            "IM_LOGIC_METRICS_SAMPLE_S": "3600",
        },
    )
    client = LogicClient(logic.address)
    probe = "/* test-probe */ "
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("CREATE EXTENSION pg_stat_statements")

            # Warm up until a send's trigger is published and its outbox row deleted,
            # so NATS is connected and nothing else is pending.
            async def outbox_empty() -> bool:
                cur = await conn.execute(probe + "SELECT count(*) FROM outbox")
                row = await cur.fetchone()
                return row is not None and row[0] == 0

            await client.send("warm", "d:up:warm", client_msg_id="warm-1")
            await wait_for(outbox_empty, what="warm-up outbox row deleted")
            await conn.execute(probe + "SELECT pg_stat_statements_reset()")

            n = 10
            for i in range(n):
                await client.send("pin", "d:count:pin", client_msg_id=f"pin-{i}")
            dup = await client.send("pin", "d:count:pin", client_msg_id="pin-0")
            assert dup.duplicate
            await wait_for(outbox_empty, what="outbox rows deleted")

            send_calls = await statement_calls(conn)

            # Group commit: a send waits inside its transaction (the test holds its
            # conversation's lock) while five more queue; they are stored by ONE
            # more transaction: two new, one repeated inside the batch, one
            # repeat of an earlier send.
            await conn.execute(probe + "SELECT pg_stat_statements_reset()")
            batch = [
                ("bat", "d:bat:pin", "b-1"),
                ("bat", "d:bat:pin", "b-2"),
                ("bat", "d:bat:pin", "b-1"),
                ("pin", "d:count:pin", "pin-0"),
                ("bat", "d:bat:pin", "b-3"),
            ]
            async with blocked_committer(dsn, client, metrics_port) as until_queued:
                tasks = [
                    asyncio.create_task(client.send(u, c, client_msg_id=m)) for u, c, m in batch
                ]
                await until_queued(len(batch))
            acks = await asyncio.gather(*tasks)
            assert [a.duplicate for a in acks] == [False, False, True, True, False]
            assert acks[2].msg_id == acks[0].msg_id
            assert acks[0].conv_seq < acks[1].conv_seq < acks[4].conv_seq
            await wait_for(outbox_empty, what="outbox rows deleted")
            batch_calls = await statement_calls(conn)

            # Fanout: a fixed number of statements per call, whatever the number of
            # recipients (one page here): 10 for a direct conversation, 11 for a
            # group (its membership ranges); 6 when there is nothing to do.
            members = [f"m{i:03d}" for i in range(300)]
            group = (
                await client.stub.CreateGroup(
                    pb.CreateGroupRequest(creator_id="m000", member_ids=members)
                )
            ).conversation.conversation_id
            await client.send("m001", group)
            await wait_for(outbox_empty, what="outbox rows deleted")
            fanout_calls = {}
            for conv, recipients in [("d:count:pin", 2 * n), (group, 300), (group, 0)]:
                await conn.execute(probe + "SELECT pg_stat_statements_reset()")
                resp = await client.stub.Fanout(pb.FanoutRequest(conversation_id=conv))
                assert len(resp.deliveries) == recipients and not resp.has_more
                fanout_calls[(conv, recipients)] = sum((await statement_calls(conn)).values())
    finally:
        await client.close()

    def count(prefix: str) -> int:
        return sum(c for q, c in send_calls.items() if q.startswith(prefix))

    assert count("BEGIN") == n + 1
    assert count("COMMIT") == n + 1
    assert count("SELECT pg_advisory_xact_lock") == n + 1
    assert count("SELECT greatest((SELECT max(seq) FROM timeline") == n + 1
    assert count("WITH input AS ( SELECT * FROM unnest") == n
    assert count("DELETE FROM outbox") == 1
    # + 1: the duplicate's WAL record, so its ACK waits for the standby.
    assert count("SELECT pg_logical_emit_message") == 1
    assert sum(send_calls.values()) == 5 * n + 4 + 1 + 1, send_calls

    # The blocked send's transaction, then one for the five queued sends.
    send_calls = batch_calls
    assert count("BEGIN") == count("COMMIT") == 2, batch_calls
    assert count("SELECT pg_advisory_xact_lock") == 2
    assert count("SELECT greatest((SELECT max(seq) FROM timeline") == 2
    assert count("WITH input AS ( SELECT * FROM unnest") == 2
    deletes = count("DELETE FROM outbox")
    assert deletes in (1, 2)  # one unless the cleaner's 2 s window split them
    assert sum(batch_calls.values()) == 5 * 2 + deletes, batch_calls
    assert list(fanout_calls.values()) == [10, 11, 6], fanout_calls


async def statement_calls(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """Statements run in database `logic` since the last reset, by normalised text
    (the test's own, tagged test-probe, left out)."""
    cur = await conn.execute(
        "/* test-probe */ SELECT query, calls FROM pg_stat_statements s "
        "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'logic' "
        "AND query NOT LIKE '%%test-probe%%'"
    )
    calls: dict[str, int] = {}
    for query, count in await cur.fetchall():
        key = " ".join(query.split())[:60]
        calls[key] = calls.get(key, 0) + count
    return calls
