"""PostgreSQL side of seqsvc: section ceilings and the ownership lease (SQL only).

Every statement here runs in autocommit mode or in one explicit transaction, so a
method that returns has committed (with PostgreSQL's default synchronous_commit,
durably) and a method that raises may or may not have: the allocator never uses a
ceiling it has not seen returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psycopg

from imcommon.migrations import apply_migrations
from seqsvc.allocator import Boot, Busy, Grant

MIGRATIONS = Path(__file__).with_name("migrations")

T = TypeVar("T")


async def migrate(conninfo: str) -> list[str]:
    """Applies seqsvc's pending migrations; returns their names."""
    return await apply_migrations(conninfo, MIGRATIONS, "seqsvc")


class _Lane:
    """One lazily (re)connected autocommit connection. A failed or cancelled call
    drops the connection, so the next call starts from a clean one."""

    def __init__(self, conninfo: str, connect_timeout_s: float) -> None:
        self._conninfo = conninfo
        self._connect_timeout = max(1, round(connect_timeout_s))
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, connect_timeout=self._connect_timeout
                    )
                return await fn(self._conn)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                pass


class PgSectionStore:
    """`SectionStore` on PostgreSQL (tables of migrations/0001_sections.sql, lease
    columns of 0002_lease_boot.sql)."""

    def __init__(self, conninfo: str, timeout_s: float = 2.0) -> None:
        self._conninfo = conninfo
        self._timeout = timeout_s
        # Separate connections, so a lease renewal never queues behind a reservation.
        self._writes = _Lane(conninfo, timeout_s)
        self._lease = _Lane(conninfo, timeout_s)

    async def __aenter__(self) -> PgSectionStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connections. Idempotent."""
        await self._writes.close()
        await self._lease.close()

    async def acquire(
        self,
        owner: str,
        sections: int,
        step: int,
        lease_s: float,
        boot: Boot,
        takeover_from: str = "",
    ) -> Grant | Busy:
        async with (
            await psycopg.AsyncConnection.connect(
                self._conninfo, connect_timeout=max(1, round(self._timeout))
            ) as conn,
            conn.transaction(),
        ):
            await conn.execute(
                "INSERT INTO seqsvc_owner (singleton, sections) VALUES (true, %s) "
                "ON CONFLICT DO NOTHING",
                (sections,),
            )
            cur = await conn.execute(
                "SELECT sections, epoch, owner, nonce, listener, lease_until > now(), "
                "  CASE WHEN lease_until > now() "
                "    THEN extract(epoch FROM lease_until - now())::float8 ELSE 0 END, "
                "  extract(epoch FROM lease_until)::float8 "
                "FROM seqsvc_owner FOR UPDATE"
            )
            row = await cur.fetchone()
            assert row is not None
            stored, epoch, holder, nonce, listener, live, remaining, until = row
            proved_gone = bool(takeover_from) and holder == owner and nonce == takeover_from
            if live and nonce != boot.nonce and not proved_gone:
                return Busy(holder, float(remaining), nonce, listener, float(until))
            if stored != sections:
                # Re-hashing moves keys between sections: start every new section
                # above the highest old ceiling, which bounds every value given.
                cur = await conn.execute("SELECT coalesce(max(max_seq), 0) FROM seqsvc_sections")
                top_row = await cur.fetchone()
                top = int(top_row[0]) if top_row else 0
                await conn.execute("DELETE FROM seqsvc_sections")
                await conn.execute(
                    "INSERT INTO seqsvc_sections (section, max_seq) "
                    "SELECT g, %s FROM generate_series(0, %s - 1) AS g",
                    (top, sections),
                )
            else:
                await conn.execute(
                    "INSERT INTO seqsvc_sections (section, max_seq) "
                    "SELECT g, 0 FROM generate_series(0, %s - 1) AS g ON CONFLICT DO NOTHING",
                    (sections,),
                )
            new_epoch = int(epoch) + 1
            cur = await conn.execute(
                "UPDATE seqsvc_sections SET max_seq = max_seq + %s, epoch = %s "
                "RETURNING section, max_seq",
                (step, new_epoch),
            )
            rows = sorted(await cur.fetchall())
            if [r[0] for r in rows] != list(range(sections)):
                raise RuntimeError(
                    f"seqsvc_sections holds sections {rows[0][0] if rows else None}.."
                    f"{rows[-1][0] if rows else None} ({len(rows)} rows), expected 0.."
                    f"{sections - 1}; refusing to serve"
                )
            await conn.execute(
                "UPDATE seqsvc_owner SET sections = %s, epoch = %s, owner = %s, "
                "nonce = %s, listener = %s, lease_until = now() + make_interval(secs => %s)",
                (sections, new_epoch, owner, boot.nonce, boot.listener, lease_s),
            )
        ceilings = [int(r[1]) for r in rows]
        return Grant(new_epoch, [c - step for c in ceilings], ceilings)

    async def extend(self, epoch: int, amounts: Mapping[int, int]) -> dict[int, int]:
        sections = list(amounts)
        steps = [amounts[s] for s in sections]

        async def q(conn: psycopg.AsyncConnection[Any]) -> dict[int, int]:
            cur = await conn.execute(
                "UPDATE seqsvc_sections AS s SET max_seq = s.max_seq + d.amount "
                "FROM unnest(%s::int[], %s::bigint[]) AS d(section, amount) "
                "WHERE s.section = d.section AND s.epoch = %s "
                "RETURNING s.section, s.max_seq",
                (sections, steps, epoch),
            )
            return {int(s): int(m) for s, m in await cur.fetchall()}

        return await self._writes.run(q)

    async def renew(self, epoch: int, lease_s: float) -> bool:
        async def q(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "UPDATE seqsvc_owner SET lease_until = now() + make_interval(secs => %s) "
                "WHERE epoch = %s",
                (lease_s, epoch),
            )
            return cur.rowcount == 1

        return await self._lease.run(q)

    async def release(self, epoch: int) -> None:
        async def q(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                "UPDATE seqsvc_owner SET lease_until = now() WHERE epoch = %s", (epoch,)
            )

        await self._lease.run(q)

    async def ceilings(self) -> dict[int, int]:
        """Every section's persisted max_seq (for tools and tests)."""

        async def q(conn: psycopg.AsyncConnection[Any]) -> dict[int, int]:
            cur = await conn.execute("SELECT section, max_seq FROM seqsvc_sections")
            return {int(s): int(m) for s, m in await cur.fetchall()}

        return await self._writes.run(q)


