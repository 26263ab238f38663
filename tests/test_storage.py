"""Storage: migrations, upgrade of an old database, SQLite settings, group commit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opscore_proto.v1 import dispatch_pb2 as dpb
from opscore_proto.v1 import lifecycle_pb2 as pb
from opscore_proto.v1 import workflow_pb2 as wpb

from opscore.clock import to_micros
from opscore.models import RetryPolicy, Task, TaskState
from opscore.storage.sqlite import SCHEMA_VERSION, Store, apply_migrations, migrations
from opscore.workflow.models import SessionState
from tests.conftest import eventually
from tests.test_group_commit import task as stored_task

S = pb.AgentState


def schema(path: Path) -> list[tuple[str, str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        return sorted(
            conn.execute(
                "SELECT type, name, tbl_name, COALESCE(sql, '') FROM sqlite_master "
                "WHERE name NOT LIKE 'sqlite_%'"
            ).fetchall()
        )
    finally:
        conn.close()


def pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


# ------------------------------------------------------------------ migrations


def test_migrations_are_numbered_one_to_n():
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert SCHEMA_VERSION == len(found) >= 2
    assert found[0].name == "0001_lifecycle.sql"
    for m in found:
        assert m.name.startswith(f"{m.version:04d}_") and m.name.endswith(".sql")
        assert m.sql.strip()


def test_a_gap_in_the_shipped_migrations_is_refused(tmp_path: Path, monkeypatch):
    """Both backends read their files with storage.migrations.shipped: a missing
    number (a file lost in packaging, a bad rebase) stops the server at start
    rather than skipping a step of the schema."""
    from opscore.storage.migrations import shipped

    package = tmp_path / "fake_backend"
    (package / "migrations").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("0001_first.sql", "0003_third.sql", "README.txt"):
        (package / "migrations" / name).write_text("SELECT 1;\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError) as caught:
        shipped("fake_backend", "Fake")
    message = str(caught.value)
    assert message.startswith("Fake migrations are not numbered 1..n")
    assert "0001_first.sql" in message and "0003_third.sql" in message
    (package / "migrations" / "0002_second.sql").write_text("SELECT 2;\n")
    found = shipped("fake_backend", "Fake")
    assert [(m.version, m.name) for m in found] == [
        (1, "0001_first.sql"),
        (2, "0002_second.sql"),
        (3, "0003_third.sql"),
    ]


def test_migrating_at_once_equals_migrating_step_by_step(tmp_path: Path):
    at_once, stepwise = tmp_path / "at_once.db", tmp_path / "stepwise.db"
    conn = sqlite3.connect(at_once, isolation_level=None)
    assert apply_migrations(conn) == SCHEMA_VERSION
    conn.close()
    conn = sqlite3.connect(stepwise, isolation_level=None)
    for version in range(1, SCHEMA_VERSION + 1):
        assert apply_migrations(conn, target=version) == version
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version
    # Running again is a no-op.
    assert apply_migrations(conn) == SCHEMA_VERSION
    conn.close()
    assert schema(at_once) == schema(stepwise)
    names = {name for _, name, _, _ in schema(at_once)}
    assert {"agents", "agent_transitions", "tasks"} <= names


async def test_old_database_is_upgraded_and_keeps_its_data(tmp_path: Path, make_harness):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    assert apply_migrations(conn, target=1) == 1
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'tasks'").fetchone() is None
    registered = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    changed = datetime(2024, 1, 2, 3, 5, 0, tzinfo=UTC)
    conn.execute(
        "INSERT INTO agents (agent_id, name, version, capabilities, contact_endpoint, "
        "metadata, state, state_details, register_time, state_change_time, last_seen_time, "
        "deregistered, state_before_offline, history_seq) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, 0, 0, 2)",
        (
            "legacy-1",
            "Legacy",
            "0.9",
            json.dumps(["summarize", "translate"]),
            "http://legacy:8080",
            json.dumps({"team": "blue"}),
            int(S.AGENT_STATE_IDLE),
            to_micros(registered),
            to_micros(changed),
            to_micros(changed),
        ),
    )
    conn.execute(
        "INSERT INTO agent_transitions (agent_id, sequence, from_state, to_state, details, "
        "observe_time, record_time, source, out_of_order) VALUES (?, ?, ?, ?, NULL, ?, ?, ?, 0)",
        (
            "legacy-1",
            2,
            int(S.AGENT_STATE_INITIALIZING),
            int(S.AGENT_STATE_IDLE),
            to_micros(changed),
            to_micros(changed),
            "agent",
        ),
    )
    conn.close()

    h = await make_harness(db=str(path))
    got = (await h.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="legacy-1"))).agent
    assert (got.name, got.version, got.contact_endpoint) == ("Legacy", "0.9", "http://legacy:8080")
    assert list(got.capabilities) == ["summarize", "translate"]
    assert dict(got.metadata) == {"team": "blue"}
    assert got.state == S.AGENT_STATE_IDLE
    assert got.register_time.ToDatetime(tzinfo=UTC) == registered
    history = await h.lifecycle.ListStateTransitions(
        pb.ListStateTransitionsRequest(agent_id="legacy-1")
    )
    assert len(history.transitions) == 1
    t = history.transitions[0]
    assert (t.from_state, t.to_state) == (S.AGENT_STATE_INITIALIZING, S.AGENT_STATE_IDLE)
    assert t.observe_time.ToDatetime(tzinfo=UTC) == changed
    # New history continues after the migrated one.
    await h.lifecycle.ReportState(
        pb.ReportStateRequest(agent_id="legacy-1", state=S.AGENT_STATE_ACTIVE)
    )
    history = await h.lifecycle.ListStateTransitions(
        pb.ListStateTransitionsRequest(agent_id="legacy-1")
    )
    assert [t.to_state for t in history.transitions] == [
        S.AGENT_STATE_ACTIVE,
        S.AGENT_STATE_IDLE,
    ]
    assert pragma(path, "user_version") == SCHEMA_VERSION
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'tasks'").fetchone()
    finally:
        conn.close()


async def test_newer_database_is_refused(tmp_path: Path):
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path, isolation_level=None)
    apply_migrations(conn)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = Store(path)
    with pytest.raises(RuntimeError, match="newer"):
        await store.open()
    # Nothing was changed by the refused open.
    assert pragma(path, "user_version") == SCHEMA_VERSION + 1


# ------------------------------------------------------------------ SQLite settings


async def test_wal_and_synchronous_full_by_default(harness):
    store = harness.server.storage.store
    assert pragma(Path(harness.config.db), "journal_mode") == "wal"
    assert store.sync == "full"
    cursor = await store._writer.execute("PRAGMA synchronous")
    assert (await cursor.fetchone())[0] == 2  # FULL


async def test_sync_normal_reaches_the_store(make_harness):
    h = await make_harness(sync="normal")
    store = h.server.storage.store
    assert store.sync == "normal"
    cursor = await store._writer.execute("PRAGMA synchronous")
    assert (await cursor.fetchone())[0] == 1  # NORMAL
    assert pragma(Path(h.config.db), "journal_mode") == "wal"


# ------------------------------------------------------------------ group commit


async def test_concurrent_writes_share_commits_and_wait_for_them(harness):
    """200 concurrent ReportState calls while the disk is slow share a few commits,
    and none is acknowledged before its commit.

    A commit on this machine's disk can take well under a millisecond, quicker than
    calls arrive, so without help every call could get a commit of its own. Another
    connection holding SQLite's write lock stands in for a slow disk: the writer
    waits on the lock (busy_timeout) exactly as it would wait on fsync.
    """
    agents = [f"agent-{i}" for i in range(20)]
    for agent_id in agents:
        await harness.register(agent_id)
    store = harness.server.storage.store
    engine = harness.server.storage
    states = [S.AGENT_STATE_IDLE, S.AGENT_STATE_ACTIVE]
    blocker = sqlite3.connect(harness.config.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        before = store.commits
        calls = [
            asyncio.ensure_future(
                harness.lifecycle.ReportState(
                    pb.ReportStateRequest(agent_id=agent_id, state=states[n % 2])
                )
            )
            for n in range(10)
            for agent_id in agents
        ]
        # Every call has reached the engine and recorded its transition (1 for the
        # registration + 10 reports per agent), and waits for the commit.
        await eventually(
            lambda: sum(engine.agents[a].history_seq for a in agents) == 20 * 11,
            what="all 200 reports recorded",
        )
        assert not any(c.done() for c in calls), "a reply did not wait for its commit"
        assert store.commits == before
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    results = await asyncio.gather(*calls)
    commits = store.commits - before
    assert len(results) == 200
    assert 1 <= commits <= 5, f"{commits} commits for 200 calls: no group commit"
    # Every acknowledged transition is stored: through the API and in the file.
    for agent_id in agents:
        history = await harness.lifecycle.ListStateTransitions(
            pb.ListStateTransitionsRequest(agent_id=agent_id, page_size=1000)
        )
        assert sorted(t.sequence for t in history.transitions) == list(range(1, 12)), agent_id
        assert sum(t.source == "agent" for t in history.transitions) == 10, agent_id
    conn = sqlite3.connect(harness.config.db)
    try:
        stored = conn.execute(
            "SELECT COUNT(*) FROM agent_transitions WHERE source = 'agent'"
        ).fetchone()[0]
    finally:
        conn.close()
    assert stored == 200


@pytest.mark.parametrize("count", [1, 3, 4, 5, 17, 64, 85, 150])
async def test_a_batch_of_any_size_is_written_whole_and_upserts_in_place(
    tmp_path: Path, count: int
):
    """Rows go to SQLite in multi-row INSERTs of 64, 16 and 4 rows, the rest one by
    one: every count across those boundaries stores every row once, and a second
    batch over the same keys updates them instead of adding rows."""
    now = datetime.now(UTC)
    tasks = [
        Task(
            task_id=f"task-{n:04d}",
            name=f"n{n}",
            capability="c",
            agent_id="",
            input=None,
            priority=n % 7,
            retry_policy=RetryPolicy(),
            timeout=timedelta(seconds=300),
            heartbeat_timeout=None,
            idempotency_key="",
            state=TaskState.QUEUED,
            create_time=now,
            update_time=now,
            ready_seq=n + 1,
        )
        for n in range(count)
    ]
    store = Store(tmp_path / "rows.db")
    await store.open()
    try:
        for t in tasks:
            store.put_task(t)
        await store.commit()
        for t in tasks:
            t.state, t.attempt, t.assigned_agent_id = TaskState.ASSIGNED, 1, f"agent-{t.priority}"
            store.put_task(t)
        await store.commit()
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "rows.db")
    try:
        rows = conn.execute(
            "SELECT task_id, name, priority, state, attempt, assigned_agent_id, ready_seq "
            "FROM tasks ORDER BY task_id"
        ).fetchall()
    finally:
        conn.close()
    assert rows == [
        (
            t.task_id,
            t.name,
            t.priority,
            int(TaskState.ASSIGNED),
            1,
            f"agent-{t.priority}",
            t.ready_seq,
        )
        for t in tasks
    ]


@pytest.mark.parametrize("count", [1, 3, 512, 513, 1100])
async def test_key_lookups_on_the_loop_and_through_the_reader_agree(tmp_path: Path, count: int):
    """Tasks by idempotency key, read on the loop's own connection (the usual
    way) and through the reader thread (when the file is busy): the same tasks,
    for any number of keys across the 512-key statements and their padding, and
    nothing for keys no task has."""
    now = datetime.now(UTC)
    store = Store(tmp_path / "keys.db")
    await store.open()
    try:
        for n in range(count):
            finished = dataclasses.replace(
                stored_task(f"{n:05d}"),
                idempotency_key=f"key-{n}",
                state=TaskState.COMPLETED,
                finish_time=now,
            )
            store.put_task(finished)
        await store.commit()
        keys = [f"key-{n}" for n in range(count)] + ["key-none", f"key-{count}"]
        now_read = store.tasks_by_keys_now(keys)
        assert now_read is not None
        assert {k: t.task_id for k, t in now_read.items()} == {
            f"key-{n}": f"task-{n:05d}" for n in range(count)
        }
        threaded = await store.tasks_by_keys(keys)
        assert threaded == now_read
    finally:
        await store.close()
    assert store.tasks_by_keys_now(["key-0"]) is None, "closed: no lookup connection"


async def test_an_existing_key_is_found_when_the_loop_cannot_read_the_file(harness):
    """Without the loop's lookup connection (as when the file is busy), a key of
    a finished task is still found, through the reader thread."""
    first = await harness.dispatch.EnqueueTask(
        dpb.EnqueueTaskRequest(capability="c", idempotency_key="kept")
    )
    await harness.dispatch.CancelTask(dpb.CancelTaskRequest(task_id=first.task.task_id))
    storage = harness.server.storage
    # Finished and out of memory: only the file knows the key now.
    await eventually(lambda: storage._open_by_key("kept") is None, what="the task evicted")
    store = storage.store
    lookup, store._lookup = store._lookup, None
    try:
        again = await harness.dispatch.EnqueueTask(
            dpb.EnqueueTaskRequest(capability="c", idempotency_key="kept")
        )
    finally:
        store._lookup = lookup
    assert not again.created and again.task.task_id == first.task.task_id


@pytest.mark.parametrize("on_the_loop", [True, False])
async def test_start_workflow_reads_its_key_and_definition_either_way(harness, on_the_loop):
    """StartWorkflow reads the definition and a finished session's key on the
    loop's own connection, or through the reader thread when the loop cannot
    read the file: the same definition and the same session either way."""
    await harness.workflow.CreateWorkflowDefinition(
        wpb.CreateWorkflowDefinitionRequest(source="id: d\ntasks:\n- id: a\n  capability: c\n")
    )
    start = wpb.StartWorkflowRequest(definition_id="d", idempotency_key="kept")
    first = await harness.workflow.StartWorkflow(start)
    await harness.workflow.CancelSession(
        wpb.CancelSessionRequest(session_id=first.session.session_id)
    )
    storage = harness.server.storage
    # Finished and out of memory: only the file knows the key now.
    await eventually(lambda: "kept" not in storage._session_keys, what="the session evicted")
    store = storage.store
    lookup = store._lookup
    if not on_the_loop:
        store._lookup = None
    try:
        again = await harness.workflow.StartWorkflow(start)
        other = await harness.workflow.StartWorkflow(
            wpb.StartWorkflowRequest(definition_id="d", idempotency_key="new")
        )
    finally:
        store._lookup = lookup
    assert not again.created and again.session.session_id == first.session.session_id
    assert again.session.state == wpb.SESSION_STATE_CANCELLED
    assert other.created and other.session.definition_id == "d"
    assert other.session.session_id != first.session.session_id


# ------------------------------------------------------------------ ListTasks by state

# Each state filter and the index it must be read through; COMPLETED, the usual
# end, has none (rows.task_state_index_term says why).
_STATE_INDEXES = [
    (TaskState.SCHEDULED, "tasks_open"),
    (TaskState.QUEUED, "tasks_open"),
    (TaskState.ASSIGNED, "tasks_open"),
    (TaskState.FAILED, "tasks_failed_or_cancelled"),
    (TaskState.CANCELLED, "tasks_failed_or_cancelled"),
]


@pytest.mark.parametrize(("state", "index"), _STATE_INDEXES)
@pytest.mark.parametrize("page_token", ["", "later"])
def test_sqlite_list_tasks_by_state_reads_its_index_in_order(
    tmp_path: Path, state: TaskState, index: str, page_token: str
) -> None:
    from opscore.models import TaskFilter
    from opscore.storage.pages import encode_cursor
    from opscore.storage.sqlite.queries import list_tasks_query

    conn = sqlite3.connect(tmp_path / "plan.db")
    apply_migrations(conn)
    token = encode_cursor(1000) if page_token else ""
    sql, params = list_tasks_query(TaskFilter(state=state), token, 101)
    plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    conn.close()
    assert f"USING INDEX {index} (state=?" in plan, plan
    # Newest first straight from the index: no sort of every matching row.
    assert "TEMP B-TREE" not in plan, plan


@pytest.mark.backends("postgres")
@pytest.mark.parametrize(
    ("state", "index"),
    [
        (TaskState.SCHEDULED, ("tasks_waiting",)),
        (TaskState.QUEUED, ("tasks_waiting",)),
        # Not in the index of waiting tasks: one of the leases' (both hold every
        # ASSIGNED task), then a sort.
        (TaskState.ASSIGNED, ("tasks_lease_due", "tasks_leased_by_agent")),
        (TaskState.FAILED, ("tasks_failed_or_cancelled",)),
        (TaskState.CANCELLED, ("tasks_failed_or_cancelled",)),
    ],
)
async def test_postgres_list_tasks_by_state_reads_its_index(
    db_url: str, state: TaskState, index: tuple[str, ...]
) -> None:
    from opscore.models import TaskFilter
    from opscore.storage.postgres.pool import PgSettings, connect
    from opscore.storage.postgres.statements import list_tasks_query

    sql, args = list_tasks_query(TaskFilter(state=state), "", 101)
    conn = await connect(PgSettings.from_url(db_url))
    try:
        # An empty table is cheapest to read whole: ask what the planner can use.
        await conn.execute("SET enable_seqscan = off")
        plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
    finally:
        await conn.close()
    text = json.dumps(plan)
    assert any(f'"Index Name": "{i}"' in text for i in index), text
    if state != TaskState.ASSIGNED:
        assert '"Sort"' not in text, text


_SESSION_STATE_INDEXES = [
    (SessionState.PENDING, "sessions_open"),
    (SessionState.RUNNING, "sessions_open"),
    (SessionState.FAILED, "sessions_failed_or_cancelled"),
    (SessionState.CANCELLED, "sessions_failed_or_cancelled"),
]


@pytest.mark.parametrize(("state", "index"), _SESSION_STATE_INDEXES)
def test_sqlite_list_sessions_by_state_reads_its_index(
    tmp_path: Path, state: SessionState, index: str
) -> None:
    from opscore.storage.sqlite.queries import list_sessions_query

    conn = sqlite3.connect(tmp_path / "plan.db")
    apply_migrations(conn)
    sql, params = list_sessions_query(int(state), "", "", 101)
    plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    conn.close()
    assert f"USING INDEX {index} (state=?" in plan, plan
    if state in (SessionState.FAILED, SessionState.CANCELLED):
        assert "TEMP B-TREE" not in plan, plan


@pytest.mark.backends("postgres")
@pytest.mark.parametrize(
    ("state", "definition_id", "index"),
    [
        (SessionState.PENDING, "", "sessions_open"),
        (SessionState.RUNNING, "", "sessions_open"),
        (SessionState.FAILED, "", "sessions_failed_or_cancelled"),
        (SessionState.CANCELLED, "", "sessions_failed_or_cancelled"),
        (0, "d1", "sessions_by_definition"),
    ],
)
async def test_postgres_list_sessions_reads_the_filter_s_index(
    db_url: str, state: int, definition_id: str, index: str
) -> None:
    from opscore.storage.postgres.pool import PgSettings, connect
    from opscore.storage.postgres.statements import list_sessions_query

    sql, args = list_sessions_query(int(state), definition_id, "", 101)
    conn = await connect(PgSettings.from_url(db_url))
    try:
        await conn.execute("SET enable_seqscan = off")
        text = json.dumps(json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)))
    finally:
        await conn.close()
    assert index in text, text
    assert '"Sort"' not in text, text


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans produced or threw away (EXPLAIN ANALYZE's counts); a
    bitmap index scan's are its heap scan's."""
    n = 0
    if "Scan" in plan["Node Type"] and plan["Node Type"] != "Bitmap Index Scan":
        n += plan["Actual Rows"] * plan["Actual Loops"] + plan.get("Rows Removed by Filter", 0)
    return n + sum(_rows_read(child) for child in plan.get("Plans", []))


