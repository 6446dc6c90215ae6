"""Per-conversation state a client derives from the timeline entries it applied
(pure: no I/O, no clock of its own).

Read positions, receipts, edits and recalls are timeline entries with their own
conv_seq (`MessageKind`), so they reach a device in seq order, exactly once,
like messages. `ConversationStates.apply` folds each entry into the state of
its conversation; every rule is monotonic or idempotent (positions only move
forward, a recall is for good, an edit only replaces an older edit), so
applying an entry twice, or a SendAck's view of it before the entry itself,
changes nothing more.

Who the entries are about:
- READ / DELIVERED by this user (any of its devices): its own positions
  (a read position is a delivered one too: reading implies receiving).
- READ / DELIVERED by the other user of a direct conversation: the peer's
  positions, i.e. the receipts of this user's messages up to them. Group
  members' reads are never pushed (ask `get_receipts`).
- EDIT / RECALL by anyone: the target message's current body.
- DELETE_FOR_ME by this user: the target is hidden on this user's devices.

The state lives in memory and starts empty in every process; a
`list_conversations()` call seeds the positions (`seed`). What it keeps of
edits, recalls and deletions grows with the events this process saw.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from imclient.types import (
    ContentType,
    Conversation,
    Message,
    MessageKind,
    SendResult,
    TypingNotice,
)


def is_direct(conversation_id: str) -> bool:
    """Direct conversations are `d:<lo>:<hi>`; groups `g:...`."""
    return conversation_id.startswith("d:")


@dataclass(frozen=True, slots=True)
class Edit:
    """The newest edit of a message: its body, when (`edited_at_ms`, the EDIT's
    server time) and the EDIT entry's own conv_seq (a later one wins)."""

    body: bytes
    edited_at_ms: int
    edit_conv_seq: int

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass(slots=True)
class ConversationState:
    """What a client knows of one conversation from the entries it applied
    (and the acknowledgements of its own events, and `list_conversations()`).
    `Client.conversation_state()` hands out copies: changing one changes
    nothing in the client.

    - `read_conv_seq` / `delivered_conv_seq`: this user's positions (set by
      any of its devices).
    - `peer_read_conv_seq` / `peer_delivered_conv_seq`: in a direct
      conversation, the peer's: this user's messages at or below them have
      been read / delivered. 0 in groups.
    - `last_conv_seq`: the highest conv_seq of any entry applied.
    - `recalled`: conv_seqs of messages recalled (their bodies are gone).
    - `edits`: conv_seq -> the newest `Edit` of that message.
    - `deleted_for_me`: conv_seqs this user hid.
    - `typing`: user id -> when its typing notice expires (event-loop time).
    """

    conversation_id: str
    read_conv_seq: int = 0
    delivered_conv_seq: int = 0
    peer_read_conv_seq: int = 0
    peer_delivered_conv_seq: int = 0
    last_conv_seq: int = 0
    recalled: set[int] = field(default_factory=set)
    edits: dict[int, Edit] = field(default_factory=dict)
    deleted_for_me: set[int] = field(default_factory=set)
    typing: dict[str, float] = field(default_factory=dict)

    @property
    def direct(self) -> bool:
        return is_direct(self.conversation_id)

    def typing_users(self, now: float) -> list[str]:
        """Users whose typing notice has not expired at `now` (event-loop time)."""
        return sorted(u for u, until in self.typing.items() if until > now)

    def current(self, message: Message) -> Message:
        """`message` (a MESSAGE of this conversation) as it stands after the
        edits, recalls and deletions applied here: the newest body and
        `edited_at_ms`, or an empty body with `recalled` / `deleted_for_me`."""
        if message.kind != MessageKind.MESSAGE:
            return message
        cs = message.conv_seq
        if cs in self.recalled:
            return _replace(message, body=b"", recalled=True)
        if cs in self.deleted_for_me:
            return _replace(message, body=b"", deleted_for_me=True)
        edit = self.edits.get(cs)
        if edit is not None and edit.edited_at_ms >= message.edited_at_ms:
            return _replace(message, body=edit.body, edited_at_ms=edit.edited_at_ms)
        return message

    def snapshot(self) -> ConversationState:
        return copy.deepcopy(self)


def _replace(message: Message, **changes: object) -> Message:
    return dataclasses.replace(message, **changes)  # type: ignore[arg-type]


