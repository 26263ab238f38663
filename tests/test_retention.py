"""Retention (issue 14): what expired is pruned in small batches, on both backends.

Rules are checked with a pass run at a cutoff the test chooses (`prune`), so
"older" and "newer" are exact; the server's own loop is checked with a short
--retention and awaited conditions."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb
from opscore_proto.v1 import workflow_pb2 as wpb

from opscore import limits
from opscore.clock import utcnow
from opscore.config import Config, from_sources
from opscore.errors import ConfigError
from opscore.retention import Retention, interval_for
from tests.conftest import Harness, eventually, expect_error
from tests.support.cli import opscore
from tests.support.worker import Fail, Worker
from tests.test_dispatch import dur, enqueue, struct

pytestmark = pytest.mark.backends("sqlite", "postgres")

TS = pb.TaskState
S = lpb.AgentState
NOT_FOUND = grpc.StatusCode.NOT_FOUND
OFF = timedelta(0)


async def prune(h: Harness, before: datetime | None = None, **kw: Any) -> dict[str, int]:
    """One retention pass on the server's storage, of what finished before `before`."""
    assert h.server is not None
    return await Retention(h.server.storage, timedelta(days=1), **kw).run_once(before or utcnow())


def of(pruned: dict[str, int], *kinds: str) -> dict[str, int]:
    """Only the tables named (a pass also prunes the test agents' old transitions)."""
    return {k: v for k, v in pruned.items() if k in kinds}


async def task_gone(h: Harness, task_id: str) -> bool:
    try:
        await h.dispatch.GetTask(pb.GetTaskRequest(task_id=task_id))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == NOT_FOUND, exc
        return True
    return False


async def agent_gone(h: Harness, agent_id: str) -> bool:
    try:
        await h.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id=agent_id))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == NOT_FOUND, exc
        return True
    return False


async def listed_agents(h: Harness) -> set[str]:
    resp = await h.lifecycle.ListAgents(lpb.ListAgentsRequest(page_size=1000))
    return {a.agent_id for a in resp.agents}


async def listed_tasks(h: Harness, **kw: Any) -> set[str]:
    resp = await h.dispatch.ListTasks(pb.ListTasksRequest(page_size=1000, **kw))
    return {t.task_id for t in resp.tasks}


async def history(h: Harness, agent_id: str) -> list[lpb.StateTransition]:
    resp = await h.lifecycle.ListStateTransitions(
        lpb.ListStateTransitionsRequest(agent_id=agent_id, page_size=1000)
    )
    return list(resp.transitions)


async def final(h: Harness, task_id: str, timeout: float = 10.0) -> pb.Task:
    async def done() -> pb.Task | None:
        t = (await h.dispatch.GetTask(pb.GetTaskRequest(task_id=task_id))).task
        return t if t.state in (TS.TASK_STATE_COMPLETED, TS.TASK_STATE_FAILED) else None

    return await eventually(done, timeout=timeout, what=f"task {task_id} finished")


def definition(did: str, tasks: list[dict[str, Any]]) -> wpb.WorkflowDefinition:
    return json_format.ParseDict({"id": did, "tasks": tasks}, wpb.WorkflowDefinition())


async def wait_session(h: Harness, session_id: str, state: int) -> wpb.Session:
    async def reached() -> wpb.Session | None:
        s = (await h.workflow.GetSession(wpb.GetSessionRequest(session_id=session_id))).session
        return s if s.state == state else None

    return await eventually(reached, what=f"session {session_id} in state {state}")


# ------------------------------------------------------------------ settings


