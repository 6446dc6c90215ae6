"""Conversation state in the SDK without a server: `ConversationStates` folding
timeline entries (pure), and the `Client`'s handling of the ephemeral frames
(typing, presence, frame errors) and of event sends, against an in-process
gateway that records what the client writes and writes what the test says."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from e2e.e2e_support import wait_until

from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imclient import (
    Client,
    ContentType,
    ConversationStates,
    FrameError,
    FrameErrorCode,
    MemoryStore,
    Message,
    MessageKind,
    OutboxEntry,
    PresenceState,
    PresenceUpdate,
    ReconnectPolicy,
    SendResult,
    SQLiteStore,
    TypingNotice,
)
from imcommon.server import EXCLUSIVE_PORT
from imdev.servers import free_port

CONV = "d:alice:bob"


def entry(
    conv_seq: int,
    sender: str,
    kind: MessageKind = MessageKind.MESSAGE,
    target: int = 0,
    body: bytes = b"",
    conv: str = CONV,
) -> Message:
    return Message(
        seq=conv_seq,
        msg_id=100 + conv_seq,
        conversation_id=conv,
        sender_id=sender,
        sender_device_id="d1",
        client_msg_id=f"cm{conv_seq}",
        conv_seq=conv_seq,
        content_type=ContentType.TEXT,
        body=body or (f"m{conv_seq}".encode() if kind == MessageKind.MESSAGE else b""),
        server_time_ms=1000 + conv_seq,
        kind=kind,
        target_conv_seq=target,
    )


# -- ConversationStates (pure) ---------------------------------------------------------


def states(me: str = "alice") -> ConversationStates:
    s = ConversationStates()
    s.user_id = me
    return s


def test_own_reads_and_the_peers_reads_go_to_different_positions_and_only_forward() -> None:
    s = states()
    for e in [entry(1, "bob"), entry(2, "bob"), entry(3, "alice", MessageKind.READ, 2)]:
        assert s.apply(e)
    assert s.get(CONV).read_conv_seq == 2 and s.get(CONV).peer_read_conv_seq == 0
    assert s.apply(entry(4, "bob", MessageKind.READ, 1))
    assert s.apply(entry(5, "bob", MessageKind.DELIVERED, 2))
    # An older position never lowers one: only last_conv_seq moves.
    s.apply(entry(6, "alice", MessageKind.READ, 1))
    s.apply(entry(7, "bob", MessageKind.DELIVERED, 1))
    got = s.get(CONV)
    assert (got.read_conv_seq, got.peer_read_conv_seq, got.peer_delivered_conv_seq) == (2, 1, 2)
    assert got.last_conv_seq == 7
    # Applying the same entries again changes nothing (exactly-once is not needed).
    assert not s.apply(entry(5, "bob", MessageKind.DELIVERED, 2))
    # Reading implies receiving: a read position raises the delivered one.
    assert got.delivered_conv_seq == 2
    s.apply(entry(8, "bob", MessageKind.READ, 6))
    assert s.get(CONV).peer_delivered_conv_seq == 6


def test_in_a_group_other_members_reads_are_not_peer_receipts() -> None:
    s = states()
    s.apply(entry(3, "bob", MessageKind.READ, 2, conv="g:team"))
    assert s.get("g:team").peer_read_conv_seq == 0


def test_edits_keep_the_newest_and_a_recall_wins_for_good() -> None:
    s = states()
    original = entry(1, "bob")
    s.apply(original)
    s.apply(entry(3, "bob", MessageKind.EDIT, 1, b"second"))
    s.apply(entry(2, "bob", MessageKind.EDIT, 1, b"first"))  # older edit, late: ignored
    assert s.get(CONV).current(original).body == b"second"
    assert s.get(CONV).current(original).edited_at_ms == 1003
    s.apply(entry(4, "bob", MessageKind.RECALL, 1))
    s.apply(entry(5, "bob", MessageKind.EDIT, 1, b"after"))  # refused by the server anyway
    shown = s.get(CONV).current(original)
    assert shown.recalled and shown.body == b"" and s.get(CONV).recalled == {1}


def test_delete_for_me_counts_only_from_this_user_and_snapshots_are_copies() -> None:
    s = states()
    s.apply(entry(2, "bob", MessageKind.DELETE_FOR_ME, 1))
    assert s.get(CONV).deleted_for_me == set()
    s.apply(entry(3, "alice", MessageKind.DELETE_FOR_ME, 1))
    snap = s.get(CONV).snapshot()
    snap.deleted_for_me.add(99)
    assert s.get(CONV).deleted_for_me == {1}
    assert s.get(CONV).current(entry(1, "bob")).deleted_for_me


def test_an_ack_that_stored_nothing_names_the_current_position() -> None:
    s = states()
    nothing = SendResult("c1", 0, 0, 7, 0)
    assert not nothing.stored
    assert s.apply_ack(CONV, MessageKind.READ, 3, b"", nothing)
    assert s.get(CONV).read_conv_seq == 7
    stored = SendResult("c2", 55, 9, 12, 0)
    assert s.apply_ack(CONV, MessageKind.READ, 10, b"", stored)
    assert s.get(CONV).read_conv_seq == 10
    assert s.apply_ack(CONV, MessageKind.RECALL, 4, b"", stored)
    assert s.get(CONV).recalled == {4}


def test_typing_expires_and_a_message_from_the_typist_ends_it() -> None:
    s = states()
    s.on_typing(TypingNotice(CONV, "bob", "b1", True, 5000), now=100.0)
    assert s.get(CONV).typing_users(101.0) == ["bob"]
    assert s.get(CONV).typing_users(106.0) == []
    s.on_typing(TypingNotice(CONV, "bob", "b1", True, 5000), now=200.0)
    s.apply(entry(1, "bob"))
    assert s.get(CONV).typing_users(201.0) == []


async def test_the_outbox_keeps_an_events_kind_and_target(tmp_path: Any) -> None:
    """A read position or a recall submitted before a crash is resent as that
    event, not as an empty chat message."""
    store = SQLiteStore(tmp_path / "s.sqlite3")
    await store.open()
    await store.outbox_add("a/d", [OutboxEntry("c1", CONV, 1, b"", 0, int(MessageKind.READ), 7)])
    await store.close()
    again = SQLiteStore(tmp_path / "s.sqlite3")
    await again.open()
    try:
        (got,) = await again.outbox_load("a/d")
    finally:
        await again.close()
    assert (got.kind, got.target_conv_seq) == (int(MessageKind.READ), 7)


# -- the Client against a scripted gateway ----------------------------------------------


class RecordingGateway(gateway_pb2_grpc.GatewayServicer):
    """bob/b1's gateway: records every client frame, acknowledges sends (an
    event at or below `positions` with msg_id 0, as logic does), and writes
    the frames a test queues."""

    def __init__(self) -> None:
        self.frames: list[gateway_pb2.ClientFrame] = []
        self.connects = 0
        self.positions: dict[tuple[str, int], int] = {}  # (conv, kind) -> position
        self.conv_seq = 10
        self._queue: asyncio.Queue[gateway_pb2.ServerFrame] | None = None

    def write(self, frame: gateway_pb2.ServerFrame) -> None:
        assert self._queue is not None
        self._queue.put_nowait(frame)

    def of(self, kind: str) -> list[Any]:
        return [getattr(f, kind) for f in self.frames if f.WhichOneof("frame") == kind]

    def _ack(self, send: gateway_pb2.Send) -> gateway_pb2.SendAck:
        key = (send.conversation_id, int(send.kind))
        if send.kind in (common_pb2.MESSAGE_KIND_READ, common_pb2.MESSAGE_KIND_DELIVERED):
            current = self.positions.get(key, 0)
            if send.target_conv_seq <= current:
                return gateway_pb2.SendAck(
                    client_id=send.client_id, client_msg_id=send.client_msg_id, conv_seq=current
                )
            self.positions[key] = send.target_conv_seq
        self.conv_seq += 1
        return gateway_pb2.SendAck(
            client_id=send.client_id,
            client_msg_id=send.client_msg_id,
            msg_id=1000 + self.conv_seq,
            seq=self.conv_seq,
            conv_seq=self.conv_seq,
        )

    async def Connect(
        self, request_iterator: AsyncIterator[gateway_pb2.ClientFrame], context: Any
    ) -> AsyncIterator[gateway_pb2.ServerFrame]:
        self.connects += 1
        queue: asyncio.Queue[gateway_pb2.ServerFrame] = asyncio.Queue()
        self._queue = queue
        yield gateway_pb2.ServerFrame(
            welcome=gateway_pb2.Welcome(
                user_id="bob", device_id="b1", connection_id=f"c{self.connects}", send_window=8
            )
        )

        async def read() -> None:
            async for frame in request_iterator:
                self.frames.append(frame)
                if frame.WhichOneof("frame") == "send":
                    queue.put_nowait(gateway_pb2.ServerFrame(send_ack=self._ack(frame.send)))

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await queue.get()
        finally:
            reader.cancel()

    async def Sync(self, request: Any, context: Any) -> gateway_pb2.SyncResponse:
        return gateway_pb2.SyncResponse()


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[RecordingGateway, str]]:
    servicer = RecordingGateway()
    server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(grace=None)


def client(address: str, **kwargs: Any) -> Client:
    return Client(
        address,
        "token-of-bob",
        store=MemoryStore(),
        reconnect=ReconnectPolicy(initial_s=0.01, multiplier=2.0, max_s=0.05),
        insecure=True,
        **kwargs,
    )


async def test_signals_reach_the_iterator_and_the_callback_in_order(
    gateway: tuple[RecordingGateway, str],
) -> None:
    gw, address = gateway
    called: list[object] = []
    async with client(address, on_signal=called.append) as c:
        signals = c.signals()
        gw.write(
            gateway_pb2.ServerFrame(
                typing=gateway_pb2.TypingNotice(
                    conversation_id=CONV,
                    user_id="alice",
                    device_id="a1",
                    typing=True,
                    expires_in_ms=5000,
                )
            )
        )
        gw.write(
            gateway_pb2.ServerFrame(
                presence=gateway_pb2.PresenceUpdate(
                    presences=[
                        gateway_pb2.Presence(
                            user_id="alice",
                            state=gateway_pb2.PRESENCE_STATE_ONLINE,
                            last_seen_ms=5,
                        )
                    ]
                )
            )
        )
        gw.write(
            gateway_pb2.ServerFrame(
                frame_error=gateway_pb2.FrameError(
                    frame="typing", code=gateway_pb2.FRAME_ERROR_CODE_RATE_LIMITED, reason="slow"
                )
            )
        )
        got = [await anext(signals) for _ in range(3)]
        assert got[0] == TypingNotice(CONV, "alice", "a1", True, 5000)
        assert isinstance(got[1], PresenceUpdate)
        assert got[1].presences[0].state == PresenceState.ONLINE and got[1].presences[0].online
        assert got[2] == FrameError("typing", FrameErrorCode.RATE_LIMITED, "slow")
        await wait_until(lambda: len(called) == 3, 5, "the callback to see all three")
        assert called == got
        assert c.typing_users(CONV) == ["alice"]
        assert c.stats.signals == 3 and c.stats.signals_dropped == 0
    # The client closed: the iterator ends.
    with pytest.raises(StopAsyncIteration):
        await anext(signals)


async def test_typing_and_presence_frames_are_written_and_subscriptions_renewed(
    gateway: tuple[RecordingGateway, str],
) -> None:
    gw, address = gateway
    async with client(address) as c:
        assert c.typing(CONV, True)
        c.subscribe_presence(["alice", "carol"])
        c.subscribe_presence(["dave"])
        c.unsubscribe_presence(["carol"])
        await wait_until(lambda: len(gw.of("subscribe_presence")) == 3, 5, "three frames")
        assert [(t.conversation_id, t.typing) for t in gw.of("typing")] == [(CONV, True)]
        subs = [(list(f.user_ids), f.unsubscribe) for f in gw.of("subscribe_presence")]
        assert subs == [(["alice", "carol"], False), (["dave"], False), (["carol"], True)]
        # A new connection gets the subscriptions again, one frame per call
        # made (minus what was unsubscribed), and no stale typing frame.
        gw.frames.clear()
        gw.write(gateway_pb2.ServerFrame(go_away=gateway_pb2.GoAway(reconnect_after_ms=0)))
        await wait_until(
            lambda: gw.connects == 2 and len(gw.of("subscribe_presence")) == 2,
            5,
            "the resubscription",
        )
        subs = [(list(f.user_ids), f.unsubscribe) for f in gw.of("subscribe_presence")]
        assert subs == [(["alice"], False), (["dave"], False)]
        assert gw.of("typing") == []
    with pytest.raises(ValueError):
        client(address).subscribe_presence(["not a user!"])


async def test_events_ride_the_send_path_and_a_no_op_read_is_an_ack(
    gateway: tuple[RecordingGateway, str],
) -> None:
    gw, address = gateway
    async with client(address) as c:
        first = await c.mark_read(CONV, 5)
        again = await c.mark_read(CONV, 3)
        recalled = await c.recall(CONV, 2)
        edited = await c.edit(CONV, 4, "new")
        sends = gw.of("send")
        assert [(s.kind, s.target_conv_seq, s.body) for s in sends] == [
            (common_pb2.MESSAGE_KIND_READ, 5, b""),
            (common_pb2.MESSAGE_KIND_READ, 3, b""),
            (common_pb2.MESSAGE_KIND_RECALL, 2, b""),
            (common_pb2.MESSAGE_KIND_EDIT, 4, b"new"),
        ]
        assert [s.client_id for s in sends] == [1, 2, 3, 4]  # one order with messages
        assert first.stored and not again.stored and again.conv_seq == 5
        assert recalled.stored and edited.stored
        state = c.conversation_state(CONV)
        assert state.read_conv_seq == 5 and state.recalled == {2} and state.edits[4].body == b"new"
        # A plain message still goes out as kind 0, as before kinds existed.
        await c.send(CONV, "hi")
        assert gw.of("send")[-1].kind == 0
        with pytest.raises(ValueError):
            c.submit(CONV, "", kind=MessageKind.EDIT, target_conv_seq=1)
        with pytest.raises(ValueError):
            c.submit(CONV, "body", kind=MessageKind.RECALL, target_conv_seq=1)
        with pytest.raises(ValueError):
            c.submit(CONV, "", kind=MessageKind.READ, target_conv_seq=0)


class _CapRecorder(random.Random):
    """Records the upper bound of every uniform() draw and returns it (no jitter)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.caps: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.caps.append(b)
        return b


