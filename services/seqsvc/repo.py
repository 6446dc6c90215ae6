"""PostgreSQL side of seqsvc: section ceilings, per-section leases, the registry of
live instances and the routing version (SQL only).

Every statement here runs in autocommit mode or in one explicit transaction, so a
method that returns has committed (with PostgreSQL's default synchronous_commit,
durably; with a synchronous standby, on it too: a commit whose wait for the
standby was cancelled raises) and a method that raises may or may not have: the
allocator never uses a ceiling it has not seen returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psycopg

from imcommon.migrations import apply_migrations
from imcommon.syncrep import commits_confirmed
from seqsvc.allocator import Boot, Busy, Claimed, Fenced, Registered, Renewed, Routing, Status

MIGRATIONS = Path(__file__).with_name("migrations")

#: seqsvc_owner.owner while instances with per-section leases run: the row's lease
#: is then held far ahead, so a seqsvc of the version before (one lease for every
#: section) started by mistake waits as a standby instead of taking every section.
LEGACY_MARK = "(per-section leases: see seqsvc_instances)"

T = TypeVar("T")


async def migrate(conninfo: str) -> list[str]:
    """Applies seqsvc's pending migrations; returns their names."""
    return await apply_migrations(conninfo, MIGRATIONS, "seqsvc")


def idle_in_transaction_ms(timeout_s: float) -> int:
    """How long PostgreSQL keeps one of seqsvc's sessions that stopped in the middle
    of a transaction (a process stalled by SIGSTOP, a VM pause, a lost network)
    before it ends the session and frees its row locks. Without it such a session
    holds the section rows, and with them every other instance's claims and
    renewals and `raise-floor`, for as long as the process stays stalled. Between
    two statements of one transaction seqsvc does no work, so twice one call's
    timeout is generous."""
    return max(1000, round(2000 * timeout_s))


async def _session_limits(
    conn: psycopg.AsyncConnection[Any], timeout_s: float, local: bool
) -> None:
    await conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', %s, %s)",
        (str(idle_in_transaction_ms(timeout_s)), local),
    )


