"""The outbox part of the `Store` protocol: both backends behave alike, and the
SQLite one survives reopening (a process restart) and an old file without the
table."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from imclient.store import DEFAULT_MAX_OUTBOX, MemoryStore, OutboxEntry, SQLiteStore, Store


@pytest.fixture(params=["memory", "sqlite"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., Store]]:
    made: list[Store] = []

    def make() -> Store:
        path = tmp_path / "client.sqlite3"
        s: Store = MemoryStore() if request.param == "memory" else SQLiteStore(path)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


def entry(i: int, conv: str = "d:a:b") -> OutboxEntry:
    return OutboxEntry(f"cmid-{i}", conv, 1, f"body-{i}".encode(), i)


async def test_outbox_lists_in_submission_order_per_account(
    make_store: Callable[..., Store],
) -> None:
    s = make_store()
    await s.open()
    assert s.max_outbox == DEFAULT_MAX_OUTBOX
    assert await s.outbox_load("a/d1") == []
    # Added in two batches; ids are not in order by name (cmid-10 < cmid-2).
    await s.outbox_add("a/d1", [entry(2), entry(3)])
    await s.outbox_add("a/d1", [entry(10), entry(11)])
    await s.outbox_add("a/d2", [entry(1)])
    assert [e.client_msg_id for e in await s.outbox_load("a/d1")] == [
        "cmid-2",
        "cmid-3",
        "cmid-10",
        "cmid-11",
    ]
    assert await s.outbox_load("a/d2") == [entry(1)]
    loaded = (await s.outbox_load("a/d1"))[0]
    assert loaded == entry(2) and isinstance(loaded.body, bytes)


async def test_outbox_delete_and_repeat_add_are_harmless(make_store: Callable[..., Store]) -> None:
    s = make_store()
    await s.open()
    await s.outbox_add("a/d1", [entry(1), entry(2), entry(3)])
    # A repeat of a pending id keeps the original (its order and body).
    await s.outbox_add("a/d1", [OutboxEntry("cmid-1", "d:a:b", 1, b"other", 99)])
    await s.outbox_delete("a/d1", ["cmid-2", "unknown"])
    await s.outbox_delete("a/d2", ["cmid-1"])  # another account: untouched
    assert await s.outbox_load("a/d1") == [entry(1), entry(3)]
    await s.outbox_delete("a/d1", [])
    await s.outbox_add("a/d1", [])
    assert len(await s.outbox_load("a/d1")) == 2


async def test_sqlite_outbox_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    s = SQLiteStore(path)
    await s.open()
    await s.outbox_add("a/d1", [entry(i) for i in range(5)])
    await s.outbox_delete("a/d1", ["cmid-0"])
    await s.close()
    await s.close()  # idempotent
    s2 = SQLiteStore(path, max_outbox=7)
    await s2.open()
    try:
        assert s2.max_outbox == 7
        assert await s2.outbox_load("a/d1") == [entry(i) for i in range(1, 5)]
    finally:
        await s2.close()


async def test_sqlite_adds_the_outbox_to_a_file_of_an_older_sdk(tmp_path: Path) -> None:
    """A store file written before the outbox existed opens, keeps its cursor,
    and gains the table."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE cursor (account TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);"
        "CREATE TABLE seen (account TEXT NOT NULL, msg_id INTEGER NOT NULL,"
        " seq INTEGER NOT NULL, PRIMARY KEY (account, msg_id)) WITHOUT ROWID;"
        "INSERT INTO cursor VALUES ('a/d1', 42);"
    )
    conn.commit()
    conn.close()
    s = SQLiteStore(path)
    await s.open()
    try:
        assert await s.load_last_seq("a/d1") == 42
        await s.outbox_add("a/d1", [entry(1)])
        assert await s.outbox_load("a/d1") == [entry(1)]
    finally:
        await s.close()


def test_max_outbox_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_outbox"):
        MemoryStore(max_outbox=0)
    with pytest.raises(ValueError, match="max_outbox"):
        SQLiteStore(tmp_path / "x.sqlite3", max_outbox=0)
