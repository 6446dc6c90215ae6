"""The gateway's calls to other processes: logic (sends), pushers (delivery ACKs)
and other gateways (kicks, typing signals).

Internal calls are plaintext gRPC on the cluster network, where NetworkPolicies
decide who may reach whom, or TLS (mutual with a client certificate) when the
gateway's TLS_CA_FILE is set (see imcommon.telemetry.internal_channel).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.auth import Identity
from gateway.connection import SendRejected
from im.gateway.v1 import gateway_internal_pb2, gateway_internal_pb2_grpc, gateway_pb2
from im.logic.v1 import logic_pb2, logic_pb2_grpc
from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
from imcommon.metrics import Metrics
from imcommon.status import status_from_number
from imcommon.telemetry import internal_channel, traceparent_of
from imcommon.tls import ChannelTLS

log = logging.getLogger(__name__)

Code = gateway_pb2.SendErrorCode

#: How a status from logic becomes a SendError: (code, retryable). The one place
#: this mapping lives. Retryable means "resend the same frame later": safe for any
#: failure, because logic deduplicates on (sender, client_msg_id).
_SEND_ERRORS: dict[grpc.StatusCode, tuple[gateway_pb2.SendErrorCode.ValueType, bool]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (Code.SEND_ERROR_CODE_INVALID_ARGUMENT, False),
    grpc.StatusCode.OUT_OF_RANGE: (Code.SEND_ERROR_CODE_INVALID_ARGUMENT, False),
    grpc.StatusCode.PERMISSION_DENIED: (Code.SEND_ERROR_CODE_PERMISSION_DENIED, False),
    grpc.StatusCode.NOT_FOUND: (Code.SEND_ERROR_CODE_NOT_FOUND, False),
    grpc.StatusCode.FAILED_PRECONDITION: (Code.SEND_ERROR_CODE_INVALID_ARGUMENT, False),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (Code.SEND_ERROR_CODE_RATE_LIMITED, True),
    grpc.StatusCode.UNAVAILABLE: (Code.SEND_ERROR_CODE_UNAVAILABLE, True),
    grpc.StatusCode.DEADLINE_EXCEEDED: (Code.SEND_ERROR_CODE_UNAVAILABLE, True),
    grpc.StatusCode.CANCELLED: (Code.SEND_ERROR_CODE_UNAVAILABLE, True),
    grpc.StatusCode.ABORTED: (Code.SEND_ERROR_CODE_UNAVAILABLE, True),
}


def send_error_for(code: grpc.StatusCode) -> tuple[gateway_pb2.SendErrorCode.ValueType, bool]:
    """(SendErrorCode, retryable) for a status code returned by logic. Anything
    unexpected is INTERNAL and retryable: the send was not stored, and resending it
    cannot store it twice."""
    return _SEND_ERRORS.get(code, (Code.SEND_ERROR_CODE_INTERNAL, True))


#: Body bytes per SendMessages call, far under logic's 4 MiB receive limit; a
#: batch is cut before it would exceed this (a send with a bigger body goes alone).
SEND_BATCH_BYTES = 1024 * 1024

#: Items per call to logic, for the batch size histogram.
SEND_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)


class _Failed(Exception):
    """One attempt at logic failed with this status (what SendMessage's AioRpcError
    said, or a SendMessages item's error)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _Queued:
    """One send waiting for (or in) a call to logic."""

    __slots__ = ("ctx", "future", "request", "size")

    def __init__(
        self,
        request: logic_pb2.SendMessageRequest,
        ctx: otel_context.Context,
        future: asyncio.Future[logic_pb2.SendMessageResponse],
    ) -> None:
        self.request = request
        self.ctx = ctx
        self.future = future
        self.size = len(request.body) + 256


class LogicClient:
    """Sends through logic, retrying while logic is UNAVAILABLE.

    With `batch_max` 1 every send is one SendMessage call in its caller's task (the
    behaviour before batching). Otherwise concurrent sends of ALL connections are
    queued and leave together: when no call to logic is in flight, what was queued
    in the same event-loop turn goes at once (a lone send is not delayed); so does
    it while fewer than `max_inflight` calls are in flight. Otherwise sends wait
    until a call returns, or at most `linger_s` when that is above 0 (then more
    calls overlap). A batch holds up to `batch_max` sends and
    SEND_BATCH_BYTES of bodies (more pending -> several calls at once); a batch of
    one is a plain SendMessage in the sender's trace, a bigger one is one
    SendMessages call whose items carry their senders' traceparents. Each send gets
    its own result, exactly what SendMessage would have answered, and keeps its own
    deadline (`timeout_s` per attempt, waiting in the queue included).

    Order: a connection sends one message at a time (Connection awaits each send
    before the next, I5 / client_id order), so a batch never holds two sends of
    one connection and batching cannot reorder a connection's sends. Keep it so:
    a caller that issued two sends at once would have them stored in any order.

    A logic without SendMessages (UNIMPLEMENTED, an older logic during a rolling
    deploy) gets one SendMessage per send for LEGACY_RECHECK_S, then is asked
    again; a SendMessages refused as a whole with INVALID_ARGUMENT (e.g. more items
    than that logic accepts) is resent as one SendMessage per send, so one bad send
    never fails the others.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        timeout_s: float,
        retry_s: float,
        metrics: Metrics | None = None,
        batch_max: int = 1,
        linger_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        max_inflight: int = 1,
    ) -> None:
        self.stub = logic_pb2_grpc.LogicStub(channel)
        #: The store epoch logic last reported (GetHeads, SyncMessages); "" until
        #: one answered. Every logic serves one database, so one value.
        self.store_epoch = ""
        #: Called with (old, new) when logic reports another epoch than before.
        self.on_store_epoch_change: Callable[[str, str], None] | None = None
        self._tracer = trace.get_tracer("im.gateway")
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.max_inflight = max_inflight
        self._clock = clock
        self._pending: list[_Queued] = []
        self._inflight = 0
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._legacy_until = 0.0
        metrics = metrics or Metrics("gateway")
        self._batch_size = metrics.histogram(
            "gateway_send_batch_size",
            "Sends per call to logic (a SendMessage call counts as 1)",
            buckets=SEND_BATCH_BUCKETS,
        )
        metrics.gauge(
            "gateway_sends_waiting",
            "Sends queued for the next call to logic (behind the call in flight)",
        ).set_function(lambda: len(self._pending))
        self._fallbacks = metrics.counter(
            "gateway_send_batch_fallbacks",
            "SendMessages calls resent as one SendMessage per send: unimplemented (an older "
            "logic), invalid_argument (refused as a whole)",
            ["reason"],
        )

    def note_store_epoch(self, epoch: str) -> None:
        """Records the store epoch of a logic answer ("" is ignored: an older logic)."""
        if epoch and epoch != self.store_epoch:
            old, self.store_epoch = self.store_epoch, epoch
            if old:
                log.warning(
                    "logic reports another store epoch: the message database was replaced",
                    extra={"old": old, "new": epoch},
                )
                if self.on_store_epoch_change is not None:
                    self.on_store_epoch_change(old, epoch)

    async def send(self, identity: Identity, send: gateway_pb2.Send) -> gateway_pb2.SendAck:
        """Stores the message as `identity` (never a user named by the client).

        Returns only once logic answered OK, i.e. the message, the sender's
        timeline row and the outbox row are committed. Raises SendRejected.
        """
        request = logic_pb2.SendMessageRequest(
            sender_id=identity.user_id,
            sender_device_id=identity.device_id,
            client_msg_id=send.client_msg_id,
            conversation_id=send.conversation_id,
            content_type=send.content_type,
            body=send.body,
            kind=send.kind,
            target_conv_seq=send.target_conv_seq,
        )
        give_up_at = time.monotonic() + self.retry_s
        delay = 0.05
        # One span per send (streams get no span of their own; imcommon.telemetry).
        with self._tracer.start_as_current_span(
            "gateway.Send",
            kind=SpanKind.SERVER,
            attributes={
                "im.user_id": identity.user_id,
                "im.device_id": identity.device_id,
                "im.client_id": send.client_id,
                "im.client_msg_id": send.client_msg_id,
                "im.conversation_id": send.conversation_id,
            },
        ) as span:
            while True:
                try:
                    resp = await self._attempt(request)
                    span.set_attributes(
                        {
                            "im.msg_id": resp.msg_id,
                            "im.seq": resp.seq,
                            "im.conv_seq": resp.conv_seq,
                            "im.duplicate": resp.duplicate,
                        }
                    )
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "send stored",
                            extra={
                                "msg_id": resp.msg_id,
                                "user_id": identity.user_id,
                                "device_id": identity.device_id,
                                "conversation_id": send.conversation_id,
                                "client_id": send.client_id,
                            },
                        )
                    break
                except _Failed as exc:
                    status = exc.code
                    if (
                        status == grpc.StatusCode.UNAVAILABLE
                        and time.monotonic() + delay < give_up_at
                    ):
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 1.0)
                        continue
                    code, retryable = send_error_for(status)
                    reason = exc.details or status.name
                    if code == Code.SEND_ERROR_CODE_UNAVAILABLE:
                        reason = f"message store unavailable ({reason}); resend the same frame"
                    span.set_status(Status(StatusCode.ERROR, status.name))
                    raise SendRejected(code, retryable, reason) from None
        return gateway_pb2.SendAck(
            client_id=send.client_id,
            client_msg_id=send.client_msg_id,
            msg_id=resp.msg_id,
            seq=resp.seq,
            conv_seq=resp.conv_seq,
            server_time_ms=resp.server_time_ms,
            duplicate=resp.duplicate,
        )

    async def _attempt(
        self, request: logic_pb2.SendMessageRequest
    ) -> logic_pb2.SendMessageResponse:
        """One attempt, at most timeout_s; raises _Failed."""
        if self.batch_max == 1:
            self._batch_size.observe(1)
            try:
                return await self.stub.SendMessage(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise _Failed(exc.code(), exc.details() or "") from None
        loop = asyncio.get_running_loop()
        item = _Queued(request, otel_context.get_current(), loop.create_future())
        self._pending.append(item)
        if self._inflight < self.max_inflight:
            self._flush_soon(loop)
        elif self.linger_s > 0 and self._flush_handle is None:
            self._flush_handle = loop.call_later(
                self.linger_s, self._flush, context=contextvars.Context()
            )
        try:
            # On timeout or cancellation wait_for cancels the future: a batch not yet
            # sent skips it, a batch in flight ignores its result.
            return await asyncio.wait_for(item.future, self.timeout_s)
        except TimeoutError:
            raise _Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sends what is pending at the end of this event-loop turn, in a context of
        its own (the calls must not join the trace of whoever scheduled them)."""
        handle = self._flush_handle
        if handle is not None:
            if not isinstance(handle, asyncio.TimerHandle):
                return  # already due this turn
            handle.cancel()  # a linger timer: now is sooner
        self._flush_handle = loop.call_soon(self._flush, context=contextvars.Context())

    def _flush(self) -> None:
        self._flush_handle = None
        pending = [item for item in self._pending if not item.future.done()]
        self._pending = []
        batch: list[_Queued] = []
        size = 0
        for item in pending:
            if batch and (len(batch) >= self.batch_max or size + item.size > SEND_BATCH_BYTES):
                self._start(batch)
                batch, size = [], 0
            batch.append(item)
            size += item.size
        if batch:
            self._start(batch)

    def _start(self, batch: list[_Queued]) -> None:
        self._inflight += 1
        task = asyncio.ensure_future(self._call(batch))
        self._tasks.add(task)
        task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if self._pending:
            self._flush_soon(asyncio.get_running_loop())

    def _is_legacy(self) -> bool:
        return self._legacy_until > 0 and self._clock() < self._legacy_until

    async def _call(self, batch: list[_Queued]) -> None:
        """One call to logic for `batch`; resolves every item's future. Never raises
        (but can be cancelled)."""
        if len(batch) == 1 or self._is_legacy():
            await self._singly(batch)
            return
        self._batch_size.observe(len(batch))
        traceparents = []
        for item in batch:
            span_context = trace.get_current_span(item.ctx).get_span_context()
            traceparents.append(traceparent_of(span_context) if span_context.is_valid else "")
        request = logic_pb2.SendMessagesRequest(
            items=[item.request for item in batch],
            traceparents=traceparents if any(traceparents) else (),
        )
        try:
            resp = await self.stub.SendMessages(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT):
                reason = code.name.lower()
                self._fallbacks.labels(reason).inc()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    self._legacy_until = self._clock() + LEGACY_RECHECK_S
                    log.info(
                        "logic has no SendMessages: one SendMessage per send for a while",
                        extra={"recheck_s": LEGACY_RECHECK_S},
                    )
                else:
                    log.warning(
                        "SendMessages refused as a whole: resending one SendMessage per send",
                        extra={"items": len(batch), "details": exc.details()},
                    )
                await self._singly(batch)
                return
            _fail(batch, code, exc.details() or "")
            return
        except Exception:  # e.g. the channel closed under the call (shutdown)
            log.exception("SendMessages failed", extra={"items": len(batch)})
            _fail(batch, grpc.StatusCode.CANCELLED, "the call to logic failed")
            return
        if len(resp.results) != len(batch):
            log.error(
                "SendMessages answered the wrong number of results",
                extra={"items": len(batch), "results": len(resp.results)},
            )
            _fail(batch, grpc.StatusCode.INTERNAL, "logic answered a malformed batch")
            return
        for item, result in zip(batch, resp.results, strict=True):
            if item.future.done():
                continue
            if result.error_code:
                status = status_from_number(result.error_code)
                item.future.set_exception(_Failed(status, result.error_message))
            else:
                item.future.set_result(result.response)

    async def _singly(self, batch: list[_Queued]) -> None:
        await asyncio.gather(*(self._single(item) for item in batch))

    async def _single(self, item: _Queued) -> None:
        """One SendMessage in the trace of the send it carries."""
        if item.future.done():
            return
        self._batch_size.observe(1)
        token = otel_context.attach(item.ctx)
        try:
            call = self.stub.SendMessage(item.request, timeout=self.timeout_s)
        finally:
            otel_context.detach(token)
        try:
            resp = await call
        except grpc.aio.AioRpcError as exc:
            if not item.future.done():
                item.future.set_exception(_Failed(exc.code(), exc.details() or ""))
        except Exception:
            log.exception("SendMessage failed")
            _fail([item], grpc.StatusCode.CANCELLED, "the call to logic failed")
        else:
            if not item.future.done():
                item.future.set_result(resp)


def _fail(batch: list[_Queued], code: grpc.StatusCode, details: str) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(_Failed(code, details))


#: Items per AckDeliveries call, for the batch size histogram.
ACK_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)

