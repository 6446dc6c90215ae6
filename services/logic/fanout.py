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

FanoutBatch does the same for several conversations in ONE transaction (one
commit, one seqsvc call): every conversation's FAN-OUT lock first, in ascending
lock-key order, then the union of all recipients' USER locks in ascending order.
Every transaction that takes several of these locks takes them in that one
global order (send locks, then fan-out locks, then user locks, each class by
key), so batches, single fan-outs and sends cannot deadlock one another. Each
conversation gets exactly what a Fanout of it alone would have given; the rows
and response bytes of the whole call are bounded like one Fanout, and a
conversation the call did not finish says has_more (possibly with no rows). An
invalid id is that conversation's own error and never touches the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry.trace import Span

from logic import repo
from logic.config import RESPONSE_HEADROOM_BYTES
from logic.errors import DependencyFailed, InvalidArgument, LogicError
from logic.faults import Faults
from logic.ids import (
    LOCK_CONV_FANOUT,
    LOCK_USER,
    ConversationId,
    lock_key,
    parse_conversation_id,
    user_seq_key,
)
from logic.model import EVERY_MEMBER, RECEIPTS, Delivery, FanoutResult, StoredMessage
from logic.seq import SeqSource, check_above
from logic.store import Database
from logic.telemetry import Telemetry, ids

log = logging.getLogger(__name__)

#: Longest error message put in one FanoutBatch result.
_MAX_ERROR_CHARS = 300
#: Accounted response bytes of one FanoutBatch result besides its rows.
_RESULT_OVERHEAD_BYTES = 48


@dataclass(frozen=True)
class BatchResult:
    """One conversation's part of a FanoutBatch: its result, or the error a
    Fanout of it alone would have raised (then nothing was written for it)."""

    conversation_id: str
    result: FanoutResult | None
    error: LogicError | None = None


@dataclass
class _Page:
    pairs: list[tuple[str, StoredMessage]]
    watermark: int
    cursor: str
    stopped: bool  # the page ended before the last candidate message was complete
    size: int = 0  # accounted response bytes, including what came before the page


