"""Conversation events through the whole stack, judged by raw protocol devices.

A recall racing its own fan-out: the sender recalls each message the moment its
SendAck arrives, while the message's fan-out and pushes are under way. Whatever
wins, after the recall's ACK no read of the store (Sync, History) returns the
body, the database no longer holds it, a device that was offline meets the
recall in its sync instead of the body, and a connected device never gets the
body pushed after it has received the recall (a push already in flight when the
recall committed can arrive before the RECALL entry, never after it: the RECALL
has the higher seq in every timeline, docs/protocol.md "Recall").
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import psycopg
import pytest
from e2e_support import uid
from rawclient import RawDevice

from im.common.v1 import common_pb2 as cpb
from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imdev.stack import Stack

ROUNDS = 30


class RawSender:
    """One Connect stream that sends frames in client_id order and reads SendAcks."""

    def __init__(self, address: str, token: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._call = self._stub.Connect(metadata=[("authorization", f"Bearer {token}")])
        self._next = 1
        self.metadata = [("authorization", f"Bearer {token}")]

    async def start(self) -> None:
        first = await self._call.read()
        assert first.WhichOneof("frame") == "welcome", first

    async def send(
        self, conv: str, body: bytes = b"", kind: int = 0, target: int = 0
    ) -> gateway_pb2.SendAck:
        client_id = self._next
        self._next += 1
        await self._call.write(
            gateway_pb2.ClientFrame(
                send=gateway_pb2.Send(
                    client_id=client_id,
                    client_msg_id=str(uuid.uuid4()),
                    conversation_id=conv,
                    body=body,
                    content_type=cpb.CONTENT_TYPE_TEXT,
                    kind=kind,  # type: ignore[arg-type]
                    target_conv_seq=target,
                )
            )
        )
        while True:
            frame = await asyncio.wait_for(self._call.read(), 15)
            which = frame.WhichOneof("frame")
            if which == "send_ack" and frame.send_ack.client_id == client_id:
                return frame.send_ack
            if which == "send_error" and frame.send_error.client_id == client_id:
                raise AssertionError(f"send refused: {frame.send_error}")

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close()


@pytest.fixture
async def alice(stack: Stack) -> AsyncIterator[tuple[str, RawSender]]:
    user = uid("alice")
    sender = RawSender(stack.gateway_addresses[0], stack.mint(user, "a1"))
    await sender.start()
    yield user, sender
    await sender.close()


async def test_recall_racing_its_own_fanout(stack: Stack, alice: tuple[str, RawSender]) -> None:
    _, sender = alice
    b, c = uid("bob"), uid("carol")
    gw = stack.gateway_addresses[0]
    # The group: alice sends, bob is connected, carol is offline until the end.
    stub = gateway_pb2_grpc.GatewayStub(sender._channel)
    created = await stub.CreateGroup(
        gateway_pb2.CreateGroupRequest(name="race", member_ids=[b, c]), metadata=sender.metadata
    )
    g = created.conversation.conversation_id
    async with RawDevice(gw, stack.mint(b, "b1"), name="bob") as bob:
        bodies: dict[int, bytes] = {}  # conv_seq -> body
        recall_acked: dict[int, float] = {}  # conv_seq -> monotonic time of the recall's ACK
        recall_seq: dict[int, int] = {}
        for i in range(ROUNDS):
            body = f"secret-{i}-{uuid.uuid4().hex}".encode()
            ack = await sender.send(g, body)
            bodies[ack.conv_seq] = body
            recall = await sender.send(g, kind=cpb.MESSAGE_KIND_RECALL, target=ack.conv_seq)
            recall_acked[ack.conv_seq] = time.monotonic()
            recall_seq[ack.conv_seq] = recall.conv_seq
            # Right after the ACK: History never has the body.
            hist = await stub.History(
                gateway_pb2.HistoryRequest(conversation_id=g), metadata=sender.metadata
            )
            assert body not in {m.body for m in hist.messages}

        # bob gets everything: each message and its recall, exactly once.
        assert await bob.wait_for_count(2 * ROUNDS, 30), bob.describe()
        entries = bob.entries
        assert len(entries) == 2 * ROUNDS, bob.describe()
        recall_entry_seq = {
            e.target_conv_seq: e.seq for e in entries if e.kind == cpb.MESSAGE_KIND_RECALL
        }
        assert set(recall_entry_seq) == set(bodies)
        raced = 0
        for conv_seq, body in bodies.items():
            # No push carried the body after bob had the recall (in its seq order,
            # or in time).
            got_recall_at = min(
                p.at
                for p in bob.pushes
                if p.kind == cpb.MESSAGE_KIND_RECALL and p.target_conv_seq == conv_seq
            )
            for p in bob.pushes:
                if p.body == body:
                    assert p.seq < recall_entry_seq[conv_seq], (conv_seq, p)
                    assert p.at <= got_recall_at, (conv_seq, p)
            msg = next(e for e in entries if e.conv_seq == conv_seq)
            if msg.recalled:
                assert msg.body == b""
                raced += 1
        # bob's display (entries applied in seq order) ends with no body.
        shown: dict[int, bytes] = {}
        for e in entries:
            if e.kind == cpb.MESSAGE_KIND_MESSAGE:
                shown[e.conv_seq] = e.body
            elif e.kind == cpb.MESSAGE_KIND_RECALL:
                shown[e.target_conv_seq] = b""
        assert all(v == b"" for v in shown.values())

    # carol was offline: her sync meets every recall, never a body.
    carol_md = [("authorization", f"Bearer {stack.mint(c, 'c1')}")]
    after, seen = 0, []
    while True:
        page = await stub.Sync(gateway_pb2.SyncRequest(after_seq=after), metadata=carol_md)
        seen += list(page.entries)
        if page.entries:
            after = page.entries[-1].seq
        if not page.has_more:
            break
    assert len(seen) == 2 * ROUNDS
    assert all(e.message.body == b"" for e in seen)
    assert all(e.message.recalled for e in seen if e.message.kind == cpb.MESSAGE_KIND_MESSAGE)
    # And the store holds none of the bodies.
    async with await psycopg.AsyncConnection.connect(stack.database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM messages WHERE body = ANY(%s::bytea[])",
            (list(bodies.values()),),
        )
        assert await cur.fetchone() == (0,)
    print(f"recall race: {raced} of {ROUNDS} messages reached bob already recalled")
