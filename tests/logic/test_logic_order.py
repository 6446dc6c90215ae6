"""Ordering under concurrency, with real processes: prefix-closed timelines (I1),
exactly once per timeline (I2), conversation order (I5), no deadlocks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from logic_support import FanoutDriver, LogicClient, wait_for

from im.logic.v1 import logic_pb2 as pb
from imdev.servers import NatsServer, ServiceProcess


async def test_sync_is_prefix_closed_under_concurrent_senders_and_two_logics(
    spawn: Callable[..., ServiceProcess],
    logic: ServiceProcess,
    logic_env: dict[str, str],
    nats_server: NatsServer,
    key_prefix: str,
    subject_prefix: str,
) -> None:
    """20 senders write to one user through two logic processes (sends and fan-outs
    alternate between them) while the user syncs in a loop: a seq never appears
    below one the reader has already seen."""
    other = spawn("logic", logic_env)
    clients = [LogicClient(logic.address), LogicClient(other.address)]
    senders, per_sender = 20, 25
    total = senders * per_sender
    violations: list[str] = []
    reads = 0

    async def sender(i: int) -> None:
        client = clients[i % 2]
        for n in range(per_sender):
            await client.send(f"s{i:02d}", f"d:s{i:02d}:target", f"{i}-{n}".encode())

    async def reader() -> None:
        nonlocal reads
        previous: set[int] = set()
        while len(previous) < total:
            rows = await clients[reads % 2].timeline("target", page=60)
            reads += 1
            now = {seq for seq, _ in rows}
            if not previous <= now:
                violations.append(f"seqs disappeared: {sorted(previous - now)[:5]}")
            new = now - previous
            if previous and new and min(new) < max(previous):
                violations.append(f"seq {min(new)} appeared below {max(previous)}")
            previous = now

    async with FanoutDriver(
        nats_server.url(), key_prefix, subject_prefix, [logic.address, other.address]
    ) as driver:
        reading = asyncio.create_task(reader())
        await asyncio.gather(*(sender(i) for i in range(senders)))
        await asyncio.wait_for(reading, timeout=60)
        assert not driver.errors
    for c in clients:
        await c.close()

    assert violations == []
    assert reads > 3  # the reader really raced the writers
    rows = await LogicClient(logic.address).timeline("target")
    seqs = [s for s, _ in rows]
    assert seqs == sorted(set(seqs)) and len(seqs) == total


async def test_group_of_50_three_senders_100_each(
    client: LogicClient, logic: ServiceProcess, nats_server: NatsServer, key_prefix: str,
    subject_prefix: str,
) -> None:  # fmt: skip
    """Each member's timeline holds each message exactly once; each sender's
    messages keep their send order in conv_seq; rows written by fan-out follow
    conv_seq."""
    senders = ["s0", "s1", "s2"]
    members = senders + [f"m{i:02d}" for i in range(47)]
    conv = (
        await client.stub.CreateGroup(
            pb.CreateGroupRequest(creator_id="s0", name="fifty", member_ids=members)
        )
    ).conversation
    assert len(conv.member_ids) == 50
    group = conv.conversation_id
    sent: dict[str, list[pb.SendMessageResponse]] = {s: [] for s in senders}

    async def sender(name: str) -> None:
        for n in range(100):
            sent[name].append(await client.send(name, group, f"{name}-{n}".encode()))

    async with FanoutDriver(nats_server.url(), key_prefix, subject_prefix, [logic.address]):
        await asyncio.gather(*(sender(s) for s in senders))
        all_ids = {a.msg_id for acks in sent.values() for a in acks}
        assert len(all_ids) == 300

        timelines: dict[str, list[tuple[int, pb.common__pb2.Message]]] = {}  # type: ignore[name-defined]

        async def everyone_has_all() -> bool:
            for m in members:
                if len(timelines.get(m, [])) < 300:
                    timelines[m] = await client.timeline(m)
            return all(len(timelines[m]) >= 300 for m in members)

        await wait_for(everyone_has_all, timeout=60, what="every member has 300 messages")

    for name, acks in sent.items():
        conv_seqs = [a.conv_seq for a in acks]
        assert conv_seqs == sorted(conv_seqs) and len(set(conv_seqs)) == 100, name
    for m in members:
        rows = timelines[m]
        ids = [msg.msg_id for _, msg in rows]
        assert len(ids) == 300 and set(ids) == all_ids, m
        seqs = [s for s, _ in rows]
        assert seqs == sorted(seqs)
        if m not in senders:
            assert [msg.conv_seq for _, msg in rows] == sorted(msg.conv_seq for _, msg in rows)


async def test_crossing_direct_sends_do_not_deadlock(
    spawn: Callable[..., ServiceProcess],
    logic: ServiceProcess,
    logic_env: dict[str, str],
    nats_server: NatsServer,
    key_prefix: str,
    subject_prefix: str,
) -> None:
    """A<->B, B<->C, C<->A, 1,000 messages in each direction, concurrently, through
    two logic processes, with fan-outs running alongside: no error, no deadlock,
    every timeline complete."""
    other = spawn("logic", logic_env)
    clients = [LogicClient(logic.address), LogicClient(other.address)]
    users = ["A", "B", "C"]
    per_direction, in_flight = 1000, 8
    errors: list[BaseException] = []

    async def stream(sender: str, peer: str, k: int) -> None:
        conv = f"d:{min(sender, peer)}:{max(sender, peer)}"
        queue = iter(range(per_direction))

        async def worker(w: int) -> None:
            for n in queue:
                try:
                    await clients[(k + w + n) % 2].send(sender, conv, f"{sender}{n}".encode())
                except BaseException as exc:
                    errors.append(exc)
                    raise

        await asyncio.gather(*(worker(w) for w in range(in_flight)))

    directions = list(itertools.permutations(users, 2))
    async with FanoutDriver(
        nats_server.url(), key_prefix, subject_prefix, [logic.address, other.address]
    ) as driver:
        await asyncio.wait_for(
            asyncio.gather(*(stream(s, p, k) for k, (s, p) in enumerate(directions))), timeout=120
        )
        assert errors == []
        expected = 4 * per_direction  # two conversations, both directions each

        async def complete() -> bool:
            counts = [len(await clients[0].timeline(u, page=500)) for u in users]
            return counts == [expected] * 3

        await wait_for(complete, timeout=60, what="every timeline complete")
        assert driver.errors == []
    for c in clients:
        await c.close()
