"""End to end through the real stack (PostgreSQL, Redis, NATS, seqsvc, logic,
pusher, gateway) with the Python SDK: no loss, no duplicates, in order.

The tests of this module share one stack (the `stack` fixture); each uses its own
users. Nothing on the server side is mocked; faults are injected only on the
client side (dropped ACKs, a held sync response, a cut TCP connection).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e_support import Inbox, TcpProxy, assert_exactly_once_in_order, uid, wait_until

from im.gateway.v1 import gateway_pb2
from imclient import (
    AuthError,
    Client,
    DebugHooks,
    GatewayApi,
    Kicked,
    MemoryStore,
    SendErrorCode,
    SendFailed,
    SendResult,
    SQLiteStore,
    direct_conversation_id,
)
from imdev.stack import Stack


def texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


async def send_all(client: Client, conv: str, bodies: list[str]) -> None:
    """Submits everything at once (the send window pipelines it) and waits for
    every ACK; checks the ACKs keep the submission order in the conversation."""
    results = await asyncio.gather(*(client.submit(conv, b) for b in bodies))
    conv_seqs = [r.conv_seq for r in results]
    assert conv_seqs == sorted(conv_seqs) and len(set(conv_seqs)) == len(conv_seqs)
    assert len({r.msg_id for r in results}) == len(results)


async def test_a_to_b_1000_messages_online(stack: Stack) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    bodies = texts("online", 1000)
    async with (
        Client(stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True) as a,
        Client(stack.gateway_addresses, stack.mint(bob, "b1"), insecure=True) as b,
    ):
        inbox = Inbox(b, "bob/b1")
        await send_all(a, conv, bodies)
        await inbox.wait_for(1000, timeout=60, conversation_id=conv)
        assert_exactly_once_in_order(inbox, conv, bodies)
        # B was online: the messages came by push, not by sync.
        assert b.stats.pushes >= 1000
        await inbox.close()


async def test_b_offline_while_a_sends_500_then_connects(stack: Stack, tmp_path: Path) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    bodies = texts("offline", 500)
    b_token = stack.mint(bob, "b1")
    store_path = tmp_path / "bob.sqlite3"
    async with Client(
        stack.gateway_addresses, b_token, store=SQLiteStore(store_path), insecure=True
    ) as b:
        pass  # B has been online once: its cursor exists (0)
    async with Client(stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True) as a:
        await send_all(a, conv, bodies)

    # B comes back: everything arrives by sync, once, in order. It stops after
    # 200 (a process restart), and the next process resumes after exactly those.
    async with Client(
        stack.gateway_addresses, b_token, store=SQLiteStore(store_path), insecure=True
    ) as b:
        first: list[str] = []
        async for m in b.messages():
            first.append(m.text)
            if len(first) == 200:
                break
        assert b.stats.sync_entries >= 200
    assert first == bodies[:200]
    async with Client(
        stack.gateway_addresses, b_token, store=SQLiteStore(store_path), insecure=True
    ) as b:
        inbox = Inbox(b, "bob/b1 after restart")
        await inbox.wait_for(300, timeout=30, conversation_id=conv)
        assert_exactly_once_in_order(inbox, conv, bodies[200:])
        # It resumed from the stored cursor (not from 0, saved by msg_id dedup).
        assert b.stats.sync_entries == 300
        assert b.stats.duplicates_suppressed == 0
        await inbox.close()


async def test_every_device_of_both_users_gets_everything(stack: Stack) -> None:
    """B has two devices (one joins half-way), A has a second device: each of
    them, and the sending device itself, gets every message once, in order."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    bodies = texts("multi", 200)
    addrs = stack.gateway_addresses
    async with (
        Client(addrs, stack.mint(alice, "a1"), insecure=True) as a1,
        Client(addrs, stack.mint(alice, "a2"), insecure=True) as a2,
        Client(addrs, stack.mint(bob, "b1"), insecure=True) as b1,
    ):
        inboxes = [Inbox(a1, "alice/a1"), Inbox(a2, "alice/a2"), Inbox(b1, "bob/b1")]
        await send_all(a1, conv, bodies[:100])
        async with Client(addrs, stack.mint(bob, "b2"), insecure=True) as b2:
            inboxes.append(Inbox(b2, "bob/b2"))
            await send_all(a1, conv, bodies[100:])
            for inbox in inboxes:
                await inbox.wait_for(200, timeout=30, conversation_id=conv)
            for inbox in inboxes:
                assert_exactly_once_in_order(inbox, conv, bodies)
            # One message, one timeline position per user: devices agree.
            for x, y in [(inboxes[0], inboxes[1]), (inboxes[2], inboxes[3])]:
                assert [m.seq for m in x.messages] == [m.seq for m in y.messages]
            for inbox in inboxes:
                await inbox.close()


