"""Versioned SQL migrations: files `NNNN_name.sql` in a service's `migrations/`
folder, applied in order, each in its own transaction, recorded in
`schema_migrations`. Safe to run concurrently from several processes (a session
advisory lock serialises them) and at every service start (applied files are
skipped)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x1A_0001  # advisory lock id reserved for migrations


def migration_files(directory: Path) -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(directory.iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
        elif path.suffix == ".sql":
            raise ValueError(f"migration file {path.name} does not match NNNN_name.sql")
    versions = [v for v, _, _ in found]
    if len(versions) != len(set(versions)):
        raise ValueError(f"duplicate migration versions in {directory}")
    return found


async def apply_migrations(conninfo: str, directory: Path, component: str) -> list[str]:
    """Applies the pending migrations of `component`; returns the names applied."""
    files = migration_files(directory)  # refuse a bad folder before touching the database
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       component text NOT NULL,
                       version int NOT NULL,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now(),
                       PRIMARY KEY (component, version))"""
            )
            cur = await conn.execute(
                "SELECT version FROM schema_migrations WHERE component = %s", (component,)
            )
            done = {row[0] for row in await cur.fetchall()}
            for version, name, path in files:
                if version in done:
                    continue
                sql = path.read_text()
                async with conn.transaction():
                    await conn.execute(sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations (component, version, name) "
                        "VALUES (%s, %s, %s)",
                        (component, version, name),
                    )
                log.info("migration applied", extra={"component": component, "version": version})
                applied.append(f"{version:04d}_{name}")
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied
