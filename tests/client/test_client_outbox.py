"""The client outbox against the real stack: a message submitted to the SDK is
kept in the store until its SendAck (or a refusal for good) has been handed to
the app, so it survives an app process killed with SIGKILL, and is resent by the
next process, first, in order, with its original client_msg_id.

The tests share one stack (the `stack` fixture); each uses its own users.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from e2e.e2e_support import uid, wait_until

from imclient import (
    Client,
    ClientClosed,
    GatewayApi,
    MemoryStore,
    OutboxFull,
    SendErrorCode,
    SendFailed,
    SendOutcome,
    SendResult,
    SQLiteStore,
    direct_conversation_id,
)
from imclient.store import OutboxEntry
from imdev.servers import free_port
from imdev.stack import Stack

APP = Path(__file__).with_name("outbox_app.py")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by the kill
    return records


async def timeline_texts(stack: Stack, token: str, conv: str) -> list[tuple[str, int]]:
    async with GatewayApi(stack.gateway_addresses, token, insecure=True) as api:
        return [(m.text, m.msg_id) for m in await api.sync_all(0) if m.conversation_id == conv]


async def wait_timeline(stack: Stack, token: str, conv: str, count: int) -> list[tuple[str, int]]:
    """Bob's timeline for `conv` once it holds at least `count` messages (fan-out
    runs after the send ACK)."""
    got: list[tuple[str, int]] = []

    async def poll() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            got[:] = await timeline_texts(stack, token, conv)
            if len(got) >= count:
                return
            if loop.time() > deadline:
                raise AssertionError(f"bob's timeline has {len(got)} of {count} messages")
            await asyncio.sleep(0.1)

    await poll()
    return got


# -- the crash test ------------------------------------------------------------------


@pytest.mark.slow
async def test_app_killed_with_sigkill_loses_and_duplicates_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """Three app processes in turn on one SQLiteStore file; the first two are
    killed with SIGKILL at a random point while sends are unacknowledged. Each
    process submits its own batch behind what the previous one left.

    In the end: Bob's timeline holds, per process, a prefix of its batch that
    covers everything the app was told was durable, each message once, in
    submission order across all three processes; every delivered message had an
    ACK outcome with its msg_id (at most one per process, a repeat only as a
    `restored` message of a later process), no message failed, no outcome
    names a message Bob does not have, and the outbox ends empty."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    a_token, b_token = stack.mint(alice, "a1"), stack.mint(bob, "b1")
    store_path = tmp_path / "alice.sqlite3"
    count = 150
    rounds = 3
    logs = [tmp_path / f"app-{r}.jsonl" for r in range(rounds)]
    killed_with_pending = 0
    for r in range(rounds):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(APP),
            ",".join(stack.gateway_addresses),
            a_token,
            str(store_path),
            conv,
            f"r{r}",
            str(count),
            str(logs[r]),
            "5",  # submits per persisted() call
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            if r < rounds - 1:
                # Kill once a random number of this process's own sends were
                # acknowledged (0: possibly before anything was sent at all).
                target = rng.randrange(0, count // 2)

                def acked_here(r: int = r, target: int = target) -> bool:
                    recs = read_log(logs[r])
                    own = {x["cmid"] for x in recs if x["event"] == "submit"}
                    acks = [x for x in recs if x["event"] == "outcome" and x["cmid"] in own]
                    durable = any(x["event"] == "durable" for x in recs)
                    return durable and len(acks) >= target

                await wait_until(acked_here, 60, f"round {r} to reach {target} ACKs (seed {seed})")
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                assert proc.returncode == -signal.SIGKILL
                if not any(x["event"] == "done" for x in read_log(logs[r])):
                    killed_with_pending += 1
            else:
                async with asyncio.timeout(90):
                    _, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()[-3000:]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert killed_with_pending >= 1, f"no kill landed before the end (seed {seed})"

    records = [read_log(p) for p in logs]
    body_of: dict[str, str] = {}
    durable: list[int] = []
    for recs in records:
        body_of.update({x["cmid"]: x["body"] for x in recs if x["event"] == "submit"})
        durable.append(max((x["upto"] for x in recs if x["event"] == "durable"), default=0))
    assert any(x["event"] == "done" for x in records[-1])

    acked_cmids = {x["cmid"] for recs in records for x in recs if x["event"] == "outcome"}
    timeline = await wait_timeline(stack, b_token, conv, len(acked_cmids))
    texts = [t for t, _ in timeline]
    # Exactly once, in order: per process a prefix of its batch (covering what
    # was durable), the processes one after another.
    expected: list[str] = []
    for r in range(rounds):
        batch = [f"r{r}-{i:05d}" for i in range(count)]
        got_r = [t for t in texts if t.startswith(f"r{r}-")]
        assert got_r == batch[: len(got_r)], f"round {r}: not a prefix in order (seed {seed})"
        assert len(got_r) >= durable[r], f"round {r}: lost a durable message (seed {seed})"
        expected += got_r
    assert texts == expected, f"processes interleaved or duplicated (seed {seed})"
    assert len({m for _, m in timeline}) == len(timeline)
    assert len(texts) == len(set(texts))

    # Outcomes: one ACK per message and process at most; a later one only for a
    # message restored from the outbox; always naming the stored msg_id.
    msg_id_of = {t: m for t, m in timeline}
    per_cmid: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for r, recs in enumerate(records):
        for x in recs:
            if x["event"] == "outcome":
                per_cmid[x["cmid"]].append((r, x))
    for cmid, outs in per_cmid.items():
        body = body_of[cmid]
        assert all(x["acked"] for _, x in outs), f"{body} failed: {outs}"
        assert body in msg_id_of, f"an ACK for {body}, which Bob does not have"
        assert {x["msg_id"] for _, x in outs} == {msg_id_of[body]}
        assert max(Counter(r for r, _ in outs).values()) == 1, f"{body}: two ACKs in a process"
        assert all(x["restored"] for _, x in outs[1:]), f"{body}: reported again, not restored"
    for text in texts:
        cmids = [c for c, b in body_of.items() if b == text]
        assert len(cmids) == 1 and per_cmid[cmids[0]], f"{text} delivered without an ACK outcome"

    store = SQLiteStore(store_path)
    await store.open()
    try:
        assert await store.outbox_load(f"{alice}/a1") == []
    finally:
        await store.close()


# -- restore, in order, before new sends ---------------------------------------------


async def test_restored_messages_go_first_in_order_and_join_a_resubmit(
    stack: Stack, tmp_path: Path
) -> None:
    """A previous process left three messages in the outbox. The new client sends
    them first, in their order, before what the app submits (even before the
    connection is up); the app re-submitting one of them by its client_msg_id
    joins it instead of sending it twice."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    account = f"{alice}/a1"
    path = tmp_path / "a.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    old = [OutboxEntry(f"old-{i}-{alice}", conv, 1, f"old-{i}".encode(), i) for i in range(3)]
    await store.outbox_add(account, old)
    await store.close()

    outcomes: list[SendOutcome] = []
    client = Client(
        stack.gateway_addresses,
        stack.mint(alice, "a1"),
        store=SQLiteStore(path),
        on_send_result=outcomes.append,
        insecure=True,
    )
    await client.start(wait_ready=False)
    try:
        new = [client.submit(conv, f"new-{i}") for i in range(2)]
        joined = client.submit(conv, "old-1 again", client_msg_id=old[1].client_msg_id)
        await client.wait_ready(30)
        results = await asyncio.gather(*new, joined)
        await client.flush(30)
    finally:
        await client.close()
    texts = [t for t, _ in await wait_timeline(stack, stack.mint(bob, "b1"), conv, 5)]
    assert texts == ["old-0", "old-1", "old-2", "new-0", "new-1"]
    assert [o.client_msg_id for o in outcomes[:3]] == [e.client_msg_id for e in old]
    assert [o.restored for o in outcomes] == [True, True, True, False, False]
    assert all(o.acked and o.result is not None for o in outcomes)
    assert results[2].client_msg_id == old[1].client_msg_id
    assert results[2].msg_id == outcomes[1].result.msg_id  # type: ignore[union-attr]
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store.outbox_load(account) == []
    finally:
        await store.close()


async def test_a_message_acked_before_the_crash_is_reported_acked_not_sent_twice(
    stack: Stack, tmp_path: Path
) -> None:
    """The crash window between the ACK and the outbox delete: the restored
    message is resent, the server answers with the stored message, and the app
    gets an ACK outcome with the same msg_id; Bob has it once."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    account = f"{alice}/a1"
    path = tmp_path / "a.sqlite3"
    token = stack.mint(alice, "a1")
    async with Client(stack.gateway_addresses, token, store=SQLiteStore(path), insecure=True) as a:
        first = await a.send(conv, "once")
        await a.flush(10)
    store = SQLiteStore(path)
    await store.open()
    assert await store.outbox_load(account) == []  # deleted after the ACK
    await store.outbox_add(account, [OutboxEntry(first.client_msg_id, conv, 1, b"once", 0)])
    await store.close()

    outcomes: list[SendOutcome] = []
    async with Client(
        stack.gateway_addresses,
        token,
        store=SQLiteStore(path),
        on_send_result=outcomes.append,
        insecure=True,
    ) as a:
        await a.flush(30)
        assert a.stats.send_acks == 1 and a.stats.outbox_restored == 1
    assert len(outcomes) == 1 and outcomes[0].acked and outcomes[0].restored
    assert outcomes[0].result is not None and outcomes[0].result.msg_id == first.msg_id
    assert outcomes[0].result.duplicate  # the server says it had it already
    timeline = await wait_timeline(stack, stack.mint(bob, "b1"), conv, 1)
    assert timeline == [("once", first.msg_id)]


async def test_a_permanent_failure_is_reported_removed_and_not_retried(
    stack: Stack, tmp_path: Path
) -> None:
    """A restored message to a conversation Alice is not in is refused for good:
    the app gets the failure, it leaves the outbox, the messages behind it still
    go out in order, and the next start sends nothing."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    foreign = direct_conversation_id(uid("x"), uid("y"))
    account = f"{alice}/a1"
    path = tmp_path / "a.sqlite3"
    token = stack.mint(alice, "a1")
    store = SQLiteStore(path)
    await store.open()
    await store.outbox_add(
        account,
        [
            OutboxEntry(f"ok-0-{alice}", conv, 1, b"ok-0", 0),
            OutboxEntry(f"bad-{alice}", foreign, 1, b"bad", 1),
            OutboxEntry(f"ok-1-{alice}", conv, 1, b"ok-1", 2),
        ],
    )
    await store.close()

    outcomes: list[SendOutcome] = []
    async with Client(
        stack.gateway_addresses,
        token,
        store=SQLiteStore(path),
        on_send_result=outcomes.append,
        insecure=True,
    ) as a:
        await a.flush(30)
    assert [(o.client_msg_id.split("-")[0], o.acked) for o in outcomes] == [
        ("ok", True),
        ("bad", False),
        ("ok", True),
    ]
    assert isinstance(outcomes[1].error, SendFailed)
    assert outcomes[1].error.code in (SendErrorCode.PERMISSION_DENIED, SendErrorCode.NOT_FOUND)
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store.outbox_load(account) == []
    finally:
        await store.close()

    outcomes.clear()
    async with Client(
        stack.gateway_addresses,
        token,
        store=SQLiteStore(path),
        on_send_result=outcomes.append,
        insecure=True,
    ) as a:
        await a.flush(10)
        assert a.stats.sends_written == 0 and a.pending_sends == 0
    assert outcomes == []
    texts = [t for t, _ in await wait_timeline(stack, stack.mint(bob, "b1"), conv, 2)]
    assert texts == ["ok-0", "ok-1"]


# -- persisted before sent -------------------------------------------------------------


class HeldStore(MemoryStore):
    """A MemoryStore whose outbox_add waits for `release` (a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def outbox_add(self, account: str, entries: Any) -> None:
        self.entered.set()
        await self.release.wait()
        await super().outbox_add(account, entries)


async def test_nothing_is_written_to_the_gateway_before_it_is_in_the_outbox(
    stack: Stack,
) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    store = HeldStore()
    async with Client(
        stack.gateway_addresses, stack.mint(alice, "a1"), store=store, insecure=True
    ) as a:
        future = a.submit(conv, "held")
        persisted = asyncio.ensure_future(a.persisted())
        try:
            async with asyncio.timeout(10):
                await store.entered.wait()
            # The store is writing it: the pump must not send it meanwhile.
            with pytest.raises(AssertionError):
                await wait_until(lambda: a.stats.sends_written > 0, 1.0, "a premature send")
            assert not future.done() and not persisted.done()
        finally:
            store.release.set()
        await persisted
        result = await asyncio.wait_for(future, 15)
        assert isinstance(result, SendResult)
        await a.flush(10)
        assert await store.outbox_load(f"{alice}/a1") == []


# -- bound, MemoryStore, offline durability ---------------------------------------------


async def test_the_outbox_bound_refuses_a_submit_with_a_clear_error(tmp_path: Path) -> None:
    """With `account` given, submits are durable without any connection (a phone
    offline); past `max_outbox` pending messages submit() raises OutboxFull, and
    the restored messages count against the bound in the next process."""
    path = tmp_path / "a.sqlite3"
    dead = [f"127.0.0.1:{free_port()}"]  # nothing listens: never connects
    client = Client(
        dead, "token", store=SQLiteStore(path, max_outbox=3), account="alice/a1", insecure=True
    )
    await client.start(wait_ready=False)
    try:
        futures = [client.submit("d:alice:bob", f"m{i}") for i in range(3)]
        await asyncio.wait_for(client.persisted(), 10)
        with pytest.raises(OutboxFull, match="3 messages"):
            client.submit("d:alice:bob", "one too many")
    finally:
        await client.close()
    for f in futures:
        assert f.done() and not isinstance(f.exception(), OutboxFull)
    store = SQLiteStore(path)
    await store.open()
    assert [e.body for e in await store.outbox_load("alice/a1")] == [b"m0", b"m1", b"m2"]
    await store.close()
    again = Client(
        dead, "token", store=SQLiteStore(path, max_outbox=3), account="alice/a1", insecure=True
    )
    await again.start(wait_ready=False)
    try:
        assert again.pending_sends == 3
        with pytest.raises(OutboxFull):
            again.submit("d:alice:bob", "still too many")
    finally:
        await again.close()


async def test_memory_store_keeps_todays_behaviour(stack: Stack) -> None:
    """The default (in-memory) store: send/submit/flush work as before, nothing
    is left behind after the ACKs, a pending send still fails with ClientClosed
    on close, and a fresh client starts with nothing to resend."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    store = MemoryStore()
    token = stack.mint(alice, "a1")
    async with Client(
        stack.gateway_addresses, token, store=store, receive=False, insecure=True
    ) as a:
        acked: list[SendResult] = []
        for i in range(50):
            a.submit(conv, f"m{i}").add_done_callback(lambda f: acked.append(f.result()))
        result = await a.send(conv, "last")
        await a.flush(30)
        assert len(acked) == 50 and result.conv_seq > max(r.conv_seq for r in acked)
        assert await store.outbox_load(f"{alice}/a1") == []
    async with Client(stack.gateway_addresses, token, insecure=True) as fresh:
        assert fresh.pending_sends == 0
    texts = [t for t, _ in await wait_timeline(stack, stack.mint(bob, "b1"), conv, 51)]
    assert texts == [f"m{i}" for i in range(50)] + ["last"]


async def test_persisted_waits_for_the_account_and_fails_if_closed_first(tmp_path: Path) -> None:
    """Without `account=`, a submit is durable only once a Welcome names the
    account: closing before that fails `persisted()` with ClientClosed, and
    the message is not in the store (no outbox could be named)."""
    dead = [f"127.0.0.1:{free_port()}"]
    store = SQLiteStore(tmp_path / "a.sqlite3")
    client = Client(dead, "token", store=store, insecure=True)
    await client.start(wait_ready=False)
    future = client.submit("d:alice:bob", "m0")
    waiter = asyncio.ensure_future(client.persisted())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiter), 0.5)
    await client.close()
    with pytest.raises(ClientClosed, match="outbox"):
        await waiter
    with pytest.raises(ClientClosed):
        await future