@pytest.mark.backends("sqlite")
def test_retention_setting_forms_and_default() -> None:
    assert Config().retention == timedelta(days=7) == limits.DEFAULT_RETENTION
    assert from_sources({}, {}).retention == timedelta(days=7)
    forms = {
        "7d": timedelta(days=7),
        "36h": timedelta(hours=36),
        "90m": timedelta(minutes=90),
        "90s": timedelta(seconds=90),
        "90": timedelta(seconds=90),
        "1500ms": timedelta(milliseconds=1500),
        "0": OFF,
        "off": OFF,
    }
    for text, expected in forms.items():
        assert from_sources({"retention": text}, {}).retention == expected, text
    assert from_sources({}, {"OPSCORE_RETENTION": "2h"}).retention == timedelta(hours=2)
    # The option wins over the variable.
    assert from_sources({"retention": "5s"}, {"OPSCORE_RETENTION": "2h"}).retention == (
        timedelta(seconds=5)
    )
    for bad in ("7 days", "-1d", "soon", "nan", "1e400d", "999999d"):
        with pytest.raises(ConfigError, match="retention"):
            from_sources({"retention": bad}, {})
    assert interval_for(timedelta(days=7)) == limits.RETENTION_MAX_INTERVAL
    assert interval_for(timedelta(seconds=1)) == limits.RETENTION_MIN_INTERVAL


@pytest.mark.backends("sqlite")
async def test_serve_help_and_bad_value_through_the_cli(tmp_path: Path) -> None:
    helped = await opscore("serve", "--help")
    assert helped.code == 0, helped
    assert "--retention" in helped.out and "OPSCORE_RETENTION" in helped.out
    bad = await opscore("serve", "--retention", "forever", "--db", str(tmp_path / "x.db"))
    assert bad.code == 2, bad
    assert "retention must be a duration" in bad.err and "7d" in bad.err
    assert not (tmp_path / "x.db").exists()


# ------------------------------------------------------------------ tasks


async def test_finished_tasks_before_the_cutoff_go_with_their_attempts(make_harness) -> None:
    h = await make_harness(retention=OFF)
    calls: dict[str, int] = {}

    def flaky(data: dict[str, Any], task: pb.Task) -> dict[str, Any]:
        calls[task.task_id] = calls.get(task.task_id, 0) + 1
        if calls[task.task_id] == 1:
            raise Fail("first attempt fails")
        return {"ok": True}

    worker = await Worker(h.channel, "w1", {"work": flaky}).start()
    try:
        retry = common_pb2.RetryPolicy(initial_backoff=dur(0.01), max_backoff=dur(0.01))
        old = await enqueue(h, capability="work", retry_policy=retry)
        assert (await final(h, old.task_id)).attempt == 2
        cancelled = await enqueue(h, capability="nobody")
        await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=cancelled.task_id))
        queued = await enqueue(h, capability="nobody")
        scheduled = await enqueue(h, capability="work", delay=dur(3600))
        cut = utcnow()
        recent = await enqueue(h, capability="work", retry_policy=retry)
        await final(h, recent.task_id)
    finally:
        await worker.stop()

    pruned = of(await prune(h, cut), "tasks", "task_attempts")
    assert pruned == {"tasks": 2, "task_attempts": 2}, pruned
    for gone in (old, cancelled):
        assert await task_gone(h, gone.task_id)
        await expect_error(
            h.dispatch.ListTaskAttempts(pb.ListTaskAttemptsRequest(task_id=gone.task_id)),
            NOT_FOUND,
        )
    kept = {queued.task_id, scheduled.task_id, recent.task_id}
    assert await listed_tasks(h) == kept
    attempts = await h.dispatch.ListTaskAttempts(pb.ListTaskAttemptsRequest(task_id=recent.task_id))
    assert len(attempts.attempts) == 2
    assert of(await prune(h, cut), "tasks") == {}, "a second pass finds nothing more"
    # Open tasks never go, however old.
    await prune(h, utcnow())
    assert await listed_tasks(h) == {queued.task_id, scheduled.task_id}