class ConversationStates:
    """The `ConversationState` of every conversation a client has seen. Not
    thread-safe (one asyncio loop)."""

    def __init__(self) -> None:
        self._states: dict[str, ConversationState] = {}
        self.user_id: str | None = None  # set once the account is known

    def get(self, conversation_id: str) -> ConversationState:
        state = self._states.get(conversation_id)
        if state is None:
            state = self._states[conversation_id] = ConversationState(conversation_id)
        return state

    def known(self) -> list[str]:
        return list(self._states)

    def apply(self, m: Message) -> bool:
        """Folds one timeline entry in. Returns True if it changed the state.
        Idempotent; entries are expected in timeline order (an older EDIT after
        a newer one of the same message is ignored all the same)."""
        s = self.get(m.conversation_id)
        changed = False
        if m.conv_seq > s.last_conv_seq:
            s.last_conv_seq = m.conv_seq
            changed = True
        mine = self.user_id is not None and m.sender_id == self.user_id
        kind = m.kind
        if kind == MessageKind.MESSAGE:
            if s.typing.pop(m.sender_id, None) is not None:
                changed = True
        elif kind == MessageKind.READ:
            # Reading implies receiving: the delivered position follows.
            if mine:
                changed |= _raise(s, "read_conv_seq", m.target_conv_seq)
                changed |= _raise(s, "delivered_conv_seq", m.target_conv_seq)
            elif s.direct:
                changed |= _raise(s, "peer_read_conv_seq", m.target_conv_seq)
                changed |= _raise(s, "peer_delivered_conv_seq", m.target_conv_seq)
        elif kind == MessageKind.DELIVERED:
            if mine:
                changed |= _raise(s, "delivered_conv_seq", m.target_conv_seq)
            elif s.direct:
                changed |= _raise(s, "peer_delivered_conv_seq", m.target_conv_seq)
        elif kind == MessageKind.EDIT:
            target = m.target_conv_seq
            old = s.edits.get(target)
            if target not in s.recalled and (old is None or old.edit_conv_seq < m.conv_seq):
                s.edits[target] = Edit(m.body, m.server_time_ms, m.conv_seq)
                changed = True
        elif kind == MessageKind.RECALL:
            if m.target_conv_seq not in s.recalled:
                s.recalled.add(m.target_conv_seq)
                s.edits.pop(m.target_conv_seq, None)
                changed = True
        elif (
            kind == MessageKind.DELETE_FOR_ME and mine and m.target_conv_seq not in s.deleted_for_me
        ):
            s.deleted_for_me.add(m.target_conv_seq)
            changed = True
        return changed

    def apply_ack(
        self,
        conversation_id: str,
        kind: MessageKind,
        target_conv_seq: int,
        body: bytes,
        result: SendResult,
    ) -> bool:
        """This user's own event was acknowledged (durable): its effect holds
        before its entry comes back through the timeline. A READ/DELIVERED that
        stored nothing (`result.stored` False) names the current position in
        `conv_seq`."""
        if kind == MessageKind.MESSAGE or kind == MessageKind.UNSPECIFIED:
            return False
        if kind in (MessageKind.READ, MessageKind.DELIVERED) and not result.stored:
            target_conv_seq = result.conv_seq
        s = self.get(conversation_id)
        if kind == MessageKind.READ:
            delivered = _raise(s, "delivered_conv_seq", target_conv_seq)
            return _raise(s, "read_conv_seq", target_conv_seq) or delivered
        if kind == MessageKind.DELIVERED:
            return _raise(s, "delivered_conv_seq", target_conv_seq)
        entry = Message(
            seq=0,
            msg_id=result.msg_id,
            conversation_id=conversation_id,
            sender_id=self.user_id or "",
            sender_device_id="",
            client_msg_id=result.client_msg_id,
            conv_seq=result.conv_seq,
            content_type=ContentType.UNSPECIFIED,
            body=body,
            server_time_ms=result.server_time_ms,
            kind=kind,
            target_conv_seq=target_conv_seq,
        )
        return self.apply(entry)

    def seed(self, conversations: Iterable[Conversation]) -> None:
        """Raises the positions to what the server reported (never lowers)."""
        for c in conversations:
            s = self.get(c.conversation_id)
            _raise(s, "read_conv_seq", c.read_conv_seq)
            _raise(s, "peer_read_conv_seq", c.peer_read_conv_seq)
            _raise(
                s, "peer_delivered_conv_seq", max(c.peer_delivered_conv_seq, c.peer_read_conv_seq)
            )
            _raise(s, "delivered_conv_seq", c.read_conv_seq)
            _raise(s, "last_conv_seq", c.last_conv_seq)

    def on_typing(self, notice: TypingNotice, now: float) -> None:
        s = self.get(notice.conversation_id)
        if notice.typing and notice.expires_in_ms > 0:
            s.typing[notice.user_id] = now + notice.expires_in_ms / 1000.0
        else:
            s.typing.pop(notice.user_id, None)


def _raise(s: ConversationState, attr: str, value: int) -> bool:
    if value > getattr(s, attr):
        setattr(s, attr, value)
        return True
    return False
