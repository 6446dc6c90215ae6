"""The JetStream side of pusher: a durable pull consumer of "conversation has new
committed messages" triggers (im.logic.v1.MessageCommitted).

Guarantees:
- a trigger is acked only after logic's Fanout for its conversation returned OK
  with has_more = false, in a call that started after the trigger was received;
  so every message committed before the trigger is in every member's timeline;
- on failure it is nak'ed with a delay from `redelivery_backoff_s` (by delivery
  count); redelivery is unlimited (max_deliver = -1). A trigger whose pusher dies is
  redelivered after `ack_wait_s`; long fan-outs send in-progress heartbeats;
- conversations are processed concurrently (up to `max_concurrency`), each one
  serially: triggers of a conversation that arrive while its fan-out runs are
  coalesced and settled by the next Fanout call;
- several pusher processes share the durable consumer; logic serialises
  concurrent Fanout calls of one conversation, so they never conflict;
- it survives nats-server restarts (the client reconnects) and a wiped JetStream
  store (the stream and consumer are recreated; logic's repair loop re-triggers
  what the lost store held, I8).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import grpc
import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import AnyValue

from im.logic.v1 import logic_pb2, logic_pb2_grpc
from imcommon.jetstream import ensure_stream, stream_config
from imcommon.metrics import Metrics
from pusher.config import Settings
from pusher.delivery import Deliverer

log = logging.getLogger(__name__)

#: Fanout errors that no retry can fix: the trigger is terminated (logged).
_POISON = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
#: After one trigger arrives, how long to wait for more to fill the batch.
_TOP_UP_S = 0.02
#: Most triggers of one batch linked from its consume span / named in attributes.
_MAX_LINKS = 64


class _Poison(Exception):
    pass


def _num_pending(msg: Msg) -> int:
    """Triggers the stream held for the consumer beyond `msg` when it was delivered
    (its JetStream metadata); unknown (no JetStream reply subject) counts as many,
    so the caller tops up as it would without the hint."""
    try:
        return msg.metadata.num_pending
    except Exception:
        return 1 << 30


@dataclass(slots=True)
class _Conversation:
    pending: list[Msg] = field(default_factory=list)


class TriggerConsumer:
    def __init__(
        self,
        settings: Settings,
        logic: logic_pb2_grpc.LogicStub,
        deliverer: Deliverer,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._logic = logic
        self._deliverer = deliverer
        self._convs: dict[str, _Conversation] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        self._held = 0
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = False
        self._nc: NatsClient | None = None
        self.subscribed = asyncio.Event()
        self._triggers = metrics.counter(
            "pusher_triggers", "JetStream triggers settled, by outcome", ["outcome"]
        )
        self._fanouts = metrics.counter(
            "pusher_fanout_calls", "Fanout calls to logic, by result", ["result"]
        )
        self._fanned_out = metrics.counter(
            "pusher_fanout_deliveries",
            "Timeline entries (message, recipient) received from Fanout, to push",
        )
        self._lag = metrics.gauge(
            "pusher_jetstream_pending",
            "Triggers in the stream not yet delivered to the durable consumer (num_pending, "
            "sampled; the same for every pusher sharing the consumer)",
        )
        self._ack_pending = metrics.gauge(
            "pusher_jetstream_ack_pending",
            "Triggers delivered to the consumer and not yet acked (num_ack_pending, sampled)",
        )
        self._redelivered = metrics.gauge(
            "pusher_jetstream_redelivered",
            "Triggers delivered more than once and not yet acked (num_redelivered, sampled)",
        )
        self._lag_failures = metrics.counter(
            "pusher_jetstream_sample_failures", "Consumer info requests that failed"
        )
        self._tracer = trace.get_tracer("im.pusher")

    # -- connection and subscription ------------------------------------------

    async def _connect(self) -> NatsClient:
        async def on_error(exc: Exception) -> None:
            log.warning("NATS error", extra={"error": str(exc)})

        async def on_disconnect() -> None:
            log.warning("NATS disconnected; reconnecting")

        async def on_reconnect() -> None:
            log.info("NATS reconnected")

        return await nats.connect(
            servers=[u.strip() for u in self._settings.nats_url.split(",") if u.strip()],
            name="pusher",
            connect_timeout=2,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=-1,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        s = self._settings
        await ensure_stream(
            js, stream_config(s.nats_stream, s.nats_subject_prefix, replicas=s.nats_replicas)
        )
        config = ConsumerConfig(
            durable_name=s.nats_durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=-1,
            ack_wait=s.ack_wait_s,
            max_ack_pending=s.max_ack_pending,
            filter_subject=f"{s.nats_subject_prefix}.>",
        )
        return await js.pull_subscribe(
            f"{s.nats_subject_prefix}.>",
            durable=s.nats_durable,
            stream=s.nats_stream,
            config=config,
        )

    async def run(self) -> None:
        """Consumes until `stop()`: (re)connects, (re)subscribes, fetches."""
        backoff = 0.2
        while not self._stopping:
            sub: JetStreamContext.PullSubscription | None = None
            try:
                if self._nc is None or self._nc.is_closed:
                    self._nc = await self._connect()
                sub = await self._subscribe(self._nc.jetstream())
                log.info(
                    "consuming",
                    extra={
                        "stream": self._settings.nats_stream,
                        "durable": self._settings.nats_durable,
                    },
                )
                self.subscribed.set()
                backoff = 0.2
                await self._fetch_loop(sub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                if self._stopping:
                    break
                log.warning(
                    "JetStream consumer interrupted; retrying",
                    extra={"error": f"{type(exc).__name__}: {exc}", "retry_in_s": backoff},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _fetch_loop(self, sub: JetStreamContext.PullSubscription) -> None:
        s = self._settings
        checked = time.monotonic()
        while not self._stopping:
            while self._held >= s.max_pending:
                self._room.clear()
                await self._room.wait()
            try:
                msgs = await sub.fetch(1, timeout=s.fetch_timeout_s)
            except nats.errors.TimeoutError:
                if time.monotonic() - checked >= s.consumer_check_s:
                    # Raises NotFoundError if the store was wiped: resubscribe.
                    await sub.consumer_info()
                    checked = time.monotonic()
                continue
            room = min(s.fetch_batch, s.max_pending - self._held) - len(msgs)
            if room > 0:
                # Top up only when the stream holds more for this consumer: with an
                # empty stream a fetch with a timeout is a long poll and would hold
                # back the trigger already fetched for the whole _TOP_UP_S.
                more = _num_pending(msgs[-1])
                if more > 0:
                    with contextlib.suppress(nats.errors.TimeoutError):
                        msgs += await sub.fetch(min(room, more), timeout=_TOP_UP_S)
            checked = time.monotonic()
            for msg in msgs:
                await self._dispatch(msg)

    # -- per-conversation work --------------------------------------------------

    async def _dispatch(self, msg: Msg) -> None:
        trigger = logic_pb2.MessageCommitted()
        try:
            trigger.ParseFromString(msg.data)
        except DecodeError:
            trigger.Clear()
        if not trigger.conversation_id:
            log.error("undecodable trigger terminated", extra={"subject": msg.subject})
            self._triggers.labels("terminated").inc()
            with contextlib.suppress(Exception):
                await msg.term()
            return
        self._held += 1
        conv = trigger.conversation_id
        state = self._convs.get(conv)
        if state is not None:
            state.pending.append(msg)
            return
        state = _Conversation([msg])
        self._convs[conv] = state
        worker = asyncio.create_task(self._work(conv, state), name=f"fanout-{conv}")
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    async def _work(self, conv: str, state: _Conversation) -> None:
        async with self._sem:
            while True:
                if not state.pending or self._stopping:
                    leftover, state.pending = state.pending, []
                    del self._convs[conv]
                    break
                batch, state.pending = state.pending, []
                heartbeat = asyncio.create_task(self._heartbeat(batch))
                try:
                    with self._consume_span(conv, batch):
                        await self._fanout(conv)
                except _Poison as exc:
                    log.error(
                        "trigger can never fan out; terminated",
                        extra={"conversation_id": conv, "error": str(exc)},
                    )
                    await self._settle(batch, "terminated")
                except Exception as exc:
                    log.warning(
                        "fan-out failed; will be redelivered",
                        extra={"conversation_id": conv, "error": f"{type(exc).__name__}: {exc}"},
                    )
                    await self._settle(batch, "nak")
                else:
                    await self._settle(batch, "ack")
                finally:
                    heartbeat.cancel()
        if leftover:
            await self._settle(leftover, "nak_now")

    def _consume_span(self, conv: str, batch: list[Msg]) -> AbstractContextManager[trace.Span]:
        """The span of one batch of a conversation's triggers: it continues the
        trace of the first trigger's publisher (the W3C context logic put in the
        message headers) and links the other triggers' traces."""
        contexts = [propagate.extract(m.headers or {}) for m in batch]
        links = []
        for ctx in contexts[1:_MAX_LINKS]:
            span_context = trace.get_current_span(ctx).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
        msg_ids = []
        for m in batch[:_MAX_LINKS]:
            trigger = logic_pb2.MessageCommitted()
            with contextlib.suppress(DecodeError):
                trigger.ParseFromString(m.data)
            msg_ids.append(trigger.msg_id)
        first = batch[0]
        attributes: dict[str, AnyValue] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": first.subject,
            "messaging.batch.message_count": len(batch),
            "messaging.message.id": (first.headers or {}).get("Nats-Msg-Id", ""),
            "im.conversation_id": conv,
            "im.msg_ids": msg_ids,
        }
        with contextlib.suppress(Exception):  # metadata needs a JetStream reply subject
            attributes["im.deliveries"] = max(m.metadata.num_delivered or 1 for m in batch)
        return self._tracer.start_as_current_span(
            "pusher.consume",
            context=contexts[0],
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
        )

    async def _fanout(self, conv: str) -> None:
        """Fanout(conv) until has_more is false, pushing each page."""
        request = logic_pb2.FanoutRequest(
            conversation_id=conv, max_messages=self._settings.fanout_max_messages
        )
        while True:
            try:
                resp = await self._logic.Fanout(request, timeout=self._settings.logic_timeout_s)
            except grpc.aio.AioRpcError as exc:
                self._fanouts.labels(exc.code().name).inc()
                if exc.code() in _POISON:
                    raise _Poison(f"{exc.code().name}: {exc.details()}") from None
                raise
            self._fanouts.labels("OK").inc()
            if resp.deliveries:
                self._fanned_out.inc(len(resp.deliveries))
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "fanned out",
                        extra={
                            "conversation_id": conv,
                            "msg_ids": sorted({d.message.msg_id for d in resp.deliveries}),
                            "user_ids": sorted({d.user_id for d in resp.deliveries})[:_MAX_LINKS],
                            "deliveries": len(resp.deliveries),
                        },
                    )
            await self._deliverer.push(resp.deliveries)
            if not resp.has_more:
                return

    async def _heartbeat(self, batch: list[Msg]) -> None:
        interval = max(0.5, self._settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            for msg in batch:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _settle(self, msgs: list[Msg], how: str) -> None:
        backoff = self._settings.redelivery_backoff_s
        for msg in msgs:
            try:
                if how == "ack":
                    await msg.ack()
                elif how == "terminated":
                    await msg.term()
                elif how == "nak_now":
                    await msg.nak()
                else:
                    n = max(1, msg.metadata.num_delivered or 1)
                    await msg.nak(delay=backoff[min(n - 1, len(backoff) - 1)])
            except Exception as exc:
                # The trigger stays unacked: JetStream redelivers it after ack_wait.
                log.info("could not settle trigger", extra={"how": how, "error": str(exc)})
            self._triggers.labels(how).inc()
        self._held -= len(msgs)
        if self._held < self._settings.max_pending:
            self._room.set()

    # -- lag ------------------------------------------------------------------------

    async def sample_lag_once(self) -> bool:
        """Sets the lag gauges from one consumer info request; False if NATS is not
        connected or the request failed."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        s = self._settings
        try:
            info = await nc.jetstream().consumer_info(s.nats_stream, s.nats_durable, timeout=2.0)
        except Exception as exc:
            self._lag_failures.inc()
            log.debug("consumer info failed", extra={"error": repr(exc)})
            return False
        self._lag.set(info.num_pending or 0)
        self._ack_pending.set(info.num_ack_pending or 0)
        self._redelivered.set(info.num_redelivered or 0)
        return True

    async def lag_loop(self, interval_s: float) -> None:
        """Samples the consumer's lag every `interval_s` until cancelled."""
        while True:
            await self.sample_lag_once()
            await asyncio.sleep(interval_s)

    # -- shutdown -----------------------------------------------------------------

    async def stop(self, wait_s: float) -> None:
        """Stops fetching, lets running fan-outs finish (up to `wait_s`; the rest
        stay unacked and are redelivered), gives back triggers not started, and
        closes the NATS connection."""
        self._stopping = True
        self._room.set()
        workers = list(self._workers)
        if workers:
            _, pending = await asyncio.wait(workers, timeout=wait_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            # Not drain(): its wait for subscriptions can outlast the shutdown
            # deadline after a reconnect. Acks already sent only need a flush.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.flush(), timeout=1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), timeout=2.0)
