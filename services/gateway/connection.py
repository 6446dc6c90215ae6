"""One client stream: the client_id rule, limits, pushes and control frames.

Three tasks per connection plus the writer (the RPC handler itself):

- the reader takes client frames off the stream. It answers what needs no backend
  at once (duplicates, OUT_OF_ORDER, limits, Pong) and queues accepted sends; it
  records DeliverAcks. It never waits on logic, so a slow send never holds back
  the delivery ACKs behind it.
- the sender processes queued sends ONE AT A TIME in client_id order, and answers
  SendAck only after logic's SendMessage returned OK (the message is committed: I3).
- the ack forwarder sends the latest cumulative DeliverAck to every pusher that
  pushed to this connection (best effort: a lost forward only means a retransmit,
  which the client acknowledges again).
- the writer yields frames from one outbound queue. Pushes that find the queue
  at its limit are refused (the pusher retransmits, the client syncs); replies wait
  for room, which slows down only this connection's reader and sender.

A Kick or GoAway is the last frame of a stream: queued after everything already
queued; if the client does not read it within `close_grace_s`, the stream is
cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from gateway.auth import Identity
from gateway.config import Settings
from gateway.ordering import Accept, ClientIdOrder, OutOfOrder, Pending, Replay
from gateway.ratelimit import TokenBucket
from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2

log = logging.getLogger(__name__)

Code = gateway_pb2.SendErrorCode

MAX_CLIENT_MSG_ID_CHARS = 128
MAX_CONVERSATION_ID_CHARS = 200


class SendRejected(Exception):
    """logic (or the way to it) refused a send; becomes a SendError frame."""

    def __init__(self, code: gateway_pb2.SendErrorCode.ValueType, retryable: bool, reason: str):
        super().__init__(reason)
        self.code = code
        self.retryable = retryable
        self.reason = reason


class SendBackend(Protocol):
    async def send(self, identity: Identity, send: gateway_pb2.Send) -> gateway_pb2.SendAck:
        """Stores the message durably and returns its ACK; raises SendRejected."""
        ...


class AckTarget(Protocol):
    async def ack_delivery(self, address: str, user_id: str, device_id: str, seq: int) -> None:
        """Forwards a cumulative DeliverAck to the pusher at `address`. Best effort."""
        ...


@dataclass(frozen=True, slots=True)
class MalformedFrame:
    """What the stream's lenient deserializer yields for bytes that are not a
    ClientFrame; the connection ends with INVALID_ARGUMENT."""

    error: str


def parse_client_frame(data: bytes) -> gateway_pb2.ClientFrame | MalformedFrame:
    frame = gateway_pb2.ClientFrame()
    try:
        frame.ParseFromString(data)
    except DecodeError as exc:
        return MalformedFrame(str(exc) or "undecodable protobuf")
    return frame


class ConnectionAborted(Exception):
    """The stream must end with this status (e.g. an undecodable frame)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(slots=True)
class _Queued:
    send: gateway_pb2.Send
    epoch: int


class _Close:
    pass


_CLOSE = _Close()

OutboundItem = gateway_pb2.ServerFrame | _Close | ConnectionAborted


