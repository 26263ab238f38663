"""The SQLite store: the group-commit writer and the reads.

Writes go through a single writer coroutine, which hands each batch to the commit
process (commitproc.py), a child process that owns the connection commits use. Engines
record changes with the `put_*`/`add_*` methods (a snapshot of the row is taken at
once, later puts of the same key replace earlier ones) and await `commit()`, which
resolves when everything recorded so far is durable. While one commit is on disk the
next batch fills up, so many concurrent RPCs share one transaction (group commit)
and the cost of a write is one commit per batch, not one per call.

Reads use a second connection; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from opscore.clock import to_micros
from opscore.errors import ConfigError, OpsCoreError, ResourceExhausted, Unavailable
from opscore.models import (
    Agent,
    StateTransition,
    Task,
    TaskAttempt,
    TaskFilter,
)
from opscore.storage.pages import (
    clamp_page_size,
    decode_cursor,
    encode_cursor,
    fit,
    latest_definitions_sql,
    nbytes,
)
from opscore.storage.rows import (
    AGENT_COLS,
    AGENT_UPDATED,
    ATTEMPT_COLS,
    RUN_COLS,
    SESSION_COLS,
    SESSION_NCOLS,
    TASK_COLS,
    TASK_MUTABLE,
    TRANSITION_COLS,
    agent_from_row,
    agent_row,
    attempt_from_row,
    attempt_row,
    run_from_row,
    run_row,
    session_from_row,
    session_row,
    task_from_row,
    task_row,
    transition_from_row,
    transition_row,
)
from opscore.storage.sqlite import retention
from opscore.storage.sqlite.commitproc import CommitProcess, CommitProcessDied, NotWritten
from opscore.storage.sqlite.lock import DatabaseLock
from opscore.storage.sqlite.migrate import apply_migrations
from opscore.storage.sqlite.queries import by_key, key_reads, list_sessions_query, list_tasks_query
from opscore.workflow.models import Session, TaskRun

log = logging.getLogger("opscore.storage")

T = TypeVar("T")

# --------------------------------------------------------------------------- tables

# Upsert statements by table, in the order a batch applies them.
_UPSERT_SQL: dict[str, str] = {
    "agents": (
        f"INSERT INTO agents ({AGENT_COLS}) VALUES ({', '.join('?' * 14)}) "
        "ON CONFLICT(agent_id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in AGENT_UPDATED)
    ),
    "tasks": (
        f"INSERT INTO tasks ({TASK_COLS}) VALUES ({', '.join('?' * 32)}) "
        "ON CONFLICT(task_id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in TASK_MUTABLE)
    ),
}
_UPSERT_SQL.update(
    {
        "workflow_definitions": (
            "INSERT OR REPLACE INTO workflow_definitions "
            "(definition_id, version, body, content_hash, create_time) VALUES (?, ?, ?, ?, ?)"
        ),
        "sessions": (
            f"INSERT INTO sessions ({SESSION_COLS}) VALUES ({', '.join('?' * SESSION_NCOLS)}) "
            "ON CONFLICT(session_id) DO UPDATE SET "
            + ", ".join(
                f"{c} = excluded.{c}"
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
        ),
        "session_definitions": "INSERT OR IGNORE INTO session_definitions VALUES (?, ?)",
        "session_task_runs": (
            f"INSERT OR REPLACE INTO session_task_runs ({RUN_COLS}) VALUES ({', '.join('?' * 12)})"
        ),
        "task_attempts": (
            f"INSERT OR REPLACE INTO task_attempts ({ATTEMPT_COLS}) VALUES ({', '.join('?' * 10)})"
        ),
    }
)
_APPEND_SQL: dict[str, str] = {
    "agent_transitions": (
        f"INSERT INTO agent_transitions ({TRANSITION_COLS}) VALUES ({', '.join('?' * 9)})"
    ),
    "session_events": "INSERT INTO session_events (session_id, sequence, body) VALUES (?, ?, ?)",
}
_DELETE_SQL: dict[str, str] = {
    "workflow_definitions": (
        "DELETE FROM workflow_definitions WHERE definition_id = ? AND version = ?"
    ),
}


# Batches handed to the commit process at once: one committing, one behind it.
_IN_FLIGHT = 2

# The statements that get multi-row forms in the commit process.
_MULTI_ROW_SQL = (*_UPSERT_SQL.values(), *_APPEND_SQL.values())


def _work(batch: _Batch) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The statements of one batch, in the order they must run."""
    # Purges first: a row purged and then put again within one batch (an agent
    # forgotten, then registered anew) must end up stored.
    work: list[tuple[str, list[tuple[Any, ...]]]] = list(batch.purges)
    for table, rows in batch.upserts.items():
        if rows:
            work.append((_UPSERT_SQL[table], list(rows.values())))
    for table, appended in batch.appends.items():
        if appended:
            work.append((_APPEND_SQL[table], appended))
    for table, keys in batch.deletes.items():
        if keys:
            work.append((_DELETE_SQL[table], list(keys.values())))
    return work


