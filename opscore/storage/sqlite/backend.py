"""The SQLite backend of opscore.storage.api.

One process owns the file (opscore.storage.sqlite.lock), so the open state lives
here in memory: every agent, every open task (SCHEDULED, QUEUED, ASSIGNED) with
its ready queue and deadline, every running session. It is rebuilt from the file
at start. Operations run at once in their caller's coroutine; their rows are
written by the group-commit writer (opscore.storage.sqlite.store), many
operations to a transaction. Finished tasks and sessions are read from the file
on demand, so their number costs nothing per dispatched task.

The ready queues are one heap per capability and one per pinned agent, ordered
by (-priority, ready_seq). Deadlines are asyncio timer handles, one per open task
and one per silent agent, re-armed lazily: a timer that fires before a deadline
that moved later re-arms itself for the new one.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import heapq
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from opscore.clock import utcnow
from opscore.errors import OpsCoreError
from opscore.models import (
    Agent,
    AgentState,
    StateTransition,
    Task,
    TaskAttempt,
    TaskFilter,
    TaskState,
)
from opscore.storage.api import Operation, Pruned, PruneKind, Want
from opscore.storage.background import BackgroundTasks
from opscore.storage.pages import agent_size, clamp_page_size, decode_cursor, encode_cursor
from opscore.storage.sqlite import retention
from opscore.storage.sqlite.store import Store
from opscore.workflow.models import Session, SessionState, TaskRun

log = logging.getLogger("opscore.storage")

T = TypeVar("T")

_Entry = tuple[int, int, str]  # (-priority, ready_seq, task_id)


class SQLiteStorage:
    kind = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        sync: str = "full",
        max_db_bytes: int = 0,
        agent_timeout: timedelta = timedelta(seconds=30),
    ) -> None:
        self.store = Store(path, sync=sync, max_db_bytes=max_db_bytes)
        self.display = str(path)
        self.agent_timeout = agent_timeout
        self.on_task_due: Callable[[Any, str, int], Awaitable[None]] | None = None
        self.on_agent_silent: Callable[[Any, str], Awaitable[None]] | None = None
        self.build_session: Callable[[Session, bytes, int], Awaitable[object]] | None = None
        self._background = BackgroundTasks(log)
        self._clear()

    def _clear(self) -> None:
        self.agents: dict[str, Agent] = {}
        self._ids: list[str] = []  # agent ids in order: ListAgents bisects, never sorts
        self._liveness: dict[str, asyncio.TimerHandle] = {}
        self.tasks: dict[str, Task] = {}
        self._ready: dict[str, list[_Entry]] = {}
        self._ready_pinned: dict[str, list[_Entry]] = {}
        self._queued: dict[str, int] = {}  # task id -> ready_seq of its heap entry
        # (capability, pinned agent id or "") -> {task id: when it became ready}, in
        # the order tasks became ready: the counts and oldest age that metrics and
        # the no-agent watch read, without a walk over every ready task.
        self._waiting: dict[tuple[str, str], dict[str, datetime]] = {}
        self._ready_seq = 0
        self._held: dict[str, set[str]] = {}  # agent id -> ids of tasks it holds
        self._holder_of: dict[str, str] = {}
        self._timers: dict[str, tuple[asyncio.TimerHandle, datetime, int]] = {}
        self._keys: dict[str, str] = {}
        self._key_lookups = 0
        self._deferred_key_drops: list[str] = []
        self.sessions: dict[str, object] = {}
        self._session_keys: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def refusing(self) -> OpsCoreError | None:
        return self.store.refusing

    @refusing.setter
    def refusing(self, error: OpsCoreError | None) -> None:
        self.store.refusing = error

    @property
    def on_failure(self) -> Callable[[OpsCoreError], None] | None:
        return self.store.on_failure

    @on_failure.setter
    def on_failure(self, fn: Callable[[OpsCoreError], None] | None) -> None:
        self.store.on_failure = fn

    def check_writable(self) -> None:
        self.store.check_writable()

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        self._cancel_timers()
        self._background.cancel()
        await self.store.close()

    def reset(self, error: OpsCoreError) -> None:
        """Drop what is pending (its waiters get `error`) and the in-memory state."""
        self._cancel_timers()
        self.store.discard_pending(error)
        self._clear()

    def _cancel_timers(self) -> None:
        for handle, _when, _attempt in self._timers.values():
            handle.cancel()
        for liveness in self._liveness.values():
            liveness.cancel()
        self._timers.clear()
        self._liveness.clear()

    async def load(self) -> None:
        now = utcnow()
        agents = await self.store.load_agents()
        self._ids = sorted(a.agent_id for a in agents)
        for agent in agents:
            self.agents[agent.agent_id] = agent
            if agent.deregistered or agent.state in (AgentState.OFFLINE, AgentState.FINISHED):
                continue  # no liveness to grant; retention counts from its real last sign
            # Nobody could reach us while we were down: every agent gets a full
            # agent_timeout from now to reconnect before it is marked OFFLINE.
            agent.last_seen_time = max(agent.last_seen_time, now)
            self._watch_liveness(agent)
        self._ready_seq = await self.store.max_ready_seq()
        # In the order they became ready, which _waiting keeps.
        for task in sorted(await self.store.load_open_tasks(), key=lambda t: t.update_time):
            self.tasks[task.task_id] = task
            if task.idempotency_key:
                self._keys[task.idempotency_key] = task.task_id
            self._index(task)
        assert self.build_session is not None
        for session, body, last_seq in await self.store.load_open_sessions():
            self.sessions[session.session_id] = await self.build_session(session, body, last_seq)
            if session.idempotency_key:
                self._session_keys[session.idempotency_key] = session.session_id
        log.info(
            "state loaded",
            extra={
                "agents": len(self.agents),
                "open_tasks": len(self.tasks),
                "running_sessions": len(self.sessions),
            },
        )

    # ------------------------------------------------------------------ operations

    async def run(self, op: Operation[T], *, wait: bool = True, tasks: Sequence[str] = ()) -> T:
        # A Tx per operation: what it leaves for its end (Tx.before_flush) is its own.
        tx = _Tx(self)
        try:
            result = await op(tx)
        except BaseException:
            if tx.hooks:
                await tx.end_operation(failed=True)
            raise
        if tx.hooks:
            await tx.end_operation()
        if wait:
            await self.store.commit()
        return result

    def spawn(self, op: Operation[Any], *, what: str) -> None:
        self._background.keep(self.run(op, wait=False), what)

    def spawn_read(self, coro: Coroutine[Any, Any, Any], *, what: str) -> None:
        self._background.keep(coro, what)

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None:
        """One server on the file: no other server to hear from."""

    # ------------------------------------------------------------------ retention

    async def prune(self, kind: PruneKind, before: datetime, budget: int) -> Pruned:
        return await retention.prune(self, kind, before, budget)

    async def reclaim(self) -> int:
        return await retention.reclaim(self)

    # ------------------------------------------------------------------ deadlines

    def _arm(self, task: Task, when: datetime | None) -> None:
        armed = self._timers.get(task.task_id)
        if when is None:
            if armed is not None:
                armed[0].cancel()
                del self._timers[task.task_id]
            return
        if armed is not None:
            if armed[2] == task.attempt and armed[1] <= when:
                return  # fires first and re-arms for the later deadline then
            armed[0].cancel()
        delay = max(0.0, (when - utcnow()).total_seconds())
        handle = self.store.loop.call_later(delay, self._timer_fired, task.task_id, task.attempt)
        self._timers[task.task_id] = (handle, when, task.attempt)

    def _timer_fired(self, task_id: str, attempt: int) -> None:
        self._timers.pop(task_id, None)
        task = self.tasks.get(task_id)
        if task is None or task.is_final or task.attempt != attempt:
            return
        due = _due_time(task)
        if due is None:
            return
        if due > utcnow():
            self._arm(task, due)
            return
        callback = self.on_task_due
        if callback is not None:
            self.spawn(lambda tx: callback(tx, task_id, attempt), what="task deadline")

    def _watch_liveness(self, agent: Agent) -> None:
        if agent.agent_id in self._liveness or agent.open_subscriptions > 0:
            return
        if agent.deregistered or agent.state in (AgentState.OFFLINE, AgentState.FINISHED):
            return
        delay = (agent.last_seen_time + self.agent_timeout - utcnow()).total_seconds()
        self._liveness[agent.agent_id] = self.store.loop.call_later(
            max(0.0, delay), self._liveness_fired, agent.agent_id
        )

    def _liveness_fired(self, agent_id: str) -> None:
        self._liveness.pop(agent_id, None)
        agent = self.agents.get(agent_id)
        if agent is None or agent.open_subscriptions > 0:
            return
        if utcnow() - agent.last_seen_time < self.agent_timeout:
            self._watch_liveness(agent)  # seen since the timer was set
            return
        callback = self.on_agent_silent
        if callback is not None:
            self.spawn(lambda tx: callback(tx, agent_id), what="agent liveness")

    # ------------------------------------------------------------------ indexes

    def _index(self, task: Task) -> None:
        """Keep the ready queues, deadlines and holders in step with `task`."""
        task_id = task.task_id
        holder = self._holder_of.get(task_id)
        now_holder = task.assigned_agent_id if task.state == TaskState.ASSIGNED else None
        if holder != now_holder:
            if holder is not None:
                held = self._held.get(holder)
                if held is not None:
                    held.discard(task_id)
                    if not held:
                        del self._held[holder]
                del self._holder_of[task_id]
            if now_holder is not None:
                self._held.setdefault(now_holder, set()).add(task_id)
                self._holder_of[task_id] = now_holder
        if task.state == TaskState.QUEUED:
            self._arm(task, None)
            if self._queued.get(task_id) != task.ready_seq:
                entry = (-task.priority, task.ready_seq, task_id)
                heap = (
                    self._ready_pinned.setdefault(task.agent_id, [])
                    if task.agent_id
                    else self._ready.setdefault(task.capability, [])
                )
                heapq.heappush(heap, entry)
                self._queued[task_id] = task.ready_seq
                waiting = self._waiting.setdefault((task.capability, task.agent_id), {})
                waiting.pop(task_id, None)  # re-queued: now the newest
                waiting[task_id] = task.update_time
        else:
            self._unqueue(task)
            self._arm(task, _due_time(task))

    def _unqueue(self, task: Task) -> None:
        """`task` is no longer ready (its heap entry, if any, goes stale)."""
        if self._queued.pop(task.task_id, None) is None:
            return
        key = (task.capability, task.agent_id)
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.pop(task.task_id, None)
            if not waiting:
                del self._waiting[key]

    def _is_ready(self, entry: _Entry) -> bool:
        _, seq, task_id = entry
        t = self.tasks.get(task_id)
        return t is not None and t.state == TaskState.QUEUED and self._queued.get(task_id) == seq

    def _claim(self, capabilities: frozenset[str], agent_id: str, n: int) -> list[Task]:
        out: list[Task] = []
        heaps = [self._ready.get(c) for c in capabilities]
        heaps.append(self._ready_pinned.get(agent_id))
        while len(out) < n:
            best: list[_Entry] | None = None
            for h in heaps:
                while h and not self._is_ready(h[0]):
                    heapq.heappop(h)  # stale: cancelled, assigned or re-queued since
                if h and (best is None or h[0] < best[0]):
                    best = h
            if best is None:
                break
            _, _, task_id = heapq.heappop(best)
            task = self.tasks[task_id]
            self._unqueue(task)
            out.append(task)
        return out

    def _evict_when_durable(self, task: Task) -> None:
        """Forget a finished task once its final row is committed: the file
        answers for it from then on."""

        def evict(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            if task.is_final and self.tasks.get(task.task_id) is task:
                del self.tasks[task.task_id]
                key = task.idempotency_key
                if key:
                    if self._key_lookups:
                        self._deferred_key_drops.append(key)
                    else:
                        self._keys.pop(key, None)

        self.store.batch().add_done_callback(evict)

    def _open_by_key(self, key: str) -> Task | None:
        task_id = self._keys.get(key)
        return self.tasks.get(task_id) if task_id is not None else None

    async def _tasks_by_keys(self, keys: Collection[str]) -> dict[str, Task]:
        found: dict[str, Task] = {}
        missing: list[str] = []
        for key in keys:
            task = self._open_by_key(key)
            if task is not None:
                found[key] = task
            else:
                missing.append(key)
        if not missing:
            return found
        stored = self.store.tasks_by_keys_now(missing)
        if stored is not None:
            # Read on this thread, with nothing awaited: what memory and the file
            # hold are one moment's, and no task can finish in between.
            found.update(stored)
            return found
        # While the lookup awaits the file, keys of tasks finishing meanwhile stay
        # in memory: otherwise the lookup could miss both and create a duplicate.
        self._key_lookups += 1
        try:
            stored = await self.store.tasks_by_keys(missing)
        finally:
            self._key_lookups -= 1
            if not self._key_lookups:
                for dropped in self._deferred_key_drops:
                    tid = self._keys.get(dropped)
                    if tid is not None and tid not in self.tasks:
                        del self._keys[dropped]
                self._deferred_key_drops.clear()
        for key in missing:
            task = self._open_by_key(key)  # created meanwhile
            if task is not None:
                found[key] = task
            elif key in stored:
                found[key] = stored[key]
        return found

    # ------------------------------------------------------------------ reads

    async def read_agent(self, agent_id: str) -> Agent | None:
        agent = self.agents.get(agent_id)
        return dataclasses.replace(agent, metadata=dict(agent.metadata)) if agent else None

    def streams_here(self, agent_id: str) -> int:
        agent = self.agents.get(agent_id)
        return agent.open_subscriptions if agent is not None else 0

    async def read_transition(self, agent_id: str, sequence: int) -> StateTransition | None:
        return await self.store.get_transition(agent_id, sequence)

    async def list_agents(
        self, state: int, capability: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Agent], str]:
        limit = clamp_page_size(page_size)
        after = decode_cursor(page_token, str)[0] if page_token else ""
        page: list[Agent] = []
        used = 0
        more = False
        ids = self._ids
        # Indexed, not sliced: a slice would copy every id after the cursor, per page.
        for i in range(bisect.bisect_right(ids, after), len(ids)):
            a = self.agents[ids[i]]
            if (state and a.state != state) or (capability and capability not in a.capabilities):
                continue
            size = agent_size(a)
            if len(page) >= limit or (page and used + size > budget):
                more = True
                break
            used += size
            page.append(dataclasses.replace(a, metadata=dict(a.metadata)))
        return page, (encode_cursor(page[-1].agent_id) if more else "")

    async def list_transitions(
        self, agent_id: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[StateTransition], str]:
        return await self.store.list_transitions(agent_id, page_size, page_token, budget)

    async def read_task(self, task_id: str) -> Task | None:
        task = self.tasks.get(task_id)
        if task is not None:
            return dataclasses.replace(task)
        return await self.store.get_task(task_id)

    async def list_tasks(
        self, flt: TaskFilter, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Task], str]:
        items, token = await self.store.list_tasks(flt, page_size, page_token, budget)
        # Open tasks may be ahead of the last commit in memory.
        return [
            dataclasses.replace(self.tasks[t.task_id]) if t.task_id in self.tasks else t
            for t in items
        ], token

    async def list_attempts(
        self,
        task_id: str,
        page_size: int,
        page_token: str,
        budget: int,
        running: TaskAttempt | None = None,
    ) -> tuple[list[TaskAttempt], str]:
        return await self.store.list_attempts(task_id, page_size, page_token, budget, running)

    async def get_definition(
        self, definition_id: str, version: int = 0
    ) -> tuple[bytes, str] | None:
        return await self.store.get_definition(definition_id, version)

    async def definition_versions(self, definition_id: str) -> list[int]:
        return await self.store.definition_versions(definition_id)

    async def list_definitions(
        self, page_size: int, page_token: str, budget: int
    ) -> tuple[list[bytes], str]:
        return await self.store.list_definitions(page_size, page_token, budget)

    async def get_session(self, session_id: str, *, with_runs: bool = True) -> Session | None:
        live = self.sessions.get(session_id)
        if live is not None:
            return _session_snapshot(live.session, with_runs)  # type: ignore[attr-defined]
        return await self.store.get_session(session_id, with_runs=with_runs)

    async def list_sessions(
        self, state: int, definition_id: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Session], str]:
        items, token = await self.store.list_sessions(
            state, definition_id, page_size, page_token, budget
        )
        out = []
        for s in items:
            live = self.sessions.get(s.session_id)
            out.append(_session_snapshot(live.session, False) if live is not None else s)  # type: ignore[attr-defined]
        return out, token

    async def list_session_events(
        self, session_id: str, after: int, budget: int
    ) -> list[tuple[int, bytes]]:
        return await self.store.list_session_events(session_id, after, budget)

    # ---- for metrics scrapes (cheap, synchronous)

    @property
    def commits(self) -> int:
        return self.store.commits

    @property
    def faults(self) -> int:
        return self.store.faults

    @property
    def on_commit(self) -> Callable[[int, float], None] | None:
        return self.store.on_commit

    @on_commit.setter
    def on_commit(self, fn: Callable[[int, float], None] | None) -> None:
        self.store.on_commit = fn

    def file_bytes(self) -> tuple[int, int]:
        return self.store.file_bytes()

    def agent_counts(self) -> dict[AgentState, int]:
        out: dict[AgentState, int] = {}
        for a in self.agents.values():
            if not a.deregistered:
                out[a.state] = out.get(a.state, 0) + 1
        return out

    def session_counts(self) -> dict[SessionState, int]:
        out: dict[SessionState, int] = {}
        for live in self.sessions.values():
            state = live.session.state  # type: ignore[attr-defined]
            out[state] = out.get(state, 0) + 1
        return out

    def ready_queues(self) -> dict[tuple[str, str], tuple[int, datetime]]:
        """Ready tasks by (capability, pinned agent id or ""): how many, and when
        the oldest became ready. One step per queue, whatever their length."""
        return {key: (len(w), next(iter(w.values()))) for key, w in self._waiting.items()}


class _Tx:
    """An operation's view: the in-memory state itself, written through the store."""

    __slots__ = ("_s", "hooks")

    def __init__(self, storage: SQLiteStorage) -> None:
        self._s = storage
        self.hooks: list[Callable[[], Awaitable[None]]] | None = None

    @property
    def committed(self) -> asyncio.Future[None]:
        return self._s.store.batch()

    def atomic(self) -> AbstractContextManager[None]:
        return self._s.store.atomic()

    def after_commit(self, fn: Callable[[], None]) -> None:
        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                fn()

        self._s.store.batch().add_done_callback(done)

    def publish(self, channel: str, payload: str) -> None:
        """One server on the file: nobody else to tell."""

    def next_ready_seq(self) -> int:
        self._s._ready_seq += 1
        return self._s._ready_seq

    # ---- agents

    async def agent(self, agent_id: str, *, wait: bool = True) -> Agent | None:
        return self._s.agents.get(agent_id)

    def streams_here(self, agent_id: str) -> int:
        return self._s.streams_here(agent_id)

    def put_agent(self, agent: Agent) -> None:
        s = self._s
        if agent.agent_id not in s.agents:
            s.agents[agent.agent_id] = agent
            bisect.insort(s._ids, agent.agent_id)
        s.store.put_agent(agent)

    def add_transition(self, transition: StateTransition) -> None:
        self._s.store.add_transition(transition)

    def stream_opened(self, agent: Agent) -> None:
        agent.open_subscriptions += 1
        handle = self._s._liveness.pop(agent.agent_id, None)
        if handle is not None:
            handle.cancel()

    def stream_closed(self, agent: Agent) -> None:
        agent.open_subscriptions = max(0, agent.open_subscriptions - 1)

    def watch_liveness(self, agent: Agent) -> None:
        self._s._watch_liveness(agent)

    # ---- tasks

    async def task(self, task_id: str) -> Task | None:
        task = self._s.tasks.get(task_id)
        return task if task is not None and not task.is_final else None

    async def stored_task(self, task_id: str) -> Task | None:
        return self._s.tasks.get(task_id) or await self._s.store.get_task(task_id)

    async def tasks_by_keys(self, keys: Collection[str]) -> dict[str, Task]:
        # One writer: no other transaction can take a key meanwhile.
        return await self._s._tasks_by_keys(keys)

    def put_task(self, task: Task) -> None:
        s = self._s
        if task.task_id not in s.tasks and not task.is_final:
            s.tasks[task.task_id] = task
            if task.idempotency_key:
                s._keys[task.idempotency_key] = task.task_id
        if task.is_final:
            s._arm(task, None)
            s._unqueue(task)
            if task.task_id in s.tasks:
                s._index(task)
                s._evict_when_durable(task)
        else:
            s._index(task)
        s.store.put_task(task)

    def put_attempt(self, attempt: TaskAttempt) -> None:
        self._s.store.put_attempt(attempt)

    async def claim_many(self, wants: Sequence[Want]) -> list[list[Task]]:
        # In memory: each want in turn takes the best of what is left.
        claim = self._s._claim
        return [claim(w.capabilities, w.agent_id, w.n) for w in wants]

    def before_flush(self, fn: Callable[[], Awaitable[None]]) -> None:
        """No transaction boundary here: at the end of the operation."""
        if self.hooks is None:
            self.hooks = [fn]
        else:
            self.hooks.append(fn)

    async def end_operation(self, *, failed: bool = False) -> None:
        while self.hooks:
            hooks, self.hooks = self.hooks, None
            for fn in hooks:
                if not failed:
                    await fn()
                    continue
                # The operation's own error is the one its caller hears.
                try:
                    await fn()
                except Exception:
                    log.exception("work left by a failed operation failed too")

    async def held_by(self, agent_id: str) -> list[Task]:
        s = self._s
        return [s.tasks[t] for t in sorted(s._held.get(agent_id, ())) if t in s.tasks]

    # ---- sessions

    async def session(self, session_id: str) -> object | None:
        return self._s.sessions.get(session_id)

    def add_session(self, session_id: str, live: object) -> None:
        s = self._s
        s.sessions[session_id] = live
        key = live.session.idempotency_key  # type: ignore[attr-defined]
        if key:
            s._session_keys[key] = session_id

    def session_done(self, session_id: str) -> None:
        s = self._s
        live = s.sessions.pop(session_id, None)
        key = live.session.idempotency_key if live is not None else ""  # type: ignore[attr-defined]
        if key:
            # The file answers for it once this commit lands; until then the key
            # must stay resolvable, so it is dropped only after the commit.
            self.after_commit(lambda: s._session_keys.pop(key, None))

    async def session_by_key(self, key: str) -> Session | None:
        s = self._s
        sid = s._session_keys.get(key)
        if sid is not None and sid in s.sessions:
            return s.sessions[sid].session  # type: ignore[attr-defined,no-any-return]
        found = await s.store.get_session_by_key(key)
        if found is not None:
            return found
        # A concurrent start with the same key may have won while we read.
        sid = s._session_keys.get(key)
        if sid is not None and sid in s.sessions:
            return s.sessions[sid].session  # type: ignore[attr-defined,no-any-return]
        return None

    def put_session(self, session: Session) -> None:
        self._s.store.put_session(session)

    def put_session_definition(self, session_id: str, body: bytes) -> None:
        self._s.store.put_session_definition(session_id, body)

    def put_run(self, session_id: str, run: TaskRun) -> None:
        self._s.store.put_run(session_id, run)

    def add_session_event(self, session_id: str, sequence: int, body: bytes) -> None:
        self._s.store.add_session_event(session_id, sequence, body)

    # ---- workflow definitions

    async def lock_definition(self, definition_id: str) -> None:
        """One process: the workflow engine's own lock serializes creations."""

    async def definition(self, definition_id: str, version: int) -> tuple[bytes, str] | None:
        return await self._s.store.get_definition(definition_id, version)

    async def definition_versions(self, definition_id: str) -> list[int]:
        return await self._s.store.definition_versions(definition_id)

    def put_definition(
        self, definition_id: str, version: int, body: bytes, content_hash: str, when: datetime
    ) -> None:
        self._s.store.put_definition(definition_id, version, body, content_hash, when)

    def delete_definition(self, definition_id: str, version: int) -> None:
        self._s.store.delete_definition(definition_id, version)


def _due_time(task: Task) -> datetime | None:
    if task.state == TaskState.SCHEDULED:
        return task.schedule_time
    if task.state == TaskState.ASSIGNED:
        return task.lease_expire_time
    return None


def _session_snapshot(session: Session, with_runs: bool) -> Session:
    runs = {k: dataclasses.replace(r) for k, r in session.runs.items()} if with_runs else {}
    return dataclasses.replace(session, runs=runs)
