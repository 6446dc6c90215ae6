"""Data lifecycle (logic/retention.py): what the pruner deletes and what it must
never delete, the dedup window against resends, and that pruning never holds up
sends, fan-outs or syncs.

Rows are made "old" by moving their messages' server_time_ms back (a prefix of
msg_ids, so times still rise with msg_id) and by sending with UUIDv7 ids made in
the past; the pruner runs in the test process against the test's database, one
round at a time, with the policy each test names.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import psycopg
import pytest
from logic_support import LogicClient, query
from psycopg_pool import AsyncConnectionPool

from im.logic.v1 import logic_pb2 as pb
from imclient.ids import uuid7
from imdev.servers import ServiceProcess
from logic import repo
from logic.config import Settings
from logic.ids import uuid7_prefix, uuid7_time_ms
from logic.retention import DAY_S, Pruner, RetentionPolicy
from logic.store import Database

NOW_MS = int(time.time() * 1000)
DAY_MS = int(DAY_S * 1000)
POLICY = RetentionPolicy(
    timeline_s=7 * DAY_S, messages_s=14 * DAY_S, dedup_s=30 * DAY_S, outbox_s=600, margin_s=60
)


@pytest.fixture
def logic_env(logic_env: dict[str, str]) -> dict[str, str]:
    """The logic processes' own pruners run once, at start, on an empty store: the
    tests run theirs, one round at a time. The outbox relay leaves alone the rows
    the tests put in the outbox (20 minutes old: older than the policy's outbox
    retention, younger than the relay's minimum age)."""
    return {
        **logic_env,
        # As POLICY, which the fan-out of expired messages follows.
        "IM_LOGIC_RETENTION_TIMELINE_DAYS": "7",
        "IM_LOGIC_RETENTION_MESSAGES_DAYS": "14",
        "IM_LOGIC_RETENTION_INTERVAL_S": "86400",
        "IM_LOGIC_OUTBOX_RELAY_MIN_AGE_S": "3600",
    }


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Database]:
    """A pool on the test's database, with logic's migrations applied."""
    await repo.migrate(pg_dsn)
    pool = AsyncConnectionPool(
        pg_dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    yield Database(pool)
    await pool.close()


@pytest.fixture
def open_logic(spawn: Callable[..., ServiceProcess], logic_env: dict[str, str]) -> ServiceProcess:
    """A logic process without a dedup window (it takes ids of any age): the tests
    use it to store messages with UUIDv7 ids made in the past."""
    return spawn("logic", {**logic_env, "IM_LOGIC_RETENTION_DEDUP_DAYS": "0"})


def pruner(db: Database, policy: RetentionPolicy = POLICY, rows: int = 2000) -> Pruner:
    return Pruner(db, policy, batch_rows=rows, batch_users=3, pass_interval_s=0)


async def age_messages(dsn: str, upto_msg_id: int, days: float) -> None:
    """Moves every message up to `upto_msg_id` `days` into the past."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE messages SET server_time_ms = server_time_ms - %s WHERE msg_id <= %s",
            (int(days * DAY_MS), upto_msg_id),
        )


async def scalar(dsn: str, sql: str, params: object = None) -> int:
    rows = await query(dsn, sql, params)
    return int(rows[0][0] or 0)


def test_uuid7_ids_carry_their_time_and_sort_by_it() -> None:
    made = [uuid7(t) for t in (1, 10**9, NOW_MS - 31 * DAY_MS, NOW_MS)]
    assert [uuid7_time_ms(m) for m in made] == [1, 10**9, NOW_MS - 31 * DAY_MS, NOW_MS]
    assert sorted(made) == made
    assert uuid7_time_ms(str(uuid.uuid4())) is None
    assert uuid7_time_ms(made[-1].upper()) is None  # only the canonical lowercase form
    assert uuid7_time_ms("m1") is None
    bound = uuid7_prefix(NOW_MS - 30 * DAY_MS)
    assert made[2] < bound < made[3]


def test_message_retention_needs_a_shorter_timeline_retention() -> None:
    base = {"database_url": "x", "seqsvc_address": "x", "nats_url": "x"}
    with pytest.raises(ValueError, match="RETENTION_TIMELINE_DAYS"):
        Settings(**base, retention_messages_days=14)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RETENTION_TIMELINE_DAYS"):
        Settings(**base, retention_messages_days=7, retention_timeline_days=14)  # type: ignore[arg-type]
    Settings(**base, retention_messages_days=14, retention_timeline_days=7)  # type: ignore[arg-type]


async def test_msg_id_at_finds_the_first_message_of_a_time(
    pg_dsn: str, db: Database, open_logic: ServiceProcess
) -> None:
    client = LogicClient(open_logic.address)
    ids = [(await client.send("ann", "d:ann:ben", b"x")).msg_id for _ in range(9)]
    await client.close()
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        for i, msg_id in enumerate(ids):  # minute i
            await conn.execute(
                "UPDATE messages SET server_time_ms = %s WHERE msg_id = %s", (60_000 * i, msg_id)
            )
        # A hole in the msg_ids, as deleted messages leave.
        await conn.execute("DELETE FROM messages WHERE msg_id = %s", (ids[4],))
    async with db.pool.connection() as conn:
        assert await repo.msg_id_at(conn, 0) == ids[0]
        assert await repo.msg_id_at(conn, 1) == ids[1]
        assert await repo.msg_id_at(conn, 60_000 * 3 + 1) == ids[5]  # skips the hole
        assert await repo.msg_id_at(conn, 60_000 * 8) == ids[8]
        assert await repo.msg_id_at(conn, 60_000 * 9) == ids[8] + 1  # all older


async def test_prune_deletes_what_expired_and_keeps_what_invariants_need(
    pg_dsn: str, db: Database, open_logic: ServiceProcess, logic: ServiceProcess
) -> None:
    """Old rows go; recent ones, each conversation's newest message, messages not
    yet fanned out, unpublished triggers and dedup keys of ids without a time
    stay; after it, sends, syncs and resends behave."""
    c = LogicClient(open_logic.address)
    strict = LogicClient(logic.address)  # dedup window 30 days (the default)
    old_ms = NOW_MS - 40 * DAY_MS
    group = (
        await c.stub.CreateGroup(
            pb.CreateGroupRequest(creator_id="ann", name="g", member_ids=["ben", "cat"])
        )
    ).conversation.conversation_id

    # 40 days ago: ann<->ben, the group, and xi<->yu (whose only conversation goes idle).
    old_ids = [uuid7(old_ms + i) for i in range(6)]
    old_acks = [await c.send("ann", "d:ann:ben", b"old", client_msg_id=m) for m in old_ids[:3]]
    old_acks.append(await c.send("ben", group, b"old-g", client_msg_id=old_ids[3]))
    idle = [await c.send("xi", "d:xi:yu", b"old-x", client_msg_id=m) for m in old_ids[4:]]
    opaque = await c.send("ann", "d:ann:ben", b"old-opaque", client_msg_id="opaque-1")
    for conv in ("d:ann:ben", group, "d:xi:yu"):
        await c.fanout_all(conv)
    # A message 40 days old that was never fanned out (its pusher and repair were
    # away): the message stays while its fan-out is pending.
    stuck = await c.send("zed", "d:wu:zed", b"stuck", client_msg_id=uuid7(old_ms))
    last_old = stuck.msg_id
    await age_messages(pg_dsn, last_old, 40)

    # Today.
    new_acks = [await c.send("ann", "d:ann:ben", b"new") for _ in range(2)]
    new_acks.append(await c.send("cat", group, b"new-g"))
    for conv in ("d:ann:ben", group):
        await c.fanout_all(conv)

    # Outbox: one trigger already fanned out (nothing it could change), one not.
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM outbox")
        await conn.execute(
            "INSERT INTO outbox (msg_id, conversation_id, conv_seq, created_at) VALUES "
            "(%s, 'd:ann:ben', %s, now() - interval '20 minutes'), "
            "(%s, 'd:wu:zed', %s, now() - interval '20 minutes')",
            (old_acks[0].msg_id, old_acks[0].conv_seq, stuck.msg_id, stuck.conv_seq),
        )
    head_xi = await scalar(pg_dsn, "SELECT max(seq) FROM timeline WHERE user_id = 'xi'")
    heads_before = await strict.stub.GetHeads(pb.GetHeadsRequest(user_ids=["ann", "xi"]))

    deleted = await pruner(db).prune_until_idle()

    old_msg_ids = [a.msg_id for a in old_acks] + [opaque.msg_id]
    # Timelines: every row of an old message is gone, recent ones stay.
    assert (
        await scalar(pg_dsn, "SELECT count(*) FROM timeline WHERE msg_id <= %s", (last_old,)) == 0
    )
    for a in new_acks:
        assert await scalar(pg_dsn, "SELECT count(*) FROM timeline WHERE msg_id = %s", (a.msg_id,))
    # ... and each user's floor is the highest seq deleted.
    assert await scalar(pg_dsn, "SELECT floor_seq FROM timeline_floor WHERE user_id = 'xi'") == (
        head_xi
    )
    # Messages: the old ones go, except the idle conversation's newest (its conv_seq
    # is I5's floor) and the one not fanned out.
    left = {
        r[0]
        for r in await query(pg_dsn, "SELECT msg_id FROM messages WHERE msg_id <= %s", (last_old,))
    }
    assert left == {idle[-1].msg_id, stuck.msg_id}
    assert not left & set(old_msg_ids)
    # Dedup keys: old UUIDv7 keys go (but the refusal below covers them); the
    # opaque id's key stays forever, new ones stay.
    keys = {r[0] for r in await query(pg_dsn, "SELECT client_msg_id FROM send_dedup")}
    assert not keys & set(old_ids)
    assert "opaque-1" in keys
    assert len(keys) == 1 + len(new_acks)
    # Outbox: the fanned-out trigger goes, the pending one stays for the relay.
    assert [r[0] for r in await query(pg_dsn, "SELECT msg_id FROM outbox")] == [stuck.msg_id]
    assert deleted["messages"] == 6 and deleted["outbox"] == 1
    assert deleted["timeline"] == 3 * 2 + 3 + 2 * 2 + 2 + 1  # ann/ben, group, xi/yu, opaque, zed

    # Heads count the rows that are left; xi has none left.
    heads = await strict.stub.GetHeads(pb.GetHeadsRequest(user_ids=["ann", "xi"]))
    assert list(heads.heads) == [heads_before.heads[0], 0]
    # Sync from a cursor below the floor says so and goes on with what is left.
    page = await strict.stub.SyncMessages(pb.SyncMessagesRequest(user_id="ann", after_seq=0))
    assert page.pruned_through_seq > 0
    assert [e.message.msg_id for e in page.entries] == [a.msg_id for a in new_acks[:2]] + [
        new_acks[2].msg_id
    ]
    page = await strict.stub.SyncMessages(pb.SyncMessagesRequest(user_id="xi", after_seq=0))
    assert (list(page.entries), page.pruned_through_seq) == ([], head_xi)
    page = await strict.stub.SyncMessages(pb.SyncMessagesRequest(user_id="xi", after_seq=head_xi))
    assert page.pruned_through_seq == 0  # nothing deleted after this cursor

    # I1 after a prune: xi's next seq is above everything xi ever had.
    assert (await strict.send("xi", "d:xi:yu", b"back")).seq > head_xi
    async with db.pool.connection() as conn:
        assert (await repo.last_seqs_tx(conn, ["yu"]))["yu"] == await scalar(
            pg_dsn, "SELECT floor_seq FROM timeline_floor WHERE user_id = 'yu'"
        )

    # Resends: a pruned UUIDv7 key is refused, never stored a second time...
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await strict.send("ann", "d:ann:ben", b"old", client_msg_id=old_ids[0])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dedup window" in (err.value.details() or "")
    # ... an opaque id's key outlives its message: a duplicate, by msg_id alone.
    again = await strict.send("ann", "d:ann:ben", b"old-opaque", client_msg_id="opaque-1")
    assert (again.duplicate, again.msg_id, again.seq) == (True, opaque.msg_id, 0)
    assert (
        await scalar(pg_dsn, "SELECT count(*) FROM messages WHERE client_msg_id = 'opaque-1'") == 0
    )

    # The stuck message's fan-out comes too late: past the timeline retention it
    # writes no row (it would be deleted at once), and the watermark moves on.
    await c.fanout_all("d:wu:zed")
    assert await scalar(pg_dsn, "SELECT count(*) FROM timeline WHERE user_id = 'wu'") == 0
    assert await scalar(
        pg_dsn, "SELECT watermark FROM fanout_state WHERE conversation_id = 'd:wu:zed'"
    ) == (stuck.conv_seq)
    await c.close()
    await strict.close()


async def test_send_with_an_id_older_than_the_dedup_window_is_refused(
    pg_dsn: str, client: LogicClient, open_logic: ServiceProcess
) -> None:
    """The default window is 30 days: an unknown UUIDv7 id made before it is
    refused, nothing stored; one inside it is stored once; a known id of any age is
    answered with its ACK."""
    too_old = uuid7(NOW_MS - 31 * DAY_MS)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.send("ann", "d:ann:ben", client_msg_id=too_old)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert too_old in (err.value.details() or "")
    assert await scalar(pg_dsn, "SELECT count(*) FROM messages") == 0

    recent = uuid7(NOW_MS - 29 * DAY_MS)
    first = await client.send("ann", "d:ann:ben", client_msg_id=recent)
    again = await client.send("ann", "d:ann:ben", client_msg_id=recent)
    assert (again.duplicate, again.msg_id, again.seq) == (True, first.msg_id, first.seq)

    # Stored (by a logic without a window) and still known: a duplicate, not refused.
    opener = LogicClient(open_logic.address)
    stored = await opener.send("ann", "d:ann:ben", client_msg_id=too_old)
    await opener.close()
    known = await client.send("ann", "d:ann:ben", client_msg_id=too_old)
    assert (known.duplicate, known.msg_id) == (True, stored.msg_id)


async def test_fanout_skips_a_message_older_than_the_timeline_retention(
    pg_dsn: str, spawn: Callable[..., ServiceProcess], logic_env: dict[str, str]
) -> None:
    """A fan-out that comes after the timeline retention (pusher and repair away
    that long) writes no rows: the pruner may have passed the recipients already,
    and a row written now could outlive its message."""
    proc = spawn("logic", {**logic_env, "IM_LOGIC_RETENTION_TIMELINE_DAYS": "7"})
    client = LogicClient(proc.address)
    old = await client.send("ann", "d:ann:ben", b"late")
    await age_messages(pg_dsn, old.msg_id, 8)
    fresh = await client.send("ann", "d:ann:ben", b"fresh")
    deliveries = await client.fanout_all("d:ann:ben")
    assert [(d.user_id, d.message.msg_id) for d in deliveries] == [
        ("ann", fresh.msg_id),
        ("ben", fresh.msg_id),
    ]
    rows = await query(pg_dsn, "SELECT user_id, msg_id FROM timeline ORDER BY seq")
    assert ("ben", old.msg_id) not in rows and ("ben", fresh.msg_id) in rows
    # The same in a FanoutBatch.
    late = await client.send("ann", "d:ann:ben", b"late too")
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE messages SET server_time_ms = server_time_ms - %s WHERE msg_id = %s",
            (8 * DAY_MS, late.msg_id),
        )
    batch = await client.stub.FanoutBatch(pb.FanoutBatchRequest(conversation_ids=["d:ann:ben"]))
    result = batch.results[0]
    assert (result.has_more, list(result.deliveries), result.watermark) == (
        False,
        [],
        late.conv_seq,
    )
    await client.close()


async def test_a_prune_batch_holds_no_lock_that_sends_fanouts_or_syncs_wait_for(
    pg_dsn: str, db: Database, open_logic: ServiceProcess
) -> None:
    """A pruning transaction left open after its deletes (as if its commit were
    slow) does not hold up a send, a fan-out or a sync of the same users and
    conversations: each finishes within its 3 s deadline, and no backend waits on
    a lock meanwhile."""
    c = LogicClient(open_logic.address)
    acks = [
        await c.send("ann", "d:ann:ben", b"old", client_msg_id=uuid7(NOW_MS - 40 * DAY_MS + i))
        for i in range(20)
    ]
    await c.fanout_all("d:ann:ben")
    await age_messages(pg_dsn, acks[-1].msg_id, 40)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO outbox (msg_id, conversation_id, conv_seq, created_at) "
            "VALUES (%s, 'd:ann:ben', %s, now() - interval '20 minutes')",
            (acks[0].msg_id, acks[0].conv_seq),
        )
    async with db.pool.connection() as conn, conn.transaction():
        assert await repo.lock_retention_state_tx(conn, 0) is not None
        assert await repo.prune_timeline_tx(conn, ["ann", "ben"], acks[-1].msg_id, 1000) == 38
        assert await repo.prune_messages_tx(conn, 0, acks[-1].msg_id, 1000) == (19, acks[-2].msg_id)
        assert await repo.prune_dedup_tx(conn, ["ann"], uuid7_prefix(NOW_MS), 1000) == 20
        assert await repo.prune_outbox_tx(conn, 600, 1000) == 1
        # The batch is open, holding its row locks. Everything else goes on.
        sent = await asyncio.wait_for(c.send("ann", "d:ann:ben", b"during", timeout=3), 3)
        await asyncio.wait_for(c.send("ben", "d:ann:ben", b"reply", timeout=3), 3)
        rows = await asyncio.wait_for(c.fanout_all("d:ann:ben"), 3)
        assert {d.message.msg_id for d in rows} >= {sent.msg_id}
        page = await c.stub.SyncMessages(
            pb.SyncMessagesRequest(user_id="ben", after_seq=0), timeout=3
        )
        assert page.entries  # the batch's deletes are not visible yet
        waiting = await scalar(pg_dsn, "SELECT count(*) FROM pg_locks WHERE NOT granted")
        assert waiting == 0
    await c.close()


async def test_sends_and_syncs_go_on_while_the_pruner_works(
    pg_dsn: str, db: Database, open_logic: ServiceProcess
) -> None:
    """Pruning in small batches (10 rows) while four users keep sending and
    syncing: every send succeeds, every user's seqs keep rising, no timeline
    holds a message twice, and everything old is gone at the end."""
    c = LogicClient(open_logic.address)
    users = ["u1", "u2", "u3", "u4"]
    for i in range(60):
        a, b = users[i % 4], users[(i + 1) % 4]
        conv = f"d:{min(a, b)}:{max(a, b)}"
        await c.send(a, conv, b"old", client_msg_id=uuid7(NOW_MS - 40 * DAY_MS + i))
    convs = sorted({f"d:{min(a, b)}:{max(a, b)}" for a in users for b in users if a != b})
    for conv in convs:
        await c.fanout_all(conv)
    last_old = await scalar(pg_dsn, "SELECT max(msg_id) FROM messages")
    await age_messages(pg_dsn, last_old, 40)

    stop = asyncio.Event()
    work = Pruner(db, POLICY, batch_rows=10, batch_users=2, pass_interval_s=0)

    async def prune() -> dict[str, int]:
        total: dict[str, int] = {}
        while not stop.is_set():
            for k, v in (await work.prune_until_idle()).items():
                total[k] = total.get(k, 0) + v
            await asyncio.sleep(0.01)
        return total

    async def chat(me: str, peer: str) -> list[int]:
        conv = f"d:{min(me, peer)}:{max(me, peer)}"
        seqs = []
        for _ in range(15):
            ack = await c.send(me, conv, b"now", timeout=5)
            seqs.append(ack.seq)
            await c.fanout_all(conv)
            await c.stub.SyncMessages(pb.SyncMessagesRequest(user_id=me, after_seq=0), timeout=5)
        return seqs

    pruning = asyncio.create_task(prune())
    results = await asyncio.gather(*(chat(u, users[(i + 1) % 4]) for i, u in enumerate(users)))
    stop.set()
    deleted = await pruning
    for seqs in results:
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert deleted.get("timeline", 0) == 120 and deleted.get("messages", 0) > 0
    assert (
        await scalar(pg_dsn, "SELECT count(*) FROM timeline WHERE msg_id <= %s", (last_old,)) == 0
    )
    dupes = await query(
        pg_dsn, "SELECT user_id, msg_id FROM timeline GROUP BY 1, 2 HAVING count(*) > 1"
    )
    assert dupes == []
    for user in users:
        rows = await query(
            pg_dsn, "SELECT seq FROM timeline WHERE user_id = %s ORDER BY seq", (user,)
        )
        floor = await scalar(
            pg_dsn, "SELECT floor_seq FROM timeline_floor WHERE user_id = %s", (user,)
        )
        assert rows and min(r[0] for r in rows) > floor  # new rows all above the deleted ones
    await c.close()
