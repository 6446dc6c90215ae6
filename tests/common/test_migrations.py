"""imcommon.migrations: ordered, recorded, idempotent, safe when run concurrently."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from imcommon.migrations import apply_migrations


async def test_apply_in_order_once_and_concurrently(pg_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "0001_create.sql").write_text("CREATE TABLE t (x int);")
    (tmp_path / "0002_fill.sql").write_text("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
    results = await asyncio.gather(*(apply_migrations(pg_dsn, tmp_path, "demo") for _ in range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, 2]
    assert await apply_migrations(pg_dsn, tmp_path, "demo") == []
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM t")
        assert await cur.fetchone() == (2,)


async def test_failed_migration_rolls_back(pg_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE b (x int); SELECT nope;")
    with pytest.raises(psycopg.Error):
        await apply_migrations(pg_dsn, tmp_path, "demo")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute("SELECT to_regclass('b') IS NULL, to_regclass('a') IS NOT NULL")
        assert await cur.fetchone() == (True, True)


def test_misnamed_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "create.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="NNNN_name"):
        asyncio.run(apply_migrations("host=127.0.0.1 port=1", tmp_path, "demo"))