def _by_kind(
    conv: ConversationId, members: Callable[[StoredMessage], list[str]]
) -> Callable[[StoredMessage], list[str]]:
    """Who gets a timeline entry of each kind (common.proto MessageKind): chat
    messages, edits and recalls go to every member (`members`); a READ or DELIVERED
    to its sender's own timeline and, in a direct conversation, to the peer's (the
    receipt); a DELETE_FOR_ME to its sender's only. A receipt in a group is never
    fanned out to the other members: they query it (GetReceipts)."""

    def recipients(msg: StoredMessage) -> list[str]:
        if msg.kind in EVERY_MEMBER:
            return members(msg)
        if msg.kind in RECEIPTS and conv.is_direct:
            return list(conv.pair)
        return [msg.sender_id]

    return recipients


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
        max_batch_conversations: int = 256,
        timeline_retention_s: float = 0.0,
    ) -> None:
        #: Timeline retention (retention.py); 0 = forever. A message older than this
        #: is not written into timelines any more: the pruner may already have
        #: passed its recipients, and a row written now could outlive its message.
        self._retention_ms = timeline_retention_s * 1000
        self._db = db
        self._seq = seq
        self._tel = telemetry or Telemetry()
        self._default_messages = default_messages
        self._max_messages = max_messages
        self._max_rows = max_rows
        self._budget = max_response_bytes - RESPONSE_HEADROOM_BYTES
        self._repair_after = repair_after_s
        self._faults = faults
        self._max_batch = max_batch_conversations

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
            span.set_attributes({"im.watermark": result.watermark, "im.has_more": result.has_more})
            self._count_rows(span, result.deliveries, written)
        return result

    def _count_rows(self, span: Span, rows: list[Delivery], written: int) -> None:
        """The rows a call returned, on its span and in the written/existing counter."""
        span.set_attributes(
            {
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

    async def fanout_batch(
        self, conversation_ids: Sequence[str], max_messages: int = 0
    ) -> list[BatchResult]:
        """`fanout` for several distinct conversations in one transaction: one
        result per id, in the order given. `max_messages` bounds each
        conversation; max_rows and the response budget bound the whole call, and
        a conversation it did not finish has has_more (possibly with no rows).

        An invalid id gets its own InvalidArgument in its result and the others
        go on. Raises InvalidArgument for the request itself (no ids, too many,
        repeated ids), and like `fanout` (SequenceRegression, Unavailable) when
        the transaction fails: then nothing was written for any of them."""
        if not conversation_ids:
            raise InvalidArgument("conversation_ids is empty: name at least one conversation")
        if len(conversation_ids) > self._max_batch:
            raise InvalidArgument(
                f"{len(conversation_ids)} conversation_ids in one FanoutBatch; at most "
                f"{self._max_batch} are allowed (IM_LOGIC_FANOUT_BATCH_MAX_CONVERSATIONS): "
                "split them over several calls"
            )
        seen: set[str] = set()
        for cid in conversation_ids:
            if cid in seen:
                raise InvalidArgument(
                    f"conversation_id {cid[:80]!r} appears more than once in conversation_ids; "
                    "name each conversation once"
                )
            seen.add(cid)
        limit = (
            self._default_messages if max_messages <= 0 else min(max_messages, self._max_messages)
        )

        out: list[BatchResult] = []
        valid: list[ConversationId] = []
        for cid in conversation_ids:
            try:
                valid.append(parse_conversation_id(cid))
            except InvalidArgument as exc:
                out.append(BatchResult(cid, None, InvalidArgument(str(exc)[:_MAX_ERROR_CHARS])))
            else:
                out.append(BatchResult(cid, None))
        overhead = sum(
            len(r.conversation_id.encode()) + _RESULT_OVERHEAD_BYTES + len(str(r.error or ""))
            for r in out
        )
        results: dict[str, FanoutResult] = {}
        if valid:
            attrs = {"im.conversation_ids": ids(c.value for c in valid)}
            with self._db.errors(), self._tel.db("fanout_batch", attrs) as span:
                results, written = await self._fanout_batch(valid, limit, self._budget - overhead)
                span.set_attributes(
                    {
                        "im.conversations": len(valid),
                        "im.has_more": sum(r.has_more for r in results.values()),
                    }
                )
                rows = [d for r in results.values() for d in r.deliveries]
                self._count_rows(span, rows, written)
        return [
            r if r.error is not None else BatchResult(r.conversation_id, results[r.conversation_id])
            for r in out
        ]

    async def _fanout_batch(
        self, convs: list[ConversationId], limit: int, budget: int
    ) -> tuple[dict[str, FanoutResult], int]:
        """The FanoutBatch transaction; returns each conversation's result and how
        many rows it wrote. See the module docstring for the lock order."""
        values = [c.value for c in convs]
        window = min(limit, self._max_rows)
        async with self._db.pool.connection() as conn, conn.transaction():
            if not self._faults.skip_locks:
                keys = sorted({lock_key(v) for v in values})
                await repo.lock_many_tx(conn, LOCK_CONV_FANOUT, keys)
            states = await repo.fanout_states_tx(conn, values)
            # Every message has a recipient, so no page of the whole call spans
            # more than max_rows messages: reading one more says whether the read
            # was cut short.
            total = self._max_rows + 1
            rows = await repo.messages_above_many_tx(
                conn, values, [states[v][0] for v in values], window + 1, total, budget
            )
            found: dict[int, list[tuple[StoredMessage, bool]]] = {}
            for i, msg, fits in rows:
                found.setdefault(i, []).append((msg, fits))
            # Conversations from this index on may have more than was read.
            cut = rows[-1][0] if len(rows) >= total else len(convs)
            ranges = await self._group_ranges(conn, convs, found, window)

            results: dict[str, FanoutResult] = {}
            spans: list[tuple[ConversationId, int, int]] = []  # (conv, first pair, end)
            pairs: list[tuple[str, StoredMessage]] = []
            progress: list[tuple[str, int, str, bool, bool]] = []
            size = 0
            for i, conv in enumerate(convs):
                watermark, cursor = states[conv.value]
                if i > cut:  # not read at all: untouched, ask again
                    results[conv.value] = FanoutResult([], watermark, has_more=True)
                    continue
                candidates = found.get(i, [])[:window]
                if not candidates:  # nothing above the watermark: caught up
                    results[conv.value] = FanoutResult([], watermark, has_more=False)
                    progress.append((conv.value, watermark, cursor, True, False))
                    continue
                page = self._plan(
                    candidates,
                    self._recipients_from(conv, ranges.get(conv.value, [])),
                    watermark,
                    cursor,
                    budget=budget,
                    taken=len(pairs),
                    size=size,
                )
                size = page.size
                if not page.pairs and (page.watermark, page.cursor) == (watermark, cursor):
                    # The call's budget is spent: untouched, ask again. (A page of
                    # expired messages has no pairs either, but it moves on.)
                    results[conv.value] = FanoutResult([], watermark, has_more=True)
                    continue
                has_more = page.stopped or len(found[i]) > window or i == cut
                spans.append((conv, len(pairs), len(pairs) + len(page.pairs)))
                pairs.extend(page.pairs)
                results[conv.value] = FanoutResult([], page.watermark, has_more)
                progress.append((conv.value, page.watermark, page.cursor, not has_more, True))

            seqs, written = await self._write_rows_tx(conn, pairs)
            if progress:
                await repo.save_fanout_progress_many_tx(
                    conn,
                    [p[0] for p in progress],
                    [p[1] for p in progress],
                    [p[2] for p in progress],
                    [p[3] for p in progress],
                    [p[4] for p in progress],
                    self._repair_after,
                )
        for conv, start, end in spans:
            r = results[conv.value]
            deliveries = [
                Delivery(user, seq, msg)
                for (user, msg), seq in zip(pairs[start:end], seqs[start:end], strict=True)
            ]
            results[conv.value] = FanoutResult(deliveries, r.watermark, r.has_more)
        return results, written

    async def _group_ranges(
        self,
        conn: repo.Conn,
        convs: list[ConversationId],
        found: dict[int, list[tuple[StoredMessage, bool]]],
        window: int,
    ) -> dict[str, list[tuple[str, int, int]]]:
        """Membership ranges of the groups with messages to fan out, over the
        conv_seqs of their candidate messages, in one statement."""
        groups = [
            (c.value, found[i][:window])
            for i, c in enumerate(convs)
            if i in found and not c.is_direct
        ]
        if not groups:
            return {}
        return await repo.members_between_many(
            conn,
            [v for v, _ in groups],
            [msgs[0][0].conv_seq for _, msgs in groups],
            [msgs[-1][0].conv_seq for _, msgs in groups],
        )

    @staticmethod
    def _recipients_from(
        conv: ConversationId, ranges: list[tuple[str, int, int]]
    ) -> Callable[[StoredMessage], list[str]]:
        """`_recipients` from ranges read beforehand."""
        if conv.is_direct:
            pair = list(conv.pair)
            return _by_kind(conv, lambda _msg: pair)
        return _by_kind(
            conv, lambda msg: sorted({u for u, lo, hi in ranges if lo < msg.conv_seq <= hi})
        )

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
            return _by_kind(conv, lambda _msg: pair)
        ranges = await repo.members_between(
            conn, conv.value, messages[0].conv_seq, messages[-1].conv_seq
        )
        return _by_kind(
            conv, lambda msg: sorted({u for u, lo, hi in ranges if lo < msg.conv_seq <= hi})
        )

    def _plan(
        self,
        candidates: list[tuple[StoredMessage, bool]],
        recipients: Callable[[StoredMessage], list[str]],
        watermark: int,
        cursor: str,
        *,
        budget: int | None = None,
        taken: int = 0,
        size: int = 0,
    ) -> _Page:
        """The next page of (recipient, message) rows after (watermark, cursor), in
        (conv_seq, user_id) order, and where it leaves the watermark and cursor.

        `taken` rows of `size` bytes are already in the response (earlier
        conversations of a FanoutBatch): the page gets what is left of max_rows
        and of `budget` (default: the response budget). The response's first row
        is always taken, so every call makes progress."""
        budget = self._budget if budget is None else budget
        pairs: list[tuple[str, StoredMessage]] = []
        expired_before = time.time() * 1000 - self._retention_ms if self._retention_ms else 0
        for i, (msg, fits) in enumerate(candidates):
            if not fits:  # its body was not even read: the page ends before it
                return _Page(pairs, watermark, cursor, stopped=True, size=size)
            if msg.server_time_ms < expired_before:
                # Beyond the timeline retention: it would be deleted at once anyway.
                log.warning(
                    "fan-out skips a message older than the timeline retention",
                    extra={"msg_id": msg.msg_id, "conversation_id": msg.conversation_id},
                )
                watermark, cursor = msg.conv_seq, ""
                continue
            users = recipients(msg)
            if i == 0 and cursor:
                users = [u for u in users if u > cursor]
            for j, user in enumerate(users):
                cost = msg.wire_size + len(user) + 32  # + the FanoutDelivery around it
                if (pairs or taken) and (
                    taken + len(pairs) >= self._max_rows or size + cost > budget
                ):
                    if j > 0:  # part of this message is done: remember where
                        cursor = users[j - 1]
                    return _Page(pairs, watermark, cursor, stopped=True, size=size)
                pairs.append((user, msg))
                size += cost
            watermark, cursor = msg.conv_seq, ""
        return _Page(pairs, watermark, cursor, stopped=False, size=size)

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
                if not self._faults.skip_seq_check:
                    check_above(
                        "seq", value, user_seq_key(user), last[user],
                        f" (fan-out of msg {msg.msg_id})",
                    )  # fmt: skip
                last[user] = max(last[user], value)
                existing[(user, msg.msg_id)] = value
            await repo.insert_timeline_tx(
                conn,
                [u for u, _ in missing],
                [existing[(u, m.msg_id)] for u, m in missing],
                [m.msg_id for _, m in missing],
            )
        return [existing[(u, m.msg_id)] for u, m in pairs], len(missing)