async def test_dropped_delivery_acks_are_retransmitted_and_shown_once(stack: Stack) -> None:
    """B's first delivery ACKs never leave the client: the pusher must
    retransmit those pushes, and B must show each message exactly once."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    bodies = texts("noack", 40)
    hooks = DebugHooks(drop_deliver_acks=10)
    async with (
        Client(stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True) as a,
        Client(
            stack.gateway_addresses,
            stack.mint(bob, "b1"),
            hooks=hooks,
            ack_delay_s=0,
            insecure=True,
            # Its receipts would come back as pushes whose (cumulative) ACKs
            # cover the dropped ones: this test needs them unanswered.
            auto_delivered=False,
        ) as b,
    ):
        inbox = Inbox(b, "bob/b1")
        for body in bodies[:10]:  # one at a time: one ACK each, all dropped
            await a.send(conv, body)
            await inbox.wait_for(len(inbox.messages) + 1, timeout=10, conversation_id=conv)
        assert b.stats.acks_dropped == 10
        # Nothing acknowledges them now: the pusher's timers must fire.
        await wait_until(
            lambda: b.stats.duplicate_pushes >= 1, 15, lambda: f"a retransmit ({b.stats})"
        )
        await wait_until(lambda: b.stats.acks_sent >= 1, 5, "B to acknowledge the repeat")
        await send_all(a, conv, bodies[10:])
        await inbox.wait_for(40, timeout=30, conversation_id=conv)
        assert_exactly_once_in_order(inbox, conv, bodies)
        assert b.stats.acks_sent >= 1
        # The repeats were recognised by seq; the msg_id safety net had no work.
        assert b.stats.duplicates_suppressed == 0
        await inbox.close()


async def test_stream_cut_every_50_messages_while_sending(stack: Stack) -> None:
    """A's TCP connection is reset after every 50th ACK while 500 sends are in
    flight: A reconnects and resends unacked sends with the same client_msg_id;
    B gets every message once, in A's order."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    bodies = texts("cut", 500)
    proxy = await TcpProxy(stack.gateway_addresses[0]).start()
    try:
        async with (
            Client(proxy.address, stack.mint(alice, "a1"), insecure=True) as a,
            Client(stack.gateway_addresses, stack.mint(bob, "b1"), insecure=True) as b,
        ):
            inbox = Inbox(b, "bob/b1")
            acked = 0

            def on_ack(_: object) -> None:
                nonlocal acked
                acked += 1
                if acked % 50 == 0 and acked < len(bodies):
                    proxy.cut()

            futures = [a.submit(conv, body) for body in bodies]
            for f in futures:
                f.add_done_callback(on_ack)
            async with asyncio.timeout(60):
                results = await asyncio.gather(*futures)
            assert proxy.cuts == 9
            assert a.stats.connects >= 10  # it really reconnected after each cut
            assert [r.conv_seq for r in results] == sorted(r.conv_seq for r in results)
            assert len({r.msg_id for r in results}) == 500  # no send stored twice
            await inbox.wait_for(500, timeout=60, conversation_id=conv)
            assert_exactly_once_in_order(inbox, conv, bodies)
            await inbox.close()
    finally:
        await proxy.close()


