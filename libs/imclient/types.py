"""Plain value types the SDK hands to applications (no protobuf in the app's way)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from im.common.v1 import common_pb2
from imclient.errors import SendFailed
from imclient.tokens import ID_PATTERN


class ContentType(enum.IntEnum):
    """How a body should be rendered (`im.common.v1.ContentType`)."""

    UNSPECIFIED = 0
    TEXT = 1
    IMAGE = 2
    FILE = 3
    CUSTOM = 4


def direct_conversation_id(user_a: str, user_b: str) -> str:
    """The id of the direct conversation of two distinct users: `d:<lo>:<hi>`."""
    for user in (user_a, user_b):
        if not ID_PATTERN.fullmatch(user):
            raise ValueError(f"invalid user id {user!r}: must match {ID_PATTERN.pattern}")
    if user_a == user_b:
        raise ValueError("a direct conversation needs two distinct users")
    lo, hi = sorted((user_a, user_b))
    return f"d:{lo}:{hi}"


@dataclass(frozen=True, slots=True)
class SendResult:
    """The gateway's SendAck: the message is durable and will reach every member.

    `duplicate` is True when the server says this send repeated one it had
    already stored (the ACK names that stored message): for the app it is an
    ACK like any other. It stays False with a gateway that does not say so."""

    client_msg_id: str
    msg_id: int
    seq: int  # the sender's own timeline position of this message
    conv_seq: int  # position in the conversation (the order every member sees)
    server_time_ms: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """How one submitted message ended, as `Client(on_send_result=...)` reports it:
    acknowledged (`result` set: durable, will reach every member) or refused for
    good (`error` set: never stored). `restored` marks a message this client
    did not get from `submit()` but loaded from the store's outbox, i.e. one a
    previous client (process) submitted and could not see answered; its outcome
    may repeat one that process already reported (same `msg_id`)."""

    client_msg_id: str
    conversation_id: str
    result: SendResult | None
    error: SendFailed | None
    restored: bool

    @property
    def acked(self) -> bool:
        return self.result is not None


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message. `seq` is its position in this user's timeline when it came
    from `Client.messages()` or `sync()`, and 0 when it came from `history()`."""

    seq: int
    msg_id: int
    conversation_id: str
    sender_id: str
    sender_device_id: str
    client_msg_id: str
    conv_seq: int
    content_type: ContentType
    body: bytes
    server_time_ms: int

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")

    @classmethod
    def from_pb(cls, m: common_pb2.Message, seq: int = 0) -> Message:
        try:
            ctype = ContentType(m.content_type)
        except ValueError:
            ctype = ContentType.UNSPECIFIED
        return cls(
            seq=seq,
            msg_id=m.msg_id,
            conversation_id=m.conversation_id,
            sender_id=m.sender_id,
            sender_device_id=m.sender_device_id,
            client_msg_id=m.client_msg_id,
            conv_seq=m.conv_seq,
            content_type=ctype,
            body=bytes(m.body),
            server_time_ms=m.server_time_ms,
        )


class ConversationKind(enum.IntEnum):
    UNSPECIFIED = 0
    DIRECT = 1
    GROUP = 2


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    kind: ConversationKind
    name: str
    member_ids: tuple[str, ...]
    last_conv_seq: int
    owner_id: str

    @classmethod
    def from_pb(cls, c: common_pb2.Conversation) -> Conversation:
        try:
            kind = ConversationKind(c.kind)
        except ValueError:
            kind = ConversationKind.UNSPECIFIED
        return cls(
            conversation_id=c.conversation_id,
            kind=kind,
            name=c.name,
            member_ids=tuple(c.member_ids),
            last_conv_seq=c.last_conv_seq,
            owner_id=c.owner_id,
        )


@dataclass(frozen=True, slots=True)
class SyncPage:
    """Timeline entries with seq > the requested `after_seq`, ascending.
    `store_epoch` names the database their seqs belong to ("" from an older
    server): seqs of different epochs cannot be compared."""

    messages: list[Message]
    has_more: bool
    store_epoch: str = ""


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A conversation's messages, newest first (`seq` is 0)."""

    messages: list[Message]
    has_more: bool
