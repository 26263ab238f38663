"""Moving a deployment from its SQLite file to PostgreSQL: every row, once.

The copy is a maintenance step with every server stopped: it holds the SQLite
file's server lock for its whole run (so no server can write to the file
meanwhile), and refuses a PostgreSQL database that holds any data or that a
live replica serves. Everything is written in one PostgreSQL transaction and
counted on both sides before it commits, so an interrupted or failed copy
leaves the target as empty as it found it and can simply be run again.

Both schemas store the same values in the same units (times and durations as
microseconds, enums as numbers, payloads as serialized protobuf); only a few
column types differ (SQLite's 0/1 flags and JSON text become boolean, text[]
and jsonb), and PostgreSQL's `seq` columns take SQLite's rowid, which is what
orders "newest first" listings and their page cursors on both.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from opscore.errors import ConfigError
from opscore.storage import is_postgres, sqlite_path
from opscore.storage.postgres import migrate as pg_migrate
from opscore.storage.postgres.pool import PgSettings, connect
from opscore.storage.sqlite.lock import DatabaseLock
from opscore.storage.sqlite.migrate import SCHEMA_VERSION, apply_migrations

log = logging.getLogger("opscore.storage.copy")

# Every table that holds a deployment's data, in both schemas. PostgreSQL's own
# (replicas, agent_streams) describe running replicas and start empty.
TABLES = (
    "agents",
    "agent_transitions",
    "tasks",
    "task_attempts",
    "workflow_definitions",
    "sessions",
    "session_definitions",
    "session_task_runs",
    "session_events",
)
# Tables whose PostgreSQL `seq` column is SQLite's insertion order (rowid).
_SEQ_TABLES = frozenset({"tasks", "sessions"})
# Columns only PostgreSQL has, filled by their defaults.
_PG_ONLY = frozenset({"seq", "version"})

CHUNK_ROWS = 2000


@dataclass(frozen=True, slots=True)
class CopyResult:
    rows: dict[str, int]
    source_upgraded_from: int | None  # the SQLite schema version before the copy migrated it


def _source_file(source: str) -> Path:
    path = Path(sqlite_path(source))
    if not path.is_file():
        raise ConfigError(f"no SQLite database at {path}")
    return path


async def copy_sqlite_to_postgres(
    source: str,
    target: str,
    *,
    progress: Callable[[str, int], None] | None = None,
) -> CopyResult:
    """Copy every row of the SQLite file `source` into the empty PostgreSQL
    database `target` (migrating both to this version's schema first).
    Raises ConfigError with the reason when it cannot."""
    if is_postgres(source):
        raise ConfigError("the source must be an SQLite file; the target a PostgreSQL URL")
    if not is_postgres(target):
        raise ConfigError(
            f"the target must be a PostgreSQL URL (postgresql://user@host:5432/db), not {target!r}"
        )
    path = _source_file(source)
    settings = PgSettings.from_url(target)
    lock = DatabaseLock(str(path))
    lock.acquire()  # refuses while a server owns the file
    try:
        # The target first: an unreachable database must not leave the file upgraded.
        conn = await connect(settings)
        try:
            await pg_migrate.migrate(conn)
            src = sqlite3.connect(str(path), isolation_level=None)
            try:
                before = src.execute("PRAGMA user_version").fetchone()[0]
                try:
                    apply_migrations(src)
                except RuntimeError as exc:  # a newer Ops-Core's file
                    raise ConfigError(str(exc)) from None
                rows = await _copy(src, conn, settings, progress)
            finally:
                src.close()
        finally:
            await conn.close()
    finally:
        lock.release()
    upgraded = before if before != SCHEMA_VERSION else None
    return CopyResult(rows=rows, source_upgraded_from=upgraded)


async def _copy(
    src: sqlite3.Connection,
    conn: asyncpg.Connection,
    settings: PgSettings,
    progress: Callable[[str, int], None] | None,
) -> dict[str, int]:
    counts: dict[str, int] = {}
    # One snapshot of the source for the whole copy (nothing else can write to
    # it: the lock is held), one transaction on the target.
    src.execute("BEGIN")
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = 0")
            await _check_target(conn, settings)
            for table in TABLES:
                counts[table] = await _copy_table(src, conn, table, progress)
            for table in _SEQ_TABLES:
                # Later inserts continue after the copied rows.
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'), "
                    f"GREATEST((SELECT max(seq) FROM {table}), 1), "
                    f"(SELECT max(seq) FROM {table}) IS NOT NULL)"
                )
            for table, n in counts.items():
                copied = await conn.fetchval(f"SELECT count(*) FROM {table}")
                if copied != n:  # pragma: no cover - would be a bug of this module
                    raise ConfigError(
                        f"copied {copied} rows of {table} but the source has {n}; "
                        "nothing was committed"
                    )
    finally:
        src.execute("ROLLBACK")
    return counts


async def _check_target(conn: asyncpg.Connection, settings: PgSettings) -> None:
    live = await conn.fetchval(
        "SELECT count(*) FROM replicas WHERE heartbeat_time > opscore_now_us() - $1",
        int(settings.replica_timeout * 1_000_000),
    )
    if live:
        raise ConfigError(
            f"{live} Ops-Core server(s) are running on {settings.display}; stop them "
            "before copying into it"
        )
    for table in TABLES:
        if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
            raise ConfigError(
                f"{settings.display} already holds data (table {table} is not empty); "
                "copy only into an empty database (createdb a new one)"
            )


async def _copy_table(
    src: sqlite3.Connection,
    conn: asyncpg.Connection,
    table: str,
    progress: Callable[[str, int], None] | None,
) -> int:
    pg_types = dict(
        await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1",
            table,
        )
    )
    src_columns = [row[1] for row in src.execute(f"PRAGMA table_info({table})")]
    missing = [c for c in src_columns if c not in pg_types]
    if missing:  # the two schemas drifted apart: a bug, never silently dropped data
        raise ConfigError(f"PostgreSQL table {table} has no column(s) {missing}")
    extra = set(pg_types) - set(src_columns) - _PG_ONLY
    if extra:
        raise ConfigError(f"SQLite table {table} has no column(s) {sorted(extra)}")
    columns = list(src_columns)
    select = ", ".join(columns)
    if table in _SEQ_TABLES:
        columns.append("seq")
        select += ", rowid"
    convert = [_converter(pg_types[c]) for c in columns]
    total = 0
    cursor = src.execute(f"SELECT {select} FROM {table}")
    for chunk in _chunks(cursor):
        try:
            records = [tuple(f(v) for f, v in zip(convert, row, strict=True)) for row in chunk]
            await conn.copy_records_to_table(table, records=records, columns=columns)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TypeError) as exc:
            # A value SQLite's loose typing let in: say where, keep nothing.
            raise ConfigError(
                f"cannot copy table {table} (rows {total + 1}-{total + len(chunk)}): {exc}; "
                "nothing was committed"
            ) from exc
        total += len(records)
        if progress is not None:
            progress(table, total)
    return total


def _chunks(cursor: sqlite3.Cursor) -> Iterator[list[Any]]:
    while chunk := cursor.fetchmany(CHUNK_ROWS):
        yield chunk


def _converter(pg_type: str) -> Callable[[Any], Any]:
    if pg_type == "boolean":
        return lambda v: None if v is None else bool(v)
    if pg_type == "ARRAY":  # text[]: SQLite keeps a JSON array
        return lambda v: None if v is None else list(json.loads(v))
    if pg_type == "bytea":  # SQLite may hand back text for a BLOB column written as str
        return lambda v: v.encode() if isinstance(v, str) else v
    return lambda v: v  # jsonb takes the JSON text as it is; numbers and text unchanged
