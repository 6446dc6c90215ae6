"""The JetStream side of pusher: a durable pull consumer of "conversation has new
committed messages" triggers (im.logic.v1.MessageCommitted).

Conversations with new triggers are gathered into batches: a batch goes out when it
holds `fanout_batch_conversations` conversations, or `fanout_linger_ms` after its
first conversation became ready, or at once when no batch is in flight (unless
`fanout_linger_when_idle`): a quiet conversation pays no linger, and under load the
conversations that become ready while a call runs share the next one. A batch of
several conversations is ONE logic FanoutBatch call (one transaction) per page, and
all its deliveries go to one `Deliverer.push` (one Deliver per gateway); a batch of
one conversation is the plain Fanout call. With a batch size of 1 and no linger this
is exactly the one-Fanout-per-conversation pusher of before. A logic that does not
know FanoutBatch (UNIMPLEMENTED, during a rolling deploy) gets Fanout calls.

Guarantees:
- a trigger is acked only after logic's fan-out of its conversation returned OK
  with has_more = false for that conversation, in a call that started after the
  trigger was received; so every message committed before the trigger is in every
  member's timeline;
- on failure it is nak'ed with a delay from `redelivery_backoff_s` (by delivery
  count); redelivery is unlimited (max_deliver = -1). A trigger whose pusher dies is
  redelivered after `ack_wait_s`; long fan-outs send in-progress heartbeats. A
  conversation that can never fan out (an invalid id: INVALID_ARGUMENT or NOT_FOUND
  in its own result) has its triggers terminated, and only its own;
- up to `max_concurrency` batches run at once; each conversation is in at most one
  of them: triggers of a conversation that arrive while its fan-out runs are
  coalesced and settled by its next call;
- several pusher processes share the durable consumer; logic serialises
  concurrent Fanout calls of one conversation, so they never conflict;
- it survives nats-server restarts (the client reconnects) and a wiped JetStream
  store (the stream and consumer are recreated; logic's repair loop re-triggers
  what the lost store held, I8).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from imcommon.status import status_from_number
from imcommon.tracing import is_recording_provider
from pusher.config import Settings
from pusher.delivery import Deliverer
from pusher.faults import Faults

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
    #: triggers received and not yet covered by a fan-out call
    pending: list[Msg] = field(default_factory=list)
    #: in a batch now (then new triggers wait for its next call)
    busy: bool = False


class TriggerConsumer:
    def __init__(
        self,
        settings: Settings,
        logic: logic_pb2_grpc.LogicStub,
        deliverer: Deliverer,
        metrics: Metrics,
        faults: Faults | None = None,
    ) -> None:
        self._settings = settings
        self._logic = logic
        self._deliverer = deliverer
        self._faults = faults or Faults()
        self._convs: dict[str, _Conversation] = {}
        #: conversations with pending triggers and no call running, in arrival
        #: order, with the loop time each became ready
        self._ready: dict[str, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._inflight = 0
        self._linger = settings.fanout_linger_ms / 1000
        #: True while one fetch's triggers are dispatched (see _fetch_loop).
        self._gathering = False
        #: False once logic answered FanoutBatch with UNIMPLEMENTED (an older logic)
        self._batch_rpc = True
        self._workers: set[asyncio.Task[None]] = set()
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
        self._batch_calls = metrics.counter(
            "pusher_fanout_batch_calls", "FanoutBatch calls to logic, by result", ["result"]
        )
        self._batch_convs = metrics.counter(
            "pusher_fanout_batch_conversations",
            "Conversations named in FanoutBatch calls (divided by the calls: the batch size)",
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
            # The consumer's state (acked floor, redeliveries) is replicated like
            # the stream's messages: a node's death loses neither.
            num_replicas=s.nats_replicas,
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
            # The whole fetch is gathered before any batch starts, so an idle
            # pusher's first batch takes every conversation of the fetch.
            self._gathering = True
            try:
                for msg in msgs:
                    await self._dispatch(msg)
            finally:
                self._gathering = False
            self._pump()

    # -- batches of conversations ------------------------------------------------

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
        if self._stopping:
            await self._settle([msg], "nak_now")
            return
        conv = trigger.conversation_id
        state = self._convs.get(conv)
        if state is None:
            state = self._convs[conv] = _Conversation()
        state.pending.append(msg)
        if not state.busy and conv not in self._ready:
            self._ready[conv] = asyncio.get_running_loop().time()
            if not self._gathering:
                self._pump()

    def _pump(self, due: bool = False) -> None:
        """Starts the batches that are due: full ones at once, a partial one when
        its oldest conversation has waited the linger time (`due`: the timer for
        that fired); at most max_concurrency in flight. Otherwise sets a timer for
        the next due time."""
        if self._stopping:
            return
        size, loop = self._settings.fanout_batch_conversations, asyncio.get_running_loop()
        now = loop.time()
        while self._ready and self._inflight < self._settings.max_concurrency:
            oldest = next(iter(self._ready.values()))
            idle = self._inflight == 0 and not self._settings.fanout_linger_when_idle
            if len(self._ready) < size and now - oldest < self._linger and not due and not idle:
                break
            due = False
            convs = list(itertools.islice(self._ready, size))
            for conv in convs:
                del self._ready[conv]
            self._start(convs)
        if self._ready and self._inflight < self._settings.max_concurrency and not self._timer:
            at = next(iter(self._ready.values())) + self._linger
            self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump(due=True)

    def _start(self, convs: list[str]) -> None:
        batch: dict[str, list[Msg]] = {}
        for conv in convs:
            state = self._convs[conv]
            batch[conv], state.pending = state.pending, []
            state.busy = True
        self._inflight += 1
        name = f"fanout-{convs[0]}" if len(convs) == 1 else f"fanout-batch-{len(convs)}"
        worker = asyncio.create_task(self._work(batch), name=name)
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    async def _work(self, batch: dict[str, list[Msg]]) -> None:
        """Fans out one batch; every trigger in it is settled when this returns
        (unless cancelled: then JetStream redelivers after ack_wait)."""
        unsettled = dict(batch)  # what the heartbeat keeps alive
        heartbeat = asyncio.create_task(self._heartbeat(unsettled))
        leftover: list[Msg] = []
        try:
            with self._consume_span(batch):
                try:
                    if len(batch) == 1 or not self._batch_rpc:
                        await self._fanout_each(list(batch), unsettled)
                    else:
                        await self._fanout_batch(list(batch), unsettled)
                except Exception as exc:
                    log.exception(
                        "fan-out failed; will be redelivered",
                        extra={"error": f"{type(exc).__name__}: {exc}"},
                    )
                    for conv in list(unsettled):
                        await self._settle(unsettled.pop(conv), "nak")
        finally:
            heartbeat.cancel()
            self._inflight -= 1
            now = asyncio.get_running_loop().time()
            for conv in batch:
                state = self._convs[conv]
                state.busy = False
                if self._stopping:
                    leftover += state.pending
                    state.pending = []
                if state.pending:
                    self._ready[conv] = now
                else:
                    del self._convs[conv]
            self._pump()
        if leftover:
            await self._settle(leftover, "nak_now")

    async def _fanout_each(self, convs: list[str], unsettled: dict[str, list[Msg]]) -> None:
        """One Fanout loop per conversation (concurrently), each settled alone."""

        async def one(conv: str) -> None:
            try:
                await self._fanout(conv)
            except _Poison as exc:
                log.error(
                    "trigger can never fan out; terminated",
                    extra={"conversation_id": conv, "error": str(exc)},
                )
                await self._settle(unsettled.pop(conv), "terminated")
            except Exception as exc:
                log.warning(
                    "fan-out failed; will be redelivered",
                    extra={"conversation_id": conv, "error": f"{type(exc).__name__}: {exc}"},
                )
                await self._settle(unsettled.pop(conv), "nak")
            else:
                await self._settle(unsettled.pop(conv), "ack")

        await asyncio.gather(*(one(conv) for conv in convs))

    async def _fanout_batch(self, convs: list[str], unsettled: dict[str, list[Msg]]) -> None:
        """FanoutBatch until no conversation of the batch has more; each call's
        deliveries go out in one push, then the conversations it finished are
        acked, its poison terminated and its failures nak'ed."""
        todo = convs
        while todo:
            request = logic_pb2.FanoutBatchRequest(
                conversation_ids=todo, max_messages=self._settings.fanout_max_messages
            )
            try:
                resp = await self._logic.FanoutBatch(
                    request, timeout=self._settings.logic_timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                self._batch_calls.labels(exc.code().name).inc()
                if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT):
                    # UNIMPLEMENTED: an older logic; INVALID_ARGUMENT for the whole
                    # request: e.g. more conversations than logic allows. Fanout
                    # still works, and tells each conversation's poison apart.
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        self._batch_rpc = False
                    log.warning(
                        "FanoutBatch refused; fanning out one conversation per call",
                        extra={"error": f"{exc.code().name}: {exc.details()}"},
                    )
                    await self._fanout_each(todo, unsettled)
                    return
                log.warning(
                    "fan-out failed; will be redelivered",
                    extra={
                        "conversation_ids": todo[:_MAX_LINKS],
                        "error": f"{exc.code().name}: {exc.details()}",
                    },
                )
                for conv in todo:
                    await self._settle(unsettled.pop(conv), "nak")
                return
            self._batch_calls.labels("OK").inc()
            self._batch_convs.inc(len(todo))
            outcome: dict[str, str] = {conv: "nak" for conv in todo}  # unanswered: retry
            deliveries: list[logic_pb2.FanoutDelivery] = []
            more: list[str] = []
            for r in resp.results:
                conv = r.conversation_id
                if conv not in outcome:
                    continue
                if r.error_code:
                    code = status_from_number(r.error_code)
                    poison = code in _POISON
                    outcome[conv] = "terminated" if poison else "nak"
                    log.log(
                        logging.ERROR if poison else logging.WARNING,
                        "trigger can never fan out; terminated"
                        if poison
                        else "fan-out failed; will be redelivered",
                        extra={"conversation_id": conv, "error": f"{code.name}: {r.error_message}"},
                    )
                    continue
                deliveries.extend(r.deliveries)
                if r.has_more:
                    del outcome[conv]
                    more.append(conv)
                else:
                    outcome[conv] = "ack"
            if deliveries:
                self._fanned_out.inc(len(deliveries))
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "fanned out",
                        extra={
                            "conversation_ids": todo[:_MAX_LINKS],
                            "msg_ids": sorted({d.message.msg_id for d in deliveries})[:_MAX_LINKS],
                            "deliveries": len(deliveries),
                        },
                    )
                # Each user's entries in seq order, whichever conversation they are of.
                deliveries.sort(key=lambda d: (d.user_id, d.seq))
                self._faults.before_deliver()
            try:
                await self._deliverer.push(deliveries)
            except Exception as exc:
                log.warning(
                    "push failed; will be redelivered",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
                for conv in todo:
                    await self._settle(unsettled.pop(conv), "nak")
                return
            for conv, how in outcome.items():
                await self._settle(unsettled.pop(conv), how)
            todo = more

    def _consume_span(self, batch: dict[str, list[Msg]]) -> AbstractContextManager[trace.Span]:
        """The span of one batch of triggers (of one or several conversations): it
        continues the trace of the first trigger's publisher (the W3C context logic
        put in the message headers) and links the other triggers' traces."""
        msgs = [m for ms in batch.values() for m in ms]
        if not is_recording_provider(trace.get_tracer_provider()):
            # Nothing is recorded (no exporter): only the trace context matters, for
            # the ids in logs and the next hops; skip the links and attributes.
            return self._tracer.start_as_current_span(
                "pusher.consume",
                context=propagate.extract(msgs[0].headers or {}),
                kind=SpanKind.CONSUMER,
            )
        contexts = [propagate.extract(m.headers or {}) for m in msgs[:_MAX_LINKS]]
        links = []
        for ctx in contexts[1:]:
            span_context = trace.get_current_span(ctx).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
        msg_ids = []
        for m in msgs[:_MAX_LINKS]:
            trigger = logic_pb2.MessageCommitted()
            with contextlib.suppress(DecodeError):
                trigger.ParseFromString(m.data)
            msg_ids.append(trigger.msg_id)
        first = msgs[0]
        convs = list(batch)
        attributes: dict[str, AnyValue] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": first.subject,
            "messaging.batch.message_count": len(msgs),
            "messaging.message.id": (first.headers or {}).get("Nats-Msg-Id", ""),
            "im.conversation_id": convs[0],
            "im.msg_ids": msg_ids,
        }
        if len(convs) > 1:
            attributes["im.conversations"] = len(convs)
            attributes["im.conversation_ids"] = convs[:_MAX_LINKS]
        with contextlib.suppress(Exception):  # metadata needs a JetStream reply subject
            attributes["im.deliveries"] = max(m.metadata.num_delivered or 1 for m in msgs)
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
                self._faults.before_deliver()
            await self._deliverer.push(resp.deliveries)
            if not resp.has_more:
                return

    async def _heartbeat(self, unsettled: dict[str, list[Msg]]) -> None:
        """Keeps the batch's unsettled triggers from being redelivered while their
        fan-out runs (JetStream in-progress)."""
        interval = max(0.5, self._settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            for msgs in list(unsettled.values()):
                for msg in msgs:
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Triggers not started are given back at once (another pusher takes them).
        waiting, self._ready = list(self._ready), {}
        for conv in waiting:
            state = self._convs.pop(conv)
            await self._settle(state.pending, "nak_now")
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
