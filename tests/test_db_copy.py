"""Moving from SQLite to PostgreSQL (`opscore db copy`): a deployment's data, read
back through the API on PostgreSQL, is what it was on SQLite, and work goes on."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as dpb
from opscore_proto.v1 import lifecycle_pb2 as lpb
from opscore_proto.v1 import workflow_pb2 as wpb

from opscore.errors import ConfigError
from opscore.storage.copy import TABLES, copy_sqlite_to_postgres
from opscore.storage.sqlite.lock import DatabaseLock
from tests.conftest import Harness
from tests.support.cli import opscore
from tests.support.pg import PgCluster
from tests.support.worker import Worker
from tests.test_dispatch import assignment, complete, dur, enqueue, struct, subscribe
from tests.test_workflow import create, definition, start, wait_final

S = lpb.AgentState


async def everything(h: Harness) -> dict[str, Any]:
    """What a user can read back, as plain data (order kept: it is part of it)."""
    out: dict[str, Any] = {}
    agents = (await h.lifecycle.ListAgents(lpb.ListAgentsRequest(page_size=1000))).agents
    # Liveness fields move with the clock and the server; the rest must not.
    for a in agents:
        a.ClearField("last_seen_time")
    out["agents"] = [json_format.MessageToDict(a) for a in agents]
    out["history"] = {
        a.agent_id: json_format.MessageToDict(
            await h.lifecycle.ListStateTransitions(
                lpb.ListStateTransitionsRequest(agent_id=a.agent_id, page_size=1000)
            )
        )
        for a in agents
    }
    tasks = (await h.dispatch.ListTasks(dpb.ListTasksRequest(page_size=1000))).tasks
    out["tasks"] = [json_format.MessageToDict(t) for t in tasks]
    # Paging (its cursor is the insertion order) gives the same pages.
    first = await h.dispatch.ListTasks(dpb.ListTasksRequest(page_size=3))
    second = await h.dispatch.ListTasks(
        dpb.ListTasksRequest(page_size=3, page_token=first.next_page_token)
    )
    out["task_pages"] = [[t.task_id for t in first.tasks], [t.task_id for t in second.tasks]]
    out["attempts"] = {
        t.task_id: json_format.MessageToDict(
            await h.dispatch.ListTaskAttempts(dpb.ListTaskAttemptsRequest(task_id=t.task_id))
        )
        for t in tasks
    }
    sessions = (await h.workflow.ListSessions(wpb.ListSessionsRequest(page_size=1000))).sessions
    out["sessions"] = [
        json_format.MessageToDict(
            (await h.workflow.GetSession(wpb.GetSessionRequest(session_id=s.session_id))).session
        )
        for s in sessions
    ]
    out["events"] = {}
    for s in sessions:
        if s.state in (wpb.SESSION_STATE_COMPLETED, wpb.SESSION_STATE_FAILED):
            events = [
                json_format.MessageToDict(r.event)
                async for r in h.workflow.WatchSession(
                    wpb.WatchSessionRequest(session_id=s.session_id), timeout=10
                )
            ]
            out["events"][s.session_id] = events
    defs = await h.workflow.ListWorkflowDefinitions(wpb.ListWorkflowDefinitionsRequest())
    out["definitions"] = [json_format.MessageToDict(d) for d in defs.definitions]
    return out


async def populate(h: Harness) -> dict[str, str]:
    """Agents with history, tasks in every state (with attempts, errors, outputs,
    an idempotency key, a schedule), a finished session and a running one."""
    await h.register("copy-a", ["c", "math"], metadata={"team": "blue"}, version="1.2")
    await h.register("copy-b", ["c"])
    await h.lifecycle.ReportState(
        lpb.ReportStateRequest(agent_id="copy-b", state=S.AGENT_STATE_ACTIVE)
    )
    await h.lifecycle.DeregisterAgent(lpb.DeregisterAgentRequest(agent_id="copy-b"))

    ids: dict[str, str] = {}
    done = await enqueue(h, capability="c", name="done", input=struct(n=1), priority=5)
    failed = await enqueue(
        h,
        capability="c",
        name="failed",
        retry_policy=common_pb2.RetryPolicy(max_attempts=2, initial_backoff=dur(0)),
    )
    sub = await subscribe(h, "copy-a", max_in_flight=1)
    first = await assignment(sub)
    assert first.task_id == done.task_id  # priority 5 first
    await complete(h, first, "copy-a", answer=42)
    for attempt in (1, 2):
        got = await assignment(sub)
        assert (got.task_id, got.attempt) == (failed.task_id, attempt)
        await h.dispatch.FailTask(
            dpb.FailTaskRequest(
                task_id=got.task_id,
                agent_id="copy-a",
                attempt=got.attempt,
                error=common_pb2.TaskError(message=f"no {attempt}", type="ValueError"),
            )
        )
    held = await enqueue(h, capability="c", name="held")
    assert (await assignment(sub)).task_id == held.task_id  # stays ASSIGNED
    ids["held"] = held.task_id
    cancelled = await enqueue(h, capability="other", name="cancelled")
    await h.dispatch.CancelTask(dpb.CancelTaskRequest(task_id=cancelled.task_id, reason="no"))
    ids["queued_old"] = (
        await enqueue(h, capability="later", name="q1", idempotency_key="k-1")
    ).task_id
    ids["queued_new"] = (await enqueue(h, capability="later", name="q2")).task_id
    ids["scheduled"] = (await enqueue(h, capability="later", name="s", delay=dur(3600))).task_id
    await sub.close()

    await create(
        h,
        definition(
            "pipeline",
            [
                {"id": "one", "capability": "math"},
                {"id": "two", "capability": "math", "depends_on": ["one"]},
            ],
        ),
    )
    w = await Worker(h.channel, "copy-w", {"math": lambda data, task: {"ok": True}}).start()
    finished = await start(h, "pipeline", input=struct(x=1))
    assert (await wait_final(h, finished.session_id)).state == wpb.SESSION_STATE_COMPLETED
    await w.stop()
    ids["running_session"] = (await start(h, "pipeline", idempotency_key="s-1")).session_id
    return ids


@pytest.fixture
def sqlite_path(tmp_path: Path) -> str:
    return str(tmp_path / "source.db")


async def test_copy_keeps_everything_and_work_goes_on(
    make_harness, sqlite_path: str, pg_url: str
) -> None:
    h = await make_harness(db=sqlite_path)
    ids = await populate(h)
    before = await everything(h)
    await h.stop()

    seen: list[tuple[str, int]] = []
    result = await copy_sqlite_to_postgres(
        sqlite_path, pg_url, progress=lambda t, n: seen.append((t, n))
    )
    conn = sqlite3.connect(sqlite_path)
    try:
        expected = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        conn.close()
    assert result.rows == expected
    assert result.source_upgraded_from is None
    assert expected["tasks"] >= 8 and expected["session_events"] > 0
    assert {t for t, _ in seen} == {t for t, n in expected.items() if n}

    p = await make_harness(db=pg_url)
    after = await everything(p)
    assert after == before

    # Idempotency keys still find the copied rows.
    again = await enqueue(p, capability="later", name="q1", idempotency_key="k-1")
    assert again.task_id == ids["queued_old"]
    resp = await p.workflow.StartWorkflow(
        wpb.StartWorkflowRequest(definition_id="pipeline", idempotency_key="s-1")
    )
    assert resp.session.session_id == ids["running_session"]
    # New rows list newest first, after the copied ones.
    new = await enqueue(p, capability="later", name="q3")
    listed = (await p.dispatch.ListTasks(dpb.ListTasksRequest(capability="later"))).tasks
    assert [t.task_id for t in listed][:3] == [new.task_id, ids["scheduled"], ids["queued_new"]]
    # Queued work is dispatched in its old FIFO order, before what came later.
    await p.register("copy-l", ["later"])
    sub = await subscribe(p, "copy-l", max_in_flight=3)
    got = [(await assignment(sub)).task_id for _ in range(3)]
    assert got == [ids["queued_old"], ids["queued_new"], new.task_id]
    await sub.close()
    # The running session goes on to its end on PostgreSQL.
    w = await Worker(p.channel, "copy-w", {"math": lambda data, task: {"ok": True}}).start()
    final = await wait_final(p, ids["running_session"])
    assert final.state == wpb.SESSION_STATE_COMPLETED
    await w.stop()


async def test_copy_refuses_a_database_with_data_and_changes_nothing(
    make_harness, sqlite_path: str, pg_url: str, pg: PgCluster
) -> None:
    h = await make_harness(db=sqlite_path)
    await h.register("only-agent", ["c"])
    await enqueue(h, capability="c")
    await h.stop()
    first = await copy_sqlite_to_postgres(sqlite_path, pg_url)
    assert first.rows["tasks"] == 1
    name = pg_url.rsplit("/", 1)[1]
    with pytest.raises(ConfigError, match="already holds data"):
        await copy_sqlite_to_postgres(sqlite_path, pg_url)
    assert pg.sql("SELECT count(*) FROM tasks", dbname=name).strip() == "1"


async def test_copy_refuses_a_file_a_server_holds(make_harness, sqlite_path: str, pg_url: str):
    h = await make_harness(db=sqlite_path)
    with pytest.raises(ConfigError, match="in use by another Ops-Core server"):
        await copy_sqlite_to_postgres(sqlite_path, pg_url)
    await h.stop()


async def test_copy_refuses_a_database_a_replica_serves(
    make_harness, sqlite_path: str, pg_url: str, tmp_path: Path
) -> None:
    h = await make_harness(db=sqlite_path)
    await h.stop()
    replica = await make_harness(db=pg_url)
    with pytest.raises(ConfigError, match="running on"):
        await copy_sqlite_to_postgres(sqlite_path, pg_url)
    await replica.stop()


async def test_copy_checks_its_arguments(tmp_path: Path, pg_url: str) -> None:
    with pytest.raises(ConfigError, match="no SQLite database"):
        await copy_sqlite_to_postgres(str(tmp_path / "missing.db"), pg_url)
    with pytest.raises(ConfigError, match="must be a PostgreSQL URL"):
        await copy_sqlite_to_postgres(str(tmp_path / "a.db"), str(tmp_path / "b.db"))


async def test_copy_failing_midway_leaves_the_target_empty(
    make_harness, sqlite_path: str, pg_url: str, pg: PgCluster
) -> None:
    h = await make_harness(db=sqlite_path)
    for i in range(5):
        await h.register(f"agent-{i}", ["c"])
    await enqueue(h, capability="c")
    await h.stop()
    # A row SQLite's loose typing let in and PostgreSQL refuses, in a table copied
    # after agents and tasks: the whole copy is undone.
    conn = sqlite3.connect(sqlite_path, isolation_level=None)
    conn.execute(
        "INSERT INTO session_events (session_id, sequence, body) VALUES ('s', 'one', x'00')"
    )
    conn.close()
    with pytest.raises(ConfigError, match="cannot copy table session_events"):
        await copy_sqlite_to_postgres(sqlite_path, pg_url)
    name = pg_url.rsplit("/", 1)[1]
    assert pg.sql("SELECT count(*) FROM agents", dbname=name).strip() == "0"
    assert pg.sql("SELECT count(*) FROM tasks", dbname=name).strip() == "0"
    lock = DatabaseLock(sqlite_path)
    lock.acquire()  # released by the failed copy
    lock.release()


async def test_copy_of_a_nul_written_by_an_older_server_stops_and_says_where(
    make_harness, sqlite_path: str, pg_url: str, pg: PgCluster
) -> None:
    """Servers refuse NUL in request strings now; an older one stored it. The
    copy names the table, and docs/postgresql.md's query finds the rows."""
    h = await make_harness(db=sqlite_path)
    task = await enqueue(h, capability="c", name="fine")
    await h.stop()
    conn = sqlite3.connect(sqlite_path, isolation_level=None)
    conn.execute("UPDATE tasks SET name = ? WHERE task_id = ?", ("a\x00b", task.task_id))
    found = conn.execute(
        "SELECT task_id FROM tasks WHERE instr(CAST(name AS BLOB), x'00') > 0"
    ).fetchall()
    conn.close()
    assert found == [(task.task_id,)]
    with pytest.raises(ConfigError, match=r"cannot copy table tasks \(rows 1-1\).*0x00"):
        await copy_sqlite_to_postgres(sqlite_path, pg_url)
    name = pg_url.rsplit("/", 1)[1]
    assert pg.sql("SELECT count(*) FROM tasks", dbname=name).strip() == "0"


async def test_cli_db_copy(make_harness, sqlite_path: str, pg_url: str) -> None:
    h = await make_harness(db=sqlite_path)
    await h.register("cli-agent", ["c"])
    await h.stop()
    r = await opscore("db", "copy", "--from", sqlite_path, "--to", pg_url)
    assert r.code == 0, r
    assert "agents: 1" in r.out and "password" not in r.out, r
    r = await opscore("db", "copy", "--from", sqlite_path, "--to", pg_url)
    assert r.code == 1 and "already holds data" in r.err, r
