"""All of logic's SQL, one function per statement.

Functions whose name ends in `_tx` must run inside a transaction (they take
transaction-scoped advisory locks, or rely on locks the transaction holds); the
others run in autocommit mode. Every function takes the connection; none commits.
Nothing here decides anything: the domain modules do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from imcommon.migrations import apply_migrations
from logic.ids import UUID7_PATTERN
from logic.model import Conversation, SendAck, StoredMessage

Conn = psycopg.AsyncConnection[Any]

MIGRATIONS = Path(__file__).parent / "migrations"
COMPONENT = "logic"
MAX_BIGINT = 2**63 - 1

_MESSAGE_COLUMNS = (
    "m.msg_id, m.conversation_id, m.conv_seq, m.sender_id, m.sender_device_id, "
    "m.client_msg_id, m.content_type, m.body, m.server_time_ms, "
    "m.kind, m.target_conv_seq, m.edited_at_ms, m.recalled"
)
#: Columns of one message in a row (`_message`).
_NCOLS = 13
# The same from a subquery `m` with a boolean column `fits`: the body only where it
# fits (a body past the page's byte budget is never read), then `fits`.
_PAGED_COLUMNS = _MESSAGE_COLUMNS.replace("m.body", "CASE WHEN m.fits THEN m.body END") + ", m.fits"


async def migrate(conninfo: str) -> list[str]:
    """Applies logic's pending migrations (safe to run from several processes)."""
    return await apply_migrations(conninfo, MIGRATIONS, COMPONENT)


def _message(row: Sequence[Any], offset: int = 0) -> StoredMessage:
    r = row[offset : offset + _NCOLS]
    return StoredMessage(
        msg_id=r[0],
        conversation_id=r[1],
        conv_seq=r[2],
        sender_id=r[3],
        sender_device_id=r[4],
        client_msg_id=r[5],
        content_type=r[6],
        body=bytes(r[7]) if r[7] is not None else b"",
        server_time_ms=r[8],
        kind=r[9],
        target_conv_seq=r[10] or 0,
        edited_at_ms=r[11] or 0,
        recalled=r[12],
    )


def _hidden(m: StoredMessage, hidden: bool) -> StoredMessage:
    """The message as served to a user who deleted it for itself: no body."""
    return replace(m, body=b"", deleted_for_me=True) if hidden else m


# -- locks ---------------------------------------------------------------------------


async def lock_tx(conn: Conn, *locks: tuple[int, int]) -> None:
    """Takes transaction-scoped advisory locks (class, key), in the order given.

    Must be its own statement, before the statements that rely on the locks: in
    READ COMMITTED each statement takes its snapshot when it starts, so only a
    statement that starts after the locks are granted sees everything the previous
    holder committed."""
    sql = "SELECT " + ", ".join("pg_advisory_xact_lock(%s, %s)" for _ in locks)
    await conn.execute(sql, [v for lock in locks for v in lock])


async def lock_many_tx(conn: Conn, lock_class: int, keys: Sequence[int]) -> None:
    """Takes the advisory locks (lock_class, key) for `keys` in the order given (the
    caller sorts them), in one statement."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(%s, k) "
        "FROM unnest(%s::int4[]) WITH ORDINALITY AS t (k, i) ORDER BY i",
        (lock_class, list(keys)),
    )


# -- send ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SendState:
    last_seq: int  # the sender's last committed timeline seq (0: none)
    last_conv_seq: int  # the conversation's last committed conv_seq (0: none)
    kind: int | None  # conversations.kind, None if there is no row
    is_member: bool  # a current member of the (group) conversation
    stored: SendAck | None  # the earlier send with this (sender, client_msg_id)
    read_pos: int = 0  # READ/DELIVERED keys: the sender's read position there
    delivered_pos: int = 0  # and its delivered position


@dataclass(frozen=True)
class SendKey:
    sender_id: str
    client_msg_id: str
    conversation_id: str
    kind: int = 1  # READ/DELIVERED also read the sender's positions


async def lock_send_tx(conn: Conn, locks: Sequence[tuple[int, int]]) -> None:
    """Takes the (class, key) advisory locks of a send batch in the order given (the
    caller sorts them), in one statement whose text does not depend on the number
    of locks. Same rule as `lock_tx`: its own statement, before the reads."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(c, k) "
        "FROM unnest(%s::int4[], %s::int4[]) WITH ORDINALITY AS t (c, k, i) ORDER BY i",
        ([c for c, _ in locks], [k for _, k in locks]),
    )


async def await_replication_tx(conn: Conn) -> None:
    """Makes the transaction write WAL (a transactional logical-decoding message,
    empty, prefix `im.ack`), so that its COMMIT writes a commit record and, with
    synchronous replication, returns only once the standby has flushed the WAL up
    to it, and so every earlier commit. This makes a duplicate's ACK (read from a
    row another transaction committed) as durable as the original's, even if that
    commit's wait for the standby was cancelled (PostgreSQL then keeps the commit
    locally and only warns).

    An xid alone (`pg_current_xact_id()`) is not enough: PostgreSQL waits for the
    standby only if the transaction wrote WAL before its commit record
    (RecordTransactionCommit's `wrote_xlog`), so such a commit returns at once
    with no standby at all (tests/e2e/test_e2e_cluster.py)."""
    await conn.execute("SELECT pg_logical_emit_message(true, 'im.ack', '')")


async def read_send_states_tx(conn: Conn, keys: Sequence[SendKey]) -> list[SendState]:
    """Everything the sends of a batch decide on, in one statement, one state per
    key in the order given. Run it after the conversation and sender locks: then
    the last seqs it reads cannot change before commit. A sender's last seq counts
    the rows retention deleted (timeline_floor), so I1 holds after a prune too."""
    cur = await conn.execute(
        """
        SELECT
            greatest((SELECT max(seq) FROM timeline WHERE user_id = t.sender),
                     (SELECT floor_seq FROM timeline_floor WHERE user_id = t.sender)),
            (SELECT max(conv_seq) FROM messages WHERE conversation_id = t.conv),
            (SELECT kind FROM conversations WHERE conversation_id = t.conv),
            EXISTS (SELECT 1 FROM members WHERE conversation_id = t.conv
                    AND user_id = t.sender AND left_after IS NULL),
            d.msg_id, m.sender_seq, m.conv_seq, m.server_time_ms,
            coalesce(rp.read_conv_seq, 0), coalesce(rp.delivered_conv_seq, 0)
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::int2[])
            WITH ORDINALITY AS t (sender, cmid, conv, kind, i)
        LEFT JOIN send_dedup d ON d.sender_id = t.sender AND d.client_msg_id = t.cmid
        LEFT JOIN messages m ON m.msg_id = d.msg_id
        LEFT JOIN read_positions rp ON t.kind IN (4, 5)
            AND rp.conversation_id = t.conv AND rp.user_id = t.sender
        ORDER BY t.i
        """,
        (
            [k.sender_id for k in keys],
            [k.client_msg_id for k in keys],
            [k.conversation_id for k in keys],
            [k.kind for k in keys],
        ),
    )
    out = []
    for row in await cur.fetchall():
        stored = None
        if row[4] is not None:
            # Retention may have deleted the message and kept its dedup key (an id
            # whose age cannot be told): still a duplicate, acknowledged by msg_id
            # alone (seq, conv_seq and time 0: no longer known).
            stored = SendAck(row[4], row[5] or 0, row[6] or 0, row[7] or 0, duplicate=True)
        out.append(
            SendState(
                row[0] or 0, row[1] or 0, row[2], bool(row[3]), stored, int(row[8]), int(row[9])
            )
        )
    if len(out) != len(keys):
        raise RuntimeError(f"send state read returned {len(out)} rows for {len(keys)} sends")
    return out


