"""The PostgreSQL backend's statements that are built from the column lists
(storage/rows.py): upserts, the batch forms over arrays (one statement for a
batch's rows instead of one per row), and ListTasks/ListSessions built per
filter."""

from __future__ import annotations

from typing import Any

from opscore.models import TaskFilter
from opscore.storage import rows as R
from opscore.storage.pages import decode_cursor

TASK_COLS = R.TASK_COLS
TASK_N = len(TASK_COLS.split(","))
TASK_UPSERT = (
    f"INSERT INTO tasks ({TASK_COLS}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, TASK_N + 1))}) "
    "ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in R.TASK_MUTABLE)
)
# New tasks (an enqueue's hundreds) as one INSERT over arrays, in their order
# (`seq` is the listing order): one statement instead of one per row. An upsert
# still: a task not read here may exist (a lost race).
TASK_FIXED_TYPES = (
    "text", "text", "text", "text", "bytea", "integer", "integer", "bigint",
    "double precision", "bigint", "bigint", "bigint", "text", "text", "text", "bigint",
)  # fmt: skip
# Tasks read in the transaction are rewritten with one UPDATE over arrays (one
# statement for the batch, only the mutable columns), cheaper than an upsert per row.
TASK_MUTABLE_TYPES = (
    "integer", "integer", "text", "bigint", "bigint", "bigint", "bytea", "text", "text",
    "bytea", "bytea", "boolean", "bigint", "bigint", "bigint",
)  # fmt: skip
TASK_FIRST_MUTABLE = len(R.TASK_FIXED.split(","))
TASK_UPDATE = (
    "UPDATE tasks t SET "
    + ", ".join(f"{c} = u.{c}" for c in R.TASK_MUTABLE)
    + " FROM unnest($1::text[], "
    + ", ".join(f"${i + 2}::{ty}[]" for i, ty in enumerate(TASK_MUTABLE_TYPES))
    + ") AS u (task_id, "
    + ", ".join(R.TASK_MUTABLE)
    + ") WHERE t.task_id = u.task_id"
)
TASK_ALL_TYPES = (*TASK_FIXED_TYPES, *TASK_MUTABLE_TYPES, "text")
assert len(TASK_ALL_TYPES) == TASK_N
TASK_INSERT_MANY = (
    f"INSERT INTO tasks ({TASK_COLS}) SELECT "
    + ", ".join(f"u.c{i}" for i in range(TASK_N))
    + " FROM unnest("
    + ", ".join(f"${i + 1}::{ty}[]" for i, ty in enumerate(TASK_ALL_TYPES))
    + ") WITH ORDINALITY AS u ("
    + ", ".join(f"c{i}" for i in range(TASK_N))
    + ", n) ORDER BY u.n ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in R.TASK_MUTABLE)
)
AGENT_N = len(R.AGENT_COLS.split(","))
AGENT_UPSERT = (
    f"INSERT INTO agents ({R.AGENT_COLS}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, AGENT_N + 1))}) ON CONFLICT (agent_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in R.AGENT_UPDATED)
)
TRANSITION_INSERT = (
    f"INSERT INTO agent_transitions ({R.TRANSITION_COLS}) VALUES "
    "($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING"
)
# Attempts as one INSERT over arrays, parameters from $1 (or from `first`): alone,
# or in the tasks UPDATE's statement (one round trip for both, the usual case:
# an attempt ends when its task changes).
ATTEMPT_TYPES = (
    "text", "integer", "text", "integer", "bigint", "bigint", "text", "text", "bytea", "bytea",
)  # fmt: skip


def attempt_upsert(first: int = 1) -> str:
    arrays = ", ".join(f"${first + i}::{ty}[]" for i, ty in enumerate(ATTEMPT_TYPES))
    return (
        f"INSERT INTO task_attempts ({R.ATTEMPT_COLS}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (task_id, attempt) DO UPDATE SET "
        "outcome = EXCLUDED.outcome, end_time = EXCLUDED.end_time, "
        "error_message = EXCLUDED.error_message, error_type = EXCLUDED.error_type, "
        "error_details = EXCLUDED.error_details, progress = EXCLUDED.progress"
    )