class _Batch:
    __slots__ = ("appends", "deletes", "future", "purges", "upserts")

    def __init__(self) -> None:
        self.upserts: dict[str, dict[Any, tuple[Any, ...]]] = {t: {} for t in _UPSERT_SQL}
        self.appends: dict[str, list[tuple[Any, ...]]] = {t: [] for t in _APPEND_SQL}
        self.deletes: dict[str, dict[Any, tuple[Any, ...]]] = {t: {} for t in _DELETE_SQL}
        # Retention's DELETEs (opscore/storage/sqlite/retention.py), applied first.
        self.purges: list[tuple[str, list[tuple[Any, ...]]]] = []
        self.future: asyncio.Future[None] | None = None

    def empty(self) -> bool:
        return not (
            any(self.upserts.values())
            or any(self.appends.values())
            or any(self.deletes.values())
            or self.purges
        )


class _Flight:
    """A batch handed to the commit process (`done` its outcome), or an empty
    one (`done` None) whose waiters wait for the batches handed over before it."""

    __slots__ = ("batch", "done", "generation", "rows")

    def __init__(self, batch: _Batch, generation: int) -> None:
        self.batch = batch
        self.generation = generation
        self.done: asyncio.Future[float] | None = None
        self.rows = 0


def _resolve(batch: _Batch, error: OpsCoreError | None) -> None:
    fut = batch.future
    if fut is None or fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
        fut.exception()  # retrieved: its waiters may be gone


# --------------------------------------------------------------------------- cursors


def storage_error(exc: BaseException) -> OpsCoreError:
    """The error the calls of a batch that could not commit are answered with."""
    text = str(exc)
    if isinstance(exc, CommitProcessDied):
        return Unavailable(
            f"storage could not confirm the commit ({text}); the call may or may not "
            "have been stored: check, or retry it (repeats with the same attempt or "
            "idempotency key are answered as repeats)"
        )
    if isinstance(exc, sqlite3.OperationalError) and "full" in text:
        return ResourceExhausted(
            "storage is full: the database reached its size limit (--max-db-bytes) or "
            "the disk is full; nothing of this call was stored. Free space or raise "
            "the limit, then retry",
            reason="STORAGE_FULL",
        )
    return Unavailable(f"storage could not commit ({text}); nothing was stored, retry the call")


class _Atomic:
    """`with store.atomic():` around a change to in-memory state. If anything
    raises half-way, memory may no longer match what will be committed: the
    pending batch is dropped and the owner rebuilds its state from the database."""

    __slots__ = ("_store",)

    def __init__(self, store: Store) -> None:
        self._store = store

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        if exc is not None:
            log.error("a change failed half-way; rebuilding state from the database", exc_info=exc)
            self._store.fault(Unavailable("the server hit an internal error; retry the call"))
        return False