#: How long a pusher address that answered AckDeliveries with UNIMPLEMENTED (a
#: pusher older than that RPC, during a rolling deploy) gets one AckDelivery per ACK
#: before it is asked again: by then the address may belong to a newer pusher.
LEGACY_RECHECK_S = 60.0

_MAX_LEGACY = 256


class _PusherQueue:
    """The ACKs waiting for one pusher and the state of its one call in flight."""

    __slots__ = ("pending", "task", "timer")

    def __init__(self) -> None:
        #: (user_id, device_id) -> highest seq, in order of first arrival.
        self.pending: dict[tuple[str, str], int] = {}
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None


class AckForwarder:
    """Forwards devices' cumulative delivery ACKs to the pushers that pushed to
    them. Best effort throughout: a lost ACK costs one retransmit, which the
    device ACKs again.

    With `batch_s` 0, every ACK is one AckDelivery call, sent at once. Otherwise
    ACKs wait per pusher address and leave as one AckDeliveries call `batch_s`
    after the first of them arrived, at once when `batch_max` devices wait, or at
    close(). While waiting, ACKs of one device coalesce to the highest seq (they are
    cumulative, so that one says everything the others said). Each address has at
    most one call in flight and its own queue: a slow or failing pusher delays and
    loses only its own ACKs. A queue holds at most `queue_max` devices; beyond that
    the oldest waiting ACK is dropped (counted). A pusher that answers UNIMPLEMENTED
    (older than AckDeliveries) gets one AckDelivery per ACK for LEGACY_RECHECK_S.
    No task runs while nothing is queued.
    """

    def __init__(
        self,
        channel: Callable[[str], grpc.aio.Channel],
        metrics: Metrics,
        timeout_s: float,
        batch_s: float = 0.0,
        batch_max: int = 500,
        queue_max: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = channel
        self._timeout_s = timeout_s
        self.batch_s = batch_s
        self._queue_max = queue_max
        self._batch_max = min(batch_max, queue_max)
        self._clock = clock
        self._queues: dict[str, _PusherQueue] = {}
        self._legacy: OrderedDict[str, float] = OrderedDict()
        self._closing = False
        forwards = metrics.counter(
            "gateway_ack_forwards",
            "Delivery ACKs forwarded to pushers (one per device per call), by RPC and result "
            "(ok, failed, rejected by the pusher)",
            ["rpc", "result"],
        )
        self._single_ok = forwards.labels("AckDelivery", "ok")
        self._single_failed = forwards.labels("AckDelivery", "failed")
        self._batched_ok = forwards.labels("AckDeliveries", "ok")
        self._batched_failed = forwards.labels("AckDeliveries", "failed")
        self._batched_rejected = forwards.labels("AckDeliveries", "rejected")
        self._batches = metrics.counter(
            "gateway_ack_batches",
            "AckDeliveries calls to pushers, by result (ok, failed, unimplemented: the "
            "pusher is older and gets AckDelivery calls instead)",
            ["result"],
        )
        self._batch_size = metrics.histogram(
            "gateway_ack_batch_size", "Devices per AckDeliveries call", buckets=ACK_BATCH_BUCKETS
        )
        self._coalesced = metrics.counter(
            "gateway_acks_coalesced",
            "Delivery ACKs merged into a waiting ACK of the same device (highest seq kept)",
        )
        self._dropped = metrics.counter(
            "gateway_acks_dropped",
            "Delivery ACKs never sent: queue_full (a pusher's queue at IM_GATEWAY_ACK_QUEUE_MAX), "
            "shutdown (not flushed in time, or arriving after the flush)",
            ["reason"],
        )
        self._queued = metrics.gauge(
            "gateway_acks_queued", "Delivery ACKs waiting to be sent to pushers"
        )

    # -- one ACK, one call ---------------------------------------------------

    async def ack_now(self, address: str, user_id: str, device_id: str, seq: int) -> None:
        """One AckDelivery call (the unbatched path). Never raises."""
        stub = pusher_pb2_grpc.PusherStub(self._channel(address))
        try:
            await stub.AckDelivery(
                pusher_pb2.AckDeliveryRequest(user_id=user_id, device_id=device_id, seq=seq),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            self._single_failed.inc()
            log.debug(
                "AckDelivery failed",
                extra={"pusher": address, "user_id": user_id, "code": exc.code().name},
            )
        else:
            self._single_ok.inc()

    # -- batching -------------------------------------------------------------

    def add(self, address: str, user_id: str, device_id: str, seq: int) -> None:
        """Queues one cumulative ACK for the pusher at `address`; returns at once.
        Must be called on the event loop."""
        if self._closing:
            self._dropped.labels("shutdown").inc()
            return
        q = self._queues.get(address)
        if q is None:
            q = self._queues[address] = _PusherQueue()
        pending = q.pending
        key = (user_id, device_id)
        waiting = pending.get(key)
        if waiting is not None:
            # Its batch is already scheduled (timer or the call in flight).
            self._coalesced.inc()
            if seq > waiting:
                pending[key] = seq
            return
        if len(pending) >= self._queue_max:
            del pending[next(iter(pending))]
            self._dropped.labels("queue_full").inc()
            self._queued.dec()
        pending[key] = seq
        self._queued.inc()
        if q.task is not None:
            return  # the call in flight sends or schedules the rest when it ends
        if len(pending) >= self._batch_max:
            self._start(address, q)
        elif q.timer is None:
            q.timer = asyncio.get_running_loop().call_later(self.batch_s, self._start, address, q)

    def _start(self, address: str, q: _PusherQueue) -> None:
        if q.timer is not None:
            q.timer.cancel()
            q.timer = None
        if q.task is None and q.pending:
            q.task = asyncio.ensure_future(self._drain(address, q))

    async def _drain(self, address: str, q: _PusherQueue) -> None:
        cancelled = False
        try:
            while q.pending:
                pending = q.pending
                if len(pending) <= self._batch_max:
                    batch = list(pending.items())
                    pending.clear()
                else:
                    batch = list(itertools.islice(pending.items(), self._batch_max))
                    for key, _ in batch:
                        del pending[key]
                self._queued.dec(len(batch))
                await self._send(address, batch)
                if not self._closing and len(q.pending) < self._batch_max:
                    break  # the rest waits for its window
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            q.task = None
            if cancelled:
                pass
            elif q.pending:
                if self._closing:
                    self._start(address, q)
                elif q.timer is None:
                    q.timer = asyncio.get_running_loop().call_later(
                        self.batch_s, self._start, address, q
                    )
            elif q.timer is None and self._queues.get(address) is q:
                del self._queues[address]  # idle: forget the address

    def _is_legacy(self, address: str) -> bool:
        until = self._legacy.get(address)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._legacy[address]
        return False

    async def _send(self, address: str, batch: list[tuple[tuple[str, str], int]]) -> None:
        """One batch to one pusher. Never raises (but can be cancelled)."""
        if self._is_legacy(address):
            await self._send_singly(address, batch)
            return
        self._batch_size.observe(len(batch))
        request = pusher_pb2.AckDeliveriesRequest(
            acks=[
                pusher_pb2.AckDeliveryRequest(user_id=user, device_id=device, seq=seq)
                for (user, device), seq in batch
            ]
        )
        stub = pusher_pb2_grpc.PusherStub(self._channel(address))
        try:
            resp = await stub.AckDeliveries(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._batches.labels("unimplemented").inc()
                log.info(
                    "pusher has no AckDeliveries: one AckDelivery per ACK for a while",
                    extra={"pusher": address, "recheck_s": LEGACY_RECHECK_S},
                )
                self._legacy[address] = self._clock() + LEGACY_RECHECK_S
                self._legacy.move_to_end(address)
                while len(self._legacy) > _MAX_LEGACY:
                    self._legacy.popitem(last=False)
                await self._send_singly(address, batch)
                return
            self._batches.labels("failed").inc()
            self._batched_failed.inc(len(batch))
            level = logging.WARNING if code == grpc.StatusCode.INVALID_ARGUMENT else logging.DEBUG
            log.log(
                level,
                "AckDeliveries failed",
                extra={
                    "pusher": address,
                    "items": len(batch),
                    "code": code.name,
                    "details": exc.details(),
                },
            )
            return
        except Exception:  # e.g. a channel closed under the call: still best effort
            self._batches.labels("failed").inc()
            self._batched_failed.inc(len(batch))
            log.exception("AckDeliveries failed", extra={"pusher": address, "items": len(batch)})
            return
        self._batches.labels("ok").inc()
        self._batched_ok.inc(len(batch) - resp.rejected)
        if resp.rejected:
            self._batched_rejected.inc(resp.rejected)

    async def _send_singly(self, address: str, batch: list[tuple[tuple[str, str], int]]) -> None:
        await asyncio.gather(
            *(self.ack_now(address, user, device, seq) for (user, device), seq in batch),
            return_exceptions=True,
        )

    async def close(self, deadline_s: float = 1.0) -> None:
        """Sends everything queued (at most `deadline_s`; the rest is dropped and
        counted), then refuses new ACKs (dropped, counted). Idempotent."""
        if self._closing:
            return
        self._closing = True
        for address, q in list(self._queues.items()):
            self._start(address, q)
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=deadline_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        left = sum(len(q.pending) for q in self._queues.values())
        for q in self._queues.values():
            if q.timer is not None:
                q.timer.cancel()
            q.pending.clear()
        self._queues.clear()
        if left:
            self._dropped.labels("shutdown").inc(left)
            self._queued.dec(left)
            log.warning("delivery ACKs not flushed at shutdown", extra={"dropped": left})


class Peers:
    """Channels to pushers and other gateways, cached per address (LRU), and the
    delivery ACKs on their way to pushers (AckForwarder)."""

    def __init__(
        self,
        metrics: Metrics,
        timeout_s: float,
        max_channels: int = 256,
        ack_batch_s: float = 0.0,
        ack_batch_max: int = 500,
        ack_queue_max: int = 10_000,
        tls: ChannelTLS | None = None,
    ) -> None:
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._max = max_channels
        self._tls = tls
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Future[None]] = set()
        self.acks = AckForwarder(
            self._channel, metrics, timeout_s, ack_batch_s, ack_batch_max, ack_queue_max
        )

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = internal_channel(address, self._metrics, tls=self._tls)
            self._channels[address] = channel
            while len(self._channels) > self._max:
                _, old = self._channels.popitem(last=False)
                closing = asyncio.ensure_future(old.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        self._channels.move_to_end(address)
        return channel

    async def ack_delivery(self, address: str, user_id: str, device_id: str, seq: int) -> None:
        """Forwards a device's cumulative delivery ACK to the pusher at `address`.
        Best effort: a lost ACK costs a retransmit, which the client ACKs again.
        With batching on (IM_GATEWAY_ACK_BATCH_MS > 0) it only queues the ACK and
        returns at once; otherwise it returns after one AckDelivery call."""
        if self.acks.batch_s > 0:
            self.acks.add(address, user_id, device_id, seq)
        else:
            await self.acks.ack_now(address, user_id, device_id, seq)

    async def kick(
        self, address: str, user_id: str, device_id: str, connection_id: str, reason: str
    ) -> bool:
        """Asks another gateway to close a replaced connection. Best effort: the
        other gateway also notices on its next route refresh."""
        stub = gateway_internal_pb2_grpc.GatewayInternalStub(self._channel(address))
        try:
            resp = await stub.Kick(
                gateway_internal_pb2.KickRequest(
                    user_id=user_id, device_id=device_id, connection_id=connection_id, reason=reason
                ),
                timeout=self._timeout_s,
            )
            return bool(resp.kicked)
        except grpc.aio.AioRpcError as exc:
            log.info(
                "Kick at another gateway failed",
                extra={"gateway": address, "user_id": user_id, "code": exc.code().name},
            )
            return False

    async def signal(
        self,
        address: str,
        targets: list[tuple[str, str]],
        frame: gateway_pb2.ServerFrame,
        timeout_s: float,
    ) -> int | None:
        """Writes an ephemeral frame (typing, presence) to (user, device) streams on
        the gateway at `address` with one GatewayInternal.Signal call; returns how
        many streams it was queued on, None if the call failed. Best effort: one
        attempt, never retried (the frame expires by itself)."""
        stub = gateway_internal_pb2_grpc.GatewayInternalStub(self._channel(address))
        request = gateway_internal_pb2.SignalRequest(
            targets=[
                gateway_internal_pb2.SignalTarget(user_id=user, device_id=device)
                for user, device in targets
            ],
            frame=frame,
        )
        try:
            resp = await stub.Signal(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.debug(
                "Signal at another gateway failed",
                extra={"gateway": address, "targets": len(targets), "code": exc.code().name},
            )
            return None
        return int(resp.written)

    async def close(self) -> None:
        """Flushes queued delivery ACKs (AckForwarder.close, if not done yet), then
        closes every channel. Idempotent."""
        await self.acks.close(min(1.0, self._timeout_s))
        channels, self._channels = list(self._channels.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
