"""Retention on SQLite: the SQL that finds and removes what has expired, and
giving the space back to the file system.

A prune batch is an operation like any other: its candidates are read on the
reader connection (committed rows), then, without awaiting anything, checked
against the in-memory state (which may be ahead of the file), dropped from it
and recorded as DELETEs in the group-commit writer's next batch. The writer
applies them before that batch's upserts, in the same transaction as the other
operations' rows, so a prune never runs beside a commit, and a row removed from
memory is removed from the file in the same commit (nothing leaks, nothing
comes back after a restart).

Space: a file created with `auto_vacuum = INCREMENTAL` gives pages freed by
prunes back with `PRAGMA incremental_vacuum(N)`, run between two commits
(`reclaim`). The mode can only be chosen while a file is empty, or by
rewriting it with VACUUM: new files are created incremental; an existing file
is converted at start when small (`prepare_file`), otherwise by
`opscore db vacuum` while the server is stopped (`vacuum`). Without it, freed
pages are reused by new rows (the file stops growing) but never returned.
"""

from __future__ import annotations

import bisect
import logging
import os
import sqlite3
from datetime import datetime
from typing import TYPE_CHECKING, Any

from opscore import limits
from opscore.clock import to_micros
from opscore.errors import ConfigError
from opscore.models import AgentState
from opscore.storage.api import Pruned, PruneKind
from opscore.storage.sqlite.lock import DatabaseLock

if TYPE_CHECKING:
    from opscore.storage.sqlite.backend import SQLiteStorage

log = logging.getLogger("opscore.storage")

INCREMENTAL = 2  # PRAGMA auto_vacuum: 0 none, 1 full, 2 incremental

# Oldest first, through the partial indexes of migration 0005. A session's
# tasks go with it: kept while it runs or finished after the cutoff (it refers
# to them); the SQL skips them so that they never crowd a batch out.
_TASKS = (
    "SELECT t.task_id, t.session_id, t.idempotency_key, "
    "(SELECT COUNT(*) FROM task_attempts a WHERE a.task_id = t.task_id) "
    "FROM tasks t WHERE t.state IN (4, 5, 6) AND t.finish_time < ?1 "
    "AND (t.session_id = '' OR NOT EXISTS (SELECT 1 FROM sessions s "
    "WHERE s.session_id = t.session_id AND (s.state IN (1, 2) OR s.finish_time >= ?1))) "
    "ORDER BY t.finish_time LIMIT ?2"
)
_SESSIONS = (
    "SELECT s.session_id, s.idempotency_key, "
    "(SELECT COUNT(*) FROM session_events e WHERE e.session_id = s.session_id), "
    "(SELECT COUNT(*) FROM session_task_runs r WHERE r.session_id = s.session_id), "
    "(SELECT COUNT(*) FROM session_definitions d WHERE d.session_id = s.session_id) "
    "FROM sessions s WHERE s.state IN (3, 4, 5) AND s.finish_time < ? "
    "AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.session_id = s.session_id "
    "AND t.state IN (1, 2, 3)) "
    "ORDER BY s.finish_time LIMIT ?"
)
# Each agent's latest transition stays, so a live agent's history is never empty.
_TRANSITIONS = (
    "SELECT t.agent_id, t.sequence FROM agent_transitions t WHERE t.record_time < ? "
    "AND t.sequence < (SELECT MAX(m.sequence) FROM agent_transitions m "
    "WHERE m.agent_id = t.agent_id) "
    "ORDER BY t.record_time LIMIT ?"
)