@dataclass(frozen=True)
class NewMessage:
    conversation_id: str
    conv_seq: int
    sender_id: str
    sender_device_id: str
    client_msg_id: str
    sender_seq: int
    content_type: int
    body: bytes
    direct_pair: tuple[str, ...]  # (a, b) of a direct conversation, () for a group
    kind: int = 1  # im.common.v1.MessageKind (1: a chat message)
    target_conv_seq: int | None = None


async def insert_messages_tx(
    conn: Conn,
    msgs: Sequence[NewMessage],
    *,
    dedup: bool,
    outbox: bool,
    repair_after_s: float,
) -> list[tuple[int, int]]:
    """Inserts a batch of messages in one statement: each message, its dedup key and
    the sender's timeline row; per conversation of the batch ONE outbox row and the
    pending-fan-out mark, both naming the conversation's last message in the batch
    (a trigger means "fan out everything above the watermark", so one per
    conversation covers the earlier ones); a direct conversation's row on its
    first message; the user and device rows. Returns (msg_id, server_time_ms) per
    message, in the order given."""
    directs = {m.conversation_id: m.direct_pair for m in msgs if m.direct_pair}
    devices = sorted({(m.sender_id, m.sender_device_id) for m in msgs})
    cur = await conn.execute(
        """
        WITH input AS (
            SELECT * FROM unnest(%(conv)s::text[], %(conv_seq)s::int8[], %(sender)s::text[],
                                 %(device)s::text[], %(cmid)s::text[], %(seq)s::int8[],
                                 %(ctype)s::int2[], %(body)s::bytea[], %(kind)s::int2[],
                                 %(target)s::int8[])
                WITH ORDINALITY AS t (conv, conv_seq, sender, device, cmid, seq, ctype, body,
                                      kind, target, i)
        ), msg AS (
            INSERT INTO messages (conversation_id, conv_seq, sender_id, sender_device_id,
                                  client_msg_id, sender_seq, content_type, body, server_time_ms,
                                  kind, target_conv_seq)
            SELECT conv, conv_seq, sender, device, cmid, seq, ctype, body,
                   (extract(epoch FROM clock_timestamp()) * 1000)::bigint, kind, target
            FROM input ORDER BY i
            RETURNING msg_id, conversation_id, conv_seq, sender_id, client_msg_id, sender_seq,
                      server_time_ms
        ), dedup AS (
            INSERT INTO send_dedup (sender_id, client_msg_id, msg_id)
            SELECT sender_id, client_msg_id, msg_id FROM msg WHERE %(dedup)s
        ), tl AS (
            INSERT INTO timeline (user_id, seq, msg_id)
            SELECT sender_id, sender_seq, msg_id FROM msg
        ), last AS (
            SELECT DISTINCT ON (conversation_id) conversation_id, conv_seq, msg_id
            FROM msg ORDER BY conversation_id, conv_seq DESC
        ), ob AS (
            INSERT INTO outbox (msg_id, conversation_id, conv_seq)
            SELECT msg_id, conversation_id, conv_seq FROM last WHERE %(outbox)s
        ), pending AS (
            INSERT INTO fanout_pending (conversation_id, upto_conv_seq, upto_msg_id, repair_at)
            SELECT conversation_id, conv_seq, msg_id,
                   now() + make_interval(secs => %(repair_after)s) FROM last
            ON CONFLICT (conversation_id) DO UPDATE
                SET upto_conv_seq = excluded.upto_conv_seq, upto_msg_id = excluded.upto_msg_id
        ), conv AS (
            INSERT INTO conversations (conversation_id, kind, direct_user_a, direct_user_b)
            SELECT c, 1, a, b FROM unnest(%(dconv)s::text[], %(da)s::text[], %(db)s::text[])
                AS d (c, a, b)
            ON CONFLICT DO NOTHING
        ), usr AS (
            INSERT INTO users (user_id) SELECT DISTINCT unnest(%(dev_user)s::text[])
            ON CONFLICT DO NOTHING
        ), dev AS (
            INSERT INTO devices (user_id, device_id)
            SELECT * FROM unnest(%(dev_user)s::text[], %(dev_id)s::text[])
            ON CONFLICT DO NOTHING
        )
        SELECT conversation_id, conv_seq, msg_id, server_time_ms FROM msg
        """,
        {
            "conv": [m.conversation_id for m in msgs],
            "conv_seq": [m.conv_seq for m in msgs],
            "sender": [m.sender_id for m in msgs],
            "device": [m.sender_device_id for m in msgs],
            "cmid": [m.client_msg_id for m in msgs],
            "seq": [m.sender_seq for m in msgs],
            "ctype": [m.content_type for m in msgs],
            "body": [m.body for m in msgs],
            "kind": [m.kind for m in msgs],
            "target": [m.target_conv_seq for m in msgs],
            "dedup": dedup,
            "outbox": outbox,
            "repair_after": repair_after_s,
            "dconv": list(directs),
            "da": [p[0] for p in directs.values()],
            "db": [p[1] for p in directs.values()],
            "dev_user": [u for u, _ in devices],
            "dev_id": [d for _, d in devices],
        },
    )
    stored = {(r[0], int(r[1])): (int(r[2]), int(r[3])) for r in await cur.fetchall()}
    return [stored[(m.conversation_id, m.conv_seq)] for m in msgs]


# -- outbox --------------------------------------------------------------------------


async def delete_outbox(conn: Conn, msg_ids: Sequence[int]) -> None:
    await conn.execute("DELETE FROM outbox WHERE msg_id = ANY(%s::int8[])", (list(msg_ids),))


async def claim_outbox_tx(conn: Conn, min_age_s: float, limit: int) -> list[tuple[int, str, int]]:
    """Outbox rows older than min_age_s, locked against other relays (SKIP LOCKED),
    oldest first: (msg_id, conversation_id, conv_seq)."""
    cur = await conn.execute(
        """
        SELECT msg_id, conversation_id, conv_seq FROM outbox
        WHERE created_at < now() - make_interval(secs => %s)
        ORDER BY created_at LIMIT %s
        FOR UPDATE SKIP LOCKED
        """,
        (min_age_s, limit),
    )
    return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


# -- fan-out -------------------------------------------------------------------------


async def fanout_state_tx(conn: Conn, conv: str) -> tuple[int, str]:
    """(watermark, cursor_user) of the conversation; (0, '') before its first fan-out."""
    cur = await conn.execute(
        "SELECT watermark, cursor_user FROM fanout_state WHERE conversation_id = %s", (conv,)
    )
    row = await cur.fetchone()
    return (int(row[0]), str(row[1])) if row else (0, "")


async def messages_above_tx(
    conn: Conn, conv: str, watermark: int, limit: int, body_budget: int
) -> list[tuple[StoredMessage, bool]]:
    """Up to `limit` committed messages with conv_seq > watermark, in conv_seq order,
    each with whether it fits: False once the running total of bodies before it
    reaches body_budget (the first always fits), so the caller knows where a page of
    big bodies must end."""
    cur = await conn.execute(
        f"""
        SELECT {_PAGED_COLUMNS} FROM (
            SELECT m.*, sum(octet_length(m.body)) OVER (
                       ORDER BY m.conv_seq ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
                   ) - octet_length(m.body) < %(budget)s AS fits
            FROM messages m
            WHERE m.conversation_id = %(conv)s AND m.conv_seq > %(wm)s
            ORDER BY m.conv_seq LIMIT %(limit)s
        ) AS m
        ORDER BY m.conv_seq
        """,
        {"conv": conv, "wm": watermark, "limit": limit, "budget": body_budget},
    )
    return [(_message(r), bool(r[_NCOLS])) for r in await cur.fetchall()]


