"""The upstream half of the protocol as a pure state machine (no I/O, no clock).

`SendWindow` decides which `Send` frames to write and when, and matches the
gateway's answers to messages. The caller feeds it events (`submit`,
`on_connected`, `on_ack`, `on_error`, `on_disconnected`) and the current time, and
writes the frames `poll()` returns, in that order.

Rules it implements (docs/protocol.md, "Sending"):

- `client_msg_id` is fixed when a message is submitted and never changes: not on
  a retransmit, not on a reconnect. It is the server's idempotency key.
- `client_id` is per connection: 1, 2, 3, ... in submission order. Messages are
  numbered only when they enter the send window, so a reconnect renumbers every
  unacknowledged message from `next_client_id` in the original order.
- At most `window` numbered messages are unanswered at once.
- The gateway answers a connection's frames in order, so only the oldest
  unanswered message runs a retransmit timer; after `max_attempts` writes it
  reports `exhausted` and the caller reconnects.
- `OUT_OF_ORDER{expected}`: everything numbered `>= expected` was refused, so it
  is renumbered from `expected` and resent in order.
- A retryable error holds that message (and, to keep the order, everything after
  it) for a backoff, then resends the same numbers.
- A non-retryable error fails that message for good; the gateway reuses its
  `client_id`, so everything after it is renumbered down by one and resent.
- A frame may be answered more than once (a retransmit of an answered frame gets
  the original ACK again) or not at all (a retransmit of a frame still being
  processed). An ACK is always believed (ACK means durable) whatever client_id it
  names; an error is acted on only if it names the message's current client_id,
  since one naming an older number describes a state already left behind. Acting
  on a stale error costs at most some redundant frames: the gateway answers them
  from its own state, and every OUT_OF_ORDER carries the id it really expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imclient.errors import SendErrorCode
from imclient.policy import RetransmitPolicy


@dataclass(eq=False, slots=True)
class Outgoing:
    """A message the client holds until the gateway acknowledges it."""

    client_msg_id: str
    conversation_id: str
    body: bytes
    content_type: int
    order: int = 0  # submission order in the account's outbox
    kind: int = 0  # im.common.v1.MessageKind (0: a chat message)
    target_conv_seq: int = 0  # the event's target or position (0 for a chat message)
    restored: bool = False  # loaded from the outbox (submitted by an earlier client)
    ticket: int = 0  # the client's submit counter (for Client.persisted())
    # State on the current connection; reset by on_connected/on_disconnected.
    client_id: int = 0  # 0: not numbered (not in the window) yet
    sent: bool = False  # the current (client_id, client_msg_id) frame was written
    attempts: int = 0  # writes of the current frame since its last answer
    not_before: float = 0.0  # hold (retryable error backoff)
    retries: int = 0  # retryable errors seen, for the backoff
    # Across connections.
    total_writes: int = field(default=0)


@dataclass(frozen=True, slots=True)
class Frame:
    """One `Send` frame to write."""

    client_id: int
    message: Outgoing
    retransmit: bool


@dataclass(frozen=True, slots=True)
class Acked:
    message: Outgoing
    client_id: int
    msg_id: int
    seq: int
    conv_seq: int
    server_time_ms: int


@dataclass(frozen=True, slots=True)
class Failed:
    message: Outgoing
    code: SendErrorCode
    reason: str


class SendWindow:
    """Send window, client_id numbering and ACK matching of one client.

    Not thread-safe; meant to be driven from one asyncio task at a time.
    """

    def __init__(self, policy: RetransmitPolicy | None = None, window: int = 64) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.policy = policy or RetransmitPolicy()
        self.max_window = window
        self.window = window
        self.connected = False
        self.next_client_id = 1
        # Insertion order == submission order == send order. Numbered messages are
        # always a prefix of this dict, with increasing client_ids.
        self._pending: dict[str, Outgoing] = {}
        self._head: Outgoing | None = None
        self._head_deadline = 0.0
        self._rewound_to = 0  # the client_id the last resync started from
        self.exhausted = False  # the oldest send went unanswered max_attempts times
        self.retransmits = 0
        self.writes = 0

    # -- queries --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, client_msg_id: str) -> bool:
        return client_msg_id in self._pending

    def pending(self) -> list[Outgoing]:
        """Unacknowledged messages in send order."""
        return list(self._pending.values())

    def get(self, client_msg_id: str) -> Outgoing | None:
        """The pending message with this id, if any."""
        return self._pending.get(client_msg_id)

    def in_flight(self) -> list[Outgoing]:
        """Numbered (in-window) messages in client_id order."""
        out = []
        for m in self._pending.values():
            if m.client_id == 0:
                break
            out.append(m)
        return out

    # -- events ----------------------------------------------------------------

    def submit(self, message: Outgoing) -> None:
        """Queues a message behind every earlier one. Its client_msg_id must be new."""
        if message.client_msg_id in self._pending:
            raise ValueError(f"client_msg_id {message.client_msg_id!r} is already pending")
        message.client_id = 0
        self._pending[message.client_msg_id] = message

    def on_connected(self, next_client_id: int = 1, window: int | None = None) -> None:
        """A new connection said Welcome: every pending message is renumbered from
        `next_client_id`, in its original order, as the window admits it."""
        self._reset_connection_state()
        self.connected = True
        self.next_client_id = max(1, next_client_id)
        if window is not None and window > 0:
            self.window = min(self.max_window, window)
        else:
            self.window = self.max_window

    def on_disconnected(self) -> None:
        """The connection is gone: nothing is numbered any more, nothing is lost."""
        self._reset_connection_state()
        self.connected = False

    def remove(self, client_msg_id: str) -> Outgoing | None:
        """Withdraws a message (e.g. the client is closing). Returns it if pending."""
        message = self._pending.pop(client_msg_id, None)
        if message is not None and message.client_id and not message.sent:
            # Nothing at or after it was written yet: close the hole. (A hole left
            # by a written frame heals by the gateway's OUT_OF_ORDER answer.)
            self._rewind(message.client_id, message.client_id)
        return message

    def on_ack(
        self,
        client_id: int,
        client_msg_id: str,
        msg_id: int,
        seq: int,
        conv_seq: int,
        server_time_ms: int,
    ) -> Acked | None:
        """A SendAck. Returns the acknowledged message, or None for a repeat ACK of
        a message already acknowledged (a retransmit's answer)."""
        message = self._pending.pop(client_msg_id, None)
        if message is None:
            return None
        return Acked(message, client_id, msg_id, seq, conv_seq, server_time_ms)

    def on_error(
        self,
        client_id: int,
        client_msg_id: str,
        code: SendErrorCode,
        retryable: bool,
        reason: str,
        expected_client_id: int,
        now: float,
    ) -> Failed | None:
        """A SendError. Returns Failed when the message is refused for good (the
        caller reports it to the app); None otherwise (it will be resent)."""
        message = self._pending.get(client_msg_id)
        if message is None:
            return None  # an answer about a message already acknowledged or failed
        if message.client_id != client_id or client_id == 0:
            return None  # about an older numbering of this message: superseded
        message.attempts = 0
        if code == SendErrorCode.OUT_OF_ORDER:
            if message.sent and expected_client_id == self._rewound_to:
                # We already renumbered from this very `expected` and have written
                # this frame since: the refusal is of a frame written before that
                # (every OUT_OF_ORDER of a burst names the same `expected`).
                # Acting again would resend the whole window once per refusal.
                return None
            if expected_client_id > 0:
                # Everything from the refused frame (or from `expected`, if lower)
                # moves to `expected` onwards. `expected` may be above the refused
                # id: that number was used (or forgotten) by the gateway.
                self._rewind(min(expected_client_id, client_id), expected_client_id)
            else:
                self._rewind(client_id, client_id)
            return None
        if retryable:
            message.retries += 1
            self._rewind(client_id, client_id)
            message.not_before = now + self.policy.retry_delay(message.retries)
            return None
        del self._pending[client_msg_id]
        self._rewind(client_id, client_id)
        return Failed(message, code, reason)

    # -- output ----------------------------------------------------------------

    def poll(self, now: float) -> list[Frame]:
        """Frames to write now, in order. Sets `exhausted` when the oldest
        unanswered send has used all its attempts (the caller should reconnect)."""
        if not self.connected:
            return []
        frames: list[Frame] = []
        in_window = 0
        blocked = False
        head: Outgoing | None = None
        for m in self._pending.values():
            if m.client_id == 0:
                if in_window >= self.window:
                    break
                m.client_id = self.next_client_id
                self.next_client_id += 1
                m.sent = False
                m.attempts = 0
            in_window += 1
            if m.sent:
                if head is None:
                    head = m
                continue
            # Unsent messages are always a suffix of the window: write them in
            # order, and none after one that is held.
            if blocked or m.not_before > now:
                blocked = True
                continue
            frames.append(self._write(m, retransmit=False))
            if head is None:
                head = m
        if head is not self._head:
            self._head = head
            if head is not None:
                self._head_deadline = now + self.policy.timeout(max(head.attempts, 1))
        elif head is not None and now >= self._head_deadline:
            if head.attempts >= self.policy.max_attempts:
                self.exhausted = True
            else:
                frames.append(self._write(head, retransmit=True))
                self.retransmits += 1
                self._head_deadline = now + self.policy.timeout(head.attempts)
        return frames

    def next_deadline(self) -> float | None:
        """When `poll()` may have something new to do without any event."""
        if not self.connected:
            return None
        deadlines: list[float] = []
        if self._head is not None:
            deadlines.append(self._head_deadline)
        for m in self._pending.values():
            if m.client_id == 0:
                break
            if not m.sent:
                if m.not_before > 0:
                    deadlines.append(m.not_before)
                break
        return min(deadlines) if deadlines else None

    # -- internals ---------------------------------------------------------------

    def _write(self, m: Outgoing, retransmit: bool) -> Frame:
        m.sent = True
        m.attempts += 1
        m.total_writes += 1
        self.writes += 1
        return Frame(m.client_id, m, retransmit)

    def _rewind(self, from_client_id: int, start: int) -> None:
        """The gateway expects `start` next: every numbered message at or above
        `from_client_id` is renumbered from `start`, in order, and marked for
        (re)sending."""
        cid = start
        for m in self._pending.values():
            if m.client_id == 0:
                break
            if m.client_id < from_client_id:
                continue
            if m.client_id != cid:
                m.attempts = 0
            m.client_id = cid
            m.sent = False
            cid += 1
        self.next_client_id = cid
        self._rewound_to = start
        if self._head is not None and not self._head.sent:
            self._head = None

    def _reset_connection_state(self) -> None:
        for m in self._pending.values():
            m.client_id = 0
            m.sent = False
            m.attempts = 0
            m.not_before = 0.0
        self._head = None
        self._head_deadline = 0.0
        self._rewound_to = 0
        self.exhausted = False
        self.next_client_id = 1