_DELETE = {
    "tasks": "DELETE FROM tasks WHERE task_id = ?",
    "task_attempts": "DELETE FROM task_attempts WHERE task_id = ?",
    "sessions": "DELETE FROM sessions WHERE session_id = ?",
    "session_definitions": "DELETE FROM session_definitions WHERE session_id = ?",
    "session_task_runs": "DELETE FROM session_task_runs WHERE session_id = ?",
    "session_events": "DELETE FROM session_events WHERE session_id = ?",
    "agents": "DELETE FROM agents WHERE agent_id = ?",
    "agent_transitions": "DELETE FROM agent_transitions WHERE agent_id = ?",
}
# Part of one big session's children, up to a key (a session with thousands of
# tasks is removed over several batches; its row goes last).
_DELETE_UP_TO = {
    "session_events": "DELETE FROM session_events WHERE session_id = ? AND sequence <= ?",
    "session_task_runs": (
        "DELETE FROM session_task_runs WHERE session_id = ? AND workflow_task_id <= ?"
    ),
}
_NTH_KEY = {
    "session_events": (
        "SELECT sequence FROM session_events WHERE session_id = ? "
        "ORDER BY sequence LIMIT 1 OFFSET ?"
    ),
    "session_task_runs": (
        "SELECT workflow_task_id FROM session_task_runs WHERE session_id = ? "
        "ORDER BY workflow_task_id LIMIT 1 OFFSET ?"
    ),
}
_FORGETTABLE = (AgentState.OFFLINE, AgentState.FINISHED)


async def prune(s: SQLiteStorage, kind: PruneKind, before: datetime, budget: int) -> Pruned:
    s.check_writable()
    budget = max(1, budget)
    if kind == "tasks":
        return await _tasks(s, before, budget)
    if kind == "sessions":
        return await _sessions(s, before, budget)
    if kind == "transitions":
        return await _transitions(s, before, budget)
    if kind == "agents":
        return await _agents(s, before, budget)
    raise ValueError(f"unknown prune kind {kind!r}")


async def _tasks(s: SQLiteStorage, before: datetime, budget: int) -> Pruned:
    rows = await s.store._fetchall(_TASKS, [to_micros(before), budget])
    chosen: list[tuple[str, str | None, int]] = []
    cost = 0
    for task_id, session_id, key, attempts in rows:
        if chosen and cost + 1 + attempts > budget:
            break
        if session_id and session_id in s.sessions:
            continue  # running in memory, not yet in the file
        chosen.append((task_id, key, attempts))
        cost += 1 + attempts
    more = len(rows) >= budget or len(chosen) < len(rows)
    if not chosen:
        return Pruned({}, more)
    store = s.store
    with store.atomic():
        ids = set()
        for task_id, key, _ in chosen:
            task = s.tasks.get(task_id)
            if task is not None:
                if not task.is_final:
                    continue  # never: a finished task does not reopen
                del s.tasks[task_id]  # its eviction after commit had not run yet
            if key and s._keys.get(key) == task_id:
                del s._keys[key]
            ids.add(task_id)
        store.drop_pending("tasks", lambda k: k in ids)
        store.drop_pending("task_attempts", lambda k: k[0] in ids)
        params = [(t,) for t in sorted(ids)]
        store.purge(_DELETE["task_attempts"], params)
        store.purge(_DELETE["tasks"], params)
    await store.commit()
    attempts = sum(n for t, _, n in chosen if t in ids)
    return Pruned(_nonzero(tasks=len(ids), task_attempts=attempts), more)


