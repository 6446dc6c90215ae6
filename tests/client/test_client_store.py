"""Store implementations behave alike (one Protocol, two backends)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from imclient.store import MemoryStore, OutboxEntry, SQLiteStore, Store


@pytest.fixture(params=["memory", "sqlite"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., Store]]:
    made: list[Store] = []

    def make(keep: int = 1000) -> Store:
        s: Store
        if request.param == "memory":
            s = MemoryStore(keep_msg_ids=keep)
        else:
            s = SQLiteStore(tmp_path / "client.sqlite3", keep_msg_ids=keep)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


async def test_new_account_starts_at_zero(make_store: Callable[..., Store]) -> None:
    s = make_store()
    await s.open()
    assert isinstance(s, Store)
    assert await s.load_last_seq("alice/d1") == 0
    assert await s.filter_seen("alice/d1", [1, 2]) == set()


async def test_commit_records_cursor_and_ids_per_account(make_store: Callable[..., Store]) -> None:
    s = make_store()
    await s.open()
    await s.commit("alice/d1", 3, [(101, 1), (102, 2), (103, 3)])
    await s.commit("alice/d2", 1, [(101, 1)])
    assert await s.load_last_seq("alice/d1") == 3
    assert await s.load_last_seq("alice/d2") == 1
    assert await s.filter_seen("alice/d1", [101, 103, 999]) == {101, 103}
    assert await s.filter_seen("alice/d2", [102]) == set()


async def test_cursor_never_moves_back(make_store: Callable[..., Store]) -> None:
    s = make_store()
    await s.open()
    await s.commit("a/d", 10, [])
    await s.commit("a/d", 4, [(5, 4)])
    assert await s.load_last_seq("a/d") == 10
    assert await s.filter_seen("a/d", [5]) == {5}


async def test_epoch_is_recorded_and_a_reset_forgets_cursor_and_ids_only(
    make_store: Callable[..., Store],
) -> None:
    s = make_store()
    await s.open()
    assert await s.load_epoch("a/d") == ""  # nothing recorded yet
    await s.commit("a/d", 7, [(101, 6), (102, 7)])
    await s.commit("a/other", 3, [(101, 3)])
    await s.outbox_add("a/d", [OutboxEntry("cm-1", "d:a:b", 1, b"unsent", 0)])
    await s.set_epoch("a/d", "e1", reset=False)  # adopt: the cursor is kept
    assert (await s.load_epoch("a/d"), await s.load_last_seq("a/d")) == ("e1", 7)
    assert await s.filter_seen("a/d", [101, 102]) == {101, 102}

    await s.set_epoch("a/d", "e2", reset=True)
    assert await s.load_epoch("a/d") == "e2"
    assert await s.load_last_seq("a/d") == 0  # back to the start ...
    assert await s.filter_seen("a/d", [101, 102]) == set()  # ... and no id is "seen"
    assert [e.client_msg_id for e in await s.outbox_load("a/d")] == ["cm-1"]  # kept
    # Other accounts are untouched.
    assert await s.load_last_seq("a/other") == 3
    assert await s.filter_seen("a/other", [101]) == {101}
    assert await s.load_epoch("a/other") == ""
    await s.commit("a/d", 2, [(5, 2)])  # the new store's positions count from 0 again
    assert await s.load_last_seq("a/d") == 2


async def test_sqlite_store_keeps_the_epoch_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    first = SQLiteStore(path)
    await first.open()
    await first.set_epoch("bob/phone", "epoch-1", reset=False)
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        assert await second.load_epoch("bob/phone") == "epoch-1"
    finally:
        await second.close()


async def test_many_ids_are_looked_up_in_chunks(make_store: Callable[..., Store]) -> None:
    s = make_store(keep=5000)
    await s.open()
    await s.commit("a/d", 2000, [(i, i) for i in range(1, 2001)])
    got = await s.filter_seen("a/d", list(range(1500, 2600)))
    assert got == set(range(1500, 2001))


async def test_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.sqlite3"
    first = SQLiteStore(path)
    await first.open()
    await first.commit("bob/phone", 42, [(7, 42)])
    await first.close()
    await first.close()  # idempotent
    second = SQLiteStore(path)
    await second.open()
    try:
        assert await second.load_last_seq("bob/phone") == 42
        assert await second.filter_seen("bob/phone", [7, 8]) == {7}
    finally:
        await second.close()


async def test_sqlite_store_prunes_oldest_ids(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "p.sqlite3", keep_msg_ids=50)
    await s.open()
    try:
        for i in range(1, 201):  # pruning runs every 100 commits
            await s.commit("a/d", i, [(1000 + i, i)])
        seen = await s.filter_seen("a/d", [1000 + i for i in range(1, 201)])
        assert {1000 + i for i in range(151, 201)} <= seen
        assert 1001 not in seen
        assert await s.load_last_seq("a/d") == 200
    finally:
        await s.close()


async def test_memory_store_prunes_oldest_ids() -> None:
    s = MemoryStore(keep_msg_ids=3)
    await s.commit("a/d", 5, [(i, i) for i in range(1, 6)])
    assert await s.filter_seen("a/d", [1, 2, 3, 4, 5]) == {3, 4, 5}


async def test_closed_sqlite_store_refuses_use(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "c.sqlite3")
    with pytest.raises(RuntimeError):
        await s.load_last_seq("a/d")
