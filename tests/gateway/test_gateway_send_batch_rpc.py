"""The gateway sends the concurrent sends of all its connections to logic in one
SendMessages call: fewer calls than sends, every sender gets its own SendAck (or
its own SendError), a logic without SendMessages gets SendMessage calls instead,
and IM_GATEWAY_SEND_BATCH_MAX=1 restores one SendMessage per send.

Batches are made deterministic without timing: the test holds the advisory send
lock of one conversation, so a send into it stays in flight at logic (its
committer waits for the lock); the sends that arrive meanwhile wait at the gateway
(watched through its `im_gateway_sends_waiting` gauge), or with batching off at
logic (`im_logic_send_queued`), and leave once the lock is released. Real
PostgreSQL, seqsvc, NATS, logic and gateway processes; the fallback test uses an
in-process logic stand-in that serves only SendMessage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import psycopg
import pytest
from gwkit import (
    LOGIC_READY,
    NEEDS_LOGIC,
    RawStream,
    direct,
    metric,
    send_frame,
    token_for,
    wait_for,
)
from gwkit import unique_users as users_

from im.gateway.v1 import gateway_pb2
from im.logic.v1 import logic_pb2
from imcommon.server import EXCLUSIVE_PORT
from imdev.servers import NatsServer, ServiceProcess, free_port

pytestmark = pytest.mark.skipif(not LOGIC_READY, reason=NEEDS_LOGIC)

Code = gateway_pb2.SendErrorCode
SEND = "/im.logic.v1.Logic/SendMessage"
SENDS = "/im.logic.v1.Logic/SendMessages"
N = 12


@pytest.fixture
def logic_stack(
    spawn: Callable[..., ServiceProcess], pg_dsn: str, nats_server: NatsServer, key_prefix: str
) -> tuple[ServiceProcess, int]:
    seqsvc = spawn("seqsvc", {"IM_SEQSVC_DATABASE_URL": pg_dsn})
    port = free_port()
    logic = spawn(
        "logic",
        {
            "IM_LOGIC_DATABASE_URL": pg_dsn,
            "IM_LOGIC_SEQSVC_ADDRESS": seqsvc.address,
            "IM_LOGIC_NATS_URL": nats_server.url(),
            "IM_LOGIC_NATS_STREAM": key_prefix,
            "IM_LOGIC_NATS_SUBJECT_PREFIX": key_prefix.lower(),
            "IM_LOGIC_METRICS_PORT": str(port),
            "IM_LOGIC_METRICS_SAMPLE_S": "3600",
        },
    )
    return logic, port


async def m(port: int, name: str, **labels: str) -> float:
    return await asyncio.to_thread(metric, port, name, **labels)


async def calls(port: int, side: str) -> dict[str, float]:
    name = f"im_rpc_{side}_handled_total"
    return {rpc: await m(port, name, method=rpc) for rpc in (SEND, SENDS)}


@asynccontextmanager
async def held_send_lock(dsn: str, conv: str) -> AsyncIterator[None]:
    """Holds `conv`'s advisory send lock (logic's committer waits on it) until the
    block ends."""
    from logic.ids import LOCK_CONV_SEND, lock_key

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        key = (LOCK_CONV_SEND, lock_key(conv))
        await conn.execute("SELECT pg_advisory_lock(%s, %s)", key)
        try:
            yield
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s, %s)", key)


async def open_streams(gateway: str, users: list[str]) -> list[RawStream]:
    streams = [RawStream(gateway, token_for(u, "d1")) for u in users]
    for s in streams:
        await s.welcome()
    return streams


async def close_all(streams: list[RawStream]) -> None:
    await asyncio.gather(*(s.close() for s in streams))


async def one_round(
    dsn: str,
    gateway: str,
    waiting: Callable[[], Any],
    bad_index: int | None = None,
) -> tuple[list[Any], list[str]]:
    """A blocker send held at logic, then one send from each of N connections
    (each to its own direct conversation; `bad_index` sends to an unknown group),
    released once all N wait. Returns each connection's answer and conversation."""
    people = users_(2 * N + 2)
    blocker_user, partner = people[0], people[1]
    senders, partners = people[2 : 2 + N], people[2 + N :]
    convs = [direct(a, b) for a, b in zip(senders, partners, strict=True)]
    if bad_index is not None:
        convs[bad_index] = "g:nosuchgroup0123"
    blocker_conv = direct(blocker_user, partner)
    [blocker] = await open_streams(gateway, [blocker_user])
    streams = await open_streams(gateway, senders)
    try:
        async with held_send_lock(dsn, blocker_conv):
            await blocker.write(send_frame(1, blocker_conv, b"blocker"))
            await wait_for(lambda: waiting(0), timeout=20, what="the blocker in flight")
            for i, s in enumerate(streams):
                await s.write(send_frame(1, convs[i], f"m{i}".encode(), client_msg_id=f"cm{i}"))
            await wait_for(lambda: waiting(N), timeout=20, what=f"{N} sends waiting")
        answers = [await next_answer(s) for s in streams]
        assert (await blocker.next_of("send_ack")).client_id == 1
    finally:
        await close_all([blocker, *streams])
    return answers, convs


