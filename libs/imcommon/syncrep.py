"""Synchronous replication's loophole, closed for callers that confirm a commit
to someone (a send-ACK, a sequence ceiling).

With `synchronous_commit = on` a COMMIT returns once the synchronous standby has
flushed it, with one exception: if the wait for the standby is cancelled (a
cancel request: `pg_cancel_backend()` by an operator clearing stuck sessions, or
the driver cancelling an interrupted call), PostgreSQL keeps the commit locally,
sends a WARNING ("canceling wait for synchronous replication ...; the transaction
has already committed locally, but might not have been replicated to the
standby") and reports the COMMIT as successful. A failover then loses it. (A
`statement_timeout` does not cancel the wait: PostgreSQL disarms it before the
commit.)

`commits_confirmed(conn)` turns that WARNING into an error: a block whose commit
was not confirmed by the standby raises `UnconfirmedCommit`, an OperationalError,
so the caller answers "unavailable, retry" instead of confirming. The commit
itself stays, so a retry must make its answer durable before giving it (logic's
duplicate path commits a transaction with an xid, which waits for the standby
and covers every earlier commit).

The WARNING is recognised by its English text: servers must run with
`lc_messages` C or English (the default of the images and of imdev).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.errors import Diagnostic

#: The start of the WARNING of a cancelled wait for the synchronous standby
#: (PostgreSQL 12 to 17, syncrep.c).
CANCELLED_WAIT = "canceling wait for synchronous replication"
#: The same, when the backend is being terminated (the client never sees the
#: COMMIT succeed then, but the notice may still arrive).
CANCELLED_WAIT_TERMINATING = "canceling the wait for synchronous replication"


class UnconfirmedCommit(psycopg.OperationalError):
    """A COMMIT returned, but its wait for the synchronous standby was
    cancelled: the commit holds on the primary only and a failover may lose it.
    Do not confirm what it wrote; a retry finds it committed."""


def is_cancelled_wait(diag: Diagnostic) -> bool:
    """Whether a notice is PostgreSQL's "commit kept locally, standby wait
    cancelled" WARNING."""
    text = diag.message_primary or ""
    return text.startswith((CANCELLED_WAIT, CANCELLED_WAIT_TERMINATING))


@contextlib.contextmanager
def commits_confirmed(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> Iterator[None]:
    """Raises `UnconfirmedCommit` when the block ends without an exception if a
    commit on `conn` inside it (an explicit transaction's or an autocommit
    statement's) was not confirmed by the synchronous standby. Costs no
    statement: it listens to the connection's notices. Without synchronous
    replication it never raises."""
    cancelled: list[str] = []

    def on_notice(diag: Diagnostic) -> None:
        if is_cancelled_wait(diag):
            cancelled.append(diag.message_primary or "")

    conn.add_notice_handler(on_notice)
    try:
        yield
    finally:
        conn.remove_notice_handler(on_notice)
    if cancelled:
        raise UnconfirmedCommit(
            f"commit not confirmed by the synchronous standby ({cancelled[0]}); "
            "it may be lost at a failover"
        )
