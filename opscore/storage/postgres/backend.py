"""The PostgreSQL backend of opscore.storage.api: any number of equal replicas on
one database.

The database holds all the state; a replica keeps only caches it can check
(running sessions' live state, by version) and what is its own (its open
streams). Operations of one replica run one after another on its executor,
grouped into transactions (a group commit: many operations, one COMMIT); inside
one, rows are read with `FOR UPDATE` and ready tasks are claimed with `FOR
UPDATE SKIP LOCKED`, so a task is leased by one replica's stream at a time and
replicas never wait on each other's claims. Writes are buffered and sent as one
batch per table at the end of the transaction.

Replicas tell each other what changed with NOTIFY on one channel, sent in the
transaction (so delivered only once it commits): a task became ready, a lease
a stream elsewhere holds ended, a session or agent event. Deadlines (schedule
times, backoffs, lease expiries, agent silence) are rows, not timers: every
replica sleeps until the earliest one (woken early by a notification) and fires
the due ones it can lock, so each fires once even when the replica that set it
has died. A replica heartbeats its row in `replicas`; the streams of one that
stops are forgotten by the others after replica_timeout, and its agents then
have the agent timeout to reconnect anywhere.

When the database cannot be reached every operation fails with UNAVAILABLE, the
server reports NOT_SERVING and rebuilds once the database answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from opscore import __version__
from opscore.clock import from_micros, to_micros
from opscore.errors import OpsCoreError, Unavailable
from opscore.models import (
    Agent,
    AgentState,
    StateTransition,
    Task,
    TaskAttempt,
    TaskFilter,
    TaskState,
)
from opscore.storage import rows as R
from opscore.storage.api import Operation, Pruned, PruneKind, Want
from opscore.storage.background import BackgroundTasks
from opscore.storage.pages import (
    agent_size,
    clamp_page_size,
    decode_cursor,
    encode_cursor,
    fit,
    latest_definitions_sql,
    nbytes,
)
from opscore.storage.postgres import retention
from opscore.storage.postgres import rows as PR
from opscore.storage.postgres import statements as S
from opscore.storage.postgres.migrate import migrate
from opscore.storage.postgres.pool import (
    DatabaseUnavailable,
    Listener,
    PgSettings,
    connect,
    create_pool,
    is_connection_error,
)
from opscore.workflow.models import Session, SessionState, TaskRun

log = logging.getLogger("opscore.storage.postgres")

T = TypeVar("T")

CHANNEL = "opscore"
# Most operations in one transaction: bounds its locks and its latency.
MAX_BATCH_OPS = 256
# Replicas heartbeat this many times per replica_timeout (a setting, pool.py).
HEARTBEATS_PER_TIMEOUT = 5
# Longest a stopping replica waits for each step of closing (close()).
CLOSE_STEP_TIMEOUT = 5.0
# The longest a replica sleeps without looking for due deadlines: a safety net
# for a notification lost while its listener reconnected, not the normal path.
MAX_DUE_SLEEP = 2.0
LIVENESS_INTERVAL = 1.0
STATS_INTERVAL = 5.0
# The counts behind the metrics read every ready task (1,000,000 queued: 215 ms
# on the test machine): a refresh that took t waits at least STATS_DUTY * t
# before the next, so that a huge backlog costs the database at most 1/STATS_DUTY
# of one backend, at the price of staler queue gauges.
STATS_DUTY = 20.0


def stats_wait(took: float) -> float:
    """Seconds between the end of one stats refresh and the start of the next."""
    return max(STATS_INTERVAL, STATS_DUTY * took)


async def _within(awaitable: Awaitable[object], what: str) -> bool:
    """Wait up to CLOSE_STEP_TIMEOUT for one step of closing; False (logged) if
    it failed or did not finish. A stopping server must stop."""
    try:
        await asyncio.wait_for(awaitable, CLOSE_STEP_TIMEOUT)
        return True
    except TimeoutError:
        log.warning("closing: gave up waiting for %s after %g s", what, CLOSE_STEP_TIMEOUT)
    except Exception as exc:
        log.warning("closing: %s failed: %s", what, exc)
    return False


def _now_us() -> int:
    return time.time_ns() // 1000


class _Op:
    __slots__ = ("done", "op", "result", "tasks", "wait")

    def __init__(self, op: Operation[Any], wait: bool, tasks: Sequence[str] = ()) -> None:
        self.op = op
        self.wait = wait
        self.tasks = tasks
        loop = asyncio.get_running_loop()
        self.result: asyncio.Future[Any] = loop.create_future()
        self.done: Any = None  # the op's return value, until its commit

    def fail(self, error: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(error)
            self.result.exception()  # retrieved: the caller may be gone


class PostgresStorage:
    kind = "postgres"

    def __init__(
        self,
        url: str,
        *,
        agent_timeout: timedelta = timedelta(seconds=30),
        sync: str = "full",
        max_db_bytes: int = 0,
        replica_address: str = "",
    ) -> None:
        # sync and max_db_bytes are SQLite's; PostgreSQL has its own settings for both.
        del sync, max_db_bytes
        self.settings = PgSettings.from_url(url)
        self.display = self.settings.display
        self.agent_timeout = agent_timeout
        self._replica_us = int(self.settings.replica_timeout * 1e6)
        self.replica_id = uuid.uuid4().hex
        self.replica_address = replica_address
        self.on_task_due: Callable[[Any, str, int], Awaitable[None]] | None = None
        self.on_agent_silent: Callable[[Any, str], Awaitable[None]] | None = None
        self.build_session: Callable[[Session, bytes, int], Awaitable[object]] | None = None
        self.on_failure: Callable[[OpsCoreError], None] | None = None
        self.on_commit: Callable[[int, float], None] | None = None
        self.refusing: OpsCoreError | None = None
        self.commits = 0
        self.faults = 0
        self._pool: asyncpg.Pool | None = None
        self._conn: asyncpg.Connection | None = None
        self._listener: Listener | None = None
        self._subscribers: dict[str, list[Callable[[str], None]]] = {}
        self._queue: deque[_Op] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._busy = False
        self._due_wake = asyncio.Event()
        self._next_due: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background = BackgroundTasks(log)
        self._closing = False
        self._sessions: dict[str, tuple[int, object]] = {}  # id -> (version, live)
        self._local_streams: dict[str, int] = {}
        self._last_seq = 0
        self._stats: dict[str, Any] = {
            "ready": {},
            "agents": {},
            "sessions": {},
            "bytes": (0, 0),
        }

    # ------------------------------------------------------------------ lifecycle

    def check_writable(self) -> None:
        err = self.refusing
        if err is not None:
            raise type(err)(err.message, reason=err.reason)

    async def open(self) -> None:
        conn = await connect(self.settings)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        self._pool = await create_pool(self.settings)
        await self._register_replica()
        self._listener = Listener(
            self.settings,
            [CHANNEL],
            self._on_notify,
            on_reconnect=self._on_listener_reconnect,
            on_disconnect=self._on_listener_lost,
        )
        await self._listener.start()
        loop = asyncio.get_running_loop()
        for coro, name in (
            (self._executor(), "executor"),
            (self._due_loop(), "deadlines"),
            (self._liveness_loop(), "liveness"),
            (self._heartbeat_loop(), "heartbeat"),
            (self._stats_loop(), "stats"),
        ):
            self._tasks.append(loop.create_task(coro, name=f"opscore-pg-{name}"))

    async def _register_replica(self) -> None:
        assert self._pool is not None
        await self._pool.execute(
            "INSERT INTO replicas (replica_id, address, host, pid, version, start_time) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (replica_id) DO UPDATE SET "
            "heartbeat_time = opscore_now_us()",
            self.replica_id,
            self.replica_address,
            socket.gethostname(),
            os.getpid(),
            __version__,
            _now_us(),
        )

    async def close(self) -> None:
        self._closing = True
        # Let queued operations finish (the server drained its calls first).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drained(), 5.0)
        self._background.cancel()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await _within(asyncio.wait(self._tasks), "background loops to end")
        self._tasks.clear()
        if self._listener is not None:
            await _within(self._listener.stop(), "the LISTEN connection to close")
        await self._drop_executor_conn()
        if self._pool is not None:
            await _within(self._forget_replica(), "the replica's row to be removed")
            # A connection whose query was cancelled by the loops' cancellation
            # can keep Pool.close() waiting for its release without end (asyncpg
            # warns after 60 s); a stopping server drops such connections.
            if not await _within(self._pool.close(), "the connection pool to close"):
                self._pool.terminate()

    async def _forget_replica(self) -> None:
        assert self._pool is not None
        # Our streams are gone: their agents count from now, not from the
        # replica timeout.
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE agents a SET last_seen_time = GREATEST(a.last_seen_time, $2) "
                "FROM agent_streams s WHERE s.agent_id = a.agent_id AND "
                "s.replica_id = $1",
                self.replica_id,
                _now_us(),
            )
            await conn.execute("DELETE FROM replicas WHERE replica_id = $1", self.replica_id)
        for item in self._queue:
            item.fail(Unavailable("server is shutting down; retry the call"))
        self._queue.clear()

    async def _drained(self) -> None:
        while self._queue or self._busy:
            self._idle.clear()
            await self._idle.wait()

    def reset(self, error: OpsCoreError) -> None:
        for item in self._queue:
            item.fail(error)
        self._queue.clear()
        self._sessions.clear()

    async def load(self) -> None:
        """Nothing to load: the database is the state. What this replica recorded
        of its own streams before a rebuild is gone with them."""
        assert self._pool is not None
        self._local_streams.clear()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE agents a SET last_seen_time = GREATEST(a.last_seen_time, $2) "
                "FROM agent_streams s WHERE s.agent_id = a.agent_id AND s.replica_id = $1",
                self.replica_id,
                _now_us(),
            )
            await conn.execute("DELETE FROM agent_streams WHERE replica_id = $1", self.replica_id)
        self._due_wake.set()

    # ------------------------------------------------------------------ operations

    async def run(self, op: Operation[T], *, wait: bool = True, tasks: Sequence[str] = ()) -> T:
        item = _Op(op, wait, tasks)
        self._queue.append(item)
        self._wake.set()
        return await asyncio.shield(item.result)  # type: ignore[no-any-return]

    def spawn(self, op: Operation[Any], *, what: str) -> None:
        self._background.keep(self.run(op, wait=False), what)

    def spawn_read(self, coro: Coroutine[Any, Any, Any], *, what: str) -> None:
        self._background.keep(coro, what)

    async def _executor(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._busy = True
            try:
                while self._queue:
                    n = min(MAX_BATCH_OPS, len(self._queue))
                    await self._run_batch([self._queue.popleft() for _ in range(n)])
            finally:
                self._busy = False
                self._idle.set()

    async def _run_batch(self, batch: list[_Op]) -> None:
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[None] = loop.create_future()
        started = time.perf_counter()
        tx: _Tx | None = None
        try:
            conn = await self._executor_conn()
            async with conn.transaction():
                tx = _Tx(self, conn, committed)
                await tx.prefetch_tasks([t for item in batch for t in item.tasks])
                for item in batch:
                    mark = tx.mark()
                    try:
                        item.done = await item.op(tx)
                    except OpsCoreError as exc:
                        if tx.faulted is not None:
                            raise
                        tx.rollback_to(mark)
                        item.fail(exc)
                        continue
                    if tx.faulted is not None:
                        raise tx.faulted
                    if not item.wait and not item.result.done():
                        item.result.set_result(item.done)
                await tx.end_operations()
                if tx.faulted is not None:
                    raise tx.faulted
                rows = await tx.flush()
        except BaseException as exc:
            await self._drop_executor_conn()
            error = self._batch_error(exc)
            if not committed.done():
                committed.set_exception(error)
                committed.exception()
            for item in batch:
                item.fail(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.faults += 1
            log.error(
                "transaction failed; its calls are refused and state is rebuilt",
                exc_info=exc,
                extra={"error": str(exc), "operations": len(batch)},
            )
            if self.on_failure is not None and not self._closing:
                self.on_failure(error)
            return
        self.commits += 1
        assert tx is not None
        tx.committed_ok()
        committed.set_result(None)
        for item in batch:
            if not item.result.done():
                item.result.set_result(item.done)
        if self.on_commit is not None:
            self.on_commit(rows, time.perf_counter() - started)
        for fn in tx.after:
            try:
                fn()
            except Exception:  # a watcher's problem must not fail the others
                log.exception("after-commit callback failed")

    async def _executor_conn(self) -> asyncpg.Connection:
        """The executor's own connection, kept between transactions: no pool
        round trips (acquire, reset) per transaction."""
        if self._conn is None or self._conn.is_closed():
            assert self._pool is not None
            conn = await self._pool.acquire()
            # Every statement here reaches a few rows through an index (a key, a
            # partial index of ready or due tasks). A plan made while the tasks
            # table was small (a new database, statistics not gathered yet) scans
            # the table or a whole index instead, and the connection's prepared
            # statement keeps that plan as the table grows: 2 ms per batch at
            # 7,000 rows, the executor's largest cost. Without those choices the
            # planner can only take the index lookups. The pool resets these
            # settings when the connection goes back.
            await conn.execute(
                "SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off"
            )
            self._conn = conn
        return self._conn

    async def _drop_executor_conn(self) -> None:
        """After a failed transaction the connection may be broken: give it back
        (the pool closes a broken one) and take a fresh one next time."""
        conn, self._conn = self._conn, None
        if conn is not None and self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.release(conn), 5.0)

    @staticmethod
    def _batch_error(exc: BaseException) -> OpsCoreError:
        if isinstance(exc, OpsCoreError):
            return exc
        if isinstance(exc, asyncio.CancelledError):
            return Unavailable("server is shutting down; retry the call")
        if is_connection_error(exc) or isinstance(exc, OSError | asyncio.TimeoutError):
            return DatabaseUnavailable(
                "the database cannot be reached; nothing was stored, retry the call"
            )
        return Unavailable(f"storage could not commit ({exc}); nothing was stored, retry the call")

    # ------------------------------------------------------------------ retention

    async def prune(self, kind: PruneKind, before: datetime, budget: int) -> Pruned:
        """Beside the executor, never in its queue (opscore.storage.postgres.retention)."""
        return await retention.prune(self._pool_or_fail(), kind, before, budget)

    async def reclaim(self) -> int:
        return 0  # autovacuum's

    # ------------------------------------------------------------------ notifications

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None:
        self._subscribers.setdefault(channel, []).append(handler)

    def _on_notify(self, _channel: str, payload: str) -> None:
        sender, _, rest = payload.partition(" ")
        channel, _, body = rest.partition(" ")
        if channel == "due":
            self._due_wake.set()
            return
        if sender == self.replica_id:
            return
        for handler in self._subscribers.get(channel, ()):
            try:
                handler(body)
            except Exception:
                log.exception("notification handler failed", extra={"channel": channel})

    def _on_listener_reconnect(self) -> None:
        """Notifications sent while the listener was away are lost: look again at
        everything they could have said."""
        self._due_wake.set()
        for handler in self._subscribers.get("rescan", ()):
            handler("")

    def _on_listener_lost(self, error: DatabaseUnavailable) -> None:
        log.warning("lost the database notification connection", extra={"error": error.message})
        if self.on_failure is not None and not self._closing:
            self.on_failure(error)

    # ------------------------------------------------------------------ deadlines

    def _note_due(self, when_us: int | None) -> None:
        """A transaction set a deadline: wake sooner if it is earlier than known."""
        if when_us is not None and (self._next_due is None or when_us < self._next_due):
            self._next_due = when_us
            self._due_wake.set()

    async def _due_loop(self) -> None:
        while True:
            # Cleared before the scan, never after: a deadline committed while
            # the scan runs (its notification already in) must cut the sleep.
            self._due_wake.clear()
            try:
                await self._fire_due()
                assert self._pool is not None
                nxt = await self._pool.fetchval(
                    "SELECT LEAST((SELECT MIN(schedule_time) FROM tasks WHERE state = 1), "
                    "(SELECT MIN(lease_expire_time) FROM tasks WHERE state = 3))"
                )
            except Exception as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    log.debug("deadline scan failed: %s", exc)
                nxt = None
                if isinstance(exc, asyncio.CancelledError):
                    raise
            self._next_due = nxt
            sleep = MAX_DUE_SLEEP
            if nxt is not None:
                sleep = min(MAX_DUE_SLEEP, max(0.0, (nxt - _now_us()) / 1e6))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due_wake.wait(), sleep)

    async def _fire_due(self) -> None:
        callback = self.on_task_due
        if callback is None or self.refusing is not None:
            return

        async def op(tx: _Tx) -> int:
            due = await tx.conn.fetch(
                "SELECT task_id, attempt FROM tasks WHERE "
                "(state = 1 AND schedule_time <= $1) OR (state = 3 AND lease_expire_time <= $1) "
                "ORDER BY task_id LIMIT 200 FOR UPDATE SKIP LOCKED",
                _now_us(),
            )
            for row in due:
                await callback(tx, row[0], row[1])
            return len(due)

        while await self.run(op) == 200:
            pass

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL)
            callback = self.on_agent_silent
            if callback is None or self.refusing is not None:
                continue
            timeout_us = int(self.agent_timeout.total_seconds() * 1e6)

            async def op(
                tx: _Tx,
                timeout_us: int = timeout_us,
                callback: Callable[[Any, str], Awaitable[None]] = callback,
            ) -> None:
                silent = await tx.conn.fetch(
                    "SELECT a.agent_id FROM agents a WHERE NOT a.deregistered "
                    "AND a.state NOT IN (5, 6) AND a.last_seen_time + $1 <= opscore_now_us() "
                    "AND NOT EXISTS (SELECT 1 FROM agent_streams s JOIN replicas r "
                    "USING (replica_id) WHERE s.agent_id = a.agent_id "
                    "AND r.heartbeat_time > opscore_now_us() - $2) "
                    "ORDER BY a.agent_id LIMIT 100 FOR UPDATE OF a SKIP LOCKED",
                    timeout_us,
                    self._replica_us,
                )
                for row in silent:
                    await callback(tx, row[0])

            with contextlib.suppress(OpsCoreError):
                await self.run(op)

    async def _heartbeat_loop(self) -> None:
        replica_us = self._replica_us
        while True:
            await asyncio.sleep(self.settings.replica_timeout / HEARTBEATS_PER_TIMEOUT)
            try:
                assert self._pool is not None
                async with self._pool.acquire() as conn, conn.transaction():
                    alive = await conn.execute(
                        "UPDATE replicas SET heartbeat_time = opscore_now_us() "
                        "WHERE replica_id = $1",
                        self.replica_id,
                    )
                    # Replicas that stopped heartbeating: their streams are gone;
                    # their agents get the agent timeout from the replica's end.
                    await conn.execute(
                        "WITH dead AS (DELETE FROM replicas WHERE heartbeat_time < "
                        "opscore_now_us() - $1 RETURNING replica_id, heartbeat_time) "
                        "UPDATE agents a SET last_seen_time = GREATEST(a.last_seen_time, "
                        "d.heartbeat_time) FROM agent_streams s JOIN dead d USING (replica_id) "
                        "WHERE s.agent_id = a.agent_id",
                        replica_us,
                    )
                if alive == "UPDATE 0":
                    # The others thought us dead and forgot our streams: rebuild, so
                    # our agents reconnect and are recorded again.
                    log.error("this replica was declared dead by the others; rebuilding")
                    await self._register_replica()
                    if self.on_failure is not None and not self._closing:
                        self.on_failure(Unavailable("replica state rebuilt; reconnect"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("heartbeat failed: %s", exc)

    async def _stats_loop(self) -> None:
        """What metrics scrapes read, refreshed in the background (scrapes are
        synchronous and must not wait for the database)."""
        while True:
            started = time.perf_counter()
            try:
                assert self._pool is not None
                ready = await self._pool.fetch(
                    "SELECT capability, agent_id, COUNT(*), MIN(update_time) FROM tasks "
                    "WHERE state = 2 GROUP BY capability, agent_id"
                )
                self._stats["ready"] = {(r[0], r[1]): (r[2], from_micros(r[3])) for r in ready}
                agents = await self._pool.fetch(
                    "SELECT state, COUNT(*) FROM agents WHERE NOT deregistered GROUP BY state"
                )
                self._stats["agents"] = {AgentState(r[0]): r[1] for r in agents}
                sessions = await self._pool.fetch(
                    "SELECT state, COUNT(*) FROM sessions WHERE state IN (1, 2) GROUP BY state"
                )
                self._stats["sessions"] = {SessionState(r[0]): r[1] for r in sessions}
                size = await self._pool.fetchval("SELECT pg_database_size(current_database())")
                self._stats["bytes"] = (int(size), 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("stats refresh failed: %s", exc)
            await asyncio.sleep(stats_wait(time.perf_counter() - started))

    # ------------------------------------------------------------------ reads

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Unavailable("storage is not open")
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            return list(await self._pool_or_fail().fetch(sql, *args))
        except Exception as exc:
            # Anything else is a bug of ours (a statement PostgreSQL refuses),
            # which the interceptor answers with INTERNAL and logs.
            if is_connection_error(exc) or isinstance(exc, asyncpg.InterfaceError):
                raise DatabaseUnavailable(f"the database cannot be reached ({exc}); retry") from exc
            raise

    async def read_agent(self, agent_id: str) -> Agent | None:
        rows = await self._fetch(
            f"SELECT {R.AGENT_COLS}, ({S.LIVE_STREAMS}) FROM agents WHERE agent_id = $1",
            agent_id,
            self._replica_us,
        )
        return PR.agent_from_row(rows[0], rows[0][S.AGENT_N]) if rows else None

    async def read_transition(self, agent_id: str, sequence: int) -> StateTransition | None:
        rows = await self._fetch(
            f"SELECT {R.TRANSITION_COLS} FROM agent_transitions "
            "WHERE agent_id = $1 AND sequence = $2",
            agent_id,
            sequence,
        )
        return R.transition_from_row(rows[0]) if rows else None

    def streams_here(self, agent_id: str) -> int:
        return self._local_streams.get(agent_id, 0)

    async def list_agents(
        self, state: int, capability: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Agent], str]:
        limit = clamp_page_size(page_size)
        after = decode_cursor(page_token, str)[0] if page_token else ""
        rows = await self._fetch(
            f"SELECT {R.AGENT_COLS}, "
            "(SELECT COALESCE(SUM(s.streams), 0) FROM agent_streams s JOIN replicas r "
            "USING (replica_id) WHERE s.agent_id = a.agent_id "
            "AND r.heartbeat_time > opscore_now_us() - $5) "
            "FROM agents a WHERE agent_id > $1 AND ($2 = 0 OR state = $2) "
            "AND ($3 = '' OR $3 = ANY(capabilities)) ORDER BY agent_id LIMIT $4",
            after,
            state,
            capability,
            limit + 1,
            self._replica_us,
        )
        agents = [PR.agent_from_row(r, r[S.AGENT_N]) for r in rows]
        n = fit((agent_size(a) - 64 for a in agents[:limit]), budget)
        page = agents[:n]
        return page, (encode_cursor(page[-1].agent_id) if len(agents) > n else "")

    async def list_transitions(
        self, agent_id: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[StateTransition], str]:
        limit = clamp_page_size(page_size)
        before = decode_cursor(page_token, int)[0] if page_token else None
        rows = await self._fetch(
            f"SELECT {R.TRANSITION_COLS} FROM agent_transitions WHERE agent_id = $1 "
            "AND ($2::bigint IS NULL OR sequence < $2) ORDER BY sequence DESC LIMIT $3",
            agent_id,
            before,
            limit + 1,
        )
        n = fit((nbytes(r[4]) for r in rows[:limit]), budget)
        items = [R.transition_from_row(r) for r in rows[:n]]
        return items, (encode_cursor(items[-1].sequence) if len(rows) > n else "")

    async def read_task(self, task_id: str) -> Task | None:
        rows = await self._fetch(f"SELECT {R.TASK_COLS} FROM tasks WHERE task_id = $1", task_id)
        return R.task_from_row(rows[0]) if rows else None

    async def list_tasks(
        self, flt: TaskFilter, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Task], str]:
        limit = clamp_page_size(page_size)
        sql, args = S.list_tasks_query(flt, page_token, limit + 1)
        rows = await self._fetch(sql, *args)
        n = fit((nbytes(r[5], r[23], r[24], r[26], r[27]) for r in rows[:limit]), budget)
        items = [R.task_from_row(tuple(r)[1:]) for r in rows[:n]]
        return items, (encode_cursor(rows[n - 1][0]) if len(rows) > n else "")

    async def list_attempts(
        self,
        task_id: str,
        page_size: int,
        page_token: str,
        budget: int,
        running: TaskAttempt | None = None,
    ) -> tuple[list[TaskAttempt], str]:
        limit = clamp_page_size(page_size)
        before = decode_cursor(page_token, int)[0] if page_token else None
        found: list[TaskAttempt] = []
        if running is not None and (before is None or running.attempt < before):
            found.append(running)
        rows = await self._fetch(
            f"SELECT {R.ATTEMPT_COLS} FROM task_attempts WHERE task_id = $1 "
            "AND ($2::integer IS NULL OR attempt < $2) ORDER BY attempt DESC LIMIT $3",
            task_id,
            before,
            limit + 1 - len(found),
        )
        found += [R.attempt_from_row(r) for r in rows]
        sizes = (
            nbytes(a.progress, a.error.message, a.error.details) if a.error else nbytes(a.progress)
            for a in found[:limit]
        )
        n = fit(sizes, budget)
        page = found[:n]
        return page, (encode_cursor(page[-1].attempt) if len(found) > n else "")

    async def get_definition(
        self, definition_id: str, version: int = 0
    ) -> tuple[bytes, str] | None:
        rows = await self._fetch(
            "SELECT body, content_hash FROM workflow_definitions WHERE definition_id = $1 "
            "AND ($2 = 0 OR version = $2) ORDER BY version DESC LIMIT 1",
            definition_id,
            version,
        )
        return (bytes(rows[0][0]), rows[0][1]) if rows else None

    async def definition_versions(self, definition_id: str) -> list[int]:
        rows = await self._fetch(
            "SELECT version FROM workflow_definitions WHERE definition_id = $1 ORDER BY version",
            definition_id,
        )
        return [r[0] for r in rows]

    async def list_definitions(
        self, page_size: int, page_token: str, budget: int
    ) -> tuple[list[bytes], str]:
        limit = clamp_page_size(page_size)
        after = decode_cursor(page_token, str)[0] if page_token else ""
        rows = await self._fetch(
            latest_definitions_sql("$1", "$2"),
            after,
            limit + 1,
        )
        n = fit((len(r[1]) for r in rows[:limit]), budget)
        return [bytes(r[1]) for r in rows[:n]], (
            encode_cursor(rows[n - 1][0]) if len(rows) > n else ""
        )

    async def get_session(self, session_id: str, *, with_runs: bool = True) -> Session | None:
        rows = await self._fetch(
            f"SELECT {R.SESSION_COLS} FROM sessions WHERE session_id = $1", session_id
        )
        if not rows:
            return None
        session = R.session_from_row(rows[0])
        if with_runs:
            session.runs = await self._runs(session_id)
        return session

    async def _runs(self, session_id: str, conn: Any = None) -> dict[str, TaskRun]:
        sql = f"SELECT {R.RUN_COLS} FROM session_task_runs WHERE session_id = $1 ORDER BY position"
        rows = await (
            conn.fetch(sql, session_id) if conn is not None else self._fetch(sql, session_id)
        )
        return {r[1]: R.run_from_row(r) for r in rows}

    async def list_sessions(
        self, state: int, definition_id: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Session], str]:
        limit = clamp_page_size(page_size)
        sql, args = S.list_sessions_query(state, definition_id, page_token, limit + 1)
        rows = await self._fetch(sql, *args)
        n = fit((nbytes(r[5], r[6], r[7], r[9]) for r in rows[:limit]), budget)
        return [R.session_from_row(tuple(r)[1:]) for r in rows[:n]], (
            encode_cursor(rows[n - 1][0]) if len(rows) > n else ""
        )

    async def list_session_events(
        self, session_id: str, after: int, budget: int
    ) -> list[tuple[int, bytes]]:
        rows = await self._fetch(
            "SELECT sequence, body FROM session_events WHERE session_id = $1 AND sequence > $2 "
            "ORDER BY sequence LIMIT 1000",
            session_id,
            after,
        )
        n = fit((len(r[1]) for r in rows), budget)
        return [(r[0], bytes(r[1])) for r in rows[:n]]

    # ---- for metrics scrapes (cached: scrapes are synchronous)

    def file_bytes(self) -> tuple[int, int]:
        return self._stats["bytes"]  # type: ignore[no-any-return]

    def agent_counts(self) -> dict[AgentState, int]:
        return dict(self._stats["agents"])

    def session_counts(self) -> dict[SessionState, int]:
        return dict(self._stats["sessions"])

    def ready_queues(self) -> dict[tuple[str, str], tuple[int, datetime]]:
        return dict(self._stats["ready"])

    # ---- used by a Tx

    def next_ready_seq(self) -> int:
        # One order across replicas: microseconds of the clock, kept increasing
        # here. Replicas' clocks agree to within NTP's error, which is all that
        # "first ready, first served" between them can mean.
        self._last_seq = max(self._last_seq + 1, _now_us())
        return self._last_seq


# Advisory lock spaces (the first key of pg_try_advisory_xact_lock(int, int))
# for idempotency keys, one per table; "ok" and 1 or 2 in ASCII, apart from the
# migrations' lock, which takes the one-bigint form.
_TASK_KEYS = 0x6F6B0001
_SESSION_KEYS = 0x6F6B0002


# Idempotency keys are held until the transaction ends before they are looked
# up (the PL/pgSQL functions of migrations 0009 and 0011 do both in one round
# trip). Without it two replicas given the same key at once (a client that
# failed over and retried) both found nothing, both inserted, and the loser's
# whole group commit failed on the unique index, ending every stream on that
# replica while it rebuilt its state. Try-locks, never waits: a batch holding
# some keys cannot deadlock one holding others. The read comes after the lock
# in its own statement, whose snapshot is taken once the key is held (the other
# replica may just have committed). A held key refuses the one call:
def _key_busy() -> Unavailable:
    return Unavailable(
        "another replica is handling a request with the same idempotency_key "
        "right now; retry, and the retry returns what that request created",
        reason="IDEMPOTENCY_KEY_BUSY",
    )


class _Tx:
    """One transaction of operations. Rows read are kept by id for the rest of the
    transaction (later operations see earlier ones' changes); writes are kept
    until `flush`, per operation, so a refused operation leaves none."""

    def __init__(
        self, storage: PostgresStorage, conn: asyncpg.Connection, committed: asyncio.Future[None]
    ) -> None:
        self._s = storage
        self.conn = conn
        self._committed = committed
        self.faulted: OpsCoreError | None = None
        self.after: list[Callable[[], None]] = []
        self._tasks: dict[str, Task] = {}
        self._read_tasks: set[str] = set()  # tasks read from the database
        self._read_ready: set[str] = set()  # tasks read while QUEUED
        self._agents: dict[str, Agent | None] = {}
        self._sessions: dict[str, tuple[int, object]] = {}
        self._touched_sessions: set[str] = set()
        self._done_sessions: set[str] = set()
        # Writes, in order: (kind, key, payload); a later one of the same key wins.
        self._writes: list[tuple[str, Any, Any]] = []
        self._notes: list[str] = []
        self._stream_delta: dict[str, int] = {}
        # Run after the operations, before `flush` (Tx.before_flush): not part of
        # an operation's mark, so an operation refused later never drops them.
        self._before_flush: list[Callable[[], Awaitable[None]]] = []

    # ---- transaction plumbing

    def mark(self) -> tuple[int, int, int]:
        return len(self._writes), len(self._notes), len(self.after)

    def rollback_to(self, mark: tuple[int, int, int]) -> None:
        del self._writes[mark[0] :]
        del self._notes[mark[1] :]
        del self.after[mark[2] :]

    @property
    def committed(self) -> asyncio.Future[None]:
        return self._committed

    def atomic(self) -> AbstractContextManager[None]:
        return _Atomic(self)

    def after_commit(self, fn: Callable[[], None]) -> None:
        self.after.append(fn)

    def publish(self, channel: str, payload: str) -> None:
        self._notes.append(f"{self._s.replica_id} {channel} {payload}")

    def next_ready_seq(self) -> int:
        return self._s.next_ready_seq()

    def streams_here(self, agent_id: str) -> int:
        return self._s.streams_here(agent_id)

    async def flush(self) -> int:
        """Send every write of the transaction, one batch per kind; return rows."""
        latest: dict[tuple[str, Any], Any] = {}
        appends: dict[str, list[Any]] = {}
        deletes: list[tuple[str, int]] = []
        for kind, key, payload in self._writes:
            if kind in ("transition", "event", "session_definition"):
                appends.setdefault(kind, []).append(payload)
            elif kind == "delete_definition":
                latest.pop(("definition", key), None)
                deletes.append(key)
            else:
                latest[(kind, key)] = payload
        by_kind: dict[str, list[Any]] = {}
        for (kind, _key), payload in latest.items():
            by_kind.setdefault(kind, []).append(payload)
        c = self.conn
        rows = 0
        attempts = by_kind.get("attempt", [])
        if by_kind.get("agent"):
            await c.executemany(S.AGENT_UPSERT, [PR.agent_row(a) for a in by_kind["agent"]])
        if appends.get("transition"):
            await c.executemany(S.TRANSITION_INSERT, appends["transition"])
        if by_kind.get("task"):
            new, old = [], []
            for t in by_kind["task"]:
                (old if t.task_id in self._read_tasks else new).append(PR.task_row(t))
            if len(new) == 1:
                await c.execute(S.TASK_UPSERT, *new[0])
            elif new:
                await c.execute(S.TASK_INSERT_MANY, *PR.columns(new))
            if old:
                first = S.TASK_FIRST_MUTABLE
                columns = [list(col) for col in zip(*old, strict=True)]
                args = [columns[0], *columns[first : first + len(S.TASK_MUTABLE_TYPES)]]
                if attempts:
                    await c.execute(S.TASK_UPDATE_AND_ATTEMPTS, *args, *PR.columns(attempts))
                    attempts = []
                else:
                    await c.execute(S.TASK_UPDATE, *args)
        if attempts:
            await c.execute(S.ATTEMPT_UPSERT, *PR.columns(attempts))
        if by_kind.get("session"):
            await c.executemany(S.SESSION_UPSERT, by_kind["session"])
        if appends.get("session_definition"):
            await c.executemany(
                "INSERT INTO session_definitions (session_id, body) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                appends["session_definition"],
            )
        if by_kind.get("run"):
            await c.executemany(S.RUN_UPSERT, by_kind["run"])
        if appends.get("event"):
            await c.executemany(
                "INSERT INTO session_events (session_id, sequence, body) VALUES ($1, $2, $3)",
                appends["event"],
            )
        if by_kind.get("definition"):
            await c.executemany(
                "INSERT INTO workflow_definitions (definition_id, version, body, content_hash, "
                "create_time) VALUES ($1, $2, $3, $4, $5)",
                by_kind["definition"],
            )
        if deletes:
            await c.executemany(
                "DELETE FROM workflow_definitions WHERE definition_id = $1 AND version = $2",
                deletes,
            )
        if self._touched_sessions:
            await c.execute(
                "UPDATE sessions SET version = version + 1 WHERE session_id = ANY($1::text[])",
                list(self._touched_sessions),
            )
        for agent_id, delta in self._stream_delta.items():
            if delta > 0:
                await c.execute(
                    "INSERT INTO agent_streams (replica_id, agent_id, streams) VALUES ($1, $2, $3) "
                    "ON CONFLICT (replica_id, agent_id) DO UPDATE SET streams = "
                    "agent_streams.streams + EXCLUDED.streams",
                    self._s.replica_id,
                    agent_id,
                    delta,
                )
            elif delta < 0:
                await c.execute(
                    "UPDATE agent_streams SET streams = streams + $3 WHERE replica_id = $1 "
                    "AND agent_id = $2 AND streams + $3 > 0",
                    self._s.replica_id,
                    agent_id,
                    delta,
                )
                await c.execute(
                    "DELETE FROM agent_streams WHERE replica_id = $1 AND agent_id = $2 "
                    "AND streams + $3 <= 0",
                    self._s.replica_id,
                    agent_id,
                    delta,
                )
        if self._notes:
            # A hundred tasks made ready for one capability wake the others once.
            notes = list(dict.fromkeys(self._notes))
            await c.execute("SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n", CHANNEL, notes)
        for kind_rows in (*by_kind.values(), *appends.values()):
            rows += len(kind_rows)
        return rows

    def committed_ok(self) -> None:
        """After COMMIT: keep the sessions' live state, by their new version."""
        s = self._s
        for sid, (version, live) in self._sessions.items():
            if sid in self._done_sessions:
                s._sessions.pop(sid, None)
            else:
                bump = 1 if sid in self._touched_sessions else 0
                s._sessions[sid] = (version + bump, live)
        for agent_id, delta in self._stream_delta.items():
            n = s._local_streams.get(agent_id, 0) + delta
            if n > 0:
                s._local_streams[agent_id] = n
            else:
                s._local_streams.pop(agent_id, None)

    # ---- agents

    async def agent(self, agent_id: str, *, wait: bool = True) -> Agent | None:
        if agent_id in self._agents:
            return self._agents[agent_id]
        lock = "FOR UPDATE OF a" if wait else "FOR UPDATE OF a SKIP LOCKED"
        row = await self.conn.fetchrow(
            f"SELECT {R.AGENT_COLS}, ({S.LIVE_STREAMS}) FROM agents a WHERE agent_id = $1 {lock}",
            agent_id,
            self._s._replica_us,
        )
        agent = PR.agent_from_row(row, row[S.AGENT_N]) if row is not None else None
        if agent is not None or wait:
            self._agents[agent_id] = agent
        return agent

    def put_agent(self, agent: Agent) -> None:
        self._agents[agent.agent_id] = agent
        self._writes.append(("agent", agent.agent_id, dataclasses.replace(agent)))

    def add_transition(self, transition: StateTransition) -> None:
        self._writes.append(("transition", None, PR.transition_row(transition)))

    def stream_opened(self, agent: Agent) -> None:
        agent.open_subscriptions += 1
        self._stream_delta[agent.agent_id] = self._stream_delta.get(agent.agent_id, 0) + 1

    def stream_closed(self, agent: Agent) -> None:
        agent.open_subscriptions = max(0, agent.open_subscriptions - 1)
        self._stream_delta[agent.agent_id] = self._stream_delta.get(agent.agent_id, 0) - 1

    def watch_liveness(self, agent: Agent) -> None:
        """Every replica scans for silent agents: nothing to arm."""

    # ---- tasks

    def _keep(self, task: Task) -> Task:
        held = self._tasks.get(task.task_id)
        if held is not None:
            return held
        self._tasks[task.task_id] = task
        self._read_tasks.add(task.task_id)
        if task.state == TaskState.QUEUED:
            self._read_ready.add(task.task_id)
        return task

    async def task(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None:
            row = await self.conn.fetchrow(
                f"SELECT {R.TASK_COLS} FROM tasks WHERE task_id = $1 FOR UPDATE", task_id
            )
            if row is None:
                return None
            task = self._keep(R.task_from_row(row))
        return task if not task.is_final else None

    async def stored_task(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is not None:
            return task
        row = await self.conn.fetchrow(
            f"SELECT {R.TASK_COLS} FROM tasks WHERE task_id = $1", task_id
        )
        return R.task_from_row(row) if row is not None else None

    async def prefetch_tasks(self, task_ids: Sequence[str]) -> None:
        wanted = [t for t in dict.fromkeys(task_ids) if t not in self._tasks]
        if len(wanted) < 2:
            return  # `task` reads the one itself
        rows = await self.conn.fetch(
            f"SELECT {R.TASK_COLS} FROM tasks WHERE task_id = ANY($1::text[]) "
            "ORDER BY task_id FOR UPDATE",
            wanted,
        )
        for row in rows:
            self._keep(R.task_from_row(row))

    async def tasks_by_keys(self, keys: Collection[str]) -> dict[str, Task]:
        wanted_set = set(keys)  # a call may hold 1,000 keys, the transaction more tasks
        found = {
            t.idempotency_key: t for t in self._tasks.values() if t.idempotency_key in wanted_set
        }
        wanted = [k for k in keys if k not in found]
        if wanted:
            # The keys are held first (see _key_busy), in the same round trip
            # (migration 0009_task_keys.sql).
            rows = await self.conn.fetch(
                f"SELECT {R.TASK_COLS} FROM opscore_tasks_by_keys($1, $2::text[])",
                _TASK_KEYS,
                wanted,
            )
            if rows and rows[0][0] is None:
                raise _key_busy()
            for row in rows:
                task = R.task_from_row(row)
                found[task.idempotency_key] = task
        return found

    def put_task(self, task: Task) -> None:
        self._tasks[task.task_id] = task
        self._writes.append(("task", task.task_id, dataclasses.replace(task)))
        if task.state == TaskState.SCHEDULED:
            self._note_due(task.schedule_time)
        elif task.state == TaskState.ASSIGNED:
            self._note_due(task.lease_expire_time)

    def _note_due(self, when: datetime | None) -> None:
        if when is None:
            return
        us = to_micros(when)
        if self._s._next_due is None or us < self._s._next_due:  # type: ignore[operator]
            # Every replica rescans its next deadline (this one among them).
            self._notes.append(f"{self._s.replica_id} due -")

    def put_attempt(self, attempt: TaskAttempt) -> None:
        self._writes.append(("attempt", (attempt.task_id, attempt.attempt), R.attempt_row(attempt)))

    async def claim_many(self, wants: Sequence[Want]) -> list[list[Task]]:
        out: list[list[Task]] = [[] for _ in wants]
        room = [max(0, w.n) for w in wants]
        # Who may take what: a capability's tasks, and those pinned to an agent.
        by_cap: dict[str, list[int]] = {}
        by_agent: dict[str, list[int]] = {}
        for i, w in enumerate(wants):
            if room[i]:
                for c in w.capabilities:
                    by_cap.setdefault(c, []).append(i)
                by_agent.setdefault(w.agent_id, []).append(i)
        if not by_agent:
            return out
        # Rows this transaction locked itself come back from SKIP LOCKED, so one
        # branch per capability (and per agent), reading as many as every want
        # of it together may take; and the rows it read as ready (claimed
        # earlier, not yet written) are left out of the read.
        caps = list(by_cap)
        agents = list(by_agent)
        # One round trip. Each capability's ready tasks, and each agent's pinned
        # ones, are read in their index's (priority DESC, ready_seq) order, which
        # stops at the limit; `capability = ANY(...)` would read and sort them
        # all. The repeated `agent_id <> ''` lets a generic plan use the partial
        # index. Rows read but handed to no one stay as they are (never written)
        # and are released at COMMIT.
        rows = await self.conn.fetch(
            "WITH by_capability AS (SELECT t.* FROM unnest($1::text[], $2::integer[]) "
            f"AS c (capability, n), LATERAL (SELECT {R.TASK_COLS} FROM tasks WHERE "
            "tasks.state = 2 AND tasks.agent_id = '' AND tasks.capability = c.capability "
            "AND tasks.task_id <> ALL($5::text[]) ORDER BY tasks.priority DESC, "
            "tasks.ready_seq LIMIT c.n FOR UPDATE SKIP LOCKED) t), "
            "pinned AS (SELECT t.* FROM unnest($3::text[], $4::integer[]) AS p (agent_id, n), "
            f"LATERAL (SELECT {R.TASK_COLS} FROM tasks WHERE tasks.state = 2 "
            "AND tasks.agent_id = p.agent_id AND tasks.agent_id <> '' "
            "AND tasks.task_id <> ALL($5::text[]) ORDER BY tasks.priority DESC, "
            "tasks.ready_seq LIMIT p.n FOR UPDATE SKIP LOCKED) t) "
            "SELECT * FROM by_capability UNION ALL SELECT * FROM pinned",
            caps,
            [sum(room[i] for i in by_cap[c]) for c in caps],
            agents,
            [sum(room[i] for i in by_agent[a]) for a in agents],
            list(self._read_ready),
        )
        found = {t.task_id: t for t in map(R.task_from_row, rows)}
        # Ready tasks of this transaction not yet written (re-queued here).
        for task_id, task in self._tasks.items():
            if task.state == TaskState.QUEUED:
                found[task_id] = task
        # Best first, each to the first want that may take it and has room: a
        # capability's tasks handed out are the best of its queue, so the limits
        # above read every task that can be handed out.
        for task in sorted(found.values(), key=lambda t: (-t.priority, t.ready_seq)):
            takers = by_agent.get(task.agent_id) if task.agent_id else by_cap.get(task.capability)
            for i in takers or ():
                if room[i]:
                    room[i] -= 1
                    out[i].append(self._keep(task))
                    break
        return out

    def before_flush(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._before_flush.append(fn)

    async def end_operations(self) -> None:
        """Run what the operations left for the end of the transaction (and what
        that leaves in turn)."""
        while self._before_flush:
            hooks, self._before_flush = self._before_flush, []
            for fn in hooks:
                await fn()

    async def held_by(self, agent_id: str) -> list[Task]:
        rows = await self.conn.fetch(
            f"SELECT {R.TASK_COLS} FROM tasks WHERE state = 3 AND assigned_agent_id = $1 "
            "ORDER BY task_id FOR UPDATE",
            agent_id,
        )
        for r in rows:
            self._keep(R.task_from_row(r))
        return sorted(
            (
                t
                for t in self._tasks.values()
                if t.state == TaskState.ASSIGNED and t.assigned_agent_id == agent_id
            ),
            key=lambda t: t.task_id,
        )

    # ---- sessions

    async def session(self, session_id: str) -> object | None:
        if session_id in self._sessions:
            return None if session_id in self._done_sessions else self._sessions[session_id][1]
        row = await self.conn.fetchrow(
            "SELECT version, state FROM sessions WHERE session_id = $1 FOR UPDATE", session_id
        )
        if row is None or row[1] not in (1, 2):
            return None
        version = row[0]
        cached = self._s._sessions.get(session_id)
        if cached is not None and cached[0] == version:
            live = cached[1]
        else:
            session = R.session_from_row(
                await self.conn.fetchrow(
                    f"SELECT {R.SESSION_COLS} FROM sessions WHERE session_id = $1", session_id
                )
            )
            session.runs = await self._s._runs(session_id, self.conn)
            body = await self.conn.fetchval(
                "SELECT body FROM session_definitions WHERE session_id = $1", session_id
            )
            last = await self.conn.fetchval(
                "SELECT COALESCE(MAX(sequence), 0) FROM session_events WHERE session_id = $1",
                session_id,
            )
            assert self._s.build_session is not None
            live = await self._s.build_session(session, bytes(body), last)
        self._sessions[session_id] = (version, live)
        return live

    def add_session(self, session_id: str, live: object) -> None:
        self._sessions[session_id] = (0, live)
        self._touched_sessions.add(session_id)

    def session_done(self, session_id: str) -> None:
        self._done_sessions.add(session_id)

    async def session_by_key(self, key: str) -> Session | None:
        for _v, live in self._sessions.values():
            s = live.session  # type: ignore[attr-defined]
            if s.idempotency_key == key:
                return s  # type: ignore[no-any-return]
        # Held and read in one round trip (migration 0011_session_keys.sql).
        row = await self.conn.fetchrow(
            f"SELECT {R.SESSION_COLS} FROM opscore_sessions_by_key($1, $2)", _SESSION_KEYS, key
        )
        if row is None:
            return None
        if row[0] is None:
            raise _key_busy()
        session = R.session_from_row(row)
        session.runs = await self._s._runs(session.session_id, self.conn)
        return session

    def put_session(self, session: Session) -> None:
        self._touched_sessions.add(session.session_id)
        self._writes.append(("session", session.session_id, R.session_row(session)))

    def put_session_definition(self, session_id: str, body: bytes) -> None:
        self._writes.append(("session_definition", None, (session_id, body)))

    def put_run(self, session_id: str, run: TaskRun) -> None:
        self._touched_sessions.add(session_id)
        self._writes.append(("run", (session_id, run.workflow_task_id), R.run_row(session_id, run)))

    def add_session_event(self, session_id: str, sequence: int, body: bytes) -> None:
        self._touched_sessions.add(session_id)
        self._writes.append(("event", None, (session_id, sequence, body)))

    # ---- workflow definitions

    async def lock_definition(self, definition_id: str) -> None:
        # Tried, never waited for, as the idempotency keys are (see _key_busy):
        # waiting stalled this replica's whole executor behind another's
        # transaction, and two batches changing two definitions in opposite
        # orders on two replicas could deadlock (PostgreSQL aborts one batch,
        # and that replica rebuilds its state).
        held = await self.conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('opscore-definition:' || $1, 0))",
            definition_id,
        )
        if not held:
            raise Unavailable(
                f"another replica is changing workflow definition {definition_id!r} "
                "right now; retry",
                reason="DEFINITION_BUSY",
            )

    async def definition(self, definition_id: str, version: int) -> tuple[bytes, str] | None:
        row = await self.conn.fetchrow(
            "SELECT body, content_hash FROM workflow_definitions WHERE definition_id = $1 "
            "AND ($2 = 0 OR version = $2) ORDER BY version DESC LIMIT 1",
            definition_id,
            version,
        )
        return (bytes(row[0]), row[1]) if row is not None else None

    async def definition_versions(self, definition_id: str) -> list[int]:
        rows = await self.conn.fetch(
            "SELECT version FROM workflow_definitions WHERE definition_id = $1 ORDER BY version",
            definition_id,
        )
        return [r[0] for r in rows]

    def put_definition(
        self, definition_id: str, version: int, body: bytes, content_hash: str, when: datetime
    ) -> None:
        self._writes.append(
            (
                "definition",
                (definition_id, version),
                (definition_id, version, body, content_hash, to_micros(when)),
            )
        )

    def delete_definition(self, definition_id: str, version: int) -> None:
        self._writes.append(("delete_definition", (definition_id, version), None))


class _Atomic:
    """A failure inside a change aborts the whole transaction: its operations may
    have changed what this replica keeps (streams, cached sessions)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: _Tx) -> None:
        self._tx = tx

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        if exc is not None and self._tx.faulted is None:
            log.error("a change failed half-way; the transaction is abandoned", exc_info=exc)
            self._tx.faulted = Unavailable("the server hit an internal error; retry the call")
        return False
