"""Raw observers: their ACK rules (`ReceiveState`), and an `Observer` against an
in-process fake gateway that scripts the frames: what it records, what it
acknowledges, how a stream's end closes its window, and that a push delayed
beyond the bound comes out of `online.measure` as `online_late`."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from chaos.observer import OBSERVER_DEVICE, Observer, ReceiveState
from chaos.online import AckedMessage, Window, measure
from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc

# -- the ACK rules ---------------------------------------------------------------


def test_in_order_pushes_advance_the_cursor_and_are_acknowledged() -> None:
    s = ReceiveState(head_seq=5)
    assert s.on_push(6, 0.0) and s.cursor == 6
    assert s.on_push(7, 0.0) and s.cursor == 7
    assert s.hole_since is None


def test_an_out_of_order_push_waits_for_the_gap_to_fill() -> None:
    s = ReceiveState(head_seq=0)
    assert not s.on_push(2, 1.0)
    assert not s.on_push(4, 2.0)
    assert s.cursor == 0 and s.hole_since == 1.0
    assert s.on_push(1, 3.0) and s.cursor == 2  # 1 and the buffered 2
    assert s.hole_since == 2.0  # 3 is still missing below 4
    assert s.on_push(3, 4.0) and s.cursor == 4
    assert s.buffer == {}


def test_duplicates_are_dropped_and_at_or_below_the_cursor_acknowledged_again() -> None:
    s = ReceiveState(head_seq=3)
    assert s.on_push(3, 0.0)  # at the cursor: a retransmit, ACK again
    assert not s.on_push(5, 0.0)
    assert not s.on_push(5, 0.0)  # buffered already: no ACK to give
    assert s.duplicates == 2 and s.cursor == 3


def test_skipping_a_hole_moves_over_the_contiguous_pushes_above_it() -> None:
    s = ReceiveState(head_seq=10)
    for seq in (10_012, 10_013, 10_020):
        s.on_push(seq, 5.0)
    assert s.skip_hole() == (10, 10_012)
    assert s.cursor == 10_013
    assert s.skip_hole() == (10_013, 10_020)
    assert s.cursor == 10_020 and s.hole_since is None


# -- an Observer against a fake gateway -----------------------------------------------


def push(seq: int, msg_id: int) -> gateway_pb2.ServerFrame:
    return gateway_pb2.ServerFrame(
        push=gateway_pb2.Push(
            seq=seq, message=common_pb2.Message(msg_id=msg_id, conversation_id="d:bob:eve")
        )
    )


Script = Callable[[Callable[[gateway_pb2.ServerFrame], None]], Coroutine[Any, Any, None]]


@dataclass
class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Answers each Connect with Welcome{head_seq}, then runs the next script
    (which emits frames), then keeps the stream open until `end_stream` is set
    (the stream then ends, as when a gateway goes away)."""

    head_seq: int = 0
    scripts: list[Script] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    connects: int = 0
    end_stream: asyncio.Event = field(default_factory=asyncio.Event)

    async def Connect(
        self, request_iterator: AsyncIterator[gateway_pb2.ClientFrame], context: object
    ) -> AsyncIterator[gateway_pb2.ServerFrame]:
        self.connects += 1
        self.tokens.append(dict(context.invocation_metadata())["authorization"])  # type: ignore[attr-defined]
        out: asyncio.Queue[gateway_pb2.ServerFrame] = asyncio.Queue()

        async def read() -> None:
            async for frame in request_iterator:
                assert frame.WhichOneof("frame") == "deliver_ack", frame
                self.acks.append(frame.deliver_ack.seq)

        reader = asyncio.create_task(read())
        yield gateway_pb2.ServerFrame(
            welcome=gateway_pb2.Welcome(user_id="bob", device_id="obs", head_seq=self.head_seq)
        )
        script = self.scripts.pop(0) if self.scripts else None
        runner = asyncio.create_task(script(out.put_nowait)) if script else None
        ended = asyncio.create_task(self.end_stream.wait())
        try:
            while True:
                getter = asyncio.create_task(out.get())
                done, _ = await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                self.end_stream.clear()
                return
        finally:
            for task in (reader, ended, *([runner] if runner else [])):
                task.cancel()


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeGateway, str]]:
    gw = FakeGateway()  # type: ignore[abstract]  # only Connect is served
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(gw, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield gw, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_an_observer_records_pushes_and_acknowledges_the_contiguous_prefix(
    fake: tuple[FakeGateway, str],
) -> None:
    gw, address = fake
    gw.head_seq = 5

    async def script(emit: Callable[[gateway_pb2.ServerFrame], None]) -> None:
        for frame in (push(7, 107), push(6, 106), push(6, 106), push(9, 109)):
            emit(frame)

    gw.scripts.append(script)
    obs = Observer("bob", [address], lambda: "tok-bob", hole_after_s=60.0)
    await obs.start()
    try:
        await until(lambda: len(obs.receipts) == 3 and obs.stats.duplicates == 1)
        await until(lambda: gw.acks[-1:] == [7])  # 6 then the buffered 7; 9 waits for 8
        assert obs.device_id == OBSERVER_DEVICE
        assert gw.tokens == ["Bearer tok-bob"]
        assert set(obs.receipts) == {106, 107, 109}
        assert {r.window for r in obs.receipts.values()} == {0}
        assert obs.connected and obs.windows[0].end is None
    finally:
        await obs.close()


async def test_an_old_hole_is_skipped_and_acknowledged_past(
    fake: tuple[FakeGateway, str],
) -> None:
    gw, address = fake

    async def script(emit: Callable[[gateway_pb2.ServerFrame], None]) -> None:
        emit(push(1, 101))
        emit(push(10_001, 102))  # a seqsvc restart skipped ahead

    gw.scripts.append(script)
    obs = Observer("bob", [address], lambda: "t", hole_after_s=0.3)
    await obs.start()
    try:
        await until(lambda: gw.acks[-1:] == [10_001])
        assert [(s.after_seq, s.upto_seq) for s in obs.skips] == [(1, 10_001)]
        assert obs.stats.holes_skipped == 1
    finally:
        await obs.close()


async def test_a_hole_waits_while_a_server_fault_is_in_progress(
    fake: tuple[FakeGateway, str],
) -> None:
    gw, address = fake
    fault_over = False

    async def script(emit: Callable[[gateway_pb2.ServerFrame], None]) -> None:
        emit(push(2, 102))

    gw.scripts.append(script)
    obs = Observer(
        "bob",
        [address],
        lambda: "t",
        hole_after_s=0.2,
        hole_cap_s=30.0,
        settled=lambda since: math.inf if not fault_over else since,
    )
    await obs.start()
    try:
        await until(lambda: 102 in obs.receipts)
        await asyncio.sleep(0.6)  # three times the wait, with a fault "in progress"
        assert gw.acks == [] and obs.skips == []
        fault_over = True
        await until(lambda: gw.acks == [2])
    finally:
        await obs.close()


async def test_a_stream_end_closes_the_window_and_a_new_one_counts_apart(
    fake: tuple[FakeGateway, str],
) -> None:
    gw, address = fake

    async def first(emit: Callable[[gateway_pb2.ServerFrame], None]) -> None:
        emit(push(1, 101))

    async def second(emit: Callable[[gateway_pb2.ServerFrame], None]) -> None:
        emit(push(3, 103))

    gw.scripts += [first, second]
    obs = Observer("bob", [address], lambda: "t", hole_after_s=60.0)
    await obs.start()
    try:
        await until(lambda: 101 in obs.receipts)
        gw.end_stream.set()  # the gateway goes away
        await until(lambda: gw.connects == 2 and 103 in obs.receipts)
        assert len(obs.windows) == 2
        assert obs.windows[0].end is not None and obs.windows[1].end is None
        assert obs.receipts[101].window == 0 and obs.receipts[103].window == 1
        # A message acked in the first window and delivered only in the second
        # is not an online delivery of either.
        t1 = obs.windows[1].start
        report = measure(
            [AckedMessage(103, "d:bob:eve", obs.windows[0].start)],
            {"d:bob:eve": {"bob", "eve"}},
            [obs.track()],
            [],
            t1 + 1,
            10.0,
        )
        assert report.pairs == 0
    finally:
        await obs.close()


async def test_an_observer_that_stays_down_does_not_reconnect(
    fake: tuple[FakeGateway, str],
) -> None:
    gw, address = fake
    obs = Observer("bob", [address], lambda: "t", reconnect=False)
    await obs.start()
    try:
        gw.end_stream.set()
        await until(lambda: not obs.connected)
        await asyncio.sleep(0.3)  # time in which a reconnect would have happened
        assert gw.connects == 1 and obs.windows[0].end is not None
    finally:
        await obs.close()


async def test_a_push_delayed_beyond_the_bound_is_reported_late(
    fake: tuple[FakeGateway, str],
) -> None:
    """The metric end to end: one push comes at once, the other one 0.6 s later
    (artificially: the fake gateway holds it) with a bound of 0.3 s."""
    gw, address = fake

    async def script(emit: Callable[[gateway_pb2.ServerFrame], None]) -> None:
        emit(push(1, 101))
        await asyncio.sleep(0.6)  # the delay under test, not a synchronisation
        emit(push(2, 102))

    gw.scripts.append(script)
    obs = Observer("bob", [address], lambda: "t", hole_after_s=60.0)
    await obs.start()
    try:
        acked = obs.windows[0].start + 0.001
        await until(lambda: 102 in obs.receipts)
        report = measure(
            [AckedMessage(101, "d:bob:eve", acked), AckedMessage(102, "d:bob:eve", acked)],
            {"d:bob:eve": {"bob", "eve"}},
            [obs.track()],
            [],
            time.monotonic(),
            0.3,
        )
    finally:
        await obs.close()
    assert report.pairs == 2 and report.observer_pairs == 2
    assert [p.msg_id for p in report.late] == [102]
    assert report.late[0].delay_s >= 0.5
    assert report.online_late == 1 and report.max_delay_s == report.late[0].delay_s


def test_windows_are_closed_intervals() -> None:
    w = Window(1.0, 2.0)
    assert w.holds(1.0) and w.holds(2.0) and not w.holds(2.1)
    assert Window(1.0).holds(1e9)


async def test_missing_leaves_out_what_the_welcome_head_covers(
    fake: tuple[FakeGateway, str],
) -> None:
    # Messages 101-103 were acked after the Welcome (head 5) but 101 is seq 5 of
    # bob's timeline: committed before the Welcome, it is the connect sync's, and
    # the quiesce must not wait for a push that never comes. 102 (seq 6) is the
    # server's to push; 103's seq is not known yet (no SDK device has it): it
    # counts until it is.
    gw, address = fake
    gw.head_seq = 5
    obs = Observer("bob", [address], lambda: "t", hole_after_s=60.0)
    await obs.start()
    try:
        after = obs.windows[0].start + 0.001
        acked = [(101, after), (102, after), (103, after)]
        assert obs.windows[0].head_seq == 5
        assert obs.missing(acked, {101: 5, 102: 6}) == 2
        assert obs.missing(acked, {101: 5, 102: 6, 103: 5}) == 1
    finally:
        await obs.close()
