"""Plain value types the SDK hands to applications (no protobuf in the app's way)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2
from imclient.errors import SendFailed
from imclient.tokens import ID_PATTERN


class ContentType(enum.IntEnum):
    """How a body should be rendered (`im.common.v1.ContentType`)."""

    UNSPECIFIED = 0
    TEXT = 1
    IMAGE = 2
    FILE = 3
    CUSTOM = 4


class MessageKind(enum.IntEnum):
    """What a timeline entry is (`im.common.v1.MessageKind`). Everything a user
    does to a conversation is an entry with its own conv_seq, stored, ordered
    and deduplicated like a chat message; only who receives it differs.

    - MESSAGE: a chat message (every member).
    - EDIT: the sender replaced the body of its message `target_conv_seq` with
      this entry's body (every member).
    - RECALL: the sender (or a group's owner) recalled message
      `target_conv_seq`; its body is deleted on the server (every member).
    - READ: the sender has read the conversation up to `target_conv_seq` (the
      sender's own devices; in a direct conversation also the peer's).
    - DELIVERED: the sender's devices have received the conversation up to
      `target_conv_seq` (direct conversations: both users' devices).
    - DELETE_FOR_ME: the sender hid message `target_conv_seq` from its own
      devices (only the sender's timeline).
    """

    UNSPECIFIED = 0
    MESSAGE = 1
    EDIT = 2
    RECALL = 3
    READ = 4
    DELIVERED = 5
    DELETE_FOR_ME = 6

    @property
    def is_event(self) -> bool:
        """True for everything but a chat message (a state change). UNSPECIFIED
        on an entry is a kind newer than this SDK: an event it does not know."""
        return self != MessageKind.MESSAGE


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

    @property
    def stored(self) -> bool:
        """False for a READ/DELIVERED at or below the position the server already
        had: nothing was stored (msg_id 0), and `conv_seq` is that current
        position. True for everything else the gateway acknowledged."""
        return self.msg_id != 0


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
    """A stored timeline entry: a chat message or a conversation event (`kind`).
    `seq` is its position in this user's timeline when it came from
    `Client.messages()` or `sync()`, and 0 when it came from `history()`.

    `target_conv_seq`: for EDIT, RECALL and DELETE_FOR_ME the conv_seq of the
    message acted on; for READ and DELIVERED the position set. The state flags
    describe a MESSAGE as the server serves it *now* (Sync and History serve
    the current state; a push carries the state at fan-out time):
    `edited_at_ms` is set once an EDIT replaced its body (the body is the
    newest one), `recalled` means a RECALL deleted its body (empty here, and
    gone from the server's database), `deleted_for_me` that this user hid it
    (empty body, only in this user's Sync and History).

    A server from before conversation events sends kind 0: read as MESSAGE. A
    kind newer than this SDK is UNSPECIFIED (an event; no state applied)."""

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
    kind: MessageKind = MessageKind.MESSAGE
    target_conv_seq: int = 0
    edited_at_ms: int = 0
    recalled: bool = False
    deleted_for_me: bool = False

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")

    @property
    def is_event(self) -> bool:
        """True for a conversation event (EDIT, RECALL, READ, DELIVERED,
        DELETE_FOR_ME), False for a chat message."""
        return self.kind.is_event

    @classmethod
    def from_pb(cls, m: common_pb2.Message, seq: int = 0) -> Message:
        try:
            ctype = ContentType(m.content_type)
        except ValueError:
            ctype = ContentType.UNSPECIFIED
        if m.kind == 0:
            kind = MessageKind.MESSAGE  # a server from before conversation events
        else:
            try:
                kind = MessageKind(m.kind)
            except ValueError:
                kind = MessageKind.UNSPECIFIED  # newer than this SDK: an event it ignores
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
            kind=kind,
            target_conv_seq=m.target_conv_seq,
            edited_at_ms=m.edited_at_ms,
            recalled=m.recalled,
            deleted_for_me=m.deleted_for_me,
        )


class ConversationKind(enum.IntEnum):
    UNSPECIFIED = 0
    DIRECT = 1
    GROUP = 2


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation as `list_conversations()` (and the group calls) return it.

    `last_conv_seq` is the highest conv_seq of any entry (events included).
    The caller's state, as of the call: `read_conv_seq` its read position
    (0: none), `unread_count` the chat messages by others above it (not
    recalled, not from before the caller joined), counted up to the server's
    cap (`unread_capped` then True: "9999+"), `last_activity_ms` the time of
    the newest chat message (or the group's creation). Direct conversations
    only: `peer_read_conv_seq` / `peer_delivered_conv_seq`, the peer's
    positions (the receipts of the caller's messages up to them). All are 0
    from a server before conversation state."""

    conversation_id: str
    kind: ConversationKind
    name: str
    member_ids: tuple[str, ...]
    last_conv_seq: int
    owner_id: str
    read_conv_seq: int = 0
    unread_count: int = 0
    unread_capped: bool = False
    last_activity_ms: int = 0
    peer_read_conv_seq: int = 0
    peer_delivered_conv_seq: int = 0

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
            read_conv_seq=c.read_conv_seq,
            unread_count=c.unread_count,
            unread_capped=c.unread_capped,
            last_activity_ms=c.last_activity_ms,
            peer_read_conv_seq=c.peer_read_conv_seq,
            peer_delivered_conv_seq=c.peer_delivered_conv_seq,
        )


@dataclass(frozen=True, slots=True)
class ConversationPage:
    """One page of `list_conversations()`: newest activity first.
    `next_page_token` is "" on the last page, else the token of the next one."""

    conversations: list[Conversation]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Receipts:
    """Read receipts of one message (`get_receipts()`), as of the call.

    "Read by `read_count` of `member_count`": `member_count` is the
    conversation's current members other than the message's sender (in a
    direct conversation 1, the peer), `read_count` those of them whose read
    position is at or above the message; the sender counts in neither.
    `reader_ids`: with `list_readers`, one page of who (by user id),
    `next_page_token` ("" = last page) for the next. `delivered`: direct
    conversations, the peer's delivered position is at or above it. In groups
    nothing is pushed per read: receipts are asked for, not received."""

    member_count: int
    read_count: int
    reader_ids: list[str]
    next_page_token: str
    delivered: bool


class PresenceState(enum.IntEnum):
    """`im.gateway.v1.PresenceState`."""

    UNSPECIFIED = 0
    ONLINE = 1  # at least one device has a live route
    OFFLINE = 2


@dataclass(frozen=True, slots=True)
class Presence:
    """A user's online state. `last_seen_ms`: offline, when a device of the user
    was last connected (Unix ms; 0 = unknown); online, now. Derived from the
    gateways' routes: a user whose gateway died shows offline no later than the
    route TTL after its last refresh."""

    user_id: str
    state: PresenceState
    last_seen_ms: int

    @property
    def online(self) -> bool:
        return self.state == PresenceState.ONLINE

    @classmethod
    def from_pb(cls, p: gateway_pb2.Presence) -> Presence:
        try:
            state = PresenceState(p.state)
        except ValueError:
            state = PresenceState.UNSPECIFIED
        return cls(p.user_id, state, p.last_seen_ms)


@dataclass(frozen=True, slots=True)
class PresenceUpdate:
    """Presence of users this connection subscribed to (`subscribe_presence`):
    their state when subscribed, then each change. Ephemeral: nothing is
    replayed after a reconnect except the current state on resubscribe."""

    presences: tuple[Presence, ...]

    @classmethod
    def from_pb(cls, u: gateway_pb2.PresenceUpdate) -> PresenceUpdate:
        return cls(tuple(Presence.from_pb(p) for p in u.presences))


@dataclass(frozen=True, slots=True)
class TypingNotice:
    """Another member's typing state in a conversation. Show it until
    `expires_in_ms` passes without a new notice, a notice with `typing=False`
    arrives, or a chat message from that user does. Ephemeral: never stored,
    may be lost, never delays a message."""

    conversation_id: str
    user_id: str
    device_id: str
    typing: bool
    expires_in_ms: int

    @classmethod
    def from_pb(cls, t: gateway_pb2.TypingNotice) -> TypingNotice:
        return cls(t.conversation_id, t.user_id, t.device_id, t.typing, t.expires_in_ms)


class FrameErrorCode(enum.IntEnum):
    """`im.gateway.v1.FrameErrorCode`."""

    UNSPECIFIED = 0
    INVALID_ARGUMENT = 1
    PERMISSION_DENIED = 2  # not a member / a stranger
    RATE_LIMITED = 3
    UNAVAILABLE = 4


@dataclass(frozen=True, slots=True)
class FrameError:
    """The gateway refused a Typing or SubscribePresence frame (`frame` names
    which: "typing" or "subscribe_presence"); nothing changed, the stream stays
    open. A notice for the app, not an exception: the SDK never raises it."""

    frame: str
    code: FrameErrorCode
    reason: str

    @classmethod
    def from_pb(cls, e: gateway_pb2.FrameError) -> FrameError:
        try:
            code = FrameErrorCode(e.code)
        except ValueError:
            code = FrameErrorCode.UNSPECIFIED
        return cls(e.frame, code, e.reason)


#: What `Client.signals()` yields and the signal callbacks receive.
Signal = TypingNotice | PresenceUpdate | FrameError


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
