"""Durable client state, per account (`<user>/<device>`): the sync cursor
(`last_seq`) and the store epoch it belongs to, the ids of messages already
handed to the application, and the outbox (messages submitted but not yet
acknowledged or refused for good).

`Store` is the protocol; `SQLiteStore` (the default, stdlib sqlite3 on one worker
thread) and `MemoryStore` (tests; state lives as long as the object) implement it.
A store may be shared by several accounts and, sequentially, by several `Client`
instances (that is how a process restart is simulated in tests).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

R = TypeVar("R")

#: The default bound on an account's outbox (messages submitted and not yet
#: acknowledged or refused for good). `Client.submit()` beyond it raises
#: `OutboxFull` instead of letting the outbox grow without limit.
DEFAULT_MAX_OUTBOX = 10_000


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One outgoing message or conversation event as the outbox keeps it.
    `order` is the submission order within the account (increasing; gaps
    allowed). `kind` (`MessageKind`; 0 = a chat message) and
    `target_conv_seq` describe an event (a read position, an edit, a recall):
    they are resent exactly like messages."""

    client_msg_id: str
    conversation_id: str
    content_type: int
    body: bytes
    order: int
    kind: int = 0
    target_conv_seq: int = 0


@runtime_checkable
class Store(Protocol):
    """What the client needs from durable storage. Every method may be called
    only between `open()` and `close()`; `close()` is idempotent."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def load_last_seq(self, account: str) -> int:
        """The highest seq whose message (and every earlier one) the application
        has been handed; 0 for a new account."""
        ...

    async def filter_seen(self, account: str, msg_ids: Sequence[int]) -> set[int]:
        """The subset of `msg_ids` already handed to the application."""
        ...

    async def commit(self, account: str, last_seq: int, handed: Sequence[tuple[int, int]]) -> None:
        """Atomically records `handed` ((msg_id, seq) pairs) as seen and raises the
        cursor to `last_seq` (never lowers it). Durable when it returns."""
        ...

    async def load_epoch(self, account: str) -> str:
        """The server's store epoch the account's cursor and seen ids belong to
        ("" if none was recorded: a new account, or a store from an SDK before
        epochs)."""
        ...

    async def set_epoch(self, account: str, epoch: str, reset: bool) -> None:
        """Records that the account's cursor belongs to store epoch `epoch`. With
        `reset`, atomically also forgets the cursor (back to 0) and every seen
        msg_id: they were positions in another database. The outbox is kept
        (unsent messages go to whatever store the server has now). Durable when
        it returns."""
        ...

    #: Most messages an account's outbox may hold (the client enforces it).
    max_outbox: int

    async def outbox_add(self, account: str, entries: Sequence[OutboxEntry]) -> None:
        """Atomically adds `entries` to the account's outbox. An entry whose
        client_msg_id is already there is left as it was (a repeat is harmless).
        Durable when it returns."""
        ...

    async def outbox_delete(self, account: str, client_msg_ids: Sequence[str]) -> None:
        """Atomically removes these messages (acknowledged or refused for good)
        from the account's outbox; unknown ids are ignored. Durable when it
        returns."""
        ...

    async def outbox_load(self, account: str) -> list[OutboxEntry]:
        """The account's outbox in submission (`order`) order."""
        ...


