"""Store epochs on the real stack: the server names the database its timelines
live in (Welcome.store_epoch, SyncResponse.store_epoch), and a device whose
saved cursor was taken in another database starts again from seq 0, with a
warning, instead of waiting above a timeline that will not reach it (issue 14:
after `make clean`, imctl's saved cursor sat above the new database's timeline
and chat showed nothing).

The first tests share one stack and fake the "other database" in the device's
store (an epoch the server never had, a cursor far above its timeline, and the
server's own msg_ids marked seen, as a new database reuses them). The last one
replaces the database under a connected client for real (private stack, slow).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from e2e_support import Inbox, uid, wait_until
from rawclient import RawDevice

from imclient import Client, GatewayApi, Message, SQLiteStore, direct_conversation_id
from imdev.stack import Stack

#: Longest a test waits for delivery on a healthy stack.
DELIVERY_S = 20.0


def server_epoch(stack: Stack) -> str:
    with psycopg.connect(stack.database_url) as conn:
        row = conn.execute("SELECT epoch FROM store_epoch").fetchone()
    assert row is not None
    return str(row[0])


async def send_and_wait(stack: Stack, sender: str, to: str, texts: list[str]) -> list[Message]:
    """Sends `texts` from `sender` to `to`, waits until they are all in `to`'s
    timeline, and returns that timeline."""
    conv = direct_conversation_id(sender, to)
    async with Client(
        stack.gateway_addresses, stack.mint(sender, "s1"), receive=False, insecure=True
    ) as c:
        for text in texts:
            await c.send(conv, text)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DELIVERY_S
    async with GatewayApi(stack.gateway_addresses, stack.mint(to, "reader"), insecure=True) as api:
        while True:
            timeline = await api.sync_all(0)
            if set(texts) <= {m.text for m in timeline}:
                return timeline
            if loop.time() > deadline:
                raise AssertionError(f"{to}'s timeline has {[m.text for m in timeline]}")
            await asyncio.sleep(0.05)


async def test_the_server_names_its_store_epoch(stack: Stack) -> None:
    alice, bob = uid("alice"), uid("bob")
    await send_and_wait(stack, alice, bob, ["one"])
    epoch = server_epoch(stack)
    assert len(epoch) >= 16  # a random id made by logic's migration
    async with RawDevice(stack.gateway_addresses[0], stack.mint(bob, "raw")) as raw:
        assert raw.welcome is not None and raw.welcome.store_epoch == epoch
    async with Client(stack.gateway_addresses, stack.mint(bob, "phone"), insecure=True) as client:
        assert client.store_epoch == epoch
    async with GatewayApi(stack.gateway_addresses, stack.mint(bob, "x"), insecure=True) as api:
        page = await api.sync(0)
    assert page.store_epoch == epoch and [m.text for m in page.messages] == ["one"]


async def test_a_cursor_of_another_store_resyncs_from_the_start(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = uid("alice"), uid("bob")
    texts = ["first", "second", "third"]
    timeline = await send_and_wait(stack, alice, bob, texts)
    account = f"{bob}/phone"
    # The device's state from an older database: its cursor far above this
    # timeline, and (as a new database numbers msg_ids from 1 again) these very
    # msg_ids remembered as shown. Either alone would hide the messages.
    path = tmp_path / "bob.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    await old.set_epoch(account, "an-older-store", reset=False)
    await old.commit(account, 1000, [(m.msg_id, i + 1) for i, m in enumerate(timeline)])
    await old.close()

    caplog.set_level(logging.WARNING, logger="imclient")
    store = SQLiteStore(path)
    async with Client(
        stack.gateway_addresses,
        stack.mint(bob, "phone"),
        store=store,
        insecure=True,
        # No DELIVERED receipt: it would be an entry of bob's own timeline above
        # the messages (the cursor checked below is the last message's).
        auto_delivered=False,
    ) as client:
        inbox = Inbox(client, "bob")
        await inbox.wait_for(len(texts), DELIVERY_S)
        assert inbox.texts() == texts
        assert client.stats.epoch_resets == 1
        assert client.store_epoch == server_epoch(stack)
        await inbox.close()
    warnings = [
        r for r in caplog.records if r.name == "imclient" and "store epoch" in r.getMessage()
    ]
    assert len(warnings) == 1, caplog.text
    assert "an-older-store" in warnings[0].getMessage()

    # The store now holds this server's epoch and its positions.
    again = SQLiteStore(path)
    await again.open()
    try:
        assert await again.load_epoch(account) == server_epoch(stack)
        assert await again.load_last_seq(account) == timeline[-1].seq
    finally:
        await again.close()


async def test_a_cursor_with_no_epoch_recorded_is_kept(stack: Stack, tmp_path: Path) -> None:
    """A store from an SDK before epochs: its cursor is taken as the server's
    (a resync would show everything again), and the epoch is recorded."""
    alice, bob = uid("alice"), uid("bob")
    timeline = await send_and_wait(stack, alice, bob, ["seen before"])
    account = f"{bob}/phone"
    path = tmp_path / "legacy.sqlite3"
    legacy = SQLiteStore(path)
    await legacy.open()
    await legacy.commit(account, timeline[-1].seq, [(timeline[-1].msg_id, timeline[-1].seq)])
    await legacy.close()

    store = SQLiteStore(path)
    async with Client(
        stack.gateway_addresses, stack.mint(bob, "phone"), store=store, insecure=True
    ) as client:
        inbox = Inbox(client, "bob")
        assert client.stats.epoch_resets == 0
        assert client.last_seq == timeline[-1].seq
        await send_and_wait(stack, alice, bob, ["new"])
        await inbox.wait_for(1, DELIVERY_S)
        assert inbox.texts() == ["new"]  # nothing shown twice
        await inbox.close()
    again = SQLiteStore(path)
    await again.open()
    try:
        assert await again.load_epoch(account) == server_epoch(stack)
    finally:
        await again.close()


@pytest.mark.slow
async def test_a_database_replaced_under_a_connected_client(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """logic, pusher and seqsvc restart on a new, empty database while the
    gateway and the client stay up (a restore into a fresh cluster, a wiped
    store). The gateway sees logic's new epoch, sends every stream a GoAway; the
    client reconnects, resets its cursor and shows the new database's messages,
    whose seqs and msg_ids are as low as the old ones it had shown."""
    stack = stack_factory()
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    store = SQLiteStore(tmp_path / "bob.sqlite3")
    async with Client(
        stack.gateway_addresses, stack.mint(bob, "phone"), store=store, insecure=True
    ) as client:
        inbox = Inbox(client, "bob")
        await send_and_wait(stack, alice, bob, ["old 1", "old 2", "old 3"])
        await inbox.wait_for(3, DELIVERY_S)
        first_epoch = client.store_epoch
        assert first_epoch == server_epoch(stack)

        for proc in [*stack.pushers, *stack.logics, stack.seqsvc]:
            proc.stop()
        with psycopg.connect(stack.postgres.conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{stack.database}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{stack.database}"')
        stack.seqsvc.start()
        for proc in [*stack.logics, *stack.pushers]:
            proc.start()

        await wait_until(
            lambda: client.stats.epoch_resets == 1,
            60,
            lambda: f"bob to notice the new store (stats {client.stats})",
        )
        assert client.store_epoch == server_epoch(stack) != first_epoch
        timeline = await send_and_wait(stack, alice, bob, ["new 1", "new 2"])
        assert timeline[0].seq <= 3  # the new database's positions start low again
        await inbox.wait_for(5, DELIVERY_S)
        assert inbox.texts(conv) == ["old 1", "old 2", "old 3", "new 1", "new 2"]
        await inbox.close()
