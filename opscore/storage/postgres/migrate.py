"""Numbered PostgreSQL migrations (migrations/000N_*.sql), applied at start.

The same discipline as SQLite's (opscore/storage/sqlite/migrate.py): migrations are applied
in order, each in its own transaction together with its row in
`schema_migrations`, so a crash or an error mid-upgrade leaves the database at the
previous version, never in between; a database from an older Ops-Core upgrades; a
database newer than this code is refused. Add a migration, never edit one that
has shipped (an edited one is logged: its checksum no longer matches).

Several replicas may start at once against one database. Every migration
transaction first takes a transaction-scoped advisory lock (MIGRATION_LOCK_KEY),
then reads the version: the runners queue on the lock, and whichever holds it
applies the next migration or finds nothing left to do. Each migration is applied
exactly once, by one of them; the others wait for it rather than fail.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from opscore.errors import ConfigError
from opscore.storage.migrations import Migration, shipped

log = logging.getLogger("opscore.storage.postgres")

# Client-side bound of the lock wait and of one migration's statements (the
# connection's command_timeout is meant for RPC statements, not for these).
MIGRATION_TIMEOUT = 24 * 3600.0

# pg_advisory_xact_lock key of the migration runners: b"opscmigr" as a big-endian
# int64, unlikely to collide with another application's keys in the same database.
MIGRATION_LOCK_KEY = int.from_bytes(b"opscmigr", "big")

_CREATE_HISTORY = """
CREATE TABLE schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,                  -- file name, e.g. 0002_dispatch.sql
    checksum   text NOT NULL,                  -- sha256 of the file as applied
    apply_time bigint NOT NULL                 -- microseconds since the epoch, UTC
)
"""


@dataclass(frozen=True, slots=True)
class Migrated:
    """What a run did: the version the database is at now, and what this run applied
    (empty when another runner, or an earlier start, had applied everything)."""

    version: int
    applied: tuple[str, ...]


class MigrationError(ConfigError):
    """The database cannot be brought to this code's schema; `opscore serve` exits."""


class SchemaTooNew(MigrationError):
    pass


def migrations() -> list[Migration]:
    """Numbered migrations shipped with the package, in order."""
    return shipped("opscore.storage.postgres", "PostgreSQL")


SCHEMA_VERSION = len(migrations())


async def schema_version(conn: asyncpg.Connection) -> int:
    """The version the database is at: 0 for one Ops-Core has never migrated."""
    if not await _history_exists(conn):
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))


async def migrate(
    conn: asyncpg.Connection,
    *,
    target: int | None = None,
    available: Sequence[Migration] | None = None,
) -> Migrated:
    """Bring the database up to `target` (default: the latest migration).

    `conn` must not be inside a transaction. `available` replaces the shipped
    migrations (tests). Raises SchemaTooNew for a database migrated by a newer
    Ops-Core, MigrationError when a migration fails (nothing of it is applied).
    """
    steps = list(migrations() if available is None else available)
    latest = steps[-1].version if steps else 0
    target = latest if target is None else target
    if not 0 <= target <= latest:
        raise ValueError(f"target version {target} is not in 0..{latest}")
    applied: list[str] = []
    while True:
        async with conn.transaction():
            # A migration may rebuild a large table: neither the lock wait nor the
            # migration itself is bounded by the connection's statement_timeout.
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY, timeout=MIGRATION_TIMEOUT
            )
            current = await _current(conn, steps, latest)
            if current >= target:
                return Migrated(current, tuple(applied))
            step = steps[current]
            log.info(
                "applying PostgreSQL migration",
                extra={"migration": step.name, "from_version": current},
            )
            try:
                async with conn.transaction():  # a savepoint: the error names the step
                    await conn.execute(step.sql, timeout=MIGRATION_TIMEOUT)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"PostgreSQL migration {step.name} failed: {exc}; nothing of it was "
                    f"applied and the database stays at schema version {current}"
                ) from exc
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum, apply_time) VALUES "
                "($1, $2, $3, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)",
                step.version,
                step.name,
                step.checksum,
            )
        applied.append(step.name)


async def _history_exists(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"))


async def _current(conn: asyncpg.Connection, steps: list[Migration], latest: int) -> int:
    """The applied version, checked against the code's migrations (under the lock)."""
    if not await _history_exists(conn):
        await conn.execute(_CREATE_HISTORY)
        return 0
    columns = {
        r["column_name"]
        for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'schema_migrations' AND table_schema = current_schema()"
        )
    }
    if not {"version", "name", "checksum"} <= columns:
        raise MigrationError(
            "this database has a schema_migrations table that is not Ops-Core's (another "
            "application uses it): give Ops-Core a database of its own"
        )
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")
    versions = [r["version"] for r in rows]
    if versions != list(range(1, len(rows) + 1)):
        raise MigrationError(
            f"schema_migrations lists versions {versions}, not 1..n: the database was "
            "changed by hand; restore it from a backup"
        )
    current = len(rows)
    if current > latest:
        raise SchemaTooNew(
            f"the PostgreSQL database is at schema version {current} "
            f"({rows[-1]['name']}), newer than this Ops-Core's {latest}: a newer Ops-Core "
            "has upgraded it. Run that version (or newer), not this one"
        )
    for row, step in zip(rows, steps, strict=False):
        if row["name"] != step.name or row["checksum"] != step.checksum:
            log.warning(
                "an applied PostgreSQL migration differs from the one shipped "
                "(edited after it was applied?); the schema may not be what this code expects",
                extra={"applied": row["name"], "shipped": step.name},
            )
    return current