async def members_between(conn: Conn, conv: str, lo: int, hi: int) -> list[tuple[str, int, int]]:
    """Membership ranges of the group that cover some conv_seq in [lo, hi]:
    (user_id, joined_after, left_after or MAX_BIGINT)."""
    cur = await conn.execute(
        """
        SELECT user_id, joined_after, coalesce(left_after, %s) FROM members
        WHERE conversation_id = %s AND joined_after < %s
          AND (left_after IS NULL OR left_after >= %s)
        """,
        (MAX_BIGINT, conv, hi, lo),
    )
    return [(r[0], int(r[1]), int(r[2])) for r in await cur.fetchall()]


async def last_seqs_tx(conn: Conn, users: Sequence[str]) -> dict[str, int]:
    """Each user's last committed timeline seq (0: none), counting rows retention
    deleted (timeline_floor). Under the users' locks."""
    cur = await conn.execute(
        """
        SELECT u, greatest((SELECT max(seq) FROM timeline t WHERE t.user_id = u),
                           (SELECT floor_seq FROM timeline_floor f WHERE f.user_id = u))
        FROM unnest(%s::text[]) AS u
        """,
        (list(users),),
    )
    return {r[0]: int(r[1] or 0) for r in await cur.fetchall()}


async def existing_rows_tx(
    conn: Conn, users: Sequence[str], msg_ids: Sequence[int]
) -> dict[tuple[str, int], int]:
    """Seqs of the (user, msg_id) pairs already in the timelines."""
    cur = await conn.execute(
        """
        SELECT t.user_id, t.msg_id, t.seq
        FROM unnest(%s::text[], %s::int8[]) AS p (user_id, msg_id)
        JOIN timeline t ON t.user_id = p.user_id AND t.msg_id = p.msg_id
        """,
        (list(users), list(msg_ids)),
    )
    return {(r[0], int(r[1])): int(r[2]) for r in await cur.fetchall()}


async def insert_timeline_tx(
    conn: Conn, users: Sequence[str], seqs: Sequence[int], msg_ids: Sequence[int]
) -> None:
    await conn.execute(
        """
        INSERT INTO timeline (user_id, seq, msg_id)
        SELECT * FROM unnest(%s::text[], %s::int8[], %s::int8[])
        """,
        (list(users), list(seqs), list(msg_ids)),
    )


async def save_fanout_progress_tx(
    conn: Conn, conv: str, watermark: int, cursor_user: str, caught_up: bool, repair_after_s: float
) -> None:
    """Stores the new watermark and settles the conversation's pending-repair mark.

    Caught up (this call fanned out everything it saw): the mark goes, unless a send
    committed meanwhile raised its upto_conv_seq above the watermark (a send still
    in progress holds the row, so the DELETE waits and rechecks the new version).
    In that case, and when the caller continues with has_more, the fan-out is
    making progress: the repair clock restarts, so a busy conversation whose
    pusher keeps up is never "repaired"."""
    cur = await conn.execute(
        """
        WITH st AS (
            INSERT INTO fanout_state (conversation_id, watermark, cursor_user)
            VALUES (%(conv)s, %(wm)s, %(cursor)s)
            ON CONFLICT (conversation_id) DO UPDATE
                SET watermark = excluded.watermark, cursor_user = excluded.cursor_user,
                    updated_at = now()
        )
        DELETE FROM fanout_pending
        WHERE conversation_id = %(conv)s AND upto_conv_seq <= %(wm)s AND %(caught_up)s
        """,
        {"conv": conv, "wm": watermark, "cursor": cursor_user, "caught_up": caught_up},
    )
    if cur.rowcount == 0:
        await conn.execute(
            """
            UPDATE fanout_pending
            SET attempts = 0, repair_at = now() + make_interval(secs => %s)
            WHERE conversation_id = %s
            """,
            (repair_after_s, conv),
        )


async def clear_pending(conn: Conn, conv: str, watermark: int) -> None:
    """Removes the pending mark of a conversation fanned out up to its last message."""
    await conn.execute(
        "DELETE FROM fanout_pending WHERE conversation_id = %s AND upto_conv_seq <= %s",
        (conv, watermark),
    )


# -- fan-out of several conversations in one transaction (FanoutBatch) --------------


async def fanout_states_tx(conn: Conn, convs: Sequence[str]) -> dict[str, tuple[int, str]]:
    """(watermark, cursor_user) of each conversation; (0, '') before its first
    fan-out. Run it after the conversations' fan-out locks."""
    cur = await conn.execute(
        "SELECT conversation_id, watermark, cursor_user FROM fanout_state "
        "WHERE conversation_id = ANY(%s::text[])",
        (list(convs),),
    )
    out = {c: (0, "") for c in convs}
    for r in await cur.fetchall():
        out[r[0]] = (int(r[1]), str(r[2]))
    return out


async def messages_above_many_tx(
    conn: Conn,
    convs: Sequence[str],
    watermarks: Sequence[int],
    limit: int,
    total: int,
    body_budget: int,
) -> list[tuple[int, StoredMessage, bool]]:
    """For each conversation (by its index in `convs`), up to `limit` committed
    messages with conv_seq above its watermark, and at most `total` messages in
    all, in (index, conv_seq) order; each with whether it fits: False once the
    running total of bodies before it, over the whole result, reaches
    body_budget (the very first always fits; a body that does not fit is never
    read). When `total` rows come back, the last row's conversation and every
    later one may have more than was returned."""
    cur = await conn.execute(
        f"""
        SELECT m.i - 1, {_PAGED_COLUMNS} FROM (
            SELECT m.*, c.i, sum(octet_length(m.body)) OVER (
                       ORDER BY c.i, m.conv_seq ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
                   ) - octet_length(m.body) < %(budget)s AS fits
            FROM unnest(%(convs)s::text[], %(wms)s::int8[]) WITH ORDINALITY AS c (conv, wm, i)
            CROSS JOIN LATERAL (
                SELECT * FROM messages m
                WHERE m.conversation_id = c.conv AND m.conv_seq > c.wm
                ORDER BY m.conv_seq LIMIT %(limit)s
            ) AS m
            ORDER BY c.i, m.conv_seq LIMIT %(total)s
        ) AS m
        ORDER BY m.i, m.conv_seq
        """,
        {
            "convs": list(convs),
            "wms": list(watermarks),
            "limit": limit,
            "total": total,
            "budget": body_budget,
        },
    )
    return [(int(r[0]), _message(r, 1), bool(r[_NCOLS + 1])) for r in await cur.fetchall()]


async def members_between_many(
    conn: Conn, convs: Sequence[str], los: Sequence[int], his: Sequence[int]
) -> dict[str, list[tuple[str, int, int]]]:
    """`members_between` for several groups at once: per group, the membership
    ranges that cover some conv_seq in its [lo, hi]."""
    cur = await conn.execute(
        """
        SELECT c.conv, m.user_id, m.joined_after, coalesce(m.left_after, %s)
        FROM unnest(%s::text[], %s::int8[], %s::int8[]) AS c (conv, lo, hi)
        JOIN members m ON m.conversation_id = c.conv AND m.joined_after < c.hi
                      AND (m.left_after IS NULL OR m.left_after >= c.lo)
        """,
        (MAX_BIGINT, list(convs), list(los), list(his)),
    )
    out: dict[str, list[tuple[str, int, int]]] = {c: [] for c in convs}
    for r in await cur.fetchall():
        out[r[0]].append((r[1], int(r[2]), int(r[3])))
    return out


