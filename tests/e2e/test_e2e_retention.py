"""Data lifecycle as a client sees it, through the gateway and the SDK: the SDK's
ids carry their time; a resend older than the dedup window fails loudly and is
never stored twice; a device whose cursor is below what retention deleted syncs
on from what is left, and the gateway says what is gone."""

from __future__ import annotations

import time

import grpc
import psycopg
import pytest
from e2e_support import Inbox, uid, wait_until
from psycopg_pool import AsyncConnectionPool

from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imclient import Client, SendFailed, direct_conversation_id
from imclient.errors import SendErrorCode
from imclient.ids import uuid7
from imdev.stack import Stack
from logic.ids import uuid7_time_ms
from logic.retention import DAY_S, Pruner, RetentionPolicy
from logic.store import Database

DAY_MS = int(DAY_S * 1000)


async def test_sdk_ids_carry_their_time_and_a_resend_beyond_the_window_fails_loudly(
    stack: Stack,
) -> None:
    ann, ben = uid("ann"), uid("ben")
    conv = direct_conversation_id(ann, ben)
    async with Client(stack.gateway_addresses, stack.mint(ann), insecure=True) as client:
        first = await client.send(conv, "now")
        made = uuid7_time_ms(first.client_msg_id)
        assert made is not None and abs(made - time.time() * 1000) < 60_000
        # A message the app kept for 31 days (the default window is 30): refused
        # for good with the reason, not stored, gone from the client's outbox.
        old_id = uuid7(int(time.time() * 1000) - 31 * DAY_MS)
        with pytest.raises(SendFailed) as err:
            await client.send(conv, "a month late", client_msg_id=old_id)
        assert err.value.code == SendErrorCode.INVALID_ARGUMENT
        assert "dedup window" in err.value.reason
        assert client.pending_sends == 0
        after = await client.send(conv, "later")
        assert after.conv_seq > first.conv_seq
    with psycopg.connect(stack.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE client_msg_id = %s", (old_id,))
        assert row.fetchone() == (0,)


async def test_a_cursor_below_pruned_rows_syncs_on_from_what_is_left(stack: Stack) -> None:
    ann, ben = uid("ann"), uid("ben")
    conv = direct_conversation_id(ann, ben)
    async with Client(stack.gateway_addresses, stack.mint(ann, "a1"), insecure=True) as sender:
        old = [await sender.send(conv, f"old-{i}") for i in range(5)]

        def fanned_out() -> bool:
            with psycopg.connect(stack.database_url) as conn:
                row = conn.execute("SELECT count(*) FROM timeline WHERE user_id = %s", (ben,))
                return row.fetchone() == (len(old),)

        await wait_until(fanned_out, 30, "the old messages in ben's timeline")
        # Ben's device saw none of these. Now they are 40 days old (and so is
        # everything stored before them: message times rise with msg_id), and pruned.
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE messages SET server_time_ms = server_time_ms - %s WHERE msg_id <= %s",
                (40 * DAY_MS, old[-1].msg_id),
            )
        pool = AsyncConnectionPool(stack.database_url, min_size=1, max_size=2, open=False)
        await pool.open()
        policy = RetentionPolicy(timeline_s=7 * DAY_S, margin_s=60)
        deleted = await Pruner(Database(pool), policy, pass_interval_s=0).prune_until_idle()
        await pool.close()
        assert deleted["timeline"] >= 2 * len(old)

        async with grpc.aio.insecure_channel(stack.gateway_addresses[0]) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            meta = (("authorization", f"Bearer {stack.mint(ben, 'b0')}"),)
            page = await stub.Sync(gateway_pb2.SyncRequest(after_seq=0), metadata=meta)
        assert list(page.entries) == [] and page.pruned_through_seq > 0

        fresh = await sender.send(conv, "fresh")
        async with Client(stack.gateway_addresses, stack.mint(ben, "b1"), insecure=True) as reader:
            inbox = Inbox(reader, "ben/b1")
            await inbox.wait_for(1, 30)
            assert [m.msg_id for m in inbox.messages] == [fresh.msg_id]
            await inbox.close()