async def test_push_during_sync_never_skips_gim_issue_46(stack: Stack) -> None:
    """B reconnects while 20 messages wait for it. Its first sync response is
    held in the client while A sends one more, which is pushed to B before the
    sync is applied. The push must wait: B shows all 21, once, in order."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    bodies = texts("gim46", 21)
    store = MemoryStore()
    b_token = stack.mint(bob, "b1")
    async with Client(stack.gateway_addresses, b_token, store=store, insecure=True):
        pass
    async with Client(stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True) as a:
        await send_all(a, conv, bodies[:20])
        # Fan-out into B's timeline runs after the send ACK: wait until all 20
        # are there, so B's sync returns them all (read without a stream).
        async with GatewayApi(stack.gateway_addresses, b_token, insecure=True) as api:
            timeline: list[object] = []

            async def fanned_out() -> bool:
                timeline[:] = await api.sync_all(0)
                return len(timeline) >= 20

            for _ in range(300):
                if await fanned_out():
                    break
                await asyncio.sleep(0.05)
            assert len(timeline) == 20

        held = asyncio.Event()
        release = asyncio.Event()
        held_seqs: list[int] = []
        pushed: list[int] = []

        async def hold_first_sync(resp: gateway_pb2.SyncResponse) -> None:
            if not held.is_set():
                held_seqs.extend(e.seq for e in resp.entries)
                held.set()
                async with asyncio.timeout(30):
                    await release.wait()

        hooks = DebugHooks(on_sync_response=hold_first_sync, on_push=pushed.append)
        b = Client(stack.gateway_addresses, b_token, store=store, hooks=hooks, insecure=True)
        await b.start(wait_ready=False)
        try:
            inbox = Inbox(b, "bob/b1")
            async with asyncio.timeout(15):
                await held.wait()
            assert len(held_seqs) == 20  # the sync's answer has the 20 older ones
            last = await a.send(conv, bodies[20])
            await wait_until(lambda: len(pushed) >= 1, 15, "the push to reach B")
            seq_during_sync, buffered = b.last_seq, b.stats.buffered_pushes
            release.set()
            await b.wait_ready(15)
            await inbox.wait_for(21, timeout=15, conversation_id=conv)
            assert_exactly_once_in_order(inbox, conv, bodies)
            assert inbox.messages[-1].msg_id == last.msg_id
            # And it was the scenario we meant: the push was ahead of the held
            # sync answer, and it was buffered instead of moving B forward.
            assert max(held_seqs) < min(pushed)
            assert buffered >= 1 and seq_during_sync < min(pushed)
            await inbox.close()
        finally:
            release.set()
            await b.close()


async def test_refused_sends_fail_alone_and_the_rest_keep_their_order(stack: Stack) -> None:
    """Pipelined sends where some are refused for good (not a member; empty
    body): those raise SendFailed, every other one is stored once, in order, and
    the connection's client_ids resync without a reconnect."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    foreign = direct_conversation_id(uid("x"), uid("y"))
    plan: list[tuple[str, str]] = []
    for i in range(120):
        if i % 10 == 3:
            plan.append((foreign, f"foreign-{i}"))
        elif i % 10 == 7:
            plan.append((conv, ""))
        else:
            plan.append((conv, f"ok-{i:03d}"))
    async with (
        Client(stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True) as a,
        Client(stack.gateway_addresses, stack.mint(bob, "b1"), insecure=True) as b,
    ):
        inbox = Inbox(b, "bob/b1")
        outcomes = await asyncio.gather(
            *(a.submit(c, body) for c, body in plan), return_exceptions=True
        )
        for (c, body), outcome in zip(plan, outcomes, strict=True):
            if c == foreign:
                assert isinstance(outcome, SendFailed), outcome
                assert outcome.code in (SendErrorCode.PERMISSION_DENIED, SendErrorCode.NOT_FOUND)
            elif not body:
                assert isinstance(outcome, SendFailed), outcome
                assert outcome.code == SendErrorCode.INVALID_ARGUMENT
            else:
                assert isinstance(outcome, SendResult), outcome
        good = [body for c, body in plan if c == conv and body]
        await inbox.wait_for(len(good), timeout=30, conversation_id=conv)
        assert_exactly_once_in_order(inbox, conv, good)
        assert a.stats.connects == 1  # resynced by the answers, not by reconnecting
        assert a.stats.send_failures == 24
        await inbox.close()


async def test_a_second_connection_of_the_device_kicks_the_first(stack: Stack) -> None:
    bob, alice = uid("bob"), uid("alice")
    conv = direct_conversation_id(alice, bob)
    token = stack.mint(bob, "b1")
    first = Client(stack.gateway_addresses, token, insecure=True)
    await first.start()
    try:
        async with Client(stack.gateway_addresses, token, insecure=True) as second:
            await wait_until(lambda: first.stopped is not None, 15, "the first to be kicked")
            assert isinstance(first.stopped, Kicked)
            with pytest.raises(Kicked):
                async for _ in first.messages():
                    pass
            with pytest.raises(Kicked):
                first.submit(conv, "from the kicked one")
            # The replacement works, and the kicked client did not come back.
            inbox = Inbox(second, "bob/b1 (second)")
            async with Client(stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True) as a:
                await a.send(conv, "after the kick")
            await inbox.wait_for(1, timeout=15, conversation_id=conv)
            assert second.stopped is None and first.stats.connects == 1
            await inbox.close()
    finally:
        await first.close()


async def test_a_refused_token_stops_the_client_with_auth_error(stack: Stack) -> None:
    forged = stack.mint(uid("eve"), "e1")[:-4] + "AAAA"
    with pytest.raises(AuthError):
        async with Client(stack.gateway_addresses, forged, connect_timeout_s=15, insecure=True):
            pass