async def _sessions(s: SQLiteStorage, before: datetime, budget: int) -> Pruned:
    store = s.store
    rows = await store._fetchall(_SESSIONS, [to_micros(before), budget])
    whole: list[tuple[str, str | None, int, int, int]] = []
    part: tuple[str, dict[str, Any], dict[str, int]] | None = None
    cost = 0
    for sid, key, events, runs, defs in rows:
        if sid in s.sessions:
            continue  # running in memory: never (a finished session stays finished)
        size = 1 + events + runs + defs
        if cost + size <= budget or (not whole and not events + runs):
            whole.append((sid, key, events, runs, defs))
            cost += size
            continue
        if not whole:
            # One session bigger than a batch: this batch takes part of its
            # events (then of its runs); its row goes in a later one.
            part = (sid, *await _part_of(s, sid, events, runs, budget))
        break
    more = len(rows) >= budget or len(whole) < len(rows)
    if not whole and part is None:
        return Pruned({}, more)
    with store.atomic():
        ids = {w[0] for w in whole}
        keys = {w[1] for w in whole if w[1]}
        for key in keys:
            if s._session_keys.get(key) in ids:
                del s._session_keys[key]
        for table in ("sessions", "session_definitions"):
            store.drop_pending(table, lambda k: k in ids)
        store.drop_pending("session_task_runs", lambda k: k[0] in ids)
        store.drop_pending("session_events", lambda r: r[0] in ids)
        params = [(sid,) for sid in sorted(ids)]
        for table in ("session_events", "session_task_runs", "session_definitions", "sessions"):
            store.purge(_DELETE[table], params)
        if part is not None:
            sid, upto, _ = part
            for table, last in upto.items():
                store.purge(_DELETE_UP_TO[table], [(sid, last)])
    await store.commit()
    counts = {
        "sessions": len(whole),
        "session_events": sum(w[2] for w in whole),
        "session_task_runs": sum(w[3] for w in whole),
        "session_definitions": sum(w[4] for w in whole),
    }
    if part is not None:
        for table, n in part[2].items():
            counts[table] += n
    return Pruned(_nonzero(**counts), more or part is not None)


async def _part_of(
    s: SQLiteStorage, sid: str, events: int, runs: int, budget: int
) -> tuple[dict[str, Any], dict[str, int]]:
    """Up to which key this batch removes a big session's events, then runs;
    and how many rows that is of each."""
    upto: dict[str, Any] = {}
    counts = {"session_events": 0, "session_task_runs": 0}
    left = budget
    for table, have in (("session_events", events), ("session_task_runs", runs)):
        if left <= 0 or have == 0:
            continue
        take = min(left, have)
        found = await s.store._fetchall(_NTH_KEY[table], [sid, take - 1])
        if found:
            upto[table] = found[0][0]
            counts[table] = take
            left -= take
    return upto, counts


async def _transitions(s: SQLiteStorage, before: datetime, budget: int) -> Pruned:
    rows = await s.store._fetchall(_TRANSITIONS, [to_micros(before), budget])
    if not rows:
        return Pruned({}, False)
    # Old rows: nothing pending can refer to them (only the latest is ever
    # rewritten, and it is never among them).
    s.store.purge(
        "DELETE FROM agent_transitions WHERE agent_id = ? AND sequence = ?",
        [(r[0], r[1]) for r in rows],
    )
    await s.store.commit()
    return Pruned({"agent_transitions": len(rows)}, len(rows) >= budget)


def _forgettable(s: SQLiteStorage, before: datetime) -> list[str]:
    found = []
    for agent in s.agents.values():
        if agent.open_subscriptions > 0:
            continue
        if not (agent.deregistered or agent.state in _FORGETTABLE):
            continue
        if max(agent.state_change_time, agent.last_seen_time) >= before:
            continue
        found.append(agent.agent_id)
    if not found:
        return found
    # Agents an open task or a running session still names: pinned tasks wait
    # for their agent to come back, leases end only through it.
    named = set(s._held)
    named.update(t.agent_id for t in s.tasks.values() if t.agent_id and not t.is_final)
    for live in s.sessions.values():
        pinned = live.session.agent_id  # type: ignore[attr-defined]
        if pinned:
            named.add(pinned)
    return sorted(a for a in found if a not in named)