async def next_answer(stream: RawStream, timeout: float = 20.0) -> Any:
    """The next SendAck or SendError of the stream."""
    while True:
        frame = await stream.next(timeout)
        kind = frame.WhichOneof("frame")
        if kind in ("send_ack", "send_error"):
            return getattr(frame, kind)


async def test_concurrent_sends_share_calls_and_each_gets_its_own_answer(
    logic_stack: tuple[ServiceProcess, int],
    start_gateway: Callable[..., ServiceProcess],
    pg_dsn: str,
) -> None:
    logic, lport = logic_stack
    gport = free_port()
    gw = start_gateway(IM_GATEWAY_LOGIC_ADDRESS=logic.address, IM_GATEWAY_METRICS_PORT=str(gport))
    lbefore, gbefore = await calls(lport, "server"), await calls(gport, "client")

    async def waiting(n: int) -> bool:
        if n == 0:  # the blocker: logic's committer waits for the lock
            return await _lock_waits(pg_dsn)
        return await m(gport, "im_gateway_sends_waiting") >= n

    answers, _ = await one_round(pg_dsn, gw.address, waiting, bad_index=3)
    # One bad send: only its own connection gets the error, the others their ACKs.
    for i, answer in enumerate(answers):
        if i == 3:
            assert isinstance(answer, gateway_pb2.SendError), answer
            assert answer.code == Code.SEND_ERROR_CODE_NOT_FOUND and not answer.retryable
            assert answer.client_id == 1
        else:
            assert isinstance(answer, gateway_pb2.SendAck), answer
            assert (answer.client_id, answer.client_msg_id) == (1, f"cm{i}")
            assert answer.msg_id > 0 and answer.seq >= 1 and answer.conv_seq == 1
    assert len({a.msg_id for a in answers if isinstance(a, gateway_pb2.SendAck)}) == N - 1
    lafter, gafter = await calls(lport, "server"), await calls(gport, "client")
    sends = {rpc: lafter[rpc] - lbefore[rpc] for rpc in (SEND, SENDS)}
    # The blocker went alone (SendMessage); the N sends waiting behind it left in
    # one SendMessages call.
    assert sends == {SEND: 1, SENDS: 1}, sends
    assert {rpc: gafter[rpc] - gbefore[rpc] for rpc in (SEND, SENDS)} == sends
    assert await m(gport, "im_gateway_send_batch_size_sum") == N + 1


