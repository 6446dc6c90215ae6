"""Pushes fanned-out timeline entries to online devices and retransmits them
from the timing wheel until each device acknowledges.

Pushes are best effort on top of the timeline in PostgreSQL: if Redis or a
gateway is unreachable, or the retransmits run out, the device still gets every
entry by sync (on its next gap or reconnect). Nothing here can lose a message;
it can only make it arrive later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext
from redis.exceptions import RedisError

from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_internal_pb2, gateway_internal_pb2_grpc
from im.logic.v1 import logic_pb2
from imcommon.metrics import Metrics
from imcommon.telemetry import internal_channel
from imcommon.tls import ChannelTLS
from pusher.config import Settings
from pusher.routes import RouteReader
from pusher.timingwheel import Timer, TimingWheel

log = logging.getLogger(__name__)

T = TypeVar("T")

WRITTEN = gateway_internal_pb2.DeliveryStatus.DELIVERY_STATUS_WRITTEN
#: Recalled messages a pusher remembers, to strip their bodies from retransmits.
RECALLED_MEMORY = 10_000
#: Most ids (or links) one span carries.
MAX_SPAN_IDS = 64
#: Buckets of the commit-to-push latency (seconds): a healthy push takes
#: milliseconds; a backlog or a lost trigger (repair after seconds) shows far out.
COMMIT_TO_PUSH_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


def _ids(values: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(values))[:MAX_SPAN_IDS]


@dataclass(frozen=True, slots=True)
class Pushed:
    """What a retransmit timer holds: the message, and the span of its first push
    (a retransmit span links to it)."""

    message: common_pb2.Message
    origin: SpanContext


class GatewayClients:
    """Channels to gateways, one per address (LRU-bounded)."""

    def __init__(
        self,
        metrics: Metrics,
        timeout_s: float,
        max_channels: int = 1024,
        tls: ChannelTLS | None = None,
    ) -> None:
        self._metrics = metrics
        self._tls = tls
        self._timeout_s = timeout_s
        self._max = max_channels
        self._stubs: OrderedDict[
            str, tuple[grpc.aio.Channel, gateway_internal_pb2_grpc.GatewayInternalStub]
        ] = OrderedDict()
        self._closing: set[asyncio.Future[None]] = set()

    def _stub(self, address: str) -> gateway_internal_pb2_grpc.GatewayInternalStub:
        entry = self._stubs.get(address)
        if entry is None:
            channel = internal_channel(address, self._metrics, tls=self._tls)
            entry = (channel, gateway_internal_pb2_grpc.GatewayInternalStub(channel))
            self._stubs[address] = entry
            while len(self._stubs) > self._max:
                _, (old, _stub) = self._stubs.popitem(last=False)
                closing = asyncio.ensure_future(old.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        self._stubs.move_to_end(address)
        return entry[1]

    async def deliver(
        self, address: str, deliveries: list[gateway_internal_pb2.Delivery], ack_to: str
    ) -> list[bool]:
        """Writes a batch to a gateway; one bool per delivery (True = on a live
        stream). A failed call counts as nothing written."""
        try:
            resp = await self._stub(address).Deliver(
                gateway_internal_pb2.DeliverRequest(deliveries=deliveries, ack_to=ack_to),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            log.info(
                "Deliver failed; the timers retransmit",
                extra={
                    "gateway": address,
                    "code": exc.code().name,
                    "deliveries": len(deliveries),
                    "user_ids": _ids(d.user_id for d in deliveries),
                    "msg_ids": _ids(d.message.msg_id for d in deliveries),
                },
            )
            return [False] * len(deliveries)
        return [s == WRITTEN for s in resp.statuses] + [False] * (
            len(deliveries) - len(resp.statuses)
        )

    async def close(self) -> None:
        """Closes every channel. Idempotent."""
        entries, self._stubs = list(self._stubs.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c, _ in entries), return_exceptions=True)


def _chunks(
    items: list[gateway_internal_pb2.Delivery], max_bytes: int
) -> Iterable[list[gateway_internal_pb2.Delivery]]:
    chunk: list[gateway_internal_pb2.Delivery] = []
    size = 0
    for item in items:
        n = item.ByteSize() + 8
        if chunk and size + n > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


class Deliverer:
    def __init__(
        self,
        settings: Settings,
        routes: RouteReader,
        gateways: GatewayClients,
        ack_to: Callable[[], str],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._routes = routes
        self._gateways = gateways
        self._ack_to = ack_to
        self.wheel: TimingWheel[Pushed] = TimingWheel(
            tick_s=settings.wheel_tick_ms / 1000,
            slots=settings.wheel_slots,
            schedule_s=[ms / 1000 for ms in settings.retransmit_schedule_ms],
            max_attempts=settings.max_attempts,
            clock=clock,
            max_timers=settings.max_timers,
        )
        self._inflight: set[asyncio.Task[None]] = set()
        #: (conversation, conv_seq) of messages recalled by RECALLs this pusher
        #: pushed, newest last, at most RECALLED_MEMORY: a retransmit of such a
        #: message (or of one of its edits) goes out without its body.
        self._recalled: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._pushes = metrics.counter(
            "pusher_pushes", "Deliveries sent to gateways, by kind and result", ["kind", "result"]
        )
        self._gave_up = metrics.counter(
            "pusher_gave_up", "Pushes abandoned after max attempts (the device heals by sync)"
        )
        self._cancelled = metrics.counter(
            "pusher_acks_cancelled", "Retransmit timers cancelled by delivery ACKs"
        )
        self._timers = metrics.gauge("pusher_timers", "Armed retransmit timers")
        self._route_errors = metrics.counter(
            "pusher_route_errors", "Route lookups that failed (Redis unreachable)"
        )
        self._commit_to_push = metrics.histogram(
            "pusher_commit_to_push_seconds",
            "From a message's commit in logic (server_time_ms) to its first push written "
            "to a device's stream, per delivery",
            buckets=COMMIT_TO_PUSH_BUCKETS,
        )
        self._tracer = trace.get_tracer("im.pusher")

    async def _lookup(self, users: Iterable[str]) -> dict[str, dict[str, str]] | None:
        try:
            return await self._routes.devices(users)
        except (RedisError, OSError) as exc:
            self._route_errors.inc()
            log.warning("route lookup failed; devices will sync", extra={"error": str(exc)})
            return None

    async def push(self, deliveries: Sequence[logic_pb2.FanoutDelivery]) -> None:
        """First delivery of fanned-out timeline entries to every online device of
        each recipient, one Deliver per gateway (split by size), with a retransmit
        timer per (user, device, seq). Returns when every gateway answered or
        timed out; never raises for an unreachable Redis or gateway."""
        if not deliveries:
            return
        with self._tracer.start_as_current_span(
            "pusher.push",
            attributes={
                "im.deliveries": len(deliveries),
                "im.msg_ids": _ids(d.message.msg_id for d in deliveries),
                "im.user_ids": _ids(d.user_id for d in deliveries),
            },
        ) as span:
            self._note_recalls(deliveries)
            routes = await self._lookup(d.user_id for d in deliveries)
            if not routes:
                span.set_attributes({"im.devices": 0, "im.route_error": routes is None})
                return
            origin = span.get_span_context()
            batches: dict[str, list[gateway_internal_pb2.Delivery]] = {}
            for d in deliveries:
                message = self._current(d.message)
                for device, gateway in routes.get(d.user_id, {}).items():
                    self.wheel.add(d.user_id, device, d.seq, Pushed(message, origin))
                    batches.setdefault(gateway, []).append(
                        gateway_internal_pb2.Delivery(
                            user_id=d.user_id, device_id=device, seq=d.seq, message=message
                        )
                    )
            self._timers.set(len(self.wheel))
            span.set_attribute("im.devices", sum(len(b) for b in batches.values()))
            await self._send(batches, "first")

    def _note_recalls(self, deliveries: Sequence[logic_pb2.FanoutDelivery]) -> None:
        for d in deliveries:
            m = d.message
            if m.kind == common_pb2.MESSAGE_KIND_RECALL:
                key = (m.conversation_id, m.target_conv_seq)
                self._recalled[key] = None
                self._recalled.move_to_end(key)
                if len(self._recalled) > RECALLED_MEMORY:
                    self._recalled.popitem(last=False)

    def _current(self, message: common_pb2.Message) -> common_pb2.Message:
        """The message as it may be pushed now: without its body if this pusher has
        pushed its recall (the store deleted the body when the recall committed;
        the copy a retransmit timer holds is older). Only this pusher's recalls are
        known here: a device can still get an old body pushed before it gets the
        RECALL entry, never after it (docs/protocol.md, "Conversation state")."""
        if not self._recalled or not message.body:
            return message
        if message.kind == common_pb2.MESSAGE_KIND_EDIT:
            key = (message.conversation_id, message.target_conv_seq)
        else:
            key = (message.conversation_id, message.conv_seq)
        if key not in self._recalled:
            return message
        stripped = common_pb2.Message()
        stripped.CopyFrom(message)
        stripped.body = b""
        stripped.recalled = True
        return stripped

    async def _send(
        self, batches: dict[str, list[gateway_internal_pb2.Delivery]], kind: str
    ) -> None:
        ack_to = self._ack_to()
        await asyncio.gather(
            *(
                self._deliver(address, chunk, ack_to, kind)
                for address, items in batches.items()
                for chunk in _chunks(items, self._settings.deliver_batch_bytes)
            )
        )

    async def _deliver(
        self,
        address: str,
        chunk: list[gateway_internal_pb2.Delivery],
        ack_to: str,
        kind: str,
    ) -> None:
        """One Deliver call, in a span naming what it carries."""
        with self._tracer.start_as_current_span(
            "pusher.deliver",
            attributes={
                "im.gateway": address,
                "im.push_kind": kind,
                "im.deliveries": len(chunk),
                "im.msg_ids": _ids(d.message.msg_id for d in chunk),
                "im.user_ids": _ids(d.user_id for d in chunk),
            },
        ) as span:
            results = await self._gateways.deliver(address, chunk, ack_to)
            written = sum(results)
            span.set_attribute("im.written", written)
        if written:
            self._pushes.labels(kind, "written").inc(written)
        if len(results) - written:
            self._pushes.labels(kind, "not_written").inc(len(results) - written)
        if kind == "first" and written:
            now_ms = time.time() * 1000
            for d, ok in zip(chunk, results, strict=True):
                if ok:
                    self._commit_to_push.observe(max(0.0, now_ms - d.message.server_time_ms) / 1000)

    def ack(self, user_id: str, device_id: str, seq: int) -> int:
        """A device's cumulative delivery ACK: cancels its timers at or below seq."""
        cancelled = self.wheel.ack(user_id, device_id, seq)
        if cancelled:
            self._cancelled.inc(cancelled)
            self._timers.set(len(self.wheel))
        return cancelled

    async def _retransmit(self, timers: list[Timer[Pushed]]) -> None:
        """One round of due retransmits, in a span of its own (a new trace) linked
        to the spans of the first pushes it repeats."""
        # SpanContext is not hashable (its trace state is a mapping): key by ids.
        origins = {(o.trace_id, o.span_id): o for t in timers if (o := t.payload.origin).is_valid}
        with self._tracer.start_as_current_span(
            "pusher.retransmit",
            links=[Link(o) for o in list(origins.values())[:MAX_SPAN_IDS]],
            attributes={
                "im.deliveries": len(timers),
                "im.max_attempt": max(t.attempts for t in timers),
                "im.msg_ids": _ids(t.payload.message.msg_id for t in timers),
                "im.user_ids": _ids(t.user_id for t in timers),
            },
        ):
            await self._retransmit_round(timers)

    async def _retransmit_round(self, timers: list[Timer[Pushed]]) -> None:
        # Re-read the route: the device may have moved to another gateway.
        routes = await self._lookup(t.user_id for t in timers)
        if routes is None:
            return  # the timers stay armed: the next attempt tries again
        batches: dict[str, list[gateway_internal_pb2.Delivery]] = {}
        missing = 0
        for t in timers:
            gateway = routes.get(t.user_id, {}).get(t.device_id)
            if gateway is None:
                missing += 1  # offline now: it syncs on reconnect; the attempt counts
                continue
            batches.setdefault(gateway, []).append(
                gateway_internal_pb2.Delivery(
                    user_id=t.user_id,
                    device_id=t.device_id,
                    seq=t.seq,
                    message=self._current(t.payload.message),
                )
            )
        if missing:
            self._pushes.labels("retransmit", "offline").inc(missing)
        await self._send(batches, "retransmit")

    def tick(self) -> None:
        """Advances the wheel and starts the retransmits that came due."""
        out = self.wheel.advance()
        if out.gave_up:
            self._gave_up.inc(len(out.gave_up))
            log.info(
                "pushes given up; the devices heal by sync",
                extra={
                    "count": len(out.gave_up),
                    "user_ids": _ids(t.user_id for t in out.gave_up),
                    "msg_ids": _ids(t.payload.message.msg_id for t in out.gave_up),
                },
            )
        self._timers.set(len(self.wheel))
        if out.retransmit:
            task = asyncio.ensure_future(self._retransmit(out.retransmit))
            self._inflight.add(task)
            task.add_done_callback(self._retransmit_done)

    def _retransmit_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("retransmit failed", exc_info=task.exception())

    async def run(self) -> None:
        """Ticks the wheel until cancelled."""
        interval = self._settings.wheel_tick_ms / 1000
        try:
            while True:
                await asyncio.sleep(interval)
                self.tick()
        finally:
            for task in list(self._inflight):
                task.cancel()
