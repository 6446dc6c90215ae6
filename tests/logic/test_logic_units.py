"""Pure logic of logic: id rules, lock keys, seqsvc keys, settings checks, and the
Fanout page planner (no database: `_plan` decides, the repo writes)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from imcommon.config import ConfigError, load_settings
from imdev.servers import ROOT, PostgresServer
from logic import repo
from logic.config import Settings
from logic.errors import InvalidArgument
from logic.fanout import Fanout
from logic.faults import Faults
from logic.ids import (
    KIND_DIRECT,
    KIND_GROUP,
    check_client_msg_id,
    lock_key,
    parse_conversation_id,
)
from logic.model import StoredMessage


def test_conversation_ids() -> None:
    d = parse_conversation_id("d:alice:bob")
    assert (d.kind, d.pair, d.seq_key) == (KIND_DIRECT, ("alice", "bob"), "c:d:alice:bob")
    g = parse_conversation_id("g:abc")
    assert (g.kind, g.pair, g.seq_key) == (KIND_GROUP, (), "c:g:abc")
    for bad in [
        "",
        "d:",
        "d:a",
        "d:a:b:c",
        "d:b:a",
        "d:a:a",
        "g:",
        "g:a b",
        "x:y",
        "d:a:" + "b" * 65,
    ]:
        with pytest.raises(InvalidArgument):
            parse_conversation_id(bad)


def test_long_direct_ids_get_a_hashed_seq_key_within_seqsvc_limit() -> None:
    a, b = "a" * 64, "b" * 64
    conv = parse_conversation_id(f"d:{a}:{b}")
    assert conv.seq_key.startswith("c:#") and len(conv.seq_key.encode()) <= 128
    assert conv.seq_key == parse_conversation_id(f"d:{a}:{b}").seq_key
    assert conv.seq_key != parse_conversation_id(f"d:{a}:{'c' * 64}").seq_key


def test_client_msg_id_rule() -> None:
    assert check_client_msg_id("3f2a9c1e-8d4b-4b5e-9a7c-0123456789ab")
    for bad in ["", "a b", "x" * 129, "é"]:
        with pytest.raises(InvalidArgument):
            check_client_msg_id(bad)


def test_lock_keys_are_stable_int4() -> None:
    keys = {lock_key(f"user{i}") for i in range(10_000)}
    assert all(-(2**31) <= k < 2**31 for k in keys)
    assert len(keys) > 9_990  # collisions are possible, and only serialise
    # Fixed across processes and versions: other logic processes must agree.
    out = subprocess.run(
        [sys.executable, "-c", "from logic.ids import lock_key; print(lock_key('alice'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) == lock_key("alice")


def test_settings_checks() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(Settings, {}).require_dependencies()
    assert "IM_LOGIC_DATABASE_URL" in str(err.value) and "IM_LOGIC_NATS_URL" in str(err.value)
    with pytest.raises(ConfigError, match="IM_LOGIC_MAX_RESPONSE_BYTES"):
        load_settings(
            Settings, {"IM_LOGIC_MAX_BODY_BYTES": "65536", "IM_LOGIC_MAX_RESPONSE_BYTES": "65536"}
        )
    with pytest.raises(ConfigError, match="IM_LOGIC_TEST_FAULT_SKIP_DEDUP"):
        load_settings(Settings, {"IM_LOGIC_TEST_FAULT_SKIP_DEDUP": "maybe"})
    faults = Faults.from_settings(load_settings(Settings, {"IM_LOGIC_TEST_FAULT_SKIP_LOCKS": "1"}))
    assert faults == Faults(skip_locks=True)
    assert Faults.from_settings(load_settings(Settings, {})) == Faults()


def msg(msg_id: int, conv_seq: int, body: bytes = b"x") -> StoredMessage:
    return StoredMessage(msg_id, "g:t", conv_seq, "s", "d", f"c{msg_id}", 1, body, 0)


def by_id(recipients: dict[int, list[str]]) -> Callable[[StoredMessage], list[str]]:
    return lambda m: recipients[m.msg_id]


def planner(max_rows: int, max_response_bytes: int = 1 << 20) -> Fanout:
    return Fanout(
        db=Any,  # type: ignore[arg-type]
        seq=Any,  # type: ignore[arg-type]
        default_messages=100,
        max_messages=100,
        max_rows=max_rows,
        max_response_bytes=max_response_bytes,
        repair_after_s=5,
        faults=Faults(),
    )


def test_plan_splits_a_big_message_and_resumes_at_the_cursor() -> None:
    users = [f"u{i}" for i in range(5)]
    m1, m2 = msg(1, 10), msg(2, 20)
    recipients = {1: users, 2: users}
    f = planner(max_rows=3)
    page = f._plan([(m1, True), (m2, True)], by_id(recipients), watermark=0, cursor="")
    assert [(u, m.msg_id) for u, m in page.pairs] == [("u0", 1), ("u1", 1), ("u2", 1)]
    assert (page.watermark, page.cursor, page.stopped) == (0, "u2", True)
    page = f._plan([(m1, True), (m2, True)], by_id(recipients), page.watermark, page.cursor)
    assert [(u, m.msg_id) for u, m in page.pairs] == [("u3", 1), ("u4", 1), ("u0", 2)]
    assert (page.watermark, page.cursor, page.stopped) == (10, "u0", True)
    page = f._plan([(m2, True)], by_id(recipients), page.watermark, page.cursor)
    assert [u for u, _ in page.pairs] == ["u1", "u2", "u3"]
    page = f._plan([(m2, True)], by_id(recipients), page.watermark, page.cursor)
    assert [u for u, _ in page.pairs] == ["u4"]
    assert (page.watermark, page.cursor, page.stopped) == (20, "", False)


def test_plan_stops_at_a_message_boundary_and_on_bytes() -> None:
    recipients = {1: ["a", "b"], 2: ["a", "b"], 3: ["a", "b"]}
    f = planner(max_rows=4)
    page = f._plan(
        [(msg(1, 1), True), (msg(2, 2), True), (msg(3, 3), True)], by_id(recipients), 0, ""
    )
    assert (len(page.pairs), page.watermark, page.cursor, page.stopped) == (4, 2, "", True)
    # A message whose body the query did not load ends the page before it.
    page = f._plan([(msg(1, 1), True), (msg(2, 2), False)], by_id(recipients), 0, "")
    assert (len(page.pairs), page.watermark, page.stopped) == (2, 1, True)
    # The response budget: 3 KB bodies, 8 KiB budget -> two rows per page at most,
    # but never an empty page, whatever the body.
    big = planner(max_rows=100, max_response_bytes=8192 + 4096)
    page = big._plan([(msg(1, 1, b"x" * 3000), True)], by_id({1: ["a", "b", "c"]}), 0, "")
    assert [u for u, _ in page.pairs] == ["a", "b"] and page.cursor == "b"
    tiny = planner(max_rows=100, max_response_bytes=4096 + 10)
    page = tiny._plan([(msg(1, 1, b"x" * 3000), True)], by_id({1: ["a", "b"]}), 0, "")
    assert [u for u, _ in page.pairs] == ["a"]


def test_plan_skips_a_message_without_recipients() -> None:
    f = planner(max_rows=10)
    page = f._plan([(msg(1, 1), True), (msg(2, 2), True)], by_id({1: [], 2: ["a"]}), 0, "")
    assert [(u, m.msg_id) for u, m in page.pairs] == [("a", 2)]
    assert (page.watermark, page.stopped) == (2, False)


def test_migrate_command(pg_dsn: str) -> None:
    env = {"IM_LOGIC_DATABASE_URL": pg_dsn, "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "logic", "migrate"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "0001_init" in first.stdout
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "up to date" in again.stdout
    missing = subprocess.run(run, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert missing.returncode == 2 and "IM_LOGIC_DATABASE_URL" in missing.stderr


async def test_every_database_has_its_own_store_epoch(
    pg_dsn: str, postgres: PostgresServer
) -> None:
    """Made once by the migration, kept by later migrations; another database gets
    another one; `new-store-epoch` replaces it."""
    other = f"t_epoch_{uuid.uuid4().hex[:12]}"
    first, second = pg_dsn, postgres.create_database(other)
    try:
        for dsn in (first, second, first):
            await repo.migrate(dsn)
        one = await _epoch(first)
        assert len(one) >= 16 and await _epoch(first) == one != await _epoch(second)
    finally:
        with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
    env = {
        "IM_LOGIC_DATABASE_URL": first,
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("services", "libs", "gen")),
    }
    run = [sys.executable, "-m", "logic", "new-store-epoch"]
    done = await asyncio.to_thread(
        subprocess.run, run, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    new = await _epoch(first)
    assert new != one and done.stdout.strip() == f"store epoch: {one} -> {new}"


async def _epoch(dsn: str) -> str:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await repo.store_epoch(conn)


async def test_fanout_progress_settles_the_pending_mark(pg_dsn: str) -> None:
    """A Fanout that caught up with what it saw, while a newer send raised the
    mark, restarts the repair clock instead of leaving an overdue mark behind; one
    that caught up with the mark removes it."""
    await repo.migrate(pg_dsn)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO fanout_pending VALUES ('g:x', 5, 50, 2, now() - interval '1 hour')"
        )
        async with conn.transaction():
            await repo.save_fanout_progress_tx(
                conn, "g:x", 4, "", caught_up=True, repair_after_s=60
            )
        cur = await conn.execute(
            "SELECT attempts, repair_at > now() + interval '50 seconds' FROM fanout_pending"
        )
        assert await cur.fetchall() == [(0, True)]
        async with conn.transaction():
            await repo.save_fanout_progress_tx(
                conn, "g:x", 5, "", caught_up=True, repair_after_s=60
            )
        cur = await conn.execute("SELECT count(*) FROM fanout_pending")
        assert await cur.fetchone() == (0,)
        cur = await conn.execute("SELECT watermark FROM fanout_state WHERE conversation_id = 'g:x'")
        assert await cur.fetchone() == (5,)