async def _lock_waits(dsn: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        row = await cur.fetchone()
        return row is not None and row[0] >= 1


async def test_batch_max_1_sends_only_send_message(
    logic_stack: tuple[ServiceProcess, int],
    start_gateway: Callable[..., ServiceProcess],
    pg_dsn: str,
) -> None:
    logic, lport = logic_stack
    gport = free_port()
    gw = start_gateway(
        IM_GATEWAY_LOGIC_ADDRESS=logic.address,
        IM_GATEWAY_METRICS_PORT=str(gport),
        IM_GATEWAY_SEND_BATCH_MAX="1",
    )
    before = await calls(lport, "server")

    async def waiting(n: int) -> bool:
        if n == 0:
            return await _lock_waits(pg_dsn)
        # Nothing waits at the gateway: the sends queue at logic's committer.
        return await m(lport, "im_logic_send_queued") >= n

    answers, _ = await one_round(pg_dsn, gw.address, waiting)
    assert all(isinstance(a, gateway_pb2.SendAck) for a in answers), answers
    after = await calls(lport, "server")
    assert {rpc: after[rpc] - before[rpc] for rpc in (SEND, SENDS)} == {SEND: N + 1, SENDS: 0}
    assert await m(gport, "im_gateway_sends_waiting") == 0


async def test_with_linger_sends_leave_behind_a_call_still_in_flight(
    logic_stack: tuple[ServiceProcess, int],
    start_gateway: Callable[..., ServiceProcess],
    pg_dsn: str,
) -> None:
    """IM_GATEWAY_SEND_BATCH_LINGER_MS > 0: the sends waiting behind the blocked
    call leave in one SendMessages while that call is still in flight (they reach
    logic's committer queue with the lock still held)."""
    logic, lport = logic_stack
    gw = start_gateway(
        IM_GATEWAY_LOGIC_ADDRESS=logic.address, IM_GATEWAY_SEND_BATCH_LINGER_MS="300"
    )
    before = await calls(lport, "server")

    async def waiting(n: int) -> bool:
        if n == 0:
            return await _lock_waits(pg_dsn)
        return await m(lport, "im_logic_send_queued") >= n

    answers, _ = await one_round(pg_dsn, gw.address, waiting)
    assert all(isinstance(a, gateway_pb2.SendAck) for a in answers), answers
    after = await calls(lport, "server")
    # The blocker alone; the others in SendMessages calls (one per linger window:
    # how many windows the test's writes span is timing, so only bounded here).
    sends, batches = after[SEND] - before[SEND], after[SENDS] - before[SENDS]
    assert batches >= 1 and sends + batches < N + 1, (sends, batches)


async def test_max_inflight_2_a_second_call_overlaps_the_first(
    logic_stack: tuple[ServiceProcess, int],
    start_gateway: Callable[..., ServiceProcess],
    pg_dsn: str,
) -> None:
    """IM_GATEWAY_SEND_MAX_INFLIGHT=2: with the blocker's call in flight the next
    send leaves at once in a call of its own (it waits in logic's committer queue,
    not in the gateway); the rest wait in the gateway behind the two and leave in
    one SendMessages when a call returns. Every send gets its ACK."""
    logic, lport = logic_stack
    gport = free_port()
    gw = start_gateway(
        IM_GATEWAY_LOGIC_ADDRESS=logic.address,
        IM_GATEWAY_METRICS_PORT=str(gport),
        IM_GATEWAY_SEND_MAX_INFLIGHT="2",
    )
    before = await calls(lport, "server")

    async def waiting(n: int) -> bool:
        if n == 0:
            return await _lock_waits(pg_dsn)
        in_logic = await m(lport, "im_logic_send_queued")
        in_gateway = await m(gport, "im_gateway_sends_waiting")
        return in_logic >= 1 and in_logic + in_gateway >= n

    answers, _ = await one_round(pg_dsn, gw.address, waiting)
    assert all(isinstance(a, gateway_pb2.SendAck) for a in answers), answers
    after = await calls(lport, "server")
    sends, batches = after[SEND] - before[SEND], after[SENDS] - before[SENDS]
    # The blocker, the overlapping call (one send, or a few written in one turn),
    # and the rest together: at most three calls, never one per send.
    assert sends + batches <= 3 and sends >= 1, (sends, batches)


class _OldLogic:
    """A logic stand-in older than SendMessages: it serves only SendMessage, whose
    call for client_msg_id "block" waits until `release` is set."""

    def __init__(self, hang_all: bool = False) -> None:
        self.hang_all = hang_all
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.calls: list[str] = []
        self.server = grpc.aio.server(options=[EXCLUSIVE_PORT])
        handler = grpc.unary_unary_rpc_method_handler(
            self._send,
            request_deserializer=logic_pb2.SendMessageRequest.FromString,
            response_serializer=logic_pb2.SendMessageResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("im.logic.v1.Logic", {"SendMessage": handler}),)
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.server.add_insecure_port(self.address)

    async def _send(self, request: Any, context: Any) -> logic_pb2.SendMessageResponse:
        self.calls.append(request.client_msg_id)
        if request.client_msg_id == "block" or self.hang_all:
            self.blocked.set()
            await self.release.wait()
        n = len(self.calls)
        return logic_pb2.SendMessageResponse(msg_id=1000 + n, seq=n, conv_seq=n)


async def test_a_logic_without_send_messages_gets_send_message_calls(
    start_gateway: Callable[..., ServiceProcess],
) -> None:
    old = _OldLogic()
    await old.server.start()
    try:
        gport = free_port()
        gw = start_gateway(IM_GATEWAY_LOGIC_ADDRESS=old.address, IM_GATEWAY_METRICS_PORT=str(gport))
        people = users_(N + 2)
        streams = await open_streams(gw.address, people[: N + 1])
        try:
            blocker, senders = streams[0], streams[1:]
            await blocker.write(send_frame(1, direct(people[0], people[-1]), client_msg_id="block"))
            await asyncio.wait_for(old.blocked.wait(), 20)
            for i, s in enumerate(senders):
                await s.write(
                    send_frame(1, direct(people[i + 1], people[-1]), client_msg_id=f"cm{i}")
                )

            async def all_waiting() -> bool:
                return await m(gport, "im_gateway_sends_waiting") >= N

            await wait_for(all_waiting, timeout=20, what=f"{N} sends waiting")
            old.release.set()
            acks = [await s.next_of("send_ack", timeout=20) for s in senders]
            assert [a.client_msg_id for a in acks] == [f"cm{i}" for i in range(N)]
            # Each ACK is the answer of that send's own SendMessage call.
            for a in acks:
                assert a.msg_id == 1000 + old.calls.index(a.client_msg_id) + 1
            assert (await blocker.next_of("send_ack")).client_msg_id == "block"
            assert sorted(old.calls) == sorted(["block", *(f"cm{i}" for i in range(N))])
            assert (
                await m(gport, "im_gateway_send_batch_fallbacks_total", reason="unimplemented") == 1
            )
            unimplemented = await m(
                gport, "im_rpc_client_handled_total", method=SENDS, code="UNIMPLEMENTED"
            )
            assert unimplemented == 1
            # From now on the gateway does not ask again (for a while): a second
            # round of concurrent sends goes by SendMessage only.
            old.release.clear()
            old.blocked.clear()
            await blocker.write(send_frame(2, direct(people[0], people[-1]), client_msg_id="block"))
            await asyncio.wait_for(old.blocked.wait(), 20)
            for i, s in enumerate(senders):
                await s.write(
                    send_frame(2, direct(people[i + 1], people[-1]), client_msg_id=f"again{i}")
                )
            await wait_for(all_waiting, timeout=20, what=f"{N} sends waiting again")
            old.release.set()
            again = [await s.next_of("send_ack", timeout=20) for s in senders]
            assert [a.client_id for a in again] == [2] * N
            assert await m(gport, "im_rpc_client_handled_total", method=SENDS) == 1
        finally:
            await close_all(streams)
    finally:
        await old.server.stop(None)


async def test_each_send_keeps_its_deadline(start_gateway: Callable[..., ServiceProcess]) -> None:
    """logic never answers: the send in flight and the sends queued behind it each
    end at their own deadline with a retryable SendError UNAVAILABLE, as a
    timed-out SendMessage did."""
    old = _OldLogic(hang_all=True)
    await old.server.start()
    try:
        gport = free_port()
        gw = start_gateway(
            IM_GATEWAY_LOGIC_ADDRESS=old.address,
            IM_GATEWAY_METRICS_PORT=str(gport),
            IM_GATEWAY_LOGIC_TIMEOUT_S="1",
        )
        people = users_(5)
        streams = await open_streams(gw.address, people[:4])
        try:
            await streams[0].write(send_frame(1, direct(people[0], people[4])))
            await asyncio.wait_for(old.blocked.wait(), 20)
            for i, s in enumerate(streams[1:], start=1):
                await s.write(send_frame(1, direct(people[i], people[4])))
            errors = [await next_answer(s) for s in streams]
            for e in errors:
                assert isinstance(e, gateway_pb2.SendError), e
                assert e.code == Code.SEND_ERROR_CODE_UNAVAILABLE and e.retryable, e
                assert "Deadline Exceeded" in e.reason, e
        finally:
            await close_all(streams)
    finally:
        old.release.set()
        await old.server.stop(None)
