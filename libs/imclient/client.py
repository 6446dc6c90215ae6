"""The asyncio client: one device's connection to the IM gateway.

```python
async with Client(["chat.example.com:443"], token, store=SQLiteStore("alice.db")) as client:
    ack = await client.send("d:alice:bob", "hi")      # durable when it returns
    async for msg in client.messages():               # seq order, no duplicates
        print(msg.sender_id, msg.text)
```

Guarantees (docs/protocol.md describes the wire side):

Sending
- `send()` returns only when the gateway's SendAck arrived: the message is
  durable and will reach every member. A non-retryable refusal raises
  `SendFailed`; the message was not stored.
- Until then the client keeps the message and retransmits it, also across
  reconnects and across gateways, always with the same `client_msg_id` (the
  server's idempotency key), so a message is stored at most once. Messages are
  sent, and resent after a reconnect, in the order `submit()`/`send()` was called,
  so they keep that order in the conversation.
- Cancelling a `send()` does not withdraw the message: it stays queued until it is
  acknowledged or the client closes.

Sending across restarts (the outbox)
- Every submitted message is written to the store's outbox (`Store.outbox_add`)
  before its first `Send` frame can be written, and deleted only after its
  outcome (the SendAck, or a refusal for good) has been handed to the app:
  the `submit()` future is resolved and `on_send_result` has returned. So an
  acknowledged message was always in the outbox first, and a message in the
  outbox is either acknowledged already or still to be sent.
- `submit()` does not block: it queues the message for the outbox, then for
  sending. It is durable (survives kill -9 of the process, with `SQLiteStore`)
  once `await client.persisted()` returns, which covers every message submitted
  before that call. The account (`<user>/<device>`) names the outbox, so before
  the first connection says who the token is, a submit is durable only once the
  client has connected, unless the client was given `account=` (then at once,
  even offline). `close()` still writes out what was submitted but not yet
  written, if the account is known.
- On start (the first Welcome, or `start()` itself with `account=`), the client
  loads the account's outbox and sends those messages first, in their original
  order, with their original `client_msg_id`, before anything submitted now.
  The server deduplicates on that id: a message stored before the crash is
  answered with its original ACK (reported as acknowledged, never stored twice).
- Their outcomes reach the app through `on_send_result` (called for every
  message, restored ones with `SendOutcome.restored`), and through
  `submit(..., client_msg_id=<restored id>)`, which joins the restored message
  instead of queueing it again. Outcomes are reported once per client; across a
  crash at least once: a process killed after reporting an outcome but before
  the outbox delete reports it again (same msg_id) in the next process, so apps
  key their effects on `client_msg_id`.
- The outbox is bounded by the store's `max_outbox` (default 10,000) pending
  messages per account: beyond it `submit()` raises `OutboxFull`. A refused
  message (`SendFailed`) leaves the outbox and is never retried; one the client
  could not finish because it closed or stopped (`ClientClosed`, `Kicked`,
  `AuthError`) stays in it and is sent by the next client on that store.
- With the default `MemoryStore` the outbox lives in memory: a message survives
  a `Client` handed the same store object, never the process.

Receiving
- Messages are handed to the application in timeline (`seq`) order, with no gap,
  exactly once per process; across process restarts at least once, and deduped by
  `msg_id` against the store. Precisely: the store's cursor and the handed
  msg_ids are committed only after the application has *finished* with a message
  (for `messages()`: when it asks for the next one, or closes the client; for a
  callback: when it returns). A crash in between hands that message again after a
  restart; apps that cannot tolerate that should key their own effects on
  `msg_id`, which is stable.
- After every (re)connect the client syncs its timeline from its cursor, page by
  page, before trusting pushes; pushes that arrive meanwhile are buffered and never
  used to skip entries the sync has not returned (gim issue 46).
- A connected client also learns the timeline's head without waiting for a push
  (Welcome.head_seq, Pong.head_seq, Head frames; 0 or absent on an old gateway:
  ignored). A head above the client's seq starts the same sync as a gap, and the
  highest entry is acknowledged after it; a head that comes during a sync is
  checked when that sync ends. So the last message of a quiet conversation
  arrives even if its push was lost. The first sync of a connection does not
  end (`ready`) below the Welcome's head.
- A sync that fails with a retryable status (UNAVAILABLE, DEADLINE_EXCEEDED:
  logic down) is retried on the same stream with backoff for as long as it is
  needed, without reconnecting; other failures end the connection (reconnect).
- Delivery ACKs are cumulative and coalesced (`ack_delay_s`). They mean "this
  process has every entry up to seq", which only stops the pusher's retransmits;
  the sync cursor in the store is what decides what is fetched after a restart.

- Received messages wait in memory until the application takes them (no
  back-pressure on the server): an application that stops reading should close
  the client, and will get the rest by sync on its next start.
- The client opens its store on start and closes it on close; a store object may
  be handed to a later client (that is a "restart").
- The cursor belongs to one *store epoch*: the id of the server's message
  database (Welcome.store_epoch, SyncResponse.store_epoch). Seqs and msg_ids of
  one database mean nothing in another (a wiped and re-created one, a restore
  into a fresh cluster). When the server names another epoch than the one the
  store recorded with the cursor, the client logs a warning, counts it
  (`stats.epoch_resets`), forgets the cursor and the seen msg_ids (store and
  memory), drops what it held of the old store and had not handed yet, and
  syncs from seq 0, so the new timeline shows in full instead of nothing. The
  outbox is kept: unsent messages go to the new store. A cursor with no epoch
  recorded (a new account, a store from an older SDK) is taken as the server's;
  a server that names none ("", an older one) is not checked.

Conversation state (docs/protocol.md, "Conversation state")
- `mark_read`, `mark_delivered`, `edit`, `recall` and `delete_for_me` are
  events sent exactly like messages (`submit(..., kind=, target_conv_seq=)`):
  same client_id order with the messages around them, same outbox,
  retransmits and `client_msg_id` idempotency, and they return on the
  SendAck. A READ or DELIVERED at or below the position the server already
  has stores nothing: its SendAck has msg_id 0 (`SendResult.stored` False)
  and names the current position; that is an answer, not an error.
- Every timeline entry, events included, is handed to the app as a `Message`
  with its `kind`, in seq order, exactly once, as above. Before handing an
  entry on, the client folds it into the conversation's `ConversationState`
  (`conversation_state()`): this user's read/delivered positions (from its own
  READ/DELIVERED entries and ACKs), the peer's in direct conversations (the
  receipts), recalls, edits, deletions. In memory only; `list_conversations()`
  seeds the positions.
- With `auto_delivered` (the default) a receiving client sends the peer of a
  direct conversation a DELIVERED receipt for the chat messages it received
  from it: at most one per conversation per `delivered_interval_s`, never in
  answer to an event (so no receipt ping-pong between devices).
- Typing and presence are ephemeral and never delay a message: `typing()`
  writes a frame on the current stream only (not retransmitted, not queued
  across reconnects), presence subscriptions are renewed on every connection,
  and the frames the gateway pushes (`TypingNotice`, `PresenceUpdate`,
  `FrameError`) go to `signals()` iterators and the `on_signal` callback from
  a task of their own, dropped past `signal_buffer` if the app lags.

Connection
- `async with Client(...)` (or `start()`) returns once connected AND caught up
  by the first sync; a very long backlog may need a larger `connect_timeout_s`,
  or `start(wait_ready=False)`. Sends may be submitted before that.
- TLS by default, checking the gateway's certificate against the system's
  trusted CAs (or `tls=TLSConfig(ca_file=..., server_name=...)`); plaintext
  only with `insecure=True`. A failed TLS handshake (an untrusted or misnamed
  certificate, a port that does not speak TLS) stops the client for good with
  `TLSError`, whose message says which: retrying cannot fix it.
- `wait_connected(timeout)` waits for the first Welcome only: a tool that must
  fail fast on a wrong address uses it (`ConnectTimeout` names why the last
  attempt failed, e.g. "UNAVAILABLE: connection refused at 127.0.0.1:17000";
  `last_error` holds it meanwhile), then `wait_ready()` for the sync.
- Reconnects with exponential backoff and full jitter, rotating through the
  gateway addresses. `GoAway` reconnects (to the next address) after the delay it
  names. `Kick` (same device connected elsewhere) and a refused token stop the
  client for good: pending sends fail with `Kicked`/`AuthError`, `messages()`
  raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imclient.errors import (
    AuthError,
    ClientClosed,
    ConnectTimeout,
    ImClientError,
    Kicked,
    OutboxFull,
    ProtocolError,
    SendErrorCode,
    SendFailed,
    rpc_error,
)
from imclient.ids import new_client_msg_id
from imclient.policy import ReconnectPolicy, RetransmitPolicy
from imclient.receiver import Entry, Receiver
from imclient.sender import Outgoing, SendWindow
from imclient.state import ConversationState, ConversationStates, is_direct
from imclient.store import MemoryStore, OutboxEntry, Store
from imclient.tls import TLSConfig, Transport
from imclient.types import (
    ID_PATTERN,
    ContentType,
    Conversation,
    FrameError,
    Message,
    MessageKind,
    PresenceUpdate,
    SendOutcome,
    SendResult,
    Signal,
    TypingNotice,
)
from imclient.unary import (
    DEFAULT_CHANNEL_OPTIONS,
    TokenSource,
    UnaryCalls,
    invoke_on,
    parse_addresses,
    resolve_token,
)

log = logging.getLogger("imclient")

MessageHandler = Callable[[Message], Awaitable[None] | None]
SendResultHandler = Callable[[SendOutcome], Awaitable[None] | None]
SignalHandler = Callable[[Signal], Awaitable[None] | None]


@dataclass
class DebugHooks:
    """Fault injection for tests of the protocol against a real server. Never set
    these in an application.

    - `drop_deliver_acks`: the first N DeliverAck frames are not written (the
      pusher must retransmit; the client must not show anything twice).
    - `on_sync_response`: awaited with every Sync response before it is applied,
      so a test can hold a sync open while pushes arrive.
    - `on_push`: called with each push's seq as it arrives.
    - `drop_pushes`: the first N Push frames are ignored, as if lost on the way
      (only the server's heads and catch-up can then bring those entries).
    """

    drop_deliver_acks: int = 0
    drop_pushes: int = 0
    on_sync_response: Callable[[gateway_pb2.SyncResponse], Awaitable[None]] | None = None
    on_push: Callable[[int], None] | None = None


@dataclass
class ClientStats:
    """Counters since the client started (a snapshot; see `Client.stats`)."""

    connects: int = 0
    sends_written: int = 0
    retransmits: int = 0
    send_acks: int = 0
    send_failures: int = 0
    pushes: int = 0
    duplicate_pushes: int = 0
    buffered_pushes: int = 0
    gaps: int = 0
    syncs: int = 0
    sync_pages: int = 0
    sync_entries: int = 0
    sync_failures: int = 0  # Sync calls that failed and were retried on the stream
    heads: int = 0  # Head frames received
    pongs: int = 0
    pings_sent: int = 0
    head_seq: int = 0  # the highest timeline head the server announced (0: none)
    syncs_by_head: int = 0  # syncs started because a head was above the local seq
    head_misses: int = 0  # syncs that ended below a head known before they started
    heads_unreached: int = 0  # heads given up after repeated misses (a server fault)
    pushes_dropped: int = 0  # by DebugHooks.drop_pushes
    acks_sent: int = 0
    acks_dropped: int = 0
    duplicates_suppressed: int = 0
    handed: int = 0
    last_seq: int = 0
    committed_seq: int = 0
    outbox_restored: int = 0  # messages loaded from the outbox on start (sent first)
    epoch_resets: int = 0  # cursors forgotten: the server named another store epoch
    signals: int = 0  # TypingNotice, PresenceUpdate and FrameError frames received
    signals_dropped: int = 0  # not handed: a full signal buffer (the app is slow)
    delivered_receipts: int = 0  # automatic DELIVERED events submitted
    extra: dict[str, int] = field(default_factory=dict)


class _SessionLost(Exception):
    """The current connection is unusable; reconnect."""


class _GoAway(Exception):
    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


_END = object()
_RETRYABLE_RPC = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Client(UnaryCalls):
    """A device's connection to the gateways. Use as an async context manager,
    or call `start()` and `close()`.

    Args:
        addresses: gateway `host:port`s (a list, or comma-separated), tried in turn.
        token: the device's token, or a (sync or async) callable returning it,
            called before every connection attempt.
        store: durable cursor, seen ids and outbox; default an in-memory one
            (pass `SQLiteStore(path)` to survive restarts).
        on_message: optional callback (sync or async) for each message, in order;
            the alternative to `messages()` (use one or the other).
        on_send_result: optional callback (sync or async) with the outcome of
            every sent message, including those restored from the outbox (see
            "Sending across restarts"); the outbox entry is deleted after it
            returns.
        account: optional `<user>/<device>` of the token: the outbox is loaded
            by `start()` and submits are durable without a connection. A Welcome
            naming another account stops the client with `AuthError`.
        send_window: most sends in flight at once (the gateway may lower it).
        connect_timeout_s: how long `__aenter__`/`start()` wait for the first
            connection and sync before raising `ConnectTimeout` (None: forever).
        receive: False for a send-only client (a CLI `send`, a load generator):
            no sync, and pushes and heads are acknowledged and dropped, so this
            device shows nothing (its timeline stays complete on the server).
        ping_interval_s: send a Ping this often on an idle or busy stream (None,
            the default: never). Each Pong carries the timeline head, so this
            bounds how long a lost push can go unnoticed even without the
            gateway's Head frames; it costs the gateway a head read per Ping.
        tls: what TLS trusts and checks (`TLSConfig`: a CA file instead of the
            system's trusted CAs, a server name to check, a client certificate);
            default: TLS with the system's trusted CAs (`imclient.tls`). Its
            files are read here: ValueError if one cannot be read.
        insecure: True to connect in plaintext (a development gateway). Never
            the default: plaintext only when asked for.
        on_signal: optional callback (sync or async) for every ephemeral
            frame: `TypingNotice`, `PresenceUpdate`, `FrameError`; the
            alternative to `signals()` (they can be combined). Called from its
            own task, never delaying a message; a slow callback loses signals
            beyond `signal_buffer` (counted in `stats.signals_dropped`).
        auto_delivered: in direct conversations, send the peer a DELIVERED
            receipt for the chat messages this device receives from it
            (default on; a receiving client only). Coalesced: at most one per
            conversation per `delivered_interval_s`, naming the highest
            conv_seq received; never in answer to an event, so two devices
            never answer each other's receipts.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        token: TokenSource,
        *,
        store: Store | None = None,
        on_message: MessageHandler | None = None,
        on_send_result: SendResultHandler | None = None,
        account: str | None = None,
        send_window: int = 64,
        retransmit: RetransmitPolicy | None = None,
        reconnect: ReconnectPolicy | None = None,
        sync_page_size: int = 500,
        ack_delay_s: float = 0.01,
        commit_interval_s: float = 0.05,
        welcome_timeout_s: float = 10.0,
        rpc_timeout_s: float = 10.0,
        connect_timeout_s: float | None = 30.0,
        channel_options: Sequence[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS,
        hooks: DebugHooks | None = None,
        rng: random.Random | None = None,
        receive: bool = True,
        ping_interval_s: float | None = None,
        tls: TLSConfig | None = None,
        insecure: bool = False,
        on_signal: SignalHandler | None = None,
        auto_delivered: bool = True,
        delivered_interval_s: float = 0.5,
        signal_buffer: int = 1000,
    ) -> None:
        self._transport = Transport(tls, insecure)
        self.addresses = parse_addresses(addresses)
        self._token = token
        self._store: Store = store if store is not None else MemoryStore()
        self._on_message = on_message
        self._on_send_result = on_send_result
        if account is not None:
            parts = account.split("/")
            if len(parts) != 2 or not all(ID_PATTERN.fullmatch(p) for p in parts):
                raise ValueError(f"account {account!r} is not <user>/<device>")
        self._account_arg = account
        self._receive = receive
        if on_message is not None and not receive:
            raise ValueError("on_message needs receive=True")
        self._window = SendWindow(retransmit or RetransmitPolicy(), send_window)
        self._reconnect = reconnect or ReconnectPolicy()
        if not 1 <= sync_page_size <= 10_000:
            raise ValueError("sync_page_size must be in 1..10000")
        self._page_size = sync_page_size
        self._ack_delay_s = ack_delay_s
        self._commit_interval_s = commit_interval_s
        if ping_interval_s is not None and ping_interval_s <= 0:
            raise ValueError("ping_interval_s must be positive (or None: no pings)")
        self._ping_interval_s = ping_interval_s
        self._ping_nonce = 0
        self._welcome_timeout_s = welcome_timeout_s
        self._rpc_timeout_s = rpc_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._channel_options = list(channel_options)
        self.hooks = hooks or DebugHooks()
        self._rng = rng or random.Random()

        # Identity, known after the first Welcome.
        self.user_id: str | None = None
        self.device_id: str | None = None
        self.connection_id: str | None = None
        self.address: str | None = None  # the gateway of the current connection
        self.max_body_bytes = 0
        self.welcome_head_seq = 0  # head_seq of the current connection's Welcome (0: unknown)
        #: Why the last connection attempt failed ("CODE: reason"; None once connected).
        self.last_error: str | None = None
        self._store_epoch = ""  # the store epoch of the cursor ("" = none recorded)
        # Bumped when the cursor is reset for another epoch: messages of an older
        # generation still on their way to the app are dropped, never committed.
        self._generation = 0
        self._account: str | None = None
        self._receiver: Receiver[Message] | None = None

        self._futures: dict[str, asyncio.Future[SendResult]] = {}
        # The outbox: submitted, not yet in the store (submission order) ...
        self._unsaved: dict[str, Outgoing] = {}
        # ... and outcomes to hand to on_send_result, then delete from the store.
        self._finished: list[SendOutcome] = []
        self._reported = 0  # how many of _finished on_send_result has had
        self._next_order = 0
        self._tickets = 0  # submits accepted so far
        self._persisted_ticket = 0  # every submit up to this one is settled
        self._persist_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._outbox_event = asyncio.Event()
        self._outbox_lock = asyncio.Lock()
        self._account_ready = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._session_token: str | None = None
        self._wake = asyncio.Event()  # the pump has something to do
        self._sync_wanted = asyncio.Event()
        self._ready = asyncio.Event()  # connected and first sync done
        self._welcomed_once = asyncio.Event()  # some connection got its Welcome
        self._inbox: deque[Message] = deque()
        self._inbox_event = asyncio.Event()
        self._app_queue: asyncio.Queue[Any] = asyncio.Queue()
        self._recent: OrderedDict[int, None] = OrderedDict()  # msg_ids handed (this process)
        self._handed: Message | None = None
        self._commit_batch: list[tuple[int, int]] = []
        self._commit_seq = 0
        self.committed_seq = 0
        self._commit_event = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._run_task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._ending = False
        self._terminal: ClientClosed | None = None
        self._stats = ClientStats()
        self._welcomed = False  # the current connection attempt got a Welcome

        # Conversation state, receipts and the ephemeral frames (typing, presence).
        self._states = ConversationStates()
        self._on_signal = on_signal
        self._auto_delivered = auto_delivered and receive
        if delivered_interval_s < 0:
            raise ValueError("delivered_interval_s must be >= 0")
        self._delivered_interval_s = delivered_interval_s
        self._delivered_due: dict[str, int] = {}  # conversation -> highest peer conv_seq
        self._delivered_at: dict[str, float] = {}  # conversation -> last automatic DELIVERED
        self._delivered_event = asyncio.Event()
        if signal_buffer < 1:
            raise ValueError("signal_buffer must be at least 1")
        self._signal_buffer = signal_buffer
        self._signal_inbox: deque[Signal] = deque()
        self._signal_event = asyncio.Event()
        self._signal_queues: list[asyncio.Queue[Any]] = []
        # Typing and presence frames to write on the current stream (never
        # retransmitted, dropped with the connection).
        self._frames: deque[gateway_pb2.ClientFrame] = deque()
        # Presence subscriptions as the app made them (one frame each), renewed
        # on every connection: the gateway keeps them per connection.
        self._presence_batches: list[tuple[str, ...]] = []

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, wait_ready: bool = True) -> None:
        """Opens the store and starts connecting. With `wait_ready`, returns once
        connected and synced (raises `AuthError`, `ConnectTimeout`)."""
        if self._started:
            return
        self._started = True
        await self._store.open()
        if self._account_arg is not None:
            try:
                await self._open_account(self._account_arg)
            except BaseException:
                await self._store.close()
                raise
        self._run_task = asyncio.create_task(self._run(), name="imclient-run")
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="imclient-dispatch"),
            asyncio.create_task(self._committer(), name="imclient-commit"),
            asyncio.create_task(self._outboxer(), name="imclient-outbox"),
            asyncio.create_task(self._signaller(), name="imclient-signals"),
        ]
        if self._auto_delivered:
            self._tasks.append(asyncio.create_task(self._receipter(), name="imclient-receipts"))
        if wait_ready:
            try:
                await self.wait_ready(self._connect_timeout_s)
            except BaseException:
                await self.close()
                raise

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until connected and caught up by sync. Raises the terminal error
        if the client stopped, `ConnectTimeout` after `timeout` seconds."""
        if not await self._wait_for(self._ready, timeout):
            raise ConnectTimeout(
                f"not connected to any of {self.addresses} after {timeout}s", self.last_error
            )

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Waits until a gateway has welcomed the client (not for the sync, see
        `wait_ready`). Raises the terminal error if the client stopped (a refused
        token), `ConnectTimeout` with the last attempt's failure after `timeout`
        seconds."""
        if not await self._wait_for(self._welcomed_once, timeout):
            within = f"within {timeout:g} s" if timeout is not None else "before the client closed"
            raise ConnectTimeout(
                f"no gateway answered {within} ({', '.join(self.addresses)})", self.last_error
            )

    async def _wait_for(self, event: asyncio.Event, timeout: float | None) -> bool:
        """Waits for `event` while the client runs; False after `timeout` (or if the
        client ended without it). Raises the terminal error if the client stopped."""
        if self._terminal is not None:
            raise self._terminal
        assert self._run_task is not None, "start() first"
        waiter = asyncio.create_task(event.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, self._run_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if self._terminal is not None:
            raise self._terminal
        return waiter in done

    async def close(self, drain_timeout_s: float | None = None) -> None:
        """Stops the client. With `drain_timeout_s`, first waits that long for the
        pending sends to be acknowledged. Sends still pending fail with
        `ClientClosed` and stay in the store's outbox (written out now if they
        were not yet, when the account is known) for the next client. The
        message last handed by `messages()` counts as handled. Idempotent."""
        if self._closing:
            return
        if drain_timeout_s and self._started:
            with contextlib.suppress(TimeoutError, ImClientError):
                await self.flush(drain_timeout_s)
        self._closing = True
        if self._run_task is not None:
            # Cancelled once only: a second cancellation would interrupt its own
            # clean-up, which is what stops the connection's tasks.
            self._run_task.cancel()
            await asyncio.wait([self._run_task])
        self._stop(self._terminal or ClientClosed("client closed"))
        self._release_handed()
        await _cancel_and_wait(self._tasks)
        # Nothing more is handed after close: what was queued but not handed is
        # not committed, so the next start syncs it again.
        while not self._app_queue.empty():
            self._app_queue.get_nowait()
        self._app_queue.put_nowait(_END)
        if self._started:
            try:
                await self._flush_commits()
                async with self._outbox_lock:
                    await self._drain_outbox_locked()
            finally:
                self._advance_persisted()
                self._settle_persist_waiters(None)
                self._settle_persist_waiters(
                    ClientClosed("closed before these messages were written to the outbox"),
                    final=True,
                )
                await self._store.close()

    async def flush(self, timeout: float | None = None) -> None:
        """Waits until every send submitted so far (and every one restored from
        the outbox) is acknowledged or failed, its outcome handed to the app and
        removed from the outbox."""
        futures = list(self._futures.values())
        async with asyncio.timeout(timeout):
            if futures:
                await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))
            if self._account is not None and (self._finished or self._unsaved):
                async with self._outbox_lock:
                    await self._drain_outbox_locked()

    async def persisted(self, timeout: float | None = None) -> None:
        """Waits until every message submitted before this call is in the store's
        outbox (durable: with `SQLiteStore` it survives kill -9 of the process
        and is resent by the next client), or has already failed. Before the
        account is known (no `account=`, no Welcome yet), that means after the
        first connection. Raises the store's error if writing failed (those
        messages' futures fail with it too, and they are not sent), and
        `ClientClosed` if the client closed before the account was known."""
        target = self._tickets
        if self._persisted_ticket >= target:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._persist_waiters.append((target, waiter))
        async with asyncio.timeout(timeout):
            await asyncio.shield(waiter)

    # -- sending -----------------------------------------------------------------

    def submit(
        self,
        conversation_id: str,
        body: bytes | str,
        content_type: ContentType = ContentType.TEXT,
        client_msg_id: str | None = None,
        *,
        kind: MessageKind = MessageKind.MESSAGE,
        target_conv_seq: int = 0,
    ) -> asyncio.Future[SendResult]:
        """Queues a message and returns a future for its SendResult, without
        blocking. Messages are sent in the order of `submit()` calls (after
        any restored from the outbox), and keep that order in the conversation.

        With `kind`, it queues a conversation event instead (see `MessageKind`;
        `edit`, `recall`, `delete_for_me`, `mark_read` and `mark_delivered`
        are the awaiting forms): same order, outbox, retransmits and
        idempotency as a message. `target_conv_seq` (>= 1) is the message acted
        on, or the position set; only EDIT has a body (the new one).

        The message goes to the store's outbox first, then to the gateway; it is
        durable once `persisted()` returns (see the module docs). Pass
        `client_msg_id` to re-send a message whose earlier client closed before
        its ACK (same id: stored at most once); if that message was restored
        from the outbox, this returns its future instead of queueing it again.
        Raises `OutboxFull` past the store's `max_outbox` pending messages,
        `ValueError` if `client_msg_id` is already pending (not restored)."""
        if self._terminal is not None:
            raise self._terminal
        if self._closing or not self._started:
            raise ClientClosed("client is not running")
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        kind = MessageKind(kind)
        if kind == MessageKind.UNSPECIFIED:
            kind = MessageKind.MESSAGE
        if kind == MessageKind.MESSAGE:
            if target_conv_seq:
                raise ValueError("a chat message has no target_conv_seq")
        else:
            if target_conv_seq < 1:
                raise ValueError(f"{kind.name} needs a target_conv_seq >= 1")
            if kind == MessageKind.EDIT and not data:
                raise ValueError("an EDIT needs the new (non-empty) body")
            if kind != MessageKind.EDIT and data:
                raise ValueError(f"{kind.name} has no body")
        cmid = client_msg_id or new_client_msg_id()
        loop = asyncio.get_running_loop()
        if cmid in self._futures:
            existing = self._window.get(cmid)
            if existing is not None and existing.restored:
                return self._futures[cmid]
            raise ValueError(f"client_msg_id {cmid!r} is already pending")
        pending = len(self._futures)
        if pending >= self._store.max_outbox:
            raise OutboxFull(pending, self._store.max_outbox)
        future: asyncio.Future[SendResult] = loop.create_future()
        if self.max_body_bytes and len(data) > self.max_body_bytes:
            error = SendFailed(
                SendErrorCode.INVALID_ARGUMENT,
                f"body is {len(data)} bytes, the limit is {self.max_body_bytes}",
                cmid,
            )
            future.set_exception(error)
            self._finish(SendOutcome(cmid, conversation_id, None, error, False))
            return future
        message = Outgoing(cmid, conversation_id, data, int(content_type))
        if kind != MessageKind.MESSAGE:
            # A chat message goes out with kind 0, byte for byte as before kinds.
            message.kind, message.target_conv_seq = int(kind), target_conv_seq
        if self._account is not None:
            message.order = self._next_order
            self._next_order += 1
        self._tickets += 1
        message.ticket = self._tickets
        self._unsaved[cmid] = message
        self._futures[cmid] = future
        self._outbox_event.set()
        return future

    async def send(
        self,
        conversation_id: str,
        body: bytes | str,
        content_type: ContentType = ContentType.TEXT,
        client_msg_id: str | None = None,
    ) -> SendResult:
        """Sends a message and returns when it is durable (the SendAck arrived).

        Raises `SendFailed` if the gateway refused it for good (not stored), and
        `ClientClosed`/`Kicked`/`AuthError` if the client stopped first (then it
        may or may not have been stored)."""
        return await asyncio.shield(self.submit(conversation_id, body, content_type, client_msg_id))

    # -- conversation events (sent like messages) ------------------------------------

    async def _event(
        self, conversation_id: str, kind: MessageKind, conv_seq: int, body: bytes | str = b""
    ) -> SendResult:
        return await asyncio.shield(
            self.submit(conversation_id, body, kind=kind, target_conv_seq=conv_seq)
        )

    async def edit(self, conversation_id: str, conv_seq: int, body: bytes | str) -> SendResult:
        """Replaces the body of this user's message `conv_seq` with `body`, for
        every member: an EDIT entry with its own conv_seq. Returns when durable
        (the SendAck), like `send()`; Sync and History serve the new body from
        then on. Raises `SendFailed`: PERMISSION_DENIED (not this user's
        message), NOT_FOUND, INVALID_ARGUMENT (empty or oversized body), or
        FAILED_PRECONDITION-like refusals (recalled, the edit window passed);
        then nothing changed."""
        return await self._event(conversation_id, MessageKind.EDIT, conv_seq, body)

    async def recall(self, conversation_id: str, conv_seq: int) -> SendResult:
        """Recalls message `conv_seq` (this user's, or any in a group this user
        owns) for every member: its body, and the bodies of its edits, are
        overwritten in the server's database in the transaction the SendAck
        confirms; Sync and History serve it with an empty body and `recalled`
        (where old copies remain until vacuum and retention remove them:
        docs/protocol.md, "Where a recalled body can still be").
        Devices that already showed it get the RECALL entry. Raises
        `SendFailed` if refused (not yours, window passed, already recalled)."""
        return await self._event(conversation_id, MessageKind.RECALL, conv_seq)

    async def delete_for_me(self, conversation_id: str, conv_seq: int) -> SendResult:
        """Hides message `conv_seq` on this user's devices only (its other
        devices get the DELETE_FOR_ME entry; Sync and History serve it to this
        user with an empty body and `deleted_for_me`)."""
        return await self._event(conversation_id, MessageKind.DELETE_FOR_ME, conv_seq)

    async def mark_read(self, conversation_id: str, conv_seq: int) -> SendResult:
        """Sets this user's read position in the conversation to `conv_seq` (at
        most the conversation's last conv_seq; INVALID_ARGUMENT above it). The
        READ entry reaches this user's other devices and, in a direct
        conversation, the peer's (its read receipt). Positions only move
        forward: one at or below the current position stores nothing and is
        still acknowledged, with `SendResult.stored` False (msg_id 0) and
        `conv_seq` the current position. Not an error."""
        return await self._event(conversation_id, MessageKind.READ, conv_seq)

    async def mark_delivered(self, conversation_id: str, conv_seq: int) -> SendResult:
        """Sets this user's delivered position in a direct conversation (group:
        `SendFailed` INVALID_ARGUMENT). The client does this by itself unless
        made with `auto_delivered=False`. At or below the current position:
        acknowledged with `stored` False, as for `mark_read`."""
        return await self._event(conversation_id, MessageKind.DELIVERED, conv_seq)

    # -- ephemeral frames: typing and presence -----------------------------------------

    def typing(self, conversation_id: str, typing: bool = True) -> bool:
        """Tells the other online members of the conversation that this user is
        (or stopped) typing. Ephemeral: written on the current stream if there
        is one (returns True), never stored, retransmitted or queued across a
        reconnect (returns False when not connected). Repeat `typing=True`
        every few seconds while it lasts: receivers drop it after the
        notice's expiry. The gateway rate-limits it per connection; a refusal
        comes back as a `FrameError` signal."""
        if self._channel is None:
            return False
        self._frames.append(
            gateway_pb2.ClientFrame(
                typing=gateway_pb2.Typing(conversation_id=conversation_id, typing=typing)
            )
        )
        self._wake.set()
        return True

    def subscribe_presence(self, user_ids: Sequence[str]) -> None:
        """Subscribes this connection to the presence of `user_ids` (each must
        share a conversation with this user). The current state of each comes
        as a `PresenceUpdate` signal, then every change. The client renews the
        subscriptions on every (re)connect, one frame per call made here, so a
        refused call (a `FrameError` signal with frame "subscribe_presence":
        the whole call is refused, nothing subscribed) is refused again after
        a reconnect until `unsubscribe_presence` drops those users."""
        batch = tuple(dict.fromkeys(user_ids))
        for u in batch:
            if not ID_PATTERN.fullmatch(u):
                raise ValueError(f"invalid user id {u!r}")
        if not batch:
            return
        self._presence_batches.append(batch)
        self._queue_frame(
            gateway_pb2.ClientFrame(
                subscribe_presence=gateway_pb2.SubscribePresence(user_ids=list(batch))
            )
        )

    def unsubscribe_presence(self, user_ids: Sequence[str]) -> None:
        """Ends the presence subscriptions of `user_ids` (unknown ones are ignored)."""
        drop = set(user_ids)
        if not drop:
            return
        batches = [tuple(u for u in b if u not in drop) for b in self._presence_batches]
        self._presence_batches = [b for b in batches if b]
        self._queue_frame(
            gateway_pb2.ClientFrame(
                subscribe_presence=gateway_pb2.SubscribePresence(
                    user_ids=sorted(drop), unsubscribe=True
                )
            )
        )

    def _queue_frame(self, frame: gateway_pb2.ClientFrame) -> None:
        if self._channel is not None:
            self._frames.append(frame)
            self._wake.set()

    def signals(self) -> AsyncIterator[Signal]:
        """The ephemeral frames from the gateway, in arrival order, from this
        call on: `TypingNotice`, `PresenceUpdate`, `FrameError`. Not replayed,
        not acknowledged, possibly lost (a reconnect, a full buffer: at most
        `signal_buffer` wait per iterator, the oldest are dropped). Ends when
        the client closes. Several iterators each get every signal."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if self._closing or self._terminal is not None:
            queue.put_nowait(_END)
        else:
            self._signal_queues.append(queue)
        return _Signals(self, queue)

    # -- conversation state ----------------------------------------------------------

    def conversation_state(self, conversation_id: str) -> ConversationState:
        """A copy of what this client knows of the conversation (`ConversationState`):
        its own read/delivered positions, the peer's (direct conversations),
        recalls, edits, deletions and who is typing, from every entry received
        in order so far (applied before the entry is handed to the app), the
        ACKs of this client's own events, and `list_conversations()` results.
        In memory: a new process starts from nothing (or from a
        `list_conversations()` call)."""
        return self._states.get(conversation_id).snapshot()

    def typing_users(self, conversation_id: str) -> list[str]:
        """Users typing in the conversation now (notices not expired, not
        ended by `typing=False` or by a chat message of theirs)."""
        state = self._states.get(conversation_id)
        return state.typing_users(asyncio.get_running_loop().time())

    def _on_conversations(self, conversations: list[Conversation]) -> None:
        self._states.seed(conversations)

    @property
    def pending_sends(self) -> int:
        """Messages submitted or restored and not yet acknowledged or failed."""
        return len(self._window) + len(self._unsaved)

    # -- receiving ---------------------------------------------------------------

    def messages(self) -> AsyncIterator[Message]:
        """Messages in timeline order, each once. Asking for the next message
        marks the previous one handled (see the module docs). Ends when the
        client closes; raises `Kicked`/`AuthError` if it stopped for that."""
        if self._on_message is not None:
            raise RuntimeError("messages() cannot be used with an on_message callback")
        if not self._receive:
            raise RuntimeError("messages() needs a client made with receive=True")
        return _Messages(self)

    @property
    def last_seq(self) -> int:
        """The highest timeline seq received in order (in memory)."""
        return self._receiver.seq if self._receiver else self.committed_seq

    @property
    def head_seq(self) -> int:
        """The highest timeline head the server announced (Welcome, Pong, Head
        frames), or 0 if none (an old gateway). The client syncs while its
        `last_seq` is below it."""
        return self._stats.head_seq

    @property
    def store_epoch(self) -> str:
        """The server's store epoch the cursor belongs to ("" until known)."""
        return self._store_epoch

    @property
    def stopped(self) -> ClientClosed | None:
        """Why the client stopped for good by itself (`Kicked`, `AuthError`), or None."""
        return self._terminal

    @property
    def undelivered(self) -> int:
        """Messages received in order but not yet handed to the application."""
        return len(self._inbox) + self._app_queue.qsize()

    @property
    def connected(self) -> bool:
        return self._channel is not None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def stats(self) -> ClientStats:
        s = self._stats
        w, r = self._window, self._receiver
        s.sends_written = w.writes
        s.retransmits = w.retransmits
        if r is not None:
            s.pushes = r.pushes
            s.duplicate_pushes = r.duplicates
            s.buffered_pushes = r.buffered
            s.gaps = r.gaps
            s.last_seq = r.seq
            s.syncs_by_head = r.head_syncs
            s.head_misses = r.head_misses
            s.heads_unreached = r.heads_unreached
        s.committed_seq = self.committed_seq
        return ClientStats(**{k: v for k, v in vars(s).items() if k != "extra"})

    # -- unary calls (UnaryCalls) ---------------------------------------------------

    async def _invoke(self, method: str, request: Any, timeout: float | None) -> Any:
        channel = self._channel
        if channel is not None and self._session_token is not None:
            return await invoke_on(channel, self._session_token, method, request, timeout)
        token = await resolve_token(self._token)
        address = self.address or self.addresses[0]
        async with self._transport.channel(address, self._channel_options) as ch:
            return await invoke_on(ch, token, method, request, timeout, self._transport, address)

    # -- the connection loop -------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        index = 0
        try:
            while not self._closing:
                address = self.addresses[index % len(self.addresses)]
                index += 1  # the next attempt goes to the next gateway
                delay: float | None = None
                self._welcomed = False
                try:
                    await self._session(address)
                except _GoAway as exc:
                    log.info("gateway %s going away: %s", address, exc)
                    delay = exc.delay_s + self._rng.uniform(0, 0.05 + exc.delay_s / 10)
                except (ClientClosed, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    reason = _describe(exc, address)
                    if not self._welcomed:
                        self.last_error = reason
                    log.info("connection to %s lost: %s", address, reason)
                if self._closing:
                    return
                if self._welcomed:
                    failures = 0  # a Welcome resets the count, a GoAway's session's too
                if delay is None:
                    delay = self._reconnect.delay(failures, self._rng)
                    failures += 1
                await asyncio.sleep(delay)
        except ClientClosed as exc:
            log.warning("client stopped: %s", exc)
            self._terminal = exc
            self._stop(exc)

    async def _session(self, address: str) -> None:
        """One connection, from Connect to its end (always by an exception)."""
        token = await resolve_token(self._token)
        channel = self._transport.channel(address, self._channel_options)
        call: Any = None
        tasks: list[asyncio.Task[None]] = []
        try:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            call = stub.Connect(metadata=(("authorization", f"Bearer {token}"),))
            try:
                async with asyncio.timeout(self._welcome_timeout_s):
                    first = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise AuthError(f"token refused: {exc.details()}") from exc
                tls = self._transport.error(exc, address)
                if tls is not None:
                    raise tls from exc
                raise
            if first is grpc.aio.EOF:
                raise _SessionLost("stream closed before Welcome")
            if first.WhichOneof("frame") != "welcome":
                raise ProtocolError(f"first frame was {first.WhichOneof('frame')}, not welcome")
            await self._on_welcome(first.welcome)
            self._welcomed = True
            self.last_error = None
            self._welcomed_once.set()
            self._channel, self._session_token, self.address = channel, token, address
            self._window.on_connected(first.welcome.next_client_id or 1, first.welcome.send_window)
            assert self._receiver is not None
            self._receiver.on_connected()
            self._on_head(first.welcome.head_seq, welcome=True)
            self._stats.connects += 1
            self._frames.clear()  # of an earlier connection: stale
            for batch in self._presence_batches:
                self._frames.append(
                    gateway_pb2.ClientFrame(
                        subscribe_presence=gateway_pb2.SubscribePresence(user_ids=list(batch))
                    )
                )
            if self._receive:
                self._sync_wanted.set()
            else:
                self._ready.set()
            self._wake.set()
            tasks = [
                asyncio.create_task(self._reader(call), name="imclient-reader"),
                asyncio.create_task(self._pump(call), name="imclient-pump"),
                asyncio.create_task(self._syncer(stub, token), name="imclient-sync"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                failure = task.exception()
                if failure is not None:
                    raise failure
            raise _SessionLost("session task ended")
        finally:
            # Cancel the call first: a task blocked in call.read() or call.write()
            # is only reliably released by the call's own cancellation.
            if call is not None:
                call.cancel()
            await _cancel_and_wait(tasks)
            self._ready.clear()
            self._channel = None
            self._session_token = None
            self._frames.clear()
            self._window.on_disconnected()
            if self._receiver is not None and self._receiver.syncing:
                self._receiver.sync_failed()
            await channel.close(grace=None)

    async def _on_welcome(self, welcome: gateway_pb2.Welcome) -> None:
        account = f"{welcome.user_id}/{welcome.device_id}"
        if self._account is None:
            await self._open_account(account)
        elif account != self._account:
            raise AuthError(f"the gateway says this token is {account}, it was {self._account}")
        self.connection_id = welcome.connection_id
        self.max_body_bytes = welcome.max_body_bytes
        self.welcome_head_seq = welcome.head_seq
        await self._check_store_epoch(welcome.store_epoch)

    async def _check_store_epoch(self, epoch: str) -> bool:
        """Compares the server's store epoch with the cursor's (module docs).
        Returns True if the cursor was of another epoch and has been reset: the
        caller syncs from 0 (a sync page in hand is of the old cursor: dropped)."""
        account = self._account
        if not epoch or epoch == self._store_epoch or account is None:
            return False
        old = self._store_epoch
        if not old:
            # Nothing recorded: a new account, or a store from an SDK before
            # epochs. Its cursor is taken as this epoch's.
            await self._store.set_epoch(account, epoch, reset=False)
            self._store_epoch = epoch
            return False
        receiver = self._receiver
        assert receiver is not None
        log.warning(
            "the server's message store is another one (store epoch %s; the cursor, "
            "seq %d, was taken in %s): forgetting the cursor and the seen message ids "
            "of %s and syncing from the start",
            epoch,
            receiver.seq,
            old,
            account,
        )
        self._generation += 1
        receiver.restart()
        # Positions and conv_seqs of the old store mean nothing in the new one.
        self._states = ConversationStates()
        self._states.user_id = self.user_id
        self._delivered_due.clear()
        self._inbox.clear()
        self._recent.clear()
        self._handed = None
        self._stats.head_seq = 0  # heads of the old store
        async with self._commit_lock:
            self._commit_batch = []
            self._commit_seq = self.committed_seq = 0
            # Recorded last: if this fails, the next Welcome or page resets again.
            await self._store.set_epoch(account, epoch, reset=True)
        self._store_epoch = epoch
        # Counted once done: whoever sees the count sees the new epoch too.
        self._stats.epoch_resets += 1
        return True

    def _on_head(self, head: int, welcome: bool = False) -> None:
        """The server's timeline head (0: unknown). Above `last_seq` a receiving
        client syncs (now, or after the running sync); a send-only client
        acknowledges it, as it does pushes, so the gateway stops announcing it
        (the Welcome's head needs no ACK: the gateway counts it as delivered)."""
        receiver = self._receiver
        if head <= 0 or receiver is None:
            return
        self._stats.head_seq = max(self._stats.head_seq, head)
        if not self._receive:
            receiver.skip_to(head)
            if welcome:
                receiver.take_ack()
            elif receiver.ack_due:
                self._wake.set()
            return
        if receiver.on_head(head):
            log.debug("timeline head %d above local %d: syncing", head, receiver.seq)
            self._sync_wanted.set()

    async def _reader(self, call: Any) -> None:
        loop = asyncio.get_running_loop()
        receiver = self._receiver
        assert receiver is not None
        while True:
            frame = await call.read()
            if frame is grpc.aio.EOF:
                raise _SessionLost("the gateway closed the stream")
            kind = frame.WhichOneof("frame")
            if kind == "send_ack":
                a = frame.send_ack
                acked = self._window.on_ack(
                    a.client_id, a.client_msg_id, a.msg_id, a.seq, a.conv_seq, a.server_time_ms
                )
                if acked is not None:
                    self._stats.send_acks += 1
                    result = SendResult(
                        a.client_msg_id,
                        a.msg_id,
                        a.seq,
                        a.conv_seq,
                        a.server_time_ms,
                        # The server had this client_msg_id already (a resend).
                        bool(getattr(a, "duplicate", False)),
                    )
                    m = acked.message
                    if m.kind:
                        self._states.apply_ack(
                            m.conversation_id,
                            _kind(m.kind),
                            m.target_conv_seq,
                            m.body,
                            result,
                        )
                    future = self._futures.pop(a.client_msg_id, None)
                    if future is not None and not future.done():
                        future.set_result(result)
                    self._finish(
                        SendOutcome(m.client_msg_id, m.conversation_id, result, None, m.restored)
                    )
                self._wake.set()
            elif kind == "send_error":
                e = frame.send_error
                try:
                    code = SendErrorCode(e.code)
                except ValueError:
                    code = SendErrorCode.UNSPECIFIED
                failed = self._window.on_error(
                    e.client_id,
                    e.client_msg_id,
                    code,
                    e.retryable,
                    e.reason,
                    e.expected_client_id,
                    loop.time(),
                )
                if failed is not None:
                    self._stats.send_failures += 1
                    error = SendFailed(code, e.reason, e.client_msg_id)
                    future = self._futures.pop(e.client_msg_id, None)
                    if future is not None and not future.done():
                        future.set_exception(error)
                    m = failed.message
                    self._finish(
                        SendOutcome(m.client_msg_id, m.conversation_id, None, error, m.restored)
                    )
                elif code != SendErrorCode.OUT_OF_ORDER:
                    log.debug("send %s: retryable %s: %s", e.client_msg_id, code.name, e.reason)
                self._wake.set()
            elif kind == "push":
                p = frame.push
                if self._stats.pushes_dropped < self.hooks.drop_pushes:
                    self._stats.pushes_dropped += 1
                    continue
                if self.hooks.on_push is not None:
                    self.hooks.on_push(p.seq)
                if not self._receive:
                    # Send-only: stop the pusher's retransmits, show nothing.
                    receiver.seq = max(receiver.seq, p.seq)
                    receiver.need_sync = False
                    receiver.on_push(Entry(p.seq, Message.from_pb(p.message, p.seq)))
                    self._wake.set()
                    continue
                out = receiver.on_push(Entry(p.seq, Message.from_pb(p.message, p.seq)))
                self._emit(out)
                if receiver.need_sync:
                    self._sync_wanted.set()
                if receiver.ack_due:
                    self._wake.set()
            elif kind == "kick":
                raise Kicked(f"kicked: {frame.kick.reason or 'another connection of this device'}")
            elif kind == "go_away":
                g = frame.go_away
                raise _GoAway(max(0, g.reconnect_after_ms) / 1000.0, g.reason or "go away")
            elif kind == "head":
                self._stats.heads += 1
                self._on_head(frame.head.seq)
            elif kind == "pong":
                self._stats.pongs += 1
                self._on_head(frame.pong.head_seq)
            elif kind == "typing":
                notice = TypingNotice.from_pb(frame.typing)
                self._states.on_typing(notice, loop.time())
                self._signal(notice)
            elif kind == "presence":
                self._signal(PresenceUpdate.from_pb(frame.presence))
            elif kind == "frame_error":
                refused = FrameError.from_pb(frame.frame_error)
                log.info(
                    "gateway refused a %s frame: %s %s",
                    refused.frame,
                    refused.code.name,
                    refused.reason,
                )
                self._signal(refused)
            # a repeated welcome, or a frame kind newer than this client: nothing to do

    async def _pump(self, call: Any) -> None:
        """The only writer of the stream: sends, retransmits and coalesced ACKs."""
        loop = asyncio.get_running_loop()
        receiver = self._receiver
        assert receiver is not None
        ack_at: float | None = None
        interval = self._ping_interval_s
        ping_at = loop.time() + interval if interval is not None else None
        while True:
            self._wake.clear()
            now = loop.time()
            if ping_at is not None and interval is not None and now >= ping_at:
                ping_at = now + interval
                self._ping_nonce += 1
                await call.write(
                    gateway_pb2.ClientFrame(ping=gateway_pb2.Ping(nonce=self._ping_nonce))
                )
                self._stats.pings_sent += 1
            for frame in self._window.poll(now):
                m = frame.message
                await call.write(
                    gateway_pb2.ClientFrame(
                        send=gateway_pb2.Send(
                            client_id=frame.client_id,
                            client_msg_id=m.client_msg_id,
                            conversation_id=m.conversation_id,
                            body=m.body,
                            content_type=m.content_type,  # type: ignore[arg-type]
                            kind=m.kind,  # type: ignore[arg-type]
                            target_conv_seq=m.target_conv_seq,
                        )
                    )
                )
            while self._frames:
                await call.write(self._frames.popleft())
            if self._window.exhausted:
                raise _SessionLost("a send went unanswered through every retransmit")
            if receiver.ack_due:
                if ack_at is None:
                    ack_at = now + self._ack_delay_s
                if now >= ack_at:
                    ack_at = None
                    seq = receiver.take_ack()
                    if seq is not None:
                        if self._stats.acks_dropped < self.hooks.drop_deliver_acks:
                            self._stats.acks_dropped += 1
                        else:
                            await call.write(
                                gateway_pb2.ClientFrame(deliver_ack=gateway_pb2.DeliverAck(seq=seq))
                            )
                            self._stats.acks_sent += 1
                    continue
            deadlines = [
                d for d in (self._window.next_deadline(), ack_at, ping_at) if d is not None
            ]
            if self._wake.is_set():
                continue
            timeout = max(0.0, min(deadlines) - loop.time()) if deadlines else None
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that
            # coincides with the event being set, and close() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _syncer(self, stub: Any, token: str) -> None:
        """Syncs whenever the receiver needs it (connect, gap, a head above the
        local seq); marks the client ready after the first complete sync of the
        connection. A retryable failure (logic down) is retried here with
        backoff, for as long as it takes: the stream is fine, so reconnecting
        would not help. A sync that ends below a head it should have reached is
        repeated after a backoff (the receiver bounds how often)."""
        receiver = self._receiver
        assert receiver is not None
        metadata = (("authorization", f"Bearer {token}"),)
        failures = 0
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            while receiver.need_sync:
                if receiver.head_backoff:
                    log.info(
                        "sync ended at %d, below the timeline head %d: syncing again",
                        receiver.seq,
                        receiver.head,
                    )
                    await asyncio.sleep(self._reconnect.delay(receiver.head_backoff, self._rng))
                    if not receiver.need_sync:
                        continue
                after = receiver.start_sync()
                self._stats.syncs += 1
                try:
                    while True:
                        resp = await stub.Sync(
                            gateway_pb2.SyncRequest(after_seq=after, limit=self._page_size),
                            metadata=metadata,
                            timeout=self._rpc_timeout_s,
                        )
                        if self.hooks.on_sync_response is not None:
                            await self.hooks.on_sync_response(resp)
                        if await self._check_store_epoch(resp.store_epoch):
                            break  # the receiver restarted: the next sync is from 0
                        self._stats.sync_pages += 1
                        self._stats.sync_entries += len(resp.entries)
                        entries = [
                            Entry(e.seq, Message.from_pb(e.message, e.seq)) for e in resp.entries
                        ]
                        try:
                            out = receiver.on_sync_page(entries, resp.has_more)
                        except ValueError as exc:
                            raise ProtocolError(str(exc)) from exc
                        self._emit(out)
                        if not receiver.syncing:
                            break
                        after = receiver.seq
                except grpc.aio.AioRpcError as exc:
                    receiver.sync_failed()
                    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                        raise AuthError(f"token refused: {exc.details()}") from exc
                    if exc.code() not in _RETRYABLE_RPC:
                        raise
                    failures += 1
                    self._stats.sync_failures += 1
                    log.info("sync failed (%s), retrying", exc.code().name)
                    await asyncio.sleep(self._reconnect.delay(failures, self._rng))
                    continue
                except BaseException:
                    if receiver.syncing:
                        receiver.sync_failed()
                    raise
                failures = 0
                self._wake.set()  # ACK the highest
            self._ready.set()

    # -- delivery to the application -------------------------------------------------

    def _emit(self, entries: list[Entry[Message]]) -> None:
        if entries:
            self._inbox.extend(e.payload for e in entries)
            self._inbox_event.set()

    async def _dispatch(self) -> None:
        """Moves in-order entries to the application, dropping msg_ids already
        handed (in this process or, per the store, an earlier one)."""
        while True:
            if not self._inbox:
                if self._ending:
                    self._app_queue.put_nowait(_END)
                    return
                self._inbox_event.clear()
                await self._inbox_event.wait()
                continue
            batch = list(self._inbox)
            self._inbox.clear()
            assert self._account is not None
            generation = self._generation
            unknown = [m.msg_id for m in batch if m.msg_id not in self._recent]
            seen = await self._store.filter_seen(self._account, unknown) if unknown else set()
            for m in batch:
                if generation != self._generation:
                    break  # the cursor was reset for another store: these are the old one's
                duplicate = m.msg_id in self._recent or m.msg_id in seen
                if duplicate:
                    self._stats.duplicates_suppressed += 1
                    log.warning("suppressed a second copy of msg_id %d (seq %d)", m.msg_id, m.seq)
                else:
                    self._remember(m.msg_id)
                    self._apply_entry(m)
                if self._on_message is not None:
                    if not duplicate:
                        await self._call_handler(m)
                    if generation == self._generation:
                        self._mark_handled(m, record=not duplicate)
                else:
                    self._app_queue.put_nowait((m, duplicate, generation))

    async def _call_handler(self, m: Message) -> None:
        assert self._on_message is not None
        self._stats.handed += 1
        try:
            result = self._on_message(m)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            # The message counts as handled: a failing handler must not stall
            # the timeline for ever.
            log.exception("on_message handler failed for msg_id %d", m.msg_id)

    def _remember(self, msg_id: int) -> None:
        self._recent[msg_id] = None
        if len(self._recent) > 100_000:
            self._recent.popitem(last=False)

    def _release_handed(self) -> None:
        if self._handed is not None:
            self._mark_handled(self._handed, record=True)
            self._handed = None

    def _mark_handled(self, m: Message, record: bool) -> None:
        if record:
            self._commit_batch.append((m.msg_id, m.seq))
        self._commit_seq = max(self._commit_seq, m.seq)
        self._commit_event.set()

    async def _committer(self) -> None:
        while True:
            await self._commit_event.wait()
            # Coalesce: one store transaction per burst, not per message.
            await asyncio.sleep(self._commit_interval_s)
            self._commit_event.clear()
            await self._flush_commits()

    async def _flush_commits(self) -> None:
        async with self._commit_lock:
            if self._account is None:
                return
            batch, self._commit_batch = self._commit_batch, []
            seq = self._commit_seq
            if not batch and seq <= self.committed_seq:
                return
            try:
                await self._store.commit(self._account, seq, batch)
            except BaseException:
                self._commit_batch = batch + self._commit_batch
                raise
            self.committed_seq = max(self.committed_seq, seq)

    # -- conversation state, receipts, signals -----------------------------------------

    def _apply_entry(self, m: Message) -> None:
        """Folds a new (not duplicate) entry into its conversation's state, and
        notes a chat message from the peer of a direct conversation for the
        automatic DELIVERED receipt (events never cause one)."""
        self._states.apply(m)
        if (
            self._auto_delivered
            and m.kind == MessageKind.MESSAGE
            and m.sender_id != self.user_id
            and is_direct(m.conversation_id)
            and m.conv_seq > self._delivered_due.get(m.conversation_id, 0)
        ):
            self._delivered_due[m.conversation_id] = m.conv_seq
            self._delivered_event.set()

    async def _receipter(self) -> None:
        """Submits the automatic DELIVERED receipts: per conversation at most one
        per `delivered_interval_s`, naming the highest conv_seq received, and
        none at or below a delivered position already known."""
        loop = asyncio.get_running_loop()
        while True:
            await self._delivered_event.wait()
            self._delivered_event.clear()
            while self._delivered_due:
                now = loop.time()
                wait: float | None = None
                for conv, target in list(self._delivered_due.items()):
                    if target <= self._states.get(conv).delivered_conv_seq:
                        del self._delivered_due[conv]
                        continue
                    ready_at = self._delivered_at.get(conv, -1e9) + self._delivered_interval_s
                    if now < ready_at:
                        wait = ready_at - now if wait is None else min(wait, ready_at - now)
                        continue
                    del self._delivered_due[conv]
                    self._delivered_at[conv] = now
                    try:
                        future = self.submit(
                            conv, b"", kind=MessageKind.DELIVERED, target_conv_seq=target
                        )
                    except ClientClosed:
                        return  # closing or stopped: no more receipts
                    except OutboxFull:
                        log.info("outbox full: no automatic DELIVERED receipt for %s", conv)
                        continue
                    future.add_done_callback(_log_receipt_failure)
                    self._stats.delivered_receipts += 1
                if wait is None:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._delivered_event.wait()
                self._delivered_event.clear()

    def _signal(self, signal: Signal) -> None:
        self._stats.signals += 1
        if self._on_signal is None and not self._signal_queues:
            return  # nobody listens: nothing to keep
        if len(self._signal_inbox) >= self._signal_buffer:
            self._signal_inbox.popleft()
            self._stats.signals_dropped += 1
        self._signal_inbox.append(signal)
        self._signal_event.set()

    async def _signaller(self) -> None:
        """Hands signals to the callback and the `signals()` iterators, off the
        reader's task: a slow app never delays the stream."""
        while True:
            await self._signal_event.wait()
            self._signal_event.clear()
            while self._signal_inbox:
                signal = self._signal_inbox.popleft()
                for queue in self._signal_queues:
                    if queue.qsize() >= self._signal_buffer:
                        queue.get_nowait()
                        self._stats.signals_dropped += 1
                    queue.put_nowait(signal)
                if self._on_signal is not None:
                    try:
                        result = self._on_signal(signal)
                        if inspect.isawaitable(result):
                            await result
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("on_signal handler failed for %r", signal)

    # -- the outbox --------------------------------------------------------------------

    async def _open_account(self, account: str) -> None:
        """Loads the account's cursor and outbox. The restored messages enter the
        send window first, in their order; what was submitted meanwhile follows."""
        last = await self._store.load_last_seq(account)
        epoch = await self._store.load_epoch(account)
        entries = await self._store.outbox_load(account)
        # Nothing awaited from here on: submit() sees the account and the
        # restored messages at once.
        loop = asyncio.get_running_loop()
        self._account = account
        self._store_epoch = epoch
        self.user_id, self.device_id = account.split("/", 1)
        self._states.user_id = self.user_id
        self._receiver = Receiver(last)
        self.committed_seq = self._commit_seq = last
        for e in entries:
            m = Outgoing(e.client_msg_id, e.conversation_id, e.body, e.content_type)
            m.order, m.restored = e.order, True
            m.kind, m.target_conv_seq = e.kind, e.target_conv_seq
            future = self._futures.get(e.client_msg_id)
            if future is not None:
                # The app re-submitted it before the account was known: it is
                # the restored one, in its original place.
                self._unsaved.pop(e.client_msg_id, None)
            else:
                future = loop.create_future()
                future.add_done_callback(_consume_exception)  # the app may never ask
                self._futures[e.client_msg_id] = future
            self._window.submit(m)
        self._next_order = max((e.order for e in entries), default=-1) + 1
        for m in self._unsaved.values():
            m.order = self._next_order
            self._next_order += 1
        self._stats.outbox_restored = len(entries)
        if entries:
            log.info("resending %d messages from the outbox of %s", len(entries), account)
            self._wake.set()
        self._advance_persisted()
        self._settle_persist_waiters(None)
        self._account_ready.set()
        self._outbox_event.set()

    def _finish(self, outcome: SendOutcome) -> None:
        """Queues a final outcome: reported to the app, then deleted from the outbox."""
        self._finished.append(outcome)
        self._outbox_event.set()

    async def _outboxer(self) -> None:
        await self._account_ready.wait()
        while True:
            await self._outbox_event.wait()
            self._outbox_event.clear()
            async with self._outbox_lock:
                await self._drain_outbox_locked()

    async def _drain_outbox_locked(self) -> None:
        """Writes submitted messages to the outbox (then lets them be sent), and
        reports finished ones to the app (then deletes them). Safe to cancel and
        to run again: each step is repeated, never skipped."""
        account = self._account
        if account is None:
            return
        if self._unsaved:
            batch = list(self._unsaved.values())
            try:
                await self._store.outbox_add(
                    account,
                    [
                        OutboxEntry(
                            m.client_msg_id,
                            m.conversation_id,
                            m.content_type,
                            m.body,
                            m.order,
                            m.kind,
                            m.target_conv_seq,
                        )
                        for m in batch
                    ],
                )
            except Exception as exc:
                log.error("could not write %d messages to the outbox: %r", len(batch), exc)
                for m in batch:
                    if self._unsaved.get(m.client_msg_id) is m:
                        del self._unsaved[m.client_msg_id]
                        future = self._futures.pop(m.client_msg_id, None)
                        if future is not None and not future.done():
                            future.set_exception(exc)
                self._advance_persisted()
                self._settle_persist_waiters(exc)
            else:
                sending = not self._closing and self._terminal is None
                for m in batch:
                    if self._unsaved.get(m.client_msg_id) is m:
                        del self._unsaved[m.client_msg_id]
                        if sending and m.client_msg_id in self._futures:
                            self._window.submit(m)
                self._advance_persisted()
                self._settle_persist_waiters(None)
                self._wake.set()
        # Deletes come after adds (lower send latency). A message the app
        # re-submits while its earlier copy's delete is queued loses its row to
        # that delete; it is a repeat of an acknowledged (stored) message, so
        # nothing can be lost by that.
        if self._finished:
            outcomes = list(self._finished)
            while self._reported < len(outcomes):
                outcome = outcomes[self._reported]
                self._reported += 1
                await self._report(outcome)
            await self._store.outbox_delete(account, [o.client_msg_id for o in outcomes])
            del self._finished[: len(outcomes)]
            self._reported -= len(outcomes)

    async def _report(self, outcome: SendOutcome) -> None:
        if self._on_send_result is None:
            return
        try:
            result = self._on_send_result(outcome)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            # Reported all the same: a failing handler must not keep a message
            # in the outbox (and resent) for ever.
            log.exception("on_send_result handler failed for %s", outcome.client_msg_id)

    def _advance_persisted(self) -> None:
        """Every submit older than the oldest unwritten one is settled (`_unsaved`
        is in submit order; a message merged into a restored one left it)."""
        if self._unsaved:
            self._persisted_ticket = next(iter(self._unsaved.values())).ticket - 1
        else:
            self._persisted_ticket = self._tickets

    def _settle_persist_waiters(self, error: BaseException | None, final: bool = False) -> None:
        """Wakes `persisted()` callers whose messages are all settled, with
        `error` if given; with `final` (closing), every caller."""
        keep = []
        for target, waiter in self._persist_waiters:
            if waiter.done():
                continue
            if self._persisted_ticket >= target or final:
                if error is not None:
                    waiter.set_exception(error)
                else:
                    waiter.set_result(None)
            else:
                keep.append((target, waiter))
        self._persist_waiters = keep

    def _stop(self, exc: ClientClosed) -> None:
        """Fails every pending send with `exc` and ends `messages()`. The
        messages stay in the outbox (those not written yet are written by
        close()), for the next client on this store."""
        for cmid, future in list(self._futures.items()):
            self._window.remove(cmid)
            if not future.done():
                future.set_exception(exc)
        self._futures.clear()
        # The dispatcher hands on what is already in order, then ends messages().
        self._ending = True
        self._inbox_event.set()
        queues, self._signal_queues = self._signal_queues, []
        for queue in queues:
            queue.put_nowait(_END)


class _Messages:
    """The iterator behind `Client.messages()`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> Message:
        c = self._client
        c._release_handed()
        while True:
            item = await c._app_queue.get()
            if item is _END:
                c._app_queue.put_nowait(_END)  # for any other iterator
                if c._terminal is not None:
                    raise c._terminal
                raise StopAsyncIteration
            message, duplicate, generation = item
            if generation != c._generation:
                continue  # of a store the cursor was reset away from
            if duplicate:
                c._mark_handled(message, record=False)
                continue
            c._handed = message
            c._stats.handed += 1
            return message


class _Signals:
    """The iterator behind `Client.signals()`."""

    def __init__(self, client: Client, queue: asyncio.Queue[Any]) -> None:
        self._client = client
        self._queue = queue

    def __aiter__(self) -> _Signals:
        return self

    async def __anext__(self) -> Signal:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            raise StopAsyncIteration
        signal: Signal = item
        return signal

    async def aclose(self) -> None:
        """Stops receiving signals (the client keeps none for this iterator)."""
        with contextlib.suppress(ValueError):
            self._client._signal_queues.remove(self._queue)
        self._queue.put_nowait(_END)


def _kind(value: int) -> MessageKind:
    try:
        return MessageKind(value)
    except ValueError:
        return MessageKind.UNSPECIFIED


def _log_receipt_failure(future: asyncio.Future[SendResult]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None and not isinstance(exc, ClientClosed):
        log.info("automatic DELIVERED receipt not stored: %s", exc)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancels `tasks` and waits until they are done. A task may survive one
    cancellation (an application hook, or asyncio.wait_for on Python 3.11,
    swallows it): such a task is cancelled again rather than waited on for ever."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())


def _describe(exc: BaseException, address: str | None = None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(rpc_error(exc, address))
    if isinstance(exc, TimeoutError):
        return f"no answer from {address} in time" if address else "no answer in time"
    return f"{type(exc).__name__}: {exc}"


__all__ = [
    "Client",
    "ClientStats",
    "DebugHooks",
    "MessageHandler",
    "SendResultHandler",
    "SignalHandler",
]
