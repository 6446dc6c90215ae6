"""Identifier rules: user, device and conversation ids, seqsvc keys and advisory
lock keys. Pure functions; every check raises InvalidArgument with a message a
client developer can act on."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from logic.errors import FailedPrecondition, InvalidArgument

_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_CLIENT_MSG_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
ID_RULE = "1-64 characters from A-Z a-z 0-9 _ . @ -"

KIND_DIRECT = 1  # im.common.v1.ConversationKind values, as stored
KIND_GROUP = 2

#: Classes of the two-key advisory locks (pg_advisory_xact_lock(class, key)). One
#: class per kind of thing locked, so a conversation and a user whose ids hash alike
#: never share a lock. The one-key bigint locks (migrations) live in another space.
LOCK_CONV_SEND = 0x4C01
LOCK_CONV_FANOUT = 0x4C02
LOCK_USER = 0x4C03

SEQ_KEY_MAX_BYTES = 128  # seqsvc's key limit


def check_user_id(value: str, field: str = "user_id") -> str:
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"{field} {_show(value)} is not a valid user id ({ID_RULE})")
    return value


def check_device_id(value: str, field: str = "sender_device_id") -> str:
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"{field} {_show(value)} is not a valid device id ({ID_RULE})")
    return value


def check_client_msg_id(value: str) -> str:
    if not _CLIENT_MSG_ID.fullmatch(value):
        raise InvalidArgument(
            f"client_msg_id {_show(value)} is not valid: use 1-128 characters from "
            "A-Z a-z 0-9 _ . : @ - (a UUID is best), the same for every retransmit"
        )
    return value


@dataclass(frozen=True)
class ConversationId:
    """A parsed conversation id: `d:<a>:<b>` (a < b) or `g:<id>`."""

    value: str
    kind: int
    #: the two users of a direct conversation, in order; empty for a group
    pair: tuple[str, ...] = ()

    @property
    def is_direct(self) -> bool:
        return self.kind == KIND_DIRECT

    @property
    def seq_key(self) -> str:
        """seqsvc key of this conversation's conv_seq: `c:<id>`, or, when that would
        exceed seqsvc's 128-byte key limit (two long user ids), `c:#<sha256>`."""
        key = f"c:{self.value}"
        if len(key) <= SEQ_KEY_MAX_BYTES:
            return key
        return "c:#" + hashlib.sha256(self.value.encode()).hexdigest()


def parse_conversation_id(value: str, field: str = "conversation_id") -> ConversationId:
    if value.startswith("d:"):
        parts = value.split(":")
        if len(parts) != 3 or not _ID.fullmatch(parts[1]) or not _ID.fullmatch(parts[2]):
            raise InvalidArgument(
                f"{field} {_show(value)} is not valid: a direct conversation is "
                f"d:<user_a>:<user_b> with user ids of {ID_RULE}"
            )
        a, b = parts[1], parts[2]
        if a == b:
            raise InvalidArgument(f"{field} {_show(value)}: a direct conversation needs two users")
        if a > b:
            raise InvalidArgument(
                f"{field} {_show(value)}: the users of a direct conversation are in ascending "
                f"order; use {direct_conversation_id(a, b)}"
            )
        return ConversationId(value, KIND_DIRECT, (a, b))
    if value.startswith("g:") and _ID.fullmatch(value[2:]):
        return ConversationId(value, KIND_GROUP)
    raise InvalidArgument(
        f"{field} {_show(value)} is not valid: use d:<user_a>:<user_b> (user_a < user_b) "
        "for a direct conversation or the g:<id> that CreateGroup returned"
    )


def direct_conversation_id(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"d:{lo}:{hi}"


def user_seq_key(user_id: str) -> str:
    """seqsvc key of a user's timeline seq (user ids are at most 64 bytes)."""
    return f"u:{user_id}"


def lock_key(value: str) -> int:
    """The int4 advisory lock key of an id: 32 bits of BLAKE2b, stable across
    processes and versions. Two ids may share a key; that only serialises them, and
    because multi-lock transactions take user locks in ascending KEY order (not id
    order), a shared key cannot create a lock cycle."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=4).digest(), signed=True)


#: A client_msg_id that is a UUIDv7 (RFC 9562) in canonical lowercase form. Its
#: first 48 bits are the Unix time in milliseconds at which the client made it, and
#: such strings sort by that time. The dedup window (retention.py) applies to these
#: ids only: the age of any other id cannot be told, so its dedup key is kept.
UUID7_PATTERN = "[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
_UUID7 = re.compile(UUID7_PATTERN)


def uuid7_time_ms(client_msg_id: str) -> int | None:
    """The time (ms since the Unix epoch, the client's clock) a canonical
    lowercase UUIDv7 carries; None for any other id."""
    if not _UUID7.fullmatch(client_msg_id):
        return None
    return int(client_msg_id[:8] + client_msg_id[9:13], 16)


def uuid7_prefix(time_ms: int) -> str:
    """'xxxxxxxx-xxxx': the first 13 characters of the UUIDv7s made at `time_ms`.
    Canonical UUIDv7 strings made before that time sort below it."""
    digits = f"{max(time_ms, 0):012x}"[-12:]
    return f"{digits[:8]}-{digits[8:]}"


def _show(value: str) -> str:
    if len(value) > 80:
        return repr(value[:80] + "...")
    return repr(value)


def dedup_window_refusal(client_msg_id: str, window_ms: float) -> FailedPrecondition | None:
    """The refusal of an unknown id made before the dedup window began (a UUIDv7
    carries its time; window_ms 0: keys are kept forever, nothing is refused). Its
    key, had it been stored, may have been pruned (retention.py): storing it now
    could be a second copy, so it is refused, loudly. Ids of other forms carry no
    time; their keys are never pruned."""
    if not window_ms:
        return None
    made_ms = uuid7_time_ms(client_msg_id)
    if made_ms is None or made_ms >= time.time() * 1000 - window_ms:
        return None
    made = datetime.fromtimestamp(made_ms / 1000, UTC).isoformat(timespec="seconds")
    days = window_ms / 86_400_000
    return FailedPrecondition(
        f"client_msg_id {client_msg_id} was made at {made}, before the dedup window "
        f"of {days:g} days (IM_LOGIC_RETENTION_DEDUP_DAYS): it may have been stored "
        "already and its dedup key deleted, so it is not stored (no second copy). "
        "If it is a new message, send it with a new client_msg_id"
    )
