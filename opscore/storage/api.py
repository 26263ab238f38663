"""The one storage interface the engines use; each backend implements it.

The engines hold no authoritative state of their own: agents, tasks and sessions
live behind `Storage`. Every change an engine makes runs as an *operation*, a
coroutine given a `Tx` (the operation's view of the state) through
`Storage.run`. The backend decides what a Tx is:

- SQLite (opscore/storage/sqlite): one process owns the file, so the open state
  lives in memory and a Tx serves it directly; operations run at once in the
  caller's coroutine, their rows are written by the group-commit writer.
- PostgreSQL (opscore/storage/postgres): several replicas share the database;
  operations of one replica run one after another on its executor, grouped into
  transactions; a Tx reads rows with locks (`FOR UPDATE`, `SKIP LOCKED` claims).

Rules for operations, so that both backends keep every guarantee:

1. Read what you need first, change state after. Reads may suspend (a query);
   the part that changes state must not await anything but Tx accessors, and
   must be inside `with tx.atomic():`, so that a failure half-way is never left
   in memory (the server rebuilds its state from the database).
2. Record every changed record with `tx.put_*`: what is not put is not stored.
3. Effects outside the state (an assignment sent on a stream, an event to
   watchers) wait for `tx.committed`, or are registered with `tx.after_commit`:
   nothing reaches a client before it is durable.
4. Validation errors (`OpsCoreError`) are raised before the first change.

Timers and liveness are the backend's: it calls the engines back
(`Storage.on_task_due`, `Storage.on_agent_silent`) in an operation of its own,
exactly once per deadline even with several replicas.

Retention (opscore/retention.py) removes what has expired through
`Storage.prune`, one small batch per call; each backend decides how a batch is
kept from disturbing operations (see `prune`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypeVar

from opscore.errors import OpsCoreError
from opscore.models import Agent, StateTransition, Task, TaskAttempt, TaskFilter
from opscore.workflow.models import Session, TaskRun

T = TypeVar("T")

Operation = Callable[["Tx"], Awaitable[T]]

#: What retention prunes, in the order a pass takes them:
#: - "tasks": COMPLETED, FAILED or CANCELLED before the cutoff, with their
#:   attempts; a session's tasks only once the session is prunable too (it
#:   finished before the cutoff), never while it runs;
#: - "sessions": finished before the cutoff, with their task runs, events and
#:   definition snapshot; never one with an open task;
#: - "transitions": recorded before the cutoff, except each agent's latest;
#: - "agents": OFFLINE, FINISHED or deregistered, neither seen nor changed since
#:   the cutoff, with no open stream anywhere, no open task pinned to or leased
#:   by it and no running session pinned to it; with their transitions.
PruneKind = Literal["tasks", "sessions", "transitions", "agents"]
PRUNE_KINDS: tuple[PruneKind, ...] = ("tasks", "sessions", "transitions", "agents")


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one batch of `Storage.prune` removed."""

    #: Rows removed, by table (tables with none left out).
    rows: dict[str, int]
    #: The batch was full: more may have expired. False: nothing is left.
    more: bool

    @property
    def total(self) -> int:
        return sum(self.rows.values())


@dataclass(frozen=True, slots=True)
class Want:
    """One stream's claim in `Tx.claim_many`: up to `n` tasks that a stream of
    `agent_id` serving `capabilities` may take."""

    capabilities: frozenset[str]
    agent_id: str
    n: int