async def test_idempotency_key_is_remembered_until_its_task_goes(make_harness) -> None:
    h = await make_harness(retention=OFF)
    first = await enqueue(h, capability="nobody", idempotency_key="k1")
    await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=first.task_id))
    again = await h.dispatch.EnqueueTask(
        pb.EnqueueTaskRequest(capability="nobody", idempotency_key="k1")
    )
    assert (again.task.task_id, again.created) == (first.task_id, False)
    await prune(h, (await final_or_cancelled(h, first.task_id)) - timedelta(microseconds=1))
    assert not await task_gone(h, first.task_id), "finished after the cutoff: kept"
    assert await prune(h) == {"tasks": 1}
    fresh = await h.dispatch.EnqueueTask(
        pb.EnqueueTaskRequest(capability="nobody", idempotency_key="k1")
    )
    assert fresh.created and fresh.task.task_id != first.task_id
    if h.server.storage.kind == "sqlite":
        storage: Any = h.server.storage
        assert storage._keys.get("k1") == fresh.task.task_id


async def final_or_cancelled(h: Harness, task_id: str) -> datetime:
    t = (await h.dispatch.GetTask(pb.GetTaskRequest(task_id=task_id))).task
    assert t.state == TS.TASK_STATE_CANCELLED
    return t.finish_time.ToDatetime(tzinfo=UTC)


async def test_many_batches_remove_everything_expired(make_harness) -> None:
    h = await make_harness(retention=OFF)
    resp = await h.dispatch.EnqueueTasks(
        pb.EnqueueTasksRequest(
            tasks=[pb.EnqueueTaskRequest(capability="nobody") for _ in range(23)]
        )
    )
    for r in resp.results:
        await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=r.task.task_id))
    assert await prune(h, batch_rows=5) == {"tasks": 23}
    assert await listed_tasks(h) == set()


# ------------------------------------------------------------------ sessions


async def test_running_sessions_keep_their_tasks_finished_sessions_go_whole(
    make_harness,
) -> None:
    h = await make_harness(retention=OFF)
    d = definition(
        "chain",
        [{"id": "a", "capability": "a"}, {"id": "b", "capability": "b", "depends_on": ["a"]}],
    )
    await h.workflow.CreateWorkflowDefinition(wpb.CreateWorkflowDefinitionRequest(definition=d))
    first = await Worker(h.channel, "wa", {"a": lambda data, task: {"a": 1}}).start()
    try:
        started = await h.workflow.StartWorkflow(
            wpb.StartWorkflowRequest(definition_id="chain", idempotency_key="s-key")
        )
        sid = started.session.session_id

        async def a_done() -> str | None:
            s = (await h.workflow.GetSession(wpb.GetSessionRequest(session_id=sid))).session
            run = {r.workflow_task_id: r for r in s.task_runs}["a"]
            return run.task_id if run.state == wpb.TaskRunState.TASK_RUN_STATE_COMPLETED else None

        a_task = await eventually(a_done, what="task a completed")
    finally:
        await first.stop()
    assert "tasks" not in await prune(h), "a running session's finished task stays"
    assert not await task_gone(h, a_task)

    second = await Worker(h.channel, "wb", {"b": lambda data, task: {"b": 2}}).start()
    try:
        done = await wait_session(h, sid, wpb.SessionState.SESSION_STATE_COMPLETED)
    finally:
        await second.stop()
    finished = done.finish_time.ToDatetime(tzinfo=UTC)
    recent = await prune(h, finished - timedelta(microseconds=1))
    assert "sessions" not in recent and "tasks" not in recent, "finished after the cut"
    b_task = {r.workflow_task_id: r.task_id for r in done.task_runs}["b"]

    pruned = await prune(h)
    assert pruned["sessions"] == 1 and pruned["tasks"] == 2, pruned
    assert pruned["session_task_runs"] == 2 and pruned["session_definitions"] == 1, pruned
    assert pruned["session_events"] >= 4, pruned
    await expect_error(h.workflow.GetSession(wpb.GetSessionRequest(session_id=sid)), NOT_FOUND)
    with pytest.raises(grpc.aio.AioRpcError) as watch:
        async for _ in h.workflow.WatchSession(wpb.WatchSessionRequest(session_id=sid)):
            pass
    assert watch.value.code() == NOT_FOUND
    listed = await h.workflow.ListSessions(wpb.ListSessionsRequest())
    assert sid not in {s.session_id for s in listed.sessions}
    assert await task_gone(h, a_task) and await task_gone(h, b_task)
    # The session's idempotency key is free again.
    again = await h.workflow.StartWorkflow(
        wpb.StartWorkflowRequest(definition_id="chain", idempotency_key="s-key")
    )
    assert again.created and again.session.session_id != sid
    # The stored definition itself is the user's: retention never touches it.
    await h.workflow.GetWorkflowDefinition(wpb.GetWorkflowDefinitionRequest(definition_id="chain"))