@pytest.mark.backends("postgres")
@pytest.mark.parametrize("analyzed", [True, False])
async def test_postgres_list_tasks_by_queued_reads_no_finished_history(
    db_url: str, analyzed: bool
) -> None:
    """An old backlog behind newer finished history (tasks pinned to an agent
    that went away, say): a page of QUEUED reads the open tasks, not the 200,000
    finished ones enqueued after them, which it did before migration 0010."""
    from opscore.models import TaskFilter
    from opscore.storage.pages import encode_cursor
    from opscore.storage.postgres.pool import PgSettings, connect
    from opscore.storage.postgres.statements import list_tasks_query

    insert = (
        "INSERT INTO tasks (task_id, name, capability, agent_id, priority, max_attempts, "
        "initial_backoff_us, backoff_multiplier, max_backoff_us, timeout_us, session_id, "
        "workflow_task_id, create_time, state, attempt, assigned_agent_id, cancel_requested, "
        "update_time, ready_seq, finish_time) SELECT $1 || g, 'n', 'c', '', 0, 3, 1, 2, 10, 10, "
        "'', '', 0, $2, 1, '', false, 0, g, $3 FROM generate_series(1, $4) g"
    )
    conn = await connect(PgSettings.from_url(db_url))
    try:
        await conn.execute(insert, "queued-", int(TaskState.QUEUED), None, 3_000)
        await conn.execute(insert, "done-", int(TaskState.COMPLETED), 1, 200_000)
        if analyzed:
            await conn.execute("ANALYZE tasks")
        pages: list[list[Any]] = []
        token = ""
        for _ in range(2):
            sql, args = list_tasks_query(TaskFilter(state=TaskState.QUEUED), token, 101)
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            read = _rows_read(json.loads(raw)[0]["Plan"])
            # Every queued task at most (a bitmap scan of them, then the top of a
            # sort), never the history.
            assert read <= 3_000 + 101, (read, raw)
            rows = await conn.fetch(sql, *args)
            pages.append(rows)
            token = encode_cursor(rows[99]["seq"])
    finally:
        await conn.close()
    assert [len(p) for p in pages] == [101, 101]
    assert all(r["state"] == TaskState.QUEUED for p in pages for r in p)
    # Newest first, and the second page carries on where the first stopped.
    assert [r["seq"] for r in pages[0][:100]] == list(range(3_000, 2_900, -1))
    assert pages[1][0]["seq"] == 2_900
