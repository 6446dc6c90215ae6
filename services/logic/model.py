"""Plain values passed between the repo, the domain code and the servicer."""

from __future__ import annotations

from dataclasses import dataclass, field


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
