"""SendMessage against real PostgreSQL, seqsvc and NATS: durable, idempotent, and
checked against what is committed."""

from __future__ import annotations

import asyncio
import uuid

from logic_support import LogicClient, table_counts


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


async def test_ten_identical_concurrent_sends_store_one_message(
    client: LogicClient, pg_dsn: str
) -> None:
    cmid = str(uuid.uuid4())
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
