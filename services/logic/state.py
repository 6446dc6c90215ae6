"""Conversation events: edit, recall, read and delivered positions, delete for me.

Each is stored like a chat message (send.py): a row of `messages` with its own
conv_seq, the sender's timeline row, the dedup key, the outbox row and the
pending-fan-out mark, in ONE transaction under the conversation's SEND lock and the
sender's USER lock (the global lock order). So an event is ordered against every
message of its conversation, stored once per client_msg_id, never stranded, and
fanned out like a message; fan-out (fanout.py `_by_kind`) decides who gets it.
What an event changes besides its own row (the target's body, a read position, a
hidden mark) is written in the same transaction, so a device never sees the event
without its effect or the effect without the event.

READ and DELIVERED, the frequent ones (one per receiver and conversation), are
stored by the send batches themselves (send.py `_position_outcome`): the batch's
one state read also reads the senders' positions, and one statement raises them.
EDIT, RECALL and DELETE_FOR_ME each run as a transaction of their own here (they
are rare and each reads its target). The rules, decided under the locks:

- READ / DELIVERED (send.py): target_conv_seq is the new position, 1..the
  conversation's last conv_seq. Positions only move forward: one at or below the
  current position stores nothing (acknowledged with msg_id 0 and conv_seq = the
  current position). DELIVERED exists in direct conversations only (`validate`).
- EDIT: the caller's own chat message, not recalled, within the edit window; its
  body becomes the edit's body (History and Sync serve the newest body).
- RECALL: the caller's own chat message, or any in a group the caller owns, within
  the recall window, not recalled yet. Its body and the bodies of its edits are
  deleted in this transaction: from the commit on, no read of the store returns them.
- DELETE_FOR_ME: a chat message in the caller's timeline; served to the caller from
  then on with an empty body.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from im.logic.v1 import logic_pb2
from imcommon.syncrep import commits_confirmed
from logic import repo
from logic.errors import (
    DependencyFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
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
from logic.model import (
    KIND_DELETE_FOR_ME,
    KIND_DELIVERED,
    KIND_EDIT,
    KIND_MESSAGE,
    KIND_READ,
    KIND_RECALL,
    RECEIPTS,
    SendAck,
)
from logic.outbox import OutboxCleaner
from logic.seq import SeqSource, check_above
from logic.store import Database
from logic.telemetry import Telemetry

log = logging.getLogger(__name__)

EVENT_KINDS = frozenset({KIND_EDIT, KIND_RECALL, KIND_READ, KIND_DELIVERED, KIND_DELETE_FOR_ME})
_NAMES = {
    KIND_EDIT: "EDIT",
    KIND_RECALL: "RECALL",
    KIND_READ: "READ",
    KIND_DELIVERED: "DELIVERED",
    KIND_DELETE_FOR_ME: "DELETE_FOR_ME",
}


class StateWriter:
    """Stores conversation events. One instance per process."""

    def __init__(
        self,
        db: Database,
        seq: SeqSource,
        publisher: TriggerPublisher,
        cleaner: OutboxCleaner,
        *,
        max_body_bytes: int,
        repair_after_s: float,
        edit_window_s: float,
        recall_window_s: float,
        faults: Faults,
        telemetry: Telemetry | None = None,
        dedup_window_s: float = 0.0,
    ) -> None:
        self._db = db
        self._dedup_window_ms = dedup_window_s * 1000
        self._seq = seq
        self._publisher = publisher
        self._cleaner = cleaner
        self._max_body = max_body_bytes
        self._repair_after = repair_after_s
        self._edit_window_ms = edit_window_s * 1000
        self._recall_window_ms = recall_window_s * 1000
        self._faults = faults
        self._tel = telemetry or Telemetry()

    def validate(
        self,
        sender_id: str,
        device_id: str,
        client_msg_id: str,
        conversation_id: str,
        kind: int,
        target_conv_seq: int,
        body: bytes,
    ) -> ConversationId:
        check_user_id(sender_id, "sender_id")
        check_device_id(device_id)
        check_client_msg_id(client_msg_id)
        conv = parse_conversation_id(conversation_id)
        if kind not in EVENT_KINDS:
            raise InvalidArgument(f"kind {kind} is not an event kind (2-6 of MessageKind)")
        name = _NAMES[kind]
        if target_conv_seq <= 0:
            raise InvalidArgument(f"a {name} needs target_conv_seq >= 1, got {target_conv_seq}")
        if kind == KIND_EDIT:
            if not body:
                raise InvalidArgument("an EDIT carries the new body; it is empty")
            if len(body) > self._max_body:
                raise InvalidArgument(
                    f"body is {len(body)} bytes; the limit is {self._max_body} bytes"
                )
        elif body:
            raise InvalidArgument(f"a {name} has no body; send it empty")
        if kind == KIND_DELIVERED and not conv.is_direct:
            raise InvalidArgument(
                "DELIVERED exists in direct conversations only (group receipts: GetReceipts)"
            )
        if conv.is_direct and sender_id not in conv.pair:
            raise PermissionDenied(f"{sender_id} is not one of the two users of {conv.value}")
        return conv

    async def apply(
        self,
        sender_id: str,
        device_id: str,
        client_msg_id: str,
        conversation_id: str,
        kind: int,
        target_conv_seq: int,
        body: bytes,
        content_type: int,
    ) -> SendAck:
        """Stores the event; returns its ACK (a duplicate's: the first one's).

        Raises InvalidArgument, NotFound (no group / no such message),
        PermissionDenied, FailedPrecondition (window passed, already recalled, a
        dedup key older than the dedup window), SequenceRegression, Unavailable.
        Every refusal writes nothing."""
        conv = self.validate(
            sender_id, device_id, client_msg_id, conversation_id, kind, target_conv_seq, body
        )
        if kind in RECEIPTS:
            raise InvalidArgument("READ and DELIVERED are stored by the send batches (send.py)")
        attrs = {
            "im.user_id": sender_id,
            "im.conversation_id": conv.value,
            "im.kind": _NAMES[kind],
            "im.target_conv_seq": target_conv_seq,
        }
        event = _Event(
            sender_id, device_id, client_msg_id, conv, kind, target_conv_seq, body, content_type
        )
        with self._db.errors(), self._tel.db("event", attrs):
            ack, trigger = await self._commit(event)
        self._tel.sends.labels("event_duplicate" if ack.duplicate else "event").inc()
        if trigger is None:
            return ack
        if self._faults.crash_after_commit:
            self._faults.crash_now()
        if not self._faults.skip_outbox and await self._publisher.publish(
            trigger, str(trigger.msg_id), "send"
        ):
            self._cleaner.discard(trigger.msg_id)
        return ack

    async def _commit(self, ev: _Event) -> tuple[SendAck, logic_pb2.MessageCommitted | None]:
        # As for messages (send.py): a commit the synchronous standby did not
        # confirm fails the call instead of being acknowledged.
        async with self._db.pool.connection() as conn:
            with commits_confirmed(conn):
                async with conn.transaction():
                    return await self._commit_tx(conn, ev)

    async def _commit_tx(
        self, conn: repo.Conn, ev: _Event
    ) -> tuple[SendAck, logic_pb2.MessageCommitted | None]:
        conv = ev.conv
        await repo.lock_send_tx(
            conn,
            sorted({(LOCK_CONV_SEND, lock_key(conv.value)), (LOCK_USER, lock_key(ev.sender_id))}),
        )
        [state] = await repo.read_send_states_tx(
            conn, [repo.SendKey(ev.sender_id, ev.client_msg_id, conv.value)]
        )
        if state.stored is not None:
            # Acknowledged once the standby has it (see repo.await_replication_tx).
            await repo.await_replication_tx(conn)
            return state.stored, None
        expired = dedup_window_refusal(ev.client_msg_id, self._dedup_window_ms)
        if expired is not None:
            raise expired
        if not conv.is_direct:
            if state.kind is None:
                raise NotFound(f"group {conv.value} does not exist")
            if not state.is_member:
                raise PermissionDenied(f"{ev.sender_id} is not a member of {conv.value}")
        head = state.last_conv_seq
        target_msg_id = await self._check_target(conn, ev)
        values = await self._seq.next_batch([conv.seq_key, user_seq_key(ev.sender_id)])
        if len(values) != 2:
            raise DependencyFailed(f"seqsvc returned {len(values)} values for 2 keys")
        conv_seq, seq = values
        if not self._faults.skip_seq_check:
            check_above("conv_seq", conv_seq, conv.seq_key, head)
            check_above("seq", seq, user_seq_key(ev.sender_id), state.last_seq)
        [(msg_id, time_ms)] = await repo.insert_messages_tx(
            conn,
            [
                repo.NewMessage(
                    conversation_id=conv.value,
                    conv_seq=conv_seq,
                    sender_id=ev.sender_id,
                    sender_device_id=ev.device_id,
                    client_msg_id=ev.client_msg_id,
                    sender_seq=seq,
                    content_type=ev.content_type,
                    body=ev.body,
                    direct_pair=conv.pair,
                    kind=ev.kind,
                    target_conv_seq=ev.target,
                )
            ],
            dedup=not self._faults.skip_dedup,
            outbox=not self._faults.skip_outbox,
            repair_after_s=self._repair_after,
        )
        if ev.kind == KIND_EDIT:
            await repo.edit_message_tx(conn, target_msg_id, ev.body, time_ms)
        elif ev.kind == KIND_RECALL:
            await repo.recall_message_tx(conn, conv.value, ev.target)
        else:
            await repo.hide_message_tx(conn, ev.sender_id, target_msg_id)
        ack = SendAck(msg_id, seq, conv_seq, time_ms, duplicate=False)
        trigger = logic_pb2.MessageCommitted(
            conversation_id=conv.value, msg_id=msg_id, conv_seq=conv_seq
        )
        return ack, trigger

    async def _check_target(self, conn: repo.Conn, ev: _Event) -> int:
        """The msg_id of the chat message an EDIT, RECALL or DELETE_FOR_ME acts on,
        after the rules of its kind; raises the refusal."""
        name = _NAMES[ev.kind]
        target = await repo.target_message_tx(conn, ev.conv.value, ev.target)
        if target is None or target.kind != KIND_MESSAGE:
            raise NotFound(f"{ev.conv.value} has no chat message at conv_seq {ev.target}")
        if ev.kind == KIND_DELETE_FOR_ME:
            if not await repo.in_timeline(conn, ev.sender_id, target.msg_id):
                raise NotFound(
                    f"message {ev.target} of {ev.conv.value} is not in {ev.sender_id}'s timeline"
                )
            return target.msg_id
        if target.recalled:
            raise FailedPrecondition(f"message {ev.target} of {ev.conv.value} is recalled already")
        if target.sender_id != ev.sender_id:
            owner = (
                await repo.group_owner(conn, ev.conv.value)
                if ev.kind == KIND_RECALL and not ev.conv.is_direct
                else None
            )
            if owner != ev.sender_id:
                who = "its sender or the group's owner" if ev.kind == KIND_RECALL else "its sender"
                raise PermissionDenied(
                    f"only {who} may {name.lower()} message {ev.target} of {ev.conv.value}"
                )
        window_ms = self._edit_window_ms if ev.kind == KIND_EDIT else self._recall_window_ms
        age_ms = time.time() * 1000 - target.server_time_ms
        if age_ms > window_ms:
            setting = (
                "IM_LOGIC_EDIT_WINDOW_S" if ev.kind == KIND_EDIT else "IM_LOGIC_RECALL_WINDOW_S"
            )
            raise FailedPrecondition(
                f"message {ev.target} is {age_ms / 1000:.0f} s old; a {name} is allowed for "
                f"{window_ms / 1000:g} s ({setting})"
            )
        return target.msg_id


@dataclass(frozen=True)
class _Event:
    sender_id: str
    device_id: str
    client_msg_id: str
    conv: ConversationId
    kind: int
    target: int
    body: bytes
    content_type: int
