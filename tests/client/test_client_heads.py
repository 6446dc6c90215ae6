"""The SDK's use of timeline heads (Welcome.head_seq, Pong.head_seq, Head frames).

Most tests run the real `Client` against `ScriptedGateway`, an in-process gRPC
gateway whose timeline, frames and Sync answers the test controls, so each race
(a head during a sync, a short first sync, logic down) happens exactly as
written. The last test runs against the real stack.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from e2e.e2e_support import Inbox, uid, wait_until

from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imclient import (
    Client,
    DebugHooks,
    GatewayApi,
    MemoryStore,
    ReconnectPolicy,
    direct_conversation_id,
)
from imcommon.server import EXCLUSIVE_PORT
from imdev.stack import Stack

FAST = ReconnectPolicy(initial_s=0.01, multiplier=2.0, max_s=0.05)


class ScriptedGateway(gateway_pb2_grpc.GatewayServicer):
    """A gateway for one device (bob/b1) whose timeline is a dict in memory.

    - `commit(n)` appends n entries and pushes nothing: what a lost push, a
      dead pusher or a flushed route leaves behind.
    - `write(frame)` writes a server frame to the current stream.
    - `welcome_head` is the Welcome's head_seq (None: the timeline's head);
      Pongs carry the timeline's head if `pong_heads`, else 0 (an old gateway).
    - `sync_hook`, if set, is awaited with each Sync request and its context
      after the answer was read from the timeline (so a held answer is a stale
      one); it may abort the call. `visible` caps what a Sync can see.
    """

    def __init__(self) -> None:
        self.timeline: dict[int, common_pb2.Message] = {}
        self.welcome_head: int | None = None
        self.pong_heads = True
        self.visible: int | None = None
        self.sync_hook: Callable[[gateway_pb2.SyncRequest, Any], Awaitable[None]] | None = None
        self.syncs: list[int] = []  # after_seq of every Sync call
        self.acks: list[int] = []
        self.pings = 0
        self.connects = 0
        self._queue: asyncio.Queue[gateway_pb2.ServerFrame] | None = None

    @property
    def head(self) -> int:
        return max(self.timeline, default=0)

    def commit(self, n: int) -> list[int]:
        seqs = []
        for _ in range(n):
            seq = self.head + 1
            self.timeline[seq] = common_pb2.Message(
                msg_id=1000 + seq,
                conversation_id="d:alice:bob",
                sender_id="alice",
                sender_device_id="a1",
                client_msg_id=f"cm-{seq}",
                conv_seq=seq,
                content_type=common_pb2.CONTENT_TYPE_TEXT,
                body=f"m{seq}".encode(),
            )
            seqs.append(seq)
        return seqs

    def write(self, frame: gateway_pb2.ServerFrame) -> None:
        assert self._queue is not None, "no stream"
        self._queue.put_nowait(frame)

    def push(self, seq: int) -> None:
        self.write(
            gateway_pb2.ServerFrame(push=gateway_pb2.Push(seq=seq, message=self.timeline[seq]))
        )

    def head_frame(self, seq: int) -> None:
        self.write(gateway_pb2.ServerFrame(head=gateway_pb2.Head(seq=seq)))

    async def Connect(
        self, request_iterator: AsyncIterator[gateway_pb2.ClientFrame], context: Any
    ) -> AsyncIterator[gateway_pb2.ServerFrame]:
        self.connects += 1
        queue: asyncio.Queue[gateway_pb2.ServerFrame] = asyncio.Queue()
        self._queue = queue
        head = self.head if self.welcome_head is None else self.welcome_head
        yield gateway_pb2.ServerFrame(
            welcome=gateway_pb2.Welcome(
                user_id="bob",
                device_id="b1",
                connection_id=f"c{self.connects}",
                next_client_id=1,
                max_body_bytes=4096,
                send_window=64,
                head_seq=head,
            )
        )

        async def read() -> None:
            async for frame in request_iterator:
                kind = frame.WhichOneof("frame")
                if kind == "deliver_ack":
                    self.acks.append(frame.deliver_ack.seq)
                elif kind == "ping":
                    self.pings += 1
                    pong = gateway_pb2.Pong(
                        nonce=frame.ping.nonce, head_seq=self.head if self.pong_heads else 0
                    )
                    queue.put_nowait(gateway_pb2.ServerFrame(pong=pong))

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await queue.get()
        finally:
            reader.cancel()

    async def Sync(
        self, request: gateway_pb2.SyncRequest, context: Any
    ) -> gateway_pb2.SyncResponse:
        self.syncs.append(request.after_seq)
        top = self.head if self.visible is None else min(self.head, self.visible)
        seqs = sorted(s for s in self.timeline if request.after_seq < s <= top)
        limit = request.limit or 100
        page = seqs[:limit]
        response = gateway_pb2.SyncResponse(
            entries=[common_pb2.TimelineEntry(seq=s, message=self.timeline[s]) for s in page],
            has_more=len(seqs) > limit,
        )
        if self.sync_hook is not None:
            await self.sync_hook(request, context)
        return response


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[ScriptedGateway, str]]:
    servicer = ScriptedGateway()
    server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(grace=None)


def client(address: str, **kwargs: Any) -> Client:
    kwargs.setdefault("reconnect", FAST)
    kwargs.setdefault("auto_delivered", False)  # this gateway never answers a Send
    return Client(
        address, "token-of-bob", store=MemoryStore(), ack_delay_s=0.0, **kwargs, insecure=True
    )


def handed(inbox: Inbox) -> list[int]:
    return [m.seq for m in inbox.messages]


async def test_a_head_above_local_syncs_once_and_hands_the_missing_entries_once_in_order(
    gateway: tuple[ScriptedGateway, str],
) -> None:
    gw, address = gateway
    gw.commit(2)
    async with client(address) as c:
        inbox = Inbox(c)
        await inbox.wait_for(2, timeout=10)
        assert gw.syncs == [0]
        gw.commit(3)  # 3, 4, 5 committed; their pushes never come
        gw.head_frame(5)
        await inbox.wait_for(5, timeout=10)
        await wait_until(lambda: gw.acks[-1:] == [5], 10, lambda: f"an ACK of 5 ({gw.acks})")
        # The gateway repeats the head until it sees the ACK; a late repeat and
        # an old head change nothing. The in-order push after them is the
        # barrier: once 6 is handed, the heads before it were read.
        gw.head_frame(5)
        gw.head_frame(3)
        gw.commit(1)
        gw.push(6)
        await inbox.wait_for(6, timeout=10)
        assert handed(inbox) == [1, 2, 3, 4, 5, 6]
        assert gw.syncs == [0, 2]  # exactly one sync for the head
        assert c.stats.syncs_by_head == 1 and c.stats.heads == 3
        assert c.head_seq == 5 and gw.connects == 1
        await inbox.close()


async def test_a_head_at_or_below_local_or_zero_does_nothing(
    gateway: tuple[ScriptedGateway, str],
) -> None:
    gw, address = gateway
    gw.commit(3)
    async with client(address) as c:
        inbox = Inbox(c)
        await inbox.wait_for(3, timeout=10)
        for seq in (3, 2, 0):
            gw.head_frame(seq)
        gw.commit(1)
        gw.push(4)
        await inbox.wait_for(4, timeout=10)
        assert gw.syncs == [0]
        assert c.stats.syncs_by_head == 0 and c.stats.heads == 3
        await inbox.close()


async def test_a_head_during_a_sync_is_honoured_after_it(
    gateway: tuple[ScriptedGateway, str],
) -> None:
    gw, address = gateway
    gw.commit(1)
    async with client(address) as c:
        inbox = Inbox(c)
        await inbox.wait_for(1, timeout=10)
        held, release = asyncio.Event(), asyncio.Event()

        async def hold(request: gateway_pb2.SyncRequest, context: Any) -> None:
            if request.after_seq == 1:
                held.set()
                await release.wait()

        gw.sync_hook = hold
        gw.commit(2)
        gw.push(3)  # a gap (2 was not pushed): B syncs from 1
        async with asyncio.timeout(10):
            await held.wait()  # its answer (2, 3) is read; 4..6 commit after
        gw.commit(3)
        gw.head_frame(6)
        await wait_until(lambda: c.stats.heads == 1, 10, "the head to reach the client")
        release.set()
        await inbox.wait_for(6, timeout=10)
        assert handed(inbox) == [1, 2, 3, 4, 5, 6]
        assert gw.syncs == [0, 1, 3]  # the head's sync ran after the held one
        assert c.stats.syncs_by_head == 1 and c.stats.head_misses == 0
        await wait_until(lambda: gw.acks[-1:] == [6], 10, "an ACK of 6")
        await inbox.close()


async def test_a_pong_head_above_local_syncs_and_one_at_local_does_nothing(
    gateway: tuple[ScriptedGateway, str],
) -> None:
    gw, address = gateway
    gw.commit(1)
    async with client(address, ping_interval_s=0.02) as c:
        inbox = Inbox(c)
        await inbox.wait_for(1, timeout=10)
        gw.commit(2)  # not pushed: only the next Pong tells
        await inbox.wait_for(3, timeout=10)
        assert handed(inbox) == [1, 2, 3]
        pongs = c.stats.pongs
        await wait_until(lambda: c.stats.pongs >= pongs + 5, 10, "more pongs")
        assert gw.syncs == [0, 1]  # one sync; the pongs at the head did nothing
        assert c.stats.syncs_by_head == 1 and c.head_seq == 3
        await inbox.close()


async def test_the_welcome_head_makes_the_first_sync_reach_it(
    gateway: tuple[ScriptedGateway, str],
) -> None:
    """The Welcome says head 5; the first Sync answer stops at 3 (a page that
    raced a commit, a lagging read). `start()` returns only once the client
    has everything up to the head."""
    gw, address = gateway
    gw.commit(5)
    gw.visible = 3

    async def unlag(request: gateway_pb2.SyncRequest, context: Any) -> None:
        gw.visible = None

    gw.sync_hook = unlag
    c = client(address)
    await c.start()
    try:
        assert c.last_seq == 5  # ready means caught up to the Welcome's head
        assert gw.syncs == [0, 3]
        assert c.stats.head_misses == 1
        inbox = Inbox(c)
        await inbox.wait_for(5, timeout=10)
        assert handed(inbox) == [1, 2, 3, 4, 5]
        await inbox.close()
    finally:
        await c.close()


async def test_a_failing_head_sync_is_retried_with_backoff_without_reconnecting(
    gateway: tuple[ScriptedGateway, str],
) -> None:
    """Logic is down for 8 Sync calls (more than the 5 after which the client
    used to reconnect): the client keeps retrying on the same stream while the
    head is above its seq, and gets everything once logic answers."""
    gw, address = gateway
    gw.commit(1)
    async with client(address) as c:
        inbox = Inbox(c)
        await inbox.wait_for(1, timeout=10)
        failures = 0

        async def down(request: gateway_pb2.SyncRequest, context: Any) -> None:
            nonlocal failures
            if failures < 8:
                failures += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "logic is down")

        gw.sync_hook = down
        gw.commit(2)
        gw.head_frame(3)
        await inbox.wait_for(3, timeout=20)
        assert handed(inbox) == [1, 2, 3]
        assert failures == 8 and c.stats.sync_failures == 8
        assert gw.syncs == [0] + [1] * 9
        assert gw.connects == 1 and c.stats.connects == 1
        await inbox.close()


async def test_an_old_gateway_without_heads_still_works(
    gateway: tuple[ScriptedGateway, str],
) -> None:
    gw, address = gateway
    gw.commit(2)
    gw.welcome_head = 0
    gw.pong_heads = False
    async with client(address, ping_interval_s=0.02) as c:
        inbox = Inbox(c)
        await inbox.wait_for(2, timeout=10)
        gw.commit(1)
        gw.push(3)
        await inbox.wait_for(3, timeout=10)
        await wait_until(lambda: c.stats.pongs >= 3, 10, "pongs")
        assert gw.syncs == [0] and c.head_seq == 0
        assert handed(inbox) == [1, 2, 3]
        await inbox.close()


async def test_a_send_only_client_acknowledges_a_head_without_syncing(
    gateway: tuple[ScriptedGateway, str],
) -> None:
    gw, address = gateway
    gw.commit(2)
    async with client(address, receive=False):
        gw.commit(2)
        gw.head_frame(4)
        await wait_until(lambda: gw.acks[-1:] == [4], 10, lambda: f"an ACK of 4 ({gw.acks})")
        assert gw.syncs == []


# -- against the real stack ---------------------------------------------------------


async def test_real_stack_a_device_that_loses_every_push_is_healed_by_the_head(
    stack: Stack,
) -> None:
    """Bob's client drops every Push frame (as if the push path were broken);
    the gateway's heads alone must bring him Alice's messages, without a
    reconnect. Skipped on a gateway that does not announce heads yet."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    b_token = stack.mint(bob, "b1")
    async with Client(
        stack.gateway_addresses, stack.mint(alice, "a1"), receive=False, insecure=True
    ) as a:
        await a.send(conv, "before")
        async with GatewayApi(stack.gateway_addresses, b_token, insecure=True) as api:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not await api.sync_all(0):
                assert loop.time() < deadline, "fan-out to bob never happened"
                await asyncio.sleep(0.05)
        hooks = DebugHooks(drop_pushes=1_000_000)
        async with Client(stack.gateway_addresses, b_token, hooks=hooks, insecure=True) as b:
            if b.welcome_head_seq == 0:
                pytest.skip("this gateway does not announce timeline heads")
            inbox = Inbox(b)
            await inbox.wait_for(1, timeout=10)
            for i in range(3):
                await a.send(conv, f"after-{i}")
            await inbox.wait_for(4, timeout=30)
            assert [m.text for m in inbox.messages] == ["before", "after-0", "after-1", "after-2"]
            # Everything came by sync, and the heads started those syncs.
            assert b.stats.pushes == 0
            assert b.stats.syncs_by_head >= 1 and b.stats.connects == 1
            await inbox.close()
