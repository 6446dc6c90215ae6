"""The PostgreSQL connection pool and the translation of its failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from logic.config import Settings
from logic.errors import Unavailable

log = logging.getLogger(__name__)


class Database:
    """The pool, plus `errors()`: the one translation of database failures."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self._check: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turns "PostgreSQL is not reachable or gave up on us" (connection lost,
        restart, statement or lock timeout, deadlock, no free connection) into
        Unavailable: nothing was committed, retrying is safe. Other errors pass.

        After a connection failure the idle connections are checked in the
        background, so that after a PostgreSQL restart the dead ones are replaced
        at once instead of failing one request each."""
        try:
            yield
        except PoolTimeout as exc:
            raise Unavailable(f"database busy or unreachable: {exc}") from None
        except psycopg.OperationalError as exc:
            detail = str(exc).strip()[:200]
            log.warning("database operation failed", extra={"error": detail})
            self._check_idle_connections()
            raise Unavailable(f"database unavailable: {detail}") from None

    def _check_idle_connections(self) -> None:
        if self._check is None or self._check.done():
            self._check = asyncio.get_running_loop().create_task(self._run_check())

    async def _run_check(self) -> None:
        try:
            await self.pool.check()
        except Exception:
            log.debug("pool check failed", exc_info=True)


@contextlib.asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[Database]:
    """A pool of autocommit connections (transactions are always explicit, with
    `conn.transaction()`). Per-connection settings travel in the startup packet, so
    they cost no statement. Closing is idempotent."""
    pool = AsyncConnectionPool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_pool_timeout_s,
        open=False,
        name="logic",
        kwargs={
            "autocommit": True,
            "connect_timeout": settings.db_connect_timeout_s,
            "application_name": "logic",
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
        },
    )
    # Do not wait for min_size connections: logic keeps serving (UNAVAILABLE where it
    # needs the database) while PostgreSQL is briefly away.
    await pool.open(wait=False)
    db = Database(pool)
    try:
        yield db
    finally:
        if db._check is not None:
            db._check.cancel()
        await pool.close()
