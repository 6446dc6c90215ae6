"""Reads of conversation state: the paged conversation list with read positions and
unread counts, read receipts, members (for typing), shared conversations (for
presence). Plain reads in autocommit mode: each answer is one statement's
snapshot; nothing here takes a lock or writes.

Receipts in a group are a query, never a push: a READ goes to its reader's own
timeline only (fanout.py), so a read costs one timeline row whatever the group's
size, and "read by N of M" is one index range scan of read_positions by
conversation when a member asks (GetReceipts). The limit for large groups is that
scan: it reads every current member's position row (logic's IM_LOGIC_MAX_GROUP_SIZE
bounds it; 2,000 by default).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, replace

from logic import repo
from logic.errors import InvalidArgument, NotFound, PermissionDenied
from logic.ids import KIND_GROUP, ConversationId, check_user_id, parse_conversation_id
from logic.model import Conversation
from logic.store import Database
from logic.telemetry import Telemetry

#: Most user ids one SharedUsers call may ask about.
MAX_SHARED_USERS = 1000


@dataclass(frozen=True)
class ConversationPage:
    conversations: list[Conversation]
    next_page_token: str


class Conversations:
    def __init__(
        self,
        db: Database,
        *,
        unread_cap: int,
        default_page: int,
        max_page: int,
        receipts_max_page: int,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._db = db
        self._tel = telemetry or Telemetry()
        self._unread_cap = unread_cap
        self._default_page = default_page
        self._max_page = max_page
        self._receipts_max_page = receipts_max_page

    async def page(self, user_id: str, page_size: int, page_token: str) -> ConversationPage:
        """One page of the user's conversations, newest activity first."""
        check_user_id(user_id)
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0 (0: the default), got {page_size}")
        limit = min(page_size or self._default_page, self._max_page)
        after = _parse_token(page_token) if page_token else None
        with self._db.errors(), self._tel.db("list_conversations", {"im.user_id": user_id}):
            async with self._db.pool.connection() as conn:
                convs = await repo.conversation_page(
                    conn, user_id, after, limit + 1, self._unread_cap
                )
                convs, more = convs[:limit], len(convs) > limit
                groups = [c.conversation_id for c in convs if c.kind == KIND_GROUP]
                members = await repo.current_members(conn, groups) if groups else {}
        convs = [
            replace(c, member_ids=members[c.conversation_id]) if c.kind == KIND_GROUP else c
            for c in convs
        ]
        token = _token(convs[-1]) if more and convs else ""
        return ConversationPage(convs, token)

    async def receipts(
        self,
        user_id: str,
        conversation_id: str,
        conv_seq: int,
        list_readers: bool,
        page_size: int,
        page_token: str,
    ) -> tuple[int, int, list[str], str, bool]:
        """(member_count, read_count, reader ids of this page, next token, delivered)
        of the chat message at conv_seq: "read by read_count of member_count", both
        counting current members other than the message's sender (repo.receipts).
        The caller must be a current member."""
        check_user_id(user_id)
        conv = parse_conversation_id(conversation_id)
        if conv_seq <= 0:
            raise InvalidArgument(f"conv_seq must be >= 1, got {conv_seq}")
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0 (0: 100), got {page_size}")
        limit = min(page_size or 100, self._receipts_max_page)
        after = page_token if list_readers else None
        if after:
            check_user_id(after, "page_token")
        attrs = {"im.user_id": user_id, "im.conversation_id": conv.value, "im.conv_seq": conv_seq}
        with self._db.errors(), self._tel.db("receipts", attrs):
            async with self._db.pool.connection() as conn:
                await self._check_member(conn, conv, user_id)
                target = await repo.target_message_tx(conn, conv.value, conv_seq)
                if target is None or target.kind != 1:
                    raise NotFound(f"{conv.value} has no chat message at conv_seq {conv_seq}")
                r = await repo.receipts(
                    conn, conv.value, conv_seq, target.sender_id, after, limit + 1
                )
        readers = r.readers[:limit]
        token = readers[-1] if len(r.readers) > limit else ""
        delivered = r.delivered and conv.is_direct
        return r.member_count, r.read_count, readers, token, delivered

    async def members(self, user_id: str, conversation_id: str) -> list[str]:
        """The conversation's current members, for one of them."""
        check_user_id(user_id)
        conv = parse_conversation_id(conversation_id)
        if conv.is_direct:
            if user_id not in conv.pair:
                raise PermissionDenied(f"{user_id} is not one of the two users of {conv.value}")
            return list(conv.pair)
        with self._db.errors():
            async with self._db.pool.connection() as conn:
                found = await repo.current_members(conn, [conv.value])
                members = found[conv.value]
                if user_id not in members:
                    if not await repo.group_exists(conn, conv.value):
                        raise NotFound(f"group {conv.value} does not exist")
                    raise PermissionDenied(f"{user_id} is not a member of {conv.value}")
        return members

    async def shared(self, user_id: str, others: Sequence[str]) -> list[str]:
        """Those of `others` (request order, repeats kept once) who share a
        conversation with user_id; user_id itself counts as shared."""
        check_user_id(user_id)
        if len(others) > MAX_SHARED_USERS:
            raise InvalidArgument(
                f"user_ids has {len(others)} entries; at most {MAX_SHARED_USERS} per call"
            )
        for other in others:
            check_user_id(other, "user_ids")
        asked = list(dict.fromkeys(o for o in others if o != user_id))
        found: set[str] = set()
        if asked:
            with self._db.errors():
                async with self._db.pool.connection() as conn:
                    found = await repo.shared_users(conn, user_id, asked)
        found.add(user_id)
        return [o for o in dict.fromkeys(others) if o in found]

    @staticmethod
    async def _check_member(conn: repo.Conn, conv: ConversationId, user_id: str) -> None:
        if conv.is_direct:
            if user_id not in conv.pair:
                raise PermissionDenied(f"{user_id} is not one of the two users of {conv.value}")
            return
        ranges = await repo.member_ranges(conn, conv.value, user_id)
        if not any(current for _, _, current in ranges):
            if not await repo.group_exists(conn, conv.value):
                raise NotFound(f"group {conv.value} does not exist")
            raise PermissionDenied(f"{user_id} is not a member of {conv.value}")


def _token(last: Conversation) -> str:
    raw = f"{last.last_activity_ms}:{last.conversation_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_token(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        time_ms, conv = raw.split(":", 1)
        parse_conversation_id(conv)
        return int(time_ms), conv
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidArgument):
        raise InvalidArgument(
            'page_token is not a next_page_token of ListConversations; start with ""'
        ) from None
