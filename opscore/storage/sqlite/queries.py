"""The SELECTs of the SQLite backend that are built per call: pages of ListTasks
and ListSessions by their filters, and tasks by idempotency key. Each shape is
chosen so that SQLite walks one index and stops after a page (the reasons are
with each builder)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from opscore.models import Task, TaskFilter
from opscore.storage.pages import decode_cursor
from opscore.storage.rows import (
    SESSION_COLS,
    TASK_COLS,
    session_state_index_term,
    task_from_row,
    task_state_index_term,
)

# Idempotency keys looked up per SELECT (a power of two: see key_reads).
KEYS_PER_READ = 512


def key_reads(keys: list[str]) -> Iterator[tuple[str, list[str]]]:
    """SELECTs of the tasks with these keys, padded to a power of two keys each
    (repeating one): few distinct statements for sqlite3's statement cache."""
    for start in range(0, len(keys), KEYS_PER_READ):
        chunk = keys[start : start + KEYS_PER_READ]
        size = 1 << (len(chunk) - 1).bit_length()
        sql = f"SELECT {TASK_COLS} FROM tasks WHERE idempotency_key IN ({', '.join('?' * size)})"
        yield sql, chunk + [chunk[-1]] * (size - len(chunk))


def by_key(rows: Iterable[Any]) -> dict[str, Task]:
    tasks = (task_from_row(r) for r in rows)
    return {t.idempotency_key: t for t in tasks}


def list_tasks_query(flt: TaskFilter, page_token: str, n: int) -> tuple[str, list[Any]]:
    """ListTasks' query: the newest `n` tasks matching `flt`, after the cursor."""
    where: list[str] = []
    params: list[Any] = []
    if page_token:
        where.append("rowid < ?")
        params.append(decode_cursor(page_token, int)[0])
    if flt.state:
        where.append("state = ?")
        params.append(int(flt.state))
        term = task_state_index_term(flt.state)
        if term is not None:
            where.append(term)
    if flt.capability:
        where.append("capability = ?")
        params.append(flt.capability)
    if flt.session_id:
        where.append("session_id = ?")
        params.append(flt.session_id)
    if flt.agent_id:
        return _pinned_or_assigned(where, params, flt.agent_id, n)
    sql = f"SELECT rowid, {TASK_COLS} FROM tasks"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + " ORDER BY rowid DESC LIMIT ?", [*params, n]


def list_sessions_query(
    state: int, definition_id: str, page_token: str, n: int
) -> tuple[str, list[Any]]:
    """ListSessions' query: the newest `n` sessions matching, after the cursor."""
    where: list[str] = []
    params: list[Any] = []
    if page_token:
        where.append("rowid < ?")
        params.append(decode_cursor(page_token, int)[0])
    if state:
        where.append("state = ?")
        params.append(state)
        term = session_state_index_term(state)
        if term is not None:
            where.append(term)
    if definition_id:
        where.append("definition_id = ?")
        params.append(definition_id)
    sql = f"SELECT rowid, {SESSION_COLS} FROM sessions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + " ORDER BY rowid DESC LIMIT ?", [*params, n]


def _pinned_or_assigned(
    where: list[str], params: list[Any], agent_id: str, n: int
) -> tuple[str, list[Any]]:
    """The newest `n` tasks pinned to or assigned to `agent_id` (and matching
    `where`). Each side walks its own index backwards from the newest and stops
    after `n`; written as one `agent_id = ? OR assigned_agent_id = ?`, SQLite
    reads every task of the agent and sorts them, for every page."""
    sides = []
    side_params: list[Any] = []
    for column in ("agent_id", "assigned_agent_id"):
        sides.append(
            "SELECT r FROM (SELECT rowid AS r FROM tasks WHERE "
            + " AND ".join([f"{column} = ?", *where])
            + " ORDER BY rowid DESC LIMIT ?)"
        )
        side_params += [agent_id, *params, n]
    sql = (
        f"SELECT rowid, {TASK_COLS} FROM tasks WHERE rowid IN ({' UNION '.join(sides)}) "
        "ORDER BY rowid DESC LIMIT ?"
    )
    return sql, [*side_params, n]