class Tx(Protocol):
    """One operation's access to the state. See the module docstring for the rules."""

    @property
    def committed(self) -> asyncio.Future[None]:
        """Resolves once everything this operation recorded is durable (or fails
        with the error that kept it from being stored). Shared with other
        operations: add callbacks or await it shielded, never cancel it."""

    def atomic(self) -> AbstractContextManager[None]:
        """Around a change to state: a failure inside drops the operation's
        changes and makes the server rebuild its state from the database."""

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call `fn` once this operation's changes are durable (never if not)."""

    # ---- agents

    async def agent(self, agent_id: str) -> Agent | None:
        """The registered agent (deregistered ones included), to change; None if
        never registered."""

    def put_agent(self, agent: Agent) -> None: ...

    def add_transition(self, transition: StateTransition) -> None: ...

    def stream_opened(self, agent: Agent) -> None:
        """This server holds one more open task stream of `agent` (liveness)."""

    def stream_closed(self, agent: Agent) -> None: ...

    def watch_liveness(self, agent: Agent) -> None:
        """Arm (or re-arm) the silence deadline of `agent`: `last_seen_time` +
        agent timeout, unless it has an open stream anywhere or is OFFLINE,
        FINISHED or deregistered."""

    # ---- tasks

    async def task(self, task_id: str) -> Task | None:
        """The open (SCHEDULED, QUEUED, ASSIGNED) task, to change; None when it is
        not open (finished, or unknown: see `stored_task`)."""

    async def stored_task(self, task_id: str) -> Task | None:
        """The task in any state, as last committed (to read, not to change)."""

    async def tasks_by_keys(self, keys: Collection[str]) -> dict[str, Task]:
        """The tasks enqueued with these idempotency keys, open or finished, by
        key; a key no task has is absent. Raises Unavailable (reason
        IDEMPOTENCY_KEY_BUSY) when another replica's transaction holds one of
        the keys right now: the caller's retry then finds its task."""

    def put_task(self, task: Task) -> None:
        """Record a new or changed task. The backend keeps its indexes from the
        task's state: a QUEUED task is ready for `claim_many`, a SCHEDULED one is due
        at `schedule_time`, an ASSIGNED one at `lease_expire_time`, a final one is
        no longer open once committed."""

    def put_attempt(self, attempt: TaskAttempt) -> None: ...

    async def claim_many(self, wants: Sequence[Want]) -> list[list[Task]]:
        """The ready tasks each want may take, to assign now (in the order of
        `wants`; the caller changes and puts each, and puts back unchanged one
        it does not assign after all). A want may take the tasks of its
        capabilities and those pinned to its agent, up to `n`; every task goes
        to one want at most, and none is passed over for a worse one: a want
        left with room got every ready task it may take."""

    def before_flush(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` once the operations of this transaction are done, before its
        writes are stored: at the end of the transaction (PostgreSQL), or of the
        operation (SQLite, which has no transaction boundary). `fn` follows the
        rules of an operation's changes; what it registers runs too. Not undone
        when the operation that registered it fails: `fn` must check what it
        finds then."""

    async def held_by(self, agent_id: str) -> list[Task]:
        """Open tasks whose current attempt is leased to `agent_id`, by task id."""

    # ---- sessions

    async def session(self, session_id: str) -> object | None:
        """The running session's live state (whatever the workflow engine built
        with `Storage.build_session` from its rows), to change; None when the
        session is not running."""

    def add_session(self, session_id: str, live: object) -> None:
        """A session just started: its live state (rows are put separately)."""

    def session_done(self, session_id: str) -> None:
        """The session reached a final state: no longer running once committed."""

    def put_session(self, session: Session) -> None: ...

    def put_session_definition(self, session_id: str, body: bytes) -> None: ...

    def put_run(self, session_id: str, run: TaskRun) -> None: ...

    def add_session_event(self, session_id: str, sequence: int, body: bytes) -> None: ...

    async def session_by_key(self, key: str) -> Session | None:
        """The session started with this idempotency key, running or finished."""

    # ---- workflow definitions

    async def lock_definition(self, definition_id: str) -> None:
        """Keep other servers from changing this definition id until the
        transaction ends. Raises Unavailable (reason DEFINITION_BUSY) when
        another server's transaction holds it right now."""

    async def definition(self, definition_id: str, version: int) -> tuple[bytes, str] | None:
        """The stored body and content hash of a version (0: the latest)."""

    async def definition_versions(self, definition_id: str) -> list[int]:
        """The versions stored under this id, ascending."""

    def put_definition(
        self, definition_id: str, version: int, body: bytes, content_hash: str, when: datetime
    ) -> None: ...

    def delete_definition(self, definition_id: str, version: int) -> None: ...


class Storage(Protocol):
    """What the server opens, and the engines use."""

    #: The backend's name, for logs and metrics ("sqlite", "postgres").
    kind: str
    #: Where the data is, for logs: a file path, or user@host:port/db (never a
    #: password).
    display: str
    #: Set by the owner while it rebuilds its state: every change is refused.
    refusing: OpsCoreError | None
    #: Called when a commit failed or a change failed half-way (the server
    #: rebuilds its state from the database).
    on_failure: Callable[[OpsCoreError], None] | None
    # Called by the backend, in an operation of its own, when a deadline passes.
    on_task_due: Callable[[Tx, str, int], Awaitable[None]] | None
    on_agent_silent: Callable[[Tx, str], Awaitable[None]] | None
    #: Builds a running session's live state from its rows (the workflow engine's).
    build_session: Callable[[Session, bytes, int], Awaitable[object]] | None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def check_writable(self) -> None:
        """Raise (a fresh copy of) the error changes are refused with, if any."""

    async def run(self, op: Operation[T], *, wait: bool = True, tasks: Sequence[str] = ()) -> T:
        """Run `op`; with `wait`, return once its changes are durable. `tasks`: ids
        the operation will ask `tx.task` for (a batch of results from one agent);
        a backend that reads tasks from a database loads those of every operation
        in the transaction in one read, one that holds them in memory ignores it."""

    def reset(self) -> None:
        """Forget every cached and in-memory state (it may be ahead of the
        database) and cancel the timers; `load()` then rebuilds it."""

    async def load(self) -> None:
        """Build what the backend keeps of the state from the database (at start,
        and after `reset`)."""

    # ---- reads outside operations (committed state; lists page by opaque token)

    async def list_agents(
        self, state: int, capability: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Agent], str]: ...

    async def list_transitions(
        self, agent_id: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[StateTransition], str]: ...

    async def list_tasks(
        self, flt: TaskFilter, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Task], str]: ...

    async def list_attempts(
        self,
        task_id: str,
        page_size: int,
        page_token: str,
        budget: int,
        running: TaskAttempt | None = None,
    ) -> tuple[list[TaskAttempt], str]: ...

    async def get_definition(
        self, definition_id: str, version: int = 0
    ) -> tuple[bytes, str] | None:
        """(body, content hash) of one version, or of the latest when version is 0."""

    async def definition_versions(self, definition_id: str) -> list[int]: ...

    async def list_definitions(
        self, page_size: int, page_token: str, budget: int
    ) -> tuple[list[bytes], str]: ...

    async def get_session(self, session_id: str, *, with_runs: bool = True) -> Session | None: ...

    async def list_sessions(
        self, state: int, definition_id: str, page_size: int, page_token: str, budget: int
    ) -> tuple[list[Session], str]: ...

    async def list_session_events(
        self, session_id: str, after: int, budget: int
    ) -> list[tuple[int, bytes]]: ...

    # ---- retention (opscore/retention.py)

    async def prune(self, kind: PruneKind, before: datetime, budget: int) -> Pruned:
        """Remove, in one transaction, up to about `budget` rows of `kind` (see
        PruneKind) that expired before `before`, oldest first, and drop whatever
        the backend keeps of them in memory, so nothing is leaked or comes back
        after a restart. SQLite: an operation of the group-commit writer, so a
        prune never runs beside another commit; PostgreSQL: a transaction of its
        own that locks the rows it removes with SKIP LOCKED, so operations never
        wait on it and several replicas pruning at once share the work."""

    async def reclaim(self) -> int:
        """Give some space freed by prunes back to the file system (SQLite: one
        incremental vacuum step); the pages released, 0 when there is nothing
        to give back (always on PostgreSQL, where autovacuum does it)."""

    # ---- what the engines keep in step across replicas (no-ops on one process)

    def publish(self, channel: str, payload: str) -> None:
        """Tell every server on this database (itself included) about a change,
        once the operation that made it commits; see `subscribe`."""

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call `handler(payload)` for each `publish` on `channel` by any server."""


def by_id(tasks: Iterable[Task]) -> Sequence[Task]:
    return sorted(tasks, key=lambda t: t.task_id)
