"""Groups and the conversation list.

Membership is stored as conv_seq ranges (see migrations/0001_init.sql). A change
runs under the conversation's SEND lock, the lock every send holds while it takes
its conv_seq, so the boundary (the last committed conv_seq) is exact: a member
added now receives every later message and no earlier one; a member removed now
receives nothing sent after the removal.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from logic import repo
from logic.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from logic.faults import Faults
from logic.ids import (
    KIND_GROUP,
    LOCK_CONV_SEND,
    ConversationId,
    check_user_id,
    lock_key,
    parse_conversation_id,
)
from logic.model import Conversation
from logic.store import Database
from logic.telemetry import Telemetry


class Groups:
    def __init__(
        self,
        db: Database,
        *,
        max_group_size: int,
        max_name_chars: int,
        faults: Faults,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._db = db
        self._tel = telemetry or Telemetry()
        self._max_size = max_group_size
        self._max_name = max_name_chars
        self._faults = faults

    async def create(self, creator_id: str, name: str, member_ids: Sequence[str]) -> Conversation:
        """Creates a group owned by creator_id with the creator and member_ids as
        members. Not idempotent: each call makes a new group."""
        check_user_id(creator_id, "creator_id")
        members = self._check_members(member_ids, allow_empty=True) | {creator_id}
        if len(name) > self._max_name or any(ord(c) < 32 for c in name):
            raise InvalidArgument(
                f"name must be at most {self._max_name} characters without control characters"
            )
        if len(members) > self._max_size:
            raise InvalidArgument(
                f"a group has at most {self._max_size} members; this one would have {len(members)}"
            )
        conv = parse_conversation_id("g:" + secrets.token_hex(10))
        ordered = sorted(members)
        attrs = {"im.user_id": creator_id, "im.conversation_id": conv.value}
        with self._db.errors(), self._tel.db("create_group", attrs):
            async with self._db.pool.connection() as conn:
                await repo.create_group(conn, conv.value, name, creator_id, ordered)
        return Conversation(conv.value, KIND_GROUP, name, creator_id, ordered, 0)

    async def add(
        self, actor_id: str, conversation_id: str, member_ids: Sequence[str]
    ) -> Conversation:
        """Adds member_ids (current members are skipped). The actor must be a member.
        Raises FailedPrecondition when the group would exceed its size limit."""
        check_user_id(actor_id, "actor_id")
        conv = self._group_id(conversation_id)
        wanted = self._check_members(member_ids, allow_empty=False)
        attrs = {"im.user_id": actor_id, "im.conversation_id": conv.value}
        with self._db.errors(), self._tel.db("add_members", attrs):
            async with self._db.pool.connection() as conn, conn.transaction():
                state = await self._locked_state_tx(conn, conv, actor_id)
                new = sorted(wanted - set(state.members))
                if len(state.members) + len(new) > self._max_size:
                    raise FailedPrecondition(
                        f"{conv.value} has {len(state.members)} members; adding {len(new)} "
                        f"would exceed the limit of {self._max_size}"
                    )
                if new:
                    await repo.add_members_tx(conn, conv.value, new, state.last_conv_seq)
        members = sorted(set(state.members) | set(new))
        return Conversation(
            conv.value, KIND_GROUP, state.name, state.owner_id, members, state.last_conv_seq
        )

    async def remove(
        self, actor_id: str, conversation_id: str, member_ids: Sequence[str]
    ) -> Conversation:
        """Removes member_ids (non-members are skipped). The owner may remove anyone;
        another member only itself. When the owner leaves, the longest-standing
        remaining member becomes the owner. A removed member receives nothing sent
        after this returns."""
        check_user_id(actor_id, "actor_id")
        conv = self._group_id(conversation_id)
        leaving = self._check_members(member_ids, allow_empty=False)
        attrs = {"im.user_id": actor_id, "im.conversation_id": conv.value}
        with self._db.errors(), self._tel.db("remove_members", attrs):
            async with self._db.pool.connection() as conn, conn.transaction():
                state = await self._locked_state_tx(conn, conv, actor_id)
                if actor_id != state.owner_id and leaving != {actor_id}:
                    raise PermissionDenied(
                        f"only the owner ({state.owner_id}) can remove other members of "
                        f"{conv.value}; a member can remove only itself"
                    )
                gone = sorted(leaving & set(state.members))
                owner = state.owner_id
                new_owner = None
                if owner in gone:
                    new_owner = await repo.successor_tx(conn, conv.value, gone)
                    owner = new_owner or owner
                if gone:
                    await repo.remove_members_tx(
                        conn, conv.value, gone, state.last_conv_seq, new_owner
                    )
        members = sorted(set(state.members) - set(gone))
        return Conversation(conv.value, KIND_GROUP, state.name, owner, members, state.last_conv_seq)

    # -- helpers -------------------------------------------------------------------

    def _check_members(self, member_ids: Sequence[str], *, allow_empty: bool) -> set[str]:
        if not member_ids and not allow_empty:
            raise InvalidArgument("member_ids is empty; name at least one user")
        if len(member_ids) > self._max_size:
            raise InvalidArgument(
                f"member_ids has {len(member_ids)} entries; a group has at most "
                f"{self._max_size} members"
            )
        return {check_user_id(u, "member_ids entry") for u in member_ids}

    @staticmethod
    def _group_id(conversation_id: str) -> ConversationId:
        conv = parse_conversation_id(conversation_id)
        if conv.is_direct:
            raise InvalidArgument(
                f"{conv.value} is a direct conversation; only groups (g:<id>) have members "
                "to add or remove"
            )
        return conv

    async def _locked_state_tx(
        self, conn: repo.Conn, conv: ConversationId, actor_id: str
    ) -> repo.GroupState:
        if not self._faults.skip_locks:
            await repo.lock_tx(conn, (LOCK_CONV_SEND, lock_key(conv.value)))
        state = await repo.group_state_tx(conn, conv.value)
        if state is None:
            raise NotFound(f"group {conv.value} does not exist")
        if actor_id not in state.members:
            raise PermissionDenied(f"{actor_id} is not a member of {conv.value}")
        return state
