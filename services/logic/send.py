"""SendMessage: the durable, idempotent, ordered store of messages (I1-I5), with
group commit.

Concurrent `send()` calls share one transaction: they queue, and a committer takes
up to `batch_max` of them as soon as it is free (while one batch commits, the next
fills). One batch is one transaction:

1. all conversation SEND locks and sender USER locks of the batch, in ascending
   (class, key) order (SEND < FANOUT < USER, the global order: Fanout takes its
   FANOUT lock, then USER locks by key; membership changes take one SEND lock);
2. one read of every send's state (dedup row, group kind and membership, the
   conversation's last conv_seq, the sender's last seq);
3. per send, in queue order, as if the sends ran one after another: a stored or
   earlier-in-the-batch (sender, client_msg_id) is a duplicate (the first send's
   ACK); an unknown UUIDv7 id older than the dedup window (retention.py), an
   unknown group or a non-member is refused, for that caller only;
4. one seqsvc call for the keys of the remaining sends in queue order (conv_seq
   increasing in queue order within each conversation, seq per sender), each value
   checked to be above the last committed one for its key (I1/I5);
5. one bulk insert, COMMIT; then one trigger per conversation of the batch.

A database or seqsvc failure or a SequenceRegression fails every send of the batch
and writes nothing (retrying with the same client_msg_id is safe). `batch_max=1`
runs each send as its own transaction in the caller's task, as before group commit.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link
from psycopg import errors as pg_errors

from im.logic.v1 import logic_pb2
from imcommon.syncrep import commits_confirmed
from logic import repo
from logic.errors import (
    DependencyFailed,
    InvalidArgument,
    LogicError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from logic.events import TriggerPublisher
from logic.faults import Faults
from logic.ids import (
    LOCK_CONV_SEND,
    LOCK_USER,
    ConversationId,
    check_client_msg_id,
    check_device_id,
    check_user_id,
    dedup_window_refusal,
    lock_key,
    parse_conversation_id,
    user_seq_key,
)
from logic.model import KIND_DELIVERED, KIND_MESSAGE, KIND_READ, RECEIPTS, SendAck
from logic.outbox import OutboxCleaner
from logic.seq import SeqSource, check_above
from logic.state import StateWriter
from logic.store import Database
from logic.telemetry import Telemetry, ids

log = logging.getLogger(__name__)

#: Attempts of a batch that lost a dedup race (only without the locks: a test-only
#: fault, or a bug): the retry reads the winner's row and answers with its ACK.
DEDUP_RACE_ATTEMPTS = 3


def _ack_attributes(ack: SendAck) -> dict[str, int | bool]:
    return {
        "im.msg_id": ack.msg_id,
        "im.seq": ack.seq,
        "im.conv_seq": ack.conv_seq,
        "im.duplicate": ack.duplicate,
    }


KNOWN_CONTENT_TYPES = frozenset(range(0, 5))  # im.common.v1.ContentType values


@dataclass(frozen=True)
class SendRequest:
    sender_id: str
    sender_device_id: str
    client_msg_id: str
    conversation_id: str
    content_type: int
    body: bytes
    kind: int = 1  # im.common.v1.MessageKind; 0 is a chat message too
    target_conv_seq: int = 0


@dataclass(eq=False)
class _Item:
    """One queued send and where its answer goes."""

    req: SendRequest
    conv: ConversationId
    future: asyncio.Future[SendAck]
    #: The caller's trace context (its SendMessage server span).
    ctx: otel_context.Context | None = None
    #: Set by the batch: the ACK, or the error for this caller only.
    outcome: SendAck | LogicError | None = field(default=None)


@dataclass
class _Committed:
    """A committed batch: the outcome of each item, the triggers to publish."""

    items: list[_Item]
    #: Each with the item whose message it names: the trigger is published in
    #: that caller's trace, so the pusher's spans continue it.
    triggers: list[tuple[logic_pb2.MessageCommitted, _Item]]


class Sender:
    """Stores messages. One instance per process, shared by every call."""

    def __init__(
        self,
        db: Database,
        seq: SeqSource,
        publisher: TriggerPublisher,
        cleaner: OutboxCleaner,
        *,
        max_body_bytes: int,
        repair_after_s: float,
        faults: Faults,
        telemetry: Telemetry | None = None,
        batch_max: int = 64,
        linger_s: float = 0.0,
        committers: int = 1,
        dedup_window_s: float = 0.0,
        events: StateWriter | None = None,
        ack_before_publish: bool = True,
    ) -> None:
        #: Answer before the trigger publish (the outbox row makes it durable).
        self._ack_first = ack_before_publish
        #: Where events (edits, recalls, reads...: state.py) go; None: refused.
        self._events = events
        self._db = db
        #: The dedup window (retention.py): 0 = dedup keys are kept forever.
        self._dedup_window_ms = dedup_window_s * 1000
        self._seq = seq
        self._tel = telemetry or Telemetry()
        self._publisher = publisher
        self._cleaner = cleaner
        self._max_body = max_body_bytes
        self._repair_after = repair_after_s
        self._faults = faults
        self._batch_max = batch_max
        self._linger = linger_s
        self._committers = committers
        self._queue: deque[_Item] = deque()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._finishing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._tel.send_queued.set_function(lambda: len(self._queue))

    @property
    def queued(self) -> int:
        """Sends waiting for a batch."""
        return len(self._queue)

    def validate(self, req: SendRequest) -> ConversationId:
        check_user_id(req.sender_id, "sender_id")
        check_device_id(req.sender_device_id)
        check_client_msg_id(req.client_msg_id)
        conv = parse_conversation_id(req.conversation_id)
        if req.content_type not in KNOWN_CONTENT_TYPES:
            raise InvalidArgument(
                f"content_type {req.content_type} is not an im.common.v1.ContentType value"
            )
        if not req.body:
            raise InvalidArgument("body is empty; a message needs at least one byte")
        if len(req.body) > self._max_body:
            raise InvalidArgument(
                f"body is {len(req.body)} bytes; the limit is {self._max_body} bytes "
                "(send large content as a file reference)"
            )
        if conv.is_direct and req.sender_id not in conv.pair:
            raise PermissionDenied(
                f"{req.sender_id} is not one of the two users of {conv.value}; send to "
                f"d:<you>:<peer> with the two ids in ascending order"
            )
        return conv

    async def send(self, req: SendRequest) -> SendAck:
        """Stores the message and returns its ACK.

        When this returns, the message, the sender's timeline row and the outbox row
        are committed (I3); a repeat of (sender_id, client_msg_id), concurrent or
        later, in the same batch or not, returns the first send's ACK with
        duplicate=True and stores nothing (I2). The trigger is then published to
        JetStream, after the answer (`ack_before_publish`, the default) or before
        it; if that fails the send still succeeds and the outbox relay publishes
        it later (I4).

        Raises InvalidArgument, NotFound (unknown group), PermissionDenied (not a
        member), FailedPrecondition (an unknown UUIDv7 client_msg_id older than the
        dedup window: it may be a resend whose key was pruned; nothing written),
        SequenceRegression (seqsvc went back; nothing written) and Unavailable
        (PostgreSQL or seqsvc down; nothing written, retry).
        """
        if req.kind in RECEIPTS:
            # Read and delivered positions share the messages' batches (they are
            # the most frequent events: one per receiver and conversation).
            if self._events is None:
                raise InvalidArgument("conversation events are not enabled in this logic")
            conv = self._events.validate(
                req.sender_id,
                req.sender_device_id,
                req.client_msg_id,
                req.conversation_id,
                req.kind,
                req.target_conv_seq,
                req.body,
            )
        elif req.kind not in (0, KIND_MESSAGE):
            if self._events is None:
                raise InvalidArgument("conversation events are not enabled in this logic")
            ack = await self._events.apply(
                req.sender_id,
                req.sender_device_id,
                req.client_msg_id,
                req.conversation_id,
                req.kind,
                req.target_conv_seq,
                req.body,
                req.content_type,
            )
            trace.get_current_span().set_attributes(_ack_attributes(ack))
            return ack
        else:
            conv = self.validate(req)
        loop = asyncio.get_running_loop()
        item = _Item(req, conv, loop.create_future())
        if self._batch_max == 1:
            # One send, one transaction, in the caller's task and trace.
            attributes = {
                "im.user_id": req.sender_id,
                "im.device_id": req.sender_device_id,
                "im.conversation_id": conv.value,
                "im.client_msg_id": req.client_msg_id,
            }
            committed = await self._run_batch([item], attributes)
            if self._ack_first:
                self._finish_later(committed)
            else:
                await self._finish(committed)
        else:
            if self._closed:
                raise Unavailable("logic is shutting down; retry")
            item.ctx = otel_context.get_current()
            self._queue.append(item)
            self._ready.set()
            self._start_committers()
        ack = await item.future
        self._stored(req, conv, ack)
        return ack

    # -- the committer ----------------------------------------------------------

    def _start_committers(self) -> None:
        if len(self._tasks) == self._committers:
            return
        for n in range(len(self._tasks), self._committers):
            # A fresh context: the batches' spans must not join the trace of the
            # send that happened to start the committer.
            task = asyncio.get_running_loop().create_task(
                self._committer(), name=f"logic-send-committer-{n}", context=contextvars.Context()
            )
            self._tasks.append(task)

    async def _committer(self) -> None:
        """Takes a batch whenever it is free and there is work; never raises."""
        while True:
            await self._ready.wait()
            if self._linger and len(self._queue) < self._batch_max:
                await asyncio.sleep(self._linger)
            batch: list[_Item] = []
            while self._queue and len(batch) < self._batch_max:
                item = self._queue.popleft()
                if not item.future.done():  # the caller gave up (deadline): skip it
                    batch.append(item)
            if not self._queue:
                self._ready.clear()
            if not batch:
                continue
            try:
                committed = await self._run_batch(batch, None)
            except asyncio.CancelledError:
                _fail(batch, Unavailable("logic is shutting down; retry"))
                raise
            except LogicError:
                continue  # _run_batch has answered every item
            except Exception:
                # A bug (the callers get INTERNAL); the committer goes on.
                log.exception("send batch failed", extra={"batch_size": len(batch)})
                continue
            self._finish_later(committed)

    def _finish_later(self, committed: _Committed) -> None:
        task = asyncio.get_running_loop().create_task(self._finish(committed))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def close(self) -> None:
        """Stops the committers; queued sends fail UNAVAILABLE (nothing written).
        Idempotent."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        _fail(list(self._queue), Unavailable("logic is shutting down; retry"))
        self._queue.clear()
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    # -- one batch --------------------------------------------------------------

    async def _run_batch(self, items: list[_Item], attributes: dict[str, Any] | None) -> _Committed:
        """Runs the batch's transaction (retrying a lost dedup race). On failure
        every item's future gets the error and it is raised again."""
        self._tel.send_batch_size.observe(len(items))
        if attributes is None:
            attributes = {
                "im.batch_size": len(items),
                "im.user_ids": ids(i.req.sender_id for i in items),
                "im.conversation_ids": ids(i.conv.value for i in items),
            }
        # The batch's span continues the first caller's trace (in the one-send path,
        # the caller's own) and links the other callers' spans.
        links = []
        for item in items[1:]:
            span_context = trace.get_current_span(item.ctx).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
        try:
            for attempt in range(1, DEDUP_RACE_ATTEMPTS + 1):
                try:
                    with (
                        self._db.errors(),
                        self._tel.db("send", attributes, links=links, context=items[0].ctx) as span,
                    ):
                        committed = await self._commit(items)
                        new = [
                            i.outcome
                            for i in items
                            if isinstance(i.outcome, SendAck) and not i.outcome.duplicate
                        ]
                        span.set_attributes({"im.stored": len(new)})
                        if len(items) == 1 and isinstance(items[0].outcome, SendAck):
                            span.set_attributes(_ack_attributes(items[0].outcome))
                    if committed.triggers and self._faults.crash_after_commit:
                        self._faults.crash_now()
                    return committed
                except pg_errors.UniqueViolation as exc:
                    # Sends of one sender serialise on its lock, and the dedup lookup
                    # runs under it, so two identical sends cannot both get here...
                    # unless the locks are off. The constraint still decides; the
                    # retry reads the winner's row, and the loser answers with the
                    # winner's ACK, as a retransmit would get.
                    if (
                        exc.diag.constraint_name != "send_dedup_pkey"
                        or attempt == DEDUP_RACE_ATTEMPTS
                    ):
                        raise
                    log.info("send batch lost a dedup race; retrying", extra={"attempt": attempt})
            raise AssertionError("unreachable")
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                _fail(items, Unavailable("logic is shutting down; retry"))
            else:
                _fail(items, exc)
            raise

    async def _commit(self, items: list[_Item]) -> _Committed:
        """The batch transaction. Sets each item's outcome; returns the triggers."""
        for item in items:
            item.outcome = None
        # An ACK promises the message survives a failover: a commit the standby
        # did not confirm (its wait cancelled) fails the batch instead (I3).
        async with self._db.pool.connection() as conn:
            with commits_confirmed(conn):
                async with conn.transaction():
                    if not self._faults.skip_locks:
                        locks = {(LOCK_CONV_SEND, lock_key(i.conv.value)) for i in items}
                        locks |= {(LOCK_USER, lock_key(i.req.sender_id)) for i in items}
                        await repo.lock_send_tx(conn, sorted(locks))
                    states = await repo.read_send_states_tx(
                        conn,
                        [
                            repo.SendKey(
                                i.req.sender_id, i.req.client_msg_id, i.conv.value, i.req.kind
                            )
                            for i in items
                        ],
                    )
                    new = self._decide(items, states)
                    if not new:
                        if any(isinstance(i.outcome, SendAck) for i in items):
                            # Only duplicates: ACK them once the standby has what they
                            # name (a no-op wait without synchronous replication).
                            await repo.await_replication_tx(conn)
                        return _Committed(items, [])
                    keys: list[str] = []
                    for item in new:
                        keys += [item.conv.seq_key, user_seq_key(item.req.sender_id)]
                    values = await self._seq.next_batch(keys)
                    if len(values) != len(keys):
                        raise DependencyFailed(
                            f"seqsvc returned {len(values)} values for {len(keys)} keys"
                        )
                    msgs = self._number(new, states, items, values)
                    stored = await repo.insert_messages_tx(
                        conn,
                        msgs,
                        dedup=not self._faults.skip_dedup,
                        outbox=not self._faults.skip_outbox,
                        repair_after_s=self._repair_after,
                    )
                    raised = _raised_positions(msgs)
                    if raised:
                        await repo.raise_positions_tx(conn, raised)
        last: dict[str, tuple[logic_pb2.MessageCommitted, _Item]] = {}
        for item, msg, (msg_id, server_time_ms) in zip(new, msgs, stored, strict=True):
            item.outcome = SendAck(msg_id, msg.sender_seq, msg.conv_seq, server_time_ms, False)
            last[msg.conversation_id] = (
                logic_pb2.MessageCommitted(
                    conversation_id=msg.conversation_id, msg_id=msg_id, conv_seq=msg.conv_seq
                ),
                item,
            )
        first: dict[tuple[str, str], SendAck] = {}
        for item in items:
            key = (item.req.sender_id, item.req.client_msg_id)
            if isinstance(item.outcome, SendAck) and not item.outcome.duplicate:
                first.setdefault(key, item.outcome)
            elif item.outcome is None:  # a repeat of a send stored by this batch
                item.outcome = replace(first[key], duplicate=True)
        return _Committed(items, list(last.values()))

    def _decide(self, items: list[_Item], states: list[repo.SendState]) -> list[_Item]:
        """Per send, in queue order: duplicate, refused, or new (returned). A repeat
        of a send that is new in this batch keeps outcome None (its ACK is the first
        one's, known after the insert)."""
        new: list[_Item] = []
        in_batch: set[tuple[str, str]] = set()
        #: (sender, conversation, kind) -> position, as raised by earlier items.
        positions: dict[tuple[str, str, int], int] = {}
        for item, state in zip(items, states, strict=True):
            req, conv = item.req, item.conv
            key = (req.sender_id, req.client_msg_id)
            if not self._faults.skip_dedup:
                if state.stored is not None:
                    item.outcome = state.stored
                    continue
                if key in in_batch:
                    continue
                expired = dedup_window_refusal(req.client_msg_id, self._dedup_window_ms)
                if expired is not None:
                    item.outcome = expired
                    continue
            if not conv.is_direct:
                if state.kind is None:
                    item.outcome = NotFound(
                        f"group {conv.value} does not exist (create it with CreateGroup)"
                    )
                    continue
                if not state.is_member:
                    item.outcome = PermissionDenied(
                        f"{req.sender_id} is not a member of {conv.value}; ask a member to "
                        "add you (AddMembers)"
                    )
                    continue
            if req.kind in RECEIPTS:
                refused = _position_outcome(req, conv, state, positions)
                if refused is not None:
                    item.outcome = refused
                    continue
            in_batch.add(key)
            new.append(item)
        return new

    def _number(
        self,
        new: list[_Item],
        states: list[repo.SendState],
        items: list[_Item],
        values: list[int],
    ) -> list[repo.NewMessage]:
        """The new messages with their seqsvc values, each checked to be above the
        last committed (or earlier in the batch) value of its key (I1/I5)."""
        state_of = {id(item): state for item, state in zip(items, states, strict=True)}
        last_conv: dict[str, int] = {}
        last_user: dict[str, int] = {}
        msgs = []
        for n, item in enumerate(new):
            req, conv = item.req, item.conv
            conv_seq, seq = values[2 * n], values[2 * n + 1]
            state = state_of[id(item)]
            prev_conv = last_conv.get(conv.value, state.last_conv_seq)
            prev_seq = last_user.get(req.sender_id, state.last_seq)
            if not self._faults.skip_seq_check:
                check_above("conv_seq", conv_seq, conv.seq_key, prev_conv)
                check_above("seq", seq, user_seq_key(req.sender_id), prev_seq)
            last_conv[conv.value] = max(prev_conv, conv_seq)
            last_user[req.sender_id] = max(prev_seq, seq)
            msgs.append(
                repo.NewMessage(
                    conversation_id=conv.value,
                    conv_seq=conv_seq,
                    sender_id=req.sender_id,
                    sender_device_id=req.sender_device_id,
                    client_msg_id=req.client_msg_id,
                    sender_seq=seq,
                    content_type=req.content_type,
                    body=req.body,
                    direct_pair=conv.pair,
                    kind=req.kind or KIND_MESSAGE,
                    target_conv_seq=req.target_conv_seq or None,
                )
            )
        return msgs

    async def _finish(self, committed: _Committed) -> None:
        """After the commit: the triggers (one per conversation) and the answers,
        the answers first unless they wait for the publish (`ack_before_publish`
        off). A failed publish never fails a send: the outbox relay publishes it
        later (I4), which is also why an answer need not wait for it."""
        if self._ack_first:
            self._answer(committed)
        if committed.triggers and not self._faults.skip_outbox:
            await asyncio.gather(*(self._publish(t, item) for t, item in committed.triggers))
        self._answer(committed)

    @staticmethod
    def _answer(committed: _Committed) -> None:
        for item in committed.items:
            if item.future.done():
                continue
            if isinstance(item.outcome, SendAck):
                item.future.set_result(item.outcome)
            else:
                item.future.set_exception(item.outcome or RuntimeError("send without outcome"))

    async def _publish(self, trigger: logic_pb2.MessageCommitted, item: _Item) -> None:
        """Publishes in the trace of the send whose message the trigger names."""
        token = otel_context.attach(item.ctx) if item.ctx is not None else None
        try:
            if await self._publisher.publish(trigger, str(trigger.msg_id), "send"):
                self._cleaner.discard(trigger.msg_id)
        finally:
            if token is not None:
                otel_context.detach(token)

    def _stored(self, req: SendRequest, conv: ConversationId, ack: SendAck) -> None:
        """Metrics, the ids on the caller's span (the SendMessage server span), a
        debug line. Runs in the caller's task, outside the transaction's span."""
        self._tel.sends.labels("duplicate" if ack.duplicate else "new").inc()
        trace.get_current_span().set_attributes(
            {"im.user_id": req.sender_id, "im.conversation_id": conv.value, **_ack_attributes(ack)}
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "message stored",
                extra={
                    "msg_id": ack.msg_id,
                    "user_id": req.sender_id,
                    "device_id": req.sender_device_id,
                    "conversation_id": conv.value,
                    "seq": ack.seq,
                    "conv_seq": ack.conv_seq,
                    "duplicate": ack.duplicate,
                },
            )