ATTEMPT_UPSERT = attempt_upsert()
TASK_UPDATE_AND_ATTEMPTS = (
    f"WITH attempts AS ({attempt_upsert(len(TASK_MUTABLE_TYPES) + 2)}) {TASK_UPDATE}"
)
SESSION_UPSERT = (
    f"INSERT INTO sessions ({R.SESSION_COLS}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, R.SESSION_NCOLS + 1))}) "
    "ON CONFLICT (session_id) DO UPDATE SET "
    + ", ".join(
        f"{c} = EXCLUDED.{c}"
        for c in (
            "state",
            "output",
            "error_message",
            "error_type",
            "error_details",
            "update_time",
            "finish_time",
        )
    )
)
RUN_UPSERT = (
    f"INSERT INTO session_task_runs ({R.RUN_COLS}) VALUES "
    "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
    "ON CONFLICT (session_id, workflow_task_id) DO UPDATE SET "
    + ", ".join(
        f"{c} = EXCLUDED.{c}"
        for c in (
            "task_id",
            "state",
            "attempt",
            "output",
            "error_message",
            "error_type",
            "error_details",
            "start_time",
            "finish_time",
        )
    )
)


def list_tasks_query(flt: TaskFilter, page_token: str, n: int) -> tuple[str, list[Any]]:
    """ListTasks' query: the newest `n` tasks matching `flt`, after the cursor."""
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if page_token:
        where.append(f"seq < {arg(decode_cursor(page_token, int)[0])}")
    if flt.state:
        where.append(f"state = {arg(int(flt.state))}")
        term = R.task_state_index_term(flt.state, postgres=True)
        if term is not None:
            where.append(term)
    if flt.capability:
        where.append(f"capability = {arg(flt.capability)}")
    if flt.session_id:
        # The repeated "<> ''" lets a generic plan use the partial index too.
        where.append(f"session_id = {arg(flt.session_id)} AND session_id <> ''")
    page = arg(n)
    if flt.agent_id:
        # Each side walks its own index from the newest and stops after a page;
        # one "agent_id = a OR assigned_agent_id = a" reads every task of
        # the agent and sorts them, for every page.
        a = arg(flt.agent_id)
        sides = [
            "(SELECT seq FROM tasks WHERE "
            + " AND ".join([f"{column} = {a} AND {column} <> ''", *where])
            + f" ORDER BY seq DESC LIMIT {page})"
            for column in ("agent_id", "assigned_agent_id")
        ]
        sql = f"SELECT seq, {TASK_COLS} FROM tasks WHERE seq IN ({' UNION '.join(sides)})"
    else:
        sql = f"SELECT seq, {TASK_COLS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY seq DESC LIMIT {page}"
    return sql, args


def list_sessions_query(
    state: int, definition_id: str, page_token: str, n: int
) -> tuple[str, list[Any]]:
    """ListSessions' query. Built per filter rather than one statement with
    `($1 = 0 OR state = $1)` terms: under a generic plan those read every
    session newest first whatever the filter, as a filter on each row."""
    where: list[str] = []
    args: list[Any] = []
    if page_token:
        args.append(decode_cursor(page_token, int)[0])
        where.append(f"seq < ${len(args)}")
    if state:
        args.append(state)
        where.append(f"state = ${len(args)}")
        term = R.session_state_index_term(state)
        if term is not None:
            where.append(term)
    if definition_id:
        args.append(definition_id)
        where.append(f"definition_id = ${len(args)}")
    sql = f"SELECT seq, {R.SESSION_COLS} FROM sessions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    args.append(n)
    return sql + f" ORDER BY seq DESC LIMIT ${len(args)}", args


# Streams on live replicas: what makes an agent live with no call of its own.
LIVE_STREAMS = (
    "SELECT COALESCE(SUM(s.streams), 0) FROM agent_streams s JOIN replicas r USING (replica_id) "
    "WHERE s.agent_id = $1 AND r.heartbeat_time > opscore_now_us() - $2"
)