class _Lane:
    """One lazily (re)connected autocommit connection. A failed or cancelled call
    drops the connection, so the next call starts from a clean one."""

    def __init__(self, conninfo: str, timeout_s: float) -> None:
        self._conninfo = conninfo
        self._timeout = timeout_s
        self._connect_timeout = max(1, round(timeout_s))
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, connect_timeout=self._connect_timeout
                    )
                    await _session_limits(self._conn, self._timeout, local=False)
                # A ceiling is used only once the standby has it (I6 across a
                # failover): a commit whose standby wait was cancelled raises.
                with commits_confirmed(self._conn):
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
    """`SectionStore` on PostgreSQL (tables of migrations/0001_sections.sql, the
    per-section leases, registry and routing version of 0003_section_leases.sql).
    Every lease time is the database's clock (`now()`), never the caller's."""

    def __init__(self, conninfo: str, timeout_s: float = 2.0) -> None:
        self._conninfo = conninfo
        self._timeout = timeout_s
        # Separate connections, so a lease renewal never queues behind a reservation
        # or a balancing read.
        self._writes = _Lane(conninfo, timeout_s)
        self._lease = _Lane(conninfo, timeout_s)
        self._routing = _Lane(conninfo, timeout_s)

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
        await self._routing.close()

    async def register(
        self,
        instance: str,
        address: str,
        sections: int,
        lease_s: float,
        boot: Boot,
        takeover_from: str = "",
    ) -> Registered | Busy:
        async with (
            await psycopg.AsyncConnection.connect(
                self._conninfo, connect_timeout=max(1, round(self._timeout))
            ) as conn,
            conn.transaction(),
        ):
            await _session_limits(conn, self._timeout, local=True)
            await conn.execute(
                "INSERT INTO seqsvc_owner (singleton, sections) VALUES (true, %s) "
                "ON CONFLICT DO NOTHING",
                (sections,),
            )
            cur = await conn.execute(
                "SELECT sections, owner, lease_until > now(), "
                "  CASE WHEN lease_until > now() "
                "    THEN extract(epoch FROM lease_until - now())::float8 ELSE 0 END "
                "FROM seqsvc_owner FOR UPDATE"
            )
            row = await cur.fetchone()
            assert row is not None
            stored, legacy_owner, legacy_live, legacy_remaining = row
            if legacy_live and legacy_owner != LEGACY_MARK:
                # An instance of the version before per-section leases holds every
                # section: wait for it to stop (a rolling upgrade).
                return Busy(
                    f"a seqsvc of an older version ({legacy_owner}) holds every section",
                    float(legacy_remaining),
                )
            cur = await conn.execute(
                "SELECT nonce, listener, lease_until > now(), "
                "  CASE WHEN lease_until > now() "
                "    THEN extract(epoch FROM lease_until - now())::float8 ELSE 0 END, "
                "  extract(epoch FROM lease_until)::float8 "
                "FROM seqsvc_instances WHERE instance = %s FOR UPDATE",
                (instance,),
            )
            mine = await cur.fetchone()
            if mine is not None:
                nonce, listener, live, remaining, until = mine
                proved_gone = bool(takeover_from) and nonce == takeover_from
                if live and nonce != boot.nonce and not proved_gone:
                    return Busy(instance, float(remaining), nonce, listener, float(until))
                if proved_gone:
                    # It no longer listens, so it no longer serves: its leases end now.
                    await conn.execute(
                        "UPDATE seqsvc_sections SET owner = '', lease_until = '-infinity' "
                        "WHERE owner = %s",
                        (instance,),
                    )
            if stored != sections:
                cur = await conn.execute(
                    "SELECT (SELECT count(*) FROM seqsvc_instances "
                    "        WHERE lease_until > now() AND instance <> %s), "
                    "       (SELECT count(*) FROM seqsvc_sections "
                    "        WHERE lease_until > now() AND owner <> %s)",
                    (instance, instance),
                )
                others = await cur.fetchone()
                assert others is not None
                if others[0] or others[1]:
                    return Busy(
                        f"instances with IM_SEQSVC_SECTIONS={stored} are live; this one has "
                        f"{sections}: stop them all to change the section count",
                        self._timeout,
                    )
                # Re-hashing moves keys between sections: start every new section
                # above the highest old ceiling, which bounds every value given, and
                # above every old epoch, which fences every old owner.
                cur = await conn.execute(
                    "SELECT coalesce(max(max_seq), 0), coalesce(max(epoch), 0) FROM seqsvc_sections"
                )
                top_row = await cur.fetchone()
                top, top_epoch = (int(top_row[0]), int(top_row[1])) if top_row else (0, 0)
                await conn.execute("DELETE FROM seqsvc_sections")
                await conn.execute(
                    "INSERT INTO seqsvc_sections (section, max_seq, epoch) "
                    "SELECT g, %s, %s FROM generate_series(0, %s - 1) AS g",
                    (top, top_epoch + 1, sections),
                )
            else:
                await conn.execute(
                    "INSERT INTO seqsvc_sections (section, max_seq) "
                    "SELECT g, 0 FROM generate_series(0, %s - 1) AS g ON CONFLICT DO NOTHING",
                    (sections,),
                )
            cur = await conn.execute("SELECT count(*) FROM seqsvc_sections")
            count_row = await cur.fetchone()
            if count_row is None or int(count_row[0]) != sections:
                raise RuntimeError(
                    f"seqsvc_sections holds {count_row[0] if count_row else 0} rows, expected "
                    f"{sections}; refusing to serve"
                )
            await conn.execute(
                "INSERT INTO seqsvc_instances (instance, address, nonce, listener, lease_until) "
                "VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (instance) DO UPDATE SET address = EXCLUDED.address, "
                "  nonce = EXCLUDED.nonce, listener = EXCLUDED.listener, "
                "  lease_until = EXCLUDED.lease_until",
                (instance, address, boot.nonce, boot.listener, lease_s),
            )
            # Forget instances gone for a day, and keep an older seqsvc (one lease
            # for every section) from ever taking over: it waits as a standby.
            await conn.execute(
                "DELETE FROM seqsvc_instances WHERE lease_until < now() - interval '1 day'"
            )
            cur = await conn.execute(
                "UPDATE seqsvc_owner SET sections = %s, owner = %s, nonce = '', listener = '', "
                "lease_until = now() + interval '100 years', version = version + 1 "
                "RETURNING version",
                (sections, LEGACY_MARK),
            )
            version_row = await cur.fetchone()
        return Registered(int(version_row[0]) if version_row else 0)

    async def claim(
        self, instance: str, boot: Boot, sections: Sequence[int], step: int, lease_s: float
    ) -> list[Claimed]:
        async def q(conn: psycopg.AsyncConnection[Any]) -> list[Claimed]:
            async with conn.transaction():
                cur = await conn.execute(
                    "UPDATE seqsvc_instances SET lease_until = now() + make_interval(secs => %s) "
                    "WHERE instance = %s AND nonce = %s",
                    (lease_s, instance, boot.nonce),
                )
                if cur.rowcount != 1:
                    raise Fenced("this instance's registration belongs to another process")
                cur = await conn.execute(
                    "UPDATE seqsvc_sections SET max_seq = max_seq + %s, epoch = epoch + 1, "
                    "  owner = %s, lease_until = now() + make_interval(secs => %s) "
                    "WHERE section = ANY(%s) AND (owner = '' OR lease_until <= now()) "
                    "RETURNING section, epoch, max_seq",
                    (step, instance, lease_s, list(sections)),
                )
                rows = await cur.fetchall()
                if rows:
                    await conn.execute("UPDATE seqsvc_owner SET version = version + 1")
            return [Claimed(int(s), int(e), int(m) - step, int(m)) for s, e, m in rows]

        return await self._routing.run(q)

    async def renew(
        self, instance: str, address: str, boot: Boot, epochs: Mapping[int, int], lease_s: float
    ) -> Renewed:
        sections = list(epochs)
        eps = [epochs[s] for s in sections]

        async def q(conn: psycopg.AsyncConnection[Any]) -> Renewed:
            async with conn.transaction():
                # Re-registers an instance whose row was removed (raise-floor, or gone
                # for a day), but never one registered by another start.
                cur = await conn.execute(
                    "INSERT INTO seqsvc_instances (instance, address, nonce, listener, "
                    "  lease_until) VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s)) "
                    "ON CONFLICT (instance) DO UPDATE SET lease_until = EXCLUDED.lease_until, "
                    "  address = EXCLUDED.address WHERE seqsvc_instances.nonce = EXCLUDED.nonce",
                    (instance, address, boot.nonce, boot.listener, lease_s),
                )
                if cur.rowcount != 1:
                    return Renewed(False)
                if not sections:
                    return Renewed(True)
                cur = await conn.execute(
                    "UPDATE seqsvc_sections AS s "
                    "SET lease_until = now() + make_interval(secs => %s) "
                    "FROM unnest(%s::int[], %s::bigint[]) AS d(section, epoch) "
                    "WHERE s.section = d.section AND s.epoch = d.epoch AND s.owner = %s "
                    "RETURNING s.section",
                    (lease_s, sections, eps, instance),
                )
                return Renewed(True, frozenset(int(r[0]) for r in await cur.fetchall()))

        return await self._lease.run(q)

    async def release(
        self, instance: str, boot: Boot, epochs: Mapping[int, int], leave: bool
    ) -> None:
        sections = list(epochs)
        eps = [epochs[s] for s in sections]

        async def q(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE seqsvc_sections AS s SET owner = '', lease_until = '-infinity' "
                    "FROM unnest(%s::int[], %s::bigint[]) AS d(section, epoch) "
                    "WHERE s.section = d.section AND s.epoch = d.epoch AND s.owner = %s",
                    (sections, eps, instance),
                )
                if leave:
                    cur = await conn.execute(
                        "DELETE FROM seqsvc_instances WHERE instance = %s AND nonce = %s",
                        (instance, boot.nonce),
                    )
                    if cur.rowcount == 1:
                        # Also any section claimed by a call whose answer was lost:
                        # this start holds the id, so every lease under it is ours.
                        await conn.execute(
                            "UPDATE seqsvc_sections SET owner = '', lease_until = '-infinity' "
                            "WHERE owner = %s",
                            (instance,),
                        )
                await conn.execute("UPDATE seqsvc_owner SET version = version + 1")

        await self._lease.run(q)

    async def extend(self, epochs: Mapping[int, int], amounts: Mapping[int, int]) -> dict[int, int]:
        sections = list(amounts)
        steps = [amounts[s] for s in sections]
        eps = [epochs[s] for s in sections]

        async def q(conn: psycopg.AsyncConnection[Any]) -> dict[int, int]:
            cur = await conn.execute(
                "UPDATE seqsvc_sections AS s SET max_seq = s.max_seq + d.amount "
                "FROM unnest(%s::int[], %s::bigint[], %s::bigint[]) AS d(section, amount, epoch) "
                "WHERE s.section = d.section AND s.epoch = d.epoch "
                "RETURNING s.section, s.max_seq",
                (sections, steps, eps),
            )
            return {int(s): int(m) for s, m in await cur.fetchall()}

        return await self._writes.run(q)

    async def status(self) -> Status:
        async def q(conn: psycopg.AsyncConnection[Any]) -> Status:
            cur = await conn.execute(
                "SELECT version, "
                "  (SELECT count(*) FROM seqsvc_instances WHERE lease_until > now()), "
                "  ARRAY(SELECT section FROM seqsvc_sections "
                "        WHERE owner = '' OR lease_until <= now() ORDER BY section) "
                "FROM seqsvc_owner"
            )
            row = await cur.fetchone()
            if row is None:
                return Status(0, 0, [])
            return Status(int(row[0]), int(row[1]), [int(s) for s in row[2]])

        return await self._routing.run(q)

    async def routing(self) -> Routing:
        async def q(conn: psycopg.AsyncConnection[Any]) -> Routing:
            async with conn.transaction():
                cur = await conn.execute("SELECT version, sections FROM seqsvc_owner")
                head = await cur.fetchone()
                version, sections = (int(head[0]), int(head[1])) if head else (0, 0)
                cur = await conn.execute(
                    "SELECT instance, address FROM seqsvc_instances "
                    "WHERE lease_until > now() ORDER BY instance"
                )
                instances = [(str(i), str(a)) for i, a in await cur.fetchall()]
                index = {iid: n for n, (iid, _) in enumerate(instances)}
                cur = await conn.execute(
                    "SELECT section, owner FROM seqsvc_sections "
                    "WHERE owner <> '' AND lease_until > now()"
                )
                owner = [-1] * sections
                for s, o in await cur.fetchall():
                    if 0 <= int(s) < sections:
                        owner[int(s)] = index.get(str(o), -1)
            return Routing(version, sections, instances, owner)

        return await self._routing.run(q)

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

    - refuses (LeaseHeld) while a live instance is registered or holds a lease
      (or an older seqsvc holds its single lease);
    - bumps every section's fencing epoch and ends every lease, so an instance
      whose lease ran out but which is still running can never renew it or raise a
      ceiling again; and retires every registration, so such an instance, when it
      wakes up, is fenced and exits, and its successor starts above the floor;
    - creates the `sections` rows if the store is empty (a fresh database), and
      raises every row, whatever the section count, to `at_least`: the same floor
      for every key, so it holds for any key and any later section count.

    Returns (the highest max_seq before, the highest epoch now). Idempotent: a
    second call with the same value changes nothing but the epochs."""
    await migrate(conninfo)
    try:
        return await _raise_floor(conninfo, at_least, sections)
    except psycopg.errors.LockNotAvailable:
        raise LeaseHeld(
            f"a session holds a lock on seqsvc's tables for more than {RAISE_FLOOR_LOCK_WAIT}"
            " (an instance stalled in a transaction, which PostgreSQL ends after its "
            "idle-in-transaction timeout, or another raise-floor): retry in a few seconds"
        ) from None


#: How long `raise-floor` waits for a lock before it gives up (a clear refusal, not
#: a hang behind a stalled session).
RAISE_FLOOR_LOCK_WAIT = "5s"


async def _raise_floor(conninfo: str, at_least: int, sections: int) -> tuple[int, int]:
    async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
        await conn.execute("SELECT set_config('lock_timeout', %s, true)", (RAISE_FLOOR_LOCK_WAIT,))
        await conn.execute(
            "INSERT INTO seqsvc_owner (singleton, sections) VALUES (true, %s) "
            "ON CONFLICT DO NOTHING",
            (sections,),
        )
        cur = await conn.execute(
            "SELECT sections, owner, lease_until > now(), lease_until::text "
            "FROM seqsvc_owner FOR UPDATE"
        )
        row = await cur.fetchone()
        assert row is not None
        stored_sections, owner, live, until = row
        if live and owner != LEGACY_MARK:
            raise LeaseHeld(
                f"seqsvc instance {owner!r} holds the lease until {until}: stop every "
                "seqsvc instance, then raise the floor (the lease is released on SIGTERM)"
            )
        await conn.execute("LOCK TABLE seqsvc_instances, seqsvc_sections IN EXCLUSIVE MODE")
        cur = await conn.execute(
            "SELECT instance, lease_until::text FROM seqsvc_instances WHERE lease_until > now() "
            "UNION ALL SELECT owner, max(lease_until)::text FROM seqsvc_sections "
            "WHERE lease_until > now() GROUP BY owner LIMIT 1"
        )
        holder = await cur.fetchone()
        if holder is not None:
            raise LeaseHeld(
                f"seqsvc instance {holder[0]!r} holds the lease until {holder[1]}: stop every "
                "seqsvc instance, then raise the floor (the lease is released on SIGTERM)"
            )
        cur = await conn.execute(
            "SELECT coalesce(max(max_seq), 0), coalesce(max(epoch), 0) FROM seqsvc_sections"
        )
        before_row = await cur.fetchone()
        before, top_epoch = (int(before_row[0]), int(before_row[1])) if before_row else (0, 0)
        new_epoch = top_epoch + 1
        await conn.execute(
            "INSERT INTO seqsvc_sections (section, max_seq, epoch) "
            "SELECT g, %s, %s FROM generate_series(0, %s - 1) AS g ON CONFLICT DO NOTHING",
            (at_least, new_epoch, stored_sections),
        )
        await conn.execute(
            "UPDATE seqsvc_sections SET max_seq = greatest(max_seq, %s), epoch = %s, "
            "owner = '', lease_until = '-infinity'",
            (at_least, new_epoch),
        )
        await conn.execute("UPDATE seqsvc_instances SET nonce = '(retired by raise-floor)'")
        await conn.execute(
            "UPDATE seqsvc_owner SET epoch = %s, owner = '', nonce = '', listener = '', "
            "lease_until = '-infinity', version = version + 1",
            (new_epoch,),
        )
    return before, new_epoch