async def save_fanout_progress_many_tx(
    conn: Conn,
    convs: Sequence[str],
    watermarks: Sequence[int],
    cursors: Sequence[str],
    caught_up: Sequence[bool],
    advanced: Sequence[bool],
    repair_after_s: float,
) -> None:
    """`save_fanout_progress_tx` for several (distinct) conversations in one
    statement; a conversation with `advanced` false had nothing above its
    watermark and only gets `clear_pending` (its state row is not written).

    Per conversation: an advanced one stores its watermark and cursor; a caught-up
    one loses its pending mark unless a send committed meanwhile raised the mark's
    upto_conv_seq (a send in progress holds the row: the DELETE waits and rechecks
    the new version); an advanced one that keeps its mark has its repair clock
    restarted (it is making progress)."""
    await conn.execute(
        """
        WITH a AS (
            SELECT * FROM unnest(%(convs)s::text[], %(wms)s::int8[], %(cursors)s::text[],
                                 %(caught_up)s::bool[], %(advanced)s::bool[])
                AS a (conv, wm, cursor_user, caught_up, advanced)
        ), st AS (
            INSERT INTO fanout_state (conversation_id, watermark, cursor_user)
            SELECT conv, wm, cursor_user FROM a WHERE advanced
            ON CONFLICT (conversation_id) DO UPDATE
                SET watermark = excluded.watermark, cursor_user = excluded.cursor_user,
                    updated_at = now()
        ), del AS (
            DELETE FROM fanout_pending p USING a
            WHERE p.conversation_id = a.conv AND p.upto_conv_seq <= a.wm AND a.caught_up
            RETURNING p.conversation_id
        )
        UPDATE fanout_pending p
        SET attempts = 0, repair_at = now() + make_interval(secs => %(repair_after)s)
        FROM a
        WHERE p.conversation_id = a.conv AND a.advanced
          AND a.conv NOT IN (SELECT conversation_id FROM del)
        """,
        {
            "convs": list(convs),
            "wms": list(watermarks),
            "cursors": list(cursors),
            "caught_up": list(caught_up),
            "advanced": list(advanced),
            "repair_after": repair_after_s,
        },
    )


# -- repair --------------------------------------------------------------------------


@dataclass(frozen=True)
class RepairClaim:
    conversation_id: str
    upto_conv_seq: int
    upto_msg_id: int
    attempts: int  # including this one


async def claim_repairs(
    conn: Conn, limit: int, repair_after_s: float, max_backoff_s: float
) -> list[RepairClaim]:
    """Claims up to `limit` pending conversations whose repair time has come, and
    moves their next repair time back exponentially. Rows another process is
    claiming are skipped, so concurrent repair loops split the work."""
    cur = await conn.execute(
        """
        UPDATE fanout_pending p
        SET attempts = p.attempts + 1,
            repair_at = now() + make_interval(
                secs => least(%(after)s * power(2, least(p.attempts + 1, 30)), %(max)s))
        WHERE p.conversation_id IN (
            SELECT conversation_id FROM fanout_pending WHERE repair_at <= now()
            ORDER BY repair_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
        RETURNING p.conversation_id, p.upto_conv_seq, p.upto_msg_id, p.attempts
        """,
        {"after": repair_after_s, "max": max_backoff_s, "limit": limit},
    )
    return [RepairClaim(r[0], int(r[1]), int(r[2]), int(r[3])) for r in await cur.fetchall()]


@dataclass(frozen=True)
class BacklogStats:
    outbox_rows: int
    outbox_oldest_s: float
    pending: int
    overdue: int
    overdue_s: float
    repairing: int


async def backlog_stats(conn: Conn, cap: int) -> BacklogStats:
    """The outbox and pending fan-out backlog in one statement: counts stop at
    `cap` rows, ages come from the (indexed) oldest timestamps, so the cost stays
    small however large the backlog grows."""
    cur = await conn.execute(
        """
        SELECT
            (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT %(cap)s) o),
            (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0) FROM outbox),
            (SELECT count(*) FROM (SELECT 1 FROM fanout_pending LIMIT %(cap)s) p),
            (SELECT count(*) FROM (
                SELECT 1 FROM fanout_pending WHERE repair_at <= now() LIMIT %(cap)s) d),
            (SELECT coalesce(extract(epoch FROM now() - min(repair_at)), 0)
                FROM fanout_pending WHERE repair_at <= now()),
            (SELECT count(*) FROM (
                SELECT 1 FROM fanout_pending WHERE attempts > 0 LIMIT %(cap)s) r)
        """,
        {"cap": cap},
    )
    row = await cur.fetchone()
    assert row is not None
    return BacklogStats(
        int(row[0]), float(row[1]), int(row[2]), int(row[3]), float(row[4]), int(row[5])
    )


# -- reads ---------------------------------------------------------------------------


async def timeline_page(
    conn: Conn, user: str, after_seq: int, limit: int, body_budget: int
) -> tuple[int, list[tuple[int, StoredMessage | None]]]:
    """The user's retention floor (the highest seq retention deleted, 0: none) and
    up to `limit` timeline rows after after_seq, in seq order; a row whose body
    would take the running total past body_budget comes back as None (the page ends
    before it). One statement: the floor comes in a row of its own even when the
    page is empty."""
    cur = await conn.execute(
        f"""
        SELECT f.floor, p.seq, {_PAGED_COLUMNS.replace("m.", "p.")},
               p.fits AND EXISTS (SELECT 1 FROM hidden_messages h
                                  WHERE h.user_id = %(u)s AND h.msg_id = p.msg_id)
        FROM (
            SELECT coalesce((SELECT floor_seq FROM timeline_floor WHERE user_id = %(u)s), 0)
        ) AS f (floor)
        LEFT JOIN LATERAL (
            SELECT t.seq, m.*, sum(octet_length(m.body)) OVER (
                       ORDER BY t.seq ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
                   ) - octet_length(m.body) < %(budget)s AS fits
            FROM timeline t JOIN messages m ON m.msg_id = t.msg_id
            WHERE t.user_id = %(u)s AND t.seq > %(after)s
            ORDER BY t.seq LIMIT %(limit)s
        ) AS p ON true
        ORDER BY p.seq
        """,
        {"budget": body_budget, "u": user, "after": after_seq, "limit": limit},
    )
    rows = await cur.fetchall()
    floor = int(rows[0][0]) if rows else 0
    return floor, [
        (int(r[1]), _hidden(_message(r, 2), r[_NCOLS + 3]) if r[_NCOLS + 2] else None)
        for r in rows
        if r[1] is not None
    ]


async def store_epoch(conn: Conn) -> str:
    """The database's store epoch (migration 0002: one row, made with the schema)."""
    cur = await conn.execute("SELECT epoch FROM store_epoch")
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("store_epoch has no row: the logic migrations did not run")
    return str(row[0])


async def new_store_epoch(conn: Conn) -> str:
    """Replaces the database's store epoch with a new random one; returns it."""
    cur = await conn.execute(
        "UPDATE store_epoch SET epoch = gen_random_uuid()::text, created_at = now() RETURNING epoch"
    )
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("store_epoch has no row: the logic migrations did not run")
    return str(row[0])