async def _agents(s: SQLiteStorage, before: datetime, budget: int) -> Pruned:
    candidates = _forgettable(s, before)[:budget]
    if not candidates:
        return Pruned({}, False)
    store = s.store
    marks = ", ".join("?" * len(candidates))
    counted = await store._fetchall(
        f"SELECT agent_id, COUNT(*) FROM agent_transitions WHERE agent_id IN ({marks}) "
        "GROUP BY agent_id",
        candidates,
    )
    history = {r[0]: r[1] for r in counted}
    with store.atomic():
        # Again, after the read: the agent may have come back meanwhile.
        still = set(_forgettable(s, before))
        ids: list[str] = []
        cost = 0
        for agent_id in candidates:
            if agent_id not in still:
                continue
            size = 1 + history.get(agent_id, 0)
            if ids and cost + size > budget:
                break
            ids.append(agent_id)
            cost += size
        gone = set(ids)
        for agent_id in ids:
            del s.agents[agent_id]
            i = bisect.bisect_left(s._ids, agent_id)
            if i < len(s._ids) and s._ids[i] == agent_id:
                del s._ids[i]
            timer = s._liveness.pop(agent_id, None)
            if timer is not None:
                timer.cancel()
        store.drop_pending("agents", lambda k: k in gone)
        store.drop_pending("agent_transitions", lambda r: r[0] in gone)
        params = [(a,) for a in ids]
        store.purge(_DELETE["agent_transitions"], params)
        store.purge(_DELETE["agents"], params)
    await store.commit()
    more = len(ids) < len(candidates) or len(candidates) >= budget
    return Pruned(
        _nonzero(agents=len(ids), agent_transitions=sum(history.get(a, 0) for a in ids)), more
    )


def _nonzero(**counts: int) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


# --------------------------------------------------------------------------- space


async def reclaim(s: SQLiteStorage) -> int:
    return await s.store.run_exclusive(_vacuum_step)


def _vacuum_step(conn: sqlite3.Connection) -> int:
    """On the writer's thread, between two commits: free pages back to the file
    system, at most RETENTION_VACUUM_PAGES at a time (its own short transaction)."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
        return 0
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    if not free:
        return 0
    # executescript steps the pragma to its end; execute() would free one page.
    conn.executescript(f"PRAGMA incremental_vacuum({limits.RETENTION_VACUUM_PAGES})")
    return int(free - conn.execute("PRAGMA freelist_count").fetchone()[0])


def prepare_file(conn: sqlite3.Connection, path: str) -> None:
    """At start, before anything else touches the file: a new file is made with
    incremental auto-vacuum; an existing one without it is converted with one
    VACUUM when small, otherwise left as it is, with a warning."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 0:
        return  # incremental already, or full (which gives space back at every commit)
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect with the first table
        return
    size = _file_bytes(path)
    if size <= limits.STARTUP_VACUUM_MAX_BYTES:
        log.info(
            "database converted to incremental auto-vacuum, so that space freed by "
            "retention goes back to the file system (one VACUUM)",
            extra={"db": path, "bytes": size},
        )
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
        return
    log.warning(
        "the database was created without incremental auto-vacuum: space freed by "
        "retention is reused for new rows but the file does not shrink. To convert "
        "it (once), stop the server and run `opscore db vacuum --db %s`",
        path,
        extra={"db": path, "bytes": size},
    )


def _file_bytes(path: str) -> int:
    total = 0
    for p in (path, path + "-wal"):
        try:
            total += os.stat(p).st_size
        except OSError:
            pass
    return total


def vacuum(path: str) -> tuple[int, int]:
    """`opscore db vacuum`: rewrite the file compactly, with incremental
    auto-vacuum from then on. Takes the server's lock: refused (ConfigError)
    while a server uses the file. Returns the sizes before and after, in bytes
    (the file and its write-ahead log)."""
    if not os.path.exists(path):
        raise ConfigError(f"no database at {path}")
    lock = DatabaseLock(path)
    lock.acquire()
    try:
        before = _file_bytes(path)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise ConfigError(f"{path} is not an SQLite database ({exc})") from None
            if version == 0:
                raise ConfigError(f"{path} is not an Ops-Core database (no schema version)")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return before, _file_bytes(path)
    finally:
        lock.release()