async def test_a_session_bigger_than_a_batch_goes_over_several(make_harness) -> None:
    h = await make_harness(retention=OFF)
    tasks = [{"id": f"t{i:02d}", "capability": "fan"} for i in range(30)]
    await h.workflow.CreateWorkflowDefinition(
        wpb.CreateWorkflowDefinitionRequest(definition=definition("wide", tasks))
    )
    worker = await Worker(h.channel, "wf", {"fan": lambda d, t: {}}, max_in_flight=30).start()
    try:
        sid = (
            await h.workflow.StartWorkflow(wpb.StartWorkflowRequest(definition_id="wide"))
        ).session.session_id
        await wait_session(h, sid, wpb.SessionState.SESSION_STATE_COMPLETED)
    finally:
        await worker.stop()
    pruned = await prune(h, batch_rows=10)
    assert pruned["sessions"] == 1 and pruned["tasks"] == 30, pruned
    assert pruned["session_task_runs"] == 30 and pruned["session_definitions"] == 1, pruned
    assert pruned["session_events"] >= 60, pruned
    await expect_error(h.workflow.GetSession(wpb.GetSessionRequest(session_id=sid)), NOT_FOUND)
    assert not {"tasks", "sessions", "session_events"} & set(await prune(h))


# ------------------------------------------------------------------ agents and history


async def test_old_transitions_go_but_each_agents_latest_stays(make_harness) -> None:
    h = await make_harness(retention=OFF)
    for agent_id in ("quiet", "busy"):
        await h.register(agent_id)
        for state in (S.AGENT_STATE_IDLE, S.AGENT_STATE_ACTIVE, S.AGENT_STATE_IDLE):
            await h.lifecycle.ReportState(lpb.ReportStateRequest(agent_id=agent_id, state=state))
    cut = utcnow()
    await h.lifecycle.ReportState(
        lpb.ReportStateRequest(agent_id="busy", state=S.AGENT_STATE_ACTIVE)
    )
    # quiet: 1-3 of 1-4; busy: 1-4 of 1-5 (5 came after the cut).
    assert await prune(h, cut) == {"agent_transitions": 3 + 4}
    quiet = await history(h, "quiet")
    assert [t.sequence for t in quiet] == [4] and quiet[0].to_state == S.AGENT_STATE_IDLE
    assert [t.sequence for t in await history(h, "busy")] == [5]
    assert await listed_agents(h) == {"quiet", "busy"}, "live agents are never forgotten"
    assert await prune(h) == {}, "only the latest of each is left"
    assert len(await history(h, "quiet")) == 1 and len(await history(h, "busy")) == 1


