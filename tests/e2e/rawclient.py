"""A device that speaks the bare client protocol and nothing more: the judge of
delivery liveness (I9).

`RawDevice` opens one Gateway.Connect stream with the generated stubs and then only
reads. For every Push it records (seq, msg_id, time received) and answers with a
cumulative DeliverAck of the highest contiguous seq it holds, counting from
Welcome.head_seq (0 for a fresh user). Pushes above a gap are buffered (they count
as received, but the ACK stays below the gap until it is filled); a push of a seq it
already holds is dropped and the current ACK is sent again. It answers no other
frame, and it never calls Sync, never sends a Ping and never reconnects: whatever
the server forgets to push stays missing, instead of being healed by the client as
the SDK would (a gap makes the SDK sync; a reconnect makes it sync).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import grpc

from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc


@dataclass(frozen=True, slots=True)
class Received:
    """One timeline entry as first pushed to the device."""

    seq: int
    msg_id: int
    conversation_id: str
    body: bytes
    #: time.monotonic() when its first Push was read
    at: float
    conv_seq: int = 0
    kind: int = 0  # im.common.v1.MessageKind
    target_conv_seq: int = 0
    recalled: bool = False


@dataclass(frozen=True, slots=True)
class StreamEnd:
    code: grpc.StatusCode
    details: str
    at: float


class RawDevice:
    """One device's Connect stream; use as `async with RawDevice(addr, token) as d`.

    `entries` (distinct timeline entries received, in seq order), `delivered` (the
    cumulative ACK it has sent), `duplicates` (pushes of a seq already held),
    `frame_counts` (server frames by kind) and `end` (set once the stream ended)
    are read by the test at any time."""

    def __init__(self, address: str, token: str, name: str = "device") -> None:
        self.address = address
        self.name = name
        self._token = token
        self._channel: grpc.aio.Channel | None = None
        self._call: (
            grpc.aio.StreamStreamCall[gateway_pb2.ClientFrame, gateway_pb2.ServerFrame] | None
        ) = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.welcome: gateway_pb2.Welcome | None = None
        self._held: dict[int, Received] = {}
        self.delivered = 0
        self.duplicates = 0
        self.acks_sent = 0
        self.frame_counts: Counter[str] = Counter()
        self.end: StreamEnd | None = None
        #: Every Push read, repeats included, in the order read.
        self.pushes: list[Received] = []

    # -- lifecycle ---------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> gateway_pb2.Welcome:
        """Opens the stream and waits for Welcome (raises if another frame or the
        end of the stream comes first); reading then goes on in the background."""
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._call = stub.Connect(metadata=[("authorization", f"Bearer {self._token}")])
        first = await asyncio.wait_for(self._call.read(), timeout)
        if first is grpc.aio.EOF or first.WhichOneof("frame") != "welcome":
            raise AssertionError(f"{self.name}: expected Welcome first, got {first!r}")
        self.frame_counts["welcome"] += 1
        self.welcome = first.welcome
        self.delivered = first.welcome.head_seq
        self._reader = asyncio.create_task(self._read(), name=f"rawdevice-{self.name}")
        return self.welcome

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> RawDevice:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what the device holds ---------------------------------------------------

    @property
    def entries(self) -> list[Received]:
        """Distinct entries received (each seq once, first receipt), in seq order."""
        return [self._held[s] for s in sorted(self._held)]

    @property
    def msg_ids(self) -> list[int]:
        return [e.msg_id for e in self.entries]

    @property
    def ended(self) -> bool:
        return self.end is not None

    def describe(self) -> str:
        """One line for assertion messages."""
        seqs = sorted(self._held)
        return (
            f"{self.name}: {len(seqs)} entries, seqs {seqs[:20]}{'...' if len(seqs) > 20 else ''}"
            f", ACKed up to {self.delivered} (Welcome.head_seq "
            f"{self.welcome.head_seq if self.welcome else '?'}), {self.duplicates} duplicate "
            f"pushes, frames {dict(self.frame_counts)}, stream "
            f"{'ended: ' + self.end.code.name + ' ' + self.end.details if self.end else 'open'}"
        )

    async def wait_for_count(self, count: int, timeout: float) -> bool:
        """Waits until it holds at least `count` entries; False at the deadline or
        when the stream ended first."""
        return await self._wait(lambda: len(self._held) >= count, timeout)

    async def wait_for_msg_ids(self, msg_ids: Collection[int], timeout: float) -> bool:
        """Waits until it holds every one of `msg_ids`; False at the deadline or
        when the stream ended first."""
        want = set(msg_ids)
        return await self._wait(lambda: want <= {e.msg_id for e in self._held.values()}, timeout)

    async def wait_until_ended(self, timeout: float) -> bool:
        return await self._wait(lambda: False, timeout)

    async def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: done() or self.ended), timeout
                )
            except TimeoutError:
                return False
            return done()

    # -- the protocol ------------------------------------------------------------

    async def _read(self) -> None:
        assert self._call is not None
        try:
            while True:
                frame = await self._call.read()
                if frame is grpc.aio.EOF:
                    break
                kind = frame.WhichOneof("frame") or "unknown"
                self.frame_counts[kind] += 1
                if kind == "push":
                    await self._on_push(frame.push)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            code = await self._call.code()
            details = await self._call.details()
            self.end = StreamEnd(code, details or "", time.monotonic())
            async with self._changed:
                self._changed.notify_all()

    async def _on_push(self, push: gateway_pb2.Push) -> None:
        m = push.message
        received = Received(
            seq=push.seq,
            msg_id=m.msg_id,
            conversation_id=m.conversation_id,
            body=m.body,
            at=time.monotonic(),
            conv_seq=m.conv_seq,
            kind=m.kind,
            target_conv_seq=m.target_conv_seq,
            recalled=m.recalled,
        )
        self.pushes.append(received)
        if push.seq <= self.delivered or push.seq in self._held:
            self.duplicates += 1
            await self._ack()
            return
        self._held[push.seq] = received
        before = self.delivered
        while self.delivered + 1 in self._held:
            self.delivered += 1
        if self.delivered > before:
            await self._ack()
        async with self._changed:
            self._changed.notify_all()

    async def _ack(self) -> None:
        assert self._call is not None
        frame = gateway_pb2.ClientFrame(deliver_ack=gateway_pb2.DeliverAck(seq=self.delivered))
        try:
            await self._call.write(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return  # the stream is ending; the reader records how
        self.acks_sent += 1