class LeaseHeld(Exception):
    """A live seqsvc instance holds the lease: raising the floor under it would not
    reach the values it keeps in memory. Stop every instance first."""


async def raise_floor(conninfo: str, at_least: int, sections: int) -> tuple[int, int]:
    """Raises every section's max_seq to at least `at_least`, so that the next
    start hands out, for every key, only values above it (a start begins each key
    at its section's max_seq). For restores: the service's own store may be older
    than the values its callers stored (see docs/operations.md, "Backup and
    restore"). One transaction, after the migrations:

    - refuses (LeaseHeld) while a live instance holds the lease;
    - bumps the fencing epoch, so an instance whose lease ran out but which is
      still running can never renew it or raise a ceiling again: it is fenced and
      exits, and its successor starts above the floor;
    - creates the `sections` rows if the store is empty (a fresh database), and
      raises every row, whatever the section count, to `at_least`: the same floor
      for every key, so it holds for any key and any later section count.

    Returns (the highest max_seq before, the epoch now). Idempotent: a second call
    with the same value changes nothing but the epoch."""
    await migrate(conninfo)
    async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO seqsvc_owner (singleton, sections) VALUES (true, %s) "
            "ON CONFLICT DO NOTHING",
            (sections,),
        )
        cur = await conn.execute(
            "SELECT sections, epoch, owner, lease_until > now(), lease_until::text "
            "FROM seqsvc_owner FOR UPDATE"
        )
        row = await cur.fetchone()
        assert row is not None
        stored_sections, epoch, owner, live, until = row
        if live:
            raise LeaseHeld(
                f"seqsvc instance {owner!r} holds the lease until {until}: stop every "
                "seqsvc instance, then raise the floor (the lease is released on SIGTERM)"
            )
        cur = await conn.execute("SELECT coalesce(max(max_seq), 0) FROM seqsvc_sections")
        before_row = await cur.fetchone()
        before = int(before_row[0]) if before_row else 0
        new_epoch = int(epoch) + 1
        await conn.execute(
            "INSERT INTO seqsvc_sections (section, max_seq, epoch) "
            "SELECT g, %s, %s FROM generate_series(0, %s - 1) AS g ON CONFLICT DO NOTHING",
            (at_least, new_epoch, stored_sections),
        )
        await conn.execute(
            "UPDATE seqsvc_sections SET max_seq = greatest(max_seq, %s), epoch = %s",
            (at_least, new_epoch),
        )
        await conn.execute(
            "UPDATE seqsvc_owner SET epoch = %s, owner = '', nonce = '', listener = '', "
            "lease_until = '-infinity'",
            (new_epoch,),
        )
    return before, new_epoch