async def test_agents_offline_or_finished_past_the_period_are_forgotten(make_harness) -> None:
    """The server's own loop, with a 1 s retention and a short agent timeout."""
    h = await make_harness(retention=timedelta(seconds=1), agent_timeout=timedelta(seconds=0.2))
    for agent_id in ("gone", "holder", "done", "left"):
        await h.register(agent_id, ["c"])
    await h.lifecycle.ReportState(
        lpb.ReportStateRequest(agent_id="done", state=S.AGENT_STATE_FINISHED)
    )
    await h.lifecycle.DeregisterAgent(lpb.DeregisterAgentRequest(agent_id="left"))
    # An open task pinned to "holder" keeps it, OFFLINE or not.
    pinned = await enqueue(h, agent_id="holder")
    idle = await Worker(h.channel, "idle", {"c": lambda d, t: {}}).start()
    try:
        for agent_id in ("gone", "done", "left"):
            await eventually(
                lambda a=agent_id: agent_gone(h, a), timeout=15, what=f"{agent_id} forgotten"
            )
        assert await listed_agents(h) == {"holder", "idle"}
        holder = (await h.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="holder"))).agent
        assert holder.state == S.AGENT_STATE_OFFLINE
        got = (await h.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="idle"))).agent
        assert got.state == S.AGENT_STATE_IDLE

        async def pruned_to_latest() -> bool:
            return len(await history(h, "idle")) == 1

        await eventually(pruned_to_latest, what="idle's history pruned to its latest")
        await expect_error(
            h.lifecycle.ListStateTransitions(lpb.ListStateTransitionsRequest(agent_id="gone")),
            NOT_FOUND,
        )
        # Enqueueing for a forgotten agent is refused; registering again starts afresh.
        await expect_error(
            h.dispatch.EnqueueTask(pb.EnqueueTaskRequest(agent_id="gone")), NOT_FOUND
        )
        again = await h.lifecycle.RegisterAgent(lpb.RegisterAgentRequest(agent_id="gone"))
        assert again.created
        assert [t.sequence for t in await history(h, "gone")] == [1]
    finally:
        await idle.stop()
    assert (await h.dispatch.GetTask(pb.GetTaskRequest(task_id=pinned.task_id))).task.state == (
        TS.TASK_STATE_QUEUED
    )


# ------------------------------------------------------------------ under load, restart


async def test_pruning_under_load_neither_loses_nor_doubles_tasks(make_harness) -> None:
    h = await make_harness(retention=timedelta(seconds=1))
    worker = await Worker(h.channel, "loader", {"load": lambda d, t: {"i": d["i"]}}, 16).start()
    enqueued: list[str] = []

    async def enqueue_batch(first: int, n: int) -> None:
        resp = await h.dispatch.EnqueueTasks(
            pb.EnqueueTasksRequest(
                tasks=[
                    pb.EnqueueTaskRequest(capability="load", input=struct(i=first + k))
                    for k in range(n)
                ]
            )
        )
        enqueued.extend(r.task.task_id for r in resp.results)

    try:
        for b in range(10):
            await enqueue_batch(b * 20, 20)
        # Pruning has begun (the first tasks expired) while the rest still arrive.
        await eventually(lambda: task_gone(h, enqueued[0]), timeout=15, what="pruning began")
        for b in range(10, 30):
            await enqueue_batch(b * 20, 20)
            await asyncio.sleep(0)  # let the agent and the pruner interleave with enqueues

        await eventually(lambda: len(worker.seen) >= len(enqueued), timeout=30, what="all seen")

        async def none_open() -> bool:
            for state in (TS.TASK_STATE_QUEUED, TS.TASK_STATE_ASSIGNED, TS.TASK_STATE_SCHEDULED):
                if await listed_tasks(h, state=state):
                    return False
            return True

        await eventually(none_open, what="every task finished")
    finally:
        await worker.stop()
    seen = [t.task_id for t in worker.seen]
    assert len(seen) == len(set(seen)) == len(enqueued) == 600, "each task exactly once"
    assert set(seen) == set(enqueued)
    assert {t.attempt for t in worker.seen} == {1}
    await eventually(lambda: listed_tasks_empty(h), timeout=15, what="everything pruned")


async def listed_tasks_empty(h: Harness) -> bool:
    return not await listed_tasks(h)


