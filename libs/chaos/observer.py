"""Raw observers: devices that follow the downstream protocol and nothing more,
the judges of online delivery (I9).

An observer is one more device of a workload user (device id `obs`), on a gRPC
stream of its own, straight to one gateway (generated stubs, no SDK). It never
sends, never calls Sync, never Pings. It reads frames: every Push is recorded
(first arrival per msg_id) and acknowledged by the rules below; Head, Pong and
anything else is counted and otherwise ignored. Whatever the server forgot to
push, it never gets: nothing it does could make the server push it again except
its ACKs being where they are.

ACKs (`ReceiveState`): the cursor starts at `Welcome.head_seq`; a push at
cursor + 1 advances it over every buffered push that is now contiguous and the
cursor is acknowledged; a push above cursor + 1 is buffered; a push at or below
the cursor is a duplicate: dropped, the cursor acknowledged again.

Seq holes: a user's seqs have gaps by design (a seqsvc restart skips ahead, an
aborted transaction burns a seq), and a client that never syncs cannot tell a
hole from an entry whose push was lost. An observer takes the gap below its
buffered pushes as a hole, and acknowledges past it, once `hole_after_s` (the
liveness bound) has passed since the earliest of them arrived and since every
server fault that touched that time was over. Any entry in the hole was
committed before every buffered one (I1: seq order is commit order), so by then
it had its whole bound. Under a steady stream of faults that moment may not
come, so a hole is skipped after `hole_cap_s` (3x) in any case: a cursor held
back for long would leave the gateway's catch-up (which pushes a bounded number
of entries from the acknowledged cursor) repeating the same ones. Every skip is
recorded, and `online.measure` does not judge a missing pair whose seq the
observer skipped before the pair was due.

Every push is also logged in arrival order, repeats included, with its kind
and body (`push_log()`): the checker's recall rule holds that no push carries a
recalled body after the RECALL entry arrived.

When the stream ends (its gateway was killed or restarted), the window closes
at that moment. By default the observer then connects again, to the next
gateway, as a new window: nothing acked before that Welcome counts for it (it
never syncs, so it would not get it anyway), so a reconnect cannot heal
anything; it only keeps the judge on duty for the faults that follow. After a
Kick it stays offline, as the protocol says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from chaos import checker
from chaos.events import delivered
from chaos.online import DeviceTrack, Receipt, Skip, Window
from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("chaos.observer")

#: The device id of every observer (one per observed user).
OBSERVER_DEVICE = "obs"


class ReceiveState:
    """The ACK rules of one connection, without I/O (see the module docs).
    Times are the caller's clock."""

    def __init__(self, head_seq: int) -> None:
        self.cursor = head_seq
        self.buffer: dict[int, float] = {}  # seq above cursor + 1 -> arrival time
        self.duplicates = 0

    def on_push(self, seq: int, now: float) -> bool:
        """Takes one push; True when the cursor should be acknowledged (it
        advanced, or the push was a duplicate)."""
        if seq <= self.cursor or seq in self.buffer:
            self.duplicates += 1
            return seq <= self.cursor
        if seq != self.cursor + 1:
            self.buffer[seq] = now
            return False
        self.cursor = seq
        self._advance()
        return True

    def _advance(self) -> None:
        while self.cursor + 1 in self.buffer:
            self.cursor += 1
            del self.buffer[self.cursor]

    @property
    def hole_since(self) -> float | None:
        """Arrival of the earliest buffered push: the gap below the buffer has
        been known since then. None when nothing is buffered."""
        return min(self.buffer.values()) if self.buffer else None

    def skip_hole(self) -> tuple[int, int]:
        """Takes the gap below the lowest buffered push as a hole: the cursor
        moves to that push and over every contiguous one after it. Returns the
        hole as (after_seq, upto_seq), both exclusive."""
        low = min(self.buffer)
        after = self.cursor
        self.cursor = low
        del self.buffer[low]
        self._advance()
        return after, low


@dataclass
class ObserverStats:
    connects: int = 0
    pushes: int = 0
    duplicates: int = 0
    acks: int = 0
    heads: int = 0
    holes_skipped: int = 0
    ends: list[str] = field(default_factory=list)  # why each stream ended


