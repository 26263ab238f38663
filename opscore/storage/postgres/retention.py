"""Retention on PostgreSQL: the SQL that finds and removes what has expired.

Each batch is a short transaction of its own on a pooled connection, beside the
replica's executor, never in its queue: operations do not wait behind a prune.
Candidates are locked with `FOR UPDATE SKIP LOCKED`, so a prune never waits on
a row an operation holds (that row is left for a later batch) and several
replicas pruning at once each take different rows. An operation that reads a
row a prune holds waits for it, and then finds it gone: an agent forgotten is
NOT_FOUND, a task id unknown, exactly as after the commit.

Each agent's latest transition survives concurrent prunes: a row is removed only
while a later one of the same agent exists, and rows are only ever added later.

Space is given back by autovacuum (dead rows are reused, then truncated when at
the end of a table); `reclaim` has nothing to do here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from opscore.clock import to_micros
from opscore.storage.api import Pruned, PruneKind
from opscore.storage.postgres.pool import DatabaseUnavailable, is_connection_error

_TASKS = (
    "SELECT t.task_id, t.attempt FROM tasks t WHERE t.state IN (4, 5, 6) "
    "AND t.finish_time < $1 AND (t.session_id = '' OR NOT EXISTS (SELECT 1 FROM "
    "sessions s WHERE s.session_id = t.session_id "
    "AND (s.state IN (1, 2) OR s.finish_time >= $1))) "
    "ORDER BY t.finish_time LIMIT $2 FOR UPDATE OF t SKIP LOCKED"
)
_SESSIONS = (
    "SELECT s.session_id FROM sessions s WHERE s.state IN (3, 4, 5) AND s.finish_time < $1 "
    "AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.session_id = s.session_id "
    "AND t.session_id <> '' AND t.state IN (1, 2, 3)) "
    "ORDER BY s.finish_time LIMIT $2 FOR UPDATE OF s SKIP LOCKED"
)
# A big session's children go over several batches, its row last.
_SESSION_CHILDREN = (
    (
        "session_events",
        "DELETE FROM session_events WHERE session_id = $1 AND sequence IN "
        "(SELECT sequence FROM session_events WHERE session_id = $1 "
        "ORDER BY sequence LIMIT $2)",
    ),
    (
        "session_task_runs",
        "DELETE FROM session_task_runs WHERE session_id = $1 AND workflow_task_id IN "
        "(SELECT workflow_task_id FROM session_task_runs WHERE session_id = $1 "
        "ORDER BY workflow_task_id LIMIT $2)",
    ),
    ("session_definitions", "DELETE FROM session_definitions WHERE session_id = $1"),
)
_TRANSITIONS = (
    "WITH doomed AS (SELECT t.agent_id, t.sequence FROM agent_transitions t "
    "WHERE t.record_time < $1 AND t.sequence < (SELECT MAX(m.sequence) FROM "
    "agent_transitions m WHERE m.agent_id = t.agent_id) "
    "ORDER BY t.record_time LIMIT $2 FOR UPDATE SKIP LOCKED) "
    "DELETE FROM agent_transitions x USING doomed d "
    "WHERE x.agent_id = d.agent_id AND x.sequence = d.sequence"
)
# Forgettable agents: OFFLINE (6), FINISHED (5) or deregistered, neither seen nor
# changed since the cutoff, with no stream recorded on any replica, no open task
# pinned to it or leased by it and no running session pinned to it. The row lock
# keeps a concurrent operation on the agent (a register, an enqueue pinned to
# it) either before the prune (skipped) or after it (the agent is gone).
_AGENTS = (
    "SELECT a.agent_id FROM agents a WHERE (a.deregistered OR a.state IN (5, 6)) "
    "AND GREATEST(a.state_change_time, a.last_seen_time) < $1 "
    "AND NOT EXISTS (SELECT 1 FROM agent_streams s WHERE s.agent_id = a.agent_id) "
    "AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.agent_id = a.agent_id "
    "AND t.agent_id <> '' AND t.state IN (1, 2, 3)) "
    "AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.assigned_agent_id = a.agent_id "
    "AND t.state = 3) "
    "AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.agent_id = a.agent_id "
    "AND s.state IN (1, 2)) "
    "ORDER BY a.agent_id LIMIT $2 FOR UPDATE OF a SKIP LOCKED"
)


async def prune(pool: asyncpg.Pool, kind: PruneKind, before: datetime, budget: int) -> Pruned:
    """One batch, in one transaction on a connection of `pool`."""
    try:
        async with pool.acquire() as conn:
            return await _prune(conn, kind, before, max(1, budget))
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"the database cannot be reached ({exc})") from exc
    except asyncpg.PostgresError as exc:
        if is_connection_error(exc):
            raise DatabaseUnavailable(f"the database cannot be reached ({exc})") from exc
        raise


async def _prune(
    conn: asyncpg.Connection, kind: PruneKind, before: datetime, budget: int
) -> Pruned:
    cutoff = to_micros(before)
    async with conn.transaction():
        if kind == "tasks":
            return await _tasks(conn, cutoff, budget)
        if kind == "sessions":
            return await _sessions(conn, cutoff, budget)
        if kind == "transitions":
            n = _count(await conn.execute(_TRANSITIONS, cutoff, budget))
            return Pruned(_nonzero(agent_transitions=n), n >= budget)
        if kind == "agents":
            return await _agents(conn, cutoff, budget)
    raise ValueError(f"unknown prune kind {kind!r}")


async def _tasks(conn: asyncpg.Connection, cutoff: Any, budget: int) -> Pruned:
    rows = await conn.fetch(_TASKS, cutoff, budget)
    ids: list[str] = []
    cost = 0
    for task_id, attempt in rows:
        # Ended attempts have a row each: at most `attempt` of them.
        size = 1 + attempt
        if ids and cost + size > budget:
            break
        ids.append(task_id)
        cost += size
    if not ids:
        return Pruned({}, False)
    attempts = _count(
        await conn.execute("DELETE FROM task_attempts WHERE task_id = ANY($1::text[])", ids)
    )
    tasks = _count(await conn.execute("DELETE FROM tasks WHERE task_id = ANY($1::text[])", ids))
    more = len(rows) >= budget or len(ids) < len(rows)
    return Pruned(_nonzero(tasks=tasks, task_attempts=attempts), more)


async def _sessions(conn: asyncpg.Connection, cutoff: Any, budget: int) -> Pruned:
    rows = await conn.fetch(_SESSIONS, cutoff, budget)
    counts = dict.fromkeys(
        ("sessions", "session_events", "session_task_runs", "session_definitions"), 0
    )
    left = budget
    finished_all = True
    for (session_id,) in rows:
        whole = True
        for table, sql in _SESSION_CHILDREN:
            if left <= 0:
                whole = False
                break
            if table == "session_definitions":
                n = _count(await conn.execute(sql, session_id))
            else:
                n = _count(await conn.execute(sql, session_id, left))
                if n >= left:
                    whole = False  # there may be more of them: the session stays for now
            counts[table] += n
            left -= n
            if not whole:
                break
        if whole and left > 0:
            counts["sessions"] += _count(
                await conn.execute("DELETE FROM sessions WHERE session_id = $1", session_id)
            )
            left -= 1
        else:
            finished_all = False
            break
    more = len(rows) >= budget or not finished_all
    return Pruned(_nonzero(**counts), more and bool(rows))


async def _agents(conn: asyncpg.Connection, cutoff: Any, budget: int) -> Pruned:
    ids = [r[0] for r in await conn.fetch(_AGENTS, cutoff, budget)]
    if not ids:
        return Pruned({}, False)
    transitions = _count(
        await conn.execute("DELETE FROM agent_transitions WHERE agent_id = ANY($1::text[])", ids)
    )
    agents = _count(await conn.execute("DELETE FROM agents WHERE agent_id = ANY($1::text[])", ids))
    return Pruned(_nonzero(agents=agents, agent_transitions=transitions), len(ids) >= budget)


def _count(status: str) -> int:
    """Rows of a command tag such as 'DELETE 12'."""
    return int(status.rsplit(" ", 1)[-1])


def _nonzero(**counts: int) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}
