"""SyncMessages and History: paged reads, bounded by count and by response size."""

from __future__ import annotations

from collections.abc import Sequence

from logic import repo
from logic.config import RESPONSE_HEADROOM_BYTES
from logic.errors import InvalidArgument, NotFound, PermissionDenied
from logic.ids import check_user_id, parse_conversation_id
from logic.model import HistoryPage, Page, StoredMessage, TimelineEntry
from logic.store import Database
from logic.telemetry import Telemetry


class Reader:
    def __init__(
        self,
        db: Database,
        *,
        sync_default_limit: int,
        sync_max_limit: int,
        history_default_limit: int,
        history_max_limit: int,
        max_response_bytes: int,
        heads_max_users: int = 1000,
        telemetry: Telemetry | None = None,
        store_epoch: str = "",
    ) -> None:
        #: The database's store epoch (repo.store_epoch), read once at start: it
        #: names the database, which does not change under a running logic. Goes
        #: out with every page and head ("" = not known: clients then skip the check).
        self.store_epoch = store_epoch
        self._db = db
        self._tel = telemetry or Telemetry()
        self._sync_default = sync_default_limit
        self._sync_max = sync_max_limit
        self._history_default = history_default_limit
        self._history_max = history_max_limit
        self._budget = max_response_bytes - RESPONSE_HEADROOM_BYTES
        self._heads_max = heads_max_users

    async def sync(self, user_id: str, after_seq: int, limit: int) -> Page:
        """The user's timeline after after_seq, in seq order.

        Prefix-closed: seqs are allocated and committed under the user's lock (I1),
        so once a seq is visible every smaller seq that will ever exist is visible;
        a client that advances its cursor to the last entry never skips a row.
        has_more: more rows exist after the page (it was cut by the limit, which
        is capped, or by the response size). pruned_through_seq: set (above
        after_seq) when retention deleted rows after the cursor; the page simply
        holds what is left, so a client that follows it jumps over the gap."""
        check_user_id(user_id)
        if after_seq < 0:
            raise InvalidArgument(f"after_seq must be >= 0 (0: from the start), got {after_seq}")
        limit = self._limit(limit, self._sync_default, self._sync_max)
        attrs = {"im.user_id": user_id, "im.after_seq": after_seq}
        with self._db.errors(), self._tel.db("sync", attrs) as span:
            async with self._db.pool.connection() as conn:
                floor, rows = await repo.timeline_page(
                    conn, user_id, after_seq, limit + 1, self._budget
                )
            span.set_attribute("im.rows", len(rows))
        entries: list[TimelineEntry] = []
        size = 0
        for seq, msg in rows[:limit]:
            cost = msg.wire_size + 16 if msg is not None else 0  # + the TimelineEntry
            if msg is None or (entries and size + cost > self._budget):
                break
            entries.append(TimelineEntry(seq, msg))
            size += cost
        pruned = floor if floor > after_seq else 0
        return Page(entries, has_more=len(rows) > len(entries), pruned_through_seq=pruned)

    async def heads(self, user_ids: Sequence[str]) -> list[int]:
        """The head (highest committed seq; 0 for none) of each user's timeline, in
        request order. A head is a lower bound the moment it is read: every seq at
        or below it is visible to a Sync started afterwards (I1)."""
        if len(user_ids) > self._heads_max:
            raise InvalidArgument(
                f"GetHeads asks for {len(user_ids)} users; at most {self._heads_max} "
                "(IM_LOGIC_HEADS_MAX_USERS) per call"
            )
        for user_id in user_ids:
            check_user_id(user_id)
        if not user_ids:
            return []
        with self._db.errors(), self._tel.db("heads", {"im.users": len(user_ids)}):
            async with self._db.pool.connection() as conn:
                return await repo.timeline_heads(conn, user_ids)

    async def history(
        self, user_id: str, conversation_id: str, before_conv_seq: int, limit: int
    ) -> HistoryPage:
        """Chat messages of a conversation below before_conv_seq (0: from the
        newest), newest first, as they are now (edited bodies, recalled ones empty;
        events are not listed: they are timeline entries, see Sync). Only for its
        members, and a group member sees the messages of its membership ranges only
        (what it received)."""
        check_user_id(user_id)
        conv = parse_conversation_id(conversation_id)
        if before_conv_seq < 0:
            raise InvalidArgument(
                f"before_conv_seq must be >= 0 (0: from the newest), got {before_conv_seq}"
            )
        limit = self._limit(limit, self._history_default, self._history_max)
        before = before_conv_seq or repo.MAX_BIGINT
        attrs = {
            "im.user_id": user_id,
            "im.conversation_id": conv.value,
            "im.before_conv_seq": before_conv_seq,
        }
        with self._db.errors(), self._tel.db("history", attrs):
            async with self._db.pool.connection() as conn:
                if conv.is_direct:
                    if user_id not in conv.pair:
                        raise PermissionDenied(f"{user_id} is not part of {conv.value}")
                    ranges = [(0, repo.MAX_BIGINT)]
                else:
                    found = await repo.member_ranges(conn, conv.value, user_id)
                    if not any(current for _, _, current in found):
                        if not await repo.group_exists(conn, conv.value):
                            raise NotFound(f"group {conv.value} does not exist")
                        raise PermissionDenied(f"{user_id} is not a member of {conv.value}")
                    ranges = [(lo, hi) for lo, hi, _ in found]
                rows = await repo.history_page(
                    conn, user_id, conv.value, before, ranges, limit + 1, self._budget
                )
        messages: list[StoredMessage] = []
        size = 0
        for msg in rows[:limit]:
            if msg is None or (messages and size + msg.wire_size + 8 > self._budget):
                break
            messages.append(msg)
            size += msg.wire_size + 8
        return HistoryPage(messages, has_more=len(rows) > len(messages))

    @staticmethod
    def _limit(limit: int, default: int, cap: int) -> int:
        if limit < 0:
            raise InvalidArgument(f"limit must be >= 0 (0: the default of {default}), got {limit}")
        return min(limit or default, cap)