class Observer:
    """One raw observer. `start()` waits for the first Welcome; `close()` ends
    it (idempotent). `track()` is its record for `online.measure`."""

    def __init__(
        self,
        user_id: str,
        addresses: Sequence[str],
        token: Callable[[], str],
        *,
        home: int = 0,
        hole_after_s: float = 10.0,
        hole_cap_s: float | None = None,
        settled: Callable[[float], float] | None = None,
        reconnect: bool = True,
        clock: Callable[[], float] = time.monotonic,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.user_id = user_id
        self.device_id = OBSERVER_DEVICE
        self.addresses = list(addresses)
        self.token = token
        self.home = home
        self.hole_after_s = hole_after_s
        self.hole_cap_s = 3 * hole_after_s if hole_cap_s is None else hole_cap_s
        # settled(t): when the server faults that touched [t, now] were over
        # (inf while one is in progress); on `clock`'s time.
        self.settled = settled or (lambda since: since)
        self.reconnect = reconnect
        self.clock = clock
        self.echo = echo or (lambda _line: None)
        self.windows: list[Window] = []
        self.receipts: dict[int, Receipt] = {}
        self.skips: list[Skip] = []
        self.pushes: list[checker.Delivered] = []  # every push, in arrival order
        self.stats = ObserverStats()
        self._open: int | None = None  # index of the open window
        self._welcomed = asyncio.Event()
        self._closing = False
        self.kicked = False
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.user_id}/{self.device_id}"

    @property
    def connected(self) -> bool:
        return self._open is not None

    async def start(self, timeout_s: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run(), name=f"observer-{self.user_id}")
        await asyncio.wait_for(self._welcomed.wait(), timeout_s)

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def track(self) -> DeviceTrack:
        return DeviceTrack(
            self.user_id,
            self.device_id,
            observer=True,
            windows=list(self.windows),
            receipts=dict(self.receipts),
            skips=list(self.skips),
        )

    def push_log(self) -> checker.PushLog:
        return checker.PushLog(self.user_id, self.device_id, list(self.pushes))

    def missing(
        self, acked: Iterable[tuple[int, float]], seqs: Mapping[int, int] | None = None
    ) -> int:
        """Of `acked` (msg_id, ack time) messages of this user's conversations,
        how many acked while the current connection was open have not arrived,
        leaving out those whose seq in the user's timeline (`seqs`, msg_id ->
        seq, as the user's other devices were handed them) is at or below the
        connection's Welcome head: committed before the Welcome, they are the
        connect sync's, which an observer never does (`online.measure` leaves
        them out for the same reason). A seq not known yet counts."""
        if self._open is None:
            return 0
        seqs = seqs or {}
        window = self.windows[self._open]
        return sum(
            1
            for msg_id, at in acked
            if at >= window.start
            and msg_id not in self.receipts
            and seqs.get(msg_id, window.head_seq + 1) > window.head_seq
        )

    # -- the connection ----------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        delay = 0.0
        while not self._closing:
            address = self.addresses[(self.home + attempt) % len(self.addresses)]
            attempt += 1
            welcomed = False
            try:
                welcomed = await self._session(address)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.ends.append(f"{address}: {type(exc).__name__}: {exc}")
            if self._closing or self.kicked or (welcomed and not self.reconnect):
                return
            # Back off only while no gateway answers; a stream that ended after
            # its Welcome reconnects at once (to the next gateway).
            delay = 0.0 if welcomed else min(2.0, max(0.2, delay * 2))
            await asyncio.sleep(delay)

    async def _session(self, address: str) -> bool:
        """One stream, until it ends. Returns whether it got its Welcome."""
        metadata = (("authorization", f"Bearer {self.token()}"),)
        async with grpc.aio.insecure_channel(address) as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Connect(metadata=metadata)
            writing = asyncio.Lock()
            holes: asyncio.Task[None] | None = None
            try:
                first = await asyncio.wait_for(call.read(), 10.0)
                if first is grpc.aio.EOF or first.WhichOneof("frame") != "welcome":
                    raise ConnectionError(f"no Welcome from {address}")
                self.windows.append(Window(self.clock(), head_seq=first.welcome.head_seq))
                self._open = w = len(self.windows) - 1
                self.stats.connects += 1
                self._welcomed.set()
                state = ReceiveState(first.welcome.head_seq)
                holes = asyncio.create_task(self._holes(call, state, w, writing))
                await self._read(call, state, w, writing)
                self.stats.ends.append(f"{address}: stream ended ({await call.code()})")
                return True
            except grpc.aio.AioRpcError as exc:
                self.stats.ends.append(f"{address}: {exc.code().name}")
                return self._open is not None
            finally:
                if self._open is not None:
                    opened = self.windows[self._open]
                    self.windows[self._open] = Window(opened.start, self.clock(), opened.head_seq)
                    self.echo(f"observer {self.name} disconnected from {address}")
                self._open = None
                if holes is not None:
                    holes.cancel()
                    await asyncio.gather(holes, return_exceptions=True)
                call.cancel()

    async def _read(
        self, call: grpc.aio.StreamStreamCall, state: ReceiveState, w: int, writing: asyncio.Lock
    ) -> None:
        while True:
            frame = await call.read()
            if frame is grpc.aio.EOF:
                return
            kind = frame.WhichOneof("frame")
            if kind == "push":
                now = self.clock()
                self.stats.pushes += 1
                msg_id = frame.push.message.msg_id
                self.pushes.append(delivered(frame.push.message, frame.push.seq))
                if msg_id not in self.receipts:
                    self.receipts[msg_id] = Receipt(now, w)
                before = state.duplicates
                if state.on_push(frame.push.seq, now):
                    await self._ack(call, state.cursor, writing)
                self.stats.duplicates += state.duplicates - before
            elif kind == "head":
                self.stats.heads += 1
            elif kind == "kick":
                self.kicked = True  # the protocol: do not reconnect after a Kick
                self.stats.ends.append(f"kick: {frame.kick.reason}")
            elif kind == "go_away":
                self.stats.ends.append(f"go_away: {frame.go_away.reason}")

    async def _holes(
        self, call: grpc.aio.StreamStreamCall, state: ReceiveState, w: int, writing: asyncio.Lock
    ) -> None:
        """Skips a hole when it has waited long enough (see the module docs)."""
        while True:
            await asyncio.sleep(0.25)  # a timer over local state, not a wait on the server
            since = state.hole_since
            if since is None:
                continue
            now = self.clock()
            if now - since >= self.hole_cap_s or now - self.settled(since) >= self.hole_after_s:
                after, upto = state.skip_hole()
                self.skips.append(Skip(w, after, upto, now))
                self.stats.holes_skipped += 1
                await self._ack(call, state.cursor, writing)

    async def _ack(self, call: grpc.aio.StreamStreamCall, seq: int, writing: asyncio.Lock) -> None:
        frame = gateway_pb2.ClientFrame(deliver_ack=gateway_pb2.DeliverAck(seq=seq))
        async with writing:
            with contextlib.suppress(
                grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
            ):
                await call.write(frame)
                self.stats.acks += 1
