"""Python client SDK for the IM gateway (asyncio, grpc.aio).

`Client` is one device's connection: reliable sends (`send`, `submit`; kept in
the store's outbox until answered, so they survive an app restart), in-order
exactly-once delivery (`messages()` or an `on_message` callback), and the unary
calls (`sync`, `history`, groups). Conversation state rides the same path:
`mark_read`, `mark_delivered`, `edit`, `recall` and `delete_for_me` are events
sent like messages and received as timeline entries (`Message.kind`), which
the client folds into a `ConversationState` per conversation (read positions,
the peer's receipts, edits, recalls); `list_conversations` gives unread
counts, `get_receipts` a group's "read by N of M". Typing and presence are
ephemeral (`typing`, `subscribe_presence`; received through `signals()` or an
`on_signal` callback). `GatewayApi` is the unary calls alone, without
a stream. Both speak TLS unless given `insecure=True` (`imclient.tls`). The
protocol state machines (`SendWindow`, `Receiver`) are pure and usable on their
own. See `imclient.client` for the guarantees.

`imclient.tokens` is for the server side of an app: its backend mints each
device's token there (`mint_token`), with the secret it shares with the gateways.
Install: `pip install ./sdk/python` (also installs the `imctl` command).
"""

from imclient.client import (
    Client,
    ClientStats,
    DebugHooks,
    MessageHandler,
    SendResultHandler,
    SignalHandler,
)
from imclient.errors import (
    AuthError,
    ClientClosed,
    ConnectTimeout,
    ImClientError,
    InvalidArgument,
    Kicked,
    NotFound,
    OutboxFull,
    PermissionDenied,
    ProtocolError,
    RpcError,
    SendErrorCode,
    SendFailed,
    TLSError,
    Unauthenticated,
    Unavailable,
)
from imclient.policy import ReconnectPolicy, RetransmitPolicy
from imclient.receiver import Entry, Receiver
from imclient.sender import SendWindow
from imclient.state import ConversationState, ConversationStates, Edit
from imclient.store import DEFAULT_MAX_OUTBOX, MemoryStore, OutboxEntry, SQLiteStore, Store
from imclient.tls import TLSConfig
from imclient.types import (
    ContentType,
    Conversation,
    ConversationKind,
    ConversationPage,
    FrameError,
    FrameErrorCode,
    HistoryPage,
    Message,
    MessageKind,
    Presence,
    PresenceState,
    PresenceUpdate,
    Receipts,
    SendOutcome,
    SendResult,
    Signal,
    SyncPage,
    TypingNotice,
    direct_conversation_id,
)
from imclient.unary import GatewayApi, TokenSource

__all__ = [
    "DEFAULT_MAX_OUTBOX",
    "AuthError",
    "Client",
    "ClientClosed",
    "ClientStats",
    "ConnectTimeout",
    "ContentType",
    "Conversation",
    "ConversationKind",
    "ConversationPage",
    "ConversationState",
    "ConversationStates",
    "DebugHooks",
    "Edit",
    "Entry",
    "FrameError",
    "FrameErrorCode",
    "GatewayApi",
    "HistoryPage",
    "ImClientError",
    "InvalidArgument",
    "Kicked",
    "MemoryStore",
    "Message",
    "MessageHandler",
    "MessageKind",
    "NotFound",
    "OutboxEntry",
    "OutboxFull",
    "PermissionDenied",
    "Presence",
    "PresenceState",
    "PresenceUpdate",
    "ProtocolError",
    "Receipts",
    "Receiver",
    "ReconnectPolicy",
    "RetransmitPolicy",
    "RpcError",
    "SQLiteStore",
    "SendErrorCode",
    "SendFailed",
    "SendOutcome",
    "SendResult",
    "SendResultHandler",
    "SendWindow",
    "Signal",
    "SignalHandler",
    "Store",
    "SyncPage",
    "TLSConfig",
    "TLSError",
    "TokenSource",
    "TypingNotice",
    "Unauthenticated",
    "Unavailable",
    "direct_conversation_id",
]
