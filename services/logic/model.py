"""Plain values passed between the repo, the domain code and the servicer."""

from __future__ import annotations

from dataclasses import dataclass, field

# im.common.v1.MessageKind values, as stored in messages.kind.
KIND_MESSAGE = 1
KIND_EDIT = 2
KIND_RECALL = 3
KIND_READ = 4
KIND_DELIVERED = 5
KIND_DELETE_FOR_ME = 6
#: Kinds fanned out to every member; the others go to their sender (and, for
#: RECEIPTS in a direct conversation, to the peer).
EVERY_MEMBER = frozenset({KIND_MESSAGE, KIND_EDIT, KIND_RECALL})
RECEIPTS = frozenset({KIND_READ, KIND_DELIVERED})


@dataclass(frozen=True)
class StoredMessage:
    msg_id: int
    conversation_id: str
    conv_seq: int
    sender_id: str
    sender_device_id: str
    client_msg_id: str
    content_type: int
    body: bytes
    server_time_ms: int
    kind: int = 1  # im.common.v1.MessageKind (1: a chat message)
    target_conv_seq: int = 0
    edited_at_ms: int = 0
    recalled: bool = False
    #: Set only as served to the user who deleted it for itself (body then empty).
    deleted_for_me: bool = False

    @property
    def wire_size(self) -> int:
        """Upper bound of this message's protobuf size besides the body."""
        return (
            64
            + len(self.conversation_id)
            + len(self.sender_id)
            + len(self.sender_device_id)
            + len(self.client_msg_id)
            + len(self.body)
        )


@dataclass(frozen=True)
class SendAck:
    msg_id: int
    seq: int
    conv_seq: int
    server_time_ms: int
    duplicate: bool


@dataclass(frozen=True)
class TimelineEntry:
    seq: int
    message: StoredMessage


@dataclass(frozen=True)
class Page:
    entries: list[TimelineEntry]
    has_more: bool
    #: > after_seq when retention deleted entries after the cursor: entries with a
    #: seq at or below it may be missing (0: nothing after the cursor was deleted).
    pruned_through_seq: int = 0


@dataclass(frozen=True)
class HistoryPage:
    messages: list[StoredMessage]
    has_more: bool


@dataclass(frozen=True)
class Delivery:
    user_id: str
    seq: int
    message: StoredMessage


@dataclass(frozen=True)
class FanoutResult:
    deliveries: list[Delivery]
    watermark: int
    has_more: bool


@dataclass(frozen=True)
class Conversation:
    conversation_id: str
    kind: int
    name: str = ""
    owner_id: str = ""
    member_ids: list[str] = field(default_factory=list)
    last_conv_seq: int = 0
    read_conv_seq: int = 0
    unread_count: int = 0
    unread_capped: bool = False
    last_activity_ms: int = 0
    peer_read_conv_seq: int = 0
    peer_delivered_conv_seq: int = 0
