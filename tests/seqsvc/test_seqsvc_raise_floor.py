"""`python -m seqsvc raise-floor --at-least N`: the restore step that puts every
key's next value above N (docs/operations.md, "Backup and restore")."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psycopg

from imdev.servers import ROOT, ServiceProcess
from seqsvc.client import SeqClient

Spawn = Callable[..., ServiceProcess]


def env(dsn: str, **settings: object) -> dict[str, str]:
    out = {"IM_SEQSVC_DATABASE_URL": dsn, "IM_SEQSVC_SECTIONS": "16"}
    out.update({f"IM_SEQSVC_{k.upper()}": str(v) for k, v in settings.items()})
    return out


def raise_floor(dsn: str, at_least: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seqsvc", "raise-floor", "--at-least", str(at_least)],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("services", "libs", "gen")),
            **env(dsn),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_raise_floor_on_an_empty_store_then_every_key_starts_above_it(
    pg_dsn: str, spawn: Spawn
) -> None:
    done = raise_floor(pg_dsn, 5_000_000)
    assert done.returncode == 0, done.stderr
    assert "max_seq is now >= 5000000" in done.stdout
    svc = spawn("seqsvc", env(pg_dsn))
    async with SeqClient(svc.address) as seq:
        values = await seq.next_batch([f"k{i}" for i in range(200)])
    assert min(values) > 5_000_000


async def test_raise_floor_is_refused_while_an_instance_is_live_and_fences_a_stale_one(
    pg_dsn: str, spawn: Spawn
) -> None:
    svc = spawn("seqsvc", env(pg_dsn, lease_s=2))
    async with SeqClient(svc.address) as seq:
        before = await seq.next("k")
    refused = raise_floor(pg_dsn, 10**9)
    assert refused.returncode == 1
    assert "holds the lease" in refused.stderr
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT max(max_seq) FROM seqsvc_sections").fetchone()[0] < 10**9  # type: ignore[index]
    # The instance stalls (SIGSTOP) until its lease runs out: the floor may be
    # raised now, and the fencing epoch moves, so when it wakes up it can neither
    # renew its lease nor raise a ceiling: it stops serving and exits.
    svc.signal(signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while (done := raise_floor(pg_dsn, 10**9)).returncode != 0:
        # Either its lease still runs, or it stopped in the middle of a
        # transaction whose locks PostgreSQL frees after the store's
        # idle-in-transaction timeout (4 s here).
        assert "holds the lease" in done.stderr or "holds a lock" in done.stderr, done.stderr
        assert time.monotonic() < deadline, "the stalled instance's lease did not run out"
        await asyncio.sleep(0.2)
    svc.signal(signal.SIGCONT)
    deadline = time.monotonic() + 15
    while svc.running():
        assert time.monotonic() < deadline, "the fenced instance did not exit"
        await asyncio.sleep(0.05)
    assert svc.proc is not None and svc.proc.returncode == 1
    again = spawn("seqsvc", env(pg_dsn, lease_s=2))
    async with SeqClient(again.address) as seq:
        assert await seq.next("k") > 10**9 > before


async def test_raise_floor_does_not_hang_on_a_session_holding_the_tables(pg_dsn: str) -> None:
    # An instance stopped in the middle of a transaction (SIGSTOP between two
    # statements) keeps its row locks until PostgreSQL ends its session: the
    # restore step must say so and exit, not wait for it forever.
    assert raise_floor(pg_dsn, 10).returncode == 0
    with psycopg.connect(pg_dsn) as holder:
        holder.execute("SELECT 1 FROM seqsvc_owner FOR UPDATE")
        started = time.monotonic()
        refused = raise_floor(pg_dsn, 10**9)
        assert time.monotonic() - started < 30
        assert refused.returncode == 1, refused.stderr
        assert "holds a lock" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT max(max_seq) FROM seqsvc_sections").fetchone()[0] < 10**9  # type: ignore[index]


async def test_a_stalled_transaction_of_the_store_ends_and_frees_its_locks(pg_dsn: str) -> None:
    # The store's own sessions carry idle_in_transaction_session_timeout, so a
    # stalled instance cannot hold the section rows (and every other instance's
    # claims and renewals) for longer than that.
    from seqsvc.repo import PgSectionStore, migrate

    await migrate(pg_dsn)
    async with PgSectionStore(pg_dsn, timeout_s=0.5) as store:

        async def stall(conn: psycopg.AsyncConnection[object]) -> None:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM seqsvc_owner FOR UPDATE")
                await asyncio.sleep(3)
                await conn.execute("SELECT 1")

        try:
            await store._writes.run(stall)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            failure: BaseException | None = exc
        else:
            failure = None
    assert failure is not None, "the session outlived its idle-in-transaction timeout"
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET lock_timeout = '1s'")
        conn.execute("SELECT 1 FROM seqsvc_owner FOR UPDATE")
