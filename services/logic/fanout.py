"""Fanout: committed messages into every recipient's timeline, in conv_seq order.

One call is one transaction:

1. the conversation's FAN-OUT lock (not its send lock: sends go on meanwhile;
   they commit in conv_seq order, so the committed messages above the watermark
   always form a prefix of what will ever exist there);
2. the watermark and the messages above it, then the recipients of each (members
   by conv_seq range, read after the messages so no membership change committed
   before a message is missed);
3. a page of (message, recipient) rows in (conv_seq, user_id) order, bounded by
   `max_rows` (also the number of user locks held) and by the response size;
4. the recipients' USER locks, in ascending lock-key order; rows that exist already
   (the sender's own, or a repeat) keep their seq; the others get new seqs from
   seqsvc, each checked to be above the user's last committed seq (I1), and are
   inserted;
5. the new watermark (and, for a big group's message split over several calls,
   the cursor inside it) and the pending-repair mark, then commit.

A concurrent call for the same conversation waits on the lock and then finds
nothing left above the new watermark. A call that fails writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from logic import repo
from logic.config import RESPONSE_HEADROOM_BYTES
from logic.errors import DependencyFailed, SequenceRegression
from logic.faults import Faults
from logic.ids import (
    LOCK_CONV_FANOUT,
    LOCK_USER,
    ConversationId,
    lock_key,
    parse_conversation_id,
    user_seq_key,
)
from logic.model import Delivery, FanoutResult, StoredMessage
from logic.seq import SeqSource
from logic.store import Database
from logic.telemetry import Telemetry, ids

log = logging.getLogger(__name__)


@dataclass
class _Page:
    pairs: list[tuple[str, StoredMessage]]
    watermark: int
    cursor: str
    stopped: bool  # the page ended before the last candidate message was complete


class Fanout:
    def __init__(
        self,
        db: Database,
        seq: SeqSource,
        *,
        default_messages: int,
        max_messages: int,
        max_rows: int,
        max_response_bytes: int,
        repair_after_s: float,
        faults: Faults,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._db = db
        self._seq = seq
        self._tel = telemetry or Telemetry()
        self._default_messages = default_messages
        self._max_messages = max_messages
        self._max_rows = max_rows
        self._budget = max_response_bytes - RESPONSE_HEADROOM_BYTES
        self._repair_after = repair_after_s
        self._faults = faults

    async def fanout(self, conversation_id: str, max_messages: int = 0) -> FanoutResult:
        """Fans out what is committed above the conversation's watermark, up to
        `max_messages` messages (0: the default) and one page of rows; returns the
        rows written or found (in conv_seq order, then user id), the new watermark,
        and has_more when the caller should call again.

        Idempotent: every row is written once per (user, msg_id); a repeat or a
        concurrent call returns nothing new. Durable: the rows and the watermark
        are committed when this returns. Raises InvalidArgument (bad id),
        SequenceRegression (seqsvc went back; nothing written), Unavailable."""
        conv = parse_conversation_id(conversation_id)
        if max_messages <= 0:
            limit = self._default_messages
        else:
            limit = min(max_messages, self._max_messages)
        with self._db.errors(), self._tel.db("fanout", {"im.conversation_id": conv.value}) as span:
            result, written = await self._fanout(conv, limit)
            rows = result.deliveries
            span.set_attributes(
                {
                    "im.watermark": result.watermark,
                    "im.has_more": result.has_more,
                    "im.rows": len(rows),
                    "im.rows_written": written,
                    "im.msg_ids": ids(d.message.msg_id for d in rows),
                    "im.user_ids": ids(d.user_id for d in rows),
                }
            )
        if written:
            self._tel.fanout_rows.labels("written").inc(written)
        if len(rows) > written:
            self._tel.fanout_rows.labels("existing").inc(len(rows) - written)
        return result

    async def _fanout(self, conv: ConversationId, limit: int) -> tuple[FanoutResult, int]:
        """The Fanout transaction; returns the result and how many rows it wrote."""
        async with self._db.pool.connection() as conn, conn.transaction():
            if not self._faults.skip_locks:
                await repo.lock_tx(conn, (LOCK_CONV_FANOUT, lock_key(conv.value)))
            watermark, cursor = await repo.fanout_state_tx(conn, conv.value)
            # Every message has a recipient (its sender was a member), so a page
            # never spans more than max_rows messages.
            window = min(limit, self._max_rows)
            rows = await repo.messages_above_tx(
                conn, conv.value, watermark, window + 1, self._budget
            )
            if not rows:
                await repo.clear_pending(conn, conv.value, watermark)
                return FanoutResult([], watermark, has_more=False), 0
            candidates = rows[:window]
            recipients = await self._recipients(conn, conv, [m for m, _ in candidates])
            page = self._plan(candidates, recipients, watermark, cursor)
            has_more = page.stopped or len(rows) > window

            seqs, written = await self._write_rows_tx(conn, page.pairs)
            await repo.save_fanout_progress_tx(
                conn,
                conv.value,
                page.watermark,
                page.cursor,
                caught_up=not has_more,
                repair_after_s=self._repair_after,
            )
        deliveries = [
            Delivery(user, seq, msg) for (user, msg), seq in zip(page.pairs, seqs, strict=True)
        ]
        return FanoutResult(deliveries, page.watermark, has_more), written

    async def _recipients(
        self, conn: repo.Conn, conv: ConversationId, messages: list[StoredMessage]
    ) -> Callable[[StoredMessage], list[str]]:
        """The sorted recipients of a message: both users of a direct conversation;
        for a group, the members whose range holds its conv_seq (computed only for
        the messages the page reaches)."""
        if conv.is_direct:
            pair = list(conv.pair)
            return lambda _msg: pair
        ranges = await repo.members_between(
            conn, conv.value, messages[0].conv_seq, messages[-1].conv_seq
        )
        return lambda msg: sorted({u for u, lo, hi in ranges if lo < msg.conv_seq <= hi})

    def _plan(
        self,
        candidates: list[tuple[StoredMessage, bool]],
        recipients: Callable[[StoredMessage], list[str]],
        watermark: int,
        cursor: str,
    ) -> _Page:
        """The next page of (recipient, message) rows after (watermark, cursor), in
        (conv_seq, user_id) order, and where it leaves the watermark and cursor."""
        pairs: list[tuple[str, StoredMessage]] = []
        size = 0
        for i, (msg, fits) in enumerate(candidates):
            if not fits:  # its body was not even read: the page ends before it
                return _Page(pairs, watermark, cursor, stopped=True)
            users = recipients(msg)
            if i == 0 and cursor:
                users = [u for u in users if u > cursor]
            for j, user in enumerate(users):
                cost = msg.wire_size + len(user) + 32  # + the FanoutDelivery around it
                if pairs and (len(pairs) >= self._max_rows or size + cost > self._budget):
                    if j > 0:  # part of this message is done: remember where
                        cursor = users[j - 1]
                    return _Page(pairs, watermark, cursor, stopped=True)
                pairs.append((user, msg))
                size += cost
            watermark, cursor = msg.conv_seq, ""
        return _Page(pairs, watermark, cursor, stopped=False)

    async def _write_rows_tx(
        self, conn: repo.Conn, pairs: list[tuple[str, StoredMessage]]
    ) -> tuple[list[int], int]:
        """Writes the missing timeline rows of `pairs` under the users' locks; returns
        each pair's seq (existing or new) and the number of rows written."""
        if not pairs:
            return [], 0
        users = sorted({u for u, _ in pairs})
        if not self._faults.skip_locks:
            await repo.lock_many_tx(conn, LOCK_USER, sorted({lock_key(u) for u in users}))
        last = await repo.last_seqs_tx(conn, users)
        existing = await repo.existing_rows_tx(
            conn, [u for u, _ in pairs], [m.msg_id for _, m in pairs]
        )
        missing = [(u, m) for u, m in pairs if (u, m.msg_id) not in existing]
        if missing:
            values = await self._seq.next_batch([user_seq_key(u) for u, _ in missing])
            if len(values) != len(missing):
                raise DependencyFailed(
                    f"seqsvc returned {len(values)} values for {len(missing)} keys"
                )
            for (user, msg), value in zip(missing, values, strict=True):
                if value <= last[user] and not self._faults.skip_seq_check:
                    raise SequenceRegression(
                        f"seqsvc returned seq {value} for u:{user}, not above the last "
                        f"committed {last[user]}; nothing was written "
                        f"(fan-out of msg {msg.msg_id})"
                    )
                last[user] = max(last[user], value)
                existing[(user, msg.msg_id)] = value
            await repo.insert_timeline_tx(
                conn,
                [u for u, _ in missing],
                [existing[(u, m.msg_id)] for u, m in missing],
                [m.msg_id for _, m in missing],
            )
        return [existing[(u, m.msg_id)] for u, m in pairs], len(missing)
