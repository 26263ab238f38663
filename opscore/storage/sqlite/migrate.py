"""The SQLite schema's numbered migrations (migrations/NNNN_*.sql), and applying
them to a plain sqlite3 connection: at server start, and by `opscore db` before a
copy."""

from __future__ import annotations

import logging
import sqlite3

from opscore.storage.migrations import Migration, shipped

log = logging.getLogger("opscore.storage")


def migrations() -> list[Migration]:
    """Numbered migrations shipped with the package, in order."""
    return shipped("opscore.storage.sqlite", "SQLite")


SCHEMA_VERSION = len(migrations())


def apply_migrations(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Bring a plain sqlite3 connection's database up to `target` (default: latest).

    Each migration runs in its own transaction together with the version bump, so a
    crash mid-upgrade leaves the database at the previous version, never in between.
    """
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    target = SCHEMA_VERSION if target is None else target
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {current} is newer than this Ops-Core "
            f"({SCHEMA_VERSION}); upgrade Ops-Core"
        )
    for m in migrations():
        if current < m.version <= target:
            log.info("applying migration", extra={"migration": m.name})
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(m.sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {m.version}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            current = m.version
    return current


def _split_sql(script: str) -> list[str]:
    statements, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip() and not buf.strip().startswith("--"):
        statements.append(buf.strip())
    return statements
