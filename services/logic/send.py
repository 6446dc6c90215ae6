"""SendMessage: the durable, idempotent, ordered store of one message (I1-I5)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from opentelemetry import trace
from psycopg import errors as pg_errors

from im.logic.v1 import logic_pb2
from logic import repo
from logic.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SequenceRegression,
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
    lock_key,
    parse_conversation_id,
    user_seq_key,
)
from logic.model import SendAck
from logic.outbox import OutboxCleaner
from logic.seq import SeqSource
from logic.store import Database
from logic.telemetry import Telemetry

log = logging.getLogger(__name__)


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
    ) -> None:
        self._db = db
        self._seq = seq
        self._tel = telemetry or Telemetry()
        self._publisher = publisher
        self._cleaner = cleaner
        self._max_body = max_body_bytes
        self._repair_after = repair_after_s
        self._faults = faults

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
        later, returns the first send's ACK with duplicate=True and stores nothing
        (I2). The trigger is then published to JetStream before returning; if that
        fails the send still succeeds and the outbox relay publishes it later (I4).

        Raises InvalidArgument, NotFound (unknown group), PermissionDenied (not a
        member), SequenceRegression (seqsvc went back; nothing written) and
        Unavailable (PostgreSQL or seqsvc down; nothing written, retry).
        """
        conv = self.validate(req)
        ids = {
            "im.user_id": req.sender_id,
            "im.device_id": req.sender_device_id,
            "im.conversation_id": conv.value,
            "im.client_msg_id": req.client_msg_id,
        }
        try:
            with self._db.errors(), self._tel.db("send", ids) as span:
                ack, trigger = await self._commit(req, conv)
                span.set_attributes(_ack_attributes(ack))
        except pg_errors.UniqueViolation as exc:
            # Sends of one sender serialise on its lock, and the dedup lookup runs
            # under it, so two identical sends cannot both get here... unless the
            # locks are off. The constraint still decides; the loser answers with
            # the winner's ACK, as a retransmit would get.
            if exc.diag.constraint_name != "send_dedup_pkey":
                raise
            with self._db.errors(), self._tel.db("find_send", ids):
                async with self._db.pool.connection() as conn:
                    stored = await repo.find_send(conn, req.sender_id, req.client_msg_id)
            if stored is None:
                raise
            self._stored(req, conv, stored)
            return stored
        self._stored(req, conv, ack)
        if trigger is not None:
            await self._after_commit(trigger)
        return ack

    def _stored(self, req: SendRequest, conv: ConversationId, ack: SendAck) -> None:
        """Metrics, the ids on the caller's span (the SendMessage server span), a
        debug line. Runs outside the transaction's span."""
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

    async def _commit(
        self, req: SendRequest, conv: ConversationId
    ) -> tuple[SendAck, logic_pb2.MessageCommitted | None]:
        """The send transaction (lock order: conversation, then the sender)."""
        async with self._db.pool.connection() as conn, conn.transaction():
            if not self._faults.skip_locks:
                await repo.lock_tx(
                    conn,
                    (LOCK_CONV_SEND, lock_key(conv.value)),
                    (LOCK_USER, lock_key(req.sender_id)),
                )
            state = await repo.read_send_state_tx(
                conn, req.sender_id, req.client_msg_id, conv.value
            )
            if state.stored is not None and not self._faults.skip_dedup:
                return state.stored, None
            if not conv.is_direct:
                if state.kind is None:
                    raise NotFound(
                        f"group {conv.value} does not exist (create it with CreateGroup)"
                    )
                if not state.is_member:
                    raise PermissionDenied(
                        f"{req.sender_id} is not a member of {conv.value}; ask a member to "
                        "add you (AddMembers)"
                    )
            conv_seq, seq = await self._seq.next_batch([conv.seq_key, user_seq_key(req.sender_id)])
            if not self._faults.skip_seq_check:
                if conv_seq <= state.last_conv_seq:
                    raise SequenceRegression(
                        f"seqsvc returned conv_seq {conv_seq} for {conv.seq_key}, not above the "
                        f"last committed {state.last_conv_seq}; nothing was written"
                    )
                if seq <= state.last_seq:
                    raise SequenceRegression(
                        f"seqsvc returned seq {seq} for u:{req.sender_id}, not above the last "
                        f"committed {state.last_seq}; nothing was written"
                    )
            msg = repo.NewMessage(
                conversation_id=conv.value,
                conv_seq=conv_seq,
                sender_id=req.sender_id,
                sender_device_id=req.sender_device_id,
                client_msg_id=req.client_msg_id,
                sender_seq=seq,
                content_type=req.content_type,
                body=req.body,
                direct_pair=conv.pair,
            )
            msg_id, server_time_ms = await repo.insert_message_tx(
                conn,
                msg,
                dedup=not self._faults.skip_dedup,
                outbox=not self._faults.skip_outbox,
                repair_after_s=self._repair_after,
            )
        ack = SendAck(msg_id, seq, conv_seq, server_time_ms, duplicate=False)
        trigger = logic_pb2.MessageCommitted(
            conversation_id=conv.value, msg_id=msg_id, conv_seq=conv_seq
        )
        return ack, trigger

    async def _after_commit(self, trigger: logic_pb2.MessageCommitted) -> None:
        """Publishes the committed message's trigger; never fails the send."""
        if self._faults.crash_after_commit:
            self._faults.crash_now()
        if self._faults.skip_outbox:
            return
        if await self._publisher.publish(trigger, str(trigger.msg_id), "send"):
            self._cleaner.discard(trigger.msg_id)