def _position_outcome(
    req: SendRequest,
    conv: ConversationId,
    state: repo.SendState,
    positions: dict[tuple[str, str, int], int],
) -> SendAck | LogicError | None:
    """A READ or DELIVERED that must not be stored: a position above the
    conversation's last conv_seq (refused), or at or below the sender's current
    one (acknowledged with msg_id 0 and the current position: positions only move
    forward). None: store it. `positions` holds what earlier items of the batch
    raised; reading implies delivered (state.py)."""
    head = state.last_conv_seq
    if req.target_conv_seq > head:
        return InvalidArgument(
            f"position {req.target_conv_seq} is above {conv.value}'s last conv_seq {head}"
        )
    stored = state.read_pos if req.kind == KIND_READ else state.delivered_pos
    current = positions.get((req.sender_id, conv.value, req.kind), stored)
    if req.target_conv_seq <= current:
        return SendAck(0, 0, current, 0, duplicate=False)
    positions[(req.sender_id, conv.value, req.kind)] = req.target_conv_seq
    if req.kind == KIND_READ:
        key = (req.sender_id, conv.value, KIND_DELIVERED)
        positions[key] = max(positions.get(key, state.delivered_pos), req.target_conv_seq)
    return None


def _raised_positions(msgs: list[repo.NewMessage]) -> list[tuple[str, str, int, int]]:
    """(conversation, user, read, delivered) to raise for the batch's READ and
    DELIVERED rows, one per (conversation, user)."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for m in msgs:
        if m.kind not in RECEIPTS or m.target_conv_seq is None:
            continue
        read, delivered = out.get((m.conversation_id, m.sender_id), (0, 0))
        if m.kind == KIND_READ:
            read = max(read, m.target_conv_seq)
        delivered = max(delivered, m.target_conv_seq)
        out[(m.conversation_id, m.sender_id)] = (read, delivered)
    return [(c, u, r, d) for (c, u), (r, d) in out.items()]


def _fail(items: list[_Item], error: BaseException) -> None:
    """Answers every item still waiting with `error` (a domain error is copied per
    caller, so each caller raises its own exception object)."""
    for item in items:
        if not item.future.done():
            copy = type(error)(*error.args) if isinstance(error, LogicError) else error
            item.future.set_exception(copy)
            # Retrieved: a caller that awaits it still raises it; one that is gone
            # (or the one-send path, which raises the error itself) leaves no
            # "exception was never retrieved" noise behind.
            item.future.exception()
            # A caller that gave up never retrieves it; do not log it as unretrieved.
            item.future.exception()
