"""The downstream half of the protocol as a pure state machine (no I/O).

`Receiver` turns pushes and sync pages into the exact, gap-free sequence of
timeline entries to hand to the application, and says when to sync and what to
acknowledge. Rules (docs/protocol.md, "Receiving"; design steps 7 and 8):

- `seq` is the highest timeline position applied. Everything at or below it has
  been handed on, exactly once, in seq order.
- After every (re)connect, and whenever a push reveals a gap, the client must
  sync from `seq` page by page until `has_more` is false. Sync results are the
  authority: they are prefix-closed, and seqs may legitimately skip numbers.
- A push with `seq == self.seq + 1` outside a sync is applied at once. A push at
  or below `seq` is a duplicate: dropped, and acknowledged again (the pusher is
  retransmitting because it missed the ACK).
- A push while a sync is due or running is buffered and applied only after the
  sync: it is never used to move `seq` past entries the sync has not returned
  (gim issue 46). A buffered push still above `seq + 1` afterwards triggers one
  more sync; a push that a sync *started after it arrived* did not return is a
  server fault and is dropped (counted), never applied across the hole.
- ACKs are cumulative: `take_ack()` returns the seq to acknowledge, at most once
  per change, so callers can coalesce.
- The server may announce the timeline's head (`on_head`: Welcome, Pong, Head
  frames; 0 = unknown). A head at or below `seq` changes nothing. A head above
  it makes a sync due, the same sync as a gap's; if a sync is already due or
  running the head is remembered, and a sync that ends below it is followed by
  another one. A head therefore reveals the gap a lost last push leaves, which
  no later push would. The head never moves `seq` by itself: only sync results
  (and in-order pushes) do.
- A sync that *started after* the head was known and still ends below it is a
  miss (a lagging read, or a server fault). The next sync waits
  `head_backoff` (consecutive misses) steps of the caller's backoff; after
  `head_miss_limit` misses in a row the head is given up (counted) until it is
  announced again, so a wrong head costs a few syncs, never a busy loop.
- `restart()`: the timeline now lives in another store (the server named another
  store epoch): every position known was of the old one, so back to seq 0 and a
  sync from the start; the caller forgets the msg_ids it has seen too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """A timeline entry: position `seq` and an opaque payload (the message)."""

    seq: int
    payload: T


class Receiver(Generic[T]):
    """Sequencing of one device's timeline. Not thread-safe (one asyncio loop)."""

    def __init__(self, last_seq: int = 0, head_miss_limit: int = 5) -> None:
        if last_seq < 0:
            raise ValueError("last_seq must be >= 0")
        if head_miss_limit < 0:
            raise ValueError("head_miss_limit must be >= 0")
        self.seq = last_seq
        self.need_sync = True  # nothing is trusted before the first sync
        self.syncing = False
        self._buffer: dict[int, tuple[Entry[T], int]] = {}  # seq -> (entry, sync_epoch at arrival)
        self._sync_epoch = 0  # incremented when a sync starts
        self._running_epoch = 0
        self._ack_due = False
        self.last_acked = 0
        self.head = 0  # the highest head announced and not given up (0: none)
        self._head_epoch = 0  # _sync_epoch when `head` was announced
        self._head_miss_run = 0  # consecutive syncs that ended below a head known before them
        self.head_miss_limit = head_miss_limit
        # Counters (observability and tests).
        self.pushes = 0
        self.duplicates = 0
        self.buffered = 0
        self.gaps = 0
        self.dropped_unconfirmed = 0
        self.head_syncs = 0  # syncs made due by a head above seq
        self.head_misses = 0  # syncs that ended below a head known before they started
        self.heads_unreached = 0  # heads given up after head_miss_limit misses in a row
        self.restarts = 0  # restart(): the store epoch changed

    @property
    def buffered_seqs(self) -> list[int]:
        return sorted(self._buffer)

    def on_connected(self) -> None:
        """A (new) connection: sync before trusting pushes. Buffered pushes are
        kept: they are real entries and the sync decides their fate."""
        self.need_sync = True
        self.syncing = False
        self.last_acked = 0  # the new connection's pusher state is unknown: ack again
        self._head_miss_run = 0  # a known head is kept (it is still true), its misses are not

    def restart(self) -> None:
        """The timeline now lives in another store (another store epoch): every
        position known so far was of the old one. Back to seq 0 with nothing
        buffered, no head and no ACK owed; a sync from the start is due. A
        running sync is abandoned (its pages continue the old position)."""
        self.seq = 0
        self._buffer.clear()
        self.head = 0
        self._head_miss_run = 0
        self._ack_due = False
        self.last_acked = 0
        self.syncing = False
        self.need_sync = True
        self.restarts += 1

    def on_head(self, head: int) -> bool:
        """The server says the timeline holds an entry at `head` (0: unknown, an
        old gateway or a store that did not answer). Returns True if this made a
        sync due (the caller starts it); False if the head is at or below `seq`
        (nothing to do) or a sync was already due or running (the head is
        remembered and checked when that sync ends)."""
        if head <= self.seq:
            return False
        if head > self.head:
            self.head = head
            self._head_epoch = self._sync_epoch
        if self.need_sync or self.syncing:
            return False
        self.need_sync = True
        self.head_syncs += 1
        return True

    @property
    def head_backoff(self) -> int:
        """How many syncs in a row ended below a head they should have reached
        (0: sync at once). The caller waits its backoff for this many failures
        before the next sync."""
        return self._head_miss_run

    def skip_to(self, seq: int) -> None:
        """For a device that shows nothing (send-only): everything up to `seq`
        counts as handled and is acknowledged. Never for a receiving device."""
        if seq > self.seq:
            self.seq = seq
            self._ack_due = True
        self.need_sync = False

    def on_push(self, entry: Entry[T]) -> list[Entry[T]]:
        """A pushed entry. Returns the entries to hand on now, in order."""
        self.pushes += 1
        if entry.seq <= self.seq:
            self.duplicates += 1
            self._ack_due = True
            return []
        if self.need_sync or self.syncing:
            self._hold(entry)
            return []
        if entry.seq == self.seq + 1:
            out = [entry]
            self.seq = entry.seq
            out.extend(self._drain())
            self._ack_due = True
            return out
        # A gap (or a seq skip, which only a sync can tell apart): sync first.
        self.gaps += 1
        self._hold(entry)
        self.need_sync = True
        return []

    def start_sync(self) -> int:
        """Begins a sync; returns the `after_seq` of its first page."""
        self.need_sync = False
        self.syncing = True
        self._sync_epoch += 1
        self._running_epoch = self._sync_epoch
        return self.seq

    def on_sync_page(self, entries: list[Entry[T]], has_more: bool) -> list[Entry[T]]:
        """One page of a running sync (entries with seq > the page's after_seq,
        ascending). Returns the entries to hand on now, in order. When the sync
        is over (`has_more` false) buffered pushes are applied or re-synced."""
        if not self.syncing:
            raise RuntimeError("on_sync_page without start_sync")
        for a, b in itertools.pairwise(entries):
            if b.seq <= a.seq:
                raise ValueError(f"sync page not in ascending seq order ({a.seq} then {b.seq})")
        out: list[Entry[T]] = []
        for entry in entries:
            if entry.seq <= self.seq:
                continue  # an overlap with what a push or an earlier page gave
            out.append(entry)
            self.seq = entry.seq
            self._buffer.pop(entry.seq, None)
        if has_more and not entries:
            has_more = False  # a server that says "more" but gives nothing: stop here
        if has_more:
            return out
        self.syncing = False
        for s in [s for s in self._buffer if s <= self.seq]:
            del self._buffer[s]
        out.extend(self._drain())
        for s, (_, epoch) in list(self._buffer.items()):
            if epoch < self._running_epoch:
                # This sync started after the push arrived, so the entry was
                # committed before the sync read the timeline, and yet it was not
                # returned: the server broke prefix-closure. Never jump the hole.
                del self._buffer[s]
                self.dropped_unconfirmed += 1
        if self._buffer:
            self.need_sync = True
        self._check_head()
        self._ack_due = True
        return out

    def _check_head(self) -> None:
        """At the end of a sync: a known head above `seq` makes another sync due."""
        if self.head <= self.seq:
            self._head_miss_run = 0
            return
        if self._head_epoch < self._running_epoch:
            # The sync started after the head was announced, so it should have
            # reached it: a miss. Retry with backoff, then give up.
            self.head_misses += 1
            self._head_miss_run += 1
            if self._head_miss_run > self.head_miss_limit:
                self.heads_unreached += 1
                self.head = 0
                self._head_miss_run = 0
                return
        elif not self.need_sync:
            self.head_syncs += 1  # announced during the sync: one more is due
        self.need_sync = True

    def sync_failed(self) -> None:
        """The running sync was abandoned (error, disconnect): sync again later."""
        self.syncing = False
        self.need_sync = True

    def take_ack(self) -> int | None:
        """The cumulative seq to acknowledge now, or None if nothing new."""
        if not self._ack_due or self.seq == 0:
            self._ack_due = False
            return None
        self._ack_due = False
        self.last_acked = self.seq
        return self.seq

    @property
    def ack_due(self) -> bool:
        return self._ack_due and self.seq > 0

    def _hold(self, entry: Entry[T]) -> None:
        if entry.seq not in self._buffer:
            self.buffered += 1
            # Pushes that arrive while a sync runs carry its epoch: only a sync
            # started later can confirm or refute them.
            self._buffer[entry.seq] = (entry, self._sync_epoch)

    def _drain(self) -> list[Entry[T]]:
        out: list[Entry[T]] = []
        while self.seq + 1 in self._buffer:
            entry, _ = self._buffer.pop(self.seq + 1)
            out.append(entry)
            self.seq = entry.seq
        return out