async def timeline_heads(conn: Conn, users: Sequence[str]) -> list[int]:
    """The highest committed seq of each user's timeline (0: none), in `users`
    order: one backward index probe of the timeline's primary key per user.

    The ids travel as one comma-joined text (valid user ids have no comma:
    logic.ids): adapting a Python list into a text[] parameter cost a fifth of
    GetHeads' CPU in logic (bench/e2e_idle.py profile)."""
    cur = await conn.execute(
        """
        SELECT coalesce((SELECT max(t.seq) FROM timeline t WHERE t.user_id = u.id), 0)
        FROM unnest(string_to_array(%s, ',')) WITH ORDINALITY AS u(id, n)
        ORDER BY u.n
        """,
        (",".join(users),),
    )
    return [int(r[0]) for r in await cur.fetchall()]


async def history_page(
    conn: Conn,
    user: str,
    conv: str,
    before_conv_seq: int,
    ranges: Sequence[tuple[int, int]],
    limit: int,
    body_budget: int,
) -> list[StoredMessage | None]:
    """Up to `limit` messages below before_conv_seq inside one of the (after, upto]
    ranges, newest first; None for a row past the body budget."""
    floor = min(lo for lo, _ in ranges)
    cur = await conn.execute(
        f"""
        SELECT {_PAGED_COLUMNS},
               m.fits AND EXISTS (SELECT 1 FROM hidden_messages h
                                  WHERE h.user_id = %(u)s AND h.msg_id = m.msg_id)
        FROM (
            SELECT m.*, sum(octet_length(m.body)) OVER (
                       ORDER BY m.conv_seq DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
                   ) - octet_length(m.body) < %(budget)s AS fits
            FROM messages m
            WHERE m.conversation_id = %(conv)s AND m.kind = 1 AND m.conv_seq < %(before)s
              AND m.conv_seq > %(floor)s
              AND EXISTS (SELECT 1 FROM unnest(%(lo)s::int8[], %(hi)s::int8[]) AS r (lo, hi)
                          WHERE m.conv_seq > r.lo AND m.conv_seq <= r.hi)
            ORDER BY m.conv_seq DESC LIMIT %(limit)s
        ) AS m
        ORDER BY m.conv_seq DESC
        """,
        {
            "u": user,
            "conv": conv,
            "before": before_conv_seq,
            "floor": floor,
            "lo": [lo for lo, _ in ranges],
            "hi": [hi for _, hi in ranges],
            "limit": limit,
            "budget": body_budget,
        },
    )
    return [
        _hidden(_message(r), r[_NCOLS + 1]) if r[_NCOLS] else None for r in await cur.fetchall()
    ]


async def member_ranges(conn: Conn, conv: str, user: str) -> list[tuple[int, int, bool]]:
    """The user's membership ranges in the group: (joined_after, left_after or
    MAX_BIGINT, current)."""
    cur = await conn.execute(
        """
        SELECT joined_after, coalesce(left_after, %s), left_after IS NULL FROM members
        WHERE conversation_id = %s AND user_id = %s
        """,
        (MAX_BIGINT, conv, user),
    )
    return [(int(r[0]), int(r[1]), bool(r[2])) for r in await cur.fetchall()]


async def current_members(conn: Conn, convs: Sequence[str]) -> dict[str, list[str]]:
    """Current members of each group, sorted."""
    cur = await conn.execute(
        """
        SELECT conversation_id, user_id FROM members
        WHERE conversation_id = ANY(%s::text[]) AND left_after IS NULL
        ORDER BY conversation_id, user_id
        """,
        (list(convs),),
    )
    out: dict[str, list[str]] = {c: [] for c in convs}
    for r in await cur.fetchall():
        out[r[0]].append(r[1])
    return out


# -- groups --------------------------------------------------------------------------


async def create_group(
    conn: Conn, conv: str, name: str, owner: str, members: Sequence[str]
) -> None:
    """Inserts the group, its members (from conv_seq 0) and any unknown users."""
    await conn.execute(
        """
        WITH g AS (
            INSERT INTO conversations (conversation_id, kind, name, owner_id)
            VALUES (%(conv)s, 2, %(name)s, %(owner)s)
            RETURNING conversation_id
        ), m AS (
            INSERT INTO members (conversation_id, user_id, joined_after)
            SELECT g.conversation_id, u, 0 FROM g, unnest(%(members)s::text[]) AS u
        )
        INSERT INTO users (user_id) SELECT unnest(%(members)s::text[]) ON CONFLICT DO NOTHING
        """,
        {"conv": conv, "name": name, "owner": owner, "members": list(members)},
    )


@dataclass(frozen=True)
class GroupState:
    name: str
    owner_id: str
    members: list[str]  # current, sorted
    last_conv_seq: int