# --------------------------------------------------------------------------- store


class Store:
    def __init__(self, path: str | Path, *, sync: str = "full", max_db_bytes: int = 0) -> None:
        self.path = str(path)
        self.sync = sync
        self.max_db_bytes = max_db_bytes
        if self.path == ":memory:":
            # The server, its reads and its commit process each need the same file.
            raise ConfigError(
                "--db :memory: is not supported: give a file path (for a throwaway "
                "server, one under /dev/shm or a temporary directory)"
            )
        self._lock = DatabaseLock(self.path)
        # Group commits go through the commit process; this connection runs the
        # maintenance jobs between them (run_exclusive), reads use the other.
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lookup: sqlite3.Connection | None = None
        self.committer: CommitProcess | None = None
        self._pending = _Batch()
        # Set by open(). asyncio.get_running_loop() makes a getpid() system call
        # on Python 3.11 (its fork check), and batch() runs for every change.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        # Batches handed to the commit process, oldest first, settled in order.
        self._flights: deque[_Flight] = deque()
        self._slot = asyncio.Event()
        # Bumped by every fault: a batch handed over before a commit failed, of
        # that commit's generation, is built on it and must not be written.
        self._generation = 0
        # The generation of the last failed commit, as settled here in order (the
        # commit process keeps its own, which may already name a later one).
        self._failed_generation = -1
        self._failure: OpsCoreError | None = None
        # Work for the write connection between two commits (run_exclusive).
        self._jobs: deque[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = deque()
        self._closing = False
        self.commits = 0
        self.faults = 0
        # Called when a batch could not be committed, or a change failed half-way:
        # memory is then ahead of the database and its owner must rebuild it.
        self.on_failure: Callable[[OpsCoreError], None] | None = None
        # Set by the owner while it rebuilds: every change is refused with it.
        self.refusing: OpsCoreError | None = None
        # Observability hook: called after each successful commit with the rows
        # written and the seconds the transaction took (group-commit metrics).
        self.on_commit: Callable[[int, float], None] | None = None

    def check_writable(self) -> None:
        """Raise (a fresh copy of) the error changes are refused with, if any."""
        err = self.refusing
        if err is not None:
            raise type(err)(err.message, reason=err.reason)

    # ---- open / close

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()  # before anything touches the file
        try:
            # Migrations run on a plain connection first: they are one-off and need
            # per-statement control that is simplest without the thread hop.
            await asyncio.to_thread(self._migrate)
            self._writer = await aiosqlite.connect(self.path, isolation_level=None)
            await self._pragmas(self._writer)
            limit = await self._limit_sql()
            for pragma in limit:
                await self._writer.execute(pragma)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._pragmas(self._reader)
            await self._reader.execute("PRAGMA query_only = ON")
            self._lookup = self._lookup_connection()
            self.committer = CommitProcess(
                self._loop,
                self.path,
                # Statement journals in memory: a multi-row upsert otherwise opens,
                # unlinks and closes a file in /var/tmp every few commits (strace at
                # 500 tasks/s), and a read-only /var/tmp would fail the commit.
                pragmas=[
                    *self._pragma_sql(),
                    "PRAGMA temp_store = MEMORY",
                    *limit,
                ],
                multi_row_sql=_MULTI_ROW_SQL,
                # It holds the file's lock as long as it may write to the file.
                keep_fds=(self._lock.fd,),
            )
            self.committer.on_died = self._committer_died
            self.committer.start()
        except BaseException:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    await conn.close()
            self._writer = self._reader = None
            self._close_lookup()
            self.committer = None
            self._lock.release()
            raise
        self._writer_task = asyncio.create_task(self._write_loop(), name="opscore-writer")

    def _migrate(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            # Before WAL: a new file takes its auto-vacuum mode only while empty.
            retention.prepare_file(conn, self.path)
            conn.execute("PRAGMA journal_mode = WAL")
            apply_migrations(conn)
        finally:
            conn.close()

    def _pragma_sql(self) -> list[str]:
        return [
            "PRAGMA journal_mode = WAL",
            f"PRAGMA synchronous = {'FULL' if self.sync == 'full' else 'NORMAL'}",
            "PRAGMA busy_timeout = 5000",
            "PRAGMA foreign_keys = ON",
        ]

    async def _limit_sql(self) -> list[str]:
        """The size limit (--max-db-bytes) of a connection that writes."""
        if not self.max_db_bytes:
            return []
        assert self._writer is not None
        page = (await (await self._writer.execute("PRAGMA page_size")).fetchone())[0]
        return [f"PRAGMA max_page_count = {max(1, self.max_db_bytes // page)}"]

    async def _pragmas(self, conn: aiosqlite.Connection) -> None:
        for pragma in self._pragma_sql():
            await conn.execute(pragma)

    def _committer_died(self, code: int | None) -> None:
        log.error(
            "the commit process exited; the calls of its batches in flight are refused, "
            "state is rebuilt from the database and a new one starts with the next commit",
            extra={"exit_code": code},
        )

    async def close(self) -> None:
        """Commit what is pending, then close both connections."""
        if self._writer_task is None:
            return
        self._closing = True
        with contextlib.suppress(OpsCoreError):
            await self.batch()
        self._writer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer_task
        self._writer_task = None
        while self._jobs:
            _fn, fut = self._jobs.popleft()
            if not fut.done():
                fut.set_exception(Unavailable("server is shutting down"))
                fut.exception()
        if self.committer is not None:
            # Before the lock is released: the child holds it until it exits.
            await self.committer.close()
            self.committer = None
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()
        self._writer = self._reader = None
        self._close_lookup()
        self._lock.release()

    def _lookup_connection(self) -> sqlite3.Connection:
        """The loop thread's own read-only connection, for lookups too small to
        be worth a hop to the reader thread; it never waits for a lock."""
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _close_lookup(self) -> None:
        conn, self._lookup = self._lookup, None
        if conn is not None:
            conn.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the store was opened on."""
        return self._loop or asyncio.get_running_loop()

    def file_bytes(self) -> tuple[int, int]:
        """(database, write-ahead log) sizes on disk, 0 for what does not exist.
        Plain stat calls: safe from any thread."""
        sizes = []
        for path in (self.path, self.path + "-wal"):
            try:
                sizes.append(os.stat(path).st_size)
            except OSError:
                sizes.append(0)
        return sizes[0], sizes[1]

    # ---- group commit

    def batch(self) -> asyncio.Future[None]:
        """The future of the batch being filled: it resolves once everything recorded
        so far is durable. Shared by every caller of the batch, so add callbacks to
        it but never cancel it; RPC handlers `await commit()` instead."""
        batch = self._pending
        if batch.future is None:
            batch.future = self.loop.create_future()
        self._wake.set()
        return batch.future

    def commit(self) -> asyncio.Future[None]:
        """Await this to wait until everything recorded so far is durable.

        Shielded: a caller that is cancelled (a client gave up on its RPC) must not
        cancel the batch future that the other RPCs of the batch are waiting on.
        """
        return asyncio.shield(self.batch())

    def run_exclusive(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run `fn` with the write connection on its thread, between two group
        commits, never beside one (maintenance such as an incremental vacuum).
        Its failure is its caller's: it does not fault the store."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.append((fn, fut))
        self._wake.set()
        return fut

    async def _run_jobs(self) -> None:
        conn = self._writer
        assert conn is not None
        while self._jobs:
            fn, fut = self._jobs.popleft()
            try:
                result = await conn._execute(fn, conn._conn)
            except asyncio.CancelledError:
                self._jobs.appendleft((fn, fut))
                raise
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: its caller may be gone
            else:
                if not fut.done():
                    fut.set_result(result)

    async def _write_loop(self) -> None:
        """Seal the pending batch and hand it to the commit process, up to
        _IN_FLIGHT at a time, so that it starts the next commit as soon as one
        ends instead of after the event loop has heard of it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._jobs:
                await self._drain()
                await self._run_jobs()
            while len(self._flights) >= _IN_FLIGHT:
                self._slot.clear()
                await self._slot.wait()
            batch, self._pending = self._pending, _Batch()
            if batch.empty() and not self._flights:
                _resolve(batch, None)
                continue
            self._hand_over(batch)

    async def _drain(self) -> None:
        """Until every batch handed over is settled."""
        while self._flights:
            self._slot.clear()
            await self._slot.wait()

    def _hand_over(self, batch: _Batch) -> None:
        flight = _Flight(batch, self._generation)
        if batch.empty():
            self._flights.append(flight)
            return
        work = _work(batch)
        flight.rows = sum(len(rows) for _, rows in work)
        assert self.committer is not None
        # The outcome is settled by a callback, in order.
        done = self.committer.submit(flight.generation, work)
        done.add_done_callback(self._settle)
        flight.done = done
        # Only now: a flight without `done` counts as written once it is first.
        self._flights.append(flight)

    def _settle(self, _: object = None) -> None:
        """Resolve the batches whose commit ended, oldest first."""
        flights = self._flights
        while flights:
            flight = flights[0]
            done = flight.done
            if done is not None and not done.done():
                break
            flights.popleft()
            if done is None:
                failed = flight.generation <= self._failed_generation
                _resolve(flight.batch, self._failure if failed else None)
                continue
            exc = (
                Unavailable("server is shutting down; retry the call")
                if done.cancelled()
                else done.exception()
            )
            if exc is None:
                self.commits += 1
                if self.on_commit is not None:
                    self.on_commit(flight.rows, done.result())
                _resolve(flight.batch, None)
            elif isinstance(exc, NotWritten):
                _resolve(flight.batch, self._failure)
            else:
                # Never retried: the rows may be the problem. The batch's callers
                # hear that nothing was stored, and everything recorded on top of
                # it is dropped too; the owner rebuilds memory from the database.
                error = storage_error(exc)
                log.error(
                    "commit failed; the calls of the batch are refused and state is "
                    "rebuilt from the database",
                    exc_info=exc,
                    extra={"error": str(exc)},
                )
                self._failed_generation = flight.generation
                self._failure = error
                _resolve(flight.batch, error)
                self.fault(error)
        self._slot.set()

    def atomic(self) -> _Atomic:
        return _Atomic(self)

    def fault(self, error: OpsCoreError) -> None:
        """Memory is ahead of the database: drop what is pending, tell the owner."""
        self.faults += 1
        self._generation += 1
        self.discard_pending(error)
        if self.on_failure is not None:
            self.on_failure(error)

    def discard_pending(self, error: OpsCoreError) -> None:
        """Forget every change recorded since the last commit; its waiters get `error`."""
        batch, self._pending = self._pending, _Batch()
        _resolve(batch, error)

    # ---- write API (record now, durable after `await commit()`)

    def purge(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Run the DELETE `sql` once per row of parameters in the next batch,
        before its upserts and appends (retention's deletes)."""
        if rows:
            self._pending.purges.append((sql, rows))

    def drop_pending(self, table: str, match: Callable[[Any], bool]) -> None:
        """Forget rows of `table` recorded since the last commit whose key (an
        upserted table) or row (an appended one) `match`es: rows purged in this
        batch must not be written back by a put recorded before the purge."""
        pending = self._pending
        if table in pending.upserts:
            rows = pending.upserts[table]
            for key in [k for k in rows if match(k)]:
                del rows[key]
        elif table in pending.appends:
            pending.appends[table] = [r for r in pending.appends[table] if not match(r)]

    def put_agent(self, agent: Agent) -> None:
        self._pending.upserts["agents"][agent.agent_id] = agent_row(agent)

    def add_transition(self, t: StateTransition) -> None:
        self._pending.appends["agent_transitions"].append(transition_row(t))

    def put_task(self, task: Task) -> None:
        self._pending.upserts["tasks"][task.task_id] = task_row(task)

    def put_attempt(self, attempt: TaskAttempt) -> None:
        key = (attempt.task_id, attempt.attempt)
        self._pending.upserts["task_attempts"][key] = attempt_row(attempt)

    def put_definition(
        self, definition_id: str, version: int, body: bytes, content_hash: str, create_time: Any
    ) -> None:
        key = (definition_id, version)
        self._pending.deletes["workflow_definitions"].pop(key, None)
        self._pending.upserts["workflow_definitions"][key] = (
            definition_id,
            version,
            body,
            content_hash,
            to_micros(create_time),
        )

    def delete_definition(self, definition_id: str, version: int) -> None:
        key = (definition_id, version)
        self._pending.upserts["workflow_definitions"].pop(key, None)
        self._pending.deletes["workflow_definitions"][key] = key

    def put_session(self, session: Session) -> None:
        self._pending.upserts["sessions"][session.session_id] = session_row(session)

    def put_session_definition(self, session_id: str, body: bytes) -> None:
        self._pending.upserts["session_definitions"][session_id] = (session_id, body)

    def put_run(self, session_id: str, run: TaskRun) -> None:
        key = (session_id, run.workflow_task_id)
        self._pending.upserts["session_task_runs"][key] = run_row(session_id, run)

    def add_session_event(self, session_id: str, sequence: int, body: bytes) -> None:
        self._pending.appends["session_events"].append((session_id, sequence, body))

    # ---- reads

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        assert self._reader is not None
        return list(await self._reader.execute_fetchall(sql, tuple(params)))

    def _fetch_now(self, sql: str, params: Sequence[Any]) -> list[Any] | None:
        """A lookup of a row or two by an index, on the event loop's own
        connection: a hop to the reader thread costs ten times the lookup
        (tasks_by_keys_now). None when the file is busy this instant."""
        conn = self._lookup
        if conn is None:
            return None
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return None  # busy (a checkpoint truncating the log, say): use the reader

    async def _fetch_small(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """`_fetch_now`, or through the reader thread when the file is busy."""
        rows = self._fetch_now(sql, params)
        return rows if rows is not None else await self._fetchall(sql, params)

    async def load_agents(self) -> list[Agent]:
        rows = await self._fetchall(f"SELECT {AGENT_COLS} FROM agents")
        return [agent_from_row(r) for r in rows]

    async def get_transition(self, agent_id: str, sequence: int) -> StateTransition | None:
        rows = await self._fetchall(
            f"SELECT {TRANSITION_COLS} FROM agent_transitions WHERE agent_id = ? AND sequence = ?",
            [agent_id, sequence],
        )
        return transition_from_row(rows[0]) if rows else None

    async def list_transitions(
        self, agent_id: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[StateTransition], str]:
        limit = clamp_page_size(page_size)
        before = decode_cursor(page_token, int)[0] if page_token else None
        sql = f"SELECT {TRANSITION_COLS} FROM agent_transitions WHERE agent_id = ?"
        params: list[Any] = [agent_id]
        if before is not None:
            sql += " AND sequence < ?"
            params.append(int(before))
        sql += " ORDER BY sequence DESC LIMIT ?"
        params.append(limit + 1)
        rows = await self._fetchall(sql, params)
        n = fit((nbytes(r[4]) for r in rows[:limit]), budget)
        items = [transition_from_row(r) for r in rows[:n]]
        token = encode_cursor(items[-1].sequence) if len(rows) > n else ""
        return items, token

    async def load_open_tasks(self) -> list[Task]:
        rows = await self._fetchall(f"SELECT {TASK_COLS} FROM tasks WHERE state IN (1, 2, 3)")
        return [task_from_row(r) for r in rows]

    async def max_ready_seq(self) -> int:
        rows = await self._fetchall("SELECT COALESCE(MAX(ready_seq), 0) FROM tasks")
        return int(rows[0][0])

    async def get_task(self, task_id: str) -> Task | None:
        rows = await self._fetchall(f"SELECT {TASK_COLS} FROM tasks WHERE task_id = ?", [task_id])
        return task_from_row(rows[0]) if rows else None

    async def list_attempts(
        self,
        task_id: str,
        page_size: int,
        page_token: str,
        budget: int,
        running: TaskAttempt | None = None,
    ) -> tuple[list[TaskAttempt], str]:
        """A task's attempts, newest first: `running` (the attempt in progress,
        which has no row yet) then the ended ones, by attempt number descending."""
        limit = clamp_page_size(page_size)
        before = decode_cursor(page_token, int)[0] if page_token else None
        found: list[TaskAttempt] = []
        if running is not None and (before is None or running.attempt < before):
            found.append(running)
        sql = f"SELECT {ATTEMPT_COLS} FROM task_attempts WHERE task_id = ?"
        params: list[Any] = [task_id]
        if before is not None:
            sql += " AND attempt < ?"
            params.append(before)
        sql += " ORDER BY attempt DESC LIMIT ?"
        params.append(limit + 1 - len(found))
        found += [attempt_from_row(r) for r in await self._fetchall(sql, params)]
        sizes = (
            nbytes(a.progress, a.error.message, a.error.details) if a.error else nbytes(a.progress)
            for a in found[:limit]
        )
        n = fit(sizes, budget)
        items = found[:n]
        token = encode_cursor(items[-1].attempt) if len(found) > n else ""
        return items, token

    def tasks_by_keys_now(self, keys: list[str]) -> dict[str, Task] | None:
        """The stored tasks with these idempotency keys, read on the event loop's
        thread; None when the file is busy this instant (never waits for it).

        The SDK sends a key with every enqueue, and a new key is in no open
        task, so each enqueue must ask the file whether a finished task has it.
        Through the reader thread a lookup cost 123 us of CPU, on this
        connection 10.6 us (2,000 lookups, in process)."""
        rows: list[Any] = []
        for sql, params in key_reads(keys):
            found = self._fetch_now(sql, params)
            if found is None:
                return None
            rows += found
        return by_key(rows)

    async def tasks_by_keys(self, keys: list[str]) -> dict[str, Task]:
        """The same through the reader thread, waiting for the file if need be."""
        rows = [row for sql, params in key_reads(keys) for row in await self._fetchall(sql, params)]
        return by_key(rows)

    async def list_tasks(
        self, flt: TaskFilter, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Task], str]:
        """Newest first, by insertion order (rowid), which never changes for a task."""
        limit = clamp_page_size(page_size)
        sql, params = list_tasks_query(flt, page_token, limit + 1)
        rows = await self._fetchall(sql, params)
        # rowid, then TASK_COLS: input 5, output 23, error message/details 24/26, progress 27
        n = fit((nbytes(r[5], r[23], r[24], r[26], r[27]) for r in rows[:limit]), budget)
        items = [task_from_row(r[1:]) for r in rows[:n]]
        token = encode_cursor(rows[n - 1][0]) if len(rows) > n else ""
        return items, token

    # ---- workflow reads

    async def get_definition(
        self, definition_id: str, version: int = 0
    ) -> tuple[bytes, str] | None:
        """(body, content_hash) of one version, or of the latest when version is 0."""
        if version:
            rows = await self._fetch_small(
                "SELECT body, content_hash FROM workflow_definitions "
                "WHERE definition_id = ? AND version = ?",
                [definition_id, version],
            )
        else:
            rows = await self._fetch_small(
                "SELECT body, content_hash FROM workflow_definitions WHERE definition_id = ? "
                "ORDER BY version DESC LIMIT 1",
                [definition_id],
            )
        return (rows[0][0], rows[0][1]) if rows else None

    async def definition_versions(self, definition_id: str) -> list[int]:
        rows = await self._fetchall(
            "SELECT version FROM workflow_definitions WHERE definition_id = ? ORDER BY version",
            [definition_id],
        )
        return [r[0] for r in rows]

    async def list_definitions(
        self, page_size: int, page_token: str, budget: int
    ) -> tuple[list[bytes], str]:
        """The latest version of each definition, ordered by id."""
        limit = clamp_page_size(page_size)
        after = decode_cursor(page_token, str)[0] if page_token else ""
        rows = await self._fetchall(
            latest_definitions_sql("?", "?"),
            [after, limit + 1],
        )
        n = fit((len(r[1]) for r in rows[:limit]), budget)
        token = encode_cursor(rows[n - 1][0]) if len(rows) > n else ""
        return [r[1] for r in rows[:n]], token

    async def load_open_sessions(self) -> list[tuple[Session, bytes, int]]:
        """Sessions still running, each with its definition and last event sequence."""
        rows = await self._fetchall(
            f"SELECT {SESSION_COLS}, "
            "(SELECT body FROM session_definitions d WHERE d.session_id = s.session_id), "
            "(SELECT COALESCE(MAX(sequence), 0) FROM session_events e "
            " WHERE e.session_id = s.session_id) "
            "FROM sessions s WHERE state IN (1, 2)"
        )
        out = []
        n = SESSION_NCOLS
        for r in rows:
            session = session_from_row(r[:n])
            session.runs = await self.load_runs(session.session_id)
            out.append((session, r[n], r[n + 1]))
        return out

    async def load_runs(self, session_id: str) -> dict[str, TaskRun]:
        rows = await self._fetchall(
            f"SELECT {RUN_COLS} FROM session_task_runs WHERE session_id = ? ORDER BY position",
            [session_id],
        )
        return {r[1]: run_from_row(r) for r in rows}

    async def get_session(self, session_id: str, *, with_runs: bool = True) -> Session | None:
        rows = await self._fetchall(
            f"SELECT {SESSION_COLS} FROM sessions WHERE session_id = ?", [session_id]
        )
        if not rows:
            return None
        session = session_from_row(rows[0])
        if with_runs:
            session.runs = await self.load_runs(session_id)
        return session

    async def get_session_by_key(self, key: str) -> Session | None:
        rows = await self._fetch_small(
            f"SELECT {SESSION_COLS} FROM sessions WHERE idempotency_key = ?", [key]
        )
        if not rows:
            return None
        session = session_from_row(rows[0])
        session.runs = await self.load_runs(session.session_id)
        return session

    async def list_sessions(
        self, state: int, definition_id: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Session], str]:
        limit = clamp_page_size(page_size)
        sql, params = list_sessions_query(state, definition_id, page_token, limit + 1)
        rows = await self._fetchall(sql, params)
        # rowid, then SESSION_COLS: input 5, output 6, error message/details 7/9
        n = fit((nbytes(r[5], r[6], r[7], r[9]) for r in rows[:limit]), budget)
        token = encode_cursor(rows[n - 1][0]) if len(rows) > n else ""
        return [session_from_row(r[1:]) for r in rows[:n]], token

    async def list_session_events(
        self, session_id: str, after: int, budget: int
    ) -> list[tuple[int, bytes]]:
        """Events after `after`, in order, as many as fit in `budget` bytes (at least one)."""
        rows = await self._fetchall(
            "SELECT sequence, body FROM session_events WHERE session_id = ? AND sequence > ? "
            "ORDER BY sequence LIMIT 1000",
            [session_id, after],
        )
        n = fit((len(r[1]) for r in rows), budget)
        return [(r[0], r[1]) for r in rows[:n]]
