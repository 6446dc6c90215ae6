"""The client_id rule of one connection, as a pure state machine.

A connection's sends carry client_id 1, 2, 3, ... The gateway expects
`next_client_id` (= the highest accepted + 1):

- equal: accepted, queued, processed one at a time in client_id order;
- higher: refused with OUT_OF_ORDER, `expected_client_id = next_client_id`; dropped;
- lower: a retransmit. If its SendAck is remembered and names the same
  client_msg_id, the same SendAck again; if it is still being processed, nothing (its
  answer is on the way); otherwise (too old to be remembered, or the client_id was
  used for another message) OUT_OF_ORDER with the expected id, so the client resends
  it under a new client_id and logic's dedup on client_msg_id returns the original
  ACK.

A send that fails (SendError of any kind from processing) does not consume its
client_id: `next_client_id` goes back to it, and every send accepted after it in
the same window is refused OUT_OF_ORDER with `expected_client_id` = the failed one
when its turn comes (`epoch` tells them apart), because processing them would store
them before the failed one and break the sender's order. Retryable failures are
resent by the client with the same client_id; after a non-retryable failure the
next send reuses that client_id.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class Accept:
    """client_id is the expected one: run the remaining checks, then `accept()`."""


@dataclass(frozen=True, slots=True)
class Replay(Generic[A]):
    """A retransmit of an answered send: send `ack` again."""

    ack: A


@dataclass(frozen=True, slots=True)
class Pending:
    """A retransmit of a send still being processed: its answer is coming."""


@dataclass(frozen=True, slots=True)
class OutOfOrder:
    expected: int
    reason: str


Decision = Accept | Replay[A] | Pending | OutOfOrder


class ClientIdOrder(Generic[A]):
    """State of one connection's client_id sequence. `A` is the SendAck type."""

    def __init__(self, ack_memory: int) -> None:
        if ack_memory < 1:
            raise ValueError("ack_memory must be >= 1")
        self.next_client_id = 1
        self.epoch = 0
        self.reset_to = 1
        self._ack_memory = ack_memory
        self._in_flight: dict[int, str] = {}
        self._acks: OrderedDict[int, tuple[str, A]] = OrderedDict()

    @property
    def in_flight(self) -> int:
        """Accepted sends not answered yet (the send window's occupancy)."""
        return len(self._in_flight)

    def classify(self, client_id: int, client_msg_id: str) -> Decision[A]:
        expected = self.next_client_id
        if client_id == expected:
            return Accept()
        if client_id > expected:
            return OutOfOrder(expected, f"expected client_id {expected}, got {client_id}")
        known = self._acks.get(client_id)
        if known is not None:
            if known[0] == client_msg_id:
                return Replay(known[1])
            return OutOfOrder(
                expected,
                f"client_id {client_id} was already used by another message; "
                f"resend from {expected}",
            )
        pending = self._in_flight.get(client_id)
        if pending is not None:
            if pending == client_msg_id:
                return Pending()
            return OutOfOrder(
                expected,
                f"client_id {client_id} is in use by another message; resend from {expected}",
            )
        return OutOfOrder(
            expected,
            f"client_id {client_id} is older than the answers kept for this connection; "
            f"resend it as {expected} (its client_msg_id deduplicates it)",
        )

    def accept(self, client_id: int, client_msg_id: str) -> int:
        """Records the expected send as accepted; returns the epoch it belongs to."""
        if client_id != self.next_client_id:
            raise ValueError(f"accept({client_id}) but expected {self.next_client_id}")
        self._in_flight[client_id] = client_msg_id
        self.next_client_id += 1
        return self.epoch

    def is_stale(self, epoch: int) -> bool:
        """Whether a send accepted in `epoch` follows a failed one (refuse it)."""
        return epoch != self.epoch

    def completed(self, client_id: int, client_msg_id: str, ack: A) -> None:
        """The send was stored; remember its ACK for retransmits."""
        self._in_flight.pop(client_id, None)
        self._acks[client_id] = (client_msg_id, ack)
        self._acks.move_to_end(client_id)
        while len(self._acks) > self._ack_memory:
            self._acks.popitem(last=False)

    def failed(self, client_id: int) -> None:
        """The send was refused: its client_id is expected again, and every send
        accepted after it becomes stale."""
        for cid in [c for c in self._in_flight if c >= client_id]:
            del self._in_flight[cid]
        self.next_client_id = client_id
        self.reset_to = client_id
        self.epoch += 1

    def dropped(self, client_id: int) -> None:
        """A stale send was answered OUT_OF_ORDER (already out of the window)."""
        self._in_flight.pop(client_id, None)
