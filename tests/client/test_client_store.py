"""Store implementations behave alike (one Protocol, two backends)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from imclient.store import MemoryStore, SQLiteStore, Store


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