async def test_restart_after_prune_shows_nothing_pruned(make_harness, backend: str) -> None:
    h = await make_harness(retention=OFF, agent_timeout=timedelta(seconds=0.2))
    await h.register("ghost")
    await eventually(lambda: agent_state(h, "ghost", S.AGENT_STATE_OFFLINE), what="ghost OFFLINE")
    task = await enqueue(h, capability="nobody", idempotency_key="restart-key")
    await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=task.task_id))
    kept = await enqueue(h, capability="nobody")
    pruned = await prune(h)
    assert pruned["agents"] == 1 and pruned["tasks"] == 1, pruned
    if backend == "sqlite":
        storage: Any = h.server.storage
        assert "ghost" not in storage.agents and "ghost" not in storage._ids
        assert "ghost" not in storage._liveness
        assert task.task_id not in storage.tasks and "restart-key" not in storage._keys
    await h.restart()
    assert await agent_gone(h, "ghost")
    assert "ghost" not in await listed_agents(h)
    assert await task_gone(h, task.task_id)
    assert await listed_tasks(h) == {kept.task_id}
    again = await h.dispatch.EnqueueTask(
        pb.EnqueueTaskRequest(capability="nobody", idempotency_key="restart-key")
    )
    assert again.created
    if backend == "sqlite":
        conn = sqlite3.connect(h.config.db)
        try:
            counts = [
                conn.execute(sql).fetchone()[0]
                for sql in (
                    "SELECT COUNT(*) FROM agents WHERE agent_id = 'ghost'",
                    "SELECT COUNT(*) FROM agent_transitions WHERE agent_id = 'ghost'",
                    f"SELECT COUNT(*) FROM tasks WHERE task_id = '{task.task_id}'",
                )
            ]
        finally:
            conn.close()
        assert counts == [0, 0, 0]


async def agent_state(h: Harness, agent_id: str, state: int) -> bool:
    got = (await h.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id=agent_id))).agent
    return got.state == state


@pytest.mark.backends("postgres")
async def test_replicas_pruning_at_once_share_the_work(make_harness) -> None:
    one = await make_harness(retention=OFF)
    two = await make_harness(retention=OFF)
    resp = await one.dispatch.EnqueueTasks(
        pb.EnqueueTasksRequest(
            tasks=[pb.EnqueueTaskRequest(capability="nobody") for _ in range(120)]
        )
    )
    for r in resp.results:
        await two.dispatch.CancelTask(pb.CancelTaskRequest(task_id=r.task.task_id))
    for agent_id in (f"dead-{i}" for i in range(12)):
        await one.register(agent_id)
        await one.lifecycle.DeregisterAgent(lpb.DeregisterAgentRequest(agent_id=agent_id))
    results = await asyncio.gather(prune(one, batch_rows=7), prune(two, batch_rows=7))
    assert sum(r.get("tasks", 0) for r in results) == 120
    assert sum(r.get("agents", 0) for r in results) == 12
    assert await listed_tasks(one) == set() and await listed_agents(two) == set()


# ------------------------------------------------------------------ metrics


@pytest.mark.backends("sqlite")
async def test_pruned_rows_are_counted_by_kind(make_harness) -> None:
    from tests.test_metrics import scrape, value

    h = await make_harness(retention=OFF, metrics_listen="127.0.0.1:0")
    for _ in range(3):
        t = await enqueue(h, capability="nobody")
        await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=t.task_id))
    observer = h.server.observability.observer
    await Retention(h.server.storage, timedelta(days=1), observer=observer).run_once(utcnow())
    samples, _ = await scrape(h)
    assert value(samples, "opscore_retention_pruned_rows_total", kind="tasks") == 3


# ------------------------------------------------------------------ SQLite space