async def group_state_tx(conn: Conn, conv: str) -> GroupState | None:
    """The group's name, owner, current members and last conv_seq; None if there is
    no such group. Run under the conversation's send lock when the answer decides
    a membership change."""
    cur = await conn.execute(
        """
        SELECT c.name, coalesce(c.owner_id, ''),
               coalesce((SELECT array_agg(user_id ORDER BY user_id) FROM members
                         WHERE conversation_id = c.conversation_id AND left_after IS NULL),
                        '{}'),
               coalesce((SELECT max(conv_seq) FROM messages
                         WHERE conversation_id = c.conversation_id), 0)
        FROM conversations c WHERE c.conversation_id = %s AND c.kind = 2
        """,
        (conv,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return GroupState(row[0], row[1], list(row[2]), int(row[3]))


async def group_exists(conn: Conn, conv: str) -> bool:
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM conversations WHERE conversation_id = %s AND kind = 2)",
        (conv,),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def add_members_tx(conn: Conn, conv: str, users: Sequence[str], joined_after: int) -> None:
    """Makes `users` (not current members) members from joined_after on. A user who
    left at exactly joined_after has an empty range there, which is simply reopened."""
    await conn.execute(
        """
        WITH m AS (
            INSERT INTO members (conversation_id, user_id, joined_after)
            SELECT %(conv)s, u, %(after)s FROM unnest(%(users)s::text[]) AS u
            ON CONFLICT (conversation_id, user_id, joined_after) DO UPDATE SET left_after = NULL
        )
        INSERT INTO users (user_id) SELECT unnest(%(users)s::text[]) ON CONFLICT DO NOTHING
        """,
        {"conv": conv, "users": list(users), "after": joined_after},
    )


async def remove_members_tx(
    conn: Conn, conv: str, users: Sequence[str], left_after: int, new_owner: str | None
) -> None:
    """Ends the current membership of `users` at left_after; optionally hands the
    group to new_owner."""
    await conn.execute(
        """
        WITH o AS (
            UPDATE conversations SET owner_id = %(owner)s
            WHERE conversation_id = %(conv)s AND %(owner)s::text IS NOT NULL
        )
        UPDATE members SET left_after = %(after)s
        WHERE conversation_id = %(conv)s AND user_id = ANY(%(users)s::text[])
          AND left_after IS NULL
        """,
        {"conv": conv, "users": list(users), "after": left_after, "owner": new_owner},
    )


async def successor_tx(conn: Conn, conv: str, leaving: Sequence[str]) -> str | None:
    """The longest-standing current member not in `leaving` (ties by id)."""
    cur = await conn.execute(
        """
        SELECT user_id FROM members
        WHERE conversation_id = %s AND left_after IS NULL AND user_id <> ALL(%s::text[])
        ORDER BY joined_after, user_id LIMIT 1
        """,
        (conv, list(leaving)),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None


# -- retention (logic/retention.py) ---------------------------------------------------

UUID7_SQL_PATTERN = f"^{UUID7_PATTERN}$"


@dataclass(frozen=True)
class RetentionState:
    """The pruner's progress row (migration 0003), locked by the caller's batch."""

    now_ms: int  # the database clock, read with the lock
    tl_cutoff: int
    tl_after: str | None
    tl_done: int
    tl_due: bool  # the last timeline pass ended at least the pass interval ago
    msg_bound: int
    msg_after: int | None
    msg_due: bool
    dedup_after: str | None
    dedup_due: bool


async def lock_retention_state_tx(conn: Conn, pass_interval_s: float) -> RetentionState | None:
    """Locks the progress row for this transaction; None if another pruner holds
    it (SKIP LOCKED: a pruner never waits for another)."""
    cur = await conn.execute(
        """
        SELECT (extract(epoch FROM now()) * 1000)::bigint,
               tl_cutoff, tl_after, tl_done, tl_last_pass <= now() - make_interval(secs => %(i)s),
               msg_bound, msg_after, msg_last_pass <= now() - make_interval(secs => %(i)s),
               dedup_after, dedup_last_pass <= now() - make_interval(secs => %(i)s)
        FROM retention_state FOR UPDATE SKIP LOCKED
        """,
        {"i": pass_interval_s},
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return RetentionState(
        int(row[0]),
        int(row[1]),
        row[2],
        int(row[3]),
        bool(row[4]),
        int(row[5]),
        None if row[6] is None else int(row[6]),
        bool(row[7]),
        row[8],
        bool(row[9]),
    )


_RETENTION_COLUMNS = frozenset(
    {"tl_cutoff", "tl_after", "tl_done", "msg_bound", "msg_after", "dedup_after"}
)


async def save_retention_state_tx(
    conn: Conn, *, finished: tuple[str, ...] = (), **values: Any
) -> None:
    """Updates the progress row (under the lock of `lock_retention_state_tx`);
    `finished` names the kinds ("tl", "msg", "dedup") whose pass ended now."""
    assert set(values) <= _RETENTION_COLUMNS, values
    sets = [f"{k} = %({k})s" for k in values]
    sets += [f"{kind}_last_pass = now()" for kind in finished]
    sets.append("updated_at = now()")
    await conn.execute(f"UPDATE retention_state SET {', '.join(sets)}", values)


async def first_msg_from(conn: Conn, msg_id: int) -> tuple[int, int] | None:
    """(msg_id, server_time_ms) of the first message with msg_id >= `msg_id`."""
    cur = await conn.execute(
        "SELECT msg_id, server_time_ms FROM messages WHERE msg_id >= %s ORDER BY msg_id LIMIT 1",
        (msg_id,),
    )
    row = await cur.fetchone()
    return (int(row[0]), int(row[1])) if row else None


async def last_msg_id(conn: Conn) -> int:
    cur = await conn.execute("SELECT coalesce(max(msg_id), 0) FROM messages")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def msg_id_at(conn: Conn, time_ms: int) -> int:
    """The first msg_id stored at or after `time_ms` (server_time_ms), or one past
    the last msg_id if every message is older: every message below the returned id
    is older than `time_ms`. A binary search over the primary key (msg_ids and
    server times are assigned by the same INSERT, so they rise together): about
    log2(messages) single-row index reads, whatever the table's size."""
    first = await first_msg_from(conn, 0)
    if first is None or first[1] >= time_ms:
        return first[0] if first else 0
    last = await last_msg_id(conn)
    probe = await first_msg_from(conn, last)
    assert probe is not None
    if probe[1] < time_ms:
        return last + 1
    # first[0] is old, `last` is not: the smallest x in (first, last] whose first
    # message at or after it is not old.
    lo, hi = first[0] + 1, last
    while lo < hi:
        mid = (lo + hi) // 2
        found = await first_msg_from(conn, mid)
        assert found is not None
        if found[1] >= time_ms:
            hi = mid
        else:
            lo = found[0] + 1
    found = await first_msg_from(conn, lo)
    assert found is not None
    return found[0]


async def next_timeline_users_tx(conn: Conn, after: str, limit: int) -> list[str]:
    """Up to `limit` distinct user ids with timeline rows, after `after`, in order:
    a loose index scan of the timeline's primary key (one probe per user)."""
    cur = await conn.execute(
        """
        WITH RECURSIVE u (user_id, n) AS (
            (SELECT user_id, 1 FROM timeline WHERE user_id > %(after)s ORDER BY user_id LIMIT 1)
            UNION ALL
            SELECT (SELECT t.user_id FROM timeline t WHERE t.user_id > u.user_id
                    ORDER BY t.user_id LIMIT 1), u.n + 1
            FROM u WHERE u.user_id IS NOT NULL AND u.n < %(limit)s
        )
        SELECT user_id FROM u WHERE user_id IS NOT NULL
        """,
        {"after": after, "limit": limit},
    )
    return [str(r[0]) for r in await cur.fetchall()]


async def prune_timeline_tx(conn: Conn, users: Sequence[str], cutoff: int, limit: int) -> int:
    """Deletes up to `limit` timeline rows of `users` whose msg_id is below `cutoff`
    (index range scans of (user_id, msg_id)), and raises each user's floor to the
    highest seq deleted, in the same statement. Returns the rows deleted."""
    cur = await conn.execute(
        """
        WITH del AS (
            DELETE FROM timeline WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM timeline
                WHERE user_id = ANY(%(users)s::text[]) AND msg_id < %(cutoff)s
                LIMIT %(limit)s))
            RETURNING user_id, seq
        ), fl AS (
            INSERT INTO timeline_floor (user_id, floor_seq)
            SELECT user_id, max(seq) FROM del GROUP BY user_id
            ON CONFLICT (user_id) DO UPDATE
                SET floor_seq = greatest(timeline_floor.floor_seq, excluded.floor_seq)
        )
        SELECT count(*) FROM del
        """,
        {"users": list(users), "cutoff": cutoff, "limit": limit},
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def prune_messages_tx(
    conn: Conn, after: int, bound: int, limit: int
) -> tuple[int, int | None]:
    """Looks at up to `limit` messages with after < msg_id < bound, in msg_id order,
    and deletes those that are fanned out (conv_seq <= their conversation's
    watermark) and not their conversation's newest (its conv_seq stays the floor of
    I5's check and of membership boundaries). Returns (deleted, the last msg_id
    looked at; None when there was none: the range is done)."""
    cur = await conn.execute(
        """
        WITH cand AS (
            SELECT msg_id, conversation_id, conv_seq FROM messages
            WHERE msg_id > %(after)s AND msg_id < %(bound)s
            ORDER BY msg_id LIMIT %(limit)s
        ), del AS (
            DELETE FROM messages m USING cand c
            WHERE m.msg_id = c.msg_id
              AND c.conv_seq <= coalesce((SELECT watermark FROM fanout_state f
                                          WHERE f.conversation_id = c.conversation_id), 0)
              AND EXISTS (SELECT 1 FROM messages n WHERE n.conversation_id = c.conversation_id
                          AND n.conv_seq > c.conv_seq)
            RETURNING m.msg_id
        ), hid AS (
            DELETE FROM hidden_messages h USING del WHERE h.msg_id = del.msg_id
        )
        SELECT (SELECT count(*) FROM del), (SELECT max(msg_id) FROM cand)
        """,
        {"after": after, "bound": bound, "limit": limit},
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), None if row[1] is None else int(row[1])


async def next_dedup_senders_tx(conn: Conn, after: str, limit: int) -> list[str]:
    """Up to `limit` distinct senders with dedup keys after `after`, in order (a
    loose index scan of send_dedup's primary key)."""
    cur = await conn.execute(
        """
        WITH RECURSIVE u (sender_id, n) AS (
            (SELECT sender_id, 1 FROM send_dedup WHERE sender_id > %(after)s
             ORDER BY sender_id LIMIT 1)
            UNION ALL
            SELECT (SELECT d.sender_id FROM send_dedup d WHERE d.sender_id > u.sender_id
                    ORDER BY d.sender_id LIMIT 1), u.n + 1
            FROM u WHERE u.sender_id IS NOT NULL AND u.n < %(limit)s
        )
        SELECT sender_id FROM u WHERE sender_id IS NOT NULL
        """,
        {"after": after, "limit": limit},
    )
    return [str(r[0]) for r in await cur.fetchall()]


async def prune_dedup_tx(conn: Conn, senders: Sequence[str], below: str, limit: int) -> int:
    """Deletes up to `limit` dedup keys of `senders` that are UUIDv7 made before the
    time whose 13-character prefix is `below` ('xxxxxxxx-xxxx'): canonical UUIDv7
    strings sort by their time, so these are an index range of each sender. Other
    ids (whose age cannot be told) are never deleted. Returns the keys deleted."""
    cur = await conn.execute(
        """
        WITH del AS (
            DELETE FROM send_dedup WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM send_dedup
                WHERE sender_id = ANY(%(senders)s::text[]) AND client_msg_id < %(below)s
                  AND client_msg_id ~ %(pattern)s
                LIMIT %(limit)s))
            RETURNING 1
        )
        SELECT count(*) FROM del
        """,
        {"senders": list(senders), "below": below, "pattern": UUID7_SQL_PATTERN, "limit": limit},
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def prune_outbox_tx(conn: Conn, older_than_s: float, limit: int) -> int:
    """Deletes up to `limit` outbox rows older than `older_than_s` whose
    conversation is fanned out up to their conv_seq already (publishing them could
    change nothing). Rows a relay is publishing are skipped (SKIP LOCKED); rows not
    fanned out stay for the relay. Returns the rows deleted."""
    cur = await conn.execute(
        """
        WITH victims AS (
            SELECT o.msg_id FROM outbox o
            JOIN fanout_state f ON f.conversation_id = o.conversation_id
            WHERE o.created_at < now() - make_interval(secs => %(age)s)
              AND o.conv_seq <= f.watermark
            ORDER BY o.created_at LIMIT %(limit)s
            FOR UPDATE OF o SKIP LOCKED
        ), del AS (
            DELETE FROM outbox o USING victims v WHERE o.msg_id = v.msg_id RETURNING 1
        )
        SELECT count(*) FROM del
        """,
        {"age": older_than_s, "limit": limit},
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


# -- restore fence (python -m logic restore-fence) ------------------------------------


async def highest_stored_seq(conn: Conn) -> int:
    """The highest value of seqsvc's that logic stored anywhere: timeline seqs
    (also the ones retention deleted, in timeline_floor), the senders' seqs and
    conv_seqs of messages, and the fan-out watermarks. seqsvc must hand out only
    values above it (I1/I5). Reads every row of the seq columns' indexes once;
    run it once, after a restore, before seqsvc starts."""
    cur = await conn.execute(
        """
        SELECT greatest(
            (SELECT max(seq) FROM timeline),
            (SELECT max(floor_seq) FROM timeline_floor),
            (SELECT max(conv_seq) FROM messages),
            (SELECT max(sender_seq) FROM messages),
            (SELECT max(watermark) FROM fanout_state),
            (SELECT max(upto_conv_seq) FROM fanout_pending),
            (SELECT max(joined_after) FROM members),
            (SELECT max(left_after) FROM members),
            0)
        """
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def advance_msg_ids(conn: Conn, margin: int) -> int:
    """Moves the msg_id sequence `margin` past the highest msg_id it or the table
    ever reached; returns the last value set (the next msg_id is one above)."""
    cur = await conn.execute(
        """
        SELECT setval(s, greatest(coalesce(pg_sequence_last_value(s::regclass), 0),
                                  (SELECT coalesce(max(msg_id), 0) FROM messages)) + %s)
        FROM pg_get_serial_sequence('messages', 'msg_id') AS s
        """,
        (margin,),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# -- conversation events (state.py) ---------------------------------------------------


@dataclass(frozen=True)
class Target:
    msg_id: int
    sender_id: str
    kind: int
    recalled: bool
    server_time_ms: int


async def target_message_tx(conn: Conn, conv: str, conv_seq: int) -> Target | None:
    """The row at (conversation, conv_seq), for an event acting on it."""
    cur = await conn.execute(
        "SELECT msg_id, sender_id, kind, recalled, server_time_ms FROM messages "
        "WHERE conversation_id = %s AND conv_seq = %s",
        (conv, conv_seq),
    )
    row = await cur.fetchone()
    return Target(int(row[0]), row[1], int(row[2]), bool(row[3]), int(row[4])) if row else None


async def in_timeline(conn: Conn, user: str, msg_id: int) -> bool:
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM timeline WHERE user_id = %s AND msg_id = %s)",
        (user, msg_id),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def group_owner(conn: Conn, conv: str) -> str | None:
    cur = await conn.execute(
        "SELECT owner_id FROM conversations WHERE conversation_id = %s AND kind = 2", (conv,)
    )
    row = await cur.fetchone()
    return row[0] if row else None


async def raise_positions_tx(conn: Conn, raised: Sequence[tuple[str, str, int, int]]) -> None:
    """Raises each (conversation, user)'s positions to at least the read and
    delivered values given (never lowers them), in one statement: a send batch's
    READ and DELIVERED rows. Reading implies having received: delivered follows
    read."""
    await conn.execute(
        """
        INSERT INTO read_positions (conversation_id, user_id, read_conv_seq, delivered_conv_seq)
        SELECT c, u, r, greatest(r, d)
        FROM unnest(%s::text[], %s::text[], %s::int8[], %s::int8[]) AS t (c, u, r, d)
        ON CONFLICT (conversation_id, user_id) DO UPDATE SET
            read_conv_seq = greatest(read_positions.read_conv_seq, excluded.read_conv_seq),
            delivered_conv_seq = greatest(read_positions.delivered_conv_seq,
                                          excluded.delivered_conv_seq)
        """,
        (
            [x[0] for x in raised],
            [x[1] for x in raised],
            [x[2] for x in raised],
            [x[3] for x in raised],
        ),
    )


async def edit_message_tx(conn: Conn, msg_id: int, body: bytes, edited_at_ms: int) -> None:
    await conn.execute(
        "UPDATE messages SET body = %s, edited_at_ms = %s WHERE msg_id = %s",
        (body, edited_at_ms, msg_id),
    )


async def recall_message_tx(conn: Conn, conv: str, conv_seq: int) -> int:
    """Overwrites with an empty one the body of the message at conv_seq and of
    every EDIT of it; returns how many rows lost their body. From the commit on no
    query returns the bodies; PostgreSQL keeps the old row versions until vacuum,
    and the WAL, standbys and backups keep theirs (docs/protocol.md, "Where a
    recalled body can still be")."""
    cur = await conn.execute(
        """
        UPDATE messages SET body = '', recalled = true
        WHERE conversation_id = %(c)s
          AND (conv_seq = %(s)s OR (kind = 2 AND target_conv_seq = %(s)s))
        """,
        {"c": conv, "s": conv_seq},
    )
    return cur.rowcount


async def hide_message_tx(conn: Conn, user: str, msg_id: int) -> None:
    await conn.execute(
        "INSERT INTO hidden_messages (user_id, msg_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (user, msg_id),
    )


# -- conversation lists and receipts (conversations.py) -------------------------------


async def conversation_page(
    conn: Conn, user: str, after: tuple[int, str] | None, limit: int, unread_cap: int
) -> list[Conversation]:
    """Up to `limit` of the user's conversations (current groups, direct ones with
    messages) after the cursor (last_activity_ms, conversation_id), newest activity
    first, each with the user's positions, its unread count (chat messages by
    others above the read position and the user's join point, not recalled, up to
    unread_cap + 1) and, for a direct conversation, the peer's positions.

    Last activity is the newest chat message's time (one backward probe of the
    conversation's (conversation_id, conv_seq) index), else the creation time. Every
    conversation of the user is probed per page: fine for thousands per user."""
    cur = await conn.execute(
        """
        WITH mine AS (
            SELECT conversation_id, joined_after FROM members
            WHERE user_id = %(u)s AND left_after IS NULL
            UNION ALL
            SELECT conversation_id, 0 FROM conversations
            WHERE kind = 1 AND (direct_user_a = %(u)s OR direct_user_b = %(u)s)
        ), act AS (
            SELECT c.conversation_id, c.kind, c.name, coalesce(c.owner_id, '') AS owner,
                   c.direct_user_a, c.direct_user_b, mine.joined_after,
                   coalesce((SELECT m.server_time_ms FROM messages m
                             WHERE m.conversation_id = c.conversation_id AND m.kind = 1
                             ORDER BY m.conv_seq DESC LIMIT 1),
                            (extract(epoch FROM c.created_at) * 1000)::bigint) AS activity
            FROM conversations c JOIN mine USING (conversation_id)
        ), page AS (
            SELECT * FROM act
            WHERE %(after)s::bool IS NOT TRUE
               OR (activity, conversation_id) < (%(a_time)s::int8, %(a_conv)s::text)
            ORDER BY activity DESC, conversation_id DESC LIMIT %(limit)s
        )
        SELECT p.conversation_id, p.kind, p.name, p.owner, p.direct_user_a, p.direct_user_b,
               p.activity,
               coalesce((SELECT max(conv_seq) FROM messages m
                         WHERE m.conversation_id = p.conversation_id), 0),
               coalesce(r.read_conv_seq, 0),
               (SELECT count(*) FROM (
                    SELECT 1 FROM messages m
                    WHERE m.conversation_id = p.conversation_id
                      AND m.conv_seq > greatest(coalesce(r.read_conv_seq, 0), p.joined_after)
                      AND m.kind = 1 AND NOT m.recalled AND m.sender_id <> %(u)s
                    LIMIT %(cap)s + 1) AS u),
               coalesce(pr.read_conv_seq, 0), coalesce(pr.delivered_conv_seq, 0)
        FROM page p
        LEFT JOIN read_positions r
               ON r.conversation_id = p.conversation_id AND r.user_id = %(u)s
        LEFT JOIN read_positions pr
               ON p.kind = 1 AND pr.conversation_id = p.conversation_id
              AND pr.user_id = CASE WHEN p.direct_user_a = %(u)s THEN p.direct_user_b
                                    ELSE p.direct_user_a END
        ORDER BY p.activity DESC, p.conversation_id DESC
        """,
        {
            "u": user,
            "after": after is not None,
            "a_time": after[0] if after else 0,
            "a_conv": after[1] if after else "",
            "limit": limit,
            "cap": unread_cap,
        },
    )
    out = []
    for r in await cur.fetchall():
        direct = r[1] == 1
        unread = int(r[9])
        out.append(
            Conversation(
                conversation_id=r[0],
                kind=r[1],
                name=r[2],
                owner_id=r[3],
                member_ids=[r[4], r[5]] if direct else [],
                last_conv_seq=int(r[7]),
                read_conv_seq=int(r[8]),
                unread_count=min(unread, unread_cap),
                unread_capped=unread > unread_cap,
                last_activity_ms=int(r[6]),
                peer_read_conv_seq=int(r[10]) if direct else 0,
                peer_delivered_conv_seq=int(r[11]) if direct else 0,
            )
        )
    return out


@dataclass(frozen=True)
class Receipts:
    member_count: int
    read_count: int
    readers: list[str]
    delivered: bool


async def receipts(
    conn: Conn, conv: str, conv_seq: int, sender: str, after_user: str | None, limit: int
) -> Receipts:
    """The "read by N of M" of the message at conv_seq: M the current members
    other than `sender`, N those of them whose read position is at or above
    conv_seq (the sender counts in neither), and (after_user not None) up to
    `limit` of the N after after_user, by id. A direct conversation has no members rows: its
    pair comes from its conversations row."""
    cur = await conn.execute(
        """
        WITH who AS (
            SELECT user_id FROM members WHERE conversation_id = %(c)s AND left_after IS NULL
            UNION
            SELECT unnest(ARRAY[direct_user_a, direct_user_b]) FROM conversations
            WHERE conversation_id = %(c)s AND kind = 1
        ), readers AS (
            SELECT w.user_id, r.read_conv_seq, r.delivered_conv_seq FROM who w
            JOIN read_positions r ON r.conversation_id = %(c)s AND r.user_id = w.user_id
            WHERE w.user_id <> %(sender)s
        )
        SELECT (SELECT count(*) FROM who WHERE user_id <> %(sender)s),
               (SELECT count(*) FROM readers WHERE read_conv_seq >= %(s)s),
               (SELECT count(*) FROM readers WHERE delivered_conv_seq >= %(s)s),
               coalesce((SELECT array_agg(user_id ORDER BY user_id) FROM (
                    SELECT user_id FROM readers
                    WHERE read_conv_seq >= %(s)s AND %(list)s AND user_id > %(after)s
                    ORDER BY user_id LIMIT %(limit)s) AS l), '{}')
        """,
        {
            "c": conv,
            "s": conv_seq,
            "sender": sender,
            "list": after_user is not None,
            "after": after_user or "",
            "limit": limit,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return Receipts(int(row[0]), int(row[1]), list(row[3]), delivered=int(row[2]) > 0)


async def shared_users(conn: Conn, user: str, others: Sequence[str]) -> set[str]:
    """Those of `others` who share a conversation with `user`: a group both are
    current members of, or a direct conversation (with messages) of the two."""
    cur = await conn.execute(
        """
        SELECT o FROM unnest(%(o)s::text[], %(d)s::text[]) AS t (o, d)
        WHERE EXISTS (
                SELECT 1 FROM members a JOIN members b USING (conversation_id)
                WHERE a.user_id = %(u)s AND a.left_after IS NULL
                  AND b.user_id = o AND b.left_after IS NULL)
           OR EXISTS (SELECT 1 FROM conversations c WHERE c.conversation_id = d AND c.kind = 1)
        """,
        {
            "u": user,
            "o": list(others),
            # The direct conversation's id: d:<a>:<b>, a < b (code point order, as ids.py).
            "d": [f"d:{min(user, o)}:{max(user, o)}" for o in others],
        },
    )
    return {r[0] for r in await cur.fetchall()}