async def test_a_go_away_after_a_welcome_resets_the_reconnect_backoff(
    gateway: tuple[RecordingGateway, str],
) -> None:
    """ReconnectPolicy: a connection that got as far as Welcome resets the
    failure count, also when it ends by a GoAway (it did not, so the first
    failure after a GoAway waited as if the failures before the Welcome were
    still going on)."""
    gw, address = gateway
    dead = f"127.0.0.1:{free_port()}"
    rng = _CapRecorder()
    policy = ReconnectPolicy(initial_s=0.01, multiplier=2.0, max_s=1.0)
    # Attempts alternate: dead (fails), live (Welcome), dead (fails), live...
    c = Client(
        [dead, address],
        "token-of-bob",
        store=MemoryStore(),
        reconnect=policy,
        insecure=True,
        rng=rng,
    )
    async with c:
        assert rng.caps == [0.01]  # the first failure
        gw.write(gateway_pb2.ServerFrame(go_away=gateway_pb2.GoAway(reconnect_after_ms=0)))
        await wait_until(lambda: gw.connects == 2, 10, "the reconnect after the GoAway")
    # The GoAway's own jitter (0.05), then the dead gateway's failure: the first
    # of a new run again, not the second.
    assert rng.caps[:3] == [0.01, 0.05, 0.01], rng.caps
