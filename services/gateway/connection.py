"""One client stream: the client_id rule, limits, pushes and control frames.

An idle connection costs one coroutine: the RPC handler itself, waiting in
`context.read()`. Everything else starts when there is work and ends when the
work is done, so ten thousand idle devices hold no tasks, queues or events of
their own (docs/benchmarks.md, "Idle connections"):

- the handler reads client frames. It answers what needs no backend at once
  (duplicates, OUT_OF_ORDER, limits, Pong) and queues accepted sends; it records
  DeliverAcks. It never waits on logic, so a slow send never holds back the
  delivery ACKs behind it.
- the sender (started by the first queued send, ending when none is left)
  processes sends ONE AT A TIME in client_id order, and answers SendAck only after
  logic's SendMessage returned OK (the message is committed: I3). At most one
  sender exists per connection.
- the ack forwarder (started by a DeliverAck, ending when no newer one is
  waiting) sends the latest cumulative DeliverAck to every pusher that pushed to
  this connection (best effort: a lost forward only means a retransmit, which the
  client acknowledges again).
- Typing and SubscribePresence frames are handed to their components
  (gateway.typing_relay, gateway.presence) through `on_typing` /
  `on_subscribe_presence`, which check and rate-limit them at once and do
  anything that waits (logic, Redis, other gateways) in tasks of their own. Their
  answers (FrameError) and the ephemeral frames for this device (TypingNotice,
  PresenceUpdate) are queued with `signal()`: never waiting for room, dropped when
  the queue is at its limit, so they never hold back a send, a push or an ACK.
- the writer (started when a frame is queued, ending when the queue is empty) is
  the only one writing to the stream after the Welcome, in queue order. Pushes
  that find the queue at its limit are refused (the pusher retransmits, the
  client syncs); replies wait for room, which slows down only this connection's
  reader and sender.

A Kick or GoAway is the last frame of a stream: queued after everything already
queued; once the writer has written it, the handler's pending read is cancelled
and the stream ends with OK. If the client does not read it within
`close_grace_s`, the stream is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

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

#: Kinds of Send that carry a body (the others are events with an empty one).
BODY_KINDS = frozenset(
    {
        common_pb2.MESSAGE_KIND_UNSPECIFIED,
        common_pb2.MESSAGE_KIND_MESSAGE,
        common_pb2.MESSAGE_KIND_EDIT,
    }
)

_UNAVAILABLE = gateway_pb2.FrameErrorCode.FRAME_ERROR_CODE_UNAVAILABLE

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


class StreamContext(Protocol):
    """The part of grpc.aio.ServicerContext a connection uses."""

    async def read(self) -> Any: ...

    async def write(self, message: Any) -> None: ...


class Connection:
    """State of one device stream on this gateway.

    Slots, and every container, task and event created only when first needed:
    this object is what each idle connection costs in Python."""

    __slots__ = (
        "_ack_seq",
        "_ack_wanted",
        "_acks",
        "_backend",
        "_bucket",
        "_cancel_timer",
        "_catching_up",
        "_clock",
        "_context",
        "_count_deliver_ack",
        "_done",
        "_done_flag",
        "_end",
        "_ending",
        "_eof_wait",
        "_finished",
        "_forwarder",
        "_handler",
        "_head_floor",
        "_on_ping",
        "_on_send_result",
        "_on_subscribe_presence",
        "_on_typing",
        "_order",
        "_outbound",
        "_pending_head",
        "_pushed_seq",
        "_pushers",
        "_read_done",
        "_room",
        "_sender",
        "_sends",
        "_started",
        "_writer",
        "closing",
        "connection_id",
        "forwarder_runs",
        "identity",
        "presence_state",
        "sender_runs",
        "settings",
        "store_epoch",
        "typing_state",
        "writer_runs",
    )

    def __init__(
        self,
        identity: Identity,
        settings: Settings,
        backend: SendBackend,
        acks: AckTarget,
        clock: Callable[[], float] = time.monotonic,
        on_send_result: Callable[[str], None] | None = None,
        on_deliver_ack: Callable[[], None] | None = None,
        on_ping: Callable[[Connection, int], None] | None = None,
        on_typing: Callable[[Connection, gateway_pb2.Typing], None] | None = None,
        on_subscribe_presence: (
            Callable[[Connection, gateway_pb2.SubscribePresence], None] | None
        ) = None,
    ) -> None:
        self.identity = identity
        self.connection_id = uuid.uuid4().hex
        self.settings = settings
        self.closing = False
        #: The store epoch for the Welcome (set before run(); "" = unknown).
        self.store_epoch = ""
        #: How often each on-demand task was started (tests and debugging).
        self.writer_runs = 0
        self.sender_runs = 0
        self.forwarder_runs = 0
        self._clock = clock
        self._backend = backend
        self._acks = acks
        self._on_send_result = on_send_result or _ignore_result
        self._count_deliver_ack = on_deliver_ack or _nothing
        #: Answers a Ping with the timeline head (None: a Pong at once, head 0).
        self._on_ping = on_ping
        #: Non-blocking hand-offs of Typing / SubscribePresence frames (None: not
        #: served here; such a frame gets FrameError UNAVAILABLE).
        self._on_typing = on_typing
        self._on_subscribe_presence = on_subscribe_presence
        #: Per-connection state owned by gateway.typing_relay / gateway.presence
        #: (None until the connection's first such frame).
        self.typing_state: Any = None
        self.presence_state: Any = None
        # Liveness (gateway.heads): the user's timeline head when the stream opened
        # (-1: unknown yet), the head a check found unacknowledged (0: none), the
        # highest seq queued as a Push, and whether a catch-up is running.
        self._head_floor = -1
        self._pending_head = 0
        self._pushed_seq = 0
        self._catching_up = False  # Created on first use (None until then).
        self._order: ClientIdOrder[gateway_pb2.SendAck] | None = None
        self._bucket: TokenBucket | None = None
        self._outbound: deque[OutboundItem] | None = None
        self._room: asyncio.Event | None = None
        self._sends: deque[_Queued] | None = None
        self._pushers: dict[str, None] | None = None
        self._ack_seq = 0
        self._ack_wanted = False
        self._context: StreamContext | None = None
        self._handler: asyncio.Task[Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._forwarder: asyncio.Task[None] | None = None
        #: The Welcome is written: the writer may run.
        self._started = False
        #: The client half-closed (or went away, or sent garbage): no more reads.
        self._read_done = False
        #: The handler's pending read is being cancelled by us, to end the stream.
        self._ending = False
        #: How the stream ends once the writer reached the end of the queue:
        #: None = OK, else the error status.
        self._end: ConnectionAborted | None = None
        self._finished = False
        self._eof_wait: asyncio.Future[None] | None = None
        self._cancel_timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Event | None = None
        self._done_flag = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.identity.user_id, self.identity.device_id)

    @property
    def order(self) -> ClientIdOrder[gateway_pb2.SendAck]:
        """The client_id state machine, made on the first Send."""
        if self._order is None:
            self._order = ClientIdOrder(max(self.settings.ack_memory, self.settings.send_window))
        return self._order

    @property
    def done(self) -> asyncio.Event:
        """Set once the stream has ended and its tasks are gone."""
        if self._done is None:
            self._done = asyncio.Event()
            if self._done_flag:
                self._done.set()
        return self._done

    def running_tasks(self) -> list[str]:
        """Names of this connection's on-demand tasks that are running now
        (empty for an idle connection)."""
        tasks = (
            ("writer", self._writer),
            ("sender", self._sender),
            ("ack-forwarder", self._forwarder),
        )
        return [name for name, task in tasks if task is not None and not task.done()]

    def log_extra(self) -> dict[str, object]:
        return {
            "user_id": self.identity.user_id,
            "device_id": self.identity.device_id,
            "connection_id": self.connection_id,
        }

    # -- the stream ---------------------------------------------------------

    def _welcome(self) -> gateway_pb2.ServerFrame:
        return gateway_pb2.ServerFrame(
            welcome=gateway_pb2.Welcome(
                user_id=self.identity.user_id,
                device_id=self.identity.device_id,
                connection_id=self.connection_id,
                next_client_id=1,
                max_body_bytes=self.settings.max_body_bytes,
                send_window=self.settings.send_window,
                server_time_ms=int(time.time() * 1000),
                head_seq=max(self._head_floor, 0),
                store_epoch=self.store_epoch,
            )
        )

    async def run(self, context: StreamContext) -> None:
        """Serves the stream until it ends: writes the Welcome, then reads client
        frames in this task. Returns when the stream ends with OK; raises
        ConnectionAborted if it must end with an error status."""
        self._handler = asyncio.current_task()
        self._context = context
        try:
            try:
                await context.write(self._welcome())
                self._started = True
                if self._outbound:
                    self._start_writer()
                await self._read(context)
                if not self._finished:
                    # Half-closed: wait until the answers to every queued send are
                    # written and the writer reached the end of the queue.
                    self._eof_wait = asyncio.get_running_loop().create_future()
                    await self._eof_wait
            except asyncio.CancelledError:
                if not self._ending:
                    raise  # cancelled by gRPC (client gone, server stopping) or close_grace_s
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            if self._end is not None:
                raise self._end
        finally:
            self.closing = True
            if self._room is not None:
                self._room.set()
            if self._cancel_timer is not None:
                self._cancel_timer.cancel()
            tasks = [t for t in (self._writer, self._sender, self._forwarder) if t is not None]
            try:
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                self._done_flag = True
                if self._done is not None:
                    self._done.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.connection_id}")
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "connection task failed",
                exc_info=task.exception(),
                extra={**self.log_extra(), "task": task.get_name().partition("-")[0]},
            )
            self._abort(grpc.StatusCode.INTERNAL, "internal error in the gateway; reconnect")

    def _queue(self, item: OutboundItem) -> None:
        """Appends to the outbound queue and makes sure a writer drains it."""
        if self._outbound is None:
            self._outbound = deque()
        self._outbound.append(item)
        if self._writer is None and self._started:
            self._start_writer()

    def _queued(self) -> int:
        return len(self._outbound) if self._outbound is not None else 0

    def _start_writer(self) -> None:
        self.writer_runs += 1
        self._writer = self._spawn(self._write_loop(), "writer")

    async def _write_loop(self) -> None:
        """Writes queued frames in order until the queue is empty (then ends), or
        until it reaches the end of the stream (then ends the handler)."""
        out = self._outbound
        context = self._context
        assert out is not None and context is not None
        try:
            while out:
                item = out.popleft()
                if self._room is not None and len(out) < self.settings.outbound_queue:
                    self._room.set()
                if isinstance(item, _Close):
                    self._finish(None)
                    return
                if isinstance(item, ConnectionAborted):
                    self._finish(item)
                    return
                try:
                    await context.write(item)
                except Exception as exc:
                    # The RPC is over (client gone, cancelled): nothing more can be
                    # written; end the handler too if it is still waiting.
                    log.info("stream write failed", extra={**self.log_extra(), "error": repr(exc)})
                    self.closing = True
                    out.clear()
                    if self._handler is not None and not self._handler.done():
                        self._handler.cancel()
                    return
        finally:
            self._writer = None

    def _finish(self, end: ConnectionAborted | None) -> None:
        """Everything queued is written: end the stream (OK, or `end`'s status)."""
        if self._finished:
            return
        self._finished = True
        self._end = end
        if self._eof_wait is not None:
            if not self._eof_wait.done():
                self._eof_wait.set_result(None)
        elif self._handler is not None and not self._handler.done():
            self._ending = True
            self._handler.cancel()

    def _abort(self, code: grpc.StatusCode, details: str) -> None:
        if self.closing:
            return
        self.closing = True
        self._queue(ConnectionAborted(code, details))
        if self._room is not None:
            self._room.set()

    def close(self, final: gateway_pb2.ServerFrame | None = None) -> None:
        """Ends the stream after the frames already queued and `final` (Kick,
        GoAway). Idempotent. Cancels the stream if the client does not read them
        within close_grace_s."""
        if self.closing:
            return
        self.closing = True
        if final is not None:
            self._queue(final)
        self._queue(_CLOSE)
        if self._room is not None:
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
        while not self.closing and self._queued() >= self.settings.outbound_queue:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()
        if not self.closing:
            self._queue(frame)

    # -- downstream ---------------------------------------------------------

    def push(self, seq: int, message: common_pb2.Message, ack_to: str) -> bool:
        """Queues a Push; False if the stream is closing or its queue is full.
        Remembers `ack_to` as a target of this device's DeliverAcks."""
        if ack_to:
            pushers = self._pushers
            if pushers is None:
                pushers = self._pushers = {}
            pushers.pop(ack_to, None)
            pushers[ack_to] = None  # most recent last
            while len(pushers) > self.settings.max_pushers_per_connection:
                del pushers[next(iter(pushers))]
        if self.closing or self._queued() >= self.settings.outbound_queue:
            return False
        self._queue(gateway_pb2.ServerFrame(push=gateway_pb2.Push(seq=seq, message=message)))
        if seq > self._pushed_seq:
            self._pushed_seq = seq
        return True

    # -- liveness (driven by gateway.heads) -------------------------------------

    def start_cursor(self, head: int) -> None:
        """Sets the timeline head the stream opened with (before run(): it goes out
        in the Welcome). Entries at or below it are the client's own sync on
        connect; the gateway answers for every entry above it."""
        self._head_floor = head

    @property
    def cursor_known(self) -> bool:
        return self._head_floor >= 0

    @property
    def delivered(self) -> int:
        """The stream's delivered cursor: the head it opened with, or the client's
        cumulative DeliverAck, whichever is higher."""
        return max(self._head_floor, self._ack_seq)

    @property
    def pushed_seq(self) -> int:
        """The highest seq queued to this stream as a Push."""
        return self._pushed_seq

    @property
    def pending_head(self) -> int:
        """The head an earlier check found above `delivered` (0: none)."""
        return self._pending_head

    @pending_head.setter
    def pending_head(self, head: int) -> None:
        self._pending_head = head

    @property
    def catching_up(self) -> bool:
        return self._catching_up

    @catching_up.setter
    def catching_up(self, value: bool) -> None:
        self._catching_up = value

    def write_head(self, seq: int) -> bool:
        """Queues a Head frame (the client syncs if its local seq is below `seq`);
        False if the stream is closing or its queue is full (a later check repeats it)."""
        if self.closing or self._queued() >= self.settings.outbound_queue:
            return False
        self._queue(gateway_pb2.ServerFrame(head=gateway_pb2.Head(seq=seq)))
        return True

    def write_pong(self, nonce: int, head: int) -> bool:
        """Queues the answer to a Ping (head 0: unknown); False (dropped) if the
        stream is closing or its queue is at its limit. Never waits (the Pong
        comes from the heads lookup, not the handler), so a client that keeps
        pinging without reading cannot grow the queue past its limit; one that
        reads gets its Pong."""
        if self.closing or self._queued() >= self.settings.outbound_queue:
            return False
        self._queue(gateway_pb2.ServerFrame(pong=gateway_pb2.Pong(nonce=nonce, head_seq=head)))
        return True

    def signal(self, frame: gateway_pb2.ServerFrame) -> bool:
        """Queues an ephemeral frame (TypingNotice, PresenceUpdate, FrameError)
        without waiting; False (dropped) if the stream is closing or its queue is
        at its limit: such frames are best effort and must never wait for room."""
        if self.closing or self._queued() >= self.settings.outbound_queue:
            return False
        self._queue(frame)
        return True

    def frame_error(
        self, frame: str, code: gateway_pb2.FrameErrorCode.ValueType, reason: str
    ) -> bool:
        """Answers a refused Typing or SubscribePresence frame (see signal())."""
        return self.signal(
            gateway_pb2.ServerFrame(
                frame_error=gateway_pb2.FrameError(frame=frame, code=code, reason=reason)
            )
        )

    async def push_entry(self, seq: int, message: common_pb2.Message) -> bool:
        """Queues a Push that the gateway itself found missing (a catch-up), waiting
        while the outbound queue is at its limit. False once the stream is closing."""
        await self._reply(gateway_pb2.ServerFrame(push=gateway_pb2.Push(seq=seq, message=message)))
        if self.closing:
            return False
        if seq > self._pushed_seq:
            self._pushed_seq = seq
        return True

    async def _forward_acks(self) -> None:
        try:
            while self._ack_wanted:
                self._ack_wanted = False
                targets = list(self._pushers or ())
                if not targets:
                    continue
                seq = self._ack_seq
                user, device = self.key
                await asyncio.gather(
                    *(self._acks.ack_delivery(a, user, device, seq) for a in targets),
                    return_exceptions=True,
                )
        finally:
            self._forwarder = None

    # -- upstream -----------------------------------------------------------

    async def _read(self, context: StreamContext) -> None:
        """Reads client frames until the client half-closes or goes away, or
        sends garbage (then the stream ends INVALID_ARGUMENT)."""
        try:
            while True:
                frame = await context.read()
                if frame is grpc.aio.EOF:
                    break
                if isinstance(frame, MalformedFrame):
                    log.info(
                        "undecodable client frame", extra={**self.log_extra(), "error": frame.error}
                    )
                    self._abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"frame is not a valid im.gateway.v1.ClientFrame ({frame.error}); "
                        "stream closed, reconnect",
                    )
                    break
                if self.closing:
                    continue
                kind = frame.WhichOneof("frame")
                if kind == "send":
                    await self._on_send(frame.send)
                elif kind == "deliver_ack":
                    self._on_deliver_ack(frame.deliver_ack.seq)
                elif kind == "ping":
                    if self._on_ping is not None:
                        # The Pong follows once the head is read (never blocks reads).
                        self._on_ping(self, frame.ping.nonce)
                    else:
                        await self._reply(
                            gateway_pb2.ServerFrame(pong=gateway_pb2.Pong(nonce=frame.ping.nonce))
                        )
                elif kind == "typing":
                    if self._on_typing is not None:
                        self._on_typing(self, frame.typing)
                    else:
                        self.frame_error("typing", _UNAVAILABLE, "typing is not served here")
                elif kind == "subscribe_presence":
                    if self._on_subscribe_presence is not None:
                        self._on_subscribe_presence(self, frame.subscribe_presence)
                    else:
                        self.frame_error(
                            "subscribe_presence", _UNAVAILABLE, "presence is not served here"
                        )
                # An empty frame (or one a newer client sends) is ignored.
        except grpc.RpcError:
            pass  # the client went away; the handler is ending
        self._read_done = True
        if self._sender is None:
            # No send in progress: nothing more will be answered. (Otherwise the
            # sender closes once it has answered every queued send.)
            self.close()

    def _on_deliver_ack(self, seq: int) -> None:
        # Every ACK is forwarded, repeats included: a repeat answers a retransmit,
        # which means an earlier forward may have been lost.
        if seq <= 0:
            return
        self._count_deliver_ack()
        if seq > self._ack_seq:
            self._ack_seq = seq
        if not self._pushers:
            return  # no pusher to tell (as before: an ACK without a target is dropped)
        self._ack_wanted = True
        if self._forwarder is None:
            self.forwarder_runs += 1
            self._forwarder = self._spawn(self._forward_acks(), "ack-forwarder")

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
        if send.kind not in common_pb2.MessageKind.values():
            return f"kind {send.kind} is not an im.common.v1.MessageKind value"
        if send.kind in BODY_KINDS:
            if not send.body:
                return "body is empty"
        elif send.body:
            return f"a {common_pb2.MessageKind.Name(send.kind)} has no body; send it empty"
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
        if self._bucket is None:
            # Made on the first accepted send: it starts full, as it would have
            # been had it been made at connect time.
            self._bucket = TokenBucket(
                self.settings.send_rate_per_s, self.settings.send_burst, self._clock()
            )
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
        if self._sends is None:
            self._sends = deque()
        self._sends.append(_Queued(send, epoch))
        if self._sender is None:
            self.sender_runs += 1
            self._sender = self._spawn(self._send_loop(), "sender")

    async def _send_loop(self) -> None:
        sends = self._sends
        assert sends is not None
        try:
            await self._process_sends(sends)
        finally:
            self._sender = None
        if self._read_done:
            # The client half-closed and every queued send is answered: end the stream.
            self.close()

    async def _process_sends(self, sends: deque[_Queued]) -> None:
        while sends:
            item = sends.popleft()
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


def _ignore_result(_result: str) -> None:
    pass


def _nothing() -> None:
    pass
