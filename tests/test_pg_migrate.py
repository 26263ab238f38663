"""PostgreSQL schema and its migration runner (opscore/storage/postgres/migrate.py),
against the real throwaway cluster."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from opscore.storage.postgres.migrate import (
    SCHEMA_VERSION,
    Migration,
    MigrationError,
    SchemaTooNew,
    migrate,
    migrations,
    schema_version,
)
from opscore.storage.postgres.pool import PgSettings, connect
from opscore.storage.sqlite.migrate import apply_migrations as apply_sqlite_migrations
from tests.support.pg import PgCluster

# Catalog of the public schema: everything a migration can create, as text.
CATALOG_QUERIES = {
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, a.attidentity, pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v')
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2""",
    "relations": """
        SELECT relname, relkind::text, reloptions::text FROM pg_class
        WHERE relnamespace = 'public'::regnamespace ORDER BY 1""",
    "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "sequences": """
        SELECT sequencename, data_type::text, start_value, increment_by FROM pg_sequences
        WHERE schemaname = 'public' ORDER BY 1""",
    "functions": """
        SELECT proname, pg_get_functiondef(oid) FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace ORDER BY 1""",
    "history": "SELECT version, name, checksum FROM schema_migrations ORDER BY 1",
}


async def catalog(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in CATALOG_QUERIES.items()
    }


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(PgSettings.from_url(pg_url))
    try:
        yield conn
    finally:
        await conn.close()


def test_migrations_are_numbered_and_mirror_sqlite_names() -> None:
    names = [m.name for m in migrations()]
    assert SCHEMA_VERSION == len(names) >= 5
    assert names[:3] == ["0001_lifecycle.sql", "0002_dispatch.sql", "0003_workflow.sql"]


async def test_from_scratch_in_one_go_equals_step_by_step(pg: PgCluster, db: asyncpg.Connection):
    done = await migrate(db)
    assert done.version == SCHEMA_VERSION
    assert done.applied == tuple(m.name for m in migrations())
    at_once = await catalog(db)

    name = pg.create_database()
    try:
        for step in migrations():
            # A new connection per step, as successive releases would upgrade it.
            conn = await connect(PgSettings.from_url(pg.url(name)))
            try:
                result = await migrate(conn, target=step.version)
                assert result.version == step.version
                assert result.applied == (step.name,)
                assert await schema_version(conn) == step.version
            finally:
                await conn.close()
        conn = await connect(PgSettings.from_url(pg.url(name)))
        try:
            stepwise = await catalog(conn)
        finally:
            await conn.close()
    finally:
        pg.drop_database(name)

    tables = {r[0] for r in at_once["relations"] if r[1] == "r"}
    assert {
        "agents",
        "agent_transitions",
        "tasks",
        "workflow_definitions",
        "sessions",
        "session_definitions",
        "session_task_runs",
        "session_events",
        "task_attempts",
        "replicas",
        "agent_streams",
        "schema_migrations",
    } <= tables
    for part, rows in at_once.items():
        assert rows == stepwise[part], f"{part} differs between one go and step by step"


async def test_three_runners_starting_at_once_apply_each_migration_once(
    pg: PgCluster, db: asyncpg.Connection
):
    await migrate(db)
    reference = await catalog(db)

    name = pg.create_database()
    conns = [await connect(PgSettings.from_url(pg.url(name))) for _ in range(3)]
    try:
        go = asyncio.Event()

        async def runner(conn: asyncpg.Connection) -> Any:
            await go.wait()
            return await migrate(conn)

        tasks = [asyncio.create_task(runner(c)) for c in conns]
        await asyncio.sleep(0)  # every runner is parked on the event
        go.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert [r.version for r in results] == [SCHEMA_VERSION] * 3
        applied = sorted(n for r in results for n in r.applied)
        assert applied == [m.name for m in migrations()], "each migration exactly once"
        assert await catalog(conns[0]) == reference
    finally:
        for c in conns:
            await c.close()
        pg.drop_database(name)


async def test_a_database_newer_than_the_code_is_refused(db: asyncpg.Connection):
    await migrate(db)
    future = SCHEMA_VERSION + 1
    await db.execute(
        "INSERT INTO schema_migrations (version, name, checksum, apply_time) "
        "VALUES ($1, $2, 'x', 0)",
        future,
        f"{future:04d}_from_the_future.sql",
    )
    before = await catalog(db)
    with pytest.raises(SchemaTooNew) as caught:
        await migrate(db)
    message = str(caught.value)
    assert f"schema version {future}" in message
    assert f"{future:04d}_from_the_future.sql" in message
    assert f"this Ops-Core's {SCHEMA_VERSION}" in message
    assert await catalog(db) == before


async def test_an_older_database_upgrades_and_keeps_its_rows(db: asyncpg.Connection):
    await migrate(db, target=3)
    await db.execute(
        "INSERT INTO tasks (task_id, name, capability, agent_id, priority, max_attempts, "
        "initial_backoff_us, backoff_multiplier, max_backoff_us, timeout_us, session_id, "
        "workflow_task_id, create_time, state, attempt, assigned_agent_id, cancel_requested, "
        "update_time, ready_seq) VALUES ('t1', 'n', 'cap', '', 5, 3, 1000, 2.0, 10000, "
        "60000000, '', '', 1, 2, 0, '', false, 1, nextval('tasks_ready_seq'))"
    )
    result = await migrate(db)
    assert result.version == SCHEMA_VERSION
    assert result.applied == tuple(m.name for m in migrations()[3:])
    row = await db.fetchrow("SELECT task_id, priority, trace_context, seq FROM tasks")
    assert (row["task_id"], row["priority"], row["trace_context"]) == ("t1", 5, None)
    assert row["seq"] >= 1
    assert await db.fetchval("SELECT count(*) FROM task_attempts") == 0


async def test_a_failing_migration_leaves_the_previous_version(db: asyncpg.Connection):
    shipped = migrations()
    broken = Migration(
        2, "0002_broken.sql", "CREATE TABLE half_done (x int);\nSELECT * FROM no_such_table;\n"
    )
    with pytest.raises(MigrationError) as caught:
        await migrate(db, available=[shipped[0], broken])
    assert "0002_broken.sql" in str(caught.value)
    assert "no_such_table" in str(caught.value)
    assert "stays at schema version 1" in str(caught.value)
    assert await schema_version(db) == 1
    assert await db.fetchval("SELECT to_regclass('half_done')") is None
    # The connection is usable and the real migrations carry on from there.
    assert (await migrate(db)).version == SCHEMA_VERSION


async def test_another_applications_schema_migrations_is_refused(db: asyncpg.Connection):
    await db.execute("CREATE TABLE schema_migrations (version bigint PRIMARY KEY, dirty boolean)")
    with pytest.raises(MigrationError, match="not Ops-Core's"):
        await migrate(db)


async def test_schema_mirrors_every_sqlite_table_and_column(db: asyncpg.Connection):
    await migrate(db)
    lite = sqlite3.connect(":memory:", isolation_level=None)
    apply_sqlite_migrations(lite)
    sqlite_cols = {
        (table, col[1])
        for (table,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        for col in lite.execute(f"PRAGMA table_info({table})")
    }
    pg_cols = {
        (r["table_name"], r["column_name"])
        for r in await db.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public'"
        )
    }
    assert sqlite_cols, "the SQLite schema is empty?"
    assert sqlite_cols - pg_cols == set(), "SQLite columns missing in PostgreSQL"
    # What only PostgreSQL has: the replicas' tables, the history, listing order.
    extra = {t for t, _ in pg_cols - sqlite_cols}
    only_pg = {"replicas", "agent_streams", "schema_migrations"}
    # 0004 (task_attempts, trace_context) is mirrored ahead of its SQLite migration,
    # which arrives with the observability branch.
    observability = (
        {"task_attempts"} if "task_attempts" not in {t for t, _ in sqlite_cols} else set()
    )
    assert extra - only_pg - observability <= {"tasks", "sessions"}
    assert {(t, c) for t, c in pg_cols - sqlite_cols if t in ("tasks", "sessions")} <= {
        ("tasks", "seq"),
        ("sessions", "seq"),
        ("tasks", "trace_context"),
        ("sessions", "trace_context"),
        # Which replicas' cached copies of a running session are current.
        ("sessions", "version"),
    }


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += _plan_nodes(child)
    return nodes


async def _explain(db: asyncpg.Connection, sql: str) -> list[dict[str, Any]]:
    raw = await db.fetchval(f"EXPLAIN (FORMAT JSON) {sql}")
    return _plan_nodes(json.loads(raw)[0]["Plan"])


@pytest.mark.parametrize(
    ("query", "index"),
    [
        (
            "SELECT task_id FROM tasks WHERE state = 2 AND agent_id = '' AND capability = 'c' "
            "ORDER BY priority DESC, ready_seq LIMIT 10 FOR UPDATE SKIP LOCKED",
            "tasks_ready_by_capability",
        ),
        (
            "SELECT task_id FROM tasks WHERE state = 2 AND agent_id = 'a1' "
            "ORDER BY priority DESC, ready_seq LIMIT 10 FOR UPDATE SKIP LOCKED",
            "tasks_ready_by_agent",
        ),
        (
            "SELECT task_id FROM tasks WHERE state = 1 AND schedule_time <= 5 "
            "ORDER BY schedule_time LIMIT 100",
            "tasks_scheduled_due",
        ),
        (
            "SELECT task_id FROM tasks WHERE state = 3 AND lease_expire_time <= 5 "
            "ORDER BY lease_expire_time LIMIT 100",
            "tasks_lease_due",
        ),
        (
            "SELECT task_id FROM tasks WHERE state = 3 AND assigned_agent_id = 'a1'",
            "tasks_leased_by_agent",
        ),
        ("SELECT task_id FROM tasks ORDER BY seq DESC LIMIT 101", "tasks_by_seq"),
        (
            "SELECT task_id FROM tasks WHERE session_id = 's1' ORDER BY seq DESC LIMIT 101",
            "tasks_by_session",
        ),
    ],
)
async def test_dispatch_queries_read_their_index_in_order(
    db: asyncpg.Connection, query: str, index: str
):
    await migrate(db)
    await db.execute("SET enable_seqscan = off")
    nodes = await _explain(db, query)
    assert index in {n.get("Index Name") for n in nodes}, nodes
    assert not [n for n in nodes if n["Node Type"] in ("Sort", "Incremental Sort")], (
        f"{query} sorts: the index order does not match ORDER BY"
    )


async def test_idempotency_keys_are_unique(db: asyncpg.Connection):
    await migrate(db)
    insert = (
        "INSERT INTO sessions (session_id, definition_id, definition_version, state, "
        "agent_id, idempotency_key, create_time, update_time) VALUES ($1, 'd', 1, 1, '', $2, 0, 0)"
    )
    await db.execute(insert, "s1", "key-1")
    await db.execute(insert, "s2", None)
    await db.execute(insert, "s3", None)  # many sessions without a key
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, "s4", "key-1")


async def test_replica_tables(db: asyncpg.Connection):
    await migrate(db)
    now_us = await db.fetchval("SELECT opscore_now_us()")
    assert abs(now_us - time.time() * 1e6) < 5e6
    await db.execute(
        "INSERT INTO replicas (replica_id, address, host, pid, version, start_time) "
        "VALUES ('r1', '127.0.0.1:1', 'h', 1, '0.1.0', 0), "
        "('r2', '127.0.0.1:2', 'h', 2, '0.1.0', 0)"
    )
    assert (
        await db.fetchval("SELECT heartbeat_time FROM replicas WHERE replica_id = 'r1'") >= now_us
    )
    await db.execute("INSERT INTO agent_streams VALUES ('r1', 'a1', 2), ('r2', 'a1', 1)")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO agent_streams VALUES ('r2', 'a2', 0)")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute("INSERT INTO agent_streams VALUES ('r9', 'a2', 1)")
    # A dead replica's row goes: its stream records go with it.
    await db.execute("DELETE FROM replicas WHERE replica_id = 'r1'")
    assert await db.fetchval("SELECT to_regclass('leases')") is None  # dropped by 0006
    assert [tuple(r) for r in await db.fetch("SELECT replica_id, agent_id FROM agent_streams")] == [
        ("r2", "a1")
    ]


async def test_a_migrated_copy_is_at_the_latest_schema(pg: PgCluster, pg_migrated_url: str):
    conn = await connect(PgSettings.from_url(pg_migrated_url))
    try:
        assert await schema_version(conn) == SCHEMA_VERSION
        assert (await migrate(conn)).applied == ()
        copy = await catalog(conn)
    finally:
        await conn.close()
    name = pg.create_database()
    try:
        conn = await connect(PgSettings.from_url(pg.url(name)))
        try:
            await migrate(conn)
            assert await catalog(conn) == copy
        finally:
            await conn.close()
    finally:
        pg.drop_database(name)


async def test_an_edited_migration_is_logged(
    db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
):
    await migrate(db)
    await db.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 2")
    with caplog.at_level(logging.WARNING, logger="opscore.storage.postgres"):
        assert (await migrate(db)).version == SCHEMA_VERSION
    warned = [r for r in caplog.records if "differs from the one shipped" in r.getMessage()]
    assert [getattr(r, "applied", None) for r in warned] == ["0002_dispatch.sql"]