@pytest.mark.backends("sqlite")
async def test_new_file_is_incremental_and_pruning_gives_space_back(make_harness) -> None:
    h = await make_harness(retention=OFF)
    path = h.config.db

    def pages() -> tuple[int, int, int]:
        conn = sqlite3.connect(path)
        try:
            return tuple(  # type: ignore[return-value]
                conn.execute(f"PRAGMA {p}").fetchone()[0]
                for p in ("auto_vacuum", "page_count", "freelist_count")
            )
        finally:
            conn.close()

    assert pages()[0] == 2, "created with auto_vacuum = INCREMENTAL"
    big = struct(blob="x" * 200_000)
    for _ in range(4):
        resp = await h.dispatch.EnqueueTasks(
            pb.EnqueueTasksRequest(
                tasks=[pb.EnqueueTaskRequest(capability="nobody", input=big) for _ in range(10)]
            )
        )
        for r in resp.results:
            await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=r.task.task_id))
    _, full, _ = pages()
    assert full > 40 * 200_000 // 4096
    assert (await prune(h))["tasks"] == 40
    _, after, free = pages()
    assert after < full // 4, (full, after)
    assert free < limits.RETENTION_VACUUM_PAGES


@pytest.mark.backends("sqlite")
async def test_existing_files_are_converted_at_start_or_by_db_vacuum(
    make_harness, tmp_path: Path, monkeypatch, caplog
) -> None:
    from opscore.storage.sqlite import apply_migrations

    def old_file(name: str) -> str:
        path = str(tmp_path / name)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        apply_migrations(conn, target=4)  # as an Ops-Core before retention made it
        conn.close()
        return path

    def mode(path: str) -> int:
        conn = sqlite3.connect(path)
        try:
            return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
        finally:
            conn.close()

    small = old_file("small.db")
    assert mode(small) == 0
    h = await make_harness(db=small, retention=OFF)
    assert mode(small) == 2, "a small file is converted at start"
    await h.stop()

    big = old_file("big.db")
    monkeypatch.setattr(limits, "STARTUP_VACUUM_MAX_BYTES", 0)
    h = await make_harness(db=big, retention=OFF)
    assert mode(big) == 0
    assert any("opscore db vacuum" in r.getMessage() for r in caplog.records)
    refused = await opscore("db", "vacuum", "--db", big)
    assert refused.code == 1 and "in use by another Ops-Core server" in refused.err, refused
    await h.stop()
    done = await opscore("db", "vacuum", "--db", big)
    assert done.code == 0 and "incremental auto-vacuum is on" in done.out, done
    assert mode(big) == 2
    missing = await opscore("db", "vacuum", "--db", str(tmp_path / "none.db"))
    assert missing.code == 1 and "no database" in missing.err


# ------------------------------------------------------------------ query plans


@pytest.mark.backends("sqlite")
def test_sqlite_prune_queries_walk_their_indexes(tmp_path: Path) -> None:
    from opscore.storage.sqlite import apply_migrations
    from opscore.storage.sqlite import retention as lite

    conn = sqlite3.connect(tmp_path / "plan.db", isolation_level=None)
    apply_migrations(conn)
    for sql, index in (
        (lite._TASKS, "tasks_finished"),
        (lite._SESSIONS, "sessions_finished"),
        (lite._TRANSITIONS, "agent_transitions_by_record_time"),
    ):
        plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, [1, 10]))
        assert f"INDEX {index} (" in plan, plan
        assert "SCAN" not in plan, plan
    conn.close()


@pytest.mark.backends("postgres")
async def test_postgres_prune_queries_walk_their_indexes(db_url: str) -> None:
    import json

    from opscore.storage.postgres import retention as pgr
    from opscore.storage.postgres.pool import PgSettings, connect

    conn = await connect(PgSettings.from_url(db_url))
    try:
        await conn.execute("SET enable_seqscan = off")
        for sql, index in (
            (pgr._TASKS, "tasks_finished"),
            (pgr._SESSIONS, "sessions_finished"),
            (pgr._AGENTS.replace("FOR UPDATE OF a SKIP LOCKED", ""), "agents_pkey"),
        ):
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", 1, 10)
            assert index in json.dumps(json.loads(raw)), raw
        raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {pgr._TRANSITIONS}", 1, 10)
        assert "agent_transitions_by_record_time" in raw, raw
    finally:
        await conn.close()