class Connection:
    """State of one device stream on this gateway."""

    def __init__(
        self,
        identity: Identity,
        settings: Settings,
        backend: SendBackend,
        acks: AckTarget,
        clock: Callable[[], float] = time.monotonic,
        on_send_result: Callable[[str], None] | None = None,
        on_deliver_ack: Callable[[], None] | None = None,
    ) -> None:
        self.identity = identity
        self.connection_id = uuid.uuid4().hex
        self.settings = settings
        self.order: ClientIdOrder[gateway_pb2.SendAck] = ClientIdOrder(
            max(settings.ack_memory, settings.send_window)
        )
        self._clock = clock
        self._bucket = TokenBucket(settings.send_rate_per_s, settings.send_burst, clock())
        self._backend = backend
        self._acks = acks
        self._on_send_result = on_send_result or (lambda _result: None)
        self._count_deliver_ack = on_deliver_ack or (lambda: None)
        self._limit = settings.outbound_queue
        self._outbound: asyncio.Queue[OutboundItem] = asyncio.Queue()
        self._room = asyncio.Event()
        self._sends: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self._pushers: OrderedDict[str, None] = OrderedDict()
        self._ack_seq = 0
        self._ack_wanted = asyncio.Event()
        self._handler: asyncio.Task[object] | None = None
        self._cancel_timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.done = asyncio.Event()

    @property
    def key(self) -> tuple[str, str]:
        return (self.identity.user_id, self.identity.device_id)

    def log_extra(self) -> dict[str, object]:
        return {
            "user_id": self.identity.user_id,
            "device_id": self.identity.device_id,
            "connection_id": self.connection_id,
        }

    # -- the stream ---------------------------------------------------------

    async def frames(
        self, requests: AsyncIterable[gateway_pb2.ClientFrame | MalformedFrame]
    ) -> AsyncIterator[gateway_pb2.ServerFrame]:
        """The server frames of this stream, Welcome first. Consumes `requests`
        in a task of its own. Raises ConnectionAborted if the stream must end
        with an error status."""
        self._handler = asyncio.current_task()
        tasks = [
            self._spawn(self._read(requests), "reader"),
            self._spawn(self._send_loop(), "sender"),
            self._spawn(self._forward_acks(), "ack-forwarder"),
        ]
        try:
            yield gateway_pb2.ServerFrame(
                welcome=gateway_pb2.Welcome(
                    user_id=self.identity.user_id,
                    device_id=self.identity.device_id,
                    connection_id=self.connection_id,
                    next_client_id=1,
                    max_body_bytes=self.settings.max_body_bytes,
                    send_window=self.settings.send_window,
                    server_time_ms=int(time.time() * 1000),
                )
            )
            while True:
                item = await self._outbound.get()
                if self._outbound.qsize() < self._limit:
                    self._room.set()
                if isinstance(item, _Close):
                    return
                if isinstance(item, ConnectionAborted):
                    raise item
                yield item
        finally:
            self.closing = True
            self._room.set()
            if self._cancel_timer is not None:
                self._cancel_timer.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.done.set()

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.connection_id}")

        def finished(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error(
                    "connection task failed",
                    exc_info=t.exception(),
                    extra={**self.log_extra(), "task": name},
                )
                self._abort(grpc.StatusCode.INTERNAL, "internal error in the gateway; reconnect")

        task.add_done_callback(finished)
        return task

    def _abort(self, code: grpc.StatusCode, details: str) -> None:
        if self.closing:
            return
        self.closing = True
        self._outbound.put_nowait(ConnectionAborted(code, details))
        self._room.set()

    def close(self, final: gateway_pb2.ServerFrame | None = None) -> None:
        """Ends the stream after the frames already queued and `final` (Kick,
        GoAway). Idempotent. Cancels the stream if the client does not read them
        within close_grace_s."""
        if self.closing:
            return
        self.closing = True
        if final is not None:
            self._outbound.put_nowait(final)
        self._outbound.put_nowait(_CLOSE)
        self._room.set()
        loop = asyncio.get_running_loop()
        self._cancel_timer = loop.call_later(self.settings.close_grace_s, self._cancel_handler)

    def kick(self, reason: str) -> None:
        self.close(gateway_pb2.ServerFrame(kick=gateway_pb2.Kick(reason=reason)))

    def go_away(self, reason: str, reconnect_after_ms: int) -> None:
        self.close(
            gateway_pb2.ServerFrame(
                go_away=gateway_pb2.GoAway(reason=reason, reconnect_after_ms=reconnect_after_ms)
            )
        )

    def _cancel_handler(self) -> None:
        if self._handler is not None and not self._handler.done():
            log.info("stream did not end in time; cancelling it", extra=self.log_extra())
            self._handler.cancel()

    async def _reply(self, frame: gateway_pb2.ServerFrame) -> None:
        """Queues a reply, waiting while the outbound queue is at its limit."""
        while not self.closing and self._outbound.qsize() >= self._limit:
            self._room.clear()
            await self._room.wait()
        if not self.closing:
            self._outbound.put_nowait(frame)

    # -- downstream ---------------------------------------------------------

    def push(self, seq: int, message: common_pb2.Message, ack_to: str) -> bool:
        """Queues a Push; False if the stream is closing or its queue is full.
        Remembers `ack_to` as a target of this device's DeliverAcks."""
        if ack_to:
            self._pushers[ack_to] = None
            self._pushers.move_to_end(ack_to)
            while len(self._pushers) > self.settings.max_pushers_per_connection:
                self._pushers.popitem(last=False)
        if self.closing or self._outbound.qsize() >= self._limit:
            return False
        self._outbound.put_nowait(
            gateway_pb2.ServerFrame(push=gateway_pb2.Push(seq=seq, message=message))
        )
        return True

    async def _forward_acks(self) -> None:
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            seq = self._ack_seq
            targets = list(self._pushers)
            if not targets:
                continue
            user, device = self.key
            await asyncio.gather(
                *(self._acks.ack_delivery(a, user, device, seq) for a in targets),
                return_exceptions=True,
            )

    # -- upstream -----------------------------------------------------------

    async def _read(
        self, requests: AsyncIterable[gateway_pb2.ClientFrame | MalformedFrame]
    ) -> None:
        try:
            async for frame in requests:
                if isinstance(frame, MalformedFrame):
                    log.info(
                        "undecodable client frame", extra={**self.log_extra(), "error": frame.error}
                    )
                    self._abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"frame is not a valid im.gateway.v1.ClientFrame ({frame.error}); "
                        "stream closed, reconnect",
                    )
                    return
                if self.closing:
                    continue
                kind = frame.WhichOneof("frame")
                if kind == "send":
                    await self._on_send(frame.send)
                elif kind == "deliver_ack":
                    self._on_deliver_ack(frame.deliver_ack.seq)
                elif kind == "ping":
                    await self._reply(
                        gateway_pb2.ServerFrame(pong=gateway_pb2.Pong(nonce=frame.ping.nonce))
                    )
                # An empty frame (or one a newer client sends) is ignored.
        except grpc.RpcError:
            pass  # the client went away; the handler is ending
        finally:
            self._sends.put_nowait(None)

    def _on_deliver_ack(self, seq: int) -> None:
        # Every ACK is forwarded, repeats included: a repeat answers a retransmit,
        # which means an earlier forward may have been lost.
        if seq <= 0:
            return
        self._count_deliver_ack()
        self._ack_seq = max(self._ack_seq, seq)
        self._ack_wanted.set()

    def _error(
        self,
        send: gateway_pb2.Send,
        code: gateway_pb2.SendErrorCode.ValueType,
        retryable: bool,
        reason: str,
        expected: int = 0,
    ) -> gateway_pb2.ServerFrame:
        return gateway_pb2.ServerFrame(
            send_error=gateway_pb2.SendError(
                client_id=send.client_id,
                client_msg_id=send.client_msg_id,
                code=code,
                retryable=retryable,
                reason=reason,
                expected_client_id=expected,
            )
        )

    def _invalid(self, send: gateway_pb2.Send) -> str | None:
        limit = self.settings.max_body_bytes
        if len(send.body) > limit:
            return f"body is {len(send.body)} bytes; the limit is {limit} (Welcome.max_body_bytes)"
        if not send.body:
            return "body is empty"
        if not send.client_msg_id:
            return "client_msg_id is empty (use a UUID, the same across retransmits)"
        if len(send.client_msg_id) > MAX_CLIENT_MSG_ID_CHARS:
            return f"client_msg_id is longer than {MAX_CLIENT_MSG_ID_CHARS} characters"
        if not send.conversation_id:
            return "conversation_id is empty"
        if len(send.conversation_id) > MAX_CONVERSATION_ID_CHARS:
            return f"conversation_id is longer than {MAX_CONVERSATION_ID_CHARS} characters"
        return None

    async def _on_send(self, send: gateway_pb2.Send) -> None:
        if send.client_id < 1:
            await self._reply(
                self._error(
                    send, Code.SEND_ERROR_CODE_INVALID_ARGUMENT, False, "client_id must be >= 1"
                )
            )
            return
        decision = self.order.classify(send.client_id, send.client_msg_id)
        if isinstance(decision, Replay):
            await self._reply(gateway_pb2.ServerFrame(send_ack=decision.ack))
            return
        if isinstance(decision, Pending):
            return
        if isinstance(decision, OutOfOrder):
            await self._reply(
                self._error(
                    send,
                    Code.SEND_ERROR_CODE_OUT_OF_ORDER,
                    False,
                    decision.reason,
                    expected=decision.expected,
                )
            )
            return
        assert isinstance(decision, Accept)
        problem = self._invalid(send)
        if problem is not None:
            self._on_send_result("invalid")
            await self._reply(
                self._error(send, Code.SEND_ERROR_CODE_INVALID_ARGUMENT, False, problem)
            )
            return
        if self.order.in_flight >= self.settings.send_window:
            self._on_send_result("window_full")
            await self._reply(
                self._error(
                    send,
                    Code.SEND_ERROR_CODE_RATE_LIMITED,
                    True,
                    f"send window of {self.settings.send_window} unanswered sends is full; "
                    "resend after an answer arrives",
                )
            )
            return
        if not self._bucket.take(self._clock()):
            self._on_send_result("rate_limited")
            wait_ms = max(1, int(self._bucket.retry_after() * 1000))
            await self._reply(
                self._error(
                    send,
                    Code.SEND_ERROR_CODE_RATE_LIMITED,
                    True,
                    f"more than {self.settings.send_rate_per_s:g} sends/s (burst "
                    f"{self.settings.send_burst}); retry in about {wait_ms} ms",
                )
            )
            return
        epoch = self.order.accept(send.client_id, send.client_msg_id)
        self._sends.put_nowait(_Queued(send, epoch))

    async def _send_loop(self) -> None:
        while True:
            item = await self._sends.get()
            if item is None:
                break
            send = item.send
            if self.order.is_stale(item.epoch):
                expected = self.order.reset_to
                await self._reply(
                    self._error(
                        send,
                        Code.SEND_ERROR_CODE_OUT_OF_ORDER,
                        False,
                        f"an earlier send (client_id {expected}) was refused; "
                        f"resend from client_id {expected}",
                        expected=expected,
                    )
                )
                continue
            try:
                ack = await self._backend.send(self.identity, send)
            except SendRejected as exc:
                self.order.failed(send.client_id)
                self._on_send_result(gateway_pb2.SendErrorCode.Name(exc.code))
                await self._reply(self._error(send, exc.code, exc.retryable, exc.reason))
                continue
            self.order.completed(send.client_id, send.client_msg_id, ack)
            self._on_send_result("ok")
            await self._reply(gateway_pb2.ServerFrame(send_ack=ack))
        # The client half-closed and every queued send is answered: end the stream.
        with contextlib.suppress(RuntimeError):
            self.close()