class MemoryStore:
    """An in-memory `Store`: survives `Client` instances, not the process.

    `keep_msg_ids` bounds the remembered ids per account (oldest seqs go first).
    The outbox is a dict per account (insertion order is submission order, since
    the client adds in that order): a message submitted to one `Client` and
    not acknowledged before it closed is resent by the next `Client` given this
    same object, and by no one once the process ends.
    """

    def __init__(self, keep_msg_ids: int = 100_000, max_outbox: int = DEFAULT_MAX_OUTBOX) -> None:
        if max_outbox < 1:
            raise ValueError("max_outbox must be at least 1")
        self.keep_msg_ids = keep_msg_ids
        self.max_outbox = max_outbox
        self._last_seq: dict[str, int] = {}
        self._epoch: dict[str, str] = {}
        self._seen: dict[str, dict[int, int]] = {}
        self._outbox: dict[str, dict[str, OutboxEntry]] = {}
        self.commits = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def load_last_seq(self, account: str) -> int:
        return self._last_seq.get(account, 0)

    async def filter_seen(self, account: str, msg_ids: Sequence[int]) -> set[int]:
        seen = self._seen.get(account, {})
        return {m for m in msg_ids if m in seen}

    async def commit(self, account: str, last_seq: int, handed: Sequence[tuple[int, int]]) -> None:
        seen = self._seen.setdefault(account, {})
        for msg_id, seq in handed:
            seen[msg_id] = seq
        if len(seen) > self.keep_msg_ids:
            for msg_id, _ in sorted(seen.items(), key=lambda kv: kv[1])[
                : len(seen) - self.keep_msg_ids
            ]:
                del seen[msg_id]
        self._last_seq[account] = max(self._last_seq.get(account, 0), last_seq)
        self.commits += 1

    async def load_epoch(self, account: str) -> str:
        return self._epoch.get(account, "")

    async def set_epoch(self, account: str, epoch: str, reset: bool) -> None:
        if reset:
            self._last_seq.pop(account, None)
            self._seen.pop(account, None)
        self._epoch[account] = epoch

    async def outbox_add(self, account: str, entries: Sequence[OutboxEntry]) -> None:
        box = self._outbox.setdefault(account, {})
        for e in entries:
            box.setdefault(e.client_msg_id, e)

    async def outbox_delete(self, account: str, client_msg_ids: Sequence[str]) -> None:
        box = self._outbox.get(account)
        if box:
            for cmid in client_msg_ids:
                box.pop(cmid, None)

    async def outbox_load(self, account: str) -> list[OutboxEntry]:
        return sorted(self._outbox.get(account, {}).values(), key=lambda e: e.order)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (
    account TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cursor_epoch (
    account TEXT PRIMARY KEY,
    epoch TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    account TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (account, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_seq ON seen (account, seq);
CREATE TABLE IF NOT EXISTS outbox (
    account TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    ord INTEGER NOT NULL,
    conversation_id TEXT NOT NULL,
    content_type INTEGER NOT NULL,
    body BLOB NOT NULL,
    kind INTEGER NOT NULL DEFAULT 0,
    target_conv_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account, client_msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_by_ord ON outbox (account, ord);
"""

#: Columns added to tables of files made by an older SDK (table, column, type).
_ADDED_COLUMNS = (
    ("outbox", "kind", "INTEGER NOT NULL DEFAULT 0"),
    ("outbox", "target_conv_seq", "INTEGER NOT NULL DEFAULT 0"),
)


class SQLiteStore:
    """A `Store` in one SQLite file (WAL, `synchronous=FULL`), driven from a
    single worker thread so the event loop never blocks on disk.

    Every write is one transaction, durable (fsynced to the WAL) when its method
    returns; a process killed at any point leaves the state of the last
    completed write. The tables are created with CREATE ... IF NOT EXISTS on
    open, so a file made by an older SDK gains the outbox and epoch tables in
    place (and the outbox its event columns, with defaults that mean "a chat
    message").

    Remembers the newest `keep_msg_ids` message ids per account; older ones are
    pruned (a duplicate older than that many messages is not expected: the
    server never stores one message twice in a timeline). The outbox holds at
    most `max_outbox` messages per account (enforced by the client at submit).
    One file serves one process at a time per account.
    """

    _CHUNK = 500  # SQLite's default limit on host parameters is 999

    def __init__(
        self, path: str | Path, keep_msg_ids: int = 100_000, max_outbox: int = DEFAULT_MAX_OUTBOX
    ) -> None:
        if max_outbox < 1:
            raise ValueError("max_outbox must be at least 1")
        self.path = Path(path)
        self.keep_msg_ids = keep_msg_ids
        self.max_outbox = max_outbox
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._commits = 0

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imclient-sqlite")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=True)

    async def load_last_seq(self, account: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT last_seq FROM cursor WHERE account = ?", (account,)
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._with_conn(run)

    async def filter_seen(self, account: str, msg_ids: Sequence[int]) -> set[int]:
        ids = list(msg_ids)

        def run(conn: sqlite3.Connection) -> set[int]:
            found: set[int] = set()
            for i in range(0, len(ids), self._CHUNK):
                chunk = ids[i : i + self._CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT msg_id FROM seen WHERE account = ? AND msg_id IN ({marks})",
                    (account, *chunk),
                )
                found.update(int(r[0]) for r in rows)
            return found

        return await self._with_conn(run) if ids else set()

    async def commit(self, account: str, last_seq: int, handed: Sequence[tuple[int, int]]) -> None:
        rows = [(account, msg_id, seq) for msg_id, seq in handed]

        def run(conn: sqlite3.Connection) -> None:
            with conn:  # one transaction
                conn.executemany(
                    "INSERT OR IGNORE INTO seen (account, msg_id, seq) VALUES (?, ?, ?)", rows
                )
                conn.execute(
                    "INSERT INTO cursor (account, last_seq) VALUES (?, ?) "
                    "ON CONFLICT (account) DO UPDATE "
                    "SET last_seq = max(last_seq, excluded.last_seq)",
                    (account, last_seq),
                )
                self._commits += 1
                if self._commits % 100 == 0:
                    self._prune(conn, account)

        await self._with_conn(run)

    async def load_epoch(self, account: str) -> str:
        def run(conn: sqlite3.Connection) -> str:
            row = conn.execute(
                "SELECT epoch FROM cursor_epoch WHERE account = ?", (account,)
            ).fetchone()
            return str(row[0]) if row else ""

        return await self._with_conn(run)

    async def set_epoch(self, account: str, epoch: str, reset: bool) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with conn:  # one transaction
                if reset:
                    conn.execute("DELETE FROM seen WHERE account = ?", (account,))
                    conn.execute("DELETE FROM cursor WHERE account = ?", (account,))
                conn.execute(
                    "INSERT INTO cursor_epoch (account, epoch) VALUES (?, ?) "
                    "ON CONFLICT (account) DO UPDATE SET epoch = excluded.epoch",
                    (account, epoch),
                )

        await self._with_conn(run)

    async def outbox_add(self, account: str, entries: Sequence[OutboxEntry]) -> None:
        rows = [
            (
                account,
                e.client_msg_id,
                e.order,
                e.conversation_id,
                e.content_type,
                e.body,
                e.kind,
                e.target_conv_seq,
            )
            for e in entries
        ]

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany(
                    "INSERT INTO outbox (account, client_msg_id, ord, conversation_id, "
                    "content_type, body, kind, target_conv_seq) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (account, client_msg_id) DO NOTHING",
                    rows,
                )

        if rows:
            await self._with_conn(run)

    async def outbox_delete(self, account: str, client_msg_ids: Sequence[str]) -> None:
        rows = [(account, cmid) for cmid in client_msg_ids]

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany("DELETE FROM outbox WHERE account = ? AND client_msg_id = ?", rows)

        if rows:
            await self._with_conn(run)

    async def outbox_load(self, account: str) -> list[OutboxEntry]:
        def run(conn: sqlite3.Connection) -> list[OutboxEntry]:
            rows = conn.execute(
                "SELECT client_msg_id, conversation_id, content_type, body, ord, kind, "
                "target_conv_seq FROM outbox WHERE account = ? ORDER BY ord",
                (account,),
            )
            return [
                OutboxEntry(
                    str(r[0]), str(r[1]), int(r[2]), bytes(r[3]), int(r[4]), int(r[5]), int(r[6])
                )
                for r in rows
            ]

        return await self._with_conn(run)

    # -- internals ---------------------------------------------------------------

    def _prune(self, conn: sqlite3.Connection, account: str) -> None:
        row = conn.execute(
            "SELECT seq FROM seen WHERE account = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
            (account, self.keep_msg_ids),
        ).fetchone()
        if row is not None:
            conn.execute("DELETE FROM seen WHERE account = ? AND seq <= ?", (account, row[0]))

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            self._wal_sync(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            self._add_columns(conn)
        except BaseException:
            conn.close()
            raise
        # isolation_level=None is autocommit; `with conn:` needs a transaction.
        conn.isolation_level = "DEFERRED"
        self._conn = conn

    @staticmethod
    def _add_columns(conn: sqlite3.Connection) -> None:
        """Brings a file made by an older SDK up to the current tables."""
        for table, column, decl in _ADDED_COLUMNS:
            have = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                try:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                except sqlite3.OperationalError as exc:
                    # Another process of this file added it first.
                    if "duplicate column" not in str(exc):
                        raise

    @staticmethod
    def _wal_sync(conn: sqlite3.Connection) -> None:
        """Puts the file in WAL mode (a property of the file, kept across opens).
        Several processes may open one file at once (imctl's listen and chat):
        switching the mode needs an exclusive lock and SQLite answers "database is
        locked" at once, without waiting, while another connection reads. So the
        mode is only switched when it is not WAL yet, retrying for a while."""
        deadline = time.monotonic() + 5.0
        while True:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() == "wal":
                return
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _with_conn(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        def run() -> R:
            if self._conn is None:
                raise RuntimeError("SQLiteStore is not open")
            return fn(self._conn)

        return await self._run(run)

    async def _run(self, fn: Callable[[], R]) -> R:
        if self._executor is None:
            raise RuntimeError("SQLiteStore is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
