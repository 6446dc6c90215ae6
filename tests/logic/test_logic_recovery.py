"""Nothing stranded (I4) and PostgreSQL as the source of truth (I8): a crash
between commit and publish, a wiped JetStream store, NATS down, nobody consuming."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from logic_support import FanoutDriver, LogicClient, query, table_counts, wait_for

from im.logic.v1 import logic_pb2 as pb
from imdev.servers import NatsServer, PostgresServer, ServiceProcess
from logic.faults import CRASH_EXIT_CODE


async def make_group(client: LogicClient, owner: str, members: list[str]) -> str:
    resp = await client.stub.CreateGroup(
        pb.CreateGroupRequest(creator_id=owner, name="g", member_ids=members)
    )
    return str(resp.conversation.conversation_id)


async def has_all(client: LogicClient, users: list[str], msg_ids: set[int]) -> bool:
    for user in users:
        got = {m.msg_id for _, m in await client.timeline(user)}
        if not msg_ids <= got:
            return False
    return True


async def test_crash_between_commit_and_publish_is_relayed_after_restart(
    spawn: Callable[..., ServiceProcess],
    logic_env: dict[str, str],
    nats_server: NatsServer,
    key_prefix: str,
    subject_prefix: str,
    pg_dsn: str,
) -> None:
    env = {
        **logic_env,
        "IM_LOGIC_TEST_FAULT_CRASH_AFTER_COMMIT": "1",
        # Only the relay may deliver it: no repair loop.
        "IM_LOGIC_TEST_FAULT_SKIP_REPAIR": "1",
    }
    proc = spawn("logic", env)
    client = LogicClient(proc.address)
    members = ["ann", "ben", "cat", "dan"]
    group = await make_group(client, "ann", members)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.send("ann", group, b"survives", client_msg_id="crash-1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.wait(timeout=10) == CRASH_EXIT_CODE
    await client.close()

    # Committed, not published: the message and its outbox row are there.
    rows = await query(pg_dsn, "SELECT msg_id FROM messages")
    assert len(rows) == 1
    msg_id = int(rows[0][0])
    assert await query(pg_dsn, "SELECT msg_id FROM outbox") == [(msg_id,)]

    del proc.extra_env["IM_LOGIC_TEST_FAULT_CRASH_AFTER_COMMIT"]
    proc.start()
    client = LogicClient(proc.address)
    async with FanoutDriver(nats_server.url(), key_prefix, subject_prefix, [proc.address]) as d:
        await wait_for(lambda: has_all(client, members, {msg_id}), what="everyone has it")
        assert [(t.msg_id, h.get("Nats-Msg-Id")) for t, h in d.triggers] == [(msg_id, str(msg_id))]

    async def outbox_empty() -> bool:
        return (await table_counts(pg_dsn))["outbox"] == 0

    await wait_for(outbox_empty, what="outbox row deleted by the relay")
    # The client, which never got its ACK, retransmits: the stored ACK, no copy.
    again = await client.send("ann", group, b"survives", client_msg_id="crash-1")
    assert again.duplicate and again.msg_id == msg_id
    for user in members:
        assert [m.msg_id for _, m in await client.timeline(user)] == [msg_id]
    await client.close()


async def test_wiped_jetstream_store_is_repaired(
    spawn: Callable[..., ServiceProcess],
    logic_env: dict[str, str],
    nats_factory: Callable[[], NatsServer],
    key_prefix: str,
    subject_prefix: str,
    pg_dsn: str,
) -> None:
    """Triggers sit in JetStream (nobody consumes yet), more sends happen while
    nats-server is down, then it comes back with an empty store: the repair loop
    re-triggers every conversation and everything is fanned out."""
    nats = nats_factory()
    proc = spawn(
        "logic",
        {
            **logic_env,
            "IM_LOGIC_NATS_URL": nats.url(),
            "IM_LOGIC_REPAIR_AFTER_S": "1",
            "IM_LOGIC_REPAIR_INTERVAL_S": "0.2",
            "IM_LOGIC_REPAIR_DIRECT_AFTER": "100",  # heal through triggers only
            "IM_LOGIC_PUBLISH_TIMEOUT_S": "0.3",
        },
    )
    client = LogicClient(proc.address)
    members = ["ann", "ben", "cat"]
    group = await make_group(client, "ann", members)
    group_ids, pair = set(), set()
    for i in range(5):
        group_ids.add((await client.send("ann", group, f"g{i}".encode())).msg_id)
        pair.add((await client.send("ben", "d:ben:cat", f"d{i}".encode())).msg_id)

    async def published() -> bool:
        return (await table_counts(pg_dsn))["outbox"] == 0

    await wait_for(published, what="triggers published to JetStream")

    nats.stop()
    for i in range(3):  # in flight while NATS is away: the send still succeeds
        group_ids.add((await client.send("cat", group, f"late{i}".encode())).msg_id)
    nats.wipe_store()
    nats.start()

    async with FanoutDriver(nats.url(), key_prefix, subject_prefix, [proc.address]) as d:

        async def done() -> bool:
            return await has_all(client, members, group_ids) and await has_all(
                client, ["ben", "cat"], pair
            )

        await wait_for(done, timeout=30, what="all fanned out")
        assert any(h.get("Nats-Msg-Id", "").startswith("repair-") for _, h in d.triggers)

    async def nothing_pending() -> bool:
        return (await table_counts(pg_dsn))["fanout_pending"] == 0

    await wait_for(nothing_pending, what="no conversation left pending")
    for user in members:
        ids = [m.msg_id for _, m in await client.timeline(user)]
        assert len(ids) == len(set(ids))
    await client.close()


@pytest.mark.parametrize("outage", ["nats-down", "nobody-consumes"])
async def test_repair_fans_out_directly_when_triggers_do_not_help(
    spawn: Callable[..., ServiceProcess],
    logic_env: dict[str, str],
    nats_factory: Callable[[], NatsServer],
    pg_dsn: str,
    outage: str,
) -> None:
    """NATS down: the repair loop cannot publish, so it writes the timelines itself.
    NATS up but no pusher: after `repair_direct_after` triggers that changed
    nothing, the same. Either way sync heals every device."""
    nats = nats_factory()
    if outage == "nats-down":
        nats.stop()  # logic starts without NATS, and serves
    proc = spawn(
        "logic",
        {
            **logic_env,
            "IM_LOGIC_NATS_URL": nats.url(),
            "IM_LOGIC_REPAIR_AFTER_S": "0.3",
            "IM_LOGIC_REPAIR_INTERVAL_S": "0.1",
            "IM_LOGIC_REPAIR_DIRECT_AFTER": "1",
            "IM_LOGIC_PUBLISH_TIMEOUT_S": "0.3",
        },
    )
    client = LogicClient(proc.address)
    members = ["ann", "ben", "cat"]
    group = await make_group(client, "ann", members)
    sent = {(await client.send(m, group, b"x")).msg_id for m in members}
    direct = (await client.send("ann", "d:ann:ben", b"y")).msg_id

    async def done() -> bool:
        return await has_all(client, members, sent) and await has_all(
            client, ["ann", "ben"], {direct}
        )

    await wait_for(done, timeout=30, what="repaired")
    assert (await table_counts(pg_dsn))["fanout_pending"] == 0

    if outage == "nats-down":
        # NATS appears: logic connects, creates the stream, and the outbox drains.
        nats.start()
        await client.send("ben", group, b"z")

        async def outbox_empty() -> bool:
            return (await table_counts(pg_dsn))["outbox"] == 0

        await wait_for(outbox_empty, timeout=30, what="triggers published once NATS is up")
    await client.close()


async def test_seqsvc_or_postgres_down_is_unavailable_and_writes_nothing(
    spawn: Callable[..., ServiceProcess],
    logic_env: dict[str, str],
    seqsvc: ServiceProcess,
    postgres_factory: Callable[..., PostgresServer],
) -> None:
    """Retryable UNAVAILABLE while a dependency is down, nothing written, and the
    same request succeeds once it is back."""
    pg = postgres_factory()
    dsn = pg.create_database("logic")
    proc = spawn(
        "logic",
        {
            **logic_env,
            "IM_LOGIC_DATABASE_URL": dsn,
            "IM_LOGIC_SEQSVC_MAX_RETRIES": "1",
            "IM_LOGIC_DB_POOL_TIMEOUT_S": "1",
        },
    )
    client = LogicClient(proc.address)
    await client.send("ann", "d:ann:ben", client_msg_id="before")

    seqsvc.stop()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.send("ann", "d:ann:ben", client_msg_id="during-seq")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "sequence service" in (err.value.details() or "")
    assert len(await query(dsn, "SELECT msg_id FROM messages")) == 1
    seqsvc.start()

    async def sends(cmid: str) -> bool:
        try:
            await client.send("ann", "d:ann:ben", client_msg_id=cmid)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            return False
        return True

    await wait_for(lambda: sends("during-seq"), what="sends succeed after seqsvc restarted")

    pg.stop()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.send("ann", "d:ann:ben", client_msg_id="during-pg")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "database" in (err.value.details() or "")
    pg.start()
    await wait_for(lambda: sends("during-pg"), what="sends succeed after PostgreSQL restarted")
    ids = [m.client_msg_id for _, m in await client.timeline("ann")]
    assert ids == ["before", "during-seq", "during-pg"]
    await client.close()


async def test_logic_waits_for_postgres_at_start(
    spawn: Callable[..., ServiceProcess],
    logic_env: dict[str, str],
    postgres_factory: Callable[..., PostgresServer],
) -> None:
    """Started while PostgreSQL is down (both restarting after an outage), logic
    retries its migrations instead of crashing, and serves once it is back; past
    db_startup_wait_s it exits 1 with a one-line reason."""
    pg = postgres_factory()
    dsn = pg.create_database("logic")
    pg.stop()
    proc = spawn("logic", {**logic_env, "IM_LOGIC_DATABASE_URL": dsn}, wait=False)
    await wait_for(lambda: _log_has(proc, "PostgreSQL not reachable yet"), what="retrying")
    assert proc.running()
    pg.start()
    proc.wait_ready(30)
    client = LogicClient(proc.address)
    assert not (await client.send("ann", "d:ann:ben")).duplicate
    await client.close()

    pg.stop()
    quitter = spawn(
        "logic",
        {**logic_env, "IM_LOGIC_DATABASE_URL": dsn, "IM_LOGIC_DB_STARTUP_WAIT_S": "1"},
        wait=False,
    )
    assert quitter.wait(timeout=30) == 1
    assert "PostgreSQL unreachable for 1.0s" in quitter.log_path.read_text()
    assert "Traceback" not in quitter.log_path.read_text()


async def _log_has(proc: ServiceProcess, text: str) -> bool:
    return text in proc.log_path.read_text()
